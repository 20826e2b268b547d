"""Every error a client gets through the gateway is an OpenAI-style JSON error it can read, the
replies Envoy makes itself included (upstream down, sidecar down, timeouts, a body over the limit,
a refused mutation), and every response carries the ``x-request-id`` the sidecar logs with. The
sidecar's own answers and the upstream's pass through unchanged."""

from __future__ import annotations

import asyncio
import subprocess
import threading

import httpx
import openai
import pytest
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from tests.support.extproc import PLUGINS, ScriptedProcessor, continue_, envoy_in_front_of, set_header
from tests.support.harness import BIN, ROOT, Gateway, Upstream, free_port

BODY = {"model": "demo-model", "messages": [{"role": "user", "content": "hello"}]}
HEADER_ONLY = "plugins: [{name: content_filter, config: {banned_patterns: [forbidden]}}]"


def assert_json_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers.get("x-request-id"), "every response carries x-request-id"
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"], error
    return error


def sdk_error(gw: Gateway, **headers: str) -> openai.APIStatusError:
    """What the OpenAI SDK raises for one chat call through the gateway."""
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="test", max_retries=0, default_headers=headers) as client:
        with pytest.raises(openai.APIStatusError) as raised:
            client.chat.completions.create(model="demo-model", messages=[{"role": "user", "content": "hello"}])
    return raised.value


def assert_sdk_reads(error: openai.APIStatusError, status: int, code: str) -> None:
    assert error.status_code == status
    assert error.code == code
    assert error.request_id and error.request_id == error.response.headers["x-request-id"]
    # The SDK shows the gateway's message, not a bare "Error code: 503".
    assert isinstance(error.body, dict) and error.message == f"Error code: {status} - {error.body['message']}"


@pytest.fixture
def started(tmp_path):
    """Start the sidecar and Envoy with Envoy settings of the test's choosing; stop both after."""
    gateways: list[Gateway] = []

    def start(chain_yaml: str, upstream: Upstream, *, extra_args: tuple[str, ...] = (), **envoy) -> Gateway:
        chain_file = tmp_path / "chain.yaml"
        chain_file.write_text(chain_yaml)
        gw = Gateway(tmp_path, chain_file, upstream, plugin_modules=PLUGINS, extra_args=extra_args)
        gateways.append(gw)
        gw.start_sidecar()
        gw.start_envoy(**envoy)
        return gw

    yield start
    for gw in gateways:
        gw.stop()


def test_an_unreachable_upstream_is_503_upstream_unavailable(started, tmp_path):
    nobody = Upstream(process=None, port=free_port())  # type: ignore[arg-type]  # a closed port
    gw = started(HEADER_ONLY, nobody)
    response = httpx.post(gw.url + "/v1/chat/completions", json=BODY, timeout=30)
    error = assert_json_error(response, 503, "upstream_unavailable")
    assert "Connection_refused" in error["message"]  # what Envoy saw, for the operator
    assert_sdk_reads(sdk_error(gw), 503, "upstream_unavailable")


def test_an_upstream_slower_than_the_route_timeout_is_504_upstream_timeout(started, upstream):
    gw = started(HEADER_ONLY, upstream, upstream_timeout="0.5s")
    response = httpx.post(gw.url + "/v1/chat/completions", json=BODY, headers={"x-demo-wait": "5"}, timeout=30)
    assert_json_error(response, 504, "upstream_timeout")
    assert_sdk_reads(sdk_error(gw, **{"x-demo-wait": "5"}), 504, "upstream_timeout")
    # The timeout bounds the call, not every call: a fast one goes through.
    assert httpx.post(gw.url + "/v1/chat/completions", json=BODY, timeout=30).status_code == 200


def test_a_sidecar_that_is_down_is_500_gateway_processor_unavailable(started, upstream):
    gw = started(HEADER_ONLY, upstream)
    assert gw.sidecar is not None
    gw.sidecar.stop()
    response = httpx.post(gw.url + "/v1/chat/completions", json=BODY, timeout=30)
    assert_json_error(response, 500, "gateway_processor_unavailable")
    assert_sdk_reads(sdk_error(gw), 500, "gateway_processor_unavailable")
    assert upstream.received() == []  # fail closed


def test_a_chain_slower_than_the_message_timeout_is_504_gateway_processor_timeout(started, upstream):
    slow = "plugins: [{name: scripted, timeout: 30s, config: {sleep: 5}}]"
    gw = started(slow, upstream, message_timeout="0.5s")
    response = httpx.post(gw.url + "/v1/chat/completions", json=BODY, timeout=30)
    assert_json_error(response, 504, "gateway_processor_timeout")
    assert upstream.received() == []


