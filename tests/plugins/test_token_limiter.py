"""The token limiter as a client sees it: which requests get through, what is charged, what a 429 says.

Both backends run the same tests wherever they can; the Redis backend runs against a real
valkey-server. The limiters count on a fake clock that moves only when a test advances it, so
no test sleeps and every count is exact. Most tests use 1000 tokens per minute, where a token is
worth T = 60 ms of refill. A request is checked by ``execute`` (through ``run_plugin``) and
charged by ``finish``, which the tests call themselves after setting ``exchange.usage``, as the
engine does once the exchange is over. Redis keys expire in real time, so windows are a minute
or more against the milliseconds a test runs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from pluginchain import Exchange, InstanceSettings, Needs, PluginContext, PluginData, Reject, Stage, Usage
from pluginchain._config.issues import ConfigError
from pluginchain._config.registry import PluginRegistry
from pluginchain._config.validation import validate_document
from pluginchain._engine.plan import compile_plan
from pluginchain.plugins._limits import REDIS_MAX_CONNECTIONS
from pluginchain.plugins.token_limiter import TokenLimiter, openai_duration
from pluginchain.testing import make_exchange, run_plugin
from tests.support.clock import FakeClock
from tests.support.harness import free_port
from tests.support.valkey import limiter_backend_errors, paused_valkey, silent_redis_url

T = TypeVar("T")

BACKENDS = ["memory", "redis"]
LIMIT, REMAINING, RESET = "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"


@pytest.fixture
async def build(
    request: pytest.FixtureRequest, chain: str, clock: FakeClock
) -> AsyncIterator[Callable[..., TokenLimiter]]:
    """Build token limiters on this test's chain and clock; ``backend="redis"`` points them at
    valkey, and ``server_clock=True`` leaves them on the production clock (Redis server time)."""
    built: list[TokenLimiter] = []

    def build_limiter(
        backend: str = "memory", *, server_clock: bool = False, id: str = "token_limiter", chain: str = chain, **config: Any
    ) -> TokenLimiter:
        config["backend"] = backend
        config.setdefault("limit", 1000)
        if backend == "redis":
            config.setdefault("redis_url", request.getfixturevalue("valkey_url"))
            config.setdefault("key_prefix", f"test:{chain}")
            # A slow machine must not turn into fail-open admissions in tests about counting.
            config.setdefault("redis_timeout", "5s")
        plugin = TokenLimiter(
            TokenLimiter.Config.model_validate(config),
            InstanceSettings(id=id, stage=Stage.PRE_REQUEST, chain=chain),
            clock=None if server_clock else clock,
        )
        built.append(plugin)
        return plugin

    yield build_limiter
    for plugin in built:
        await plugin.aclose()


@dataclass
class Call:
    """One request through a limiter: its exchange and what ``execute`` did with it."""

    exchange: Exchange
    outcome: PluginData | Reject

    @property
    def admitted(self) -> bool:
        return not isinstance(self.outcome, Reject)

    @property
    def rejection(self) -> Reject:
        assert isinstance(self.outcome, Reject), "the request was admitted"
        return self.outcome

    @property
    def headers(self) -> dict[str, str]:
        """The headers the limiter put on the client's response (admitted requests)."""
        return self.exchange.response_headers


async def call(plugin: TokenLimiter, body: dict[str, Any] | bytes | None = None, **exchange: Any) -> Call:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    sent = make_exchange(body=raw, **exchange)
    try:
        outcome: PluginData | Reject = await run_plugin(plugin, sent)
    except Reject as reject:
        outcome = reject
    return Call(sent, outcome)


async def finish(plugin: TokenLimiter, done: Call, usage: Usage | None) -> None:
    """What the engine does once the exchange is over: usage on the exchange, then ``finish``."""
    done.exchange.usage = usage
    deadline = asyncio.get_running_loop().time() + plugin.settings.timeout
    ctx = PluginContext(plugin.settings.chain, done.exchange.request_id, plugin.id, deadline)
    await plugin.finish(ctx, PluginData(plugin.stage, done.exchange))


def tokens(input: int = 0, output: int = 0) -> Usage:
    return Usage(input_tokens=input, output_tokens=output, total_tokens=input + output)


