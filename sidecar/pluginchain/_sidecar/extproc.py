"""Envoy's ext_proc protocol on one side, the chain engine on the other.

Envoy opens one ``Process`` stream per HTTP request and sends the phases its processing mode
asks for; we answer each with mutations or an ImmediateResponse. The first answer (to the request
headers) carries a ``mode_override`` so Envoy sends bodies and response phases only when the
selected chain needs them (the filter runs with ``allow_mode_override: true``).

Each stream follows that order and nothing else: a phase that comes twice, out of order, or that
the mode did not ask for (what a confused or hostile client of the gRPC port might send) ends the
stream with a gRPC error (FAILED_PRECONDITION, or INVALID_ARGUMENT for a malformed message) and
one log line; it is never judged, so never answered "continue". Each body is judged on its own
bytes. The framing of what goes on (``content-length`` after a body is replaced, none on a
streamed response) is set here, never by plugins.

The sidecar ends each stream itself, cleanly (status OK), right after its answer to the last
phase the chain asked for: once the outcome is sealed, no later message could change it, and
Envoy takes an OK close as "go on without the processor". Left open, Envoy would end the stream
by resetting it, and grpcio keeps about 120 bytes of native memory for every stream that ends
by cancellation (a server-ended one costs a few bytes), a straight line up under steady load.

Streams are capped (``max_streams``): one beyond the cap is refused at once with
RESOURCE_EXHAUSTED, never queued, and the streams within the cap go on as if it never came.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import (
    ProcessingMode as _Mode,
)
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from pluginchain._api.plugin import BodyNotJSON, Exchange, Failure, HttpMessage, Reject, Stage, Usage
from pluginchain._config.defaults import DEFAULTS
from pluginchain._config.models import CHAIN_METADATA_KEY, DEFAULT_CHAIN
from pluginchain._engine.plan import CompiledChain, Group, Plan
from pluginchain._engine.streaming import ResponseStream
from pluginchain._engine.usage import ask_for_stream_usage, usage_of, usage_of_body
from pluginchain._metrics import ERROR_CODES, MODELS, REQUESTS, TIME_TO_FIRST_TOKEN, TOKENS, UPSTREAM_LATENCY
from pluginchain._sidecar.plans import PlanHolder
from pluginchain.plugins._content_coding import UnreadableBody, inflate_off_loop, readable_accept_encoding

logger = logging.getLogger("pluginchain.extproc")

UNKNOWN_CHAIN_LABEL = "unknown"
"""The ``chain`` label of requests for a chain the plan does not have: the names they ask for are
unbounded (a misrouted Envoy, a client of the gRPC port), the metric's series must not be."""
SOURCE_ADDRESS_ATTRIBUTE = "source.address"
EXT_PROC_ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"


_CONTINUE_RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse())


