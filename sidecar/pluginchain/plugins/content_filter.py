"""content_filter: reject or redact banned patterns in the text a model reads or writes.

In ``pre_request`` it judges the prompt, in ``post_request`` the completion (streamed or not).
Patterns are user input run against client input, so they run under RE2, in time linear in the
text whatever the pattern (no ReDoS), compiled once per plan into one alternation.

What is matched is the text the model sees, not the bytes on the wire:

- a JSON body is decoded first, so ``"\\u0062anned"`` is ``banned``; its text fields are those
  :mod:`pluginchain.plugins._llm_text` names (every string but identifiers, enumerations and
  base64 payloads);
- each text is brought to a canonical form first: Unicode NFKC (full-width ``ｂａｎｎｅｄ`` and
  other compatibility characters become ``banned``), Unicode tag characters (invisible "ASCII
  smuggling") become the ASCII they mirror, and other invisible format characters (zero-width
  spaces, bidi controls, soft hyphens) are dropped. Patterns are therefore written in that form
  (a pattern that is not NFKC is a config error). Homoglyphs of other scripts are not folded;
- a word split over several fields of one text stream (the deltas of a streamed choice, the
  parts or messages of a prompt) is found in their joined text, besides in each field alone;
- an event-stream response buffered whole is read ``data:`` event by ``data:`` event (``[DONE]``
  skipped); a streamed one is judged event by event as it passes (see below);
- a gzip or deflate body is inflated first (and deflated again after redaction); a body in
  another content-encoding cannot be inspected and is never let through unread (the sidecar asks
  upstreams for readable codings only, see :mod:`pluginchain.plugins._content_coding`);
- any other body is matched as UTF-8 text (undecodable bytes read as U+FFFD).

``action: reject`` answers ``status_code`` with an OpenAI-style error, code ``content_filtered``,
without echoing what matched. ``action: redact`` replaces each match with ``mask``: a redacted
text field is rewritten in its canonical form, the other fields and a body without a match are
left exactly as they were.

On a streamed completion (EVENTS mode) the filter judges each channel's text not yet sent (a
choice's content, a tool call's arguments), so a match split over events is found, and keeps
back only what could still become part of a match: for patterns whose longest match is bounded
(read from the pattern), one character less than that; for unbounded ones (``a+``, ``.*``),
``stream_window`` characters. Everything before that leaves at once. ``reject`` ends the stream
with an error event before any part of a match has left; ``redact`` masks a match once it can no
longer grow. Events without deltas (a Responses API ``*.done`` event repeating the whole text)
are judged as whole documents.
"""

from __future__ import annotations

import json
import re._parser as python_regex_parser  # type: ignore[import-not-found]  # widths of patterns; RE2 exposes none
import unicodedata
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import re2
from pydantic import AfterValidator, Field, field_validator, model_validator

from pluginchain._api.plugin import (
    BodyNotJSON,
    BodyTooDeep,
    InstanceSettings,
    Needs,
    Plugin,
    PluginConfig,
    PluginContext,
    PluginData,
    Reject,
    Stage,
    parse_json,
)
from pluginchain._api.stream import StreamEvent, StreamMode, TextChannel
from pluginchain.plugins._content_coding import UnreadableBody, deflate, inflate
from pluginchain.plugins._llm_text import (
    EventStream,
    Group,
    TextField,
    is_event_stream,
    replace_text_fields,
    text_fields,
)


def re2_options(case_sensitive: bool = True) -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # a bad user pattern is a config error, not noise on stderr
    options.case_sensitive = case_sensitive
    return options


def _re2_error_reason(error: re2.error) -> str:
    # RE2 reports b"missing ): (abc": the reason, then the offending part of the pattern.
    reason = error.args[0] if error.args else error
    if isinstance(reason, bytes):
        reason = reason.decode("utf-8", "replace")
    return str(reason).split(": ", 1)[0]


def _check_pattern(pattern: str) -> str:
    try:
        compiled = re2.compile(pattern, re2_options())
    except re2.error as error:
        raise ValueError(f"not a valid RE2 pattern: {_re2_error_reason(error)}") from None
    canonical = unicodedata.normalize("NFKC", pattern)
    if canonical != pattern:
        raise ValueError(f"text is NFKC-normalised before matching, so write the pattern as {canonical!r}")
    if compiled.fullmatch("") is not None:
        raise ValueError("matches the empty string, so it would match every text")
    return pattern


