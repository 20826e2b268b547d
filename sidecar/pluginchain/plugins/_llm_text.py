"""The text a language model reads and writes, found in OpenAI-style HTTP bodies.

Content plugins must judge what the model sees, not the bytes on the wire: a JSON escape
(``"\\u0062anned"``), a word streamed over several ``data:`` events, a phrase spread over two
messages of different shapes or a text dressed as an image would otherwise slip past. This
module turns a decoded JSON body into its text fields, builds a new body with some of them
rewritten, and splits a ``text/event-stream`` body into its ``data:`` payloads.

Which strings are text fields: every string value in the document, in document order, and every
object key, except

- identifiers and enumerations that steer the API and are never prose (the values of
  :data:`STRUCTURAL_KEYS`: ``model``, ``role``, ``type``, ``id``, ``finish_reason``…). Rewriting
  them would break the request, and a model is not asked to read them;
- keys that are the API's own field names (:data:`API_KEYS`: ``messages``, ``content``,
  ``properties``…): they are the API's words, not the client's. Every other key is text (a
  tool schema's property names, a ``response_format`` schema's keys, any key a model reads);
- binary payloads a model never reads as text, *when they are what they claim*: a base64
  ``data:`` URL whose media type is not text and whose payload is strict base64 decoding to
  bytes with that media type's signature (a PNG for ``image/png``, any image for ``image/*``,
  sniffed by the ``filetype`` library), and likewise a ``data`` value beside a declared binary
  media type (``media_type``/``mime_type``/``mimeType``, ``"type": "base64"``, input audio's
  ``format``). Such a payload is not scanned: a short pattern turns up by chance in a megabyte
  of base64. What an image shows, or what its bytes hold beyond their signature, is not read.
  A payload that is not what it claims (``data:text/plain;base64,...``, a "PNG" that is text,
  base64 with text after it) is read both ways: its string as written and its decoded text
  (decoded leniently, as a forgiving upstream would; percent-escapes of a ``data:`` URL
  without base64 too);
- the values of :data:`OPAQUE_KEYS` (``b64_json``, ``encrypted_content``, ``signature``):
  payloads the upstream produced and reads back itself.

Everything else counts, wherever it sits, so a new API shape is covered without knowing it:
``messages[].content`` as a string or a list of parts, ``prompt``, ``input``, ``instructions``,
``system``, ``tool_calls[].function.arguments``, ``choices[].message.content``,
``choices[].delta.content``, tool descriptions, and so on.

Each field carries a *group*: one stream of text the model reads or writes in order, so that a
word split over several fields is found in the group's joined text. Every field under the
conversation keys (:data:`CONVERSATION_KEYS`) of a request is in one group,
:data:`CONVERSATION`, whatever the shape of each message; any other field's group is its path
with list positions left out, except that a list element with an integer ``index`` field
(streamed choices and tool calls) is told apart by it (one choice's deltas across a stream).

Keys and decoded payloads are judged but cannot be rewritten in place (:attr:`TextField.path`
is ``None``): renaming a key or re-encoding a payload would change what the API receives.
"""

from __future__ import annotations

import binascii
import codecs
import re
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import filetype  # type: ignore[import-untyped, unused-ignore]

from pluginchain._api.plugin import BodyNotJSON, BodyUninspectable, parse_json

STRUCTURAL_KEYS = frozenset({
    "model", "role", "object", "id", "type", "finish_reason", "stop_reason", "status",
    "tool_call_id", "call_id", "item_id", "system_fingerprint", "service_tier",
    "format", "media_type", "mime_type", "mimeType", "encoding_format", "detail",
})
"""Keys whose string values are identifiers or enumerations, not text."""

OPAQUE_KEYS = frozenset({"b64_json", "encrypted_content", "signature"})
"""Keys whose string values are binary or cryptographic payloads the upstream made, not text."""

CONVERSATION_KEYS = frozenset({"messages", "prompt", "input", "instructions", "system"})
"""Top-level request keys that hold the conversation a model is prompted with."""