class ProtocolViolation(Exception):
    """A message the stream's state does not allow; the stream ends with ``code`` and this text."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class _Expecting:
    """The phases a stream may receive next, and how to say where it stands."""

    kinds: frozenset[str]
    state: str


_REQUEST_HEADERS = _Expecting(frozenset({"request_headers"}), "a stream starts with the request headers")
_REQUEST_BODY = _Expecting(
    # Response headers come instead when Envoy answered the request itself before its body came.
    frozenset({"request_body", "response_headers"}), "the request body is awaited",
)
_REQUEST_BODY_NO_RESPONSE = _Expecting(frozenset({"request_body"}), "the request body is awaited")
_RESPONSE_HEADERS = _Expecting(frozenset({"response_headers"}), "the request was answered; the response headers are awaited")
_RESPONSE_BODY = _Expecting(frozenset({"response_body"}), "the response body is awaited")
_NOTHING = _Expecting(frozenset(), "the exchange is over: nothing more was asked for")


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-request limits; the gRPC message size limits are derived from ``max_body_bytes``."""

    max_body_bytes: int = DEFAULTS.max_body_bytes
    """Largest request or response body the chain accepts (default 4 MiB); larger gets 413."""

    @property
    def grpc_message_bytes(self) -> int:
        # Room for the headers and protobuf framing around a body at the limit.
        return self.max_body_bytes + 256 * 1024


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    """The ``envoy.service.ext_proc.v3.ExternalProcessor`` service."""

    def __init__(
        self,
        plans: PlanHolder,
        limits: Limits = Limits(),
        max_streams: int = DEFAULTS.max_streams,
        clock: Callable[[], float] = time.monotonic,
    ):
        """``max_streams``: concurrent streams served; more are refused (RESOURCE_EXHAUSTED).
        ``clock``: monotonic seconds, which space the refusals' log lines."""
        self._plans = plans
        self._limits = limits
        self._max_streams = max_streams
        self._open_streams = 0
        self._refusals = _SpacedLog(clock)
        self._answers: weakref.WeakKeyDictionary[CompiledChain, _ChainAnswers] = weakref.WeakKeyDictionary()
        self._counters: dict[tuple[str, str, str, str], Any] = {}
        self._finishing: set[asyncio.Task[None]] = set()

    @property
    def open_streams(self) -> int:
        """Streams being served now."""
        return self._open_streams

    async def Process(self, request_iterator, context: grpc.aio.ServicerContext):
        if self._open_streams >= self._max_streams:
            self._refusals.record(self._max_streams)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the sidecar serves at most {self._max_streams} streams at once")
        self._open_streams += 1
        try:
            chain_name = _chain_name(context)
            plan = self._plans.take()
            try:
                chain = plan.get(chain_name)
                stream: _Stream | _UnknownChainStream
                if chain is None:
                    stream = _UnknownChainStream(chain_name)
                else:
                    stream = _Stream(chain, chain_name, self._answers_for(chain), self._limits)
                try:
                    async for request in request_iterator:
                        yield await stream.answer(request)
                        if stream.expecting is _NOTHING:
                            # The last phase the chain asked for is answered: end the stream here,
                            # cleanly, before Envoy resets it (see the module's docstring).
                            return
                except ProtocolViolation as violation:
                    stream.outcome = "error"
                    logger.warning(
                        "ext_proc stream refused with %s: %s", violation.code.name, violation,
                        extra={"chain": chain_name, "request_id": stream.exchange.request_id},
                    )
                    await context.abort(violation.code, str(violation))
                except BaseException:
                    # Envoy may reset a stream once it has every answer it needs; only a stream cut
                    # before its decision is a cancelled request.
                    if not stream.decided:
                        stream.outcome = "cancelled"
                    raise
                finally:
                    rejection = stream.exchange.rejection
                    code = ERROR_CODES(rejection.code if rejection is not None else None)
                    self._request_counter(stream.chain_label, stream.outcome, stream.status_class, code).inc()
                    if isinstance(stream, _Stream):
                        self._after(plan, stream.chain, stream)
            finally:
                self._plans.give_back(plan)
        finally:
            self._open_streams -= 1

    def _request_counter(self, chain_name: str, outcome: str, status_class: str, code: str):
        # Bound once per label set: a labels() lookup takes a lock on every request.
        key = (chain_name, outcome, status_class, code)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = REQUESTS.labels(*key)
        return counter

    def _after(self, plan: Plan, chain: CompiledChain, stream: _Stream) -> None:
        """What follows an exchange: its token metrics, and its members' ``finish`` hooks, in a
        task of their own (the stream may have been cancelled) that keeps the plan open."""
        usage = stream.exchange.usage
        if usage is not None:
            model = MODELS(usage.model)
            TOKENS.labels(chain.name, model, "input").observe(usage.input_tokens)
            TOKENS.labels(chain.name, model, "output").observe(usage.output_tokens)
        if not chain.finishers or not stream.started:
            return
        self._plans.take(plan)

        async def finish() -> None:
            try:
                await chain.finish(stream.exchange)
            finally:
                self._plans.give_back(plan)

        task = asyncio.get_running_loop().create_task(finish())
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def aclose(self) -> None:
        """Wait for the ``finish`` hooks still running (each is bounded by its plugin's timeout)."""
        if self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)

    def _answers_for(self, chain: CompiledChain) -> _ChainAnswers:
        answers = self._answers.get(chain)
        if answers is None:
            answers = self._answers[chain] = _ChainAnswers.of(chain)
        return answers


