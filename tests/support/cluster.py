"""A stand-in Kubernetes API for operator tests: kmock's KubernetesEmulator served over HTTP from a
background thread, so the real operator process can watch and patch it like a cluster, and tests
can drive it over HTTP like kubectl."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import kmock
import yaml
from kmock._internal import parsing

from pluginchain_operator.resources import GROUP, KIND, PLURAL, SHORT_NAMES, VERSION

_original_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    # kmock 0.8 reads /api/v1/namespaces (the cluster-scoped list of namespaces) as a request
    # inside a namespace with no name; only /namespaces/NAME/PLURAL... is namespaced.
    parts = path.strip("/").split("/")
    if len(parts) in (3, 4) and parts[:3] == ["api", "v1", "namespaces"]:
        return parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) == 4 else None, None)
    return _original_parse_path(path)


parsing.parse_path = _parse_path


@dataclass(frozen=True)
class RecordedRequest:
    """One request the emulator received, as an API server's authorizer sees it."""

    method: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]


class Cluster:
    """The emulated API server; ``url`` is what a kubeconfig points at."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kmock", daemon=True)
        self._stack = None
        self.url = ""
        self.http: httpx.Client | None = None

    def start(self) -> Cluster:
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        self.http = httpx.Client(base_url=self.url, timeout=10)
        return self

    async def _start(self) -> str:
        emulator = kmock.KubernetesEmulator()
        emulator.resources[f"{GROUP}/{VERSION}/{PLURAL}"] = kmock.ResourceInfo(
            kind=KIND, namespaced=True, shortnames=set(SHORT_NAMES), subresources={"status"},
            verbs={"list", "watch", "get", "patch", "create", "update", "delete"},
        )
        emulator.resources["v1/pods"] = kmock.ResourceInfo(kind="Pod", namespaced=True, verbs={"list", "watch", "get", "patch", "create", "delete"})
        emulator.resources["v1/events"] = kmock.ResourceInfo(kind="Event", namespaced=True, verbs={"create", "list"})
        emulator.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs={"list", "watch", "get"})
        self._emulator = emulator
        await emulator.__aenter__()
        self._server = kmock.Server(emulator)
        await self._server.__aenter__()
        return str(self._server.url).rstrip("/")

    def stop(self) -> None:
        async def _stop() -> None:
            await self._server.__aexit__(None, None, None)
            await self._emulator.__aexit__(None, None, None)

        if self.http is not None:
            self.http.close()
        asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "kmock", "user": {"token": "kmock"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": "default"}}],
        }))
        return path

    # --- kubectl-like calls ---------------------------------------------------------------------

    def _chain_path(self, namespace: str, name: str | None = None) -> str:
        base = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
        return f"{base}/{name}" if name else base

    def create_chain(self, namespace: str, name: str, spec: dict[str, Any]) -> dict:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                "metadata": {"name": name, "namespace": namespace, "generation": 1, "resourceVersion": "1",
                             "creationTimestamp": _timestamp()},
                "spec": spec}
        return self._ok(self.http.post(self._chain_path(namespace), json=body))

    def update_chain(self, namespace: str, name: str, spec: dict[str, Any]) -> dict:
        generation = (self.get_chain(namespace, name)["metadata"].get("generation") or 1) + 1
        patch = {"metadata": {"generation": generation}, "spec": spec}
        return self._ok(self.http.patch(self._chain_path(namespace, name), json=patch,
                                        headers={"content-type": "application/merge-patch+json"}))

    def delete_chain(self, namespace: str, name: str) -> None:
        self._ok(self.http.delete(self._chain_path(namespace, name)))

    def get_chain(self, namespace: str, name: str) -> dict:
        return self._ok(self.http.get(self._chain_path(namespace, name)))

    def chain_exists(self, namespace: str, name: str) -> bool:
        return self.http.get(self._chain_path(namespace, name)).status_code == 200

    def create_pod(self, namespace: str, name: str, labels: dict[str, str], config_port: int, ip: str = "127.0.0.1") -> dict:
        body = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "labels": labels, "resourceVersion": "1",
                             "annotations": {"pluginchain.io/config-port": str(config_port)}},
                "spec": {"containers": [{"name": "sidecar", "image": "pluginchain"}]},
                "status": {"phase": "Running", "podIP": ip,
                           "containerStatuses": [{"name": "sidecar", "ready": True, "restartCount": 0}]}}
        return self._ok(self.http.post(f"/api/v1/namespaces/{namespace}/pods", json=body))

    def patch_pod(self, namespace: str, name: str, patch: dict[str, Any]) -> dict:
        return self._ok(self.http.patch(f"/api/v1/namespaces/{namespace}/pods/{name}", json=patch,
                                        headers={"content-type": "application/merge-patch+json"}))

    def get_pod(self, namespace: str, name: str) -> dict:
        return self._ok(self.http.get(f"/api/v1/namespaces/{namespace}/pods/{name}"))

    def events(self, namespace: str) -> list[dict]:
        return self._ok(self.http.get(f"/api/v1/namespaces/{namespace}/events")).get("items", [])

    def requests(self) -> list[RecordedRequest]:
        """Every request the emulated API server has received so far, oldest first: what an RBAC
        check compares with the rules a client was granted."""

        async def _snapshot() -> list[RecordedRequest]:
            return [
                RecordedRequest(str(r.method.value).upper(), r.url.path, dict(r.params), dict(r.headers))
                for r in list(self._emulator)
            ]

        return asyncio.run_coroutine_threadsafe(_snapshot(), self._loop).result(10)

    @staticmethod
    def _ok(response: httpx.Response) -> dict:
        if response.status_code >= 400:
            raise AssertionError(f"{response.request.method} {response.request.url}: {response.status_code} {response.text[:500]}")
        return response.json() if response.content else {}


def _timestamp() -> str:
    import datetime

    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