async def remaining(plugin: TokenLimiter, body: dict[str, Any] | None = None, **exchange: Any) -> int:
    """What a request that reserves nothing and is never charged is told is left (0 on a 429)."""
    probe = await call(plugin, body, **exchange)
    headers = probe.headers if probe.admitted else probe.rejection.headers
    return int(headers[REMAINING])


def backend_errors(chain: str, decision: str, plugin: str = "token_limiter") -> float:
    return limiter_backend_errors(chain, plugin, decision)


# -- checking and charging ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_concurrent_requests_are_admitted_on_what_is_left_and_all_charged_exactly(backend, build, clock):
    limiter = build(backend, limit=1000, window="1m")  # T = 60 ms

    first = await asyncio.gather(*(call(limiter) for _ in range(20)))
    assert all(done.admitted for done in first)
    assert {done.headers[REMAINING] for done in first} == {"1000"}
    await asyncio.gather(*(finish(limiter, done, tokens(input=20, output=10)) for done in first))
    assert await remaining(limiter) == 400

    # 400 left: all 20 are admitted again, and their 600 tokens overshoot the budget by 200.
    second = await asyncio.gather(*(call(limiter) for _ in range(20)))
    assert all(done.admitted for done in second)
    assert {done.headers[REMAINING] for done in second} == {"400"}
    await asyncio.gather(*(finish(limiter, done, tokens(input=20, output=10)) for done in second))

    rejected = (await call(limiter)).rejection
    # Full in a window plus the 200 tokens of debt (72 s); a token is left once 201 have refilled.
    assert rejected.headers == {LIMIT: "1000", REMAINING: "0", RESET: "1m12s", "retry-after": "13"}

    clock.advance(12.06)
    assert await remaining(limiter) == 1


@pytest.mark.parametrize("backend", BACKENDS)
async def test_concurrent_reservations_admit_exactly_what_the_budget_holds_and_settle_to_the_usage(backend, build):
    limiter = build(backend, limit=1000, window="1m", count="output", reserve="max_tokens")

    calls = await asyncio.gather(*(call(limiter, {"model": "m", "max_tokens": 100}) for _ in range(20)))

    admitted = [done for done in calls if done.admitted]
    assert len(admitted) == 10
    assert sorted(int(done.headers[REMAINING]) for done in admitted) == list(range(0, 1000, 100))
    for done in calls:
        if not done.admitted:
            assert done.rejection.headers == {LIMIT: "1000", REMAINING: "0", RESET: "1m0s", "retry-after": "6"}
    # Each used 40 of its 100: 60 refunded each.
    await asyncio.gather(*(finish(limiter, done, tokens(input=500, output=40)) for done in admitted))
    assert await remaining(limiter) == 600


async def test_two_replicas_on_one_redis_share_one_budget_on_the_server_clock(build):
    # The production clock: no fake time, and a window long enough that nothing refills meanwhile.
    replicas = [build("redis", server_clock=True, limit=1000, window="1h", reserve="max_tokens") for _ in range(2)]

    calls = await asyncio.gather(*(call(replicas[i % 2], {"max_tokens": 100}) for i in range(30)))

    assert sum(done.admitted for done in calls) == 10


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_spent_budget_answers_429_with_the_token_headers_and_an_openai_error(backend, build, clock):
    limiter = build(backend, limit=600, window="1m")  # T = 100 ms
    spender = await call(limiter)
    await finish(limiter, spender, tokens(input=700, output=200))  # 300 over the budget

    rejected = (await call(limiter)).rejection

    assert rejected.status == 429
    # Full again in 60 s + 300 T; a token is back once 301 T have passed: 30.1 s, rounded up.
    assert rejected.headers == {LIMIT: "600", REMAINING: "0", RESET: "1m30s", "retry-after": "31"}
    assert json.loads(rejected.body) == {
        "error": {
            "type": "tokens",
            "code": "rate_limit_exceeded",
            "message": "token rate limit exceeded: 600 tokens per 1m; retry after 31 s",
        }
    }

    clock.advance(30.099)
    still = (await call(limiter)).rejection
    assert still.headers == {LIMIT: "600", REMAINING: "0", RESET: "59.901s", "retry-after": "1"}
    clock.advance(0.001)
    assert await remaining(limiter) == 1


