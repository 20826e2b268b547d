"""What the limiters (``rate_limiter``, ``token_limiter``) share: the ``key`` forms and the bucket
names hashed from them, how a bucket is carried over to a changed rate, the Redis script calls
held to one deadline, and the spacing of backend-error warnings."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from pluginchain._api.plugin import PluginData

REDIS_MAX_CONNECTIONS = 32
"""Connections one ``redis`` limiter opens at most; decisions beyond that many at once queue for
a connection, within the decision's ``redis_timeout``. A decision is one short script call, so a
few connections carry thousands of decisions per second."""

WARNING_INTERVAL = 10.0
"""Seconds between two backend-error warnings of one instance, so an outage is not a log flood."""

KEY_FORMS = "'global', 'client_address', 'consumer', 'session' or 'header:<name>' (e.g. 'header:x-api-key')"
_HEADER_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


def parse_key(value: str, what: str) -> str:
    """``value`` as a ``key`` form, header names lower-cased; raise ValueError naming the forms.
    ``what`` names the setting in the message (``"rate limit"``: "not a rate limit key")."""
    if value in ("global", "client_address", "consumer", "session"):
        return value
    kind, _, header = value.partition(":")
    header = header.strip().lower()
    if kind == "header" and header and set(header) <= _HEADER_TOKEN:
        return f"header:{header}"
    raise ValueError(f"not a {what} key: {value!r}; expected {KEY_FORMS}")


def key_header(key: str) -> str | None:
    """The header a parsed ``header:<name>`` key reads; None for the other forms."""
    return key.removeprefix("header:") if key.startswith("header:") else None


def key_value(data: PluginData, key: str, header: str | None) -> str | None:
    """What the request is keyed by, for a parsed ``key`` (``header``: its ``key_header``): the
    consumer or session an earlier plugin established (None, one shared bucket, without one),
    the header's value, else the client address (``global`` keys have a fixed bucket)."""
    if key == "consumer":
        return data.consumer
    if key == "session":
        return data.session
    if header is not None:
        return data.headers.get(header)
    return data.client_address


class BucketNames:
    """Names ``<prefix>:<sha256>`` of the buckets of one identity (chain, plugin id, key form...):
    the SHA-256 of the identity and the key value, so that API keys and addresses never reach
    Redis or memory dumps in the clear."""

    __slots__ = ("_prefix", "_identity_hash")

    def __init__(self, prefix: str, *identity: object):
        self._prefix = prefix
        # JSON-encoded, then a newline, so the identity cannot run into the value.
        self._identity_hash = hashlib.sha256(json.dumps(list(identity)).encode() + b"\n")

    def __call__(self, value: str | None) -> str:
        digest = self._identity_hash.copy()
        digest.update(json.dumps(value).encode())
        return f"{self._prefix}:{digest.hexdigest()}"


Rate = tuple[int, int]
"""What one unit (a request, a token) is worth in a bucket, as microseconds ``numerator /
denominator``: ``(T, 1)`` for a rate limiter's emission interval ``T``, ``(window, limit)`` for
a token limiter. Stored beside each bucket's TAT, so that a bucket written at one rate is read
correctly at another."""


def carried_over(used: int, was: Rate, rate: Rate) -> int:
    """``used`` microseconds of a bucket (``TAT - now``) counted at rate ``was``, counted at
    ``rate``: the same number of units used, rounded half up. This is how a limiter whose
    ``limit`` or ``window`` changed keeps what a key has used (:data:`LUA_READ_TAT` does the same in
    Redis)."""
    numerator = used * rate[0] * was[1]
    denominator = was[0] * rate[1]
    return (2 * numerator + denominator) // (2 * denominator)


RateT = TypeVar("RateT")