API_KEYS = STRUCTURAL_KEYS | OPAQUE_KEYS | CONVERSATION_KEYS | frozenset({
    # requests: OpenAI chat and Responses, Anthropic messages, Gemini
    "content", "text", "name", "image_url", "url", "input_audio", "input_image", "input_text",
    "input_file", "output_text", "file", "file_id", "file_data", "file_url", "filename", "data",
    "source", "cache_control", "citations", "title", "context",
    "tool_calls", "function", "function_call", "arguments", "tools", "tool_choice", "tool_use_id",
    "tool_result", "parallel_tool_calls", "input_schema", "parameters", "strict", "response_format",
    "json_schema", "schema", "temperature", "top_p", "top_k", "n", "stream", "stream_options",
    "include_usage", "stop", "stop_sequences", "max_tokens", "max_completion_tokens",
    "max_output_tokens", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
    "top_logprobs", "user", "seed", "metadata", "store", "modalities", "audio", "voice",
    "prediction", "reasoning", "reasoning_effort", "effort", "summary", "thinking", "budget_tokens",
    "previous_response_id", "include", "truncation", "background", "web_search_options",
    "contents", "parts", "inline_data", "inlineData", "system_instruction", "systemInstruction",
    "generationConfig", "safetySettings", "anthropic_version",
    # responses
    "choices", "index", "message", "delta", "usage", "prompt_tokens", "completion_tokens",
    "total_tokens", "created", "created_at", "refusal", "annotations", "output", "error", "code",
    "param", "stop_sequence", "prompt_tokens_details", "completion_tokens_details", "cached_tokens",
    "reasoning_tokens", "audio_tokens", "accepted_prediction_tokens", "rejected_prediction_tokens",
    "input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details",
    "cache_creation_input_tokens", "cache_read_input_tokens", "content_block", "partial_json",
    "response", "item", "part", "output_index", "content_index", "sequence_number", "bytes",
    "token",
    # JSON Schema keywords
    "$schema", "$id", "$ref", "$defs", "definitions", "properties", "required", "description",
    "enum", "items", "additionalProperties", "anyOf", "oneOf", "allOf", "not", "const", "default",
    "examples", "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems", "pattern",
    "nullable", "exclusiveMinimum", "exclusiveMaximum", "uniqueItems", "patternProperties",
})
"""Object keys that are the API's own field names (of OpenAI, Anthropic and Gemini requests and
responses, and JSON Schema keywords): not judged, so that a pattern naming one of these words
does not ban every request. Any other key is a text field."""

Group = tuple[str | int, ...]
Path = tuple[str | int, ...]

CONVERSATION: Group = ("\x00conversation",)
"""The group of every text field under :data:`CONVERSATION_KEYS` of a request."""


@dataclass(frozen=True, slots=True)
class TextField:
    """One string a model reads or writes, and the stream of text it belongs to."""

    group: Group
    text: str
    path: Path | None = ()
    """Where the string sits in the document (keys and list positions), for
    :func:`replace_text_fields`; ``None`` for a key or a decoded payload, which cannot be
    rewritten in place."""
    prose: bool = True
    """Whether it is text as written (a value or a key), not the decoding of one."""


def text_fields(document: Any) -> Iterator[TextField]:
    """The text fields of a decoded JSON document, in document order."""
    if not isinstance(document, dict):
        yield from _walk(document, (), (), None, None)
        return
    for key, value in document.items():
        if key not in API_KEYS:
            yield TextField((), key, None)
        group = CONVERSATION if key in CONVERSATION_KEYS else (key,)
        yield from _walk(value, group, (key,), key, document)


