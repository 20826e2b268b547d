"""A streamed response through the chain: network chunks in, server-sent events judged, chunks out.

The one place that turns Envoy's STREAMED body chunks into the events plugins see and back:

- :class:`EventFramer` reassembles events split over chunks and splits chunks holding several,
  keeping each event's bytes so that an event no plugin changed leaves exactly as it came;
- :func:`decode_deltas` finds the delta text of OpenAI chat completions, completions and
  Responses API events, per :class:`~pluginchain.TextChannel`;
- :class:`ResponseStream` runs the chain's EVENTS-mode plugins on each event, keeps back no more
  of each channel's text than the strictest of them needs, sends the rest in the event's own
  delta (or, when text is released without a delta to carry it, in an event made like the
  channel's last one), buffers the stream for WHOLE-mode plugins up to its limit, and ends the
  stream with one ``data: {"error": ...}`` event when a plugin rejects.

No third-party SSE parser fits here: they parse a response they pull from (httpx-sse keeps its
incremental decoder private, sseclient-py reads a blocking iterator), while the sidecar is handed
chunks and must give each event's own bytes back. Framing follows the WHATWG event-stream rules.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from pluginchain._api.plugin import BodyNotJSON, BodyUninspectable, Exchange, Reject, Stage, parse_json
from pluginchain._api.stream import StreamEvent, TextChannel
from pluginchain._engine.plan import CompiledChain
from pluginchain._engine.usage import is_usage_chunk, usage_of

logger = logging.getLogger("pluginchain.stream")

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# A blank line: two line breaks in a row. A CR directly followed by LF is one line break (CRLF),
# never a CR and then an LF, or "a\r\nb: c\r\n\r\n" would be cut after its first line.
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")
_DONE = "[DONE]"
_NO_CHANNELS: frozenset[TextChannel] = frozenset()

JsonPath = tuple[str | int, ...]

_EVENTS_PER_TURN = 128
"""Events of one chunk judged before the event loop gets a turn for other streams."""

MAX_CHANNELS = 1024
"""Texts one stream may write (choices times tool calls): what the sidecar keeps per channel is
small, but an upstream numbering a new tool call in every event must not grow it without end."""


class StreamUnreadable(ValueError):
    """A stream the chain cannot judge: it is ended with an error event, never let through."""

    code = "stream_unreadable"


class StreamTooLarge(StreamUnreadable):
    """An event, or a stream a WHOLE-mode plugin buffers, passed its byte limit."""

    code = "stream_too_large"


class EventFramer:
    """Cuts a byte stream into events: each ends at an empty line (CRLF, LF or CR line breaks)."""

    __slots__ = ("_buffer", "_limit")

    def __init__(self, limit_bytes: int):
        self._buffer = b""
        self._limit = limit_bytes

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events ``chunk`` completes, each with its blank line; the rest waits for more."""
        buffer = self._buffer + chunk if self._buffer else chunk
        events = []
        start = 0
        if b"\r" not in buffer:
            # LF line breaks only, as OpenAI-style upstreams send them: a blank line is LF LF.
            # bytes.find makes the same cuts as the regex below, which tries a match at every
            # byte, in a third to a half of its time: about a microsecond less per event.
            end = buffer.find(b"\n\n")
            while end != -1:
                events.append(buffer[start:end + 2])
                start = end + 2
                end = buffer.find(b"\n\n", start)
        else:
            for match in _EVENT_END.finditer(buffer):
                # A lone CR at the very end may be the first half of a CRLF still in flight.
                if match.end() == len(buffer) and buffer.endswith(b"\r"):
                    break
                events.append(buffer[start:match.end()])
                start = match.end()
        self._buffer = buffer[start:]
        if len(self._buffer) > self._limit:
            raise StreamTooLarge(f"a stream event exceeds {self._limit} bytes")
        return events

    def rest(self) -> bytes:
        """What is left when the stream ends (an event without its blank line)."""
        rest, self._buffer = self._buffer, b""
        return rest


