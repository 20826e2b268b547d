"""The rate limiter as a client sees it: how many requests get through, and what a 429 says.

Both backends run the same tests; the Redis backend runs against a real valkey-server. The
limiters count on a fake clock that moves only when a test advances it, so no test sleeps and
every count is exact: GCRA admits a burst of ``limit``, then one more per ``T = window / limit``.
The Redis backend takes "now" from the same fake clock; its keys still expire in real time, so
windows are long (a minute or more) against the milliseconds a test runs. One test keeps the
production clock, the Redis server's.
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from pluginchain import InstanceSettings, PluginData, Reject, Stage
from pluginchain.plugins.rate_limiter import _MEMORY_STORES, REDIS_MAX_CONNECTIONS, RateLimiter
from pluginchain.testing import make_exchange, run_plugin
from tests.support.clock import FakeClock
from tests.support.harness import free_port
from tests.support.valkey import limiter_backend_errors, paused_valkey, silent_redis_url

BACKENDS = ["memory", "redis"]


@pytest.fixture
async def build(
    request: pytest.FixtureRequest, chain: str, clock: FakeClock
) -> AsyncIterator[Callable[..., RateLimiter]]:
    """Build rate limiters on this test's chain and clock; ``backend="redis"`` points them at
    valkey, and ``server_clock=True`` leaves them on the production clock (Redis server time)."""
    built: list[RateLimiter] = []

    def build_limiter(
        backend: str = "memory", *, server_clock: bool = False, id: str = "rate_limiter", chain: str = chain, **config: Any
    ) -> RateLimiter:
        config["backend"] = backend
        if backend == "redis":
            config.setdefault("redis_url", request.getfixturevalue("valkey_url"))
            config.setdefault("key_prefix", f"test:{chain}")
            # A slow machine must not turn into fail-open admissions in tests about counting.
            config.setdefault("redis_timeout", "5s")
        plugin = RateLimiter(
            RateLimiter.Config.model_validate(config),
            InstanceSettings(id=id, stage=Stage.PRE_REQUEST, chain=chain),
            clock=None if server_clock else clock,
        )
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


def backend_errors(chain: str, decision: str, plugin: str = "rate_limiter") -> float:
    return limiter_backend_errors(chain, plugin, decision)


# -- counting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_concurrent_callers_get_exactly_the_limit_then_again_after_a_window(backend, build, clock):
    limiter = build(backend, limit=10, window="1m")  # T = 6 s

    assert await count_admitted([limiter], 50) == 10
    assert await count_admitted([limiter], 50) == 0

    clock.advance(5.999)
    assert await count_admitted([limiter], 50) == 0
    clock.advance(0.001)
    assert await count_admitted([limiter], 50) == 1

    clock.advance(60)
    assert await count_admitted([limiter], 50) == 10


async def test_a_burst_larger_than_the_redis_pool_waits_for_connections_instead_of_failing_open(build, chain):
    limiter = build("redis", limit=100, window="1h")

    admitted = await count_admitted([limiter], 3 * REDIS_MAX_CONNECTIONS + 200)

    assert admitted == 100
    assert backend_errors(chain, "allow") == 0


@pytest.mark.parametrize("backend", BACKENDS)
async def test_no_second_burst_right_after_a_fixed_window_edge(backend, build, clock):
    """A fixed one-minute window would admit the limit again just after the minute turns."""
    clock.now = 59.5
    limiter = build(backend, limit=10, window="1m")  # T = 6 s

    assert await count_admitted([limiter], 10) == 10
    clock.advance(1)  # 60.5: past the edge
    assert await count_admitted([limiter], 10) == 0
    clock.advance(5)  # one T after the burst
    assert await count_admitted([limiter], 10) == 1


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_429_says_when_to_retry_and_retrying_then_succeeds(backend, build, clock):
    limiter = build(backend, limit=2, window="1m")  # T = 30 s

    first, second = await attempt(limiter), await attempt(limiter)
    assert isinstance(first, PluginData) and isinstance(second, PluginData)
    assert first.metadata["rate_limit"] == {"limit": 2, "remaining": 1, "reset": 30}
    assert second.metadata["rate_limit"] == {"limit": 2, "remaining": 0, "reset": 60}

    rejected = await attempt(limiter)
    assert isinstance(rejected, Reject)
    assert rejected.status == 429
    assert rejected.headers == {
        "retry-after": "30",
        "x-ratelimit-limit": "2",
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": "60",
    }
    error = json.loads(rejected.body)["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["type"] == "rate_limit_error"
    assert error["message"] == "rate limit exceeded: 2 requests per 1m; retry after 30 s"

    clock.advance(int(rejected.headers["retry-after"]) - 1)
    still_rejected = await attempt(limiter)
    assert isinstance(still_rejected, Reject)
    assert still_rejected.headers["retry-after"] == "1"
    assert still_rejected.headers["x-ratelimit-reset"] == "31"

    clock.advance(1)  # retry-after seconds after the first 429
    retried = await attempt(limiter)
    assert isinstance(retried, PluginData)
    assert retried.metadata["rate_limit"] == {"limit": 2, "remaining": 0, "reset": 60}


async def test_two_replicas_on_one_redis_share_one_limit_on_the_server_clock(build):
    # The production clock: no fake time, and a window long enough that none refills meanwhile.
    replicas = [build("redis", server_clock=True, limit=10, window="1h") for _ in range(2)]

    assert await count_admitted(replicas, 30) == 10
    assert await count_admitted(replicas, 30) == 0


async def test_two_replicas_on_one_redis_share_one_limit(build, clock):
    replicas = [build("redis", limit=10, window="1m") for _ in range(2)]

    assert await count_admitted(replicas, 30) == 10
    clock.advance(6)
    assert await count_admitted(replicas, 30) == 1


# -- across reloads and pushes (each build() is the entry as a new plan compiles it) -------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_reload_that_keeps_the_entry_keeps_every_keys_state(backend, build):
    before_reload = build(backend, limit=5, window="1h", key="header:x-api-key")
    assert await count_admitted([before_reload], 7, headers={"x-api-key": "alice"}) == 5
    assert await count_admitted([before_reload], 2, headers={"x-api-key": "bob"}) == 2

    # Settings that are not the entry's identity or rate change nothing of what was used.
    after_reload = build(backend, limit=5, window="60m", key="header:x-api-key", on_backend_error="deny")
    assert await count_admitted([after_reload], 5, headers={"x-api-key": "alice"}) == 0
    assert await count_admitted([after_reload], 5, headers={"x-api-key": "bob"}) == 3


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_changed_limit_or_window_carries_the_requests_used_over(backend, build, clock):
    first = build(backend, limit=4, window="1m")  # T = 15 s
    assert await count_admitted([first], 2) == 2

    # 2 used of 4 per minute are 2 used of 8 per minute: 6 more now.
    assert await count_admitted([build(backend, limit=8, window="1m")], 10) == 6
    # 8 used stay used under a lowered limit of 2 per minute (T = 30 s): the key waits until it is
    # back under the limit, 7 intervals, and lowering and raising the limit hands out nothing.
    lowered = build(backend, limit=2, window="1m")
    assert await count_admitted([lowered], 3) == 0
    assert await count_admitted([build(backend, limit=8, window="1m")], 3) == 0
    assert await count_admitted([lowered], 1) == 0  # the bucket refills at the rate that last counted it
    clock.advance(7 * 30 - 1)
    assert await count_admitted([lowered], 1) == 0
    clock.advance(1)
    assert await count_admitted([lowered], 3) == 1
    # A longer window refills the same requests more slowly, from the first request after the
    # change on: 2 of 2 per 2 minutes, one more after T = 60 s.
    slower = build(backend, limit=2, window="2m")
    assert await count_admitted([slower], 1) == 0
    clock.advance(59)
    assert await count_admitted([slower], 1) == 0
    clock.advance(1)
    assert await count_admitted([slower], 3) == 1


@pytest.mark.parametrize("backend", BACKENDS)
async def test_requests_on_the_old_plan_and_the_new_one_count_in_one_bucket(backend, build):
    old_plan = build(backend, limit=10, window="1m")
    new_plan = build(backend, limit=20, window="1m")
    # Whichever plan admits a request, it is one request used: 10 used, alternating between them,
    # are all of the old limit and half of the new one.
    assert await count_admitted([old_plan, new_plan], 10) == 10
    assert await count_admitted([old_plan], 10) == 0
    assert await count_admitted([new_plan], 20) == 10


@pytest.mark.parametrize("change", [{"key": "header:x-api-key"}, {"backend": "redis"}, {"id": "other"}, {"chain": "other"}])
async def test_a_different_key_form_backend_id_or_chain_starts_with_a_full_bucket(change, build, chain):
    assert await count_admitted([build(limit=3, window="1h")], 3) == 3
    assert await count_admitted([build(limit=3, window="1h")], 1) == 0
    if "chain" in change:
        change = {"chain": f"{chain}-{change['chain']}"}
    assert await count_admitted([build(**{"limit": 3, "window": "1h", **change})], 4) == 3


def test_the_memory_of_removed_entries_is_freed(chain):
    settings = [InstanceSettings(id=f"limiter-{n}", stage=Stage.PRE_REQUEST, chain=chain) for n in range(500)]
    config = RateLimiter.Config.model_validate({"limit": 5, "window": "1h"})
    gc.collect()
    before = len(_MEMORY_STORES)
    limiters = [RateLimiter(config, one) for one in settings]
    assert len(_MEMORY_STORES) == before + 500
    del limiters
    gc.collect()
    assert len(_MEMORY_STORES) == before


# -- keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_each_api_key_has_its_own_bucket_and_keyless_requests_share_one(backend, build):
    limiter = build(backend, limit=2, window="1m", key="header:X-Api-Key")
    alice, bob = {"x-api-key": "sk-alice"}, {"x-api-key": "sk-bob"}

    assert await count_admitted([limiter], 3, headers=alice) == 2
    assert await count_admitted([limiter], 3, headers=bob) == 2
    assert await count_admitted([limiter], 3, headers={}) == 2
    assert await count_admitted([limiter], 3, headers={"x-api-key": ""}) == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key", ["consumer", "session"])
async def test_each_consumer_or_session_has_its_own_bucket_whatever_header_it_came_with(backend, build, key):
    limiter = build(backend, limit=2, window="1m", key=key)

    assert await count_admitted([limiter], 3, **{key: "team-a"}, headers={"x-api-key": "one"}) == 2
    assert await count_admitted([limiter], 3, **{key: "team-a"}, headers={"x-api-key": "two"}) == 0
    assert await count_admitted([limiter], 3, **{key: "team-b"}) == 2
    assert await count_admitted([limiter], 3) == 2  # without one established: one shared bucket


@pytest.mark.parametrize("backend", BACKENDS)
async def test_each_client_address_has_its_own_bucket(backend, build):
    limiter = build(backend, limit=1, window="1m", key="client_address")

    assert await count_admitted([limiter], 2, client_address="10.0.0.1") == 1
    assert await count_admitted([limiter], 2, client_address="10.0.0.2") == 1


async def test_raw_key_values_never_reach_redis(build, chain, valkey_url):
    limiter = build("redis", limit=5, window="1m", key="header:x-api-key")  # T = 12 s
    for secret in ("sk-alice-secret", "sk-bob-secret"):
        await attempt(limiter, headers={"x-api-key": secret})
    await attempt(limiter, headers={})

    client = Redis.from_url(valkey_url)
    try:
        keys = [key.decode() async for key in client.scan_iter(match=f"test:{chain}:*")]
        values = [await client.get(key) for key in keys]
        ttls = [await client.pttl(key) for key in keys]
    finally:
        await client.aclose()
    assert len(keys) == 3
    for key in keys:
        digest = key.removeprefix(f"test:{chain}:")
        assert len(digest) == 64 and set(digest) <= set("0123456789abcdef"), key
    # The value is the bucket's TAT in microseconds of the limiter's clock, now + T, and the
    # interval T it was counted at (as T / 1), so a changed limit or window can carry it over.
    assert values == [b"1012000000:12000000:1"] * 3
    # Redis expires the key in real time once the bucket is full again, T after one request.
    assert all(0 < ttl <= 12_000 for ttl in ttls), ttls


# -- backend failures -------------------------------------------------------------------------


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


async def test_backend_errors_warn_at_most_once_per_ten_seconds_and_say_how_many_were_suppressed(
    build, chain, clock, caplog
):
    limiter = build("redis", redis_url=closed_port_url(), on_backend_error="allow")
    before = backend_errors(chain, "allow")

    def warnings() -> list[str]:
        return [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]

    assert await count_admitted([limiter], 3) == 3
    assert len(warnings()) == 1
    clock.advance(9.5)
    assert await count_admitted([limiter], 1) == 1
    assert len(warnings()) == 1

    clock.advance(0.5)  # ten seconds after the first warning
    assert await count_admitted([limiter], 1) == 1
    assert len(warnings()) == 2
    assert warnings()[1].endswith("allowed the request per on_backend_error (3 similar warnings suppressed)")
    assert backend_errors(chain, "allow") == before + 5


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
    # The 100 ms are real: this is a network timeout.
    with silent_redis_url() as url:
        limiter = build("redis", redis_url=url, redis_timeout="100ms")
        before = backend_errors(chain, "allow")

        async with asyncio.timeout(5):
            result = await attempt(limiter)

        assert isinstance(result, PluginData)
        assert backend_errors(chain, "allow") == before + 1


async def test_redis_timeout_bounds_every_decision_the_wait_for_a_connection_included(build, chain):
    # Three times more decisions at once than the pool has connections, to a valkey that answers
    # nothing: most queue for a connection, and each must still be decided at redis_timeout.
    # Several rounds: redis-py's own timeouts racing ours made some take twice as long.
    timeout = 0.25
    async with paused_valkey() as url:
        limiter = build("redis", redis_url=url, redis_timeout="250ms")
        before = backend_errors(chain, "allow")
        durations: list[float] = []
        for _ in range(5):
            durations += await asyncio.gather(*(timed(attempt(limiter)) for _ in range(3 * REDIS_MAX_CONNECTIONS)))

    assert max(durations) / timeout < 1.6, f"slowest {max(durations):.3f}s against a redis_timeout of {timeout}s"
    assert backend_errors(chain, "allow") == before + len(durations)


async def timed(awaitable: Awaitable[object]) -> float:
    loop = asyncio.get_running_loop()
    started = loop.time()
    await awaitable
    return loop.time() - started


# -- config -----------------------------------------------------------------------------------


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