def replace_text_fields(document: Any, replacements: Iterable[tuple[Path, str]]) -> Any:
    """A copy of ``document`` with the string at each path replaced; containers off those paths
    are shared, not copied."""
    root = [document]
    copied: set[int] = set()
    for path, text in replacements:
        container: Any = root
        slot: str | int = 0
        for step in path:
            child = container[slot]
            if id(child) not in copied:
                child = child.copy()
                copied.add(id(child))
                container[slot] = child
            container, slot = child, step
        container[slot] = text
    return root[0]


def message_count(document: Any) -> int:
    """Messages of a chat request (``messages``) or items of a Responses request (``input``)."""
    if not isinstance(document, dict):
        return 0
    for key in ("messages", "input"):
        if isinstance(document.get(key), list):
            return len(document[key])
    return 0


def conversation_chars(document: Any) -> int:
    """Characters (code points) of the text as written (values and keys, not decoded payloads)
    under :data:`CONVERSATION_KEYS`."""
    if not isinstance(document, dict):
        return 0
    return sum(
        len(field.text)
        for key in CONVERSATION_KEYS
        if key in document
        for field in _walk(document[key], CONVERSATION, (key,), key, document)
        if field.prose
    )


def declares_or_looks_like_json(headers: Mapping[str, str], body: bytes) -> bool:
    """Whether a body is meant as JSON: its content type says so (``application/json``,
    ``*/*+json``), or its first byte after whitespace (and a byte order mark) opens an object
    or an array. Such a body that does not parse must be refused, never read as plain text: a
    lenient upstream parser may still take it (trailing bytes, a lone escape)."""
    media_type = _media_type(headers)
    if media_type == "application/json" or media_type.endswith("+json"):
        return True
    start = body[:64].lstrip()
    if start.startswith(b"\xef\xbb\xbf"):
        start = start[3:].lstrip()
    return start[:1] in (b"{", b"[")


def declares_binary(headers: Mapping[str, str]) -> bool:
    """Whether a body declares a content type that is not text (``multipart/form-data``,
    ``audio/wav``…): its bytes need not be UTF-8, and are read leniently."""
    media_type = _media_type(headers)
    if not media_type or media_type.startswith("text/") or media_type == "application/x-www-form-urlencoded":
        return False
    return not media_type.endswith(("json", "xml", "javascript", "yaml"))


def _media_type(headers: Mapping[str, str]) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


def _walk(value: Any, group: Group, path: Path, key: str | None, parent: dict | None) -> Iterator[TextField]:
    if isinstance(value, str):
        if key in STRUCTURAL_KEYS or key in OPAQUE_KEYS:
            return
        if key == "data" and parent is not None and (declared := _declared_media_type(parent)) is not None:
            yield from _payload_fields(value, declared, parent.get("type") == "base64", group, path)
        elif value[:5].lower() == "data:":
            yield from _data_url_fields(value, group, path)
        else:
            yield TextField(group, value, path)
    elif isinstance(value, dict):
        for child_key, child in value.items():
            if child_key not in API_KEYS:
                yield TextField(group, child_key, None)
            yield from _walk(child, (*group, child_key) if group is not CONVERSATION else group, (*path, child_key), child_key, value)
    elif isinstance(value, list):
        for number, element in enumerate(value):
            element_group = group if group is CONVERSATION else _element_group(group, element)
            yield from _walk(element, element_group, (*path, number), key, None)


def _element_group(group: Group, element: Any) -> Group:
    if isinstance(element, dict):
        index = element.get("index")
        if isinstance(index, int) and not isinstance(index, bool):
            return (*group, index)
    return group


# --- payloads that may be binary -------------------------------------------------------------

_DATA_URL = re.compile(r"data:([^,]*),", re.IGNORECASE)
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/]+")
_TEXT_FORMATS = frozenset({"application/rtf", "application/postscript"})
"""Formats the sniffing library knows that are text a model could read."""
_MEDIA_KINDS = frozenset({"image", "audio", "video"})


