"""ext_proc messages as Envoy sends them, for tests that talk to a sidecar's gRPC port directly;
and a processor that answers Envoy from a script, for tests of what Envoy itself does with an
answer the sidecar would never give."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from tests.support.harness import ROOT, Gateway

PLUGINS = (str(ROOT / "tests" / "support" / "custom_plugins.py"), str(ROOT / "tests" / "support" / "scripted.py"))
"""Custom plugin modules the sidecar tests load (``stamp`` and friends, ``scripted``)."""


def request_headers(end_of_stream: bool = False, **headers: str) -> pb.ProcessingRequest:
    header_map = base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=key.replace("_", "-"), raw_value=value.encode())
        for key, value in {":method": "POST", ":path": "/v1/chat/completions", **headers}.items()
    ])
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=header_map, end_of_stream=end_of_stream))


def request_body(body: bytes, end_of_stream: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=end_of_stream))


def response_headers(end_of_stream: bool = False, status: str = "200", **headers: str) -> pb.ProcessingRequest:
    named = {key.replace("_", "-"): value for key, value in headers.items()}
    header_map = base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=key, raw_value=value.encode())
        for key, value in {":status": status, "content-type": "application/json", **named}.items()
    ])
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=header_map, end_of_stream=end_of_stream))


def response_body(body: bytes, end_of_stream: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=end_of_stream))


def set_header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


Answer = Callable[[pb.ProcessingRequest], pb.ProcessingResponse]


def continue_(request: pb.ProcessingRequest) -> pb.ProcessingResponse:
    """Go on unchanged, whatever the phase."""
    kind = request.WhichOneof("request")
    if kind in ("request_headers", "response_headers"):
        return pb.ProcessingResponse(**{kind: pb.HeadersResponse()})
    if kind in ("request_body", "response_body"):
        return pb.ProcessingResponse(**{kind: pb.BodyResponse()})
    return pb.ProcessingResponse(**{kind: pb.TrailersResponse()})


class ScriptedProcessor(pb_grpc.ExternalProcessorServicer):
    """An ext_proc server answering each phase as ``script`` says (``continue_`` for the rest)
    and recording the phases it was sent. Serve it with :meth:`start` and point Envoy at ``port``."""

    def __init__(self) -> None:
        self.script: dict[str, Answer] = {}
        self.phases: list[str] = []
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = grpc.aio.server()
        pb_grpc.add_ExternalProcessorServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)

    async def Process(self, request_iterator, context):
        async for request in request_iterator:
            kind = request.WhichOneof("request")
            self.phases.append(kind)
            yield self.script.get(kind, continue_)(request)


@contextlib.asynccontextmanager
async def envoy_in_front_of(processor: ScriptedProcessor, tmp_path: Path, upstream: Any, **envoy_options: Any) -> AsyncIterator[Gateway]:
    """Envoy, configured as the gateway runs it (``envoy_options``: ``Gateway.start_envoy``'s), in
    front of ``processor`` instead of a sidecar; both stopped at the end, also on failure."""
    await processor.start()
    envoy = Gateway(tmp_path, tmp_path / "unused-chain.yaml", upstream, sidecar_port=processor.port)
    try:
        envoy.start_envoy(**envoy_options)
        yield envoy
    finally:
        envoy.stop()
        await processor.stop()
