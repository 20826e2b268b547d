"""The operator's RBAC is exactly what it uses. The real operator, started with the args the chart
gives it, runs against an emulated API server that serves what a cluster serves, while gateway
pods and PluginChains come, change (an invalid spec posts a warning Event) and go. Every request
it made must be allowed by the chart's rules, and every rule must have been used.

Run in both of the chart's shapes: all namespaces (a ClusterRole) and a list of namespaces (a Role
in each, nothing cluster-wide).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pluginchain_operator.resources import CONFIG_PORT_ANNOTATION
from tests.helm.chart import container, render
from tests.helm.kube import FullCluster
from tests.support.cluster import RecordedRequest
from tests.support.harness import BIN, Process, free_port, wait_until
from tests.support.sidecars import ready_condition

# Non-resource URLs every authenticated client may read (the built-in system:discovery and
# system:public-info-viewer ClusterRoles): API discovery and the server version.
DISCOVERY_DEPTHS = {"api": (1, 2), "apis": (1, 2, 3)}

# The emulator authenticates nobody; the kubeconfig it writes gives the operator this token, which
# tells the operator's requests from the test's own.
OPERATOR_AUTHORIZATION = "Bearer kmock"


@dataclass(frozen=True)
class Call:
    """A request as the API server's authorizer sees it."""

    namespace: str | None  # None: cluster-scoped, or across all namespaces
    group: str
    resource: str  # with "/subresource"
    verb: str


def authorization_attributes(request: RecordedRequest) -> Call | None:
    """The RBAC attributes of a request; None for a non-resource (discovery) URL."""
    parts = request.path.strip("/").split("/")
    if parts[0] == "api":
        group, rest = "", parts[2:]
    elif parts[0] == "apis":
        group, rest = parts[1] if len(parts) > 1 else "", parts[3:]
    else:
        return None
    if not rest:
        return None
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    resource, name, subresource = rest[0], rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None
    watching = request.params.get("watch") in ("true", "1")
    verb = {
        "GET": "watch" if watching else ("get" if name else "list"),
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if name else "deletecollection",
    }[request.method]
    return Call(namespace, group, f"{resource}/{subresource}" if subresource else resource, verb)


def is_discovery(path: str) -> bool:
    parts = path.strip("/").split("/")
    return path.strip("/") == "version" or len(parts) in DISCOVERY_DEPTHS.get(parts[0], ())


@dataclass(frozen=True)
class Grant:
    namespace: str | None  # None: a ClusterRole, good in every namespace and cluster-wide
    group: str
    resource: str
    verb: str


