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
no_default_chain: true
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


def test_a_chain_set_without_default_is_refused_naming_the_problem_and_the_fix(capsys, tmp_path):
    path = tmp_path / "chain.yaml"
    path.write_text("""
chains:
  premium: [{name: rate_limiter, config: {limit: 5, window: 1m}}]
  internal: [{name: rate_limiter, config: {limit: 50, window: 1m}}]
""")
    code, out, err = run(capsys, "validate", str(path))
    assert code == 1 and out == ""
    assert (
        "chains: no chain named 'default' (chains defined: 'internal', 'premium'): requests on routes that name no chain "
        "(no x-pluginchain-chain metadata) would get 500 unknown_chain; add a 'default' chain, or, if every route names "
        "its chain (with `pluginchain gateway`: a `--route /=CHAIN` for every path), say so with `no_default_chain: true`"
    ) in err

    path.write_text("no_default_chain: true\n" + path.read_text())
    assert run(capsys, "validate", str(path)) == (0, "OK\n", "")


@pytest.mark.parametrize(("document", "error"), [
    (
        "no_default_chain: true\nchains: {default: [{name: rate_limiter}]}",
        "no_default_chain: says there is no default chain, but the file defines 'default'; remove one of them",
    ),
    ("no_default_chain: 'yes'\nchains: {premium: [{name: rate_limiter}]}", "no_default_chain: expected true or false, got a string"),
    ("no_default_chain: true\nplugins: [{name: rate_limiter}]", "no_default_chain: goes with `chains` only: a single chain is the default chain"),
])
def test_no_default_chain_is_said_only_where_it_holds(capsys, tmp_path, document, error):
    path = tmp_path / "chain.yaml"
    path.write_text(document)
    code, _, err = run(capsys, "validate", str(path))
    assert code == 1 and error in err


def test_every_chain_file_the_project_ships_has_its_default_chain(capsys):
    root = EXAMPLES.parent
    shipped = [EXAMPLES / "chain.yaml", *sorted((root / "bench" / "chains").glob("*.yaml"))]
    assert len(shipped) > 1
    for path in shipped:
        assert run(capsys, "validate", str(path)) == (0, "OK\n", ""), path


def test_the_gateway_refuses_a_route_to_a_chain_the_file_does_not_define(capsys, tmp_path):
    path = tmp_path / "chain.yaml"
    path.write_text("chains:\n  default: [{name: rate_limiter, config: {limit: 5, window: 1m}}]\n")
    code, _, err = run(
        capsys, "gateway", "--config", str(path), "--upstream", "http://127.0.0.1:9", "--route", "/premium/=premium",
    )
    assert code == 1
    assert err == (
        f"error: --route /premium/=premium: {path} defines no such chain (chains defined: default), "
        "so every request on the route would get 500 unknown_chain\n"
    )
