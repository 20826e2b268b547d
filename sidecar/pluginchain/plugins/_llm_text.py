"""The text a language model reads and writes, found in OpenAI-style HTTP bodies.

Content plugins must judge what the model sees, not the bytes on the wire: a JSON escape
(``"\\u0062anned"``) or a word streamed over several ``data:`` events would otherwise slip past.
This module turns a decoded JSON body into its text fields, builds a new body with some of them
rewritten, and splits a ``text/event-stream`` body into its ``data:`` payloads.

Which strings are text fields: every string value in the document, in document order, except

- identifiers and enumerations that steer the API and are never prose (the values of
  :data:`STRUCTURAL_KEYS`: ``model``, ``role``, ``type``, ``id``, ``finish_reason``…). Rewriting
  them would break the request, and a model is not asked to read them;
- binary payloads a model never reads as text: base64 ``data:`` URLs (images, files), and the
  values of :data:`OPAQUE_KEYS` (``b64_json``, ``encrypted_content``…) or of a ``data`` key
  beside a non-text media type (audio, Anthropic base64 images). Scanning them would only give
  false positives: a short pattern turns up by chance in a megabyte of base64.

Everything else counts, wherever it sits, so a new API shape is covered without knowing it:
``messages[].content`` as a string or a list of parts, ``prompt``, ``input``, ``instructions``,
``system``, ``tool_calls[].function.arguments``, ``choices[].message.content``,
``choices[].delta.content``, tool descriptions, and so on. Object keys are not text fields.

Each field carries a *group*: its path with list positions left out, except that a list element
with an integer ``index`` field (streamed choices and tool calls) is told apart by it. A group
is one stream of text the model reads or writes in order (all message contents, one choice's
deltas across a stream), so a word split over several fields can be found in the group's
joined text.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pluginchain._api.plugin import BodyNotJSON, BodyTooDeep, parse_json

STRUCTURAL_KEYS = frozenset({
    "model", "role", "object", "id", "type", "finish_reason", "stop_reason", "status",
    "tool_call_id", "call_id", "item_id", "system_fingerprint", "service_tier",
    "format", "media_type", "mime_type", "encoding_format",
})
"""Keys whose string values are identifiers or enumerations, not text."""

OPAQUE_KEYS = frozenset({"b64_json", "file_data", "encrypted_content", "signature"})
"""Keys whose string values are binary or cryptographic payloads, not text."""

CONVERSATION_KEYS = frozenset({"messages", "prompt", "input", "instructions", "system"})
"""Top-level request keys that hold the conversation a model is prompted with."""

Group = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class TextField:
    """One string a model reads or writes, and the stream of text it belongs to."""

    group: Group
    text: str


def text_fields(document: Any) -> Iterator[TextField]:
    """The text fields of a decoded JSON document, in document order."""
    yield from _walk(document, ())


def replace_text_fields(document: Any, replacements: Mapping[int, str]) -> Any:
    """A copy of ``document`` with text field number ``n`` (in :func:`text_fields` order)
    replaced by ``replacements[n]``; containers without a replaced field are shared, not copied.
    """
    return _rebuild(document, None, None, itertools.count(), replacements)


def message_count(document: Any) -> int:
    """Messages of a chat request (``messages``) or items of a Responses request (``input``)."""
    if not isinstance(document, dict):
        return 0
    for key in ("messages", "input"):
        if isinstance(document.get(key), list):
            return len(document[key])
    return 0


def conversation_chars(document: Any) -> int:
    """Characters (code points) of the text fields under :data:`CONVERSATION_KEYS`."""
    if not isinstance(document, dict):
        return 0
    return sum(
        len(field.text)
        for key in CONVERSATION_KEYS
        if key in document
        for field in _walk(document[key], (key,))
    )


def _walk(value: Any, group: Group, key: str | None = None, parent: dict | None = None) -> Iterator[TextField]:
    # _rebuild must visit strings in exactly this order: replacements are numbered by it.
    if isinstance(value, str):
        if _is_text(key, value, parent):
            yield TextField(group, value)
    elif isinstance(value, dict):
        for child_key, child in value.items():
            yield from _walk(child, (*group, child_key), child_key, value)
    elif isinstance(value, list):
        for element in value:
            yield from _walk(element, _element_group(group, element), key, None)


def _rebuild(
    value: Any, key: str | None, parent: dict | None, counter: Iterator[int], replacements: Mapping[int, str]
) -> Any:
    if isinstance(value, str):
        if _is_text(key, value, parent):
            return replacements.get(next(counter), value)
        return value
    if isinstance(value, dict):
        rebuilt = {k: _rebuild(v, k, value, counter, replacements) for k, v in value.items()}
        changed = any(rebuilt[k] is not v for k, v in value.items())
        return rebuilt if changed else value
    if isinstance(value, list):
        rebuilt_list = [_rebuild(v, key, None, counter, replacements) for v in value]
        changed = any(new is not old for new, old in zip(rebuilt_list, value))
        return rebuilt_list if changed else value
    return value


def _element_group(group: Group, element: Any) -> Group:
    if isinstance(element, dict):
        index = element.get("index")
        if isinstance(index, int) and not isinstance(index, bool):
            return (*group, index)
    return group


def _is_text(key: str | None, value: str, parent: dict | None) -> bool:
    if key in STRUCTURAL_KEYS or key in OPAQUE_KEYS:
        return False
    if key == "data" and parent is not None and _declares_binary(parent):
        return False
    return not _is_base64_data_url(value)


def _declares_binary(container: dict) -> bool:
    if container.get("type") == "base64" or "format" in container:
        return True
    media_type = container.get("media_type", container.get("mime_type", container.get("mimeType")))
    return isinstance(media_type, str) and not media_type.startswith("text/")


def _is_base64_data_url(value: str) -> bool:
    return value.startswith("data:") and ";base64," in value[:256]


# Server-sent events (https://html.spec.whatwg.org/multipage/server-sent-events.html): lines end
# with CRLF, LF or CR, and only those (str.splitlines would also split on U+2028 and friends).
_SSE_LINE_BREAK = re.compile(r"(\r\n|\r|\n)")


@dataclass(frozen=True, slots=True)
class SseData:
    """The payload of one ``data:`` line of an event stream."""

    line: int
    """Position of the line in :attr:`EventStream.lines`."""
    payload: str
    is_json: bool
    """Whether the payload is a JSON document."""
    document: Any = None
    """The payload decoded, when it is JSON."""


class EventStream:
    """A ``text/event-stream`` body split into lines, with its ``data:`` payloads decoded.

    Each ``data:`` line is taken as one payload, as OpenAI and Anthropic send them; a payload
    spread over several ``data:`` lines is seen line by line.
    """

    __slots__ = ("lines", "data")

    def __init__(self, text: str):
        pieces = _SSE_LINE_BREAK.split(text)
        self.lines: list[list[str]] = [
            [pieces[i], pieces[i + 1] if i + 1 < len(pieces) else ""] for i in range(0, len(pieces), 2)
        ]
        self.data: list[SseData] = []
        for number, (line, _) in enumerate(self.lines):
            if not line.startswith("data:"):
                continue
            payload = line[6:] if line.startswith("data: ") else line[5:]
            if payload == "[DONE]":  # OpenAI's end-of-stream marker, not model output
                continue
            self.data.append(_decode_payload(number, payload))

    def replace_payload(self, data: SseData, payload: str) -> None:
        # A payload with line breaks (a mask may have some) becomes several data lines, which
        # event-stream readers join back with "\n".
        ending = self.lines[data.line][1] or "\n"
        self.lines[data.line][0] = ending.join("data: " + part for part in _SSE_LINE_BREAK.split(payload)[::2])

    def text(self) -> str:
        return "".join(line + ending for line, ending in self.lines)


def _decode_payload(line: int, payload: str) -> SseData:
    try:
        return SseData(line, payload, True, parse_json(payload))
    except BodyTooDeep:
        raise  # not text: whoever reads the stream may decode it
    except BodyNotJSON:
        return SseData(line, payload, False)


def is_event_stream(headers: Mapping[str, str], body: bytes) -> bool:
    """Whether a body is an event stream: by its content type, or by its first field."""
    if headers.get("content-type", "").split(";")[0].strip().lower() == "text/event-stream":
        return True
    return body.startswith((b"data:", b"event:"))
