"""The ext_proc service, spoken to over real gRPC streams the way Envoy speaks to it."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import grpc
import pytest
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2

from pluginchain._sidecar.server import Sidecar, SidecarSettings
from tests.support.extproc import PLUGINS, request_headers

Mode = processing_mode_pb2.ProcessingMode


@pytest.fixture
async def start_sidecar(tmp_path):
    sidecars: list[Sidecar] = []

    async def start(chain_yaml: str, **settings) -> tuple[Sidecar, pb_grpc.ExternalProcessorStub]:
        path = tmp_path / "chain.yaml"
        path.write_text(chain_yaml)
        sidecar = Sidecar(SidecarSettings(config=path, plugin_modules=PLUGINS, port=0, metrics_port=None, grace=2, **settings))
        await sidecar.start()
        sidecars.append(sidecar)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}")
        channels.append(channel)
        return sidecar, pb_grpc.ExternalProcessorStub(channel)

    channels: list[grpc.aio.Channel] = []
    yield start
    for channel in channels:
        await channel.close()
    for sidecar in sidecars:
        await sidecar.drain()


async def exchange(stub, *requests: pb.ProcessingRequest, metadata=()) -> list[pb.ProcessingResponse]:
    call = stub.Process(metadata=metadata)
    answers = []
    for request in requests:
        await call.write(request)
        answers.append(await call.read())
    await call.done_writing()
    return answers


async def test_the_mode_override_asks_only_for_what_the_chain_needs(start_sidecar):
    _, stub = await start_sidecar("""
chains:
  default: [{name: stamp}]
  bodies: [{name: content_filter, config: {banned_patterns: [x]}}]
  responses: [{name: content_filter, stage: post_request, config: {banned_patterns: [x]}}]
""")
    [headers_only] = await exchange(stub, request_headers())
    assert headers_only.mode_override.request_body_mode == Mode.NONE
    assert headers_only.mode_override.response_header_mode == Mode.SKIP
    assert headers_only.request_headers.response.header_mutation.set_headers[0].header.key == "x-pluginchain-stamp"

    [bodies] = await exchange(stub, request_headers(), metadata=(("x-pluginchain-chain", "bodies"),))
    assert bodies.mode_override.request_body_mode == Mode.BUFFERED
    assert bodies.mode_override.response_header_mode == Mode.SKIP

    [responses] = await exchange(stub, request_headers(), metadata=(("x-pluginchain-chain", "responses"),))
    assert responses.mode_override.request_body_mode == Mode.NONE
    assert responses.mode_override.response_header_mode == Mode.SEND
    assert responses.mode_override.response_body_mode == Mode.BUFFERED


def _set_headers(answer: pb.ProcessingResponse) -> dict[str, str]:
    mutation = answer.request_headers.response.header_mutation
    return {option.header.key: option.header.raw_value.decode() for option in mutation.set_headers}


async def test_a_chain_reading_responses_asks_the_upstream_only_for_codings_it_reads(start_sidecar):
    _, stub = await start_sidecar("""
chains:
  default: [{name: content_filter, stage: post_request, config: {banned_patterns: [x]}}]
  prompts: [{name: content_filter, config: {banned_patterns: [x]}}]
""")
    [brotli_first] = await exchange(stub, request_headers(end_of_stream=True, accept_encoding="br, gzip;q=0.8, zstd"))
    assert _set_headers(brotli_first) == {"accept-encoding": "gzip;q=0.8"}
    [only_brotli] = await exchange(stub, request_headers(end_of_stream=True, accept_encoding="br"))
    assert _set_headers(only_brotli) == {"accept-encoding": "identity"}
    [readable] = await exchange(stub, request_headers(end_of_stream=True, accept_encoding="gzip, deflate"))
    assert _set_headers(readable) == {}

    # A chain that never reads a response leaves the client's choice alone.
    [prompts] = await exchange(stub, request_headers(accept_encoding="br"), metadata=(("x-pluginchain-chain", "prompts"),))
    assert not prompts.request_headers.response.HasField("header_mutation")


async def test_a_replaced_body_carries_its_new_content_length(start_sidecar):
    _, stub = await start_sidecar("plugins: [{name: content_filter, config: {banned_patterns: [secret], action: redact}}]")
    body = b'{"messages": [{"role": "user", "content": "a secret"}]}'
    _, answer = await exchange(
        stub,
        request_headers(content_length=str(len(body))),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
    )
    common = answer.request_body.response
    new_body = common.body_mutation.body
    assert b"[REDACTED]" in new_body and b"secret" not in new_body
    lengths = [h.header.raw_value for h in common.header_mutation.set_headers if h.header.key == "content-length"]
    assert lengths == [str(len(new_body)).encode()]


async def test_a_malformed_request_gets_an_answer_and_the_service_keeps_serving(start_sidecar):
    _, stub = await start_sidecar("plugins: [{name: content_validator, config: {max_messages: 3}}]")
    _, answer = await exchange(
        stub, request_headers(), pb.ProcessingRequest(request_body=pb.HttpBody(body=b"\xff\xfe not json", end_of_stream=True))
    )
    assert answer.immediate_response.status.code == 400
    [again] = await exchange(stub, request_headers(end_of_stream=True))
    assert again.WhichOneof("response") == "request_headers"


async def test_thousands_of_cancelled_streams_leak_no_tasks_or_memory(start_sidecar):
    _, stub = await start_sidecar("plugins: [{name: slow, config: {seconds: 30}}]")

    async def requests():
        yield request_headers(end_of_stream=True)
        await asyncio.Event().wait()  # like Envoy, keep the stream open until it is cancelled

    async def cancelled_stream() -> None:
        call = stub.Process(requests())
        await asyncio.sleep(0.01)  # the sidecar is now inside the slow plugin
        call.cancel()

    async def settle(limit: int) -> int:
        """Wait until the server has noticed the cancellations; a leak never gets there."""
        for _ in range(200):
            if len(asyncio.all_tasks()) <= limit:
                break
            await asyncio.sleep(0.05)
        gc.collect()
        return len(asyncio.all_tasks())

    async def round_of(count: int) -> None:
        for start in range(0, count, 100):
            await asyncio.gather(*(cancelled_stream() for _ in range(min(100, count - start))))

    await round_of(500)  # warm up caches, pools and lazily created state
    await asyncio.sleep(1.0)
    baseline_tasks = len(asyncio.all_tasks())
    tracemalloc.start()
    try:
        await round_of(500)
        await settle(baseline_tasks)
        after_first, _ = tracemalloc.get_traced_memory()
        await round_of(2000)
        tasks_after = await settle(baseline_tasks)
        after_more, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tasks_after <= baseline_tasks, f"{tasks_after - baseline_tasks} tasks left behind by cancelled streams"
    # A stream that left anything behind (its task, exchange, plan reference) costs kilobytes.
    per_stream = (after_more - after_first) / 2000
    assert per_stream < 256, f"{per_stream:.0f} bytes stay behind per cancelled stream"


async def test_draining_reports_not_serving_and_lets_in_flight_streams_finish(start_sidecar):
    sidecar, stub = await start_sidecar("plugins: [{name: slow, config: {seconds: 0.5}}]")
    call = stub.Process()
    await call.write(request_headers(end_of_stream=True))
    await asyncio.sleep(0.1)
    drain = asyncio.ensure_future(sidecar.drain())
    await asyncio.sleep(0.1)
    status = await sidecar.health.Check(health_pb2.HealthCheckRequest(service=""), None)
    assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
    answer = await call.read()
    assert answer.WhichOneof("response") == "request_headers"
    await drain
