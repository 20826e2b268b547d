"""The HTTP content codings the gateway can read, in one place, and how much work reading them may be.

Plugins inflate compressed bodies with :func:`inflate_off_loop` (and compress a rewritten one
again with :func:`deflate_off_loop`); :func:`inflate` is the same, synchronous. The sidecar keeps
responses readable: when a chain reads response bodies, it narrows the request's
``Accept-Encoding`` to :data:`READABLE_CODINGS` with :func:`readable_accept_encoding`, so a client
that also accepts brotli or zstd still gets a completion the chain could inspect, instead of one
it must refuse unread.

A compressed body is a promise of more bytes than it carries: 61 KB of gzip can inflate to
60 MiB. So inflation stops as soon as the output passes a limit (by default the gateway's body
limit, :data:`DEFAULT_MAX_INFLATED_BYTES`: a compressed body may not carry more than a plain one
could) and raises :class:`BodyInflatesTooLarge`, without inflating the rest. And it must not hold
up other requests: the first :data:`INLINE_INFLATE_BYTES` are inflated on the event loop (most
bodies end there, at no thread hop), anything longer in a small pool of worker threads, where
zlib runs without the GIL.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

from pluginchain._config.defaults import DEFAULTS

READABLE_CODINGS = frozenset({"gzip", "x-gzip", "deflate"})
"""Content codings :func:`inflate` reads; ``identity`` (no coding) is always readable."""

DEFAULT_MAX_INFLATED_BYTES = DEFAULTS.max_body_bytes
"""Largest body a compressed body may inflate to unless a plugin's config says otherwise: the
sidecar's default body limit (4 MiB), so that compression cannot carry a body the gateway would
refuse plain."""

MAX_INFLATED_BYTES = DEFAULT_MAX_INFLATED_BYTES
"""The limit :func:`inflate` applies when it is given none (the sidecar's usage reading)."""

INLINE_INFLATE_BYTES = 64 << 10
"""Output inflated on the event loop before the rest of a body moves to a worker thread (and the
slice a worker inflates between two looks at the GIL): a fraction of a millisecond of zlib, about
what a thread hop costs, and enough for most LLM requests."""

INFLATE_WORKERS = max(1, min(4, (os.cpu_count() or 2) // 2))
"""Threads that inflate and compress large bodies: half the cores, at most 4. Few: each job ends
at the body limit, and a burst of zip bombs should queue behind itself, not take every core from
the event loop."""


class UnreadableBody(ValueError):
    """A body in a coding the gateway cannot read, corrupt, or inflating past the limit."""

    code: ClassVar[str] = "uninspectable_body"
    """The error code of a refusal for this reason."""


class BodyInflatesTooLarge(UnreadableBody):
    """A compressed body that inflates past the limit; refused with 413, like a plain body over it."""

    code: ClassVar[str] = "body_too_large"

    def __init__(self, coding: str, limit: int):
        super().__init__(f"{coding} body inflates past {limit} bytes")
        self.limit = limit


def inflate(body: bytes, coding: str, limit: int = MAX_INFLATED_BYTES) -> bytes:
    """``body`` decoded from ``coding`` (gzip, x-gzip or deflate; lower case), on this thread.
    Raises :class:`BodyInflatesTooLarge` once more than ``limit`` bytes came out, and
    :class:`UnreadableBody` for a coding it cannot read or a corrupt body."""
    inflation = _Inflation(body, coding, limit)
    inflation.advance(None)
    return inflation.result()


async def inflate_off_loop(body: bytes, coding: str, limit: int = MAX_INFLATED_BYTES) -> bytes:
    """:func:`inflate`, with all but the first :data:`INLINE_INFLATE_BYTES` of output inflated in
    a worker thread, so that a large body (or a zip bomb, up to ``limit``) never stalls the event
    loop. A cancelled caller leaves the thread to finish its bounded work alone."""
    inflation = _Inflation(body, coding, limit)
    if not inflation.advance(INLINE_INFLATE_BYTES):
        await asyncio.get_running_loop().run_in_executor(_workers(), inflation.finish_in_slices)
    return inflation.result()


def deflate(body: bytes, coding: str) -> bytes:
    """``body`` encoded in ``coding`` again, after a plugin rewrote it."""
    if coding == "deflate":
        return zlib.compress(body)
    # zlib's default level: level 9 (gzip's default) costs several times the time for a few percent.
    return gzip.compress(body, compresslevel=6, mtime=0)


async def deflate_off_loop(body: bytes, coding: str) -> bytes:
    """:func:`deflate`, in a worker thread when ``body`` is longer than :data:`INLINE_INFLATE_BYTES`."""
    if len(body) <= INLINE_INFLATE_BYTES:
        return deflate(body, coding)
    return await asyncio.get_running_loop().run_in_executor(_workers(), deflate, body, coding)


class _Inflation:
    """One body being inflated, in steps of bounded output, member after member (every gzip
    member counts: a reader that stopped at the first would miss what follows)."""

    __slots__ = ("_body", "_coding", "_limit", "_raw", "_output", "_rest", "_member", "_pending")

    def __init__(self, body: bytes, coding: str, limit: int):
        if coding not in READABLE_CODINGS:
            raise UnreadableBody(f"cannot inspect a body with content-encoding {coding!r}")
        self._body = body
        self._coding = coding
        self._limit = limit
        self._raw = False
        """Whether this is the second reading of a ``deflate`` body, as raw deflate (some servers
        send it so) after it was no zlib stream."""
        self._start()

    def _start(self) -> None:
        self._output = bytearray()
        self._rest = self._body  # the members not started yet
        self._member: zlib._Decompress | None = None
        self._pending = b""  # input of the current member not yet consumed

    def advance(self, budget: int | None) -> bool:
        """Inflate up to ``budget`` more bytes (None: all of it); True once the body is done."""
        try:
            return self._advance(budget)
        except zlib.error:
            if self._coding != "deflate" or self._raw:
                raise UnreadableBody(f"body is not valid {self._coding}") from None
        self._raw = True
        self._start()
        try:
            return self._advance(budget)
        except zlib.error:
            raise UnreadableBody("body is not valid deflate") from None

    def finish_in_slices(self) -> None:
        """Inflate the rest, a slice of :data:`INLINE_INFLATE_BYTES` at a time (in a worker
        thread): zlib lets go of the GIL while it inflates, but copying its output holds it, and
        short copies let the event loop's thread in between."""
        while not self.advance(INLINE_INFLATE_BYTES):
            pass

    def result(self) -> bytes:
        return bytes(self._output)

    def _advance(self, budget: int | None) -> bool:
        output, limit = self._output, self._limit
        # One byte past the limit is enough to know a body is too large.
        target = limit + 1 if budget is None else min(limit + 1, len(output) + budget)
        while True:
            if self._member is None:
                if not self._rest:
                    return True
                self._member = zlib.decompressobj(-zlib.MAX_WBITS if self._raw else zlib.MAX_WBITS | 32)
                self._pending, self._rest = self._rest, b""
            room = target - len(output)
            if room <= 0:
                return False
            chunk = self._member.decompress(self._pending, room)
            output += chunk
            if len(output) > limit:
                raise BodyInflatesTooLarge(self._coding, limit)
            self._pending = self._member.unconsumed_tail
            if self._member.eof:
                self._rest, self._member = self._member.unused_data, None
            elif not self._pending and len(chunk) < room:
                raise zlib.error("truncated stream")


_workers_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def _workers() -> ThreadPoolExecutor:
    global _executor
    with _workers_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=INFLATE_WORKERS, thread_name_prefix="pluginchain-inflate")
        return _executor


def readable_accept_encoding(value: str | None) -> str | None:
    """The ``Accept-Encoding`` to send upstream so that the response arrives in a coding the
    gateway reads: the client's own list without the codings it cannot read (``*`` included),
    ``identity`` when nothing is left or the header is absent (absent means any coding), or None
    when the client's header needs no change."""
    if value is None:
        return "identity"
    kept, dropped = [], False
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        coding = item.partition(";")[0].strip().lower()
        if coding in READABLE_CODINGS or coding == "identity":
            kept.append(item)
        else:
            dropped = True
    if not kept:
        return "identity"
    return ", ".join(kept) if dropped else None
