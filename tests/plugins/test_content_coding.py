"""The codings the gateway reads: what it asks upstreams for, and what it inflates."""

from __future__ import annotations

import gzip
import zlib

import pytest

from pluginchain.plugins._content_coding import (
    MAX_INFLATED_BYTES,
    UnreadableBody,
    deflate,
    inflate,
    readable_accept_encoding,
)


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
        (gzip.compress(b"\0" * (MAX_INFLATED_BYTES + 1)), "gzip", "inflates to more than"),
    ],
)
def test_an_unreadable_body_says_why(body, coding, problem):
    with pytest.raises(UnreadableBody, match=problem):
        inflate(body, coding)
