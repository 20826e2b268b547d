"""The built-in ``token_limiter``: at most ``limit`` LLM tokens per ``window`` for each key.

One chain entry in ``pre_request`` does both halves: before the request it checks that the
key's budget is not spent (429 otherwise), and once the exchange is over (``finish``) it charges
the tokens the response reported (``Exchange.usage``): all of them (``count: total``, the
default), or only the prompt's (``input``) or the completion's (``output``).

The budget is GCRA (the generic cell rate algorithm) with a weight: one token is worth
``T = window / limit`` of time, a bucket is one number, its theoretical arrival time (TAT), and a
charge of ``n`` tokens moves it ``n * T`` further. The budget refills continuously at
``limit / window``, holds at most ``limit`` tokens (a full bucket), and there is no window edge
where a client can spend the limit twice in quick succession. What is left is
``(window - (TAT - now)) / T`` tokens; ``TAT <= now`` is a full bucket, which can be forgotten.

What a request will use is known only afterwards, so a request is admitted while the budget is
not spent (at least one token left) and may overshoot it: the tokens used are charged all the
same, the budget goes into debt, and requests are refused until it has refilled past the debt.
Concurrent requests are all admitted on what is left before any of them is charged. With
``reserve: max_tokens`` the overshoot is bounded instead: a request that names a completion
budget (``max_completion_tokens``, ``max_tokens``, or the Responses API's ``max_output_tokens``)
is admitted only when that much is left, it is charged up front (so concurrent requests cannot
spend it twice), and ``finish`` settles to what the response reported: the difference is
charged, or refunded when less was used (a refund never fills the bucket past full). A request
without such a field reserves nothing and is admitted like one without ``reserve``. With
``count: total`` the reservation covers the completion; the prompt's tokens are charged when the
response reports them. A reservation larger than ``limit`` could never be admitted and is
refused at once (429, without ``retry-after``), as OpenAI refuses a request too large for its
tokens-per-minute limit.

When no usage is reported (the client abandoned a stream, the upstream failed without usage, a
later plugin refused the request), ``finish`` charges nothing more: the reservation, if any,
stands, and without one the request was free.

``models`` gives models their own limits: the request body's ``model`` picks the limit and the
bucket (each listed model has its own bucket per key); requests for models not listed, without a
model or with a body that is not JSON share the bucket of ``limit``.

Clients see OpenAI's headers: ``x-ratelimit-limit-tokens`` and ``x-ratelimit-remaining-tokens``
on the responses of admitted requests (what was left before this request, or after its
reservation), and on a 429 those two, ``x-ratelimit-reset-tokens`` (the time until the bucket is
full, written as OpenAI does: ``6m0s``, ``1.5s``, ``20ms``) and ``retry-after`` (whole seconds
until the request could be admitted).

Two backends keep the buckets, as for ``rate_limiter``: ``memory`` (per replica; plain
synchronous code, hence atomic on the event loop) and ``redis`` (shared by all replicas: one
atomic Lua script per check or charge, on the server clock). When Redis cannot answer in time,
``on_backend_error`` decides the check; a charge that fails in ``finish`` is lost (a refund too).
Either failure is logged (one warning per ten seconds at most) and counted in
``pluginchain_rate_limiter_backend_errors_total`` with this plugin's id (``decision`` ``allow``
or ``deny`` for checks, ``unsettled`` for charges).

A bucket outlives the plan that made it: a chain-file reload or a push that keeps the entry
(same chain, plugin id, ``key``, ``backend`` and ``key_prefix``) keeps every key's budget. When a
limit (``limit``, a model's) or ``window`` changed, each bucket keeps the tokens it has used:
``TAT - now`` is rescaled from the old worth of a token to the new one (debt included). Each
bucket stores the rate it was counted at beside its TAT, in memory and in Redis alike, so a
charge from a request that started on the old plan is counted correctly too. Memory buckets of
an entry that no plan has any more are freed with its last instance.

Tests may give the limiter a clock of their own (``clock=``); the memory backend then counts on
it, and the Redis script takes "now" from it instead of the server clock.

Bucket keys are a SHA-256 of (chain, plugin id, key form, model, key value): API keys and
addresses never reach Redis or memory dumps in the clear.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator
from redis.exceptions import RedisError

from pluginchain._api.durations import Duration, format_duration
from pluginchain._api.plugin import (
    BodyNotJSON,
    InstanceSettings,
    Needs,
    Plugin,
    PluginConfig,
    PluginContext,
    PluginData,
    Reject,
    Stage,
    Usage,
)
from pluginchain._metrics import RATE_LIMITER_BACKEND_ERRORS
from pluginchain.plugins._limits import (
    LUA_KEEP_CARRIED,
    LUA_READ_TAT,
    LUA_TAT_FORMAT,
    BucketNames,
    MemoryBuckets,
    Rate,
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

_MICROS = 1_000_000
_MAX_DEBT = 2**48
"""The most microseconds a bucket may be behind (about 8.9 years): absurd usage figures cannot
push a TAT past what a Lua double holds exactly."""
_BACKEND_ERROR_RETRY_AFTER = "1"
_COMPLETION_BUDGET_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
"""Request fields that bound the completion, in the order they are read: chat completions (the
current name, then the deprecated one; completions), then the Responses API."""

LIMIT_HEADER = "x-ratelimit-limit-tokens"
REMAINING_HEADER = "x-ratelimit-remaining-tokens"
RESET_HEADER = "x-ratelimit-reset-tokens"


def _not_a_bool(value: object) -> object:
    # pydantic takes true as 1; a token count written as a boolean is a mistake.
    if isinstance(value, bool):
        raise ValueError(f"must be a positive integer, got {value!r}")
    return value


TokenCount = Annotated[int, BeforeValidator(_not_a_bool), Field(gt=0)]
"""A positive number of tokens."""


class TokenLimiterConfig(PluginConfig):
    """Config of ``token_limiter``; ``limit`` is required, e.g. ``{"limit": 100000, "window": "1m"}``."""

    limit: TokenCount
    """Tokens per ``window`` per key, and the most a full bucket holds. Required."""

    window: Duration = 60.0
    """The period ``limit`` applies to (e.g. ``"1m"``). Default 1 minute."""

    count: Literal["total", "input", "output"] = "total"
    """Which of the tokens the response reports are charged: ``total`` (default), ``input``
    (the prompt's) or ``output`` (the completion's)."""

    key: str = "global"
    """What a bucket is per: ``global`` (one bucket for the chain entry, the default),
    ``client_address`` (per client IP as Envoy saw it), or ``header:<name>`` (per value of a
    request header, e.g. ``header:x-api-key``; requests without it share one bucket)."""

    models: dict[Annotated[str, Field(min_length=1)], TokenCount] = Field(default_factory=dict)
    """Limits of their own per model, e.g. ``{"gpt-4o": 30000}``: requests whose JSON body
    names that ``model`` count against a bucket of the model's (per key) with that limit. Other
    requests share the bucket of ``limit``. Setting it makes the sidecar read request bodies."""

    backend: Literal["memory", "redis"] = "memory"
    """Where the buckets live: ``memory`` (per replica, the default) or ``redis`` (shared by all
    replicas that use the same Redis)."""

    redis_url: str | None = None
    """``redis://``, ``rediss://`` or ``unix://`` URL; required with ``backend: redis`` and refused
    otherwise (a URL with the memory backend would silently give each replica its own limit)."""

    redis_timeout: Duration = 0.25
    """How long one check or charge may wait for Redis: one deadline for all of it, the wait for
    a free connection when many decisions queue included. Default 250ms, small against a
    request's latency budget."""

    on_backend_error: Literal["allow", "deny"] = "allow"
    """What happens to a request when Redis fails or times out on its check: ``allow`` (default;
    an outage of the limiter does not become an outage of the gateway) or ``deny`` (answer 429)."""

    key_prefix: str = Field("pluginchain:tokens", min_length=1)
    """Prefix of the Redis keys, before ``:<sha256>``. Default ``pluginchain:tokens``."""

    reserve: Literal["none", "max_tokens"] = "none"
    """``none`` (default): admit while the budget is not spent, charge afterwards (a request may
    overshoot). ``max_tokens``: admit only when the request's completion budget
    (``max_completion_tokens``, ``max_tokens`` or ``max_output_tokens``) is left, charge it up
    front and settle to the usage afterwards. Reads request bodies."""

    @field_validator("key")
    @classmethod
    def _key_is_a_known_form(cls, value: str) -> str:
        return parse_key(value, "token limit")

    @field_validator("redis_url")
    @classmethod
    def _redis_url_has_a_known_scheme(cls, value: str | None) -> str | None:
        return check_redis_url(value)

    @model_validator(mode="after")
    def _settings_agree(self) -> TokenLimiterConfig:
        check_backend_has_its_url(self.backend, self.redis_url)
        if self.reserve == "max_tokens" and self.count == "input":
            raise ValueError(
                "reserve 'max_tokens' reserves completion tokens, which count 'input' does not charge; "
                "use count: total or output, or reserve: none"
            )
        return self


