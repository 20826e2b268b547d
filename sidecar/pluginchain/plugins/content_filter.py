"""content_filter: reject or redact banned patterns in the text a model reads or writes.

In ``pre_request`` it judges the prompt, in ``post_request`` the completion (streamed or not).
Patterns are user input run against client input, so they run under RE2, in time linear in the
text whatever the pattern (no ReDoS), compiled once per plan into one alternation.

What is judged is the text the model reads, not the bytes on the wire, and no body is let
through that the filter could read one way while the upstream reads it another:

- a JSON body is decoded first, so ``"\\u0062anned"`` is ``banned``, and read strictly
  (:func:`pluginchain.parse_json`): a prompt whose JSON has a key twice in one object (code
  ``duplicate_json_keys``), is not UTF-8 or escapes a lone surrogate (``invalid_utf8``), nests
  deeper than :data:`pluginchain.MAX_JSON_DEPTH` (``uninspectable_body``), or is declared or
  looks like JSON (``application/json``, ``*/*+json``, first byte ``{`` or ``[``) without
  parsing, say with bytes after the document (``uninspectable_body``), is refused with 400,
  never read as plain text;
- its text fields are those :mod:`pluginchain.plugins._llm_text` names: every string and every
  object key but identifiers, enumerations, the API's own field names, and binary payloads that
  are what they claim (a real PNG in a ``data:image/png;base64`` URL is skipped; a ``data:``
  URL or a ``data`` field whose payload is text, or not the media type it claims, is judged as
  written and decoded);
- each text is brought to a canonical form first (:mod:`pluginchain.plugins._unicode`):
  Unicode tag characters (invisible "ASCII smuggling") become the ASCII they mirror, every other
  default-ignorable code point (zero-width spaces, U+034F, variation selectors, Hangul fillers,
  soft hyphens, bidi controls) and format character is dropped, then NFKC (full-width
  ``ｂａｎｎｅｄ`` is ``banned``). Patterns are therefore written in that form (a pattern that
  is not NFKC is a config error);
- with ``match: skeleton`` the canonical text is further folded to its Unicode TR39 skeleton
  (Cyrillic and Greek look-alikes, dotless ``ı``, ``rn`` for ``m``, ``0`` as ``O``), combining
  and enclosing marks dropped, lower-cased first unless ``case_sensitive``. The literal
  characters of each pattern are folded the same way, so patterns are still written naturally;
  escapes and character classes are kept as written and match against the skeleton;
- with ``flexible_whitespace: true`` each run of literal spaces in a pattern matches any run of
  whitespace in the text, including none (invisibles used as spaces are already dropped);
- a word split over several fields of one text stream is found in their joined text, besides in
  each field alone: all text of a request's conversation (``messages``, ``input``, ``prompt``,
  ``instructions``, ``system``) in document order whatever the shape of each message, joined
  both directly and with a space between fields; the deltas of a streamed choice; the fields of
  one path elsewhere;
- an event-stream response buffered whole is read ``data:`` event by ``data:`` event (``[DONE]``
  skipped); a streamed one is judged event by event as it passes (see below);
- a gzip or deflate body is inflated first (and deflated again after redaction), up to
  ``max_inflated_bytes`` (a prompt that inflates past it is refused with 413 ``body_too_large``
  as soon as it does; large bodies are inflated off the event loop); a body in another
  content-encoding cannot be inspected and is never let through unread (the sidecar asks
  upstreams for readable codings only, see :mod:`pluginchain.plugins._content_coding`);
- any other body is matched as text: a prompt must be UTF-8 (else 400 ``invalid_utf8``) unless
  its content type declares a binary format (``multipart/form-data``, ``audio/*``...), which is
  read with undecodable bytes as U+FFFD, as is a completion.

Not judged: text drawn in an image or spoken in audio; the contents of a binary payload beyond
its signature; API identifiers and enumerations (``model``, ``role``, ``type``...); a
multipart body's parts as anything but raw text.

``action: reject`` answers ``status_code`` with an OpenAI-style error, code ``content_filtered``,
without echoing what matched. ``action: redact`` replaces each match with ``mask``: a redacted
text field is rewritten in its canonical form (the mask covers the original characters a
skeleton match came from), the other fields and a body without a match are left exactly as
they were. A match in an object key or in a decoded payload is rejected even when redacting:
renaming a key or re-encoding a payload would change the request's structure, not its text.

On a streamed completion (EVENTS mode) the filter judges each channel's text not yet sent (a
choice's content, a tool call's arguments), so a match split over events is found, and keeps
back only what could still become part of a match: for patterns whose longest match is bounded
(read from the pattern in its matching form), one character less than that; for unbounded ones
(``a+``, ``.*``, any pattern with ``flexible_whitespace`` spaces), ``stream_window``
characters. Everything before that leaves at once. ``reject`` ends the stream with an error
event before any part of a match has left; ``redact`` masks a match once it can no longer
grow. Events without deltas (a Responses API ``*.done`` event repeating the whole text) are
judged as whole documents.
"""

