"""The sidecar's own CPU cost per request, without gRPC, Envoy or a network in the way.

Drives ``ExternalProcessor.Process`` (pluginchain, with bench/chains/*.yaml) and the bare
processor's ``Process`` directly on one event loop, with the messages Envoy sends for one
benchmark request (captured from Envoy 1.40: request headers with raw values and the
source.address attribute, then the buffered body), and reports microseconds per request. The
difference chain - bare is what pluginchain's Python adds on top of the gRPC and event-loop work
both processors share; run_bench.py shows how that turns into requests/s.

    .venv/bin/python bench/extproc_overhead.py [--requests 20000] [--concurrency 32] [--profile]

``--profile`` prints the top functions of the chain runs under cProfile (cProfile inflates every
Python call, so read its percentages, not its absolute times).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import sys
import time
from pathlib import Path

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from bare_processor import BareProcessor
from run_bench import API_KEY, PATH, chat_body

from pluginchain._config.files import load_file
from pluginchain._config.registry import default_registry
from pluginchain._sidecar.extproc import ExternalProcessor
from pluginchain._sidecar.plans import PlanHolder, serving_plan


def envoy_messages(mode: str, request_number: int) -> list[pb.ProcessingRequest]:
    """What Envoy sends for one benchmark request in ``mode`` (headers, or headers + body)."""
    body = chat_body()
    headers = [
        (":authority", "127.0.0.1:8080"), (":path", PATH), (":method", "POST"), (":scheme", "http"),
        ("content-length", str(len(body))), ("content-type", "application/json"), ("x-api-key", API_KEY),
        ("x-forwarded-proto", "http"), ("x-request-id", f"5f0c7e2a-0000-4000-8000-{request_number:012d}"),
    ]
    attributes = struct_pb2.Struct()
    attributes.fields["source.address"].string_value = f"127.0.0.1:{40000 + request_number % 20000}"
    first = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers]),
            end_of_stream=False,
        ),
        attributes={"envoy.filters.http.ext_proc": attributes},
    )
    if mode == "headers":
        return [first]
    return [first, pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))]


class _Context:
    """The part of grpc.aio.ServicerContext the processors use."""

    def invocation_metadata(self):
        return (("x-forwarded-for", "192.0.2.2"), ("x-envoy-internal", "true"))


async def _messages(items):
    for item in items:
        yield item


async def _one_stream(servicer, messages, context) -> int:
    answers = 0
    async for answer in servicer.Process(_messages(messages), context):
        # What grpc does with every answer; a real cost both processors pay.
        answer.SerializeToString()
        answers += 1
    return answers


async def _drive(servicer, prepared: list[list[pb.ProcessingRequest]], concurrency: int) -> float:
    """Seconds per request, ``concurrency`` streams at a time."""
    # Envoy's messages arrive serialized; parsing them is grpc's work in both processors, so the
    # messages are built beforehand and not timed.
    requests = len(prepared)
    context = _Context()
    started = time.perf_counter()
    if concurrency <= 1:
        for messages in prepared:
            await _one_stream(servicer, messages, context)
    else:
        for start in range(0, requests, concurrency):
            await asyncio.gather(*(_one_stream(servicer, m, context) for m in prepared[start:start + concurrency]))
    return (time.perf_counter() - started) / requests


def _processor(kind: str, mode: str):
    if kind == "bare":
        return BareProcessor(mode)
    registry = default_registry(())
    plan = serving_plan(load_file(BENCH / "chains" / f"{mode}.yaml", registry), registry)
    return ExternalProcessor(PlanHolder(plan))


async def _measure(kind: str, mode: str, requests: int, concurrency: int, repeats: int) -> float:
    servicer = _processor(kind, mode)
    prepared = [envoy_messages(mode, i) for i in range(requests)]
    await _drive(servicer, prepared[:2000], concurrency)  # warm-up
    gc.collect()
    return min([await _drive(servicer, prepared, concurrency) for _ in range(repeats)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32, help="streams in flight at once (1: one after another)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--profile", action="store_true", help="cProfile the chain runs and print their top functions")
    parser.add_argument("--top", type=int, default=30, help="functions listed per --profile table")
    args = parser.parse_args()

    results = {}
    for mode in ("headers", "body"):
        for kind in ("bare", "chain"):
            seconds = asyncio.run(_measure(kind, mode, args.requests, args.concurrency, args.repeats))
            results[(kind, mode)] = seconds
            print(f"{kind}-{mode:<8} {seconds * 1e6:7.1f} us per request", flush=True)
        extra = results[("chain", mode)] - results[("bare", mode)]
        print(f"  pluginchain adds {extra * 1e6:.1f} us per request in {mode} mode", flush=True)

    if args.profile:
        for mode in ("headers", "body"):
            profiler = cProfile.Profile()
            servicer = _processor("chain", mode)
            prepared = [envoy_messages(mode, i) for i in range(args.requests)]
            asyncio.run(_drive(servicer, prepared[:1000], args.concurrency))
            profiler.enable()
            asyncio.run(_drive(servicer, prepared, args.concurrency))
            profiler.disable()
            stats = pstats.Stats(profiler)
            total = stats.total_tt  # type: ignore[attr-defined]
            print(f"\n=== chain-{mode} under cProfile: {args.requests} requests ===")
            rows = [(tt, ct, nc, f"{Path(f).name}:{line}({fn})") for (f, line, fn), (cc, nc, tt, ct, _) in stats.stats.items()]  # type: ignore[attr-defined]
            print(f"{'own %':>6} {'cum %':>6} {'calls/req':>9}  function   (top {args.top} by own time)")
            for tt, ct, nc, name in sorted(rows, reverse=True)[:args.top]:
                print(f"{100 * tt / total:6.1f} {100 * ct / total:6.1f} {nc / args.requests:9.2f}  {name}")
            print(f"\n{'own %':>6} {'cum %':>6} {'calls/req':>9}  function   (top {args.top} by cumulative time)")
            for tt, ct, nc, name in sorted(rows, key=lambda r: r[1], reverse=True)[:args.top]:
                print(f"{100 * tt / total:6.1f} {100 * ct / total:6.1f} {nc / args.requests:9.2f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
