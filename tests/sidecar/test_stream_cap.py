"""The cap on concurrent ext_proc streams: a stream beyond it is refused at once with
RESOURCE_EXHAUSTED, the streams within it go on untouched, and a flood of refusals is a few log
lines, not one per stream."""

from __future__ import annotations

import json
import logging

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pluginchain._sidecar.server import Sidecar, SidecarSettings
from tests.support.clock import FakeClock
from tests.support.extproc import PLUGINS, request_body, request_headers

CAP = 4
CHAINS = "plugins: [{name: content_filter, config: {banned_patterns: ['forbidden phrase']}}]"
CLEAN = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]}).encode()
BANNED = json.dumps({"model": "m", "messages": [{"role": "user", "content": "the forbidden phrase"}]}).encode()


@pytest.fixture
async def capped(tmp_path):
    """A sidecar serving at most CAP streams, its clock, and a channel to it."""
    path = tmp_path / "chain.yaml"
    path.write_text(CHAINS)
    clock = FakeClock()
    sidecar = Sidecar(SidecarSettings(config=path, plugin_modules=PLUGINS, port=0, metrics_port=None, grace=1, max_streams=CAP), clock=clock)
    await sidecar.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}")
    try:
        yield sidecar, clock, channel
    finally:
        await channel.close()
        await sidecar.drain()


async def open_stream(stub: pb_grpc.ExternalProcessorStub) -> grpc.aio.StreamStreamCall:
    """A stream in the middle of its exchange: its request headers answered, its body awaited."""
    call = stub.Process()
    await call.write(request_headers())
    answer = await call.read()
    assert answer.WhichOneof("response") == "request_headers"
    return call


async def refused(stub: pb_grpc.ExternalProcessorStub) -> grpc.aio.AioRpcError:
    call = stub.Process()  # idle: refused before it sends anything
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call.read()
    return error.value


def refusal_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "RESOURCE_EXHAUSTED" in r.getMessage()]


async def test_streams_beyond_the_cap_are_refused_and_those_within_go_on(capped, caplog):
    sidecar, clock, channel = capped
    stub = pb_grpc.ExternalProcessorStub(channel)
    caplog.set_level(logging.WARNING)
    within = [await open_stream(stub) for _ in range(CAP)]

    beyond = [await refused(stub) for _ in range(3)]

    assert {error.code() for error in beyond} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert beyond[0].details() == f"the sidecar serves at most {CAP} streams at once"
    assert len(refusal_lines(caplog)) == 1, "one line for a burst of refusals"
    # Health is no ext_proc stream: probes still get their answer while the cap is reached.
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    # The streams within the cap finish their exchange as if nothing happened.
    for call, body in zip(within, [CLEAN, BANNED, CLEAN, CLEAN], strict=True):
        await call.write(request_body(body))
    answers = [await call.read() for call in within]
    assert [a.WhichOneof("response") for a in answers] == ["request_body", "immediate_response", "request_body", "request_body"]
    assert answers[1].immediate_response.status.code == 403
    for call in within:
        assert await call.code() == grpc.StatusCode.OK
    assert sidecar._processor is not None and sidecar._processor.open_streams == 0

    # Room again: a new stream is served.
    again = await open_stream(stub)
    await again.write(request_body(CLEAN))
    assert (await again.read()).WhichOneof("response") == "request_body"


async def test_refusals_are_logged_at_most_once_per_ten_seconds_with_their_count(capped, caplog):
    _, clock, channel = capped
    stub = pb_grpc.ExternalProcessorStub(channel)
    caplog.set_level(logging.WARNING)
    within = [await open_stream(stub) for _ in range(CAP)]

    for _ in range(50):
        await refused(stub)
    clock.advance(9.9)
    await refused(stub)
    assert len(refusal_lines(caplog)) == 1
    clock.advance(0.1)
    await refused(stub)

    lines = refusal_lines(caplog)
    assert len(lines) == 2
    assert lines[0].startswith("refused 1 ext_proc stream(s)")
    assert lines[1].startswith("refused 51 ext_proc stream(s)")
    assert f"{CAP} streams are open" in lines[1]
    for call in within:
        call.cancel()


def test_the_cap_is_at_least_one(tmp_path):
    with pytest.raises(ValueError, match="--max-streams must be at least 1, got 0"):
        SidecarSettings(config=tmp_path / "chain.yaml", max_streams=0)