@pytest.mark.parametrize("backend", BACKENDS)
async def test_admitted_requests_are_told_the_limit_and_what_was_left_before_them(backend, build):
    limiter = build(backend, limit=600, window="1m")

    first = await call(limiter)
    assert first.headers == {LIMIT: "600", REMAINING: "600"}
    assert first.outcome.metadata  # what finish charges lives in the request's metadata
    await finish(limiter, first, tokens(input=100, output=50))

    second = await call(limiter)
    assert second.headers == {LIMIT: "600", REMAINING: "450"}


@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_budget_refills_continuously_and_never_past_the_limit(backend, build, clock):
    limiter = build(backend, limit=600, window="1m")  # T = 100 ms
    await finish(limiter, await call(limiter), tokens(output=600))
    assert await remaining(limiter) == 0

    clock.advance(0.099)
    assert await remaining(limiter) == 0
    clock.advance(0.001)
    assert await remaining(limiter) == 1
    clock.advance(9.9)
    assert await remaining(limiter) == 100
    clock.advance(50)
    assert await remaining(limiter) == 600
    clock.advance(3600)  # idle for an hour: still one window's worth, no double burst
    assert await remaining(limiter) == 600


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_charge_after_the_bucket_refilled_is_taken_from_full(backend, build, clock):
    limiter = build(backend, limit=600, window="1m")
    quick, slow = await call(limiter), await call(limiter)
    await finish(limiter, quick, tokens(output=600))

    clock.advance(120)  # full again, with no request since
    await finish(limiter, slow, tokens(output=100))

    assert await remaining(limiter) == 500


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("count", "left"), [("total", 450), ("input", 500), ("output", 550)])
async def test_count_picks_the_tokens_charged(backend, count, left, build):
    limiter = build(backend, limit=600, window="1m", count=count)

    await finish(limiter, await call(limiter), tokens(input=100, output=50))

    assert await remaining(limiter) == left


@pytest.mark.parametrize("backend", BACKENDS)
async def test_listed_models_have_buckets_and_limits_of_their_own(backend, build):
    limiter = build(backend, limit=1000, window="1m", models={"gpt-4o": 100})

    big = await call(limiter, {"model": "gpt-4o"})
    assert big.headers == {LIMIT: "100", REMAINING: "100"}
    await finish(limiter, big, tokens(input=60, output=40))
    rejected = (await call(limiter, {"model": "gpt-4o"})).rejection
    assert rejected.headers == {LIMIT: "100", REMAINING: "0", RESET: "1m0s", "retry-after": "1"}
    assert rejected.message == "token rate limit exceeded: 100 tokens per 1m for model gpt-4o; retry after 1 s"

    # Other models, requests without one and bodies that are not JSON share the bucket of `limit`.
    small = await call(limiter, {"model": "gpt-4o-mini"})
    assert small.headers == {LIMIT: "1000", REMAINING: "1000"}
    await finish(limiter, small, tokens(input=200, output=100))
    assert await remaining(limiter, {"model": "o3"}) == 700
    assert await remaining(limiter, {"messages": []}) == 700
    assert int((await call(limiter, b"not json")).headers[REMAINING]) == 700
    assert int((await call(limiter)).headers[REMAINING]) == 700
    assert not (await call(limiter, {"model": "gpt-4o"})).admitted


@pytest.mark.parametrize("backend", BACKENDS)
async def test_each_api_key_has_its_own_budget(backend, build):
    limiter = build(backend, limit=1000, window="1m", key="header:X-Api-Key")
    alice, bob = {"x-api-key": "sk-alice"}, {"x-api-key": "sk-bob"}

    await finish(limiter, await call(limiter, headers=alice), tokens(output=1000))

    assert await remaining(limiter, headers=alice) == 0
    assert await remaining(limiter, headers=bob) == 1000
    assert await remaining(limiter, headers={}) == 1000


async def test_with_several_token_limiters_the_client_sees_the_one_closest_to_rejecting(build):
    wide = build(id="per_key", limit=1000, key="header:x-api-key")
    narrow = build(id="everyone", limit=100)

    for order in ([wide, narrow], [narrow, wide]):
        exchange = make_exchange(headers={"x-api-key": "sk-alice"})
        for limiter in order:
            await run_plugin(limiter, exchange)
        assert exchange.response_headers == {LIMIT: "100", REMAINING: "100"}