class MemoryBuckets(Generic[RateT]):
    """A memory-backed limiter entry's buckets: per bucket key, its TAT in microseconds of the
    entry's clock and the rate it was counted at (so an instance at another rate carries it over).
    Subclasses add the decision; this keeps the dict small by sweeping full buckets."""

    _SWEEP_EVERY = 1024

    __slots__ = ("_tat", "_decisions_since_sweep", "__weakref__")

    def __init__(self) -> None:
        self._tat: dict[str, tuple[int, RateT]] = {}
        self._decisions_since_sweep = 0

    def _read(self, bucket: str, rate: RateT, now: int) -> tuple[int, RateT]:
        """The bucket's TAT and rate (``now`` and ``rate`` for a full one), sweeping at times."""
        self._decisions_since_sweep += 1
        # Sweeping costs one pass over the dict; spacing sweeps by its size keeps that O(1) per
        # decision while holding at most about twice the live buckets.
        if self._decisions_since_sweep >= max(self._SWEEP_EVERY, len(self._tat)):
            self._decisions_since_sweep = 0
            self._tat = {key: state for key, state in self._tat.items() if state[0] > now}
        return self._tat.get(bucket, (now, rate))


StoreT = TypeVar("StoreT", bound=MemoryBuckets[Any])
KeyT = TypeVar("KeyT", bound=Hashable)


def shared_store(stores: weakref.WeakValueDictionary[KeyT, StoreT], key: KeyT, new: Callable[[], StoreT]) -> StoreT:
    """The store of one limiter entry, shared by every instance of it: the old plan's and the new
    one's across a reload or push, whatever their rates. ``stores`` holds them weakly, so the
    buckets of an entry no plan has any more go with its last instance."""
    store = stores.get(key)
    if store is None:
        store = stores[key] = new()
    return store


def lua_now(argument: int) -> str:
    """Lua setting ``now`` (microseconds) from ``ARGV[argument]`` (a clock given to the limiter,
    in tests), else from the server clock, which every replica shares."""
    return f"""
local now = tonumber(ARGV[{argument}])
if not now then
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
end
"""


LUA_READ_TAT = """
local tat = now
local carried = false
local stored = redis.call('GET', KEYS[1])
if stored then
  local t, n, d = string.match(stored, '^(%-?%d+):(%d+):(%d+)$')
  if t then
    tat = tonumber(t)
    n = tonumber(n)
    d = tonumber(d)
    if tat > now and (n ~= rate_numerator or d ~= rate_denominator) then
      tat = now + math.floor((tat - now) * (rate_numerator * d) / (n * rate_denominator) + 0.5)
      carried = true
    end
  else
    tat = tonumber(stored) or now
  end
end
if tat < now then tat = now end
"""
"""The Lua twin of reading a bucket with :func:`carried_over`: expects ``now``,
``rate_numerator`` and ``rate_denominator`` (the limiter's :data:`Rate`) to be set, and sets
``tat`` (never before ``now``) and ``carried`` (whether it was rescaled from another rate). A
bucket is stored as ``"TAT:numerator:denominator"``, written with :data:`LUA_TAT_FORMAT`; a bare
number (written before rates were stored) is taken as counted at the current rate."""

LUA_TAT_FORMAT = "string.format('%d:%d:%d', {tat}, rate_numerator, rate_denominator)"
"""The Lua expression of a bucket's stored value; ``{tat}`` is the expression of its TAT."""

LUA_KEEP_CARRIED = (
    "if carried and tat > now then redis.call('SET', KEYS[1], "
    + LUA_TAT_FORMAT.format(tat="tat")
    + ", 'PX', math.ceil((tat - now) / 1000)) end"
)
"""Stores a bucket that was carried over to this rate on a path that does not write it (a
refusal): from the first request after a change on, the bucket refills at the new rate."""


def check_redis_url(value: str | None) -> str | None:
    """A ``redis_url`` validator: ``value`` unless it is not a Redis URL."""
    if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"not a Redis URL: {value!r}; expected redis://, rediss:// or unix://")
    return value


