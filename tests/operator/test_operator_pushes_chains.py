"""The real operator process, against an emulated Kubernetes API, pushes PluginChains into real
sidecar processes, and reports per pod on the resource."""

from __future__ import annotations

import grpc
import pytest

from pluginchain.v1 import config_pb2, config_pb2_grpc
from tests.support.harness import Gateway, start_upstream, wait_until
from tests.support.sidecars import TOKEN, add_pods, ready_condition

LABELS = {"app": "llm-gateway"}
FILTER = [{"name": "content_filter", "config": {"banned_patterns": ["forbidden"]}}]
STRICT_FILTER = [{"name": "content_filter", "config": {"banned_patterns": ["forbidden", "secret"]}}]


def spec(plugins, chain="default", labels=LABELS) -> dict:
    return {"selector": {"matchLabels": labels}, "chain": chain, "plugins": plugins}


def status_when(cluster, namespace, name, predicate, timeout=15.0) -> dict:
    holder: dict = {}

    def check() -> bool:
        holder["chain"] = cluster.get_chain(namespace, name)
        return predicate(holder["chain"].get("status") or {})

    try:
        wait_until(check, timeout=timeout, what="PluginChain status")
    except TimeoutError:
        raise AssertionError(f"status never matched: {holder.get('chain', {}).get('status')}") from None
    return holder["chain"]["status"]


def all_applied(count: int):
    return lambda status: status.get("sidecars") == f"{count}/{count}" and ready_condition({"status": status}).get("status") == "True"


@pytest.fixture
def gateway_in_front(tmp_path):
    """A real Envoy in front of one sidecar (its ext_proc port), with the demo upstream behind."""
    started = []

    def start(sidecar) -> Gateway:
        upstream = start_upstream(tmp_path)
        gateway = Gateway(tmp_path, tmp_path / "unused.yaml", upstream, sidecar_port=sidecar.extproc_port)
        started.append((gateway, upstream))
        gateway.start_envoy()
        return gateway

    yield start
    for gateway, upstream in started:
        gateway.stop()
        upstream.process.stop()


def test_create_update_and_invalid_update(cluster, operator, namespace, sidecars, gateway_in_front):
    pods = sidecars(3)
    add_pods(cluster, namespace, pods, LABELS)
    gateway = gateway_in_front(pods[0])

    cluster.create_chain(namespace, "guard", spec(FILTER))
    status = status_when(cluster, namespace, "guard", all_applied(3))
    assert sorted(p["name"] for p in status["pods"]) == [p.name for p in pods]
    assert all(p["result"] == "Applied" and p["version"] > 0 for p in status["pods"])
    assert status["pluginCount"] == 1 and status["observedGeneration"] == 1
    assert gateway.chat("something forbidden").status_code == 403
    assert gateway.chat("a secret").status_code == 200

    cluster.update_chain(namespace, "guard", spec(STRICT_FILTER))
    status = status_when(cluster, namespace, "guard", lambda s: s.get("observedGeneration") == 2 and all_applied(3)(s))
    wait_until(lambda: gateway.chat("a secret").status_code == 403, timeout=10, what="new behaviour")
    version = status["version"]

    bad = [{"name": "content_filter", "config": {"banned_patterns": ["(unclosed"]}}]
    cluster.update_chain(namespace, "guard", spec(bad))
    status = status_when(cluster, namespace, "guard", lambda s: ready_condition({"status": s}).get("reason") == "InvalidSpec")
    assert status["errors"] == ["spec.plugins[0] (content_filter).config.banned_patterns[0]: not a valid RE2 pattern: missing )"]
    # The old behaviour stays: nothing was pushed.
    assert gateway.chat("a secret").status_code == 403
    assert all(p.get_version() == version for p in pods)
    assert any(e["reason"] == "InvalidSpec" for e in cluster.events(namespace))


def test_an_unreachable_pod_is_reported_and_the_others_apply(cluster, operator, namespace, sidecars):
    pods = sidecars(2)
    add_pods(cluster, namespace, pods, LABELS)
    cluster.create_pod(namespace, "ghost", LABELS, config_port=1)  # nothing listens there
    cluster.create_chain(namespace, "guard", spec(FILTER))

    def reported(status) -> bool:
        results = {p["name"]: p["result"] for p in status.get("pods", [])}
        return results == {pods[0].name: "Applied", pods[1].name: "Applied", "ghost": "Failed"}

    status = status_when(cluster, namespace, "guard", reported)
    ghost = next(p for p in status["pods"] if p["name"] == "ghost")
    assert "unreachable" in ghost["message"]
    assert status["sidecars"] == "2/3"
    assert ready_condition({"status": status})["reason"] == "PushFailed"
    assert all(p.chains() == {"default": ["content_filter"]} for p in pods)