@dataclass(frozen=True, slots=True)
class _ChainAnswers:
    """What every stream of one chain sends the same way, built once per chain (as the bare
    processor builds its answers once): building a message with a ``mode_override`` copies it."""

    mode: _Mode
    """The processing mode the chain needs (its first answer's ``mode_override``)."""
    streamed_mode: _Mode | None
    """The override that switches a streamed response's body to STREAMED; None without a
    post_request plugin reading the response body."""
    request_headers_unchanged: pb.ProcessingResponse
    """The answer to the request headers when the chain changed nothing (or has yet to run, on
    the body): CONTINUE with the mode."""

    @classmethod
    def of(cls, chain: CompiledChain) -> _ChainAnswers:
        phases = chain.phases
        mode = _Mode(
            request_header_mode=_Mode.SEND,
            request_body_mode=_Mode.BUFFERED if phases.request_body else _Mode.NONE,
            response_header_mode=_Mode.SEND if phases.response_headers else _Mode.SKIP,
            response_body_mode=_Mode.BUFFERED if phases.response_body else _Mode.NONE,
            request_trailer_mode=_Mode.SKIP,
            response_trailer_mode=_Mode.SKIP,
        )
        streamed_mode = None
        if phases.response_body:
            streamed_mode = _Mode()
            streamed_mode.CopyFrom(mode)
            streamed_mode.response_body_mode = _Mode.STREAMED
        unchanged = pb.ProcessingResponse(request_headers=pb.HeadersResponse(), mode_override=mode)
        return cls(mode, streamed_mode, unchanged)


class _Exchanging:
    """What every stream keeps: the exchange, how it ended, and the phases it may receive next."""

    __slots__ = ("chain_name", "chain_label", "exchange", "outcome", "decided", "started", "status_class", "expecting")

    def __init__(self, chain_name: str, chain_label: str):
        self.chain_name = chain_name
        self.chain_label = chain_label
        """The ``chain`` label of its metrics: the chain's name, or ``unknown``."""
        self.exchange = Exchange()
        self.outcome = "allow"
        self.decided = False
        """Whether the request's fate is sealed: rejected, or through every stage it runs."""
        self.started = 0.0
        """perf_counter() when the request headers arrived: 0 until then."""
        self.status_class = "none"
        """The response's status class (2xx...) as the client gets it; none without a response."""
        self.expecting = _REQUEST_HEADERS

    def _check_phase(self, kind: str | None) -> None:
        if kind not in self.expecting.kinds:
            if kind is None:
                raise ProtocolViolation(grpc.StatusCode.INVALID_ARGUMENT, "ext_proc message carries no phase")
            raise ProtocolViolation(grpc.StatusCode.FAILED_PRECONDITION, f"unexpected {kind}: {self.expecting.state}")

    def _receive_request_headers(self, request: pb.ProcessingRequest) -> pb.HttpHeaders:
        headers = request.request_headers
        exchange = self.exchange
        self.started = time.perf_counter()
        exchange.started_at = time.monotonic()
        exchange.request = HttpMessage.of_lowercase_headers(_header_dict(headers.headers))
        exchange.request_id = exchange.request.headers.get("x-request-id", "")
        exchange.client_address = _client_address(request)
        return headers

    def _immediate(self, rejection: Reject) -> pb.ProcessingResponse:
        self.decided = True
        self.expecting = _NOTHING
        self.exchange.rejection = rejection
        self.status_class = f"{rejection.status // 100}xx"
        headers = pb.HeaderMutation(set_headers=[_header_option(k, v) for k, v in rejection.response_headers().items()])
        immediate = pb.ImmediateResponse(
            status={"code": rejection.status},
            headers=headers,
            body=rejection.body,
            details=f"pluginchain_{rejection.code or 'rejected'}",
        )
        return pb.ProcessingResponse(immediate_response=immediate)


