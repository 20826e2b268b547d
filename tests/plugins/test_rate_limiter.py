"""The rate limiter as a client sees it: how many requests get through, and what a 429 says.

Both backends run the same tests; the Redis backend runs against a real valkey-server. Timing
bounds come from GCRA itself: over a span ``t`` it admits at most ``limit + t / T`` requests
(``T = window / limit``), with ``t`` measured around the calls in the same test.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError
from redis.asyncio import Redis

from pluginchain import PluginData, Reject
from pluginchain.plugins.rate_limiter import REDIS_MAX_CONNECTIONS, RateLimiter
from pluginchain.testing import make_exchange, make_plugin, run_plugin
from tests.support.harness import free_port

BACKENDS = ["memory", "redis"]


@pytest.fixture
def chain() -> str:
    """A chain name of this test alone, so buckets and counters never leak between tests."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def build(request: pytest.FixtureRequest, chain: str) -> AsyncIterator[Callable[..., RateLimiter]]:
    """Build rate limiters on this test's chain; ``backend="redis"`` points them at valkey."""
    built: list[RateLimiter] = []

    def build_limiter(backend: str = "memory", **config: Any) -> RateLimiter:
        config["backend"] = backend
        if backend == "redis":
            config.setdefault("redis_url", request.getfixturevalue("valkey_url"))
            config.setdefault("key_prefix", f"test:{chain}")
            # A slow machine must not turn into fail-open admissions in tests about counting.
            config.setdefault("redis_timeout", "5s")
        plugin = make_plugin(RateLimiter, config, chain=chain)
        built.append(plugin)
        return plugin

    yield build_limiter
    for plugin in built:
        await plugin.aclose()


async def attempt(plugin: RateLimiter, **exchange: Any) -> PluginData | Reject:
    try:
        return await run_plugin(plugin, make_exchange(**exchange))
    except Reject as reject:
        return reject


async def count_admitted(plugins: list[RateLimiter], callers: int, **exchange: Any) -> int:
    """Send ``callers`` concurrent requests, spread over ``plugins``; return how many got through."""
    results = await asyncio.gather(
        *(attempt(plugins[i % len(plugins)], **exchange) for i in range(callers))
    )
    return sum(not isinstance(result, Reject) for result in results)


def backend_errors(chain: str, decision: str) -> float:
    labels = {"chain": chain, "plugin": "rate_limiter", "decision": decision}
    return REGISTRY.get_sample_value("pluginchain_rate_limiter_backend_errors_total", labels) or 0.0


@pytest.mark.parametrize("backend", BACKENDS)
async def test_concurrent_callers_get_exactly_the_limit_then_again_after_a_window(backend, build):
    limiter = build(backend, limit=10, window="1s")
    interval = 0.1

    started = time.monotonic()
    admitted = await count_admitted([limiter], 50)
    elapsed = time.monotonic() - started
    assert 10 <= admitted <= 10 + math.floor(elapsed / interval)
    assert admitted == 10 or elapsed >= interval, f"admitted {admitted} of 50 in {elapsed:.3f}s"

    await asyncio.sleep(1.0)
    started = time.monotonic()
    admitted = await count_admitted([limiter], 50)
    elapsed = time.monotonic() - started
    assert admitted == 10 or (elapsed >= interval and admitted <= 10 + elapsed / interval)


async def test_a_burst_larger_than_the_redis_pool_waits_for_connections_instead_of_failing_open(build, chain):
    limiter = build("redis", limit=100, window="1h")

    admitted = await count_admitted([limiter], 3 * REDIS_MAX_CONNECTIONS + 200)

    assert admitted == 100
    assert backend_errors(chain, "allow") == 0


