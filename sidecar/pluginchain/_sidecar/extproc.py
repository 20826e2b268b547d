"""Envoy's ext_proc protocol on one side, the chain engine on the other.

Envoy opens one ``Process`` stream per HTTP request and sends the phases its processing mode
asks for; we answer each with mutations or an ImmediateResponse. The first answer (to the request
headers) carries a ``mode_override`` so Envoy sends bodies and response phases only when the
selected chain needs them (the filter runs with ``allow_mode_override: true``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
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
from pluginchain._config.models import DEFAULT_CHAIN
from pluginchain._engine.plan import CompiledChain, Group, Plan
from pluginchain._engine.streaming import ResponseStream
from pluginchain._engine.usage import ask_for_stream_usage, usage_of, usage_of_body
from pluginchain._metrics import REQUESTS, TIME_TO_FIRST_TOKEN, TOKENS, UPSTREAM_LATENCY
from pluginchain._sidecar.plans import PlanHolder
from pluginchain.plugins._content_coding import UnreadableBody, inflate, readable_accept_encoding

logger = logging.getLogger("pluginchain.extproc")

CHAIN_METADATA_KEY = "x-pluginchain-chain"
SOURCE_ADDRESS_ATTRIBUTE = "source.address"
EXT_PROC_ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"


_CONTINUE_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
_CONTINUE_RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse())
_CONTINUE_REQUEST_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
_CONTINUE_RESPONSE_TRAILERS = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


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

    def __init__(self, plans: PlanHolder, limits: Limits = Limits()):
        self._plans = plans
        self._limits = limits
        self._modes: weakref.WeakKeyDictionary[CompiledChain, _Mode] = weakref.WeakKeyDictionary()
        self._streamed_modes: weakref.WeakKeyDictionary[CompiledChain, _Mode] = weakref.WeakKeyDictionary()
        self._counters: dict[tuple[str, str, str], Any] = {}
        self._finishing: set[asyncio.Task[None]] = set()

    async def Process(self, request_iterator, context: grpc.aio.ServicerContext):
        chain_name = _chain_name(context)
        with self._plans.use() as plan:
            chain = plan.get(chain_name)
            stream = _Stream(chain, chain_name, self._mode_for(chain), self._limits, self._streamed_mode_for(chain))
            try:
                async for request in request_iterator:
                    yield await stream.answer(request)
            except BaseException:
                # Envoy may reset a stream once it has every answer it needs; only a stream cut
                # before its decision is a cancelled request.
                if not stream.decided:
                    stream.outcome = "cancelled"
                raise
            finally:
                self._request_counter(chain_name, stream.outcome, stream.status_class).inc()
                if chain is not None:
                    self._after(plan, chain, stream)

    def _request_counter(self, chain_name: str, outcome: str, status_class: str):
        # Bound once per label set: a labels() lookup takes a lock on every request.
        key = (chain_name, outcome, status_class)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = REQUESTS.labels(*key)
        return counter

    def _after(self, plan: Plan, chain: CompiledChain, stream: _Stream) -> None:
        """What follows an exchange: its token metrics, and its members' ``finish`` hooks, in a
        task of their own (the stream may have been cancelled) that keeps the plan open."""
        usage = stream.exchange.usage
        if usage is not None:
            model = _model_label(usage.model)
            TOKENS.labels(chain.name, model, "input").observe(usage.input_tokens)
            TOKENS.labels(chain.name, model, "output").observe(usage.output_tokens)
        if not chain.finishers or not stream.started:
            return
        holding = self._plans.use(plan)
        holding.__enter__()

        async def finish() -> None:
            try:
                await chain.finish(stream.exchange)
            finally:
                holding.__exit__(None, None, None)

        task = asyncio.get_running_loop().create_task(finish())
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def aclose(self) -> None:
        """Wait for the ``finish`` hooks still running (each is bounded by its plugin's timeout)."""
        if self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)

    def _mode_for(self, chain: CompiledChain | None) -> _Mode | None:
        if chain is None:
            return None
        mode = self._modes.get(chain)
        if mode is None:
            phases = chain.phases
            mode = _Mode(
                request_header_mode=_Mode.SEND,
                request_body_mode=_Mode.BUFFERED if phases.request_body else _Mode.NONE,
                response_header_mode=_Mode.SEND if phases.response_headers else _Mode.SKIP,
                response_body_mode=_Mode.BUFFERED if phases.response_body else _Mode.NONE,
                request_trailer_mode=_Mode.SKIP,
                response_trailer_mode=_Mode.SKIP,
            )
            self._modes[chain] = mode
        return mode

    def _streamed_mode_for(self, chain: CompiledChain | None) -> _Mode | None:
        """The override that switches a streamed response's body to STREAMED."""
        if chain is None or not chain.phases.response_body:
            return None
        mode = self._streamed_modes.get(chain)
        if mode is None:
            mode = _Mode()
            mode.CopyFrom(self._mode_for(chain))
            mode.response_body_mode = _Mode.STREAMED
            self._streamed_modes[chain] = mode
        return mode