class _UnknownChainStream(_Exchanging):
    """A request for a chain the serving plan does not have: a 500 at its headers, nothing after."""

    __slots__ = ()

    def __init__(self, chain_name: str):
        super().__init__(chain_name, UNKNOWN_CHAIN_LABEL)

    async def answer(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse:
        self._check_phase(request.WhichOneof("request"))
        self._receive_request_headers(request)
        logger.error(
            "no chain named %r in the serving plan; answering 500", self.chain_name,
            extra={"chain": self.chain_name, "request_id": self.exchange.request_id},
        )
        self.outcome = "error"
        message = f"gateway misconfigured: unknown plugin chain {self.chain_name!r}"
        return self._immediate(Reject(500, message, code="unknown_chain", type="server_error"))


class _Stream(_Exchanging):
    """The state of one HTTP request's exchange with Envoy, for a chain of the serving plan."""

    __slots__ = ("chain", "answers", "limits", "response_stream", "sent_upstream", "hide_usage")

    def __init__(self, chain: CompiledChain, chain_name: str, answers: _ChainAnswers, limits: Limits):
        super().__init__(chain_name, chain_name)
        self.chain = chain
        self.answers = answers
        self.limits = limits
        self.response_stream: ResponseStream | None = None
        self.sent_upstream = 0.0
        """perf_counter() when the request went on upstream."""
        self.hide_usage = False
        """The sidecar asked a stream for usage the client did not ask for: hide it."""

    async def answer(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse:
        kind = request.WhichOneof("request")
        self._check_phase(kind)
        if kind == "request_headers":
            return await self._request_headers(request)
        if kind == "request_body":
            return await self._request_body(request.request_body)
        if kind == "response_headers":
            return await self._response_headers(request.response_headers)
        return await self._response_body(request.response_body)

    def _request_passed(self, answer: pb.ProcessingResponse) -> pb.ProcessingResponse:
        """The request goes on upstream with ``answer``: no later body mutation can reach it."""
        self.exchange.request.body_replaceable = False
        self.expecting = _RESPONSE_HEADERS if self.chain.phases.response_headers else _NOTHING
        self.sent_upstream = time.perf_counter()
        return answer

    async def _request_headers(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse:
        headers = self._receive_request_headers(request)
        exchange = self.exchange
        if self.chain.phases.response_body:
            # The upstream must answer in a coding the chain can read: a brotli or zstd
            # completion would otherwise be refused unread (fail closed) instead of checked.
            accept_encoding = readable_accept_encoding(exchange.request.headers.get("accept-encoding"))
            if accept_encoding is not None:
                exchange.request.set_header("accept-encoding", accept_encoding)
        if self.chain.phases.request_body and not headers.end_of_stream:
            # The chain runs on the body; what it sets (accept-encoding included) goes with that answer.
            self.expecting = _REQUEST_BODY if self.chain.phases.response_headers else _REQUEST_BODY_NO_RESPONSE
            return self.answers.request_headers_unchanged
        if headers.end_of_stream:
            exchange.request.body = b""
            exchange.request.body_replaceable = False  # no body phase follows to carry a new one
        rejection = await self._run(Stage.PRE_REQUEST)
        if rejection is not None:
            return self._immediate(rejection)
        common = _common_response(exchange.request, body_phase=False)
        if common is None:
            return self._request_passed(self.answers.request_headers_unchanged)
        return self._request_passed(pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common), mode_override=self.answers.mode))

    async def _request_body(self, body: pb.HttpBody) -> pb.ProcessingResponse:
        _check_whole(body, "request")
        if len(body.body) > self.limits.max_body_bytes:
            return self._too_large("request")
        self.exchange.request.body = body.body
        rejection = await self._run(Stage.PRE_REQUEST)
        if rejection is not None:
            return self._immediate(rejection)
        if self.chain.needs_usage:
            self._ask_for_stream_usage()
        common = _common_response(self.exchange.request, body_phase=True)
        return self._request_passed(pb.ProcessingResponse(request_body=pb.BodyResponse(response=common)))

    def _ask_for_stream_usage(self) -> None:
        request = self.exchange.request
        try:
            asked = ask_for_stream_usage(request.json())
        except BodyNotJSON:
            return
        if asked is not None:
            request.replace_body(json.dumps(asked, ensure_ascii=False, separators=(",", ":")).encode(), asked)
            self.hide_usage = True

    async def _response_headers(self, headers: pb.HttpHeaders) -> pb.ProcessingResponse:
        self.exchange.request.body_replaceable = False
        self.expecting = _NOTHING
        response = self.exchange.response = HttpMessage.of_lowercase_headers(_header_dict(headers.headers))
        if self.sent_upstream:
            UPSTREAM_LATENCY.labels(self.chain_label).observe(time.perf_counter() - self.sent_upstream)
        self.status_class = response.headers.get(":status", "")[:1] + "xx"
        for name, value in self.exchange.response_headers.items():
            response.set_header(name, value)
        if self.chain.phases.response_body and not headers.end_of_stream:
            if _is_readable_event_stream(response.headers):
                return await self._start_stream(response)
            self.expecting = _RESPONSE_BODY
            return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=_common_response(response, body_phase=False)))
        if headers.end_of_stream:
            response.body = b""
            response.body_replaceable = False  # no body phase follows to carry a new one
        rejection = await self._post_request(response)
        if rejection is not None:
            return self._immediate(rejection)
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=_common_response(response, body_phase=False)))

    async def _start_stream(self, response: HttpMessage) -> pb.ProcessingResponse:
        """A streamed response: post_request plugins that read no body run now, on its headers;
        the body comes chunk by chunk (STREAMED) to a :class:`ResponseStream`."""
        status = response.headers.get(":status", "")
        if status.startswith("5"):
            failure = Failure("upstream", Stage.POST_REQUEST, "upstream", f"upstream answered {status}")
            replacement = await self.chain.run_error_stage(self.exchange, failure)
            if replacement is not None:
                return self._immediate(replacement)
        rejection = await self._run(Stage.POST_REQUEST, self.chain.stream.on_headers)
        if rejection is not None:
            return self._immediate(rejection)
        self.decided = False  # until the stream has passed every plugin
        # Plugins may change the body's length; the client learns it from the chunked framing.
        response.headers.pop("content-length", None)
        limit = self.limits.max_body_bytes
        self.response_stream = ResponseStream(
            self.chain, self.exchange, max_event_bytes=limit, max_buffer_bytes=limit, hide_usage=self.hide_usage,
        )
        self.expecting = _RESPONSE_BODY
        common = _common_response(response, body_phase=False, drop_content_length=True)
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=common), mode_override=self.answers.streamed_mode)

    async def _stream_chunk(self, stream: ResponseStream, body: pb.HttpBody) -> pb.ProcessingResponse:
        chunk = body.body
        had_text = stream.sent_text
        if body.end_of_stream:
            self.expecting = _NOTHING
        output = await stream.feed(chunk, body.end_of_stream)
        if stream.sent_text and not had_text:
            TIME_TO_FIRST_TOKEN.labels(self.chain_label).observe(time.perf_counter() - self.started)
        if stream.ended:
            self.decided = True
            self.exchange.rejection = stream.rejection
            if stream.rejection is not None and self.outcome == "allow":
                self.outcome = "error" if stream.rejection.plugin_id is None else "reject"
        if output == chunk:
            return _CONTINUE_RESPONSE_BODY
        # Set in place rather than built from nested messages, each of which the constructor
        # would copy: a third of the cost, on every event of a stream.
        answer = pb.ProcessingResponse()
        mutation = answer.response_body.response.body_mutation
        if output:
            mutation.body = output
        else:
            mutation.clear_body = True
        return answer

    async def _response_body(self, body: pb.HttpBody) -> pb.ProcessingResponse:
        if self.response_stream is not None:
            return await self._stream_chunk(self.response_stream, body)
        _check_whole(body, "response")
        self.expecting = _NOTHING
        response = self.exchange.response
        if response is None:  # expected only after the response headers made it: never so
            raise ProtocolViolation(grpc.StatusCode.FAILED_PRECONDITION, "unexpected response_body: no response headers came")
        if len(body.body) > self.limits.max_body_bytes:
            return self._too_large("response")
        response.body = body.body
        rejection = await self._post_request(response)
        if rejection is not None:
            return self._immediate(rejection)
        common = _common_response(response, body_phase=True)
        response.body_replaceable = False
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=common))

    async def _post_request(self, response: HttpMessage) -> Reject | None:
        if response.body:
            self.exchange.usage = await _usage_of_response(response, self.limits.max_body_bytes)
        status = response.headers.get(":status", "")
        if status.startswith("5"):
            failure = Failure("upstream", Stage.POST_REQUEST, "upstream", f"upstream answered {status}")
            replacement = await self.chain.run_error_stage(self.exchange, failure)
            if replacement is not None:
                return replacement
        return await self._run(Stage.POST_REQUEST)

    async def _run(self, stage: Stage, groups: tuple[Group, ...] | None = None) -> Reject | None:
        result = await self.chain.run_stage(stage, self.exchange, groups)
        if result.rejection is not None:
            self.outcome = "error" if result.rejection.plugin_id is None else "reject"
        self.decided = result.rejection is not None or stage is Stage.POST_REQUEST or not self.chain.phases.response_headers
        return result.rejection

    def _too_large(self, which: str) -> pb.ProcessingResponse:
        self.outcome = "reject"
        message = f"{which} body exceeds the gateway limit of {self.limits.max_body_bytes} bytes"
        return self._immediate(Reject(413, message, code="body_too_large"))


