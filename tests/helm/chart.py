"""The chart as the tests see it: rendered by Helm's own Go SDK (helm-python-sdk), parsed into
Kubernetes objects, and the few lookups the tests share (a Deployment's container, a template's
objects, the values that differ from the defaults in a realistic install)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).parents[2]
CHART = ROOT / "deploy" / "helm" / "pluginchain"
RELEASE = "gw"
NAMESPACE = "pluginchain"

# What a production install typically changes: another provider on a custom port, a routed chain,
# bigger bodies, fail-open, a namespaced operator, custom plugins, monitoring, scheduling.
REALISTIC = {
    "imagePullSecrets": [{"name": "registry"}],
    "plugins": ["my_company.plugins"],
    "pushToken": {"value": "0123456789abcdef0123456789abcdef-token"},
    "operator": {
        "image": {"repository": "registry.example.com/pluginchain-operator", "tag": "0.1.0-rc1"},
        "watchNamespaces": ["team-a", "team-b"],
        "logLevel": "debug",
        "serviceAccount": {"annotations": {"iam.gke.io/gcp-service-account": "pc@example.iam.gserviceaccount.com"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
    },
    "gateway": {
        "name": "premium-gateway",
        "replicas": 3,
        "upstream": "https://llm.example.com:8443",
        "routes": [{"prefix": "/premium/", "chain": "premium"}, {"prefix": "/v1/embeddings", "chain": "embeddings"}],
        "maxBodyBytes": 10 * 1024 * 1024,
        "drainSeconds": 20,
        "terminationGracePeriodSeconds": 40,
        "podLabels": {"team": "ml-platform"},
        "podAnnotations": {"prometheus.io/scrape": "false"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gateway", "effect": "NoSchedule"}],
        "topologySpreadConstraints": [
            {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"},
        ],
        "envoy": {"messageTimeout": "2.5s", "upstreamTimeout": "120s", "failureModeAllow": True, "concurrency": 4},
        "sidecar": {"image": {"repository": "registry.example.com/pluginchain-sidecar", "tag": "0.1.0-rc1"}},
        "service": {"type": "LoadBalancer", "port": 443, "annotations": {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"}},
        "podDisruptionBudget": {"maxUnavailable": "34%"},
        "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prometheus"}},
    },
}

# The gateway without Envoy: the sidecar alone, for an Envoy Gateway or Istio ingress to call.
SIDECAR_ONLY = {"operator": {"enabled": False}, "pushToken": {"existingSecret": "pluginchain-push-token"},
                "gateway": {"envoy": {"enabled": False}}}

VALUE_SETS = {"defaults": {}, "realistic": REALISTIC, "sidecar-only": SIDECAR_ONLY}


@dataclass
class Rendered:
    """One render of the chart: every object, with the template it came from."""

    objects: list[tuple[str, dict[str, Any]]]

    def all(self) -> list[dict[str, Any]]:
        return [obj for _, obj in self.objects]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.all() if obj["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [obj for obj in self.of_kind(kind) if obj["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, found {[o['metadata']['name'] for o in self.of_kind(kind)]}"
        return found[0]

    def deployment(self, component: str) -> dict[str, Any]:
        found = [d for d in self.of_kind("Deployment")
                 if d["metadata"]["labels"].get("app.kubernetes.io/component") == component]
        assert len(found) == 1, f"expected one {component} Deployment"
        return found[0]

    def envoy_config(self) -> dict[str, Any]:
        configmap = self.get("ConfigMap", f"{RELEASE}-pluginchain-envoy")
        return yaml.safe_load(configmap["data"]["envoy.yaml"])


def render(values: dict[str, Any] | None = None, *, name: str = RELEASE, namespace: str = NAMESPACE) -> Rendered:
    """Render like ``helm template`` (no cluster: ``lookup`` finds nothing)."""
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values or {})
        manifests = chart.render(values or {}, name=name, namespace=namespace, is_install=True)
    objects = []
    for template, text in sorted(manifests.items()):
        if not template.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        objects.extend((template, obj) for obj in yaml.safe_load_all(text) if obj)
    return Rendered(objects)


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert name in containers, f"no container {name} in {sorted(containers)}"
    return containers[name]


def container_port(container_spec: dict[str, Any], port: int | str) -> int:
    """A probe's port, resolved like the kubelet does: a number, or a named container port."""
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container_spec["ports"] if p["name"] == port)
