"""The gateway pod's Envoy runs the configuration the local gateway runs: the chart's ConfigMap is,
object for object, what ``pluginchain._sidecar.envoy_config.render`` makes of the same settings, and the
real Envoy accepts it (``envoy --mode validate``)."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from pluginchain._sidecar.envoy_config import EnvoySettings
from pluginchain._sidecar.envoy_config import render as render_envoy
from pluginchain._sidecar.gateway import envoy_binary
from tests.helm.chart import REALISTIC, ROOT, render

# Chart values, and the settings the local gateway would be given for the same gateway. In a pod,
# the kubelet probes Envoy on the `ready` listener; the admin interface stays on loopback.
CASES = {
    "defaults": ({}, EnvoySettings(upstream="https://api.openai.com", ready_port=9902)),
    "realistic": (REALISTIC, EnvoySettings(
        upstream="https://llm.example.com:8443",
        ready_port=9902,
        routes=(("/premium/", "premium"), ("/v1/embeddings", "embeddings")),
        max_body_bytes=10 * 1024 * 1024,
        message_timeout="2.5s",
        upstream_timeout="120s",
        failure_mode_allow=True,
    )),
    "plain-http-on-other-ports": (
        {"gateway": {"upstream": "http://10.0.0.7:8000/", "maxBodyBytes": 65536,
                     "routes": [{"prefix": "/", "chain": "everything"}],
                     "envoy": {"port": 9000, "adminPort": 9903, "readyPort": 9904}, "sidecar": {"extProcPort": 50061, "maxStreams": 512}}},
        EnvoySettings(upstream="http://10.0.0.7:8000/", listen_port=9000, admin_port=9903, ready_port=9904,
                      sidecar_port=50061, routes=(("/", "everything"),), max_body_bytes=65536, max_streams=512),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_configmap_is_what_render_produces(case):
    values, settings = CASES[case]
    assert render(values).envoy_config() == render_envoy(settings)


def _validate(config: dict, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "--config-path", str(path), "--disable-hot-restart", "--log-level", "error"],
        capture_output=True, text=True, timeout=60, check=False,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_envoy_accepts_the_configmap(case, tmp_path):
    values, _ = CASES[case]
    result = _validate(render(values).envoy_config(), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_validation_rejects_a_broken_configuration(tmp_path):
    """The validation above can fail: a duration Envoy cannot parse is refused."""
    config = render().envoy_config()
    ext_proc = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]
    ext_proc["typed_config"]["message_timeout"] = "10 seconds"
    result = _validate(config, tmp_path)
    assert result.returncode != 0


def test_the_chart_keeps_the_sidecar_in_charge_of_the_phases():
    """allow_mode_override, fail-closed by default, and the per-route chain metadata."""
    config = render(REALISTIC).envoy_config()
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    ext_proc = manager["http_filters"][0]["typed_config"]
    assert ext_proc["allow_mode_override"] is True
    assert render().envoy_config()["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["http_filters"][0]["typed_config"]["failure_mode_allow"] is False
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    chains = [r.get("typed_per_filter_config", {}).get("envoy.filters.http.ext_proc", {}).get("overrides", {})
              .get("grpc_initial_metadata", [{}])[0].get("value") for r in routes]
    assert chains == ["premium", "embeddings", None]


def test_the_readme_istio_filter_is_the_built_in_ext_proc_filter():
    """Users copy it into an EnvoyFilter: it must not drift from what the gateway runs."""
    readme = (ROOT / "README.md").read_text()
    documents = [doc for block in readme.split("```yaml\n")[1:] for doc in yaml.safe_load_all(block.split("```", 1)[0])]
    envoy_filter = next(d for d in documents if isinstance(d, dict) and d.get("kind") == "EnvoyFilter")
    copied = envoy_filter["spec"]["configPatches"][0]["patch"]["value"]
    built_in = render_envoy(EnvoySettings())["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["http_filters"][0]
    copied_cluster = copied["typed_config"]["grpc_service"]["envoy_grpc"].pop("cluster_name")
    built_in["typed_config"]["grpc_service"]["envoy_grpc"].pop("cluster_name")
    assert copied == built_in
    assert copied_cluster == "outbound|80||pluginchain-gateway.pluginchain.svc.cluster.local"


def test_the_chart_has_envoy_refuse_framing_mutations_as_errors():
    """Pseudo-headers, host and x-envoy-* (disallow_system, allow_envoy unset), connection headers
    by name, each refusal an error: tests/e2e/test_framing_through_envoy.py proves what they do."""
    config = render(REALISTIC).envoy_config()
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    rules = manager["http_filters"][0]["typed_config"]["mutation_rules"]
    assert rules == {
        "disallow_system": True,
        "disallow_expression": {"regex": "transfer-encoding|connection|keep-alive|proxy-connection|te|upgrade"},
        "disallow_is_error": True,
    }


def test_the_chart_binds_exclusively_and_answers_errors_as_json_with_a_request_id():
    """No SO_REUSEPORT (a second Envoy on the port fails instead of splitting traffic), x-request-id
    on every response, and Envoy's own replies rewritten into JSON errors naming the body limit:
    tests/e2e/test_envoy_errors_through_envoy.py proves what they do."""
    config = render(REALISTIC).envoy_config()
    listeners = config["static_resources"]["listeners"]
    assert [listener["enable_reuse_port"] for listener in listeners] == [False, False]
    manager = listeners[0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert manager["always_set_request_id_in_response"] is True
    errors = {m["body_format_override"]["json_format"]["error"]["code"]: m["body_format_override"]["json_format"]["error"]
              for m in manager["local_reply_config"]["mappers"]}
    assert {"upstream_unavailable", "upstream_timeout", "gateway_processor_unavailable", "body_too_large", "gateway_error"} <= set(errors)
    assert errors["body_too_large"]["message"] == f"request body exceeds the gateway limit of {10 * 1024 * 1024} bytes"
    assert "body_format" not in manager["local_reply_config"], "the sidecar's own JSON answers must pass unchanged"