def _declared_media_type(container: dict) -> str | None:
    """The media type a ``data`` field's container declares for it, when it declares one."""
    media_type = container.get("media_type", container.get("mime_type", container.get("mimeType")))
    if isinstance(media_type, str):
        return media_type.split(";")[0].strip().lower()
    audio_format = container.get("format")
    if isinstance(audio_format, str):  # input_audio: {"data": ..., "format": "wav"}
        return "audio/" + audio_format.strip().lower()
    if container.get("type") == "base64":
        return "application/octet-stream"
    return None


def _payload_fields(value: str, declared: str, base64: bool, group: Group, path: Path) -> Iterator[TextField]:
    """A ``data`` value beside a declared media type: nothing when it is what it claims, else
    the value as written and, unless it is declared plain text, the text it decodes to."""
    if _is_what_it_claims(declared, value):
        return
    yield TextField(group, value, path)
    decoded = _lenient_base64_text(value, "utf-8") if base64 or not declared.startswith("text/") else ""
    if decoded:
        yield TextField(group, decoded, None, prose=False)


def _data_url_fields(value: str, group: Group, path: Path) -> Iterator[TextField]:
    header = _DATA_URL.match(value)
    if header is None:
        yield TextField(group, value, path)
        return
    media_type, *parameters = (part.strip().lower() for part in header.group(1).split(";"))
    payload = value[header.end() :]
    is_base64 = bool(parameters) and parameters[-1] == "base64"
    if is_base64 and _is_what_it_claims(media_type, payload):
        if len(parameters) > 1:  # data:image/png;name=...;base64: the parameters are text all the same
            yield TextField(group, header.group(1), None, prose=False)
        return
    yield TextField(group, value, path)
    charset = next((p[8:] for p in parameters if p.startswith("charset=")), "utf-8")
    if is_base64:
        decoded = _lenient_base64_text(payload, charset)
    elif "%" in payload:
        decoded = _decode(urllib.parse.unquote_to_bytes(payload), charset)
    else:
        decoded = ""
    if decoded and decoded != payload:
        yield TextField(group, decoded, None, prose=False)


def _is_what_it_claims(media_type: str, payload: str) -> bool:
    """Whether ``payload`` is strict base64 (nothing but the alphabet and its padding) of bytes
    with the signature of ``media_type``, which is not text. Decodes the payload once."""
    if not media_type or media_type.startswith("text/") or not payload.isascii():
        return False
    try:
        decoded = binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError):
        return False
    detected = filetype.guess_mime(decoded)
    if detected is None or detected in _TEXT_FORMATS:
        return False
    kind, detected_kind = media_type.split("/")[0], detected.split("/")[0]
    if kind in _MEDIA_KINDS:
        # An image of another format than declared is still an image; audio and video share containers.
        return kind == detected_kind or {kind, detected_kind} == {"audio", "video"}
    return media_type == "application/octet-stream" or media_type == detected


def _lenient_base64_text(payload: str, charset: str) -> str:
    """What a forgiving decoder makes of ``payload``: stray characters skipped, padding fixed."""
    alphabet = _NOT_BASE64.sub("", payload.split("=", 1)[0])
    if len(alphabet) % 4 == 1:  # a lone last character encodes no whole byte
        alphabet = alphabet[:-1]
    try:
        raw = binascii.a2b_base64(alphabet + "=" * (-len(alphabet) % 4))
    except binascii.Error:
        return ""
    return _decode(raw, charset)


def _decode(raw: bytes, charset: str) -> str:
    try:
        codecs.lookup(charset)
    except LookupError:
        charset = "utf-8"
    return raw.decode(charset, "replace")


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
    except BodyUninspectable:
        raise  # not text: whoever reads the stream may decode it
    except BodyNotJSON:
        return SseData(line, payload, False)


def is_event_stream(headers: Mapping[str, str], body: bytes) -> bool:
    """Whether a body is an event stream: by its content type, or by its first field."""
    if headers.get("content-type", "").split(";")[0].strip().lower() == "text/event-stream":
        return True
    return body.startswith((b"data:", b"event:"))
