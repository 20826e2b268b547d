"""The gateway pod as the chart renders it, run for real: Envoy with the rendered ConfigMap and the
sidecar with the rendered args (only the pod's volumes moved into a temporary directory), probed
the way the kubelet probes them. The pod fails closed until the operator pushes, then runs what
was pushed.

The kubelet probes the pod IP, not loopback: here 127.0.0.2 plays the pod IP, which a server
bound to 127.0.0.1 (like ext_proc beside Envoy, or Envoy's admin) does not answer, exactly as in
a pod.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pluginchain._config.registry import default_registry
from pluginchain._config.validation import validate_document
from pluginchain._config.wire import chain_to_wire
from pluginchain._sidecar.gateway import envoy_binary
from pluginchain.v1 import config_pb2
from pluginchain_operator.pushing import PushCredentials, apply
from tests.helm.chart import container_port, render
from tests.support.harness import BIN, Process, free_port, start_upstream, wait_until

POD_IP = "127.0.0.2"
TOKEN = "pod-test-push-token-0123456789abcdef"


@dataclass
class Pod:
    """The rendered gateway pod's containers as local processes."""

    spec: dict
    processes: dict[str, Process]
    config_port: int
    envoy_port: int
    admin_port: int
    token_file: Path

    def url(self, path: str) -> str:
        return f"http://{POD_IP}:{self.envoy_port}{path}"


def _materialise_volumes(rendered, pod_spec: dict, root: Path) -> dict[str, Path]:
    """Each volume of the pod as a local directory with the files Kubernetes would mount."""
    directories = {}
    for volume in pod_spec["volumes"]:
        directory = root / "volumes" / volume["name"]
        directory.mkdir(parents=True)
        if "configMap" in volume:
            for name, text in rendered.get("ConfigMap", volume["configMap"]["name"])["data"].items():
                (directory / name).write_text(text)
        elif "secret" in volume:
            for name, data in rendered.get("Secret", volume["secret"]["secretName"])["data"].items():
                (directory / name).write_bytes(base64.b64decode(data))
        else:
            assert "emptyDir" in volume, volume
        directories[volume["name"]] = directory
    return directories


def _local_args(spec: dict, directories: dict[str, Path]) -> list[str]:
    """The container's args with each path under a mount moved to its volume's local directory
    (in "--flag=PATH" and in "--flag PATH" form)."""
    mounts = sorted(spec.get("volumeMounts", []), key=lambda m: len(m["mountPath"]), reverse=True)
    args = []
    for arg in spec["args"]:
        flag, separator, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        for mount in mounts:
            if value == mount["mountPath"] or value.startswith(mount["mountPath"] + "/"):
                value = str(directories[mount["name"]]) + value[len(mount["mountPath"]):]
                break
        args.append(flag + separator + value)
    return args


@pytest.fixture
def start_pod(tmp_path):
    """Start the rendered gateway pod: ``start_pod(envoy=True)``; stops it after the test."""
    started: list[Process] = []
    upstream = start_upstream(tmp_path)

    def start(envoy: bool = True) -> Pod:
        ports = {name: free_port() for name in ("envoy", "admin", "ready", "ext_proc", "config", "metrics")}
        rendered = render({
            "pushToken": {"value": TOKEN},
            "gateway": {
                "upstream": upstream.url,
                "drainSeconds": 0,
                "envoy": {"enabled": envoy, "port": ports["envoy"], "adminPort": ports["admin"],
                          "readyPort": ports["ready"], "logLevel": "error"},
                "sidecar": {"extProcPort": ports["ext_proc"], "configPort": ports["config"], "metricsPort": ports["metrics"]},
            },
        })
        pod_spec = rendered.deployment("gateway")["spec"]["template"]["spec"]
        directories = _materialise_volumes(rendered, pod_spec, tmp_path / f"pod-{len(started)}")
        # The images' entrypoints: `pluginchain` (deploy/docker/sidecar.Dockerfile) and Envoy's.
        commands = {"sidecar": [str(BIN / "pluginchain")], "envoy": [envoy_binary()]}
        processes = {}
        for spec in pod_spec["containers"]:
            processes[spec["name"]] = Process(spec["name"], commands[spec["name"]] + _local_args(spec, directories), tmp_path)
            started.append(processes[spec["name"]])
        pod = Pod(pod_spec, processes, ports["config"], ports["envoy"], ports["admin"], directories["push-token"] / "token")
        try:
            wait_until(lambda: _all_pass(_probes(pod), but=UNTIL_PUSHED) or not all(p.alive() for p in processes.values()),
                       what="every probe of the rendered pod but the sidecar's readiness")
        except TimeoutError:
            pytest.fail(f"probes of the rendered pod: {_probes(pod)}")
        for process in processes.values():
            assert process.alive(), process.output()
        return pod

    yield start
    for process in started:
        process.stop()
    upstream.process.stop()


