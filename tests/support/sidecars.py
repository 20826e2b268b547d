"""Sidecar processes standing in as gateway pods, and helpers to read what they run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc

from pluginchain.v1 import config_pb2, config_pb2_grpc
from tests.support.cluster import Cluster
from tests.support.harness import BIN, Process, free_port, sidecar_serving, wait_until

TOKEN = "test-push-token-0123456789"


@dataclass
class Sidecar:
    """A `pluginchain serve` process in push mode, standing in as one gateway pod's sidecar."""

    name: str
    log_dir: Path
    token_file: Path
    config_port: int = field(default_factory=free_port)
    extproc_port: int = field(default_factory=free_port)
    process: Process | None = None
    starts: int = 0

    @property
    def state_file(self) -> Path:
        return self.log_dir / f"{self.name}.state.json"

    def start(self) -> Sidecar:
        self.starts += 1
        self.process = Process(f"{self.name}-{self.starts}", [
            str(BIN / "pluginchain"), "serve", "--sidecar-port", str(self.extproc_port), "--metrics-port", "-1",
            "--config-port", str(self.config_port), "--token-file", str(self.token_file),
            "--state-file", str(self.state_file),
        ], self.log_dir)
        wait_until(lambda: sidecar_serving(self.extproc_port) or not self.process.alive(), what=f"{self.name} health")
        assert self.process.alive(), self.process.output()
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def get(self, token: str | None = TOKEN) -> config_pb2.GetResponse:
        with grpc.insecure_channel(f"127.0.0.1:{self.config_port}") as channel:
            metadata = (("authorization", f"Bearer {token}"),) if token else ()
            return config_pb2_grpc.ConfigServiceStub(channel).Get(config_pb2.GetRequest(), metadata=metadata, timeout=5)

    def get_version(self) -> int:
        return self.get().chain_set.version

    def chains(self) -> dict[str, list[str]]:
        """Chain name -> plugin ids, as the sidecar runs them now."""
        return {c.name: [p.id or p.name for p in c.plugins] for c in self.get().chain_set.chains}


def add_pods(cluster: Cluster, namespace: str, sidecars: list[Sidecar], labels: dict[str, str]) -> None:
    for sidecar in sidecars:
        cluster.create_pod(namespace, sidecar.name, labels, sidecar.config_port)


def ready_condition(chain: dict) -> dict:
    return next((c for c in (chain.get("status") or {}).get("conditions", []) if c["type"] == "Ready"), {})
