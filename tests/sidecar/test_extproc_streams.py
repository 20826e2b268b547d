"""The ext_proc service, spoken to over real gRPC streams the way Envoy speaks to it."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import tracemalloc

import grpc
import pytest
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2

from pluginchain import HttpMessage
from pluginchain._sidecar.server import Sidecar, SidecarSettings
from tests.support.extproc import PLUGINS, request_body, request_headers, response_body, response_headers

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


# -- the protocol: each phase once, in order, and only when asked for --------------------------------

PROTOCOL_CHAINS = """
chains:
  default: [{name: content_filter, config: {banned_patterns: ["forbidden phrase"]}}]
  headers_only: [{name: stamp}]
  responses: [{name: content_filter, stage: post_request, config: {banned_patterns: ["forbidden phrase"]}}]
"""

CLEAN = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]}).encode()
BANNED = json.dumps({"model": "m", "messages": [{"role": "user", "content": "the forbidden phrase"}]}).encode()
COMPLETION = json.dumps({"choices": [{"message": {"role": "assistant", "content": "fine"}}]}).encode()
BANNED_COMPLETION = json.dumps({"choices": [{"message": {"role": "assistant", "content": "the forbidden phrase"}}]}).encode()
EVENT = b'data: {"choices": [{"delta": {"content": "fine"}}]}\n\n'
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


async def until_refused(stub, *requests: pb.ProcessingRequest, metadata=()) -> tuple[list[pb.ProcessingResponse], grpc.aio.AioRpcError]:
    """Send ``requests``, each answered but the last, which must end the stream with an error."""
    call = stub.Process(metadata=metadata)
    answers = []
    for request in requests[:-1]:
        await call.write(request)
        answers.append(await call.read())
    await call.write(requests[-1])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    return answers, refused.value


async def after_the_end(stub, *requests: pb.ProcessingRequest, metadata=()) -> list[pb.ProcessingResponse]:
    """Send ``requests``, each answered but the last, which comes after the sidecar ended the
    stream (status OK) with its answer to the last phase asked for: it is never answered."""
    call = stub.Process(metadata=metadata)
    answers = []
    for request in requests[:-1]:
        await call.write(request)
        answers.append(await call.read())
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    with pytest.raises((grpc.aio.AioRpcError, asyncio.InvalidStateError)):
        await call.write(requests[-1])  # the stream is closed: nothing can reach the sidecar
    return answers


def chain(name: str) -> tuple[tuple[str, str], ...]:
    return (("x-pluginchain-chain", name),)


OUT_OF_ORDER = {
    "response headers before the request headers": (
        "responses", [response_headers()], FAILED_PRECONDITION, "unexpected response_headers: a stream starts with the request headers"),
    "a part of a body in BUFFERED mode": (
        "default", [request_headers(), request_body(BANNED[:20], end_of_stream=False)], INVALID_ARGUMENT,
        "request body message without end_of_stream in BUFFERED mode"),
    "a response body before the response headers": (
        "responses", [request_headers(end_of_stream=True), response_body(BANNED_COMPLETION)], FAILED_PRECONDITION,
        "unexpected response_body: the request was answered; the response headers are awaited"),
    "a message without a phase": ("headers_only", [pb.ProcessingRequest()], INVALID_ARGUMENT, "ext_proc message carries no phase"),
    "a part of a response body in BUFFERED mode": (
        "responses", [request_headers(end_of_stream=True), response_headers(), response_body(BANNED_COMPLETION[:20], end_of_stream=False)],
        INVALID_ARGUMENT, "response body message without end_of_stream in BUFFERED mode"),
}

AFTER_THE_LAST_PHASE = {
    "a second request body after the request was decided": ("default", [request_headers(), request_body(CLEAN), request_body(BANNED)]),
    "the request headers twice": ("headers_only", [request_headers(end_of_stream=True), request_headers()]),
    "a request body the mode did not ask for": ("headers_only", [request_headers(), request_body(BANNED)]),
    "a request body after headers that ended the request": ("default", [request_headers(end_of_stream=True), request_body(BANNED)]),
    "a second response body": (
        "responses", [request_headers(end_of_stream=True), response_headers(), response_body(COMPLETION), response_body(BANNED_COMPLETION)]),
    "response phases the mode skipped": ("default", [request_headers(), request_body(CLEAN), response_headers()]),
    "trailers the mode skipped": ("headers_only", [request_headers(), pb.ProcessingRequest(request_trailers=pb.HttpTrailers())]),
    "a stream chunk after the stream ended": (
        "responses", [request_headers(end_of_stream=True), response_headers(content_type="text/event-stream"),
                      response_body(EVENT, end_of_stream=True), response_body(b"data: [DONE]\n\n", end_of_stream=False)]),
    "a request body after an immediate response": ("default", [request_headers(), request_body(BANNED), request_body(CLEAN)]),
}


@pytest.mark.parametrize("case", sorted(OUT_OF_ORDER))
async def test_a_phase_out_of_order_ends_the_stream_with_a_clean_error_and_one_log_line(start_sidecar, caplog, case):
    chain_name, requests, code, details = OUT_OF_ORDER[case]
    _, stub = await start_sidecar(PROTOCOL_CHAINS)
    caplog.set_level(logging.DEBUG)

    answers, refused = await until_refused(stub, *requests, metadata=chain(chain_name))

    assert refused.code() == code
    assert details in refused.details()
    assert all(answer.WhichOneof("response") != "immediate_response" for answer in answers)
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in problems] == [f"ext_proc stream refused with {code.name}: {refused.details()}"]
    assert not any(r.exc_info for r in caplog.records), "no traceback for a protocol error"
    # The service keeps serving.
    [again] = await exchange(stub, request_headers(end_of_stream=True), metadata=chain("headers_only"))
    assert again.WhichOneof("response") == "request_headers"


@pytest.mark.parametrize("case", sorted(AFTER_THE_LAST_PHASE))
async def test_the_sidecar_ends_the_stream_cleanly_after_the_last_phase_and_takes_nothing_more(start_sidecar, caplog, case):
    chain_name, requests = AFTER_THE_LAST_PHASE[case]
    sidecar, stub = await start_sidecar(PROTOCOL_CHAINS)
    caplog.set_level(logging.WARNING)

    answers = await after_the_end(stub, *requests, metadata=chain(chain_name))

    assert len(answers) == len(requests) - 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "a stream the sidecar ended is no protocol error"
    assert sidecar._processor is not None and sidecar._processor.open_streams == 0


async def test_a_second_request_body_with_banned_text_is_never_answered_continue(start_sidecar):
    _, stub = await start_sidecar(PROTOCOL_CHAINS)
    # The banned body alone is refused, so what follows is about order, not about the filter.
    _, refused_alone = await exchange(stub, request_headers(), request_body(BANNED))
    assert refused_alone.immediate_response.status.code == 403

    call = stub.Process()
    await call.write(request_headers())
    await call.read()
    await call.write(request_body(CLEAN))
    first = await call.read()
    assert first.WhichOneof("response") == "request_body"
    # The answer to the body was the last phase the chain asked for: the sidecar ended the stream.
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    with pytest.raises((grpc.aio.AioRpcError, asyncio.InvalidStateError)):
        await call.write(request_body(BANNED))


def test_a_body_assigned_anew_is_parsed_anew():
    """Each body message is judged on its own bytes: a cached parse never outlives its body."""
    message = HttpMessage(body=CLEAN)
    assert message.json()["messages"][0]["content"] == "hello"
    message.body = BANNED
    assert message.json()["messages"][0]["content"] == "the forbidden phrase"


# -- framing is the proxy's ------------------------------------------------------------------------

FRAMING_ATTEMPTS = {
    "set content-length": ("{set_headers: {content-length: '5'}}", "cannot set header 'content-length'"),
    "set transfer-encoding": ("{set_headers: {Transfer-Encoding: chunked}}", "cannot set header 'transfer-encoding'"),
    "remove content-length": ("{remove_headers: [content-length]}", "cannot remove header 'content-length'"),
    "set :path": ("{set_headers: {':path': /admin}}", "cannot set header ':path'"),
    "set :method": ("{set_headers: {':method': GET}}", "cannot set header ':method'"),
    "set :authority": ("{set_headers: {':authority': evil.example}}", "cannot set header ':authority'"),
    "set host": ("{set_headers: {host: evil.example}}", "cannot set header 'host'"),
    "set x-envoy-*": ("{set_headers: {x-envoy-original-path: /admin}}", "cannot set header 'x-envoy-original-path'"),
    "set connection": ("{set_headers: {connection: close}}", "cannot set header 'connection'"),
    "set a header with a line break": ("{set_headers: {x-note: \"a\\r\\nx-injected: 1\"}}", "cannot set header 'x-note': its value contains a line break"),
    "set :status on the response": ("{response_headers: {':status': '200'}}", "cannot set header ':status'"),
    "set content-length on the response": ("{response_headers: {content-length: '3'}}", "cannot set header 'content-length'"),
    "reject with content-length": ("{reject_status: 403, reject_headers: {content-length: '1'}}", "cannot set header 'content-length'"),
    "replace a body the chain did not ask for": (
        "{set_body: '{}'}", "cannot replace the request body: the chain did not ask Envoy for it"),
}
FRAMING_ATTEMPTS_ON_BODYLESS_REQUESTS = {
    "replace the body of a request its headers ended": (
        "{reads_body: true, set_body: '{}'}", "cannot replace the request body: no body phase is open for it"),
}


@pytest.mark.parametrize("case", sorted(FRAMING_ATTEMPTS) + sorted(FRAMING_ATTEMPTS_ON_BODYLESS_REQUESTS))
async def test_a_plugin_touching_the_framing_fails_and_the_log_names_the_header(start_sidecar, caplog, case):
    config, complaint = FRAMING_ATTEMPTS.get(case) or FRAMING_ATTEMPTS_ON_BODYLESS_REQUESTS[case]
    headers = request_headers(end_of_stream=case in FRAMING_ATTEMPTS_ON_BODYLESS_REQUESTS)
    _, stub = await start_sidecar(f"""