def _probe(spec: dict, probe: dict) -> bool:
    """One kubelet probe against the pod IP: True when it would pass."""
    if "grpc" in probe:
        with grpc.insecure_channel(f"{POD_IP}:{probe['grpc']['port']}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", "")), timeout=1)
            except grpc.RpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    get = probe["httpGet"]
    try:
        response = httpx.get(f"http://{POD_IP}:{container_port(spec, get['port'])}{get['path']}", timeout=1)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def _probes(pod: Pod) -> dict[str, bool]:
    results = {}
    for spec in pod.spec["containers"]:
        for kind in ("readinessProbe", "livenessProbe"):
            results[f"{spec['name']} {kind}"] = _probe(spec, spec[kind])
    return results


# The one probe that waits for the operator: a pod with no chains takes no traffic.
UNTIL_PUSHED = "sidecar readinessProbe"


def _all_pass(probes: dict[str, bool], but: str | None = None) -> bool:
    return all(passed for name, passed in probes.items() if name != but)


def _chat(pod: Pod, content: str) -> httpx.Response:
    body = {"model": "demo-model", "messages": [{"role": "user", "content": content}]}
    return httpx.post(pod.url("/v1/chat/completions"), json=body, timeout=10)


def _push_content_filter(pod: Pod) -> None:
    registry = default_registry([])
    plugins = [{"name": "content_filter", "config": {"banned_patterns": ["(?i)forbidden"]}}]
    chain = validate_document({"chains": {"default": plugins}}, registry)["default"]
    chain_set = config_pb2.ChainSet(version=1, chains=[chain_to_wire(chain, "PluginChain pluginchain/test")])
    reply = asyncio.run(apply(f"{POD_IP}:{pod.config_port}", chain_set, PushCredentials(pod.token_file), timeout=5))
    assert reply.active_version == 1


def test_the_rendered_pod_is_ready_once_pushed_fails_closed_before_and_runs_pushed_chains(start_pod):
    pod = start_pod()

    # No PluginChain pushed yet: the pod stays out of the Service, and a request that reaches
    # it anyway fails closed, never reaching the LLM unchecked. Liveness passes: no restarts.
    probes = _probes(pod)
    assert probes[UNTIL_PUSHED] is False and _all_pass(probes, but=UNTIL_PUSHED), probes
    refused = _chat(pod, "hello")
    assert refused.status_code == 500, refused.text
    assert "error" in refused.json()

    _push_content_filter(pod)

    assert all(_probes(pod).values()), _probes(pod)
    assert _chat(pod, "hello").status_code == 200
    assert _chat(pod, "something FORBIDDEN").status_code == 403

    # What the metrics Service targets answers on the pod IP.
    sidecar = next(spec for spec in pod.spec["containers"] if spec["name"] == "sidecar")
    metrics = httpx.get(f"http://{POD_IP}:{container_port(sidecar, 'metrics')}/metrics", timeout=5)
    assert metrics.status_code == 200


def test_envoy_admin_is_out_of_reach_of_the_pod_network(start_pod):
    pod = start_pod()
    envoy = next(spec for spec in pod.spec["containers"] if spec["name"] == "envoy")
    ready_port = container_port(envoy, envoy["readinessProbe"]["httpGet"]["port"])

    # The admin interface answers on loopback only (this is what would stop Envoy from the network).
    assert httpx.get(f"http://127.0.0.1:{pod.admin_port}/ready", timeout=5).status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"http://{POD_IP}:{pod.admin_port}/quitquitquit", timeout=5)
    # The port the kubelet probes answers /ready and nothing of the admin interface.
    assert httpx.get(f"http://{POD_IP}:{ready_port}/ready", timeout=5).status_code == 200
    for path in ("/quitquitquit", "/healthcheck/fail", "/logging?level=trace"):
        assert httpx.post(f"http://{POD_IP}:{ready_port}{path}", timeout=5).status_code == 404
    assert httpx.get(f"http://{POD_IP}:{ready_port}/config_dump", timeout=5).status_code == 404
    assert pod.processes["envoy"].alive()

    # /ready follows Envoy's own health: failed from the admin interface, the probe fails too.
    assert httpx.post(f"http://127.0.0.1:{pod.admin_port}/healthcheck/fail", timeout=5).status_code == 200
    assert httpx.get(f"http://{POD_IP}:{ready_port}/ready", timeout=5).status_code == 503


def test_without_envoy_the_sidecar_passes_its_probes_on_the_pod_network_once_pushed(start_pod):
    pod = start_pod(envoy=False)
    assert [spec["name"] for spec in pod.spec["containers"]] == ["sidecar"]
    assert _probes(pod) == {"sidecar readinessProbe": False, "sidecar livenessProbe": True}

    _push_content_filter(pod)

    assert all(_probes(pod).values()), _probes(pod)