from __future__ import annotations

import json
import re._parser as python_regex_parser  # type: ignore[import-not-found]  # widths of patterns; RE2 exposes none
import unicodedata
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import re2
from pydantic import AfterValidator, Field, field_validator, model_validator

from pluginchain._api.plugin import (
    BodyNotJSON,
    BodyNotUTF8,
    BodyUninspectable,
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
from pluginchain.plugins._content_coding import (
    DEFAULT_MAX_INFLATED_BYTES,
    BodyInflatesTooLarge,
    UnreadableBody,
    deflate_off_loop,
    inflate_off_loop,
)
from pluginchain.plugins._llm_text import (
    CONVERSATION,
    EventStream,
    Group,
    Path,
    TextField,
    declares_binary,
    declares_or_looks_like_json,
    is_event_stream,
    replace_text_fields,
    text_fields,
)
from pluginchain.plugins._unicode import Skeleton, canonical_text, inline_case_flag, pattern_in_form


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
    match: Literal["canonical", "skeleton"] = "canonical"
    """What the patterns are matched against: ``canonical`` (default) text, NFKC with invisible
    characters removed; or ``skeleton``, that text with look-alike characters of any script
    folded to one prototype (Unicode TR39) and accents dropped, so ``іgnоrе`` in Cyrillic letters
    or ``ignórè`` is ``ignore``. The literal characters of the patterns are folded the same way;
    escapes and character classes are matched against the skeleton as written. Costs about
    2-4 times the default's matching time (bench/README.md)."""
    flexible_whitespace: bool = False
    """Whether a literal space in a pattern matches any run of whitespace (spaces of any width,
    tabs, line breaks), or none, since invisible characters used as spaces are removed (default
    false: a space matches one space). Makes a pattern's longest match unbounded, so a stream is
    held back by ``stream_window``."""
    action: Literal["reject", "redact"] = "reject"
    """``reject`` (default) answers the client with an error instead of passing the message on;
    ``redact`` replaces every match with ``mask`` and passes the message on (a match in an
    object key or a decoded payload is rejected all the same)."""
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
    max_inflated_bytes: int = Field(default=DEFAULT_MAX_INFLATED_BYTES, gt=0)
    """Largest size a gzip or deflate body may inflate to, in bytes (default 4194304, the
    sidecar's default ``--max-body-bytes``; raise it with that). A prompt past it is refused with
    413 ``body_too_large`` as soon as inflation passes it; a completion past it fails the plugin."""

    @field_validator("banned_patterns")
    @classmethod
    def _some_pattern(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        # Not min_length: pydantic would repeat that error whenever one pattern is invalid.
        if not patterns:
            raise ValueError("at least one pattern is required")
        return patterns

    @model_validator(mode="after")
    def _patterns_compile_together(self) -> ContentFilterConfig:
        for number, pattern in enumerate(self.banned_patterns):
            if self.match == "skeleton" and self.case_sensitive and inline_case_flag(pattern):
                raise ValueError(
                    f"banned_patterns[{number}]: with match: skeleton an inline (?i) flag does not fold capitals "
                    "(capital I has the skeleton l): set case_sensitive: false instead"
                )
        forms = matching_forms(self)
        for number, form in enumerate(forms):
            try:
                compiled = re2.compile(form, re2_options(self.case_sensitive))
            except re2.error as error:
                reason = _re2_error_reason(error)
                raise ValueError(f"banned_patterns[{number}]: in its {self.match} form not a valid RE2 pattern: {reason}") from None
            if compiled.fullmatch("") is not None:
                raise ValueError(f"banned_patterns[{number}]: with flexible_whitespace it matches the empty string")
        try:
            compile_banned(forms, self.case_sensitive)
        except re2.error as error:
            # Each pattern compiled alone, so only their sum can fail here (RE2's memory budget).
            reason = _re2_error_reason(error)
            raise ValueError(f"banned_patterns together are not a valid RE2 pattern: {reason}") from None
        return self


def matching_forms(config: ContentFilterConfig) -> list[str]:
    """The patterns as they are matched: literals folded to their skeleton with ``match:
    skeleton``, spaces made flexible with ``flexible_whitespace``."""
    if config.match == "canonical" and not config.flexible_whitespace:
        return list(config.banned_patterns)
    literal = Skeleton(lower=not config.case_sensitive).literal if config.match == "skeleton" else None
    return [pattern_in_form(pattern, literal, config.flexible_whitespace) for pattern in config.banned_patterns]


def compile_banned(patterns: Sequence[str], case_sensitive: bool):
    """All patterns as one alternation: one linear scan per text, whatever their number."""
    return re2.compile("|".join(f"(?:{pattern})" for pattern in patterns), re2_options(case_sensitive))


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
    suspends = True  # a large compressed body is inflated in a worker thread, awaited
    reads_body = True
    streams = frozenset({StreamMode.EVENTS})

    config: ContentFilterConfig

    def __init__(self, config: ContentFilterConfig, settings: InstanceSettings):
        super().__init__(config, settings)
        forms = matching_forms(config)
        self._banned = compile_banned(forms, config.case_sensitive)
        self._redact = config.action == "redact"
        self._skeleton = Skeleton(lower=not config.case_sensitive) if config.match == "skeleton" else None
        longest = longest_match(forms)
        # A match can still grow while it is shorter than the longest one: keep that much back.
        self._holdback = config.stream_window if longest is None else max(longest - 1, 0)

    def needs(self) -> Needs:
        return Needs(
            request_body=self.stage is Stage.PRE_REQUEST,
            response_body=self.stage is Stage.POST_REQUEST,
            suspends=True,
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
        headers = data.headers
        encoding = headers.get("content-encoding", "").strip().lower()
        compressed = encoding not in ("", "identity")
        try:
            plain = await inflate_off_loop(body, encoding, self.config.max_inflated_bytes) if compressed else body
        except UnreadableBody as error:
            raise self._uninspectable(error, 413 if isinstance(error, BodyInflatesTooLarge) else 415) from None

        prompt = self.stage is Stage.PRE_REQUEST
        # Only an upstream's stream is read as one: a client could label any request an event
        # stream to have it read line by line, while the upstream parses it as JSON.
        if not prompt and is_event_stream(headers, plain):
            new_plain = self._filter_event_stream(plain)
        else:
            try:
                document = parse_json(plain) if compressed else data.json()
            except BodyUninspectable as error:
                lenient = isinstance(error, BodyNotUTF8) and not declares_or_looks_like_json(headers, plain)
                if not lenient or (prompt and not declares_binary(headers)):
                    # Not text: the upstream may decode it, escapes and all, or read it another way.
                    raise self._uninspectable(error, 400) from None
                new_plain = self._filter_text(plain.decode("utf-8", "replace"))
            except BodyNotJSON as error:
                if prompt and declares_or_looks_like_json(headers, plain):
                    raise self._uninspectable(error, 400) from None
                new_plain = self._filter_text(plain.decode("utf-8", "replace"))
            else:
                new_document = self._filter_document(document)
                if new_document is None:
                    return
                if not compressed:
                    data.set_json(new_document)
                    return
                new_plain = _dump_json(new_document).encode()
        if new_plain is not None:
            data.set_body(await deflate_off_loop(new_plain, encoding) if compressed else new_plain)

    def _judge_event(self, data: PluginData, event: StreamEvent) -> None:
        """One event of a streamed completion: the pending text of each channel, or, for an
        event without deltas, its data as a whole."""
        # A channel without new text, not ending, was judged as it is at an earlier event.
        texts = data.texts
        ending = event.ending
        for channel in (event.deltas.keys() | ending) if ending else event.deltas:
            if channel in texts:
                self._judge_channel(data, channel, texts[channel], closing=channel in ending)
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
        form = self._fold(canonical)
        matches = self._match_spans(form)
        if not matches:
            # The usual event: nothing banned in the text not yet sent; only its tail is kept.
            if not closing:
                data.hold(channel, self._tail_to_hold(text))
            return
        if not self._redact:
            raise self._rejection()
        # Matches that end before the held-back tail cannot grow any more: mask them now. One
        # reaching into the tail may still grow: keep it back from where it starts.
        cut = len(form) if closing else len(form) - self._holdback
        settled = [span for span in matches if span[1] <= cut]
        growing = [span for span in matches if span[1] > cut]
        growing_starts = [start for start, _ in self._to_canonical(canonical, form, growing)]
        if settled:
            spans = [(start, end, True) for start, end in self._to_canonical(canonical, form, settled)]
            masked = _masked(canonical, spans, self.config.mask)
            growing_starts = [max(start + len(masked) - len(canonical), 0) for start in growing_starts]
            data.set_text(channel, masked)
            text = canonical = masked
        if closing:
            return
        if growing_starts:
            keep = _raw_chars_covering(text, len(canonical) - min(growing_starts), canonical_text)
        else:
            keep = self._tail_to_hold(text)
        data.hold(channel, keep)

    def _match_spans(self, form: str) -> list[tuple[int, int]]:
        """Where the banned patterns match ``form`` (zero-width matches ban nothing)."""
        return [m.span() for m in self._banned.finditer(_subject(form)) if m.end() > m.start()]

    def _tail_to_hold(self, text: str) -> int:
        """Characters at the end of ``text`` whose matching form holds the holdback."""
        if self._skeleton is None and text.isascii():
            return min(self._holdback, len(text))  # ASCII is its own canonical form, char for char
        return _raw_chars_covering(text, self._holdback, self._matching_form)

    def _fold(self, canonical: str) -> str:
        return canonical if self._skeleton is None else self._skeleton.fold(canonical)

    def _matching_form(self, text: str) -> str:
        return self._fold(canonical_text(text))

    def _to_canonical(self, canonical: str, form: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if self._skeleton is None or not spans or form == canonical:
            return spans
        return self._skeleton.to_canonical(canonical, spans)

    def _rejection(self) -> Reject:
        return Reject(self.config.status_code, self.config.message, code="content_filtered")

    def _uninspectable(self, error: ValueError, status: int) -> Exception:
        """A body the filter cannot read is never let through unread: a prompt is refused with
        ``status`` and the code the error names; a response fails the plugin (``on_error``
        decides)."""
        if self.stage is Stage.PRE_REQUEST:
            code = error.code if isinstance(error, (BodyUninspectable, UnreadableBody)) else "uninspectable_body"
            return Reject(status, f"content_filter: {error}", code=code, type="invalid_request_error")
        return error

    def _filter_document(self, document: Any) -> Any | None:
        """The document with banned text redacted, or ``None`` when nothing is banned."""
        fields = list(text_fields(document))
        replacements = self._filter_fields(fields)
        if not replacements:
            return None
        return replace_text_fields(document, [(_path(fields[number]), text) for number, text in replacements.items()])

    def _filter_text(self, text: str) -> bytes | None:
        replacements = self._filter_fields([TextField((), text)])
        return replacements[0].encode() if replacements else None

    def _filter_event_stream(self, body: bytes) -> bytes | None:
        stream = EventStream(body.decode("utf-8", "replace"))
        # All events' fields are judged together, so a word streamed over several events is found.
        fields: list[TextField] = []
        origins: list[int] = []  # per field: its event
        for event_number, event in enumerate(stream.data):
            event_fields = text_fields(event.document) if event.is_json else [TextField(("data",), event.payload)]
            for field in event_fields:
                fields.append(field)
                origins.append(event_number)
        replacements = self._filter_fields(fields)
        if not replacements:
            return None
        per_event: dict[int, list[tuple[Path, str]]] = {}
        for number, new_text in replacements.items():
            per_event.setdefault(origins[number], []).append((_path(fields[number]), new_text))
        for event_number, event_replacements in per_event.items():
            event = stream.data[event_number]
            if event.is_json:
                payload = _dump_json(replace_text_fields(event.document, event_replacements))
            else:
                payload = event_replacements[0][1]
            stream.replace_payload(event, payload)
        return stream.text().encode()

    def _filter_fields(self, fields: Sequence[TextField]) -> dict[int, str]:
        """Rejects when a field is banned; else the redacted text of each banned field, by number."""
        members: dict[Group, list[int]] = {}
        for number, field in enumerate(fields):
            members.setdefault(field.group, []).append(number)
        replacements: dict[int, str] = {}
        for group, numbers in members.items():
            canonicals = [canonical_text(fields[number].text) for number in numbers]
            forms = [self._fold(canonical) for canonical in canonicals] if self._skeleton else canonicals
            # Messages are separate texts to a reader: a phrase may be split at their border.
            separators = ("", " ") if group == CONVERSATION else ("",)
            if not self._redact:
                if self._any_banned(forms, separators):
                    raise self._rejection()
                continue
            for number, canonical, form, spans in zip(numbers, canonicals, forms, self._banned_spans(forms, separators)):
                if not spans:
                    continue
                if fields[number].path is None:  # a key or a decoded payload: no text to rewrite in place
                    raise self._rejection()
                if form is not canonical:
                    mapped = self._to_canonical(canonical, form, [(start, end) for start, end, _ in spans])
                    spans = [(start, end, carries) for (start, end), (_, _, carries) in zip(mapped, spans)]
                replacements[number] = _masked(canonical, spans, self.config.mask)
        return replacements

    def _any_banned(self, texts: list[str], separators: Sequence[str]) -> bool:
        if any(self._first_match(text) for text in texts):
            return True
        return len(texts) > 1 and any(self._first_match(separator.join(texts)) for separator in separators)

    def _first_match(self, text: str) -> bool:
        # Zero-width matches (a lone \b or ^ in an alternation) ban nothing.
        return any(match.end() > match.start() for match in self._banned.finditer(_subject(text)))

    def _banned_spans(self, texts: list[str], separators: Sequence[str]) -> list[list[Span]]:
        """Banned spans of each text of one stream: in the text alone, and across text boundaries
        (the texts joined by each of ``separators``)."""
        spans: list[list[Span]] = [
            [(m.start(), m.end(), True) for m in self._banned.finditer(_subject(text)) if m.end() > m.start()]
            for text in texts
        ]
        if len(texts) < 2:
            return spans
        for separator in separators:
            starts, offset = [], 0
            for text in texts:
                starts.append(offset)
                offset += len(text) + len(separator)
            index = 0
            for match in self._banned.finditer(_subject(separator.join(texts))):
                start, end = match.span()
                if start == end:
                    continue
                while index + 1 < len(texts) and starts[index + 1] <= start:
                    index += 1
                piece, first = index, True
                while start < end and piece < len(texts):
                    piece_start = max(start, starts[piece])
                    piece_end = min(end, starts[piece] + len(texts[piece]))
                    if piece_end > piece_start:
                        spans[piece].append((piece_start - starts[piece], piece_end - starts[piece], first))
                        first = False
                    start, piece = max(piece_end, start), piece + 1
        return spans


def _subject(text: str) -> str | bytes:
    """What the banned patterns are matched against: RE2's Python wrapper maps each match in a
    str back from UTF-8 byte offsets, and ASCII text is its own UTF-8 with the same offsets, so
    handed over as bytes it is matched by the same engine on the same bytes, a third faster. This
    runs on every text field of every request and every event of a stream."""
    return text.encode() if text.isascii() else text


def _path(field: TextField) -> Path:
    assert field.path is not None  # only fields with a path are ever redacted
    return field.path


def _raw_chars_covering(text: str, wanted: int, form: Callable[[str], str]) -> int:
    """How many characters at the end of ``text`` to keep back so that their matching form
    holds ``wanted`` characters: dropped invisible characters and composed sequences make the
    form shorter, and must not let part of a match leave early."""
    count = min(wanted, len(text))
    while count < len(text):
        shortfall = wanted - len(form(text[-count:]))
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
