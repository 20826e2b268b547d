"""A Kubernetes API that serves what a real one serves, without a cluster: kmock's emulator
(tests/operator/cluster.py) with every built-in resource. Helm's Go SDK installs and upgrades the
chart into it, so what only happens against a cluster (``lookup`` reading the live push-token
Secret back, the kubeVersion check) can be tested; and the operator discovers there what it would
discover in a cluster (the CRD API included), so its recorded requests are the ones RBAC must allow.

The emulator needs three touches: the built-in resource list (Deployments, Secrets, RBAC, CRDs...),
the core group's discovery document (kmock 0.8 names it "/v1", client-go wants "v1"), and the
server version (kmock answers 1.26, older than the chart accepts).
"""

from __future__ import annotations

import asyncio
import gzip
import importlib.resources
import json
from pathlib import Path
from typing import Any

import helm_python as helm
from helm_python import _native

from tests.helm.chart import CHART, NAMESPACE, RELEASE
from tests.support.cluster import Cluster

# Options helm-python-sdk 0.2.2's Config.install/upgrade do not expose, passed to the same native
# calls: kmock serves no OpenAPI document to validate against, no server-side apply, and never
# marks a CRD Established (the CRD has tests of its own).
_OFFLINE = {"disable_openapi_validation": True, "skip_crds": True}


class FullCluster(Cluster):
    """The emulated API server with the built-in resources; ``kube_version`` is what /version reports."""

    def __init__(self, kube_version: str | None = "1.35.0"):
        super().__init__()
        self.kube_version = kube_version

    def start(self) -> FullCluster:
        super().start()
        try:
            self._prepare_for_helm()
        except BaseException:
            self.stop()
            raise
        return self

    def _prepare_for_helm(self) -> None:
        # kmock's own load_bundled() reads the file with an API deprecated in Python 3.11.
        bundled = importlib.resources.files("kmock._internal").joinpath("resources.json.gz").read_bytes()
        self._in_loop(lambda: self._emulator.resources.load_data(gzip.decompress(bundled)))
        core = self._ok(self.http.get("/api/v1"))
        core["groupVersion"] = "v1"

        def serve_corrected_discovery() -> None:
            self._emulator["get /api/v1"] << core
            if self.kube_version is not None:
                major, minor, _ = self.kube_version.split(".")
                self._emulator["get /version"] << {"major": major, "minor": minor, "gitVersion": f"v{self.kube_version}"}

        self._in_loop(serve_corrected_discovery)

    def _in_loop(self, function) -> None:
        """Change the emulator from its own thread, between requests."""

        async def call() -> None:
            function()

        asyncio.run_coroutine_threadsafe(call(), self._loop).result(10)

    def config(self, kubeconfig: Path) -> helm.Config:
        """A Helm client for this cluster, keeping releases in memory (no release Secrets)."""
        return helm.Config(kubeconfig_path=str(self.kubeconfig(kubeconfig)), namespace=NAMESPACE, storage_driver="memory")

    def secret(self, name: str) -> dict[str, Any]:
        return self._ok(self.http.get(f"/api/v1/namespaces/{NAMESPACE}/secrets/{name}"))

    def deployment(self, name: str) -> dict[str, Any]:
        return self._ok(self.http.get(f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{name}"))


def install(config: helm.Config, values: dict[str, Any] | None = None) -> dict[str, Any]:
    """``helm install gw deploy/helm/pluginchain``; returns the release."""
    options = {**_OFFLINE, "server_side_apply": False}
    return json.loads(_native.call_string(
        "helm_install", config._raw(), _native.HANDLE(0), _native.HANDLE(0), str(CHART), RELEASE,
        json.dumps(values or {}), json.dumps(options),
    ))


def upgrade(config: helm.Config, values: dict[str, Any] | None = None) -> dict[str, Any]:
    """``helm upgrade gw deploy/helm/pluginchain``; returns the release."""
    options = {**_OFFLINE, "server_side_apply": "false"}
    return json.loads(_native.call_string(
        "helm_upgrade", config._raw(), _native.HANDLE(0), _native.HANDLE(0), str(CHART), RELEASE,
        json.dumps(values or {}), json.dumps(options),
    ))