# -- across reloads and pushes (each build() is the entry as a new plan compiles it) -------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_reload_that_keeps_the_entry_keeps_every_budget(backend, build):
    before_reload = build(backend, limit=1000, key="header:x-api-key", models={"gpt-4o": 100})
    for key, model, used in (("alice", "other", 300), ("alice", "gpt-4o", 40), ("bob", "other", 1200)):
        done = await call(before_reload, {"model": model}, headers={"x-api-key": key})
        await finish(before_reload, done, tokens(output=used))

    # Settings that are not the entry's identity or rates change nothing of what was used.
    after_reload = build(backend, limit=1000, key="header:x-api-key", models={"gpt-4o": 100}, on_backend_error="deny")
    assert await remaining(after_reload, {"model": "other"}, headers={"x-api-key": "alice"}) == 700
    assert await remaining(after_reload, {"model": "gpt-4o"}, headers={"x-api-key": "alice"}) == 60
    assert not (await call(after_reload, {"model": "other"}, headers={"x-api-key": "bob"})).admitted


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_changed_limit_or_window_carries_the_tokens_used_over(backend, build, clock):
    first = build(backend, limit=1000, window="1m", models={"gpt-4o": 100})
    await finish(first, await call(first), tokens(output=300))
    await finish(first, await call(first, {"model": "gpt-4o"}), tokens(output=40))

    # 300 of 1000 used is 300 of 2000: 1700 left. gpt-4o's 40 used are 40 of its new 50.
    raised = build(backend, limit=2000, window="1m", models={"gpt-4o": 50})
    assert await remaining(raised) == 1700
    assert await remaining(raised, {"model": "gpt-4o"}) == 10
    # A debt stays a debt: 1200 used of a budget cut to 1000 refuse requests until 200 refilled.
    await finish(raised, await call(raised), tokens(output=900))
    cut = build(backend, limit=1000, window="1m")
    assert not (await call(cut)).admitted
    # A longer window refills the same tokens more slowly, from the first request after the change
    # on: 1200 of 1000 per 2 minutes, so 12 s (100 tokens) later still 100 in debt, and 24 s
    # after that 100 tokens are left again.
    slower = build(backend, limit=1000, window="2m")
    assert not (await call(slower)).admitted
    clock.advance(12)
    assert not (await call(slower)).admitted
    clock.advance(24)
    assert await remaining(slower) == 100


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_charge_from_a_request_that_started_on_the_old_plan_counts_at_the_new_rate(backend, build):
    old_plan = build(backend, limit=1000, window="1m")
    in_flight = await call(old_plan)
    new_plan = build(backend, limit=2000, window="1m")
    await finish(old_plan, in_flight, tokens(output=500))  # 500 tokens, whichever plan counts them
    assert await remaining(new_plan) == 1500
    assert await remaining(old_plan) == 500


@pytest.mark.parametrize("change", [{"key": "header:x-api-key"}, {"backend": "redis"}, {"id": "other"}, {"chain": "other"}])
async def test_a_different_key_form_backend_id_or_chain_starts_with_a_full_budget(change, build, chain):
    first = build(limit=1000)
    await finish(first, await call(first), tokens(output=1000))
    assert not (await call(build(limit=1000))).admitted
    if "chain" in change:
        change = {"chain": f"{chain}-{change['chain']}"}
    assert await remaining(build(**{"backend": "memory", "limit": 1000, **change})) == 1000


