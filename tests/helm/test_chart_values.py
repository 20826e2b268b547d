"""The chart lints clean, rejects bad values at install with the key's path, and documents every
value it accepts."""

from __future__ import annotations

import re

import helm_python as helm
import pytest
import yaml

from tests.helm.chart import CHART, REALISTIC, SIDECAR_ONLY, container, render


def _findings(report: dict) -> list[dict]:
    """Lint messages worse than informational (severity 2 = warning, 3 = error)."""
    return [m for m in report["messages"] if m["severity"] >= 2]


@pytest.mark.parametrize("values", [{}, REALISTIC, SIDECAR_ONLY], ids=["defaults", "realistic", "sidecar-only"])
@pytest.mark.parametrize("kube_version", ["v1.30.0", "v1.35.0"])
def test_lint_is_clean(values, kube_version):
    report = helm.lint(CHART, values, strict=True, namespace="pluginchain", kube_version=kube_version)
    assert report["errors"] == [] and _findings(report) == [], report


def test_lint_reports_bad_values():
    report = helm.lint(CHART, {"gateway": {"replicas": 0}}, namespace="pluginchain")
    assert any("/gateway/replicas" in error for error in report["errors"]), report


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"gateway": {"upstream": "ftp://llm.example.com"}}, "/gateway/upstream"),
        # Envoy forwards paths as they come: a base path would be silently dropped.
        ({"gateway": {"upstream": "https://llm.example.com/v1"}}, "/gateway/upstream"),
        ({"gateway": {"routes": [{"prefix": "premium", "chain": "premium"}]}}, "/gateway/routes/0/prefix"),
        ({"gateway": {"routes": [{"prefix": "/premium/", "chain": "Premium Chain"}]}}, "/gateway/routes/0/chain"),
        ({"gateway": {"routes": [{"prefix": "/premium/"}]}}, "/gateway/routes/0"),
        ({"gateway": {"replicas": 0}}, "/gateway/replicas"),
        ({"gateway": {"maxBodyBytes": "4Mi"}}, "/gateway/maxBodyBytes"),
        # Envoy reads protobuf durations: "250ms" would fail only when the pod starts.
        ({"gateway": {"envoy": {"messageTimeout": "250ms"}}}, "/gateway/envoy/messageTimeout"),
        ({"gateway": {"envoy": {"failureModeAllow": "yes"}}}, "/gateway/envoy/failureModeAllow"),
        ({"gateway": {"sidecar": {"configPort": 70000}}}, "/gateway/sidecar/configPort"),
        ({"gateway": {"replica": 3}}, "replica"),
        ({"gateway": {"service": {"type": "Ingress"}}}, "/gateway/service/type"),
        ({"gateway": {"podDisruptionBudget": {"maxUnavailable": 0}}}, "/gateway/podDisruptionBudget/maxUnavailable"),
        ({"pushToken": {"value": "too-short"}}, "/pushToken/value"),
        ({"operator": {"watchNamespaces": ["Team_A"]}}, "/operator/watchNamespaces/0"),
        ({"operator": {"logLevel": "verbose"}}, "/operator/logLevel"),
        ({"plugins": ["./my_plugins.py"]}, "/plugins/0"),
        ({"gateway": {"sidecar": {"secretMounts": [{"name": "keys", "secretName": "k", "mountPath": "keys"}]}}},
         "/gateway/sidecar/secretMounts/0/mountPath"),
    ],
)
def test_bad_values_fail_at_install_naming_the_key(values, where):
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError) as failure:
        chart.validate_schema(values)
    assert where in str(failure.value)


def test_a_grace_period_shorter_than_the_drain_fails_with_the_reason():
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds .* must exceed"):
        render({"gateway": {"drainSeconds": 60, "terminationGracePeriodSeconds": 45}})