class _Stream:
    """The state of one HTTP request's exchange with Envoy."""

    __slots__ = (
        "chain", "chain_name", "mode", "limits", "exchange", "outcome", "decided", "streamed_mode", "response_stream",
        "started", "sent_upstream", "hide_usage", "status_class",
    )

    def __init__(self, chain: CompiledChain | None, chain_name: str, mode: _Mode | None, limits: Limits, streamed_mode: _Mode | None):
        self.chain = chain
        self.chain_name = chain_name
        self.mode = mode
        self.limits = limits
        self.streamed_mode = streamed_mode
        self.response_stream: ResponseStream | None = None
        self.started = 0.0
        """perf_counter() when the request headers arrived: 0 until then."""
        self.sent_upstream = 0.0
        """perf_counter() when the request went on upstream."""
        self.hide_usage = False
        """The sidecar asked a stream for usage the client did not ask for: hide it."""
        self.status_class = "none"
        """The response's status class (2xx...) as the client gets it; none without a response."""
        self.exchange = Exchange()
        self.outcome = "allow"
        self.decided = False
        """Whether the request's fate is sealed: rejected, or through every stage it runs."""

    async def answer(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse:
        kind = request.WhichOneof("request")
        if kind == "request_headers":
            return await self._request_headers(request)
        if kind == "request_body":
            return await self._request_body(request.request_body)
        if kind == "response_headers":
            return await self._response_headers(request.response_headers)
        if kind == "response_body":
            return await self._response_body(request.response_body)
        if kind == "request_trailers":
            return _CONTINUE_REQUEST_TRAILERS
        return _CONTINUE_RESPONSE_TRAILERS

    async def _request_headers(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse:
        headers = request.request_headers
        exchange = self.exchange
        self.started = time.perf_counter()
        exchange.started_at = time.monotonic()
        exchange.request = HttpMessage(_header_dict(headers.headers))
        exchange.request_id = exchange.request.headers.get("x-request-id", "")
        exchange.client_address = _client_address(request)
        if self.chain is None:
            logger.error(
                "no chain named %r in the serving plan; answering 500", self.chain_name,
                extra={"chain": self.chain_name, "request_id": exchange.request_id},
            )
            self.outcome = "error"
            message = f"gateway misconfigured: unknown plugin chain {self.chain_name!r}"
            return self._immediate(Reject(500, message, code="unknown_chain", type="server_error"))
        if self.chain.phases.response_body:
            # The upstream must answer in a coding the chain can read: a brotli or zstd
            # completion would otherwise be refused unread (fail closed) instead of checked.
            accept_encoding = readable_accept_encoding(exchange.request.headers.get("accept-encoding"))
            if accept_encoding is not None:
                exchange.request.set_header("accept-encoding", accept_encoding)
        if self.chain.phases.request_body and not headers.end_of_stream:
            return pb.ProcessingResponse(request_headers=pb.HeadersResponse(), mode_override=self.mode)
        if headers.end_of_stream:
            exchange.request.body = b""
        rejection = await self._run(Stage.PRE_REQUEST)
        if rejection is not None:
            return self._immediate(rejection)
        common = _common_response(exchange.request, body_phase=False)
        self.sent_upstream = time.perf_counter()
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common), mode_override=self.mode)

    async def _request_body(self, body: pb.HttpBody) -> pb.ProcessingResponse:
        if len(body.body) > self.limits.max_body_bytes:
            return self._too_large("request")
        self.exchange.request.body = body.body
        rejection = await self._run(Stage.PRE_REQUEST)
        if rejection is not None:
            return self._immediate(rejection)
        assert self.chain is not None
        if self.chain.needs_usage:
            self._ask_for_stream_usage()
        self.sent_upstream = time.perf_counter()
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=_common_response(self.exchange.request, body_phase=True)))

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
        assert self.chain is not None
        response = self.exchange.response = HttpMessage(_header_dict(headers.headers))
        if self.sent_upstream:
            UPSTREAM_LATENCY.labels(self.chain_name).observe(time.perf_counter() - self.sent_upstream)
        self.status_class = response.headers.get(":status", "")[:1] + "xx"
        for name, value in self.exchange.response_headers.items():
            response.set_header(name, value)
        if self.chain.phases.response_body and not headers.end_of_stream:
            if _is_readable_event_stream(response.headers):
                return await self._start_stream()
            return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=_common_response(response, body_phase=False)))
        if headers.end_of_stream:
            self.exchange.response.body = b""
        rejection = await self._post_request()
        if rejection is not None:
            return self._immediate(rejection)
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=_common_response(self.exchange.response, body_phase=False)))

    async def _start_stream(self) -> pb.ProcessingResponse:
        """A streamed response: post_request plugins that read no body run now, on its headers;
        the body comes chunk by chunk (STREAMED) to a :class:`ResponseStream`."""
        assert self.chain is not None and self.exchange.response is not None
        response = self.exchange.response
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
        response.remove_header("content-length")
        limit = self.limits.max_body_bytes
        self.response_stream = ResponseStream(
            self.chain, self.exchange, max_event_bytes=limit, max_buffer_bytes=limit, hide_usage=self.hide_usage,
        )
        common = _common_response(response, body_phase=False)
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=common), mode_override=self.streamed_mode)

    async def _stream_chunk(self, stream: ResponseStream, body: pb.HttpBody) -> pb.ProcessingResponse:
        chunk = body.body
        had_text = stream.sent_text
        output = await stream.feed(chunk, body.end_of_stream)
        if stream.sent_text and not had_text:
            TIME_TO_FIRST_TOKEN.labels(self.chain_name).observe(time.perf_counter() - self.started)
        if stream.ended:
            self.decided = True
            self.exchange.rejection = stream.rejection
            if stream.rejection is not None and self.outcome == "allow":
                self.outcome = "error" if stream.rejection.plugin_id is None else "reject"
        if output == chunk:
            return _CONTINUE_RESPONSE_BODY
        mutation = pb.BodyMutation(body=output) if output else pb.BodyMutation(clear_body=True)
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse(body_mutation=mutation)))

    async def _response_body(self, body: pb.HttpBody) -> pb.ProcessingResponse:
        assert self.exchange.response is not None
        if self.response_stream is not None:
            return await self._stream_chunk(self.response_stream, body)
        if len(body.body) > self.limits.max_body_bytes:
            return self._too_large("response")
        self.exchange.response.body = body.body
        rejection = await self._post_request()
        if rejection is not None:
            return self._immediate(rejection)
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=_common_response(self.exchange.response, body_phase=True)))

    async def _post_request(self) -> Reject | None:
        assert self.chain is not None and self.exchange.response is not None
        if self.exchange.response.body:
            self.exchange.usage = _usage_of_response(self.exchange.response)
        status = self.exchange.response.headers.get(":status", "")
        if status.startswith("5"):
            failure = Failure("upstream", Stage.POST_REQUEST, "upstream", f"upstream answered {status}")
            replacement = await self.chain.run_error_stage(self.exchange, failure)
            if replacement is not None:
                return replacement
        return await self._run(Stage.POST_REQUEST)

    async def _run(self, stage: Stage, groups: tuple[Group, ...] | None = None) -> Reject | None:
        assert self.chain is not None
        result = await self.chain.run_stage(stage, self.exchange, groups)
        if result.rejection is not None:
            self.outcome = "error" if result.rejection.plugin_id is None else "reject"
        self.decided = result.rejection is not None or stage is Stage.POST_REQUEST or not self.chain.phases.response_headers
        return result.rejection

    def _too_large(self, which: str) -> pb.ProcessingResponse:
        self.outcome = "reject"
        message = f"{which} body exceeds the gateway limit of {self.limits.max_body_bytes} bytes"
        return self._immediate(Reject(413, message, code="body_too_large"))

    def _immediate(self, rejection: Reject) -> pb.ProcessingResponse:
        self.decided = True
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


