"""Framing is the proxy's, through a real Envoy: where a request goes and where it ends is never a
plugin's to change. The sidecar refuses such a change to plugins (a plugin failure), Envoy's
mutation rules refuse it to the sidecar (a request that fails instead of going on changed), and
the sidecar's own framing (content-length after a body rewrite, none on a stream, accept-encoding,
the headers of its own answers) still passes those rules."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from tests.support.extproc import PLUGINS, ScriptedProcessor, envoy_in_front_of, set_header

BODY = {"model": "demo-model", "messages": [{"role": "user", "content": "a long enough prompt to be more than five bytes"}]}


def header_mutation(phase: str, mutation: pb.HeaderMutation):
    """An answer to ``phase`` that changes its headers and nothing else."""
    def answer(request: pb.ProcessingRequest) -> pb.ProcessingResponse:
        return pb.ProcessingResponse(**{phase: pb.HeadersResponse(response=pb.CommonResponse(header_mutation=mutation))})
    return answer


REFUSED_BY_ENVOY = {
    ":path": ("request_headers", pb.HeaderMutation(set_headers=[set_header(":path", "/admin")])),
    ":method": ("request_headers", pb.HeaderMutation(set_headers=[set_header(":method", "GET")])),
    ":authority": ("request_headers", pb.HeaderMutation(set_headers=[set_header(":authority", "evil.example")])),
    "host": ("request_headers", pb.HeaderMutation(set_headers=[set_header("host", "evil.example")])),
    "x-envoy-*": ("request_headers", pb.HeaderMutation(set_headers=[set_header("x-envoy-original-path", "/admin")])),
    "transfer-encoding": ("request_headers", pb.HeaderMutation(set_headers=[set_header("transfer-encoding", "chunked")])),
    "connection": ("request_headers", pb.HeaderMutation(set_headers=[set_header("connection", "close")])),
    "upgrade": ("request_headers", pb.HeaderMutation(set_headers=[set_header("upgrade", "h2c")])),
    "removing host": ("request_headers", pb.HeaderMutation(remove_headers=["host"])),
    "response :status": ("response_headers", pb.HeaderMutation(set_headers=[set_header(":status", "201")])),
    "response transfer-encoding": ("response_headers", pb.HeaderMutation(set_headers=[set_header("transfer-encoding", "chunked")])),
}


@pytest.fixture
async def scripted_envoy(tmp_path, upstream):
    """Envoy, configured as the gateway runs it, in front of a processor that answers from a script."""
    processor = ScriptedProcessor()
    async with envoy_in_front_of(processor, tmp_path, upstream) as envoy:
        yield envoy, processor


async def test_envoy_refuses_what_the_sidecar_must_never_send(scripted_envoy):
    envoy, processor = scripted_envoy
    outcomes = {}
    async with httpx.AsyncClient(timeout=10) as client:
        for case, (phase, mutation) in REFUSED_BY_ENVOY.items():
            processor.script = {phase: header_mutation(phase, mutation)}
            before = len(envoy.upstream.received())
            response = await client.post(envoy.url + "/v1/chat/completions", json=BODY)
            outcomes[case] = (response.status_code, len(envoy.upstream.received()) - before)
        # The same processor's harmless mutation goes through: the refusals above are the rules'.
        processor.script = {"request_headers": header_mutation("request_headers", pb.HeaderMutation(set_headers=[set_header("x-tenant", "acme")]))}
        allowed = await client.post(envoy.url + "/v1/chat/completions", json=BODY)

    # A request refused at its headers never reaches the upstream; a response refused at its
    # headers reaches the client as Envoy's 500, not as the upstream's answer.
    assert outcomes == {case: (500, 1 if phase == "response_headers" else 0) for case, (phase, _) in REFUSED_BY_ENVOY.items()}
    assert allowed.status_code == 200
    assert envoy.upstream.received()[-1]["headers"]["x-tenant"] == "acme"


CONTENT_LENGTH_SMUGGLER = """
chains:
  default: [{name: scripted, id: smuggler, config: {reads_body: true, set_headers: {content-length: '5'}}}]
  open: [{name: scripted, id: smuggler, on_error: fail_open, config: {reads_body: true, set_headers: {content-length: '5'}}}]
  rewriter: [{name: scripted, id: smuggler, config: {reads_body: true, set_body: '{"model":"demo-model","messages":[]}', remove_headers: [content-length]}}]
"""


def test_a_plugin_setting_content_length_never_desynchronises_the_upstream(gateway):
    gw = gateway(CONTENT_LENGTH_SMUGGLER, plugin_modules=PLUGINS, routes=(("/open/", "open"), ("/rewriter/", "rewriter")))
    sent = json.dumps(BODY).encode()

    refused = httpx.post(gw.url + "/v1/chat/completions", content=sent, headers={"content-type": "application/json"}, timeout=30)
    assert refused.status_code == 500
    assert refused.json()["error"]["code"] == "plugin_failed"
    assert gw.upstream.received() == []
    assert "cannot set header 'content-length'" in gw.sidecar.output()

    # fail_open: the request goes on as the client framed it, the plugin's change dropped.
    passed = httpx.post(gw.url + "/open/v1/chat/completions", content=sent, headers={"content-type": "application/json"}, timeout=30)
    assert passed.status_code == 200
    [received] = gw.upstream.received()
    assert received["headers"]["content-length"] == str(len(sent))
    assert received["body"].encode() == sent

    # Removing it along with a body rewrite fails the same way: the body's length is the sidecar's.
    rewritten = httpx.post(gw.url + "/rewriter/v1/chat/completions", content=sent, headers={"content-type": "application/json"}, timeout=30)
    assert rewritten.status_code == 500
    assert "cannot remove header 'content-length'" in gw.sidecar.output()
    assert len(gw.upstream.received()) == 1


OWN_FRAMING = """
chains:
  default:
    - {name: content_filter, config: {banned_patterns: [secret], action: redact}}
    - {name: content_filter, id: answer_filter, stage: post_request, config: {banned_patterns: [forbidden]}}
"""


def test_the_sidecars_own_framing_passes_envoys_rules(gateway):
    gw = gateway(OWN_FRAMING)

    # A replaced body goes upstream with its own length.
    redacted = gw.chat("keep the secret", headers={"accept-encoding": "br"})
    assert redacted.status_code == 200
    [received] = gw.upstream.received()
    assert "secret" not in received["body"] and "[REDACTED]" in received["body"]
    assert received["headers"]["content-length"] == str(len(received["body"].encode()))
    # The upstream is asked for a coding the chain can read.
    assert received["headers"]["accept-encoding"] == "identity"

    # A streamed answer leaves without its content-length, chunk by chunk.
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json={**BODY, "stream": True}, timeout=30) as stream:
        assert stream.status_code == 200
        assert "content-length" not in stream.headers
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"

    # The sidecar's own answers carry their headers, and the SDKs read them.
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="test", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as raised:
        client.chat.completions.create(model="demo-model", messages=[{"role": "user", "content": "say forbidden"}])
    client.close()
    assert raised.value.response.headers["content-type"] == "application/json"
    assert raised.value.code == "content_filtered"
