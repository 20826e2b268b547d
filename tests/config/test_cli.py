"""`pluginchain validate` and `pluginchain plan`, as a user runs them on chain files and on
PluginChain manifests before applying them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pluginchain._sidecar.envoy_config import EnvoySettings
from pluginchain._sidecar.envoy_config import render as render_envoy
from pluginchain.cli import main

EXAMPLES = Path(__file__).parents[2] / "examples"


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("example", ["chain.yaml", "spec/basic-setup.json", "spec/parallel-setup.json", "pluginchain.yaml"])
def test_a_good_file_prints_ok_and_exits_zero(capsys, example):
    assert run(capsys, "validate", str(EXAMPLES / example)) == (0, "OK\n", "")


def test_a_bad_file_prints_every_error_and_exits_non_zero(capsys, tmp_path):
    path = tmp_path / "chain.yaml"
    path.write_text("""
plugins:
  - {name: rate_limiter, config: {limit: 0}}
  - {name: content_filter, config: {banned_patterns: [fine, "(abc"]}}
  - {name: no_such_plugin}
""")
    code, out, err = run(capsys, "validate", str(path))
    assert code == 1 and out == ""
    assert err.startswith(f"{path}: 3 errors in chain config\n")
    assert "plugins[1] (content_filter).config.banned_patterns[1]: not a valid RE2 pattern: missing )" in err
    assert "plugins[0] (rate_limiter).config.limit:" in err
    assert "plugins[2] (no_such_plugin).name: unknown plugin 'no_such_plugin'" in err


def test_a_missing_file_is_named(capsys, tmp_path):
    code, _, err = run(capsys, "validate", str(tmp_path / "nowhere.yaml"))
    assert code == 1 and "nowhere.yaml" in err and "cannot read file" in err


def test_plan_prints_each_stage_s_groups_in_order_with_their_members_and_the_phases(capsys):
    code, out, _ = run(capsys, "plan", str(EXAMPLES / "chain.yaml"))
    assert code == 0
    assert out == """\
chain default
  phases: request_headers, request_body, response_headers, response_body
  pre_request:
    priority 0:
      auth  sequential  timeout=5s  on_error=fail_closed
    priority 1:
      rate_limiter  sequential  timeout=5s  on_error=fail_closed
    priority 2:
      content_validator  parallel    timeout=5s  on_error=fail_closed
      prompt_filter      parallel    timeout=5s  on_error=fail_closed (content_filter)
  post_request:
    priority 0:
      completion_redactor  sequential  timeout=5s  on_error=fail_closed (content_filter)
  error: no plugins
"""


def test_plan_shows_timeouts_on_error_and_only_the_phases_needed(capsys, tmp_path):
    path = tmp_path / "chain.yaml"
    path.write_text("""
chains:
  headers-only:
    - {name: rate_limiter, timeout: 250ms, on_error: fail_open}
""")
    code, out, _ = run(capsys, "plan", str(path))
    assert code == 0
    assert "chain headers-only\n  phases: request_headers\n" in out
    assert "rate_limiter  sequential  timeout=250ms  on_error=fail_open" in out


def test_plugin_chain_manifests_are_planned_one_resource_at_a_time(capsys):
    code, out, _ = run(capsys, "plan", str(EXAMPLES / "pluginchain.yaml"))
    assert code == 0
    assert out.index("# PluginChain basic-setup\nchain default\n") < out.index("# PluginChain parallel-setup\nchain parallel\n")


def test_plugin_chain_manifests_are_judged_as_the_operator_judges_them(capsys, tmp_path):
    path = tmp_path / "manifests.yaml"
    path.write_text("""
apiVersion: v1
kind: ConfigMap
metadata: {name: skipped}
---
apiVersion: pluginchain.io/v1alpha1
kind: PluginChain
metadata: {name: broken, namespace: prod}
spec:
  selector: {matchLabels: {app: gw}}
  plugins:
    - {name: content_filter, config: {banned_patterns: ["(unclosed"]}}
    - {name: rate_limiter, parallel: true}
---
apiVersion: pluginchain.io/v1beta9
kind: PluginChain
metadata: {name: no-spec}
""")
    code, _, err = run(capsys, "validate", str(path))
    assert code == 1
    assert err.splitlines()[1:] == [
        "  PluginChain prod/broken: spec.plugins[0] (content_filter).config.banned_patterns[0]: not a valid RE2 pattern: missing )",
        "  PluginChain prod/broken: spec.plugins[1] (rate_limiter).parallel: rate_limiter does not support parallel execution",
        "  PluginChain no-spec: apiVersion: expected pluginchain.io/v1alpha1, got 'pluginchain.io/v1beta9'",
        "  PluginChain no-spec: spec: required object is missing",
    ]


def test_kubectl_json_output_is_read_too(capsys, tmp_path):
    path = tmp_path / "pcs.json"
    path.write_text("""{"apiVersion": "v1", "kind": "List", "items": [{
        "apiVersion": "pluginchain.io/v1alpha1", "kind": "PluginChain", "metadata": {"name": "a", "namespace": "gw"},
        "spec": {"selector": {"matchLabels": {"app": "gw"}}, "plugins": [{"name": "rate_limiter"}]}}]}""")
    code, out, _ = run(capsys, "plan", str(path))
    assert code == 0 and out.startswith("# PluginChain gw/a\nchain default\n")


def test_envoy_config_prints_the_gateway_configuration_as_plain_yaml(capsys):
    code, out, _ = run(capsys, "envoy-config", "--upstream", "https://api.openai.com", "--ready-port", "9902",
                       "--route", "/v1/embeddings=embeddings")
    assert code == 0
    # Plain YAML a person can read and adopt: no anchors or aliases standing in for repeated parts.
    assert "&id" not in out and "*id" not in out
    config = yaml.safe_load(out)
    assert config == render_envoy(EnvoySettings(upstream="https://api.openai.com", ready_port=9902,
                                                routes=(("/v1/embeddings", "embeddings"),)))