def test_the_sidecars_rejects_and_the_upstreams_errors_pass_unchanged(started, upstream):
    gw = started(HEADER_ONLY, upstream)
    rejected = httpx.post(gw.url + "/v1/chat/completions", json={**BODY, "messages": [{"role": "user", "content": "forbidden"}]}, timeout=30)
    assert_json_error(rejected, 403, "content_filtered")
    from_upstream = httpx.post(gw.url + "/status/503", json=BODY, timeout=30)
    assert from_upstream.status_code == 503
    assert from_upstream.json() == {"error": {"message": "upstream says 503", "type": "upstream"}}
    assert from_upstream.headers.get("x-request-id")

    allowed = httpx.post(gw.url + "/v1/chat/completions", json=BODY, timeout=30)
    assert allowed.status_code == 200 and allowed.headers.get("x-request-id")
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="test", max_retries=0) as client:
        completion = client.chat.completions.with_raw_response.create(model="demo-model", messages=[{"role": "user", "content": "hi"}])
    assert completion.headers["x-request-id"] and completion.parse()._request_id == completion.headers["x-request-id"]
    # The id the client got is the one the upstream saw (and the sidecar logs with).
    assert upstream.received()[-1]["headers"]["x-request-id"] == completion.headers["x-request-id"]


class _AnsweredProcessor(ScriptedProcessor):
    """Records, after sending each answer, that Envoy has it on the wire (``answered``)."""

    def __init__(self) -> None:
        super().__init__()
        self.answered = threading.Event()

    async def Process(self, request_iterator, context):
        async for request in request_iterator:
            kind = request.WhichOneof("request")
            self.phases.append(kind)
            yield self.script.get(kind, continue_)(request)
            if kind == "request_headers":
                self.answered.set()


@pytest.fixture
async def scripted(tmp_path, upstream):
    processor = _AnsweredProcessor()
    async with envoy_in_front_of(processor, tmp_path, upstream, max_body_bytes=65536) as envoy:
        yield envoy, processor


async def test_a_header_change_envoy_refuses_is_500_header_mutation_refused(scripted):
    envoy, processor = scripted
    refused = pb.HeaderMutation(set_headers=[set_header("host", "evil.example")])
    processor.script = {"request_headers": lambda _: pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(response=pb.CommonResponse(header_mutation=refused)))}
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(envoy.url + "/v1/chat/completions", json=BODY)
    error = assert_json_error(response, 500, "header_mutation_refused")
    assert "header_mutation_set_headers_failed" in error["message"]


async def test_a_body_over_envoys_buffer_limit_is_413_body_too_large(scripted):
    """The chain buffers the body (as a body-reading chain does); it arrives once Envoy has the
    answer to the headers, and is 64 KiB + 1 byte."""
    envoy, processor = scripted
    buffered = ProcessingMode(request_header_mode=ProcessingMode.SEND, request_body_mode=ProcessingMode.BUFFERED,
                              response_header_mode=ProcessingMode.SKIP)
    processor.script = {"request_headers": lambda _: pb.ProcessingResponse(request_headers=pb.HeadersResponse(), mode_override=buffered)}

    def body():
        yield b"{"
        processor.answered.wait(10)
        yield b" " * 65536

    def post() -> httpx.Response:
        return httpx.post(envoy.url + "/v1/chat/completions", content=body(), headers={"content-type": "application/json"}, timeout=10)

    response = await asyncio.to_thread(post)
    error = assert_json_error(response, 413, "body_too_large")
    assert error["message"] == "request body exceeds the gateway limit of 65536 bytes"
    assert error["type"] == "invalid_request_error"
    assert envoy.upstream.received() == []


def test_the_route_timeout_is_a_gateway_flag():
    """``--upstream-timeout`` (alias ``--route-timeout``) reaches the route; a value Envoy cannot read is refused."""
    def envoy_config(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "pluginchain"), "envoy-config", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)

    for flag in ("--upstream-timeout", "--route-timeout"):
        printed = envoy_config(flag, "45s")
        assert printed.returncode == 0, printed.stderr
        assert printed.stdout.count("timeout: 45s") == 1
    assert "timeout: 300s" in envoy_config().stdout
    refused = envoy_config("--upstream-timeout", "5m")
    assert refused.returncode == 1
    assert refused.stderr.strip() == "error: the upstream timeout must be a duration in seconds like 10s or 0.5s, got '5m'"

