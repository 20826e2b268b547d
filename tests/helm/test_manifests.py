"""What the chart renders is what a cluster accepts and what the operator needs: every object
validates against the Kubernetes schemas (strict: unknown fields are errors), the CRD is the
generated one, the gateway pods carry what the operator selects on, and every container is
hardened."""

from __future__ import annotations

import base64
import copy

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from pluginchain_operator.crd import render_crd
from pluginchain_operator.resources import CONFIG_PORT_ANNOTATION, LabelSelector
from tests.helm.chart import (
    CHART,
    NAMESPACE,
    REALISTIC,
    RELEASE,
    VALUE_SETS,
    container,
    render,
)

# The chart's minimum (Chart.yaml kubeVersion) and the newest kubernetes-validate ships.
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]
# Custom resources of other projects: no schema ships for them; checked below by hand.
NOT_IN_KUBERNETES = {"ServiceMonitor"}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_rendered_object_validates(name, kube_version):
    rendered = render(VALUE_SETS[name])
    checked = 0
    for template, obj in rendered.objects:
        if obj["kind"] in NOT_IN_KUBERNETES:
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{template}: {obj['kind']} {obj['metadata']['name']}: {path}: {error.message}")
        checked += 1
    assert checked >= 4


def test_the_validator_rejects_what_a_cluster_would():
    """Strict validation is not vacuous: an unknown field or a wrong type fails it."""
    deployment = render().deployment("gateway")
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"tcpSocket": {"port": 1}}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    for broken in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBE_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_the_chart_crd_is_the_generated_one_and_valid(kube_version):
    with helm.Chart.load(CHART) as chart:
        crds = chart.crds
    assert [c["filename"] for c in crds] == ["pluginchain/crds/pluginchains.pluginchain.io.yaml"]
    crd = yaml.safe_load(crds[0]["data"])
    assert crd == render_crd()
    kubernetes_validate.validate(crd, kube_version, strict=True)


def test_with_operator_and_gateway_off_only_the_crd_is_installed():
    """The CRD on its own: `helm install` with both off installs crds/ and nothing else."""
    assert render({"operator": {"enabled": False}, "gateway": {"enabled": False}}).all() == []
    report = helm.lint(CHART, {"operator": {"enabled": False}, "gateway": {"enabled": False}}, strict=True)
    assert report["errors"] == []


def test_the_operator_selects_the_gateway_pods_and_finds_their_config_port():
    for values in ({}, REALISTIC):
        rendered = render(values)
        pod = rendered.deployment("gateway")["spec"]["template"]
        gateway_name = (values.get("gateway") or {}).get("name", "llm-gateway")
        selector = LabelSelector.model_validate({"matchLabels": {"pluginchain.io/gateway": gateway_name}})
        assert selector.matches(pod["metadata"]["labels"])
        sidecar = container(rendered.deployment("gateway"), "sidecar")
        config_port = next(p["containerPort"] for p in sidecar["ports"] if p["name"] == "config")
        assert pod["metadata"]["annotations"][CONFIG_PORT_ANNOTATION] == str(config_port)
        assert f"--config-port={config_port}" in sidecar["args"]
    assert render(REALISTIC).deployment("gateway")["spec"]["template"]["metadata"]["labels"]["team"] == "ml-platform"


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_container_is_hardened(name):
    for deployment in render(VALUE_SETS[name]).of_kind("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        for spec in pod["containers"]:
            where = f"{deployment['metadata']['name']}/{spec['name']}"
            context = spec["securityContext"]
            assert context["runAsNonRoot"] is True, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert "livenessProbe" in spec, where
            assert spec["resources"]["requests"] and spec["resources"]["limits"]["memory"], where


def test_the_operator_runs_once_and_is_replaced_not_rolled():
    operator = render().deployment("operator")
    assert operator["spec"]["replicas"] == 1
    assert operator["spec"]["strategy"] == {"type": "Recreate"}


def test_the_sidecar_keeps_its_state_on_a_writable_volume():
    gateway = render().deployment("gateway")
    sidecar = container(gateway, "sidecar")
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    state_file = next(a.split("=", 1)[1] for a in sidecar["args"] if a.startswith("--state-file="))
    state_dir = state_file.rsplit("/", 1)[0]
    assert "emptyDir" in volumes[mounts[state_dir]]


def test_the_token_is_generated_taken_from_the_user_or_left_to_an_existing_secret():
    generated = render().get("Secret", f"{RELEASE}-pluginchain-push-token")
    assert len(base64.b64decode(generated["data"]["token"])) == 48
    given = render({"pushToken": {"value": "x" * 40}}).get("Secret", f"{RELEASE}-pluginchain-push-token")
    assert base64.b64decode(given["data"]["token"]) == b"x" * 40

    existing = render({"pushToken": {"existingSecret": "team-token"}})
    assert existing.of_kind("Secret") == []
    for deployment in existing.of_kind("Deployment"):
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["push-token"]["secret"]["secretName"] == "team-token"


def test_a_namespaced_operator_gets_roles_only_where_it_watches():
    rendered = render(REALISTIC)
    assert rendered.of_kind("ClusterRole") == [] and rendered.of_kind("ClusterRoleBinding") == []
    assert sorted(r["metadata"]["namespace"] for r in rendered.of_kind("Role")) == ["team-a", "team-b"]
    for binding in rendered.of_kind("RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-pluginchain-operator", "namespace": NAMESPACE}]
    args = container(rendered.deployment("operator"), "operator")["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args


def test_the_service_monitor_scrapes_the_sidecars_metrics_service():
    rendered = render(REALISTIC)
    monitor = rendered.get("ServiceMonitor", f"{RELEASE}-pluginchain-gateway")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    services = [s for s in rendered.of_kind("Service")
                if LabelSelector.model_validate(monitor["spec"]["selector"]).matches(s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in services] == [f"{RELEASE}-pluginchain-gateway-metrics"]
    port_names = {p["name"] for p in services[0]["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    sidecar = container(rendered.deployment("gateway"), "sidecar")
    assert services[0]["spec"]["ports"][0]["targetPort"] in {p["name"] for p in sidecar["ports"]}
    assert render().of_kind("ServiceMonitor") == []


def test_services_select_the_gateway_pods_and_reach_named_ports():
    for values in VALUE_SETS.values():
        rendered = render(values)
        gateway = rendered.deployment("gateway")
        pod_labels = gateway["spec"]["template"]["metadata"]["labels"]
        port_names = {p["name"] for c in gateway["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for service in rendered.of_kind("Service"):
            assert LabelSelector.model_validate({"matchLabels": service["spec"]["selector"]}).matches(pod_labels)
            assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
        disruption_budget = rendered.of_kind("PodDisruptionBudget")[0]
        assert LabelSelector.model_validate(disruption_budget["spec"]["selector"]).matches(pod_labels)


def test_without_envoy_the_sidecar_serves_ext_proc_on_the_pod_network():
    rendered = render(VALUE_SETS["sidecar-only"])
    gateway = rendered.deployment("gateway")
    assert [c["name"] for c in gateway["spec"]["template"]["spec"]["containers"]] == ["sidecar"]
    assert "--host=0.0.0.0" in container(gateway, "sidecar")["args"]
    service = rendered.get("Service", f"{RELEASE}-pluginchain-gateway")
    assert service["spec"]["ports"][0]["appProtocol"] == "grpc"
    assert rendered.of_kind("ConfigMap") == []
    with_envoy = container(render().deployment("gateway"), "sidecar")
    assert "--host=127.0.0.1" in with_envoy["args"]