_MODEL_LABELS: set[str] = set()
_MAX_MODEL_LABELS = 64
"""Distinct models the token metric names; more (an upstream naming every answer differently)
are counted as ``other``, so the metric cannot grow without end."""


def _model_label(model: str | None) -> str:
    if not model:
        return "unknown"
    if model in _MODEL_LABELS:
        return model
    if len(_MODEL_LABELS) >= _MAX_MODEL_LABELS:
        return "other"
    _MODEL_LABELS.add(model)
    return model


def _usage_of_response(response: HttpMessage) -> Usage | None:
    """The usage a buffered response body reports, read through its content coding (the JSON is
    parsed once, for this and the plugins alike)."""
    coding = response.headers.get("content-encoding", "").strip().lower()
    if coding in ("", "identity"):
        try:
            return usage_of(response.json())
        except BodyNotJSON:
            return None
    try:
        return usage_of_body(inflate(response.body or b"", coding))
    except UnreadableBody:
        return None


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
        key = header.key
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


def _common_response(message: HttpMessage, *, body_phase: bool) -> pb.CommonResponse | None:
    """The mutations the chain made to ``message``; None when it made none."""
    if not message.set_headers and not message.removed_headers and not message.body_replaced:
        return None
    set_headers = dict(message.set_headers)
    common = pb.CommonResponse()
    if message.body_replaced and body_phase:
        set_headers["content-length"] = str(len(message.body or b""))
        common.body_mutation.body = message.body or b""
    if set_headers or message.removed_headers:
        common.header_mutation.CopyFrom(pb.HeaderMutation(
            set_headers=[_header_option(k, v) for k, v in set_headers.items()],
            remove_headers=sorted(message.removed_headers),
        ))
    return common
