"""Installing and upgrading the chart with Helm itself, against an emulated API server: the push
token is generated once and survives upgrades (the operator and the running sidecars would
otherwise stop agreeing on it), and a cluster older than the chart supports is refused."""

from __future__ import annotations

import base64

import helm_python as helm
import pytest

from tests.helm.chart import RELEASE
from tests.helm.kube import FullCluster, install, upgrade

SECRET = f"{RELEASE}-pluginchain-push-token"


@pytest.fixture
def cluster():
    cluster = FullCluster().start()
    yield cluster
    cluster.stop()


def _token(cluster: FullCluster) -> str:
    return base64.b64decode(cluster.secret(SECRET)["data"]["token"]).decode()


def test_the_generated_token_survives_upgrades(cluster, tmp_path):
    with cluster.config(tmp_path / "kubeconfig") as config:
        assert install(config)["revision"] == 1
        token = _token(cluster)
        assert len(token) == 48

        release = upgrade(config, {"gateway": {"replicas": 3}})
        assert release["revision"] == 2
        assert cluster.deployment(f"{RELEASE}-pluginchain-gateway")["spec"]["replicas"] == 3
        assert _token(cluster) == token

        upgrade(config, {"gateway": {"replicas": 2}})
        assert _token(cluster) == token


def test_a_token_the_user_gives_replaces_the_generated_one(cluster, tmp_path):
    with cluster.config(tmp_path / "kubeconfig") as config:
        install(config)
        upgrade(config, {"pushToken": {"value": "user-chosen-token-0123456789abcdef"}})
        assert _token(cluster) == "user-chosen-token-0123456789abcdef"


def test_a_cluster_older_than_the_chart_supports_is_refused(tmp_path):
    cluster = FullCluster(kube_version="1.29.4").start()
    try:
        with cluster.config(tmp_path / "kubeconfig") as config, pytest.raises(helm.HelmReleaseError, match="kubeVersion"):
            install(config)
    finally:
        cluster.stop()