# -- reserve: max_tokens ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_reservation_must_be_left_and_settles_to_what_was_used(backend, build):
    limiter = build(backend, limit=1000, window="1m", count="output", reserve="max_tokens")  # T = 60 ms

    first = await call(limiter, {"model": "m", "max_tokens": 300})
    assert first.headers == {LIMIT: "1000", REMAINING: "700"}  # after the reservation

    too_much = (await call(limiter, {"max_completion_tokens": 800, "max_tokens": 1})).rejection
    # 800 are left once 100 T (6 s) have refilled; full once the 300 T (18 s) have.
    assert too_much.headers == {LIMIT: "1000", REMAINING: "700", RESET: "18s", "retry-after": "6"}
    assert too_much.message == (
        "token rate limit exceeded: 1000 tokens per 1m, 700 left, "
        "the request may use 800 (max_completion_tokens); retry after 6 s"
    )

    await finish(limiter, first, tokens(input=5000, output=100))  # 200 refunded
    assert await remaining(limiter) == 900

    second = await call(limiter, {"max_completion_tokens": 800, "max_tokens": 1})  # the first field wins
    assert second.headers == {LIMIT: "1000", REMAINING: "100"}
    await finish(limiter, second, tokens(output=850))  # 50 more charged
    assert await remaining(limiter) == 50

    # Without a completion budget in the request nothing is reserved: admitted while any is left.
    unbounded = await call(limiter, {"model": "m"})
    assert unbounded.headers == {LIMIT: "1000", REMAINING: "50"}
    await finish(limiter, unbounded, tokens(output=70))
    assert await remaining(limiter) == 0


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_refund_never_fills_the_bucket_past_full(backend, build, clock):
    limiter = build(backend, limit=1000, window="1m", count="output", reserve="max_tokens")
    slow = await call(limiter, {"max_output_tokens": 1000})
    assert slow.headers[REMAINING] == "0"

    clock.advance(120)  # the bucket is full again before the response ends
    await finish(limiter, slow, tokens(output=0))

    assert (await call(limiter, {"max_tokens": 1000})).headers[REMAINING] == "0"
    assert not (await call(limiter, {"max_tokens": 1})).admitted


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_reservation_larger_than_the_limit_is_refused_at_once_without_retry_after(backend, build):
    limiter = build(backend, limit=1000, window="1m", reserve="max_tokens")

    rejected = (await call(limiter, {"max_tokens": 1001})).rejection

    assert rejected.status == 429
    assert rejected.headers == {LIMIT: "1000"}
    assert json.loads(rejected.body)["error"] == {
        "type": "tokens",
        "code": "rate_limit_exceeded",
        "message": "the request may use 1001 tokens (max_tokens), more than the token rate limit of 1000 tokens per 1m; lower it",
    }
    assert (await call(limiter, {"max_tokens": 1000})).headers[REMAINING] == "0"


@pytest.mark.parametrize("max_tokens", [None, 0, -5, "300", True, 2.5])
async def test_a_missing_or_invalid_completion_budget_reserves_nothing(max_tokens, build):
    limiter = build(limit=1000, reserve="max_tokens")

    admitted = await call(limiter, {"max_tokens": max_tokens})

    assert admitted.headers[REMAINING] == "1000"
    assert await remaining(limiter) == 1000


# -- finish without usage -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_without_usage_the_reservation_stands_and_nothing_more_is_charged(backend, build):
    reserving = build(backend, id="reserving", limit=1000, count="output", reserve="max_tokens")
    plain = build(backend, id="plain", limit=1000)

    abandoned = await call(reserving, {"max_tokens": 300})
    await finish(reserving, abandoned, None)
    assert await remaining(reserving) == 700

    await finish(plain, await call(plain), None)
    assert await remaining(plain) == 1000


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_request_the_limiter_refused_is_never_charged(backend, build):
    limiter = build(backend, limit=600)
    await finish(limiter, await call(limiter), tokens(output=600))
    refused = await call(limiter)
    assert not refused.admitted

    await finish(limiter, refused, tokens(input=100, output=500))  # the engine finishes every exchange

    assert refused.rejection.headers[RESET] == (await call(limiter)).rejection.headers[RESET] == "1m0s"


# -- Redis ---------------------------------------------------------------------------------------


async def test_raw_key_values_and_model_names_never_reach_redis(build, chain, valkey_url):
    limiter = build("redis", limit=1000, window="1m", key="header:x-api-key", models={"gpt-4o": 100})
    for secret, model in (("sk-alice-secret", "gpt-4o"), ("sk-alice-secret", "other"), ("sk-bob-secret", "gpt-4o")):
        done = await call(limiter, {"model": model}, headers={"x-api-key": secret})
        await finish(limiter, done, tokens(output=10))

    client = Redis.from_url(valkey_url)
    try:
        keys = sorted([key.decode() async for key in client.scan_iter(match=f"test:{chain}:*")])
        values = sorted([await client.get(key) for key in keys])
        ttls = [await client.pttl(key) for key in keys]
    finally:
        await client.aclose()
    assert len(keys) == 3
    for key in keys:
        digest = key.removeprefix(f"test:{chain}:")
        assert len(digest) == 64 and set(digest) <= set("0123456789abcdef"), key
    # The value is the bucket's TAT in microseconds of the limiter's clock, now + 10 tokens' worth
    # (600 ms of the default limit's, 6 s of gpt-4o's 100 per minute), and the rate it was
    # counted at (window in microseconds, limit), so a changed limit can carry it over.
    assert values == [b"1000600000:60000000:1000", b"1006000000:60000000:100", b"1006000000:60000000:100"]
    # Redis expires a key in real time once its bucket is full again.
    assert all(0 < ttl <= 6_000 for ttl in ttls), ttls