@dataclass(slots=True)
class RawEvent:
    """One event's bytes and fields."""

    raw: bytes
    type: str | None
    data: str | None
    lone_data_line: bool = False
    """Whether ``raw`` is exactly ``data: <data>`` and its blank line, with LF line breaks (what
    OpenAI-style upstreams send): such an event is read and rewritten without splitting lines."""

    @classmethod
    def parse(cls, raw: bytes) -> RawEvent:
        if raw.startswith(b"data: ") and raw.find(b"\n") == len(raw) - 2 and raw.endswith(b"\n\n") and b"\r" not in raw:
            # The line-by-line reading below gives the same: one data field, no other field.
            # Line breaks and the field name are ASCII, so decoding the payload alone with
            # "replace" gives the same characters as decoding the whole event.
            return cls(raw, None, raw[6:-2].decode("utf-8", "replace"), True)
        kind, data = None, []
        for line in _LINE_BREAK.split(raw.decode("utf-8", "replace")):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            elif name == "event":
                kind = value
        return cls(raw, kind, "\n".join(data) if data else None)

    def with_data(self, payload: str) -> bytes:
        """These bytes with the data field set to ``payload`` (other fields kept, in order)."""
        if self.lone_data_line:
            return ("data: " + payload.replace("\n", "\ndata: ") + "\n\n").encode()
        lines: list[str] = []
        placed = False
        for line in _LINE_BREAK.split(self.raw.decode("utf-8", "replace")):
            if not line:
                continue
            if line.startswith("data:") or line == "data":
                if not placed:
                    lines.extend("data: " + part for part in payload.split("\n"))
                    placed = True
                continue
            lines.append(line)
        if not placed:
            lines.extend("data: " + part for part in payload.split("\n"))
        return ("\n".join(lines) + "\n\n").encode()


Delta = tuple[TextChannel, JsonPath, str]
"""A channel, where its delta text sits in the event's document, and that text."""


def decode_deltas(document: Any) -> list[Delta]:
    """Where an OpenAI streaming event carries delta text, and the text, per channel."""
    if not isinstance(document, dict):
        return []
    kind = document.get("type")
    if isinstance(kind, str) and kind.startswith("response.") and kind.endswith(".delta"):
        delta_text = document.get("delta")
        if isinstance(delta_text, str):
            return [(_responses_channel(document, kind[len("response."):-len(".delta")]), ("delta",), delta_text)]
        return []
    found: list[Delta] = []
    choices = document.get("choices")
    if not isinstance(choices, list):
        return found
    for position, choice in enumerate(choices):
        if not isinstance(choice, dict):
            continue
        index = _index(choice, position)
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for key in ("content", "refusal"):
                text = delta.get(key)
                if isinstance(text, str):
                    found.append((TextChannel(key, index), ("choices", position, "delta", key), text))
            calls = delta.get("tool_calls")
            for call_position, call in enumerate(calls if isinstance(calls, list) else ()):
                function = call.get("function") if isinstance(call, dict) else None
                arguments = function.get("arguments") if isinstance(function, dict) else None
                if isinstance(arguments, str):
                    path = ("choices", position, "delta", "tool_calls", call_position, "function", "arguments")
                    found.append((TextChannel("tool_arguments", index, _index(call, call_position)), path, arguments))
        else:
            text = choice.get("text")
            if isinstance(text, str):
                found.append((TextChannel("text", index), ("choices", position, "text"), text))
    return found


def ended_choices(document: Any) -> tuple[bool, set[tuple[str, int]] | set[int]]:
    """What an event ends: (True, _) for the whole response; else (False, the choice indexes
    that finish here, or for the Responses API the (kind, output index) that is done)."""
    if not isinstance(document, dict):
        return False, set()
    kind = document.get("type")
    if isinstance(kind, str) and kind.startswith("response."):
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            return True, set()
        if kind.endswith(".done"):
            return False, {(kind[len("response."):-len(".done")], _int(document.get("output_index")))}
        return False, set()
    choices = document.get("choices")
    finished: set[int] = set()
    for position, choice in enumerate(choices if isinstance(choices, list) else ()):
        if isinstance(choice, dict) and choice.get("finish_reason") is not None:
            finished.add(_index(choice, position))
    return False, finished


def _responses_channel(document: dict[str, Any], kind: str) -> TextChannel:
    return TextChannel(kind, _int(document.get("output_index")), _int(document.get("content_index")))


def _index(element: dict[str, Any], position: int) -> int:
    index = element.get("index")
    return index if isinstance(index, int) and not isinstance(index, bool) else position


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _set_path(document: Any, path: JsonPath, value: str) -> None:
    for key in path[:-1]:
        document = document[key]
    document[path[-1]] = value


# What json.dumps(document, ensure_ascii=False, separators=(",", ":")) builds on every call:
# built once, it saves about a microsecond of each rewritten event.
_COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _dump(document: Any) -> str:
    return _COMPACT_JSON.encode(document)