BannedPattern = Annotated[str, AfterValidator(_check_pattern)]


class ContentFilterConfig(PluginConfig):
    """Settings of ``content_filter``."""

    banned_patterns: tuple[BannedPattern, ...]
    """RE2 patterns (https://github.com/google/re2/wiki/Syntax), at least one; a text that
    matches any of them is banned. No backreferences or lookarounds: RE2 guarantees linear time."""
    case_sensitive: bool = False
    """Whether letter case must match (default false: ``banned`` also bans ``BANNED``)."""
    action: Literal["reject", "redact"] = "reject"
    """``reject`` (default) answers the client with an error instead of passing the message on;
    ``redact`` replaces every match with ``mask`` and passes the message on."""
    status_code: int = Field(default=403, ge=400, le=599)
    """HTTP status of a rejection, 400..599 (default 403)."""
    mask: str = "[REDACTED]"
    """What replaces each match when redacting (default ``[REDACTED]``; may be empty)."""
    message: str = Field(default="request blocked by content filter", min_length=1)
    """Error message a rejected client sees; never includes the matched text."""
    stream_window: int = Field(default=256, ge=1, le=65536)
    """On a streamed completion, the characters of text kept back from the client when a pattern
    has no longest match (``a+``, ``.*``; default 256): a match longer than this may be partly
    sent before it is complete. Patterns with a bounded match keep back exactly what they need."""

    @field_validator("banned_patterns")
    @classmethod
    def _some_pattern(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        # Not min_length: pydantic would repeat that error whenever one pattern is invalid.
        if not patterns:
            raise ValueError("at least one pattern is required")
        return patterns

    @model_validator(mode="after")
    def _patterns_compile_together(self) -> ContentFilterConfig:
        try:
            compile_banned(self.banned_patterns, self.case_sensitive)
        except re2.error as error:
            # Each pattern compiled alone, so only their sum can fail here (RE2's memory budget).
            reason = _re2_error_reason(error)
            raise ValueError(f"banned_patterns together are not a valid RE2 pattern: {reason}") from None
        return self


def compile_banned(patterns: Sequence[str], case_sensitive: bool):
    """All patterns as one alternation: one linear scan per text, whatever their number."""
    return re2.compile("|".join(f"(?:{pattern})" for pattern in patterns), re2_options(case_sensitive))


# Unicode tag characters U+E0020..U+E007E mirror printable ASCII and render invisibly, yet
# models read them: map them back so hidden instructions are matched as what they say.
_TAG_TO_ASCII = {code: code - 0xE0000 for code in range(0xE0020, 0xE007F)}
_FORMAT_CHARACTERS = re2.compile(r"\p{Cf}+")


def canonical_text(text: str) -> str:
    """``text`` as it is matched: NFKC, tag characters as ASCII, format characters dropped."""
    if text.isascii():
        return text
    text = unicodedata.normalize("NFKC", text).translate(_TAG_TO_ASCII)
    return _FORMAT_CHARACTERS.sub("", text)


Span = tuple[int, int, bool]
"""Start and end of a banned stretch of one text, and whether the mask goes there (the first
piece of a match split over several texts carries the mask, the other pieces are dropped)."""


_UNBOUNDED = 65536
"""Python's parser reports an unbounded repeat as a huge width; anything this long is unbounded."""


def longest_match(patterns: Sequence[str]) -> int | None:
    """The most characters any of ``patterns`` can match, or None when that is unbounded (or
    the pattern uses RE2 syntax Python's parser does not know, such as ``\\p{Greek}``)."""
    longest = 0
    for pattern in patterns:
        try:
            widest = python_regex_parser.parse(pattern).getwidth()[1]
        except Exception:  # re.error, and whatever else a foreign syntax provokes
            return None
        if widest >= _UNBOUNDED:
            return None
        longest = max(longest, widest)
    return longest


class ContentFilter(Plugin):
    """Rejects or redacts banned patterns in prompts (pre_request) and completions (post_request)."""

    name = "content_filter"
    Config = ContentFilterConfig
    stages = frozenset({Stage.PRE_REQUEST, Stage.POST_REQUEST})
    supports_parallel = True
    suspends = False  # pure computation: the engine runs it inline
    reads_body = True
    streams = frozenset({StreamMode.EVENTS})

    config: ContentFilterConfig

    def __init__(self, config: ContentFilterConfig, settings: InstanceSettings):
        super().__init__(config, settings)
        self._banned = compile_banned(config.banned_patterns, config.case_sensitive)
        self._redact = config.action == "redact"
        longest = longest_match(config.banned_patterns)
        # A match can still grow while it is shorter than the longest one: keep that much back.
        self._holdback = config.stream_window if longest is None else max(longest - 1, 0)

    def needs(self) -> Needs:
        return Needs(
            request_body=self.stage is Stage.PRE_REQUEST,
            response_body=self.stage is Stage.POST_REQUEST,
            suspends=False,
            stream=StreamMode.EVENTS,
            holdback=self._holdback,
        )

    async def execute(self, ctx: PluginContext, data: PluginData) -> None:
        if data.event is not None:
            self._judge_event(data, data.event)
            return
        body = data.body
        if not body:
            return
        encoding = data.headers.get("content-encoding", "").strip().lower()
        compressed = encoding not in ("", "identity")
        try:
            plain = inflate(body, encoding) if compressed else body
        except UnreadableBody as error:
            raise self._uninspectable(error, 415) from None

        # Only an upstream's stream is read as one: a client could label any request an event
        # stream to have it read line by line, while the upstream parses it as JSON.
        if self.stage is Stage.POST_REQUEST and is_event_stream(data.headers, plain):
            new_plain = self._filter_event_stream(plain)
        else:
            try:
                document = parse_json(plain) if compressed else data.json()
            except BodyTooDeep as error:
                # Not text: the upstream may decode it, escapes and all.
                raise self._uninspectable(error, 400) from None
            except BodyNotJSON:
                new_plain = self._filter_text(plain)
            else:
                new_document = self._filter_document(document)
                if new_document is None:
                    return
                if not compressed:
                    data.set_json(new_document)
                    return
                new_plain = _dump_json(new_document).encode()
        if new_plain is not None:
            data.set_body(deflate(new_plain, encoding) if compressed else new_plain)

    def _judge_event(self, data: PluginData, event: StreamEvent) -> None:
        """One event of a streamed completion: the pending text of each channel, or, for an
        event without deltas, its data as a whole."""
        # A channel without new text, not ending, was judged as it is at an earlier event.
        texts = data.texts
        for channel in event.deltas.keys() | event.ending:
            if channel in texts:
                self._judge_channel(data, channel, texts[channel], closing=channel in event.ending)
        if event.deltas or event.data is None or event.data == "[DONE]":
            return
        if event.document is not None:
            new_document = self._filter_document(event.document)
            if new_document is not None:
                data.replace_event(_dump_json(new_document))
        else:
            new_text = self._filter_fields([TextField((), event.data)])
            if new_text:
                data.replace_event(new_text[0])

    def _judge_channel(self, data: PluginData, channel: TextChannel, text: str, *, closing: bool) -> None:
        canonical = canonical_text(text)
        matches = [m.span() for m in self._banned.finditer(canonical) if m.end() > m.start()]
        if matches and not self._redact:
            raise Reject(self.config.status_code, self.config.message, code="content_filtered")
        # Matches that end before the held-back tail cannot grow any more: mask them now. One
        # reaching into the tail may still grow: keep it back from where it starts.
        cut = len(canonical) if closing else len(canonical) - self._holdback
        settled = [(start, end, True) for start, end in matches if end <= cut]
        growing = [start for start, end in matches if end > cut]
        if settled:
            masked = _masked(canonical, settled, self.config.mask)
            growing = [start + len(masked) - len(canonical) for start in growing]
            data.set_text(channel, masked)
            text = canonical = masked
        if closing:
            return
        keep = len(canonical) - min(growing) if growing else self._holdback
        data.hold(channel, _raw_chars_covering(text, canonical, keep))

    def _uninspectable(self, error: ValueError, status: int) -> Exception:
        """A body the filter cannot read is never let through unread: a prompt is refused with
        ``status``; a response fails the plugin (``on_error`` decides)."""
        if self.stage is Stage.PRE_REQUEST:
            return Reject(status, f"content_filter: {error}", code="uninspectable_body", type="invalid_request_error")
        return error

    def _filter_document(self, document: Any) -> Any | None:
        """The document with banned text redacted, or ``None`` when nothing is banned."""
        replacements = self._filter_fields(list(text_fields(document)))
        return replace_text_fields(document, replacements) if replacements else None

    def _filter_text(self, body: bytes) -> bytes | None:
        replacements = self._filter_fields([TextField((), body.decode("utf-8", "replace"))])
        return replacements[0].encode() if replacements else None

    def _filter_event_stream(self, body: bytes) -> bytes | None:
        stream = EventStream(body.decode("utf-8", "replace"))
        # All events' fields are judged together, so a word streamed over several events is found.
        fields: list[TextField] = []
        origins: list[tuple[int, int]] = []  # per field: its event, and its number in the event
        for event_number, event in enumerate(stream.data):
            event_fields = text_fields(event.document) if event.is_json else [TextField(("data",), event.payload)]
            for field_number, field in enumerate(event_fields):
                fields.append(field)
                origins.append((event_number, field_number))
        replacements = self._filter_fields(fields)
        if not replacements:
            return None
        per_event: dict[int, dict[int, str]] = {}
        for number, new_text in replacements.items():
            event_number, field_number = origins[number]
            per_event.setdefault(event_number, {})[field_number] = new_text
        for event_number, event_replacements in per_event.items():
            event = stream.data[event_number]
            if event.is_json:
                payload = _dump_json(replace_text_fields(event.document, event_replacements))
            else:
                payload = event_replacements[0]
            stream.replace_payload(event, payload)
        return stream.text().encode()

    def _filter_fields(self, fields: Sequence[TextField]) -> dict[int, str]:
        """Rejects when a field is banned; else the redacted text of each banned field, by number."""
        members: dict[Group, list[int]] = {}
        for number, field in enumerate(fields):
            members.setdefault(field.group, []).append(number)
        replacements: dict[int, str] = {}
        for numbers in members.values():
            texts = [canonical_text(fields[number].text) for number in numbers]
            if not self._redact:
                if self._any_banned(texts):
                    raise Reject(self.config.status_code, self.config.message, code="content_filtered")
                continue
            for number, text, spans in zip(numbers, texts, self._banned_spans(texts)):
                if spans:
                    replacements[number] = _masked(text, spans, self.config.mask)
        return replacements

    def _any_banned(self, texts: list[str]) -> bool:
        if any(self._first_match(text) for text in texts):
            return True
        return len(texts) > 1 and self._first_match("".join(texts))

    def _first_match(self, text: str) -> bool:
        # Zero-width matches (a lone \b or ^ in an alternation) ban nothing.
        return any(match.end() > match.start() for match in self._banned.finditer(text))

    def _banned_spans(self, texts: list[str]) -> list[list[Span]]:
        """Banned spans of each text of one stream: in the text alone, and across text boundaries."""
        spans: list[list[Span]] = [
            [(m.start(), m.end(), True) for m in self._banned.finditer(text) if m.end() > m.start()]
            for text in texts
        ]
        if len(texts) < 2:
            return spans
        starts, offset = [], 0
        for text in texts:
            starts.append(offset)
            offset += len(text)
        joined = "".join(texts)
        index = 0
        for match in self._banned.finditer(joined):
            start, end = match.span()
            if start == end:
                continue
            while index + 1 < len(texts) and starts[index + 1] <= start:
                index += 1
            piece, first = index, True
            while start < end:
                piece_end = min(end, starts[piece] + len(texts[piece]))
                if piece_end > start:
                    spans[piece].append((start - starts[piece], piece_end - starts[piece], first))
                    first = False
                start, piece = piece_end, piece + 1
        return spans


def _raw_chars_covering(text: str, canonical: str, wanted: int) -> int:
    """How many characters at the end of ``text`` to keep back so that their canonical form
    holds ``wanted`` characters: dropped invisible characters and composed sequences make the
    canonical form shorter, and must not let part of a match leave early."""
    if text is canonical or len(text) == len(canonical):
        return min(wanted, len(text))
    count = min(wanted, len(text))
    while count < len(text):
        shortfall = wanted - len(canonical_text(text[-count:]))
        if shortfall <= 0:
            break
        count = min(len(text), count + shortfall)
    return count


def _masked(text: str, spans: list[Span], mask: str) -> str:
    merged: list[list] = []
    for start, end, carries_mask in sorted(spans):
        if merged and start < merged[-1][1]:  # overlapping matches become one stretch, one mask
            merged[-1][1] = max(merged[-1][1], end)
            merged[-1][2] = merged[-1][2] or carries_mask
        else:
            merged.append([start, end, carries_mask])
    pieces, position = [], 0
    for start, end, carries_mask in merged:
        pieces.append(text[position:start])
        if carries_mask:
            pieces.append(mask)
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


def _dump_json(document: Any) -> str:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"))