def closed_port_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


async def test_backend_down_with_allow_admits_counts_and_warns_and_losing_the_charge_never_raises(
    build, chain, clock, caplog
):
    limiter = build("redis", redis_url=closed_port_url(), key="header:x-api-key", on_backend_error="allow")
    allowed, unsettled = backend_errors(chain, "allow"), backend_errors(chain, "unsettled")

    def warnings() -> list[str]:
        return [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]

    done = await call(limiter, {"model": "m"}, headers={"x-api-key": "sk-very-secret"})
    assert done.admitted
    assert done.headers == {}
    assert backend_errors(chain, "allow") == allowed + 1
    assert len(warnings()) == 1 and warnings()[0].endswith("allowed the request per on_backend_error")

    await finish(limiter, done, tokens(input=20, output=10))
    assert backend_errors(chain, "unsettled") == unsettled + 1
    assert len(warnings()) == 1  # within ten seconds of the last one

    clock.advance(10)
    await finish(limiter, done, tokens(input=20, output=10))
    assert warnings()[1].endswith("30 tokens were not charged (1 similar warnings suppressed)")
    assert "sk-very-secret" not in caplog.text


async def test_backend_down_with_deny_answers_429_and_counts(build, chain):
    limiter = build("redis", redis_url=closed_port_url(), on_backend_error="deny")
    before = backend_errors(chain, "deny")

    rejected = (await call(limiter)).rejection

    assert rejected.status == 429
    assert (rejected.code, rejected.type) == ("rate_limit_backend_unavailable", "tokens")
    assert rejected.headers == {"retry-after": "1"}
    assert backend_errors(chain, "deny") == before + 1


async def test_a_redis_that_never_answers_is_given_up_on_after_redis_timeout(build, chain):
    # The 100 ms are real: this is a network timeout.
    with silent_redis_url() as url:
        limiter = build("redis", redis_url=url, redis_timeout="100ms")
        allowed, unsettled = backend_errors(chain, "allow"), backend_errors(chain, "unsettled")

        async with asyncio.timeout(5):
            done = await call(limiter)
            await finish(limiter, done, tokens(output=10))

        assert done.admitted
        assert backend_errors(chain, "allow") == allowed + 1
        assert backend_errors(chain, "unsettled") == unsettled + 1


async def test_redis_timeout_bounds_every_check_and_charge_the_wait_for_a_connection_included(build, chain):
    # Three times more calls at once than the pool has connections, to a valkey that answers
    # nothing: most queue for a connection, and each must still end at redis_timeout.
    timeout = 0.25
    async with paused_valkey() as url:
        limiter = build("redis", redis_url=url, redis_timeout="250ms")
        allowed, unsettled = backend_errors(chain, "allow"), backend_errors(chain, "unsettled")
        callers = 3 * REDIS_MAX_CONNECTIONS
        checks: list[float] = []
        charges: list[float] = []
        for _ in range(3):
            started = [timed(call(limiter)) for _ in range(callers)]
            done = await asyncio.gather(*started)
            checks += [duration for duration, _ in done]
            charged = await asyncio.gather(*(timed(finish(limiter, admitted, tokens(output=10))) for _, admitted in done))
            charges += [duration for duration, _ in charged]

    assert max(checks) / timeout < 1.6, f"slowest {max(checks):.3f}s against a redis_timeout of {timeout}s"
    assert max(charges) / timeout < 1.6, f"slowest {max(charges):.3f}s against a redis_timeout of {timeout}s"
    assert backend_errors(chain, "allow") == allowed + len(checks)
    assert backend_errors(chain, "unsettled") == unsettled + len(charges)


async def timed(awaitable: Awaitable[T]) -> tuple[float, T]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await awaitable
    return loop.time() - started, result