class _SpacedLog:
    """The warning for refused streams: the first refusal is logged at once, later ones at most
    once per ``every`` seconds with the count since, so a flood of refusals is no flood of logs."""

    def __init__(self, clock: Callable[[], float], every: float = 10.0):
        self._clock = clock
        self._every = every
        self._next_at: float | None = None
        self._unlogged = 0

    def record(self, cap: int) -> None:
        self._unlogged += 1
        now = self._clock()
        if self._next_at is not None and now < self._next_at:
            return
        logger.warning(
            "refused %d ext_proc stream(s) with RESOURCE_EXHAUSTED: %d streams are open, the --max-streams cap; "
            "next report in %gs at the earliest", self._unlogged, cap, self._every,
        )
        self._unlogged = 0
        self._next_at = now + self._every


async def _usage_of_response(response: HttpMessage, limit: int) -> Usage | None:
    """The usage a buffered response body reports, read through its content coding (the JSON is
    parsed once, for this and the plugins alike; a compressed body is inflated off the event loop,
    at most ``limit`` bytes of it)."""
    coding = response.headers.get("content-encoding", "").strip().lower()
    if coding in ("", "identity"):
        try:
            return usage_of(response.json())
        except BodyNotJSON:
            return None
    try:
        return usage_of_body(await inflate_off_loop(response.body or b"", coding, limit))
    except UnreadableBody:
        return None