@pytest.mark.parametrize("envoy", [True, False])
def test_two_gateway_ports_that_collide_fail_with_the_reason(envoy):
    with pytest.raises(helm.HelmRenderError, match="gateway ports must differ"):
        render({"gateway": {"envoy": {"enabled": envoy, "readyPort": 9090}, "sidecar": {"configPort": 9090}}})


def test_ports_only_envoy_would_use_may_repeat_when_envoy_is_off():
    rendered = render({"gateway": {"envoy": {"enabled": False, "readyPort": 50052}}})
    assert rendered.deployment("gateway")


def _keys_with_comments(text: str) -> list[tuple[str, bool, bool]]:
    """(dotted key, whether a `# --` comment block sits right above it, whether it is a leaf)."""
    lines = text.splitlines()
    found: list[tuple[str, int, bool]] = []  # (path, indent, documented)
    stack: list[tuple[int, str]] = []
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9]*):(.*)$", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([key for _, key in stack] + [match.group(2)])
        above = number - 1
        block = []
        while above >= 0 and lines[above].strip().startswith("#"):
            block.append(lines[above].strip())
            above -= 1
        documented = any(comment.startswith("# --") for comment in block)
        found.append((path, indent, documented))
        stack.append((indent, match.group(2)))
    keys = []
    for index, (path, indent, documented) in enumerate(found):
        following = found[index + 1][1] if index + 1 < len(found) else -1
        keys.append((path, documented, following <= indent))
    return keys


def test_every_value_is_documented_in_values_yaml():
    keys = _keys_with_comments((CHART / "values.yaml").read_text())
    documented = {path for path, is_documented, _ in keys if is_documented}
    undocumented = [
        path for path, _, leaf in keys
        if leaf and not any(path == d or path.startswith(d + ".") for d in documented)
    ]
    assert len(keys) > 50  # the parser saw the file
    assert undocumented == []


def test_the_documentation_check_sees_a_missing_comment():
    keys = _keys_with_comments("gateway:\n  # -- Pods.\n  replicas: 2\n  upstream: https://x\n")
    assert ("gateway.upstream", False, True) in keys and ("gateway.replicas", True, True) in keys


def test_every_default_is_in_the_schema():
    """Every object forbids unknown keys, so a value the schema does not know fails the defaults."""
    with helm.Chart.load(CHART) as chart:
        schema = chart.schema
        defaults = yaml.safe_load((CHART / "values.yaml").read_text())
        chart.validate_schema(defaults)

    def forbids_unknown(node: dict, where: str) -> None:
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, where
            for name, child in node["properties"].items():
                forbids_unknown(child, f"{where}.{name}")

    forbids_unknown(schema, "values")


def test_secret_mounts_reach_the_sidecar_read_only_and_nothing_else():
    mounts = [{"name": "llm-keys", "secretName": "llm-gateway-keys", "mountPath": "/etc/pluginchain/keys"}]
    pod = render({"gateway": {"sidecar": {"secretMounts": mounts}}}).deployment("gateway")["spec"]["template"]["spec"]
    sidecar = container({"spec": {"template": {"spec": pod}}}, "sidecar")
    assert {"name": "llm-keys", "mountPath": "/etc/pluginchain/keys", "readOnly": True} in sidecar["volumeMounts"]
    assert {"name": "llm-keys", "secret": {"secretName": "llm-gateway-keys", "defaultMode": 0o440}} in pod["volumes"]
    envoy = container({"spec": {"template": {"spec": pod}}}, "envoy")
    assert all(mount["name"] != "llm-keys" for mount in envoy["volumeMounts"])


def test_max_streams_caps_the_sidecar_and_opens_envoys_circuit_breaker_as_wide():
    rendered = render({"gateway": {"sidecar": {"maxStreams": 512}}})
    assert "--max-streams=512" in container(rendered.deployment("gateway"), "sidecar")["args"]
    [sidecar_cluster] = [c for c in rendered.envoy_config()["static_resources"]["clusters"] if c["name"] == "pluginchain_sidecar"]
    assert sidecar_cluster["circuit_breakers"] == {"thresholds": [{"max_requests": 512}]}