# -- what it is, and config --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "needs"),
    [
        ({}, Needs(suspends=False, usage=True, finish=True, response_headers=True)),
        ({"models": {"gpt-4o": 10}}, Needs(request_body=True, suspends=False, usage=True, finish=True, response_headers=True)),
        ({"reserve": "max_tokens"}, Needs(request_body=True, suspends=False, usage=True, finish=True, response_headers=True)),
        ({"backend": "redis", "redis_url": "redis://valkey:6379/0"}, Needs(suspends=True, usage=True, finish=True, response_headers=True)),
    ],
)
async def test_an_instance_reads_bodies_only_for_models_or_reservations_and_suspends_only_on_redis(config, needs, chain):
    limiter = TokenLimiter(
        TokenLimiter.Config.model_validate({"limit": 1000, **config}), InstanceSettings(id="t", stage=Stage.PRE_REQUEST, chain=chain)
    )
    try:
        assert limiter.needs() == needs
    finally:
        await limiter.aclose()


async def test_it_registers_and_compiles_as_one_sequential_pre_request_entry():
    registry = PluginRegistry()
    registry.register(TokenLimiter)
    entry = {"name": "token_limiter", "config": {"limit": 1000, "models": {"gpt-4o": 100}, "reserve": "max_tokens"}}

    plan = compile_plan(validate_document([entry], registry), registry)
    await plan.aclose()

    for wrong, problem in [
        ({"parallel": True}, "token_limiter does not support parallel execution"),
        ({"stage": "post_request"}, "token_limiter cannot run in post_request"),
    ]:
        with pytest.raises(ConfigError, match=problem):
            validate_document([{**entry, **wrong}], registry)


def test_defaults():
    config = TokenLimiter.Config.model_validate({"limit": 1000})
    assert config.model_dump() == {
        "limit": 1000,
        "window": "1m",
        "count": "total",
        "key": "global",
        "models": {},
        "backend": "memory",
        "redis_url": None,
        "redis_timeout": "250ms",
        "on_backend_error": "allow",
        "key_prefix": "pluginchain:tokens",
        "reserve": "none",
    }


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"limit": 0}, "greater than 0"),
        ({"limit": True}, "must be a positive integer, got True"),
        ({"window": "soon"}, "not a duration: 'soon'"),
        ({"count": "both"}, "'total', 'input' or 'output'"),
        ({"key": "cookie:session"}, "not a token limit key: 'cookie:session'; expected 'global', 'client_address', 'consumer', 'session' or 'header:<name>'"),
        ({"key": "header:"}, "not a token limit key"),
        ({"models": {"gpt-4o": 0}}, "models.gpt-4o\n  Input should be greater than 0"),
        ({"models": {"gpt-4o": True}}, "models.gpt-4o\n  Value error, must be a positive integer"),
        ({"models": {"": 10}}, "at least 1 character"),
        ({"backend": "redis"}, "backend 'redis' needs redis_url"),
        ({"redis_url": "redis://valkey:6379"}, "redis_url is set but backend is 'memory'"),
        ({"backend": "redis", "redis_url": "valkey:6379"}, "not a Redis URL"),
        ({"on_backend_error": "retry"}, "'allow' or 'deny'"),
        ({"reserve": "everything"}, "reserve\n  Input should be 'none' or 'max_tokens'"),
        ({"reserve": "max_tokens", "count": "input"}, "reserve 'max_tokens' reserves completion tokens, which count 'input' does not charge"),
        ({"limits": 10}, "Extra inputs are not permitted"),
    ],
)
def test_config_errors_name_what_is_wrong(config, message):
    with pytest.raises(ValidationError, match=message):
        TokenLimiter.Config.model_validate({"limit": 1000, **config})


def test_limit_is_required():
    with pytest.raises(ValidationError, match="limit\n  Field required"):
        TokenLimiter.Config.model_validate({"window": "1m"})


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (0, "0s"),
        (1, "1ms"),
        (20_000, "20ms"),
        (999_001, "1s"),
        (1_000_000, "1s"),
        (1_500_000, "1.5s"),
        (59_901_000, "59.901s"),
        (360_000_000, "6m0s"),
        (72_000_000, "1m12s"),
        (3_600_000_000, "1h0m0s"),
        (3_661_250_000, "1h1m1.25s"),
    ],
)
def test_reset_durations_are_written_as_openai_writes_them(micros, text):
    assert openai_duration(micros) == text
