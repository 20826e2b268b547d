"""The pluginchain sidecar process with the bare processor's handler: where the chain's cost lives.

A diagnostic, not a scenario of the benchmarks. It runs ``pluginchain serve`` exactly as the
chain scenarios do (same grpc server and options, health service, metrics thread, garbage
collector settings, plan loaded), except that ``ExternalProcessor.Process`` answers like
``bare_processor.py``: CONTINUE on every phase, with the mode override of ``--bare-mode``. If it
costs what the bare processor costs, the gap between a chain and the bare processor is the work
of the chain's handler (extproc, engine, plugins), not the process around it.

    .venv/bin/python bench/bare_in_sidecar.py --bare-mode body serve --config bench/chains/body.yaml --sidecar-port 50061

Measured 2026-11-29 behind Envoy (2 alternated rounds, body mode, closed-loop saturation and
1,162 requests/s open loop): bare_in_sidecar 379-398 µs of processor CPU per request at
saturation against 392-430 for bare_processor.py, and 575-599 against 564-616 at 1,162/s; the
body chain in the same runs: 567-584 and 707-713 µs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bare_processor import BareProcessor

from pluginchain._sidecar import extproc
from pluginchain.cli import main


def _bare_handler(mode: str):
    answers = BareProcessor(mode)._answers

    async def Process(self, request_iterator, context):
        async for request in request_iterator:
            yield answers[request.WhichOneof("request")]

    return Process


if __name__ == "__main__":
    arguments = sys.argv[1:]
    mode = "body"
    if arguments[:1] == ["--bare-mode"]:
        mode, arguments = arguments[1], arguments[2:]
    extproc.ExternalProcessor.Process = _bare_handler(mode)  # type: ignore[method-assign]
    sys.exit(main(arguments))