def check_backend_has_its_url(backend: str, redis_url: str | None) -> None:
    """``backend: redis`` needs ``redis_url``; the memory backend refuses one (a URL with it would
    silently give each replica its own limit)."""
    if backend == "redis" and redis_url is None:
        raise ValueError("backend 'redis' needs redis_url, e.g. 'redis://valkey:6379/0'")
    if backend == "memory" and redis_url is not None:
        raise ValueError("redis_url is set but backend is 'memory'; set backend: redis to use it")


def redis_client(url: str, timeout: float) -> Redis:
    """A client on a bounded pool of :data:`REDIS_MAX_CONNECTIONS` that makes a burst wait for a
    connection: redis-py's default pool refuses the connection past its maximum at once, and
    ``on_backend_error: allow`` would then admit the whole burst. Its own waits (for a connection,
    on a socket) are bounded by ``timeout`` too, so that a call given up on by :class:`RedisScript`
    ends soon, and nothing is retried: ``on_backend_error`` covers failure."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=REDIS_MAX_CONNECTIONS,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
    return Redis.from_pool(pool)


class RedisScript:
    """One Lua script of a limiter on its own Redis client, each call held to one deadline of
    ``timeout`` seconds from the moment it is made: the wait for a free connection, connecting,
    sending and the answer together. Past it the call raises TimeoutError at once.

    redis-py bounds each of those waits by the timeout separately, so that a decision queued
    behind :data:`REDIS_MAX_CONNECTIONS` others could take about twice ``redis_timeout``; and a
    deadline cancelled into redis-py's own clean-up (closing a socket, handing a connection back)
    waits for that too. So the call runs as a task of its own that the caller stops waiting for
    at the deadline; it is cancelled then, and its clean-up finishes in the background (at most
    about ``timeout`` later, by the pool's own bounds), awaited by :meth:`aclose`."""

    __slots__ = ("_redis", "_script", "_timeout", "_abandoned")

    def __init__(self, url: str, timeout: float, script: str):
        self._redis = redis_client(url, timeout)
        self._script = self._redis.register_script(script)
        self._timeout = timeout
        self._abandoned: set[asyncio.Future[Any]] = set()

    async def __call__(self, keys: Sequence[str], args: Sequence[int | str]) -> Any:
        """The script's answer; raises RedisError, OSError or TimeoutError when there is none in time."""
        call = asyncio.ensure_future(self._script(keys=list(keys), args=list(args)))
        deadline = asyncio.timeout(self._timeout)
        try:
            async with deadline:
                return await asyncio.shield(call)
        except TimeoutError:
            if deadline.expired():
                raise TimeoutError(f"no answer within {self._timeout:g}s") from None
            raise
        finally:
            if not call.done():  # the deadline passed, or the request was cancelled
                call.cancel()
                self._abandoned.add(call)
                call.add_done_callback(self._forget)

    def _forget(self, call: asyncio.Future[Any]) -> None:
        self._abandoned.discard(call)
        if not call.cancelled():
            call.exception()  # retrieved, so asyncio does not log it: the caller reported the timeout

    async def aclose(self) -> None:
        if self._abandoned:
            await asyncio.gather(*self._abandoned, return_exceptions=True)
        await self._redis.aclose()


class WarningSpacing:
    """Lets one warning through per :data:`WARNING_INTERVAL` seconds of ``clock`` and counts the
    ones it holds back, for the next to say how many there were."""

    __slots__ = ("_clock", "_last_at", "_suppressed")

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._last_at = -math.inf
        self._suppressed = 0

    def admit(self) -> int | None:
        """None: stay silent (counted). Otherwise log now; the number of warnings held back since
        the last one is returned (0 for none)."""
        now = self._clock()
        if now - self._last_at < WARNING_INTERVAL:
            self._suppressed += 1
            return None
        suppressed, self._suppressed = self._suppressed, 0
        self._last_at = now
        return suppressed
