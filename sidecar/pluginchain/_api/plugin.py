"""The plugin API: what a plugin author subclasses, reads and raises.

This is the Python counterpart of the spec's Go interface::

    type Plugin interface {
        Name() string; Stage() string; Priority() int; SupportsParallel() bool
        Execute(ctx context.Context, data *PluginData) error
    }

``Plugin.name``, ``.stage``, ``.priority`` and ``.supports_parallel`` answer the first four;
``await plugin.execute(ctx, data)`` returns normally to let the request go on, raises
:class:`Reject` to answer the client instead, and raises anything else to fail (handled by the
plugin's ``on_error`` policy). Import everything from :mod:`pluginchain`.
"""

from __future__ import annotations

import enum
import json
import logging
import re
from abc import ABC, abstractmethod
from collections import ChainMap
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from pluginchain._api.stream import StreamEvent, StreamMode, TextChannel


class Stage(enum.StrEnum):
    """When a plugin runs."""

    PRE_REQUEST = "pre_request"
    """Before the request goes upstream; works on the request."""
    POST_REQUEST = "post_request"
    """On the upstream response; works on the response (and may read the request)."""
    ERROR = "error"
    """After a plugin failed or timed out, or the upstream answered 5xx."""


OnError = Literal["fail_closed", "fail_open"]