def test_a_restarted_sidecar_serves_its_last_plan_at_once_and_is_pushed_again(cluster, operator, namespace, sidecars):
    [pod] = sidecars(1)
    add_pods(cluster, namespace, [pod], LABELS)
    cluster.create_chain(namespace, "guard", spec(FILTER))
    status = status_when(cluster, namespace, "guard", all_applied(1))
    first_version = status["version"]

    pod.stop()
    pod.start()
    # Before the operator reaches it: the state file already brought back the last good plan.
    assert pod.get_version() == first_version
    assert pod.chains() == {"default": ["content_filter"]}
    # The kubelet reports the container restart; the operator pushes again.
    cluster.patch_pod(namespace, pod.name, {"status": {"containerStatuses": [{"name": "sidecar", "ready": True, "restartCount": 1}]}})
    wait_until(lambda: pod.get_version() > first_version, timeout=10, what="re-push after restart")
    status_when(cluster, namespace, "guard", lambda s: all_applied(1)(s) and s["version"] > first_version)


def test_chains_sharing_a_pod_arrive_in_one_apply_and_delete_removes_one(cluster, operator, namespace, sidecars):
    pods = sidecars(2)
    add_pods(cluster, namespace, pods, LABELS)
    cluster.create_chain(namespace, "guard", spec(FILTER))
    cluster.create_chain(namespace, "premium", spec([{"name": "rate_limiter", "config": {"limit": 100}}], chain="premium"))
    status_when(cluster, namespace, "guard", all_applied(2))
    status_when(cluster, namespace, "premium", all_applied(2))
    assert all(p.chains() == {"default": ["content_filter"], "premium": ["rate_limiter"]} for p in pods)

    cluster.delete_chain(namespace, "guard")
    wait_until(lambda: all(p.chains() == {"premium": ["rate_limiter"]} for p in pods), timeout=10, what="chain removed")
    wait_until(lambda: not cluster.chain_exists(namespace, "guard"), timeout=10, what="finalizer released")


def test_a_second_chain_of_the_same_name_on_a_pod_is_refused_there(cluster, operator, namespace, sidecars):
    [pod] = sidecars(1)
    add_pods(cluster, namespace, [pod], LABELS)
    cluster.create_chain(namespace, "first", spec(FILTER))
    status_when(cluster, namespace, "first", all_applied(1))
    cluster.create_chain(namespace, "second", spec([{"name": "rate_limiter"}]))
    status = status_when(cluster, namespace, "second", lambda s: any(p["result"] == "Failed" for p in s.get("pods", [])))
    assert "comes from the older PluginChain" in status["pods"][0]["message"]
    assert pod.chains() == {"default": ["content_filter"]}


def test_a_pod_that_appears_later_gets_the_chain(cluster, operator, namespace, sidecars):
    cluster.create_chain(namespace, "guard", spec(FILTER))
    status_when(cluster, namespace, "guard", lambda s: ready_condition({"status": s}).get("reason") == "NoMatchingPods")
    [pod] = sidecars(1)
    add_pods(cluster, namespace, [pod], LABELS)
    status_when(cluster, namespace, "guard", all_applied(1))
    assert pod.chains() == {"default": ["content_filter"]}


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_a_push_without_the_token_is_refused_and_changes_nothing(cluster, operator, namespace, sidecars, token):
    [pod] = sidecars(1)
    add_pods(cluster, namespace, [pod], LABELS)
    cluster.create_chain(namespace, "guard", spec(FILTER))
    status_when(cluster, namespace, "guard", all_applied(1))
    version = pod.get_version()
    hostile = config_pb2.ChainSet(version=version + 10**9, chains=[config_pb2.Chain(name="default")])
    with grpc.insecure_channel(f"127.0.0.1:{pod.config_port}") as channel:
        stub = config_pb2_grpc.ConfigServiceStub(channel)
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        with pytest.raises(grpc.RpcError) as refused:
            stub.Apply(config_pb2.ApplyRequest(chain_set=hostile), metadata=metadata, timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert pod.get_version() == version
    assert pod.chains() == {"default": ["content_filter"]}
    assert TOKEN not in pod.process.output()
