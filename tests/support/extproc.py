"""ext_proc messages as Envoy sends them, for tests that talk to a sidecar's gRPC port directly."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from tests.support.harness import ROOT

PLUGINS = (str(ROOT / "tests" / "support" / "custom_plugins.py"),)
"""Custom plugin modules the sidecar tests load (``stamp`` and friends)."""


def request_headers(end_of_stream: bool = False, **headers: str) -> pb.ProcessingRequest:
    header_map = base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=key.replace("_", "-"), raw_value=value.encode())
        for key, value in {":method": "POST", ":path": "/v1/chat/completions", **headers}.items()
    ])
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=header_map, end_of_stream=end_of_stream))