@pytest.mark.parametrize("backend", BACKENDS)
async def test_no_second_burst_right_after_a_fixed_window_edge(backend, build):
    """A fixed one-second window would admit the limit again just after the second turns."""
    limiter = build(backend, limit=10, window="1s")
    interval = 0.1
    await asyncio.sleep((0.95 - time.time() % 1.0) % 1.0)

    started = time.monotonic()
    assert await count_admitted([limiter], 10) == 10
    await asyncio.sleep((1.05 - time.time() % 1.0) % 1.0)
    after_edge = await count_admitted([limiter], 10)
    elapsed = time.monotonic() - started

    assert after_edge <= elapsed / interval, f"{after_edge} admitted {elapsed:.3f}s after a full burst"
    assert after_edge < 10


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_429_says_when_to_retry_and_retrying_then_succeeds(backend, build):
    limiter = build(backend, limit=2, window="2s")

    first, second = await attempt(limiter), await attempt(limiter)
    assert isinstance(first, PluginData) and isinstance(second, PluginData)
    assert first.metadata["rate_limit"] == {"limit": 2, "remaining": 1, "reset": 1}
    assert second.metadata["rate_limit"] == {"limit": 2, "remaining": 0, "reset": 2}

    rejected = await attempt(limiter)
    assert isinstance(rejected, Reject)
    assert rejected.status == 429
    assert rejected.headers == {
        "retry-after": "1",
        "x-ratelimit-limit": "2",
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": "2",
    }
    error = json.loads(rejected.body)["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["type"] == "rate_limit_error"
    assert "2 requests per 2s" in error["message"]

    await asyncio.sleep(int(rejected.headers["retry-after"]))
    assert isinstance(await attempt(limiter), PluginData)


async def test_two_replicas_on_one_redis_share_one_limit(build):
    replicas = [build("redis", limit=10, window="1s"), build("redis", limit=10, window="1s")]

    started = time.monotonic()
    admitted = await count_admitted(replicas, 30)
    elapsed = time.monotonic() - started

    assert admitted == 10 or (elapsed >= 0.1 and admitted <= 10 + elapsed / 0.1)


async def test_memory_buckets_survive_a_reload_that_keeps_the_entry(build):
    before_reload = build(limit=3, window="2s")
    assert await count_admitted([before_reload], 3) == 3

    same_entry = build(limit=3, window="2s")
    assert isinstance(await attempt(same_entry), Reject)
    new_rate = build(limit=4, window="2s")
    assert isinstance(await attempt(new_rate), PluginData)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_each_api_key_has_its_own_bucket_and_keyless_requests_share_one(backend, build):
    limiter = build(backend, limit=2, window="2s", key="header:X-Api-Key")
    alice, bob = {"x-api-key": "sk-alice"}, {"x-api-key": "sk-bob"}

    assert await count_admitted([limiter], 3, headers=alice) == 2
    assert isinstance(await attempt(limiter, headers=bob), PluginData)
    assert await count_admitted([limiter], 3, headers={}) == 2
    assert isinstance(await attempt(limiter, headers={"x-api-key": ""}), PluginData)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_each_client_address_has_its_own_bucket(backend, build):
    limiter = build(backend, limit=1, window="2s", key="client_address")

    assert await count_admitted([limiter], 2, client_address="10.0.0.1") == 1
    assert isinstance(await attempt(limiter, client_address="10.0.0.2"), PluginData)


async def test_raw_key_values_never_reach_redis(build, chain, valkey_url):
    limiter = build("redis", limit=5, window="2s", key="header:x-api-key")
    for secret in ("sk-alice-secret", "sk-bob-secret"):
        await attempt(limiter, headers={"x-api-key": secret})
    await attempt(limiter, headers={})

    client = Redis.from_url(valkey_url)
    try:
        keys = [key.decode() async for key in client.scan_iter(match=f"test:{chain}:*")]
        ttls = [await client.pttl(key) for key in keys]
    finally:
        await client.aclose()
    assert len(keys) == 3
    for key in keys:
        digest = key.removeprefix(f"test:{chain}:")
        assert len(digest) == 64 and set(digest) <= set("0123456789abcdef"), key
    assert all(0 < ttl <= 2000 for ttl in ttls), ttls


def closed_port_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


async def test_backend_down_with_allow_admits_counts_and_warns_without_the_key(build, chain, caplog):
    limiter = build("redis", redis_url=closed_port_url(), key="header:x-api-key", on_backend_error="allow")
    before = backend_errors(chain, "allow")

    result = await attempt(limiter, headers={"x-api-key": "sk-very-secret"})

    assert isinstance(result, PluginData)
    assert "rate_limit" not in result.metadata
    assert backend_errors(chain, "allow") == before + 1
    warnings = [record for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1 and "allowed" in warnings[0].getMessage()
    assert "sk-very-secret" not in caplog.text


async def test_backend_down_with_deny_answers_429_and_counts(build, chain):
    limiter = build("redis", redis_url=closed_port_url(), on_backend_error="deny")
    before = backend_errors(chain, "deny")

    rejected = await attempt(limiter)

    assert isinstance(rejected, Reject)
    assert rejected.status == 429
    assert rejected.code == "rate_limit_backend_unavailable"
    assert rejected.headers["retry-after"] == "1"
    assert backend_errors(chain, "deny") == before + 1


async def test_a_redis_that_never_answers_is_given_up_on_after_redis_timeout(build, chain):
    # The kernel completes connections to a listening socket nobody accepts from, so the
    # command is sent and no reply ever comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        limiter = build("redis", redis_url=url, redis_timeout="100ms")
        before = backend_errors(chain, "allow")

        async with asyncio.timeout(5):
            result = await attempt(limiter)

        assert isinstance(result, PluginData)
        assert backend_errors(chain, "allow") == before + 1


@pytest.mark.parametrize("config", [{}, {"limit": 100, "window": "1m"}])
def test_the_spec_examples_validate(config):
    validated = RateLimiter.Config.model_validate(config)
    assert (validated.limit, validated.window, validated.backend) == (100, 60.0, "memory")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"window": "soon"}, "not a duration: 'soon'"),
        ({"window": "0s"}, "duration must be positive"),
        ({"limit": 0}, "greater than 0"),
        ({"limit": True}, "limit must be a positive integer"),
        ({"key": "cookie:session"}, "not a rate limit key: 'cookie:session'; expected 'global'"),
        ({"key": "header:"}, "not a rate limit key"),
        ({"backend": "redis"}, "backend 'redis' needs redis_url"),
        ({"redis_url": "redis://valkey:6379"}, "backend is 'memory'"),
        ({"backend": "redis", "redis_url": "valkey:6379"}, "not a Redis URL"),
        ({"on_backend_error": "retry"}, "'allow' or 'deny'"),
        ({"limits": 10}, "Extra inputs are not permitted"),
    ],
)
def test_config_errors_name_what_is_wrong(config, message):
    with pytest.raises(ValidationError, match=message):
        RateLimiter.Config.model_validate(config)