def _check_whole(body: pb.HttpBody, which: str) -> None:
    """A BUFFERED body comes whole, in one message; a part would be judged as if it were all."""
    if not body.end_of_stream:
        raise ProtocolViolation(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{which} body message without end_of_stream in BUFFERED mode: a body is judged whole, never in parts",
        )


def _is_readable_event_stream(headers: dict[str, str]) -> bool:
    """Whether a response is streamed to the chain event by event: a ``text/event-stream`` in no
    content coding. Everything else, chunked or not (and a compressed stream), is buffered whole,
    up to the body limit, as plugins have always seen it."""
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    coding = headers.get("content-encoding", "").strip().lower()
    return media_type == "text/event-stream" and coding in ("", "identity")


def _chain_name(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == CHAIN_METADATA_KEY:
            return value if isinstance(value, str) else value.decode()
    return DEFAULT_CHAIN


def _header_dict(header_map: base_pb2.HeaderMap) -> dict[str, str]:
    headers: dict[str, str] = {}
    for header in header_map.headers:
        raw = header.raw_value  # each access copies the bytes out of the message: once only
        value = raw.decode("utf-8", "replace") if raw else header.value
        key = header.key.lower()  # as Envoy sends them already; a client of the gRPC port might not
        # Repeated headers fold into one comma-separated value, as HTTP allows for most headers.
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def _client_address(request: pb.ProcessingRequest) -> str | None:
    attributes = request.attributes.get(EXT_PROC_ATTRIBUTES_KEY)
    if attributes is None or SOURCE_ADDRESS_ATTRIBUTE not in attributes.fields:
        return None
    address = attributes.fields[SOURCE_ADDRESS_ATTRIBUTE].string_value
    host, _, port = address.rpartition(":")
    return host.strip("[]") if host and port.isdigit() else address


def _header_option(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _common_response(message: HttpMessage, *, body_phase: bool, drop_content_length: bool = False) -> pb.CommonResponse | None:
    """The mutations the chain made to ``message``, with the framing they need; None when none.

    ``content-length`` is the sidecar's alone (plugins cannot touch it): the new body's length
    when the body was replaced (Envoy refuses a body whose length disagrees with it), or removed
    with ``drop_content_length`` (a stream whose plugins may change its length).
    """
    if not message.set_headers and not message.removed_headers and not message.body_replaced and not drop_content_length:
        return None
    set_headers = dict(message.set_headers)
    removed_headers = sorted(message.removed_headers)
    common = pb.CommonResponse()
    if message.body_replaced and body_phase:
        set_headers["content-length"] = str(len(message.body or b""))
        common.body_mutation.body = message.body or b""
    if drop_content_length:
        removed_headers.append("content-length")
    if set_headers or removed_headers:
        common.header_mutation.CopyFrom(pb.HeaderMutation(
            set_headers=[_header_option(k, v) for k, v in set_headers.items()],
            remove_headers=removed_headers,
        ))
    return common
