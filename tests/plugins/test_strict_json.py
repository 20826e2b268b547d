"""parse_json reads a body one way only: what another parser could read differently is refused,
with an exception a plugin can tell apart from "not JSON at all"."""

from __future__ import annotations

import json

import pytest

from pluginchain import BodyDuplicateKeys, BodyNotJSON, BodyNotUTF8, BodyTooDeep, BodyUninspectable, parse_json


@pytest.mark.parametrize(
    ("raw", "kind", "code"),
    [
        (b'{"a": 1, "a": 2}', BodyDuplicateKeys, "duplicate_json_keys"),
        (b'[{"x": {"deep": [{"k": 1, "k": 1}]}}]', BodyDuplicateKeys, "duplicate_json_keys"),
        (b'{"a": "caf\xe9"}', BodyNotUTF8, "invalid_utf8"),  # Latin-1, not UTF-8
        (json.dumps({"a": "b"}).encode("utf-16"), BodyNotUTF8, "invalid_utf8"),  # never guessed
        ('{"a": "\\udfff"}', BodyNotUTF8, "invalid_utf8"),
        ("[" * 200 + "]" * 200, BodyTooDeep, "uninspectable_body"),
    ],
    ids=["duplicate", "duplicate-deep", "latin1", "utf16", "lone-surrogate", "too-deep"],
)
def test_json_that_could_be_read_two_ways_is_uninspectable(raw, kind, code):
    with pytest.raises(kind) as info:
        parse_json(raw)

    assert isinstance(info.value, BodyUninspectable) and isinstance(info.value, BodyNotJSON)
    assert info.value.code == code


@pytest.mark.parametrize(
    "raw",
    [b'{"a": 1} trailing', b'{"a": 1}{"b": 2}', b'{"a": ', b"plain text", json.dumps({"a": "b"}).encode("utf-32-le")],
    ids=["trailing", "two-documents", "truncated", "text", "utf32-is-utf8-with-nuls"],
)
def test_what_is_not_json_at_all_is_only_not_json(raw):
    with pytest.raises(BodyNotJSON) as info:
        parse_json(raw)

    assert not isinstance(info.value, BodyUninspectable)


def test_ordinary_json_reads_as_before():
    assert parse_json(b'\xef\xbb\xbf{"greeting": "hi \\ud83d\\udc4b", "same": {"a": 1}, "other": {"a": 2}}') == {
        "greeting": "hi \U0001f44b", "same": {"a": 1}, "other": {"a": 2},
    }
    assert parse_json('{"text": "a literal \\\\ud800 is text"}') == {"text": "a literal \\ud800 is text"}
