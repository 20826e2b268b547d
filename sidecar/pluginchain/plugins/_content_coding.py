"""The HTTP content codings the gateway can read, in one place.

Plugins inflate compressed bodies with :func:`inflate` (and compress a rewritten one again with
:func:`deflate`). The sidecar keeps responses readable: when a chain reads response bodies, it
narrows the request's ``Accept-Encoding`` to :data:`READABLE_CODINGS` with
:func:`readable_accept_encoding`, so a client that also accepts brotli or zstd still gets a
completion the chain could inspect, instead of one it must refuse unread.
"""

from __future__ import annotations

import gzip
import zlib

READABLE_CODINGS = frozenset({"gzip", "x-gzip", "deflate"})
"""Content codings :func:`inflate` reads; ``identity`` (no coding) is always readable."""

MAX_INFLATED_BYTES = 64 << 20
"""Largest body a compressed body may inflate to before it is refused (a zip bomb guard)."""


class UnreadableBody(ValueError):
    """A body in a coding the gateway cannot read, corrupt, or inflating past the limit."""


def inflate(body: bytes, coding: str) -> bytes:
    """``body`` decoded from ``coding`` (gzip, x-gzip or deflate; lower case)."""
    if coding not in READABLE_CODINGS:
        raise UnreadableBody(f"cannot inspect a body with content-encoding {coding!r}")
    try:
        return _inflate_members(body, zlib.MAX_WBITS | 32)  # zlib or gzip header, detected
    except zlib.error:
        if coding != "deflate":
            raise UnreadableBody(f"body is not valid {coding}") from None
    try:
        return _inflate_members(body, -zlib.MAX_WBITS)  # raw deflate, as some servers send it
    except zlib.error:
        raise UnreadableBody("body is not valid deflate") from None


def _inflate_members(body: bytes, wbits: int) -> bytes:
    # Every gzip member counts: a reader that stopped at the first would miss what follows.
    inflated, rest = bytearray(), body
    while rest:
        decompressor = zlib.decompressobj(wbits)
        inflated += decompressor.decompress(rest, MAX_INFLATED_BYTES + 1 - len(inflated))
        if len(inflated) > MAX_INFLATED_BYTES or decompressor.unconsumed_tail:
            raise UnreadableBody(f"body inflates to more than {MAX_INFLATED_BYTES} bytes")
        if not decompressor.eof:
            raise zlib.error("truncated stream")
        rest = decompressor.unused_data
    return bytes(inflated)


def deflate(body: bytes, coding: str) -> bytes:
    """``body`` encoded in ``coding`` again, after a plugin rewrote it."""
    if coding == "deflate":
        return zlib.compress(body)
    return gzip.compress(body, mtime=0)


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
