"""Requests through the real Envoy and the real sidecar process obey the chain."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.support.harness import wait_until

PLUGINS = ("tests/support/custom_plugins.py",)

STAMP_AND_FILTER = """
    plugins:
      - name: stamp
        priority: 1
        config: {value: from-the-chain}
      - name: content_filter
        priority: 2
        config: {banned_patterns: ["forbidden"]}
"""


def test_an_allowed_request_reaches_the_upstream_with_the_headers_a_plugin_set(gateway):
    gw = gateway(STAMP_AND_FILTER, plugin_modules=PLUGINS)
    response = gw.chat("hello there")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "You said: hello there"
    [received] = gw.upstream.received()
    assert received["headers"]["x-pluginchain-stamp"] == "from-the-chain"
    # content_filter needs the body, so the sidecar asked Envoy for it.
    assert received["headers"]["x-pluginchain-stamp-saw-body"] == "yes"


def test_a_header_only_chain_never_receives_the_body(gateway):
    gw = gateway("plugins: [{name: stamp}]", plugin_modules=PLUGINS)
    assert gw.chat("hello").status_code == 200
    [received] = gw.upstream.received()
    assert received["headers"]["x-pluginchain-stamp-saw-body"] == "no"
    assert json.loads(received["body"])["messages"][0]["content"] == "hello"


def test_a_rejected_request_never_reaches_the_upstream(gateway):
    gw = gateway(STAMP_AND_FILTER, plugin_modules=PLUGINS)
    response = gw.chat("this is forbidden")
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "content_filtered" and error["message"]
    assert gw.upstream.received() == []


def test_json_escapes_cannot_smuggle_a_banned_word(gateway):
    gw = gateway(STAMP_AND_FILTER, plugin_modules=PLUGINS)
    raw = b'{"model": "demo-model", "messages": [{"role": "user", "content": "\\u0066orbidden"}]}'
    response = httpx.post(gw.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 403
    assert gw.upstream.received() == []


def test_the_rate_limit_answers_429_with_its_headers(gateway):
    gw = gateway("""
        plugins:
          - name: rate_limiter
            config: {limit: 3, window: 1m, key: "header:x-api-key"}
    """)
    codes = [gw.chat("hi", headers={"x-api-key": "alice"}).status_code for _ in range(3)]
    limited = gw.chat("hi", headers={"x-api-key": "alice"})
    other_key = gw.chat("hi", headers={"x-api-key": "bob"})
    assert codes == [200, 200, 200]
    assert limited.status_code == 429
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.headers["x-ratelimit-limit"] == "3"
    assert limited.headers["x-ratelimit-remaining"] == "0"
    assert int(limited.headers["x-ratelimit-reset"]) >= 1
    assert other_key.status_code == 200
    assert len(gw.upstream.received()) == 4


REDACT_SSN_IN_COMPLETIONS = """
    plugins:
      - name: content_filter
        stage: post_request
        config: {banned_patterns: ['\\b\\d{3}-\\d{2}-\\d{4}\\b'], action: redact}
