"""``pluginchain serve`` and ``gateway`` as processes: they fail loudly, with one line naming the
port, when they cannot serve, never share a port with another process, and the gateway's Envoy
never outlives it."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pluginchain._sidecar.envoy_config import EnvoySettings, render
from pluginchain._sidecar.gateway import EnvoyProcess, GatewayFailed
from tests.support.harness import BIN, ROOT, free_port, sidecar_serving, wait_until


def gateway_argv(*, port: int, admin_port: int) -> list[str]:
    return [
        str(BIN / "pluginchain"), "gateway", "--config", "examples/chain.yaml", "--upstream", "http://127.0.0.1:9",
        "--port", str(port), "--admin-port", str(admin_port), "--metrics-port", "-1", "--log-level", "warning",
    ]


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen]]:
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie is dead; only its parent (here, maybe nobody) has not reaped it


def gateway_that_is_up(started: list[subprocess.Popen], port: int) -> subprocess.Popen:
    """A ``pluginchain gateway`` on ``port``, once it has said it is up."""
    gateway = subprocess.Popen(gateway_argv(port=port, admin_port=free_port()), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    started.append(gateway)
    assert gateway.stdout is not None
    for line in gateway.stdout:
        if "pluginchain gateway is up" in line:
            return gateway
    raise AssertionError(f"the gateway exited with {gateway.wait()} before it was up")


def test_envoy_dies_with_a_killed_gateway(started):
    port = free_port()
    gateway = gateway_that_is_up(started, port)
    [envoy] = [child for child in children_of(gateway.pid) if "envoy" in Path(f"/proc/{child}/cmdline").read_text()]
    gateway.send_signal(signal.SIGKILL)
    gateway.wait()
    try:
        wait_until(lambda: not is_running(envoy), timeout=10, what="envoy gone")
    finally:
        if is_running(envoy):
            os.kill(envoy, signal.SIGKILL)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "the listener port is still served"


class _ImpostorAdmin(http.server.BaseHTTPRequestHandler):
    """Another Envoy's admin endpoint: ready, and running some other bootstrap."""

    def do_GET(self) -> None:
        body = json.dumps({"command_line_options": {"config_path": "/etc/other/envoy.yaml"}}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        pass


def test_a_taken_admin_port_fails_the_gateway_with_one_line_naming_it(started):
    impostor = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImpostorAdmin)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    admin_port = impostor.server_address[1]
    try:
        gateway = subprocess.Popen(gateway_argv(port=free_port(), admin_port=admin_port), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(gateway)
        out, err = gateway.communicate(timeout=60)
    finally:
        impostor.shutdown()
        impostor.server_close()
    assert gateway.returncode == 1
    assert "is up" not in out
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(admin_port) in errors[0], err
    assert "Traceback" not in err


async def test_the_gateway_never_takes_another_envoy_for_its_own():
    impostor = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImpostorAdmin)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    admin_port = impostor.server_address[1]
    envoy = EnvoyProcess(render(EnvoySettings(upstream="http://127.0.0.1:9", admin_port=admin_port)))
    try:
        async with httpx.AsyncClient() as client:
            with pytest.raises(GatewayFailed, match=f"another Envoy already answers on admin port {admin_port}"):
                await envoy._check_it_is_ours(client, f"http://127.0.0.1:{admin_port}")
    finally:
        await envoy.stop()
        impostor.shutdown()
        impostor.server_close()


def test_a_bad_log_level_is_refused_with_the_choices():
    result = subprocess.run(
        [str(BIN / "pluginchain"), "gateway", "--config", "examples/chain.yaml", "--upstream", "http://127.0.0.1:9", "--log-level", "verbose"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "invalid choice: 'verbose'" in result.stderr and "debug" in result.stderr
    assert "Traceback" not in result.stderr


def serve(*args: str) -> subprocess.CompletedProcess:
    argv = [str(BIN / "pluginchain"), "serve", "--config", "examples/chain.yaml", "--log-level", "warning", *args]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_a_second_sidecar_on_a_taken_port_exits_with_one_line_instead_of_sharing_it(started):
    port = free_port()
    first = subprocess.Popen(
        [str(BIN / "pluginchain"), "serve", "--config", "examples/chain.yaml", "--sidecar-port", str(port), "--metrics-port", "-1"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    started.append(first)
    wait_until(lambda: sidecar_serving(port), what="first sidecar")
    second = serve("--sidecar-port", str(port), "--metrics-port", "-1")
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [f"error: cannot listen on 127.0.0.1:{port} (ext_proc, --sidecar-port): Address already in use"]


def test_a_taken_metrics_port_exits_with_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve("--sidecar-port", "0", "--metrics-port", str(port))
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot serve metrics on") and f":{port} (--metrics-port)" in line


def test_a_second_gateway_on_a_taken_listener_port_exits_instead_of_sharing_it(started):
    """The second gateway finds the listener port taken before its Envoy starts (which binds
    exclusively anyway, no SO_REUSEPORT): it exits 1 with one line, the first keeps all traffic."""
    port = free_port()
    first = gateway_that_is_up(started, port)
    second = subprocess.Popen(gateway_argv(port=port, admin_port=free_port()), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started.append(second)
    out, err = second.communicate(timeout=60)
    assert second.returncode == 1
    assert "is up" not in out
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f":{port} (Envoy, --port)" in errors[0], err
    assert first.poll() is None
