"""The codings the gateway reads: what it asks upstreams for, and what it inflates, how far and where."""

from __future__ import annotations

import asyncio
import gzip
import tracemalloc
import zlib

import pytest

from pluginchain._config.defaults import DEFAULTS
from pluginchain.plugins._content_coding import (
    INLINE_INFLATE_BYTES,
    MAX_INFLATED_BYTES,
    BodyInflatesTooLarge,
    UnreadableBody,
    deflate,
    deflate_off_loop,
    inflate,
    inflate_off_loop,
    readable_accept_encoding,
)

MiB = 1 << 20


def zip_bomb(inflated_bytes: int = 60 * MiB) -> bytes:
    """A gzip body of zeros: 60 MiB of them fit in about 61 KB."""
    compressor = zlib.compressobj(9, wbits=zlib.MAX_WBITS | 16)
    chunk = bytes(MiB)
    parts = [compressor.compress(chunk) for _ in range(inflated_bytes // MiB)]
    return b"".join(parts) + compressor.compress(bytes(inflated_bytes % MiB)) + compressor.flush()


@pytest.mark.parametrize(
    ("client", "upstream"),
    [
        ("gzip, deflate", None),  # already readable: untouched
        ("gzip;q=1.0, identity; q=0.5", None),
        ("gzip, deflate, br, zstd", "gzip, deflate"),
        ("br;q=1.0, GZIP;q=0.8, *;q=0.1", "GZIP;q=0.8"),
        ("br", "identity"),
        ("*", "identity"),  # any coding: brotli included
        (None, "identity"),  # no header means any coding too
        ("", "identity"),
    ],
)
def test_the_upstream_is_asked_only_for_codings_the_gateway_reads(client, upstream):
    assert readable_accept_encoding(client) == upstream


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate"])
def test_what_deflate_writes_inflate_reads(coding):
    text = b'{"choices": [{"message": {"content": "hello"}}]}' * 50
    assert inflate(deflate(text, coding), coding) == text


def test_every_gzip_member_and_raw_deflate_are_read():
    assert inflate(gzip.compress(b"first ") + gzip.compress(b"second"), "gzip") == b"first second"
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert inflate(raw.compress(b"raw") + raw.flush(), "deflate") == b"raw"


@pytest.mark.parametrize(
    ("body", "coding", "problem"),
    [
        (b"anything", "br", "cannot inspect a body with content-encoding 'br'"),
        (b"not gzip at all", "gzip", "not valid gzip"),
        (gzip.compress(b"cut short")[:-12], "gzip", "not valid gzip"),
        (gzip.compress(b"\0" * (MAX_INFLATED_BYTES + 1)), "gzip", f"gzip body inflates past {MAX_INFLATED_BYTES} bytes"),
    ],
)
def test_an_unreadable_body_says_why(body, coding, problem):
    with pytest.raises(UnreadableBody, match=problem):
        inflate(body, coding)


def test_a_body_may_inflate_to_exactly_the_limit_which_is_the_gateways_body_limit():
    assert MAX_INFLATED_BYTES == DEFAULTS.max_body_bytes
    assert inflate(gzip.compress(bytes(1000)), "gzip", limit=1000) == bytes(1000)
    with pytest.raises(BodyInflatesTooLarge, match="gzip body inflates past 999 bytes") as raised:
        inflate(gzip.compress(bytes(1000)), "gzip", limit=999)
    assert (raised.value.code, raised.value.limit) == ("body_too_large", 999)


@pytest.mark.parametrize("off_loop", [False, True])
async def test_a_zip_bomb_is_refused_once_it_passes_the_limit_never_inflated_whole(off_loop):
    bomb = zip_bomb()
    assert len(bomb) < 64_000  # 60 MiB in about 61 KB

    tracemalloc.start()
    try:
        with pytest.raises(BodyInflatesTooLarge):
            if off_loop:
                await inflate_off_loop(bomb, "gzip")
            else:
                inflate(bomb, "gzip")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # What was held at once: about the limit (the output so far and its last slice), not 60 MiB.
    assert peak < 3 * MAX_INFLATED_BYTES


async def test_what_follows_the_limit_is_never_read():
    # A valid member past the limit, then garbage: refused as too large, not as corrupt.
    with pytest.raises(BodyInflatesTooLarge):
        await inflate_off_loop(gzip.compress(bytes(2 * MiB)) + b"not gzip at all", "gzip", limit=MiB)


async def test_a_large_body_is_inflated_while_the_event_loop_keeps_serving():
    turns = 0

    async def other_requests() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    small = gzip.compress(b'{"messages": []}')
    large = zip_bomb(MAX_INFLATED_BYTES)
    others = asyncio.ensure_future(other_requests())
    try:
        await asyncio.sleep(0)
        before = turns
        assert await inflate_off_loop(small, "gzip") == b'{"messages": []}'
        assert turns == before  # a small body is inflated inline: no thread hop, no loop turn
        assert len(await inflate_off_loop(large, "gzip")) == MAX_INFLATED_BYTES
        assert turns > before  # the loop turned while a worker thread inflated the rest
    finally:
        others.cancel()
        await asyncio.gather(others, return_exceptions=True)


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
async def test_bodies_larger_than_a_slice_read_the_same_on_the_loop_and_off_it(coding):
    text = b"".join(b'{"index": %d, "content": "some prompt text"}\n' % n for n in range(3 * INLINE_INFLATE_BYTES // 40))
    compressed = await deflate_off_loop(text, coding)
    assert inflate(compressed, coding) == text
    assert await inflate_off_loop(compressed, coding) == text
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert await inflate_off_loop(raw.compress(text) + raw.flush(), "deflate") == text
