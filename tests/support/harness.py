"""Real processes for end-to-end tests: the demo upstream, the sidecar (``pluginchain serve``) and
Envoy, each on free ports, each stopped by the fixture that started it, also on failure."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pluginchain._sidecar.envoy_config import EnvoySettings, render
from pluginchain._sidecar.gateway import envoy_binary

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached within {timeout}s")


class Process:
    """A child process whose output goes to a log file the test can read."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, cwd=ROOT,
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if self.alive():
            self.popen.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()
        return self.popen.returncode

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait()
        self._log.close()


@dataclass
class Upstream:
    process: Process
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def received(self) -> list[dict]:
        return httpx.get(f"{self.url}/_demo/requests", timeout=5).json()


def start_upstream(log_dir: Path) -> Upstream:
    port = free_port()
    process = Process("upstream", [sys.executable, "examples/demo_upstream.py", "--port", str(port)], log_dir)
    upstream = Upstream(process, port)

    def answers() -> bool:
        try:
            return httpx.get(f"{upstream.url}/v1/models", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(answers, what="demo upstream")
    return upstream


def sidecar_serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class Gateway:
    """Envoy in front of a ``pluginchain serve`` process, both real."""

    log_dir: Path
    chain_file: Path
    upstream: Upstream
    routes: tuple[tuple[str, str], ...] = ()
    plugin_modules: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    sidecar_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    envoy_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    sidecar: Process | None = None
    envoy: Process | None = None
    _sidecar_starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.envoy_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start_sidecar(self) -> Process:
        if self.sidecar is not None:
            self.sidecar.stop()
        self._sidecar_starts += 1
        argv = [
            str(BIN / "pluginchain"), "serve", "--config", str(self.chain_file),
            "--sidecar-port", str(self.sidecar_port), "--metrics-port", str(self.metrics_port),
            *self.extra_args,
        ]
        for module in self.plugin_modules:
            argv += ["--plugins", module]
        self.sidecar = Process(f"sidecar-{self._sidecar_starts}", argv, self.log_dir)
        wait_until(lambda: sidecar_serving(self.sidecar_port) or not self.sidecar.alive(), what="sidecar health")
        assert self.sidecar.alive(), self.sidecar.output()
        return self.sidecar

    def start_envoy(self, **overrides) -> Process:
        settings = EnvoySettings(
            upstream=self.upstream.url, listen_host="127.0.0.1", listen_port=self.envoy_port,
            admin_port=self.admin_port, sidecar_port=self.sidecar_port, routes=self.routes, **overrides,
        )
        config_path = self.log_dir / "envoy.yaml"
        config_path.write_text(yaml.safe_dump(render(settings)))
        self.envoy = Process("envoy", [envoy_binary(), "-c", str(config_path), "--log-level", "warning", "--disable-hot-restart"], self.log_dir)

        def ready() -> bool:
            assert self.envoy.alive(), self.envoy.output()
            try:
                return httpx.get(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, what="envoy ready")
        return self.envoy

    def stop(self) -> None:
        for process in (self.envoy, self.sidecar):
            if process is not None:
                process.stop()

    def chat(self, content: str, *, path: str = "/v1/chat/completions", headers: dict | None = None, **extra) -> httpx.Response:
        body = {"model": "demo-model", "messages": [{"role": "user", "content": content}], **extra}
        return httpx.post(self.url + path, json=body, headers=headers or {}, timeout=30)


@contextlib.contextmanager
def running_gateway(log_dir: Path, chains_yaml: str, routes: tuple[tuple[str, str], ...] = ()) -> Iterator[Gateway]:
    """The demo upstream, a sidecar serving ``chains_yaml`` and Envoy, stopped on the way out."""
    upstream = start_upstream(log_dir)
    chain_file = log_dir / "chain.yaml"
    chain_file.write_text(textwrap.dedent(chains_yaml))
    gw = Gateway(log_dir, chain_file, upstream, routes=routes)
    try:
        gw.start_sidecar()
        gw.start_envoy()
        yield gw
    finally:
        gw.stop()
        upstream.process.stop()