"""


def test_post_request_redacts_the_completion_and_keeps_content_length_right(gateway):
    gw = gateway(REDACT_SSN_IN_COMPLETIONS)
    response = gw.chat("my SSN is 123-45-6789, keep it safe")
    assert response.status_code == 200
    content = response.json()["choices"][0]["message"]["content"]
    assert content == "You said: my SSN is [REDACTED], keep it safe"
    assert int(response.headers["content-length"]) == len(response.content)
    # The prompt went upstream untouched: only the answer was filtered.
    assert "123-45-6789" in gw.upstream.received()[0]["body"]


@pytest.mark.parametrize("reads_prompt", [False, True], ids=["headers-phase", "body-phase"])
def test_a_client_accepting_brotli_still_gets_its_completion_checked(gateway, reads_prompt):
    # With a prompt to read, the narrowed header travels with Envoy's request body phase instead.
    prompt_filter = "\n      - {name: content_filter, id: prompt_filter, config: {banned_patterns: [forbidden]}}"
    gw = gateway(REDACT_SSN_IN_COMPLETIONS + (prompt_filter if reads_prompt else ""))
    response = gw.chat("my SSN is 123-45-6789", headers={"accept-encoding": "br, zstd, gzip;q=0.5"})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "You said: my SSN is [REDACTED]"
    # The upstream was asked only for a coding the chain reads, never for one it would refuse unread.
    assert gw.upstream.received()[0]["headers"]["accept-encoding"] == "gzip;q=0.5"


def test_routes_select_their_chain(gateway):
    gw = gateway(
        """
        chains:
          default:
            - {name: stamp, config: {value: default-chain}}
          premium:
            - {name: stamp, config: {value: premium-chain}}
        """,
        plugin_modules=PLUGINS,
        routes=(("/premium/", "premium"), ("/missing/", "no-such-chain")),
    )
    assert gw.chat("a").status_code == 200
    assert gw.chat("b", path="/premium/v1/chat/completions").status_code == 200
    unknown = gw.chat("c", path="/missing/v1/chat/completions")
    assert unknown.status_code == 500
    assert unknown.json()["error"]["code"] == "unknown_chain"
    assert "no-such-chain" in unknown.json()["error"]["message"]
    stamps = [r["headers"]["x-pluginchain-stamp"] for r in gw.upstream.received()]
    assert stamps == ["default-chain", "premium-chain"]
    assert gw.sidecar.alive()


def test_a_failing_plugin_fails_closed_and_the_sidecar_keeps_serving(gateway):
    gw = gateway("""
        chains:
          default: [{name: explode}]
          open: [{name: explode, on_error: fail_open}]
    """, plugin_modules=PLUGINS, routes=(("/open/", "open"),))
    closed = gw.chat("x")
    assert closed.status_code == 500
    assert closed.json()["error"]["code"] == "plugin_failed"
    assert gw.chat("y", path="/open/v1/chat/completions").status_code == 200
    assert len(gw.upstream.received()) == 1


def test_a_body_over_the_limit_gets_413(gateway):
    gw = gateway("plugins: [{name: content_validator, config: {max_messages: 5}}]", extra_args=("--max-body-bytes", "2048"))
    assert gw.chat("small").status_code == 200
    response = gw.chat("x" * 8000)
    assert response.status_code == 413
    assert gw.sidecar.alive()
    assert len(gw.upstream.received()) == 1


def test_a_hot_reload_while_requests_stream_fails_none(gateway):
    gw = gateway("plugins: [{name: stamp, config: {value: v1}}]", plugin_modules=PLUGINS)
    results: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                body = {"model": "demo-model", "messages": [{"role": "user", "content": "hi"}]}
                results.append(client.post(gw.url + "/v1/chat/completions", json=body).status_code)

    workers = [threading.Thread(target=traffic) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(0.3)
        gw.chain_file.write_text("plugins: [{name: stamp, config: {value: v2}}]")
        wait_until(lambda: gw.upstream.received()[-1]["headers"]["x-pluginchain-stamp"] == "v2", what="reloaded plan")
        # An invalid change is refused: the v2 plan keeps serving.
        gw.chain_file.write_text("plugins: [{name: stamp, config: {value: v3, colour: red}}]")
        wait_until(lambda: "colour: unknown field" in gw.sidecar.output(), what="rejected reload logged")
        time.sleep(0.3)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert results and set(results) == {200}, f"{len(results)} requests, codes {set(results)}"
    stamps = [r["headers"]["x-pluginchain-stamp"] for r in gw.upstream.received()]
    assert stamps[-1] == "v2" and "v3" not in stamps
    # Requests in flight at the swap finish on v1 (at most one per worker), every later one runs v2.
    first_v2 = stamps.index("v2")
    assert first_v2 > 0 and stamps[first_v2:].count("v1") <= len(workers)
    metrics = httpx.get(gw.metrics_url).text
    assert 'pluginchain_config_reloads_total{result="applied"} 1.0' in metrics
    assert 'pluginchain_config_reloads_total{result="invalid"} 1.0' in metrics


def test_sighup_reloads_a_changed_file_once_it_has_settled(gateway):
    gw = gateway("plugins: [{name: stamp, config: {value: before}}]", plugin_modules=PLUGINS)
    gw.chain_file.write_text("plugins: [{name: stamp, config: {value: after}}]")
    gw.sidecar.signal(signal.SIGHUP)
    wait_until(lambda: gw.chat("x") and gw.upstream.received()[-1]["headers"]["x-pluginchain-stamp"] == "after", timeout=5, what="SIGHUP reload")


def test_without_the_sidecar_envoy_fails_closed_and_recovers_when_it_returns(gateway):
    gw = gateway("plugins: [{name: stamp}]", plugin_modules=PLUGINS)
    assert gw.chat("before").status_code == 200
    gw.sidecar.kill()
    down = gw.chat("while down")
    assert down.status_code >= 500
    assert len(gw.upstream.received()) == 1
    gw.start_sidecar()
    wait_until(lambda: gw.chat("after").status_code == 200, timeout=15, what="traffic after the sidecar restarted")
    assert gw.upstream.received()[-1]["headers"]["x-pluginchain-stamp"] == "stamped"


def test_sigterm_drains_in_flight_requests_before_exiting(gateway):
    gw = gateway("plugins: [{name: slow, config: {seconds: 1.0}}]", plugin_modules=PLUGINS)
    results: list[int] = []
    caller = threading.Thread(target=lambda: results.append(gw.chat("slow one").status_code))
    caller.start()
    time.sleep(0.3)  # the request is now inside the slow plugin
    gw.sidecar.signal(signal.SIGTERM)
    caller.join(10)
    assert results == [200]
    assert gw.sidecar.popen.wait(10) == 0
    assert "draining" in gw.sidecar.output()


def test_metrics_and_logs(gateway):
    gw = gateway("""
        plugins:
          - {name: stamp}
          - {name: explode, priority: 2, on_error: fail_open}
    """, plugin_modules=PLUGINS)
    secret_headers = {"authorization": "Bearer sk-very-secret-token", "x-api-key": "key-0123456789"}
    response = gw.chat("my private prompt", headers={**secret_headers, "x-request-id": "req-42"})
    assert response.status_code == 200
    metrics = httpx.get(gw.metrics_url).text
    assert 'pluginchain_plugin_duration_seconds_count{chain="default",plugin="stamp"} 1.0' in metrics
    assert 'pluginchain_plugin_decisions_total{chain="default",code="none",outcome="allow",plugin="stamp"} 1.0' in metrics
    # fail_open: the plugin failed, the client got no error from it.
    assert 'pluginchain_plugin_decisions_total{chain="default",code="none",outcome="error",plugin="explode"} 1.0' in metrics
    # A request is counted when Envoy closes its stream, just after the client got its answer. A
    # chain without post_request plugins never sees the response, so its status class is "none".
    counted = 'pluginchain_requests_total{chain="default",code="none",outcome="allow",status_class="none"} 1.0'
    wait_until(lambda: counted in httpx.get(gw.metrics_url).text, timeout=10, what="request counted")
    assert 'pluginchain_stage_duration_seconds_count{chain="default",stage="pre_request"} 1.0' in metrics
    logs = gw.sidecar.output()
    failure_lines = [json.loads(line) for line in logs.splitlines() if "exploded on purpose" in line]
    assert failure_lines and failure_lines[0]["request_id"] == "req-42"
    for secret in ("sk-very-secret-token", "key-0123456789", "my private prompt"):
        assert secret not in logs