def grants(rendered) -> set[Grant]:
    """What the chart's Roles and ClusterRoles allow the operator's ServiceAccount."""
    operator_account = rendered.deployment("operator")["spec"]["template"]["spec"]["serviceAccountName"]
    allowed = set()
    for kind, binding_kind in (("ClusterRole", "ClusterRoleBinding"), ("Role", "RoleBinding")):
        for role in rendered.of_kind(kind):
            namespace = role["metadata"].get("namespace") if kind == "Role" else None
            bound = any(
                b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role["metadata"]["name"]}
                and b["metadata"].get("namespace") == namespace
                and {"kind": "ServiceAccount", "name": operator_account} in [
                    {"kind": s["kind"], "name": s["name"]} for s in b["subjects"]]
                for b in rendered.of_kind(binding_kind)
            )
            assert bound, f"{kind} {role['metadata']['name']} is bound to nobody"
            for rule in role["rules"]:
                allowed |= {Grant(namespace, g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return allowed


def allows(grant: Grant, call: Call) -> bool:
    if (grant.group, grant.resource, grant.verb) != (call.group, call.resource, call.verb):
        return False
    return grant.namespace is None or grant.namespace == call.namespace


def test_requests_read_as_the_authorizer_reads_them():
    def call(method: str, path: str, **params: str) -> Call | None:
        return authorization_attributes(RecordedRequest(method, path, params, {}))

    assert call("GET", "/api/v1/pods", watch="true") == Call(None, "", "pods", "watch")
    assert call("GET", "/api/v1/namespaces/a/pods") == Call("a", "", "pods", "list")
    assert call("GET", "/api/v1/namespaces") == Call(None, "", "namespaces", "list")
    assert call("GET", "/api/v1/namespaces/a") == Call(None, "", "namespaces", "get")
    assert call("POST", "/api/v1/namespaces/a/events") == Call("a", "", "events", "create")
    assert call("PATCH", "/apis/pluginchain.io/v1alpha1/namespaces/a/pluginchains/x/status") == Call(
        "a", "pluginchain.io", "pluginchains/status", "patch")
    assert call("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions") == Call(
        None, "apiextensions.k8s.io", "customresourcedefinitions", "list")
    assert call("GET", "/apis/pluginchain.io/v1alpha1") is None and is_discovery("/apis/pluginchain.io/v1alpha1")
    assert not is_discovery("/api/v1/pods")


SPEC = {
    "selector": {"matchLabels": {"pluginchain.io/gateway": "llm-gateway"}},
    "plugins": [{"name": "rate_limiter", "config": {"limit": 10, "window": "1m"}}],
}


def _drive(cluster: FullCluster, namespace: str) -> None:
    """What the operator meets in a namespace: a gateway pod, a PluginChain that selects it (the
    push fails, nothing listens: a warning Event), an invalid update, and both going away."""
    cluster.create_pod(namespace, "gateway-0", {"pluginchain.io/gateway": "llm-gateway"}, config_port=free_port())
    cluster.create_chain(namespace, "chain", SPEC)
    wait_until(lambda: ready_condition(cluster.get_chain(namespace, "chain")).get("reason") == "PushFailed",
               what=f"status of {namespace}/chain")
    # Posted, whether or not kmock keeps it (it gives every Event of an object the same name).
    wait_until(lambda: any(r.method == "POST" and r.path == f"/api/v1/namespaces/{namespace}/events"
                           for r in cluster.requests()), what=f"a warning Event in {namespace}")
    cluster.update_chain(namespace, "chain", {**SPEC, "plugins": [{"name": "no_such_plugin"}]})
    wait_until(lambda: ready_condition(cluster.get_chain(namespace, "chain")).get("reason") == "InvalidSpec",
               what=f"InvalidSpec status of {namespace}/chain")
    cluster.http.delete(f"/api/v1/namespaces/{namespace}/pods/gateway-0").raise_for_status()
    cluster.delete_chain(namespace, "chain")
    wait_until(lambda: not cluster.chain_exists(namespace, "chain"), what="finalizer removed")


def _operator_argv(args: list[str], token_file: Path) -> list[str]:
    """The container's command: the image's entrypoint `pluginchain` with the chart's args, the
    token read from where the Secret would be mounted."""
    return [str(BIN / "pluginchain")] + [f"--token-file={token_file}" if a.startswith("--token-file=") else a for a in args]


@dataclass
class Recording:
    """One recorded run of the operator in one of the chart's shapes."""

    rendered: object
    made: list[RecordedRequest]
    output: str


def _record(watch: list[str], directory: Path) -> Recording:
    health_port = free_port()
    rendered = render({"operator": {"watchNamespaces": watch, "healthPort": health_port,
                                    "pushTimeout": 0.3, "retryDelay": 0.2, "resyncInterval": 1}})
    spec = container(rendered.deployment("operator"), "operator")
    token_file = directory / "token"
    token_file.write_text("rbac-test-token-0123456789abcdef")
    cluster = FullCluster().start()
    operator = None
    try:
        # Namespaces exist in a cluster before anything is installed into them.
        for namespace in watch or ["team-a"]:
            cluster.http.post("/api/v1/namespaces", json={
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}).raise_for_status()
        operator = Process("operator", _operator_argv(spec["args"], token_file), directory,
                           env={"KUBECONFIG": str(cluster.kubeconfig(directory / "kubeconfig"))})
        wait_until(lambda: "Initial authentication has finished" in operator.output() or not operator.alive(),
                   what="operator start")
        for namespace in watch or ["team-a"]:
            _drive(cluster, namespace)
        # The chart's liveness probe answers.
        liveness = spec["livenessProbe"]["httpGet"]
        assert httpx.get(f"http://127.0.0.1:{health_port}{liveness['path']}", timeout=5).status_code == 200
        assert operator.alive(), operator.output()
    finally:
        if operator is not None:
            operator.stop()
        recorded = cluster.requests()
        cluster.stop()
    made = [r for r in recorded if r.headers.get("Authorization") == OPERATOR_AUTHORIZATION]
    return Recording(rendered, made, operator.output())


SHAPES = {"all-namespaces": [], "listed-namespaces": ["team-b"]}


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> dict[str, Recording]:
    # One after the other: two kmock servers in one process would fight over aiohttp's resolver.
    return {shape: _record(watch, tmp_path_factory.mktemp(shape)) for shape, watch in SHAPES.items()}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_operator_rbac_allows_every_call_it_makes_and_nothing_else(shape, recordings):
    recording = recordings[shape]
    calls = {authorization_attributes(r) for r in recording.made} - {None}
    assert not [r.path for r in recording.made if authorization_attributes(r) is None and not is_discovery(r.path)]
    allowed = grants(recording.rendered)

    denied = sorted((c for c in calls if not any(allows(g, c) for g in allowed)), key=str)
    unused = sorted((g for g in allowed if not any(allows(g, c) for c in calls)), key=str)
    assert denied == [], f"the operator makes calls its RBAC denies: {denied}\n{recording.output[-1500:]}"
    assert unused == [], f"RBAC grants what the operator never uses: {unused}"
    # The run did exercise the operator: it watched, patched, wrote status and posted an Event.
    assert {c.verb for c in calls} >= {"list", "watch", "patch", "create"}


def test_the_annotation_the_operator_reads_is_the_one_the_pods_carry():
    pod = render().deployment("gateway")["spec"]["template"]
    assert CONFIG_PORT_ANNOTATION in pod["metadata"]["annotations"]