class PluginConfig(BaseModel):
    """Base of every plugin's config model: frozen, and unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class Needs:
    """What one configured plugin instance needs: the sidecar asks Envoy only for these bodies,
    and the engine runs an instance that never suspends inline (no timer, no task)."""

    request_body: bool = False
    response_body: bool = False
    suspends: bool = True
    """Whether ``execute`` may ``await``. False: the engine drives it to completion at once; a
    timeout cannot interrupt code that never yields anyway. A plugin that says False and then
    awaits fails (``on_error`` applies) and the log names it."""
    stream: StreamMode | None = None
    """How it treats a streamed response body: one of the class's ``streams``. None: the class's
    first of EVENTS, WHOLE. Only matters with ``response_body``."""
    holdback: int = 0
    """EVENTS mode: characters at the end of each channel's text to keep from the client until
    later events arrive (e.g. a pattern's longest match less one); ``PluginData.hold`` can ask
    for more at one event."""
    stream_limit_bytes: int | None = None
    """WHOLE mode: the most of a stream it may have buffered; past it the stream ends with an
    error event. None: the sidecar's body limit."""
    usage: bool = False
    """It needs the token usage the response reports (``Exchange.usage``): the sidecar then
    reads the response for it and asks a streamed completion to report it
    (``stream_options.include_usage``), hiding that extra event from a client that did not ask."""
    finish: bool = False
    """Call :meth:`Plugin.finish` once the exchange is over (e.g. to charge what it used)."""
    response_headers: bool = False
    """It sets headers on the client's response from ``pre_request`` (``set_response_header``)."""


def preferred_stream_mode(modes: frozenset[StreamMode]) -> StreamMode | None:
    """Per event when a plugin can, so the client gets tokens as they come."""
    for mode in (StreamMode.EVENTS, StreamMode.WHOLE):
        if mode in modes:
            return mode
    return None


@dataclass(frozen=True, slots=True)
class InstanceSettings:
    """Where and how one configured plugin instance runs: the chain entry minus its config."""

    id: str
    stage: Stage
    priority: int = 0
    parallel: bool = False
    timeout: float = 5.0
    on_error: OnError = "fail_closed"
    chain: str = "default"


class BodyNotJSON(ValueError):
    """The body is absent or not valid JSON."""


class BodyUninspectable(BodyNotJSON):
    """The body is JSON, or claims to be, but cannot be judged safely: two parsers may read it
    differently, or one reading of it would not be the one the upstream takes. A plugin that
    judges bodies must refuse it (or fail), never treat it as plain text; :attr:`code` names why."""

    code: ClassVar[str] = "uninspectable_body"
    """The error code a plugin that refuses such a body answers with."""


MAX_JSON_DEPTH = 128
"""The deepest nesting of arrays and objects a body may have to be decoded. No LLM request
comes near it; a body beyond it is not decoded at all, so that no plugin judges a document it
cannot fully walk while the upstream, whose parser may go deeper, reads all of it."""


class BodyTooDeep(BodyUninspectable):
    """The body is JSON nested deeper than :data:`MAX_JSON_DEPTH`. A plugin that judges bodies
    must refuse such a body (or fail), never treat it as plain text: the upstream may parse it."""


class BodyDuplicateKeys(BodyUninspectable):
    """A JSON object in the body names one key twice. Parsers disagree on which value counts
    (Python's the last, others the first, some refuse), so no plugin may judge one reading
    while the upstream takes another."""

    code: ClassVar[str] = "duplicate_json_keys"


class BodyNotUTF8(BodyUninspectable):
    """The body's bytes are not UTF-8 (the only encoding JSON allows between systems, RFC 8259),
    or its JSON escapes name a lone UTF-16 surrogate, which is no character. Readers differ on
    what such text says (an error, U+FFFD, a guessed encoding), so it is never judged."""

    code: ClassVar[str] = "invalid_utf8"


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BodyDuplicateKeys(f"body is JSON with a duplicate key {key[:100]!r} in one object")
            seen.add(key)
    return document


# object_pairs_hook costs about 1.5 times a plain json.loads on a 2-20 KB chat body (bench
# numbers in the content_filter section of bench/README.md), the price of one reading only.
_STRICT_JSON = json.JSONDecoder(object_pairs_hook=_unique_keys)

# \ud800-\udfff escapes, to look for lone surrogates only in bodies that have any.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes | str) -> Any:
    """JSON as every plugin gets it from :meth:`HttpMessage.json`, read strictly so that the
    sidecar never judges one reading of a body while an upstream takes another.

    Raises :class:`BodyNotJSON` when ``raw`` is not valid JSON (trailing bytes included), and one
    of the :class:`BodyUninspectable` kinds when it is JSON that must not be judged:
    :class:`BodyNotUTF8` (bytes not strict UTF-8, never guessed as UTF-16/32 nor read with
    U+FFFD; a lone surrogate escape), :class:`BodyDuplicateKeys` (an object names a key twice,
    at any depth) and :class:`BodyTooDeep`. A leading UTF-8 byte order mark is skipped."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BodyNotUTF8(f"body is not valid UTF-8: byte {error.start} is 0x{raw[error.start]:02x}") from None
        if text.startswith("\ufeff"):
            text = text[1:]
    else:
        text = raw
    too_deep = f"body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels"
    try:
        document = _STRICT_JSON.decode(text)
    except RecursionError:
        raise BodyTooDeep(too_deep) from None
    except BodyNotJSON:
        raise
    except ValueError as error:
        raise BodyNotJSON(f"body is not valid JSON: {error}") from None
    # Fewer brackets than the limit cannot nest deeper than it: the usual case costs two counts.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _nests_deeper_than(document, MAX_JSON_DEPTH):
        raise BodyTooDeep(too_deep)
    if _SURROGATE_ESCAPE.search(text) is not None and _has_lone_surrogate(document):
        raise BodyNotUTF8("body is JSON whose \\u escapes name a lone UTF-16 surrogate, which is no character")
    return document


def _has_lone_surrogate(document: Any) -> bool:
    # Escaped surrogate pairs (emoji from clients that escape all non-ASCII) decode to one
    # character; only an unpaired one is left as a surrogate, which UTF-8 cannot encode.
    pending = [document]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def _nests_deeper_than(document: Any, limit: int) -> bool:
    # Level by level, each container once, no recursion: the check must not be what overflows.
    level = [document]
    for _ in range(limit):
        deeper: list[Any] = []
        for value in level:
            children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
            deeper.extend(child for child in children if isinstance(child, (dict, list)))
        if not deeper:
            return False
        level = deeper
    return True


FRAMING_HEADERS = frozenset({
    "content-length", "transfer-encoding", "host",
    # Connection-specific (hop-by-hop) headers: HTTP/2 forbids them, HTTP/1.1 frames with them.
    "connection", "keep-alive", "proxy-connection", "te", "upgrade",
})
"""Headers no plugin may set or remove, besides every pseudo-header (``:path``, ``:method``,
``:authority``, ``:scheme``, ``:status``...) and every ``x-envoy-*`` header: they say where a
message goes and where it ends, which is the proxy's to decide. A plugin that changes the body
leaves ``content-length`` to the sidecar, which sets it to the new body's length."""

_HEADER_NAME_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


def checked_header(name: str, value: str | None = None, *, action: str = "set") -> str:
    """``name`` in lower case, if a plugin may ``action`` (set or remove) it with ``value``;
    raises ValueError naming the header otherwise, so that the attempt is a plugin failure."""
    lowered = name.lower()
    if lowered in FRAMING_HEADERS or lowered.startswith((":", "x-envoy-")):
        raise ValueError(
            f"cannot {action} header {lowered!r}: framing and routing headers belong to the proxy "
            "(content-length, transfer-encoding, host, connection headers, pseudo-headers such as :path, x-envoy-*)"
        )
    if not lowered or not _HEADER_NAME_CHARS.issuperset(lowered):
        raise ValueError(f"cannot {action} header {name!r}: not a valid HTTP header name")
    if value is not None and ("\r" in value or "\n" in value or "\0" in value):
        raise ValueError(f"cannot {action} header {lowered!r}: its value contains a line break or NUL")
    return lowered


class HttpMessage:
    """Headers and body of one request or response, plus what the chain changed on it.

    Header names are lower case (as HTTP/2 and Envoy carry them). ``body`` is ``None`` when the
    chain did not need it and Envoy did not send it. The changes are what the sidecar turns into
    Envoy header and body mutations; :func:`checked_header` guards the header changes.
    """

    __slots__ = ("headers", "_body", "set_headers", "removed_headers", "body_replaced", "body_replaceable", "_json")

    _UNPARSED: ClassVar[object] = object()

    def __init__(self, headers: Mapping[str, str] | None = None, body: bytes | None = None):
        self.headers: dict[str, str] = {k.lower(): v for k, v in (headers or {}).items()}
        self._body = body
        self.set_headers: dict[str, str] = {}
        self.removed_headers: set[str] = set()
        self.body_replaced = False
        self.body_replaceable = body is not None
        """Whether a body mutation can still reach Envoy: the body came in the phase being
        answered. False without a body, for a message whose headers ended it (the sidecar sets
        that), and once the sidecar answered the phase (say, the request in ``post_request``)."""
        self._json: Any = self._UNPARSED

    @classmethod
    def of_lowercase_headers(cls, headers: dict[str, str]) -> HttpMessage:
        """A message that takes ``headers`` as they are, names already lower case (the sidecar's
        own dict, built from Envoy's headers): no second pass over them per request."""
        message = cls()
        message.headers = headers
        return message

    @property
    def body(self) -> bytes | None:
        return self._body

    @body.setter
    def body(self, body: bytes | None) -> None:
        """A body as it arrived (from Envoy): judged on its own bytes, never on an earlier body's
        parsed JSON."""
        self._body = body
        self._json = self._UNPARSED
        self.body_replaceable = body is not None

    def json(self) -> Any:
        """The body decoded as JSON, parsed once per body and shared by every plugin.

        Treat the result as read-only: parallel plugins see the same object. To change the body,
        build a new value and call :meth:`PluginData.set_json`.
        """
        if self._json is self._UNPARSED:
            if self._body is None:
                raise BodyNotJSON("no body was received")
            self._json = parse_json(self._body)
        return self._json

    def set_header(self, name: str, value: str) -> None:
        name = checked_header(name, value)
        self.headers[name] = value
        self.set_headers[name] = value
        self.removed_headers.discard(name)

    def remove_header(self, name: str) -> None:
        name = checked_header(name, action="remove")
        self.headers.pop(name, None)
        self.set_headers.pop(name, None)
        self.removed_headers.add(name)

    def check_body_replaceable(self, which: str) -> None:
        """Raise ValueError unless a new body can reach Envoy (see ``body_replaceable``)."""
        if self.body_replaceable:
            return
        if self._body is None:
            reason = "the chain did not ask Envoy for it (no plugin of the chain reads that body: reads_body, Needs)"
        else:
            reason = "no body phase is open for it (the headers ended the message, or the phase that carried it is answered)"
        raise ValueError(f"cannot replace the {which} body: {reason}")

    def replace_body(self, body: bytes, parsed_json: Any = _UNPARSED) -> None:
        self.check_body_replaceable("message")
        self._body = body
        self.body_replaced = True
        self._json = parsed_json


@dataclass(frozen=True, slots=True)
class Failure:
    """A plugin that raised or timed out, or an upstream 5xx; what the error stage sees."""

    plugin_id: str
    stage: Stage
    kind: Literal["exception", "timeout", "upstream"]
    message: str
    fail_open: bool = False


class Reject(Exception):
    """Raise from ``execute`` to stop the chain and answer the client instead of the upstream.

    The client receives ``status`` with an OpenAI-style JSON error body
    ``{"error": {"message", "type", "code"}}`` (so LLM SDKs surface it) unless ``body`` is given.
    ``headers`` may not hold framing headers (:data:`FRAMING_HEADERS`, pseudo-headers,
    ``x-envoy-*``): the proxy frames the response; such a header raises ValueError.
    """

    _TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
    }

    def __init__(
        self,
        status: int = 403,
        message: str = "request rejected",
        *,
        code: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ):
        super().__init__(message)
        if not 200 <= status <= 599:
            raise ValueError(f"reject status must be an HTTP status 200..599, got {status}")
        self.status = status
        self.message = message
        self.code = code
        self.type = type or self._TYPES.get(status, "server_error" if status >= 500 else "rejected")
        self.headers: dict[str, str] = {checked_header(k, v): v for k, v in (headers or {}).items()}
        self._body = body
        self.plugin_id: str | None = None
        """Set by the engine: the plugin instance that rejected."""

    @property
    def body(self) -> bytes:
        if self._body is not None:
            return self._body
        error = {"message": self.message, "type": self.type, "code": self.code}
        return json.dumps({"error": error}).encode()

    def response_headers(self) -> dict[str, str]:
        """Headers of the client response, content-type included."""
        headers = dict(self.headers)
        if self._body is None:
            headers.setdefault("content-type", "application/json")
        return headers

    def __repr__(self) -> str:
        return f"Reject(status={self.status}, message={self.message!r}, code={self.code!r})"


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one response reports it used (OpenAI's ``usage``: chat completions'
    ``prompt_tokens``/``completion_tokens``, the Responses API's ``input_tokens``/``output_tokens``)."""

    input_tokens: int
    output_tokens: int
    total_tokens: int
    model: str | None = None
    """The model that answered, as the response names it."""


@dataclass(slots=True)
class Exchange:
    """Everything the chain knows about one HTTP request/response pair, across all stages."""

    request: HttpMessage = field(default_factory=HttpMessage)
    response: HttpMessage | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    client_address: str | None = None
    request_id: str = ""
    event: StreamEvent | None = None
    """While a streamed response passes: the event the post_request plugins are judging."""
    usage: Usage | None = None
    """The response's token usage, once it reported it: for every later plugin and stage, and
    for ``finish``. None until then (or when it never did)."""
    consumer: str | None = None
    """Who is calling, as an authentication plugin established it (``set_consumer``); None
    before, or without one."""
    session: str | None = None
    """The conversation the request belongs to, as a session plugin established it."""
    started_at: float = 0.0
    """``time.monotonic()`` when the request reached the sidecar."""
    rejection: Reject | None = None
    """What the client got instead of the upstream's answer (a plugin's reject, with its
    ``plugin_id``; or a failure's error response, without one), once it got it; None otherwise."""
    response_headers: dict[str, str] = field(default_factory=dict)
    """Headers pre_request plugins set for the client's response (``set_response_header``)."""


class PluginContext:
    """Request-scoped environment of one plugin execution (the Go ``ctx``).

    Cancellation needs no field: a cancelled or timed-out plugin gets ``asyncio.CancelledError``
    at its next ``await``.
    """

    __slots__ = ("chain", "request_id", "plugin_id", "deadline", "consumer", "session", "_logger")

    _base_logger: ClassVar[logging.Logger] = logging.getLogger("pluginchain.plugin")

    def __init__(
        self, chain: str, request_id: str, plugin_id: str, deadline: float,
        consumer: str | None = None, session: str | None = None,
    ):
        self.chain = chain
        self.request_id = request_id
        self.plugin_id = plugin_id
        self.deadline = deadline
        """``loop.time()`` by which the plugin is cancelled."""
        self.consumer = consumer
        """The caller an earlier plugin authenticated (``Exchange.consumer``), or None."""
        self.session = session
        """The conversation an earlier plugin established (``Exchange.session``), or None."""
        self._logger: logging.LoggerAdapter[logging.Logger] | None = None

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """Logs with the chain, request id and plugin id attached; never log secrets or bodies."""
        if self._logger is None:
            extra = {"chain": self.chain, "request_id": self.request_id, "plugin": self.plugin_id}
            self._logger = logging.LoggerAdapter(self._base_logger, extra)
        return self._logger


class PluginData:
    """One plugin's view of the exchange, and the changes it asks for.

    Reads see the exchange as it was when the plugin's group started (parallel members share
    that snapshot) plus this plugin's own changes. Changes are applied to the exchange when the
    plugin finishes (sequential) or after its group, in declaration order (parallel), so the
    result never depends on timing. A rejected or failed plugin's changes are dropped.
    """

    __slots__ = (
        "stage", "exchange", "metadata", "error", "_target",
        "_set_headers", "_removed_headers", "_body", "_json", "_texts", "_holds", "_event_data", "_response_headers", "_identity",
    )

    def __init__(self, stage: Stage, exchange: Exchange, error: Failure | None = None):
        self.stage = stage
        self.exchange = exchange
        self.metadata: MutableMapping[str, Any] = ChainMap({}, exchange.metadata)
        """Per-request values shared with later plugins and stages; writes land after the plugin."""
        self.error = error
        """In the error stage: what failed."""
        target = exchange.response if stage is Stage.POST_REQUEST else exchange.request
        self._target: HttpMessage = target if target is not None else HttpMessage()
        self._set_headers: dict[str, str] = {}
        self._removed_headers: set[str] = set()
        self._body: bytes | None = None
        self._json: Any = HttpMessage._UNPARSED
        self._texts: dict[TextChannel, str] = {}
        self._holds: dict[TextChannel, int] = {}
        self._event_data: str | None = None
        self._response_headers: dict[str, str] = {}
        self._identity: dict[str, str] = {}

    @property
    def request(self) -> HttpMessage:
        return self.exchange.request

    @property
    def response(self) -> HttpMessage | None:
        return self.exchange.response

    @property
    def client_address(self) -> str | None:
        return self.exchange.client_address

    # The message this stage works on: the request in pre_request, the response in post_request.

    @property
    def headers(self) -> Mapping[str, str]:
        if not self._set_headers and not self._removed_headers:
            return self._target.headers
        merged = {k: v for k, v in self._target.headers.items() if k not in self._removed_headers}
        merged.update(self._set_headers)
        return merged

    @property
    def body(self) -> bytes | None:
        return self._body if self._body is not None else self._target.body

    def json(self) -> Any:
        """The body as JSON (parsed once per body); raises :class:`BodyNotJSON`."""
        if self._body is None:
            return self._target.json()
        if self._json is HttpMessage._UNPARSED:
            self._json = parse_json(self._body)
        return self._json

    def set_header(self, name: str, value: str) -> None:
        """Set a header of the stage's message. Framing headers (:data:`FRAMING_HEADERS`,
        pseudo-headers such as ``:path``, ``x-envoy-*``) raise ValueError: a plugin failure."""
        name = checked_header(name, value)
        self._removed_headers.discard(name)
        self._set_headers[name] = value

    def remove_header(self, name: str) -> None:
        """Remove a header of the stage's message; framing headers raise as in :meth:`set_header`."""
        name = checked_header(name, action="remove")
        self._set_headers.pop(name, None)
        self._removed_headers.add(name)

    def set_body(self, body: bytes) -> None:
        """Replace the body of the stage's message (the sidecar sets ``content-length``). Raises
        ValueError when that message came without a body, which no mutation could reach."""
        self._check_body_replaceable()
        self._body = body
        self._json = HttpMessage._UNPARSED

    def set_json(self, value: Any) -> None:
        """Replace the body with ``value`` encoded as compact JSON; raises as :meth:`set_body`."""
        self._check_body_replaceable()
        self._body = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
        self._json = value

    def _check_body_replaceable(self) -> None:
        if self.stage is Stage.POST_REQUEST:
            if self.exchange.event is not None:
                raise ValueError("cannot replace the response body of a stream judged event by event: use set_text() or replace_event()")
            self._target.check_body_replaceable("response")
        else:
            self._target.check_body_replaceable("request")

    # A streamed response, in EVENTS mode (see pluginchain._api.stream).

    @property
    def event(self) -> StreamEvent | None:
        """The server-sent event being judged, in EVENTS mode; None otherwise."""
        return self.exchange.event

    @property
    def texts(self) -> Mapping[TextChannel, str]:
        """Per channel of this stream, the text not yet sent to the client, this event's delta
        included, with this plugin's own rewrites. Empty outside EVENTS mode."""
        event = self.exchange.event
        if event is None:
            return {}
        if not self._texts:
            return event.pending
        return {**event.pending, **self._texts}

    def set_text(self, channel: TextChannel, text: str) -> None:
        """Rewrite the not-yet-sent text of ``channel`` (e.g. to redact); what was sent is sent."""
        event = self.exchange.event
        if event is None or channel not in event.pending:
            raise ValueError(f"no text pending on {channel} at this point of the stream")
        self._texts[channel] = text

    @property
    def consumer(self) -> str | None:
        """Who is calling (``Exchange.consumer``), this plugin's own ``set_consumer`` included."""
        return self._identity.get("consumer", self.exchange.consumer)

    @property
    def session(self) -> str | None:
        """The conversation (``Exchange.session``), this plugin's own ``set_session`` included."""
        return self._identity.get("session", self.exchange.session)

    def set_consumer(self, consumer: str) -> None:
        """Establish who is calling, for every later plugin and stage (an authentication plugin)."""
        self._identity["consumer"] = consumer

    def set_session(self, session: str) -> None:
        """Establish the conversation the request belongs to, for every later plugin and stage."""
        self._identity["session"] = session

    def set_response_header(self, name: str, value: str) -> None:
        """From ``pre_request`` (with ``Needs(response_headers=True)``): a header for the client's
        response, whatever the upstream answers. Applied with the plugin's other changes.
        Framing headers raise as in :meth:`set_header`."""
        self._response_headers[checked_header(name, value)] = value

    def replace_event(self, data: str) -> None:
        """Replace the data field of the event being judged (JSON text, say), for an event that
        carries no delta text; the text of those goes through ``set_text``."""
        event = self.exchange.event
        if event is None or event.deltas:
            raise ValueError("replace_event() is for stream events without delta text; use set_text()")
        self._event_data = data

    def hold(self, channel: TextChannel, chars: int) -> None:
        """Keep the last ``chars`` characters of ``channel``'s pending text from the client at
        this event, beyond the plugin's ``Needs.holdback``. Ignored at the final event."""
        self._holds[channel] = max(chars, self._holds.get(channel, 0))

    def apply(self) -> None:
        """Write this plugin's changes into the exchange (called by the engine)."""
        target = self._target
        for name in self._removed_headers:
            target.remove_header(name)
        for name, value in self._set_headers.items():
            target.set_header(name, value)
        if self._body is not None:
            target.replace_body(self._body, self._json)
        if self._response_headers:
            self.exchange.response_headers.update(self._response_headers)
        if self._identity:
            self.exchange.consumer = self._identity.get("consumer", self.exchange.consumer)
            self.exchange.session = self._identity.get("session", self.exchange.session)
        own_metadata = self.metadata.maps[0]  # type: ignore[attr-defined]
        if own_metadata:
            self.exchange.metadata.update(own_metadata)
        event = self.exchange.event
        if event is not None:
            event.pending.update(self._texts)
            if self._event_data is not None:
                event.replacement = self._event_data
            for channel, chars in self._holds.items():
                event.holds[channel] = max(chars, event.holds.get(channel, 0))


class Plugin(ABC):
    """Base class of every plugin, built-in or custom.

    A subclass declares what it is and may do as class attributes, all checked when the class is
    registered (a malformed class is refused with the reason before the registry changes):

    - ``name``: the registry name chain entries use (a lower-case identifier);
    - ``Config``: a :class:`PluginConfig` subclass (unknown fields forbidden);
    - ``stages``: the stages it can run in (a chain entry in another stage is a config error);
    - ``supports_parallel``: whether it may be configured with ``parallel: true``;
    - ``reads_body``: whether it reads bodies at all (by default, the body of the message its
      stage works on: the request in ``pre_request``, the response in ``post_request``);
    - ``suspends``: whether ``execute`` may ``await`` (False for pure computation, which the
      engine then runs inline);
    - ``streams``: how it can treat a streamed response when it reads response bodies
      (:class:`StreamMode`: per event, or the whole stream at its end; the default, WHOLE, is
      always correct but holds the stream back). Empty: it cannot judge streams, and a chain
      entry that would make it read one in ``post_request`` is refused.

    What one configured instance needs within those declarations is :meth:`needs`, the one hook
    for needs that depend on config (say, a plugin that reads the body only when configured to).
    It may ask for less than the class declares, never more; the plan refuses an instance that
    does.

    An instance is built once per compiled plan, never per request; keep per-request state in
    ``data``, not on ``self``. ``aclose`` runs when the plan is replaced.
    """

    name: ClassVar[str]
    Config: ClassVar[type[PluginConfig]] = PluginConfig
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.PRE_REQUEST})
    supports_parallel: ClassVar[bool] = False
    reads_body: ClassVar[bool] = False
    suspends: ClassVar[bool] = True
    streams: ClassVar[frozenset[StreamMode]] = frozenset({StreamMode.WHOLE})

    def __init__(self, config: PluginConfig, settings: InstanceSettings):
        self.config = config
        self.settings = settings

    @property
    def id(self) -> str:
        return self.settings.id

    @property
    def stage(self) -> Stage:
        return self.settings.stage

    @property
    def priority(self) -> int:
        return self.settings.priority

    def needs(self) -> Needs:
        """What this instance needs, given its stage and config; override to narrow it per config.

        The default follows the class declarations: the body of the stage's own message when
        ``reads_body`` (none in the ``error`` stage), and ``suspends``.
        """
        reads = self.reads_body
        response_body = reads and self.stage is Stage.POST_REQUEST
        return Needs(
            request_body=reads and self.stage is Stage.PRE_REQUEST,
            response_body=response_body,
            suspends=self.suspends,
            stream=preferred_stream_mode(self.streams) if response_body else None,
        )

    @abstractmethod
    async def execute(self, ctx: PluginContext, data: PluginData) -> None:
        """Run on one request: return to continue, raise :class:`Reject` to answer the client."""

    async def finish(self, ctx: PluginContext, data: PluginData) -> None:
        """With ``Needs(finish=True)``: called once the exchange is over, however it ended (the
        response passed, a plugin rejected, the client went away), in the plugin's own stage.
        ``data.exchange.usage`` holds the tokens used when the response reported them. Runs
        after the client has its answer: it can change nothing of it, and a failure is logged."""

    async def aclose(self) -> None:
        """Release connections and other resources when the plan is replaced."""
