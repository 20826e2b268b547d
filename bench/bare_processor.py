"""The benchmark's baseline: the least an ext_proc server written with pluginchain's own stack can do.

Same grpcio (``grpc.aio``), same ``envoy.service.ext_proc.v3`` stubs from ``xds-protos``, same
message size limits and default asyncio event loop as ``pluginchain serve``, but no chain: every
phase is answered with CONTINUE. The answer to the request headers carries the same
``mode_override`` pluginchain sends for a chain of the chosen kind:

- ``--mode headers``: request body NONE, response headers SKIP (a header-only chain);
- ``--mode body``: request body BUFFERED, response headers SKIP (a chain that reads the request
  body and has no post_request plugin); the body phase is answered with CONTINUE.
- ``--mode stream``: request body NONE, response headers SEND, response body NONE; the answer to
  the response headers switches the response body to STREAMED (what pluginchain does for a
  ``text/event-stream`` answer when a post_request plugin reads the body), and every response
  body chunk is answered with an empty BodyResponse: the chunk goes on unchanged.

    .venv/bin/python bench/bare_processor.py --port 50061 --mode body   # or headers, stream
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

_Mode = processing_mode_pb2.ProcessingMode

# pluginchain's default body limit (4 MiB) plus its framing allowance: the same gRPC limits.
_GRPC_MESSAGE_BYTES = 4 * 1024 * 1024 + 256 * 1024


def mode_override(mode: str) -> processing_mode_pb2.ProcessingMode:
    return _Mode(
        request_header_mode=_Mode.SEND,
        request_body_mode=_Mode.BUFFERED if mode == "body" else _Mode.NONE,
        response_header_mode=_Mode.SEND if mode == "stream" else _Mode.SKIP,
        response_body_mode=_Mode.NONE,
        request_trailer_mode=_Mode.SKIP,
        response_trailer_mode=_Mode.SKIP,
    )


def streamed_override() -> processing_mode_pb2.ProcessingMode:
    """``--mode stream``'s override in the answer to the response headers: body chunk by chunk."""
    mode = mode_override("stream")
    mode.response_body_mode = _Mode.STREAMED
    return mode


class BareProcessor(pb_grpc.ExternalProcessorServicer):
    """CONTINUE on every phase; the headers answer narrows the processing mode."""

    def __init__(self, mode: str):
        self._answers = {
            "request_headers": pb.ProcessingResponse(request_headers=pb.HeadersResponse(), mode_override=mode_override(mode)),
            "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()),
            "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
            "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
            "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
            "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
        }
        if mode == "stream":
            self._answers["response_headers"] = pb.ProcessingResponse(
                response_headers=pb.HeadersResponse(), mode_override=streamed_override())

    async def Process(self, request_iterator, context):
        answers = self._answers
        async for request in request_iterator:
            yield answers[request.WhichOneof("request")]


async def serve(host: str, port: int, mode: str) -> None:
    options = [
        ("grpc.max_receive_message_length", _GRPC_MESSAGE_BYTES),
        ("grpc.max_send_message_length", _GRPC_MESSAGE_BYTES),
    ]
    server = grpc.aio.server(options=options)
    pb_grpc.add_ExternalProcessorServicer_to_server(BareProcessor(mode), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"bare ext_proc processor ({mode}) on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50061)
    parser.add_argument("--mode", choices=("headers", "body", "stream"), default="headers")
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.mode))


if __name__ == "__main__":
    main()