chains:
  default: [{{name: scripted, id: framer, config: {config}}}]
  open: [{{name: scripted, id: framer, on_error: fail_open, config: {config}}}]
""")
    caplog.set_level(logging.WARNING)

    [closed] = await exchange(stub, headers)

    assert closed.immediate_response.status.code == 500
    assert json.loads(closed.immediate_response.body)["error"]["code"] == "plugin_failed"
    [failure] = [r.getMessage() for r in caplog.records if "plugin framer failed" in r.getMessage()]
    assert complaint in failure

    # fail_open: the request goes on, and nothing of the attempt reaches Envoy.
    [opened] = await exchange(stub, headers, metadata=chain("open"))
    assert opened.WhichOneof("response") == "request_headers"
    assert not opened.request_headers.response.HasField("header_mutation")
    assert not opened.request_headers.response.HasField("body_mutation")


async def test_the_response_body_of_a_streamed_completion_cannot_be_replaced_whole_on_its_headers(start_sidecar, caplog):
    """A post_request plugin that reads no body runs on a stream's headers: no body to replace."""
    _, stub = await start_sidecar("""
chains:
  default:
    - {name: content_filter, stage: post_request, config: {banned_patterns: [x]}}
    - {name: scripted, id: rewriter, stage: post_request, config: {set_body: '{}'}}
""")
    caplog.set_level(logging.WARNING)
    _, answer = await exchange(stub, request_headers(end_of_stream=True), response_headers(content_type="text/event-stream"))
    assert answer.immediate_response.status.code == 500
    assert "cannot replace the response body: the chain did not ask Envoy for it" in caplog.text


async def test_a_streamed_response_loses_its_content_length_and_keeps_its_other_headers(start_sidecar):
    _, stub = await start_sidecar("plugins: [{name: content_filter, stage: post_request, config: {banned_patterns: [x]}}]")
    _, answer = await exchange(
        stub, request_headers(end_of_stream=True), response_headers(content_type="text/event-stream", content_length="999"),
    )
    mutation = answer.response_headers.response.header_mutation
    assert list(mutation.remove_headers) == ["content-length"]
    assert answer.mode_override.response_body_mode == Mode.STREAMED


async def test_after_an_answer_for_an_unknown_chain_nothing_more_is_taken(start_sidecar):
    _, stub = await start_sidecar(PROTOCOL_CHAINS)
    [answer] = await after_the_end(stub, request_headers(), request_body(BANNED), metadata=chain("no-such-chain"))
    assert answer.immediate_response.status.code == 500
    assert json.loads(answer.immediate_response.body)["error"]["code"] == "unknown_chain"