@dataclass(frozen=True, slots=True)
class _Verdict:
    """One check or charge, in microseconds: whether it was admitted, and how long until the
    bucket is full before and after it."""

    admitted: bool
    before: int
    after: int


@dataclass(frozen=True, slots=True)
class _Admission:
    """What ``execute`` leaves in the request's metadata for ``finish``: the bucket to charge,
    the model whose limit it has (None: ``limit``), and the tokens already charged for it."""

    bucket: str
    model: str | None
    reserved: int


class _Budget:
    """The rate of one limit (``limit`` or a model's): tokens and their worth in microseconds."""

    __slots__ = ("limit", "model", "window", "rate", "names", "global_bucket")

    def __init__(self, limit: int, model: str | None, window: int, names: BucketNames, global_key: bool):
        self.limit = limit
        self.model = model
        self.window = window
        """The window in microseconds: what a full bucket holds."""
        self.rate: Rate = (window, limit)
        """A token's worth in microseconds, stored beside each bucket's TAT."""
        self.names = names
        self.global_bucket = names(None) if global_key else None

    def cost(self, tokens: int) -> int:
        """``tokens`` in microseconds of refill, rounded half up (so a settle, the difference of
        two costs, lands exactly on the cost of what was used)."""
        cost = (2 * tokens * self.window + self.limit) // (2 * self.limit)
        return max(-_MAX_DEBT, min(_MAX_DEBT, cost))

    def remaining(self, until_full: int) -> int:
        """Whole tokens left when the bucket is ``until_full`` microseconds from full."""
        return max(0, (self.window - until_full) * self.limit // self.window)

    def threshold(self, tokens: int) -> int:
        """The most microseconds from full at which ``tokens`` are left (``remaining >= tokens``);
        negative when more than ``limit`` are asked for."""
        return self.window - -(-tokens * self.window // self.limit)


class _MemoryBuckets(MemoryBuckets[Rate]):
    """The buckets of one entry (chain, plugin id, key form, prefix, clock), each with the rate it
    was counted at."""

    __slots__ = ()

    def apply(self, bucket: str, rate: Rate, threshold: int | None, delta: int, now: int) -> _Verdict:
        """What the Redis script does (see there), on this process's dict."""
        # No await in here: on one event loop this read-modify-write cannot interleave.
        tat, was = self._read(bucket, rate, now)
        before = max(tat - now, 0)
        if before and was != rate:
            before = min(_MAX_DEBT, carried_over(before, was, rate))
            # Stored at once, whatever follows: from now on it refills at the new rate.
            self._tat[bucket] = (now + before, rate)
        if threshold is not None and before > threshold:
            return _Verdict(False, before, before)
        after = max(0, min(_MAX_DEBT, before + delta))
        if after > 0:
            self._tat[bucket] = (now + after, rate)
        else:
            self._tat.pop(bucket, None)
        return _Verdict(True, before, after)


# Each entry's store (see shared_store). The clock is part of the key because TATs of one clock
# mean nothing to another; in production it is always None (time.monotonic).
_MEMORY_STORES: weakref.WeakValueDictionary[
    tuple[str, str, str, str, Callable[[], float] | None], _MemoryBuckets
] = weakref.WeakValueDictionary()

# KEYS[1]: the bucket, stored as "TAT:window:limit" (see _limits.LUA_READ_TAT). ARGV[1]: the most
# microseconds from full at which the request is admitted, or "" to admit whatever the bucket holds
# (a charge after the response); ARGV[2]: microseconds to move the TAT on admission (a charge;
# negative: a refund, which stops at "now", a full bucket); ARGV[3]: the most microseconds the TAT
# may run ahead of "now"; ARGV[4] and ARGV[5]: the bucket's rate (window in microseconds, limit);
# ARGV[6], optional: "now" in microseconds, from a clock given to the limiter (tests). Without
# ARGV[6] the server clock makes every replica agree on "now". Returns {admitted (1/0),
# microseconds until full before, after}. A bucket counted at another rate is carried over, as in
# memory. TAT values (~1.7e15) fit a Lua double exactly; formatting them with '%d' keeps every
# digit, which Lua 5.1's own number-to-string (14 digits) would not.
_TOKEN_SCRIPT = (
    """
if redis.replicate_commands then redis.replicate_commands() end
"""
    + lua_now(6)
    + """
local rate_numerator = tonumber(ARGV[4])
local rate_denominator = tonumber(ARGV[5])
"""
    + LUA_READ_TAT
    + """
local max_debt = tonumber(ARGV[3])
if tat - now > max_debt then tat = now + max_debt end
local before = tat - now
local threshold = tonumber(ARGV[1])
if threshold and before > threshold then
  """
    + LUA_KEEP_CARRIED
    + """
  return {0, before, before}
end
local delta = tonumber(ARGV[2])
if delta == 0 then
  """
    + LUA_KEEP_CARRIED
    + """
  return {1, before, before}
end
local after = before + delta
if after < 0 then after = 0 end
if after > max_debt then after = max_debt end
if after > 0 then
  redis.call('SET', KEYS[1], """
    + LUA_TAT_FORMAT.format(tat="now + after")
    + """, 'PX', math.ceil(after / 1000))
else
  redis.call('DEL', KEYS[1])
end
return {1, before, after}
"""
)


class TokenLimiter(Plugin):
    """Reject requests once ``limit`` tokens per ``window`` per key are spent (429 with OpenAI's
    token headers); charge what each response used once it is over."""

    name = "token_limiter"
    Config = TokenLimiterConfig
    stages = frozenset({Stage.PRE_REQUEST})
    supports_parallel = False
    reads_body = True
    """The request body, for ``models`` and ``reserve: max_tokens``; not read otherwise."""

    config: TokenLimiterConfig

    def __init__(
        self,
        config: TokenLimiterConfig,
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
        self._header = key_header(config.key)
        window = max(1, _micros(config.window))
        global_key = config.key == "global"

        def budget(limit: int, model: str | None) -> _Budget:
            names = BucketNames(config.key_prefix, settings.chain, settings.id, config.key, model)
            return _Budget(limit, model, window, names, global_key)

        self._default = budget(config.limit, None)
        self._models = {model: budget(limit, model) for model, limit in config.models.items()}
        self._reads_body = bool(config.models) or config.reserve == "max_tokens"
        self._admission_key = f"token_limiter:{settings.id}"
        """Where execute leaves the request's _Admission for finish (in the request's metadata)."""
        self._warnings = WarningSpacing(self._clock)
        self._memory: _MemoryBuckets | None = None
        self._redis: RedisScript | None = None
        if config.backend == "memory":
            store_key = (settings.chain, settings.id, config.key, config.key_prefix, clock)
            self._memory = shared_store(_MEMORY_STORES, store_key, _MemoryBuckets)
        else:
            assert config.redis_url is not None
            self._redis = RedisScript(config.redis_url, config.redis_timeout, _TOKEN_SCRIPT)

    def needs(self) -> Needs:
        # In memory nothing awaits, so the engine may run the check inline.
        return Needs(
            request_body=self._reads_body,
            suspends=self.config.backend == "redis",
            usage=True,
            finish=True,
            response_headers=True,
        )

    async def execute(self, ctx: PluginContext, data: PluginData) -> None:
        document = _request_json(data) if self._reads_body else None
        budget = self._budget_for(document)
        bucket = budget.global_bucket or budget.names(key_value(data, self.config.key, self._header))
        reservation = self._reservation(document)
        if reservation > budget.limit:
            raise Reject(
                429,
                f"the request may use {reservation} tokens ({_reservation_field(document)}), more than the "
                f"token rate limit of {self._describe(budget)}; lower it",
                code="rate_limit_exceeded",
                type="tokens",
                headers={LIMIT_HEADER: str(budget.limit)},
            )
        # Admitted while at least one token is left, or the whole reservation.
        threshold = budget.threshold(max(1, reservation))
        verdict = await self._check(ctx, bucket, budget.rate, threshold, budget.cost(reservation))
        if verdict is None:  # The backend failed and on_backend_error allowed the request.
            data.metadata[self._admission_key] = _Admission(bucket, budget.model, 0)
            return
        remaining = budget.remaining(verdict.before)
        if not verdict.admitted:
            raise self._rejection(budget, verdict.before, threshold, remaining, reservation, document)
        data.metadata[self._admission_key] = _Admission(bucket, budget.model, reservation)
        remaining -= reservation
        # With several token limiters on one request, the client should see the one closest to rejecting.
        earlier = data.exchange.response_headers.get(REMAINING_HEADER, "")
        if not earlier.isdigit() or int(earlier) >= remaining:
            data.set_response_header(LIMIT_HEADER, str(budget.limit))
            data.set_response_header(REMAINING_HEADER, str(remaining))

    async def finish(self, ctx: PluginContext, data: PluginData) -> None:
        admission = data.metadata.get(self._admission_key)
        usage = data.exchange.usage
        if not isinstance(admission, _Admission) or usage is None:
            return  # Never admitted here (nothing to charge), or no usage: the reservation stands.
        used = self._counted(usage)
        if used == admission.reserved:
            return
        budget = self._default if admission.model is None else self._models.get(admission.model, self._default)
        delta = budget.cost(used) - budget.cost(admission.reserved)
        try:
            await self._apply(admission.bucket, budget.rate, None, delta)
        except (RedisError, OSError, TimeoutError) as error:
            RATE_LIMITER_BACKEND_ERRORS.labels(self.settings.chain, self.settings.id, "unsettled").inc()
            extra = used - admission.reserved
            lost = f"{extra} tokens were not charged" if extra > 0 else f"a refund of {-extra} tokens was lost"
            self._warn_backend_error(ctx, error, lost)

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    def _budget_for(self, document: Any) -> _Budget:
        if self._models and isinstance(document, dict):
            model = document.get("model")
            if isinstance(model, str):
                return self._models.get(model, self._default)
        return self._default

    def _reservation(self, document: Any) -> int:
        if self.config.reserve != "max_tokens" or not isinstance(document, dict):
            return 0
        for field in _COMPLETION_BUDGET_FIELDS:
            if field in document:
                value = document[field]
                # An invalid one gets the upstream's 400, which uses no tokens.
                return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
        return 0

    def _counted(self, usage: Usage) -> int:
        if self.config.count == "input":
            return max(0, usage.input_tokens)
        if self.config.count == "output":
            return max(0, usage.output_tokens)
        return max(0, usage.total_tokens)

    def _describe(self, budget: _Budget) -> str:
        rate = f"{budget.limit} tokens per {format_duration(self.config.window)}"
        return f"{rate} for model {budget.model}" if budget.model is not None else rate

    def _rejection(
        self, budget: _Budget, until_full: int, threshold: int, remaining: int, reservation: int, document: Any
    ) -> Reject:
        retry_after = max(1, _ceil_seconds(until_full - threshold))
        if reservation:
            why = f"{remaining} left, the request may use {reservation} ({_reservation_field(document)})"
            message = f"token rate limit exceeded: {self._describe(budget)}, {why}; retry after {retry_after} s"
        else:
            message = f"token rate limit exceeded: {self._describe(budget)}; retry after {retry_after} s"
        return Reject(
            429,
            message,
            code="rate_limit_exceeded",
            type="tokens",
            headers={
                LIMIT_HEADER: str(budget.limit),
                REMAINING_HEADER: str(remaining),
                RESET_HEADER: openai_duration(until_full),
                "retry-after": str(retry_after),
            },
        )

    async def _check(self, ctx: PluginContext, bucket: str, rate: Rate, threshold: int, cost: int) -> _Verdict | None:
        """The verdict, or ``None`` when the backend failed and ``on_backend_error`` allows the request."""
        if self._memory is not None:
            return self._memory.apply(bucket, rate, threshold, cost, _micros(self._clock()))
        try:
            return await self._apply(bucket, rate, threshold, cost)
        except (RedisError, OSError, TimeoutError) as error:
            deny = self.config.on_backend_error == "deny"
            # Bound here, not when built: a plan compiled only to be checked creates no series.
            RATE_LIMITER_BACKEND_ERRORS.labels(self.settings.chain, self.settings.id, "deny" if deny else "allow").inc()
            self._warn_backend_error(ctx, error, f"{'denied' if deny else 'allowed'} the request per on_backend_error")
            if deny:
                raise Reject(
                    429,
                    "token rate limit backend unavailable; request denied (on_backend_error: deny)",
                    code="rate_limit_backend_unavailable",
                    type="tokens",
                    headers={"retry-after": _BACKEND_ERROR_RETRY_AFTER},
                ) from None
            return None

    async def _apply(self, bucket: str, rate: Rate, threshold: int | None, delta: int) -> _Verdict:
        """Check (unless ``threshold`` is None) and move ``bucket``, counted at ``rate``, by
        ``delta`` microseconds; raises what the Redis backend raises."""
        if self._memory is not None:
            return self._memory.apply(bucket, rate, threshold, delta, _micros(self._clock()))
        args: list[int | str] = ["" if threshold is None else threshold, delta, _MAX_DEBT, *rate]
        if self._redis_clock is not None:
            args.append(_micros(self._redis_clock()))
        assert self._redis is not None
        admitted, before, after = await self._redis([bucket], args)
        return _Verdict(bool(admitted), int(before), int(after))

    def _warn_backend_error(self, ctx: PluginContext, error: Exception, outcome: str) -> None:
        suppressed = self._warnings.admit()
        if suppressed is None:
            return
        # The bucket and key value stay out of the line: they may be an API key.
        ctx.logger.warning(
            "token limiter backend failed (%s: %s); %s%s",
            type(error).__name__,
            str(error) or "timed out",
            outcome,
            f" ({suppressed} similar warnings suppressed)" if suppressed else "",
        )


def _reservation_field(document: Any) -> str:
    """The request field a reservation was read from, for messages."""
    fields = document if isinstance(document, dict) else {}
    return next((field for field in _COMPLETION_BUDGET_FIELDS if field in fields), "max_tokens")


def openai_duration(micros: int) -> str:
    """A duration as OpenAI's ``x-ratelimit-reset-*`` headers write it (Go's notation: ``6m0s``,
    ``1h0m0s``, ``1.5s``, ``20ms``, ``0s``), rounded up to the millisecond so a client never
    comes back early."""
    millis = max(0, -(-micros // 1000))
    if millis < 1000:
        return f"{millis}ms" if millis else "0s"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, fraction = divmod(rest, 1000)
    text = f"{seconds}.{fraction:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


def _request_json(data: PluginData) -> Any:
    # A body that is not JSON (or nests too deeply to read) names no model and no completion budget.
    try:
        return data.json()
    except BodyNotJSON:
        return None


def _micros(seconds: float) -> int:
    # Rounded, not truncated: a clock stepped by 0.7 s reads 0.7 * 1e6 = 699999.99...
    return round(seconds * _MICROS)


def _ceil_seconds(micros: int) -> int:
    return max(0, -(-micros // _MICROS))
