"""Metric series stay bounded whatever chain names reach the sidecar: a name the plan does not
have is counted under one ``unknown`` chain, so a thousand such names are one series, not a
thousand (each series is kept for the life of the process and scraped every time)."""

from __future__ import annotations

import asyncio
import json

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client import REGISTRY

from pluginchain._sidecar.server import Sidecar, SidecarSettings
from tests.support.extproc import PLUGINS, request_headers


def series() -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every (sample name, labels) the process exports."""
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for metric in REGISTRY.collect()
        for sample in metric.samples
    }


async def test_a_thousand_unknown_chain_names_create_no_series(tmp_path):
    path = tmp_path / "chain.yaml"
    path.write_text("chains: {default: [{name: stamp}]}")
    sidecar = Sidecar(SidecarSettings(config=path, plugin_modules=PLUGINS, port=0, metrics_port=None, grace=1))
    await sidecar.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}")
    stub = pb_grpc.ExternalProcessorStub(channel)

    async def ask(chain_name: str) -> dict:
        call = stub.Process(metadata=(("x-pluginchain-chain", chain_name),))
        await call.write(request_headers(end_of_stream=True))
        answer = await call.read()
        assert await call.code() == grpc.StatusCode.OK
        return {"status": answer.immediate_response.status.code, **json.loads(answer.immediate_response.body)["error"]}

    try:
        first = await ask("warm-up-name")  # the one `unknown` series, created here
        before = series()
        names = [f"no-such-chain-{n}" for n in range(1000)]
        answers = []
        for start in range(0, len(names), 100):
            answers += await asyncio.gather(*(ask(name) for name in names[start:start + 100]))
        after = series()
    finally:
        await channel.close()
        await sidecar.drain()

    assert first["status"] == 500 and first["code"] == "unknown_chain"
    assert {(a["status"], a["code"]) for a in answers} == {(500, "unknown_chain")}
    assert "no-such-chain-999" in answers[-1]["message"]  # the log and the answer still name it
    assert after == before, f"new series: {sorted(after - before)[:5]}"
    counted = [labels for name, labels in after if name == "pluginchain_requests_total" and ("outcome", "error") in labels]
    assert any(("chain", "unknown") in labels for labels in counted)
