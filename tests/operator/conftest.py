"""The real operator process against kmock's emulated API, with real sidecar processes as pods."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tests.support.cluster import Cluster
from tests.support.harness import BIN, Process, wait_until
from tests.support.sidecars import TOKEN, Sidecar

_namespaces = itertools.count(1)


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="module")
def operator(cluster, token_file, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("operator")
    kubeconfig = cluster.kubeconfig(log_dir / "kubeconfig")
    process = Process(
        "operator",
        [str(BIN / "pluginchain"), "operator", "--all-namespaces", "--token-file", str(token_file),
         "--push-timeout", "1", "--retry-delay", "1", "--resync-interval", "1"],
        log_dir,
        env={"KUBECONFIG": str(kubeconfig)},
    )
    wait_until(lambda: "Initial authentication has finished" in process.output() or not process.alive(), what="operator start")
    assert process.alive(), process.output()
    yield process
    process.stop()


@pytest.fixture
def namespace(cluster) -> str:
    return f"ns{next(_namespaces)}"


@pytest.fixture
def sidecars(tmp_path, token_file):
    started: list[Sidecar] = []

    def start(count: int) -> list[Sidecar]:
        batch = [Sidecar(f"sidecar{len(started) + i}", tmp_path, token_file).start() for i in range(count)]
        started.extend(batch)
        return batch

    yield start
    for sidecar in started:
        sidecar.stop()
