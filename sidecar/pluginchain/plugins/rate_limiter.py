"""The built-in ``rate_limiter``: admit at most ``limit`` requests per ``window`` for each key.

It uses GCRA (the generic cell rate algorithm, a leaky bucket kept as one timestamp per key)
instead of fixed windows. Requests are spaced by the emission interval ``T = window / limit`` and
a burst of up to ``limit`` is tolerated, so:

- at most ``limit`` requests are admitted at once, and after a burst one more per ``T``;
- over any span of time ``t`` at most ``limit + t / T`` are admitted; there is no window edge
  where a client can spend the limit twice in quick succession (a fixed window admits
  ``2 * limit`` around its edge);
- the state per key is one number, the theoretical arrival time (TAT) of the next request; the
  bucket is full again once the TAT is in the past, so idle keys can be forgotten.

Two backends keep that state. ``memory`` keeps it in this process (each replica has its own
limit); a decision is plain synchronous code, hence atomic on the event loop. ``redis`` keeps it
in Redis/Valkey and decides with one Lua script on the server clock, so all replicas share one
limit. When Redis cannot answer in time, ``on_backend_error`` decides, and the failure is logged
and counted.

A bucket outlives the plan that made it: a chain-file reload or a push that keeps the entry
(same chain, plugin id, ``key``, ``backend`` and ``key_prefix``) keeps every key's state, so
editing a chain never hands out a fresh limit. When ``limit`` or ``window`` changed, each bucket
keeps the requests it has used: ``TAT - now`` is rescaled from the old emission interval to the
new one, from the key's first request after the change on. Used requests are kept even beyond a
lowered ``limit`` (the key then waits until it is back under it), so no sequence of changes, a
limit lowered and raised again say, hands out a request that was not refilled. Each bucket
stores the interval it was counted at beside its TAT, in memory and in Redis alike, so a request
still on the old plan counts in the same bucket. Memory buckets of an entry that no
plan has any more are freed with its last instance.

Tests may give the limiter a clock of their own (``clock=``); the memory backend then counts on
it, and the Redis script takes "now" from it instead of the server clock.

The bucket key is a SHA-256 of (chain, plugin id, key value): API keys and addresses never reach
Redis or memory dumps in the clear.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable
from typing import Literal

from pydantic import Field, field_validator, model_validator
from redis.exceptions import RedisError

from pluginchain._api.durations import Duration, format_duration
from pluginchain._api.plugin import (
    InstanceSettings,
    Needs,
    Plugin,
    PluginConfig,
    PluginContext,
    PluginData,
    Reject,
    Stage,
)
from pluginchain._metrics import RATE_LIMITER_BACKEND_ERRORS
from pluginchain.plugins._limits import (
    LUA_KEEP_CARRIED,
    LUA_READ_TAT,
    LUA_TAT_FORMAT,
    BucketNames,
    MemoryBuckets,
    RedisScript,
    WarningSpacing,
    carried_over,
    check_backend_has_its_url,
    check_redis_url,
    key_header,
    key_value,
    lua_now,
    parse_key,
    shared_store,
)
from pluginchain.plugins._limits import REDIS_MAX_CONNECTIONS as REDIS_MAX_CONNECTIONS

_MICROS = 1_000_000
_BACKEND_ERROR_RETRY_AFTER = "1"


class RateLimiterConfig(PluginConfig):
    """Config of ``rate_limiter``. ``{}`` is valid: 100 requests per minute for everyone together."""

    limit: int = Field(100, gt=0)
    """Requests admitted per ``window`` per key, and the largest burst admitted at once. Default 100."""

    window: Duration = 60.0
    """The period ``limit`` applies to (e.g. ``"1m"``). Default 1 minute."""

    key: str = "global"
    """What a bucket is per: ``global`` (one bucket for the chain entry, the default),
    ``client_address`` (per client IP as Envoy saw it), or ``header:<name>`` (per value of a
    request header, e.g. ``header:x-api-key``; requests without it share one bucket)."""

    backend: Literal["memory", "redis"] = "memory"
    """Where the buckets live: ``memory`` (per replica, the default) or ``redis`` (shared by all
    replicas that use the same Redis)."""

    redis_url: str | None = None
    """``redis://``, ``rediss://`` or ``unix://`` URL; required with ``backend: redis`` and refused
    otherwise (a URL with the memory backend would silently give each replica its own limit)."""

    redis_timeout: Duration = 0.25
    """How long one decision may wait for Redis before ``on_backend_error`` applies: one deadline
    for all of it, the wait for a free connection when many decisions queue included. Default
    250ms, small against a request's latency budget."""

    on_backend_error: Literal["allow", "deny"] = "allow"
    """What happens to a request when Redis fails or times out: ``allow`` (default; an outage of
    the limiter does not become an outage of the gateway) or ``deny`` (answer 429)."""

    key_prefix: str = Field("pluginchain:ratelimit", min_length=1)
    """Prefix of the Redis keys, before ``:<sha256>``. Default ``pluginchain:ratelimit``."""

    @field_validator("limit", mode="before")
    @classmethod
    def _limit_is_a_number(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError(f"limit must be a positive integer, got {value!r}")
        return value

    @field_validator("key")
    @classmethod
    def _key_is_a_known_form(cls, value: str) -> str:
        return parse_key(value, "rate limit")

    @field_validator("redis_url")
    @classmethod
    def _redis_url_has_a_known_scheme(cls, value: str | None) -> str | None:
        return check_redis_url(value)

    @model_validator(mode="after")
    def _redis_url_matches_backend(self) -> RateLimiterConfig:
        check_backend_has_its_url(self.backend, self.redis_url)
        return self


class _Verdict:
    """One decision, in microseconds: whether it was admitted and how long until the bucket is full."""

    __slots__ = ("admitted", "until_full")

    def __init__(self, admitted: bool, until_full: int):
        self.admitted = admitted
        self.until_full = until_full


class _MemoryBuckets(MemoryBuckets[int]):
    """The buckets of one entry (chain, plugin id, key form, prefix, clock), each with the emission
    interval it was counted at."""

    __slots__ = ()

    def decide(self, bucket: str, interval: int, capacity: int, now: int) -> _Verdict:
        # No await in here: on one event loop this read-modify-write cannot interleave.
        tat, was = self._read(bucket, interval, now)
        carried = tat > now and was != interval
        if carried:
            tat = now + carried_over(tat - now, (was, 1), (interval, 1))
        tat = max(tat, now)
        next_tat = tat + interval
        if next_tat - now > capacity:
            if carried:  # From now on it refills at the new rate.
                self._tat[bucket] = (tat, interval)
            return _Verdict(False, tat - now)
        self._tat[bucket] = (next_tat, interval)
        return _Verdict(True, next_tat - now)


# Each entry's store (see shared_store). The clock is part of the key because TATs of one clock
# mean nothing to another; in production it is always None (time.monotonic).
_MEMORY_STORES: weakref.WeakValueDictionary[
    tuple[str, str, str, str, Callable[[], float] | None], _MemoryBuckets
] = weakref.WeakValueDictionary()

# KEYS[1]: the bucket, stored as "TAT:interval:1" (see _limits.LUA_READ_TAT). ARGV[1]: emission
# interval, ARGV[2]: capacity (limit * interval), both in microseconds; ARGV[3], optional: "now"
# in microseconds, from a clock given to the limiter (tests). Returns {admitted (1/0),
# microseconds until the bucket is full}. Without ARGV[3] the server clock makes every replica
# agree on "now". A bucket counted at another interval is carried over, as in memory. TAT
# values (~1.7e15) fit a Lua double exactly; formatting them with '%d' keeps every digit, which
# Lua 5.1's own number-to-string (14 digits) would not.
_GCRA_SCRIPT = (
    """
if redis.replicate_commands then redis.replicate_commands() end
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
"""
    + lua_now(3)
    + """
local rate_numerator = interval
local rate_denominator = 1
"""
    + LUA_READ_TAT
    + """
local next_tat = tat + interval
if next_tat - now > capacity then
  """
    + LUA_KEEP_CARRIED
    + """
  return {0, tat - now}
end
local until_full = next_tat - now
redis.call('SET', KEYS[1], """
    + LUA_TAT_FORMAT.format(tat="next_tat")
    + """, 'PX', math.ceil(until_full / 1000))
return {1, until_full}
"""
)


class RateLimiter(Plugin):
    """Reject requests over ``limit`` per ``window`` per key with 429 and ``Retry-After``."""

    name = "rate_limiter"
    Config = RateLimiterConfig
    stages = frozenset({Stage.PRE_REQUEST})
    supports_parallel = False
    reads_body = False

    config: RateLimiterConfig

    def __init__(
        self,
        config: RateLimiterConfig,
        settings: InstanceSettings,
        *,
        clock: Callable[[], float] | None = None,
    ):
        """``clock`` returns monotonic seconds as a float; it is for tests, which step it instead
        of sleeping. None: time.monotonic for memory; the Redis server's clock for redis. Either
        way it also spaces the backend-error warnings."""
        super().__init__(config, settings)
        self._clock = clock or time.monotonic
        # None: the Lua script reads the server clock, which all replicas share.
        self._redis_clock = clock
        self._interval = max(1, round(config.window * _MICROS / config.limit))
        self._capacity = self._interval * config.limit
        self._header = key_header(config.key)
        self._bucket_for = BucketNames(config.key_prefix, settings.chain, settings.id, config.key)
        self._global_bucket = self._bucket_for(None) if config.key == "global" else None
        self._reject_message = (
            f"rate limit exceeded: {config.limit} requests per {format_duration(config.window)}"
        )
        self._warnings = WarningSpacing(self._clock)
        self._memory: _MemoryBuckets | None = None
        self._redis: RedisScript | None = None
        if config.backend == "memory":
            store_key = (settings.chain, settings.id, config.key, config.key_prefix, clock)
            self._memory = shared_store(_MEMORY_STORES, store_key, _MemoryBuckets)
        else:
            assert config.redis_url is not None
            self._redis = RedisScript(config.redis_url, config.redis_timeout, _GCRA_SCRIPT)

    def needs(self) -> Needs:
        # In memory a decision never awaits, so the engine may run it inline.
        return Needs(suspends=self.config.backend == "redis")

    async def execute(self, ctx: PluginContext, data: PluginData) -> None:
        bucket = self._global_bucket or self._bucket_for(key_value(data, self.config.key, self._header))
        if self._memory is not None:
            verdict: _Verdict | None = self._memory.decide(
                bucket, self._interval, self._capacity, _micros(self._clock())
            )
        else:
            verdict = await self._decide_in_redis(ctx, bucket)
        if verdict is None:  # Redis failed and on_backend_error allowed the request.
            return
        limit = self.config.limit
        reset = str(_ceil_seconds(verdict.until_full))
        if not verdict.admitted:
            retry_after = max(1, _ceil_seconds(verdict.until_full + self._interval - self._capacity))
            raise Reject(
                429,
                f"{self._reject_message}; retry after {retry_after} s",
                code="rate_limit_exceeded",
                headers={
                    "retry-after": str(retry_after),
                    "x-ratelimit-limit": str(limit),
                    "x-ratelimit-remaining": "0",
                    "x-ratelimit-reset": reset,
                },
            )
        remaining = (self._capacity - verdict.until_full) // self._interval
        # With several limiters on one request, the client should see the one closest to rejecting.
        earlier = data.metadata.get("rate_limit")
        if earlier is None or earlier.get("remaining", math.inf) >= remaining:
            data.metadata["rate_limit"] = {"limit": limit, "remaining": remaining, "reset": int(reset)}

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    async def _decide_in_redis(self, ctx: PluginContext, bucket: str) -> _Verdict | None:
        """The verdict, or ``None`` when Redis failed and ``on_backend_error`` allows the request."""
        args = [self._interval, self._capacity]
        if self._redis_clock is not None:
            args.append(_micros(self._redis_clock()))
        assert self._redis is not None
        try:
            admitted, until_full = await self._redis([bucket], args)
            return _Verdict(bool(admitted), int(until_full))
        except (RedisError, OSError, TimeoutError) as error:
            deny = self.config.on_backend_error == "deny"
            # Bound here, not when built: a plan compiled only to be checked creates no series.
            RATE_LIMITER_BACKEND_ERRORS.labels(self.settings.chain, self.settings.id, "deny" if deny else "allow").inc()
            self._warn_backend_error(ctx, error, deny)
            if deny:
                raise Reject(
                    429,
                    "rate limit backend unavailable; request denied (on_backend_error: deny)",
                    code="rate_limit_backend_unavailable",
                    headers={"retry-after": _BACKEND_ERROR_RETRY_AFTER},
                ) from None
            return None

    def _warn_backend_error(self, ctx: PluginContext, error: Exception, deny: bool) -> None:
        suppressed = self._warnings.admit()
        if suppressed is None:
            return
        # The bucket and key value stay out of the line: they may be an API key.
        ctx.logger.warning(
            "rate limiter backend failed (%s: %s); %s the request per on_backend_error%s",
            type(error).__name__,
            str(error) or "timed out",
            "denied" if deny else "allowed",
            f" ({suppressed} similar warnings suppressed)" if suppressed else "",
        )


def _micros(seconds: float) -> int:
    # Rounded, not truncated: a clock stepped by 0.7 s reads 0.7 * 1e6 = 699999.99...
    return round(seconds * _MICROS)


def _ceil_seconds(micros: int) -> int:
    return max(0, -(-micros // _MICROS))
