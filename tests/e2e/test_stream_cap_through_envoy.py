"""What a client gets through a real Envoy when the sidecar is at its stream cap, and what Envoy
makes of the streams the sidecar ends itself."""

from __future__ import annotations

import textwrap
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.support.extproc import PLUGINS
from tests.support.harness import Gateway, start_upstream

SLOW_CHAIN = """
chains:
  default: [{name: slow, config: {seconds: 2}}]
"""


def test_a_request_beyond_the_stream_cap_gets_an_error_and_the_one_within_is_answered(tmp_path):
    upstream = start_upstream(tmp_path)
    chain_file = tmp_path / "chain.yaml"
    chain_file.write_text(textwrap.dedent(SLOW_CHAIN))
    gateway = Gateway(tmp_path, chain_file, upstream, plugin_modules=PLUGINS, extra_args=("--max-streams", "1"))
    try:
        gateway.start_sidecar()
        gateway.start_envoy()
        # Both requests are in the gateway together (the chain holds each for 2 s): the one that
        # reaches the sidecar second finds the cap taken, whichever it is.
        with ThreadPoolExecutor(2) as pool:
            responses = list(pool.map(lambda n: gateway.chat(f"hello {n}"), range(2)))
        sidecar_log = gateway.sidecar.output()
    finally:
        gateway.stop()
        upstream.process.stop()

    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200, 500], [(r.status_code, r.text) for r in responses]
    [refused] = [r for r in responses if r.status_code == 500]
    print("Envoy's answer to a refused stream:", refused.status_code, refused.headers.get("content-type"), refused.text)
    assert sidecar_log.count("with RESOURCE_EXHAUSTED") == 1


def test_streams_the_sidecar_ends_are_closed_by_it_and_envoy_goes_on(tmp_path):
    upstream = start_upstream(tmp_path)
    chain_file = tmp_path / "chain.yaml"
    # A chain that reads the request body and no response: its stream ends after the body.
    chain_file.write_text("chains: {default: [{name: content_filter, config: {banned_patterns: [forbidden]}}]}")
    gateway = Gateway(tmp_path, chain_file, upstream, plugin_modules=PLUGINS)
    try:
        gateway.start_sidecar()
        gateway.start_envoy()
        responses = [gateway.chat(f"hello {n}") for n in range(20)]
        stats = httpx.get(f"http://127.0.0.1:{gateway.admin_port}/stats?format=json&filter=ext_proc", timeout=5).json()["stats"]
    finally:
        gateway.stop()
        upstream.process.stop()

    assert {r.status_code for r in responses} == {200}
    counters = {stat["name"].rsplit(".", 1)[-1]: stat["value"] for stat in stats if "value" in stat}
    assert counters["streams_started"] == 20
    assert counters["streams_failed"] == 0
    # Envoy saw the sidecar end streams (it counts those that reached it before it was done with
    # the request; some of the others it closed itself first) and answered every request.
    assert counters["server_half_closed"] > 0, counters