@dataclass(slots=True)
class _Template:
    """The last event that carried a channel's delta: what a flush event for it is made from."""

    event: RawEvent
    document: Any
    deltas: list[Delta]


class StreamEnded(Exception):
    """A plugin ended the stream: ``event`` is its last event."""

    def __init__(self, event: bytes):
        super().__init__("a plugin ended the stream")
        self.event = event


class ResponseStream:
    """One streamed response on its way through a chain's post_request plugins."""

    def __init__(
        self, chain: CompiledChain, exchange: Exchange, max_event_bytes: int, max_buffer_bytes: int, *, hide_usage: bool = False,
    ):
        self.chain = chain
        self.exchange = exchange
        self._hide_usage = hide_usage
        """The sidecar asked for usage the client did not: drop the usage chunk and the
        ``"usage": null`` of the other chunks."""
        self.sent_text = False
        """Whether text has left for the client yet (for time to first token)."""
        plan = chain.stream
        self._holdback = plan.holdback
        self._framer = EventFramer(max_event_bytes)
        self._pending: dict[TextChannel, str] = {}
        self._templates: dict[TextChannel, _Template] = {}
        self._whole_mode = bool(plan.at_end)
        self._whole: list[bytes] | None = [] if self._whole_mode else None
        self._whole_size = 0
        self._whole_limit = plan.limit_bytes or max_buffer_bytes
        self.rejection: Reject | None = None
        """Set once a plugin rejected: the stream was ended with its error event."""
        self.ended = False

    async def feed(self, chunk: bytes, end_of_stream: bool) -> bytes:
        """What to send the client for this chunk of the upstream's stream."""
        if self.ended:
            return b""
        out: list[bytes] = []
        try:
            for number, raw in enumerate(self._framer.feed(chunk), 1):
                out.extend(await self._event(RawEvent.parse(raw), final=False))
                if number % _EVENTS_PER_TURN == 0:
                    # A chunk Envoy gathered while the sidecar was busy can hold thousands of
                    # events: let other requests' work run between them.
                    await asyncio.sleep(0)
            if end_of_stream:
                rest = self._framer.rest()
                if rest.strip():
                    out.extend(await self._event(RawEvent.parse(rest), final=True))
                if self._pending:
                    # The upstream ended without [DONE] or a finish: judge what is held as final.
                    await self._judge(StreamEvent(None, None, pending=self._pending, final=True, ending=frozenset(self._pending)))
                out.extend(self._flush(self._pending))
                self.ended = True
            output = b"".join(out)
            if self._whole is not None:
                return await self._buffer_whole(output, end_of_stream)
            return output
        except StreamEnded as ended:
            self.ended = True
            return self._judged_before_the_end(out) + ended.event
        except StreamUnreadable as error:
            self.ended = True
            rejection = Reject(502, f"response stream ended by the gateway: {error}", code=error.code, type="server_error")
            self.rejection = rejection
            logger.error("%s; ending the stream with an error event", error, extra=self._log_context())
            return self._judged_before_the_end(out) + _error_event(rejection)

    def _judged_before_the_end(self, out: list[bytes]) -> bytes:
        """What earlier events of the chunk that ended the stream released: the client gets the
        same text before the error however the upstream's bytes were cut into chunks. Nothing
        when a WHOLE-mode member has not judged it."""
        return b"" if self._whole_mode else b"".join(out)

    async def _event(self, event: RawEvent, *, final: bool) -> list[bytes]:
        data = event.data
        if data is None:
            return [event.raw]  # a comment or a field without data: nothing to judge
        document = None
        if data != _DONE:
            try:
                document = parse_json(data)
            except BodyUninspectable as error:
                # Not text either: its escapes (or the reading a client's parser takes of a
                # duplicate key) would hide what it says from every plugin.
                raise StreamUnreadable(f"a stream event cannot be judged: {error}") from None
            except BodyNotJSON:
                document = None
        usage = usage_of(document)
        if usage is not None:
            self.exchange.usage = usage
        hidden_null = False
        if self._hide_usage and isinstance(document, dict) and "usage" in document:
            if is_usage_chunk(document):
                return []
            if document["usage"] is None:
                del document["usage"]
                hidden_null = True
        deltas = decode_deltas(document)
        ends_all, ended = ended_choices(document)
        ends_all = ends_all or final or data == _DONE
        pending = self._pending
        texts = {channel: text for channel, _, text in deltas}
        for channel, text in texts.items():
            pending[channel] = pending.get(channel, "") + text
        # Most events end nothing: no set of channels to build, no flush to make.
        if ends_all:
            ending = set(pending)
        elif ended:
            ending = {channel for channel in pending if _ends(channel, ended)}
        else:
            ending = set()
        stream_event = StreamEvent(
            type=event.type, data=data, document=document, deltas=texts, pending=pending,
            final=ends_all, ending=frozenset(ending) if ending else _NO_CHANNELS,
        )
        await self._judge(stream_event)
        out: list[bytes] = []
        if ending:
            ending &= pending.keys()
            # Text that an ending channel still holds goes out before the event that ends it.
            out.extend(self._flush({channel: pending.pop(channel) for channel in ending - texts.keys()}))
        if deltas:
            # The document was parsed for this event alone and plugins only read it: edit it.
            rewritten = hidden_null
            holds = stream_event.holds
            for channel, path, _ in deltas:
                keep = 0 if channel in ending else max(self._holdback, holds.get(channel, 0)) if holds else self._holdback
                release, held = _split(pending.pop(channel, ""), keep)
                if release != texts[channel]:
                    _set_path(document, path, release)
                    rewritten = True
                if release:
                    self.sent_text = True
                if held:
                    pending[channel] = held
            template = _Template(event, document, deltas)
            templates = self._templates
            for channel, _, _ in deltas:
                templates[channel] = template
            if len(templates) > MAX_CHANNELS:
                raise StreamTooLarge(f"the stream writes more than {MAX_CHANNELS} texts (choices, tool calls)")
            # An event that sends exactly the text it brought leaves as it came.
            out.append(event.with_data(_dump(document)) if rewritten else event.raw)
        elif stream_event.replacement is not None:
            out.append(event.with_data(stream_event.replacement))
        elif hidden_null:
            out.append(event.with_data(_dump(document)))
        else:
            out.append(event.raw)
        return out

    async def _judge(self, event: StreamEvent) -> None:
        """Run the EVENTS-mode plugins on ``event``; a reject ends the stream."""
        groups = self.chain.stream.per_event
        if not groups:
            return
        exchange = self.exchange
        exchange.event = event
        try:
            result = await self.chain.run_stage(Stage.POST_REQUEST, exchange, groups)
        finally:
            exchange.event = None
        if result.rejection is not None:
            self._rejected(result.rejection)
            raise StreamEnded(_error_event(result.rejection))

    def _flush(self, texts: dict[TextChannel, str]) -> list[bytes]:
        """Events that carry ``texts``, each made like the last event of its channel."""
        out = []
        for channel, text in list(texts.items()):
            template = self._templates.get(channel)
            if not text or template is None:
                continue
            document = copy.deepcopy(template.document)
            for other, path, _ in template.deltas:
                _set_path(document, path, text if other == channel else "")
            out.append(template.event.with_data(_dump(document)))
            self.sent_text = True
            texts.pop(channel, None)
        return out

    async def _buffer_whole(self, output: bytes, end_of_stream: bool) -> bytes:
        assert self._whole is not None
        self._whole.append(output)
        self._whole_size += len(output)
        if self._whole_size > self._whole_limit:
            self._whole = None
            raise StreamTooLarge(f"the stream exceeds the {self._whole_limit} bytes a plugin may hold back")
        if not end_of_stream:
            return b""
        response = self.exchange.response
        assert response is not None
        response.body = b"".join(self._whole)
        self._whole = None
        result = await self.chain.run_stage(Stage.POST_REQUEST, self.exchange, self.chain.stream.at_end)
        if result.rejection is not None:
            self._rejected(result.rejection)
            return _error_event(result.rejection)
        return response.body or b""

    def _rejected(self, rejection: Reject) -> None:
        self.rejection = rejection
        logger.warning(
            "plugin %s ended the response stream: %s", rejection.plugin_id or "(failure)", rejection.code,
            extra=self._log_context(),
        )

    def _log_context(self) -> dict[str, str]:
        return {"chain": self.chain.name, "request_id": self.exchange.request_id}


def _ends(channel: TextChannel, ended: set[Any]) -> bool:
    return channel.choice in ended or (channel.kind, channel.choice) in ended


def _split(text: str, keep: int) -> tuple[str, str]:
    """``text`` as (what may be sent now, the last ``keep`` characters held back)."""
    if keep <= 0:
        return text, ""
    if len(text) <= keep:
        return "", text
    return text[:-keep], text[-keep:]


def _error_event(rejection: Reject) -> bytes:
    """The last event of a stream a plugin ended: OpenAI's error shape, which the SDKs raise."""
    return b"data: " + rejection.body + b"\n\n"
