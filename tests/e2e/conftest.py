"""Fixtures that start the real demo upstream, sidecar and Envoy, and always stop them."""

from __future__ import annotations

import textwrap

import pytest

from tests.support.harness import Gateway, start_upstream


@pytest.fixture
def upstream(tmp_path):
    upstream = start_upstream(tmp_path)
    yield upstream
    upstream.process.stop()


@pytest.fixture
def gateway(tmp_path, upstream):
    """Start a gateway for a chain given as YAML text: ``gateway(chain_yaml, routes=..., ...)``."""
    started: list[Gateway] = []

    def start(chain_yaml: str, **options) -> Gateway:
        chain_file = tmp_path / "chain.yaml"
        chain_file.write_text(textwrap.dedent(chain_yaml))
        instance = Gateway(tmp_path, chain_file, upstream, **options)
        started.append(instance)
        instance.start_sidecar()
        instance.start_envoy()
        return instance

    yield start
    for instance in started:
        instance.stop()
