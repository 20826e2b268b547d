"""Soak: does the processor's memory stay flat under steady load through a real Envoy?

One scenario after another, each with a fresh gateway Envoy (pluginchain's generated
configuration) in front of the same upstream (an Envoy answering a canned chat completion, as in
``run_bench.py``), at a fixed request rate:

    bare            Envoy + bench/bare_processor.py --mode body: grpcio and the ext_proc stubs,
                    no pluginchain; it never ends a stream, so Envoy resets every one
    sidecar         Envoy + pluginchain serve --config bench/chains/body.yaml (request headers and
                    the buffered body; the sidecar ends each stream itself after the body);
                    ``--chain headers``: bench/chains/headers.yaml and the bare processor's
                    ``--mode headers`` (the stream ends after the request headers)
    sidecar-before  (with ``--before DIR``) the same, run from another checkout's ``sidecar/``,
                    e.g. ``git archive HEAD | tar -x -C DIR`` of a commit to compare with

The load generator is in this process (aiohttp, ``--connections`` keep-alive connections, paced
to ``--rate`` requests/s). Once a second it reads the processor's resident memory (VmRSS from
``/proc``). After ``--warmup`` seconds, the growth is the least-squares slope of RSS against
requests answered, given per 100,000 requests. Envoy's ``server_half_closed`` counts the streams
whose clean end by the processor reached Envoy while it still needed the stream (a stream Envoy
was done with first is not counted, whoever ended it).

    .venv/bin/python bench/soak.py                                   # 5 minutes per scenario
    .venv/bin/python bench/soak.py --duration 90 --scenarios bare sidecar
    .venv/bin/python bench/soak.py --duration 90 --before /tmp/before  # adds sidecar-before
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run_bench import (
    API_KEY,
    PATH,
    Proc,
    Processes,
    chat_body,
    envoy_counters,
    free_port,
    gateway_config,
    port_open,
    post_chat,
    start_envoy,
    upstream_config,
    wait_until,
)

SCENARIOS = ("bare", "sidecar", "sidecar-before")


@dataclass
class Sample:
    seconds: float
    requests: int
    rss_bytes: int


@dataclass
class Result:
    scenario: str
    duration_s: float
    requests: int
    requests_per_s: float
    failures: int
    rss_start_mb: float
    rss_after_warmup_mb: float
    rss_end_mb: float
    growth_mb_per_100k: float
    ext_proc: dict[str, int]
    samples: list[Sample] = field(repr=False)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y against x."""
    xs, ys = zip(*points, strict=True)
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0


class Load:
    """Requests paced to ``rate`` per second over ``connections`` keep-alive connections."""

    def __init__(self, port: int, rate: float, connections: int):
        self.url = f"http://127.0.0.1:{port}{PATH}"
        self.rate = rate
        self.connections = connections
        self.answered = 0
        self.failures = 0
        self._body = chat_body()
        self._headers = {"content-type": "application/json", "x-api-key": API_KEY}

    async def run(self, seconds: float, on_tick) -> None:
        connector = aiohttp.TCPConnector(limit=self.connections, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as session:
            start = time.monotonic()
            deadline = start + seconds
            slot = 0

            async def worker() -> None:
                nonlocal slot
                while True:
                    send_at = start + slot / self.rate
                    slot += 1
                    if send_at >= deadline:
                        return
                    delay = send_at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    try:
                        async with session.post(self.url, data=self._body, headers=self._headers) as response:
                            await response.read()
                            if response.status != 200:
                                self.failures += 1
                    except aiohttp.ClientError:
                        self.failures += 1
                    self.answered += 1

            async def ticker() -> None:
                while time.monotonic() < deadline:
                    on_tick(time.monotonic() - start, self.answered)
                    await asyncio.sleep(1.0)

            tick = asyncio.create_task(ticker())
            await asyncio.gather(*(worker() for _ in range(self.connections)))
            tick.cancel()
            on_tick(time.monotonic() - start, self.answered)


def start_processor(procs: Processes, scenario: str, port: int, chain: str, before: Path | None) -> Proc:
    if scenario == "bare":
        argv = [sys.executable, str(BENCH / "bare_processor.py"), "--port", str(port), "--mode", chain]
        return procs.start(scenario, argv)
    env = None
    if scenario == "sidecar-before":
        assert before is not None
        env = {"PYTHONPATH": str(before / "sidecar")}
    argv = [
        sys.executable, "-c", "import sys, pluginchain.cli; print('pluginchain from', pluginchain.cli.__file__, flush=True); "
        "sys.exit(pluginchain.cli.main())",
        "serve", "--config", str(BENCH / "chains" / f"{chain}.yaml"), "--sidecar-port", str(port),
        "--metrics-port", "-1", "--log-level", "warning",
    ]
    return procs.start(scenario, argv, env)


def soak(scenario: str, args: argparse.Namespace, log_dir: Path) -> Result:
    procs = Processes(log_dir)
    try:
        upstream_port, upstream_admin = free_port(), free_port()
        start_envoy(procs, "upstream", upstream_config(upstream_port, upstream_admin), concurrency=1)
        processor_port = free_port()
        processor = start_processor(procs, scenario, processor_port, args.chain, args.before)
        wait_until(lambda: port_open(processor_port), f"{scenario} listening", processor)
        gateway_port, gateway_admin = free_port(), free_port()
        config = gateway_config(upstream_port, gateway_port, gateway_admin, processor_port, ext_proc=True)
        if args.envoy_runtime:
            flags = {key: value.lower() == "true" if value.lower() in ("true", "false") else value
                     for key, _, value in (flag.partition("=") for flag in args.envoy_runtime)}
            config["layered_runtime"] = {"layers": [{"name": "soak", "static_layer": flags}]}
        start_envoy(procs, "gateway", config, concurrency=1)
        status, payload = post_chat(gateway_port, chat_body())
        if status != 200:
            raise RuntimeError(f"{scenario}: a clean request got {status}: {payload[:200]!r}")

        samples: list[Sample] = []

        def on_tick(seconds: float, answered: int) -> None:
            samples.append(Sample(seconds, answered, rss_bytes(processor.pid)))
            if args.verbose and int(seconds) % 10 == 0:
                print(f"  {scenario} {seconds:5.0f}s {answered:8d} requests rss {samples[-1].rss_bytes / 2**20:7.1f} MB", flush=True)

        load = Load(gateway_port, args.rate, args.connections)
        began = time.monotonic()
        asyncio.run(load.run(args.duration, on_tick))
        elapsed = time.monotonic() - began
        counters = envoy_counters(gateway_admin)
        if not processor.alive():
            raise RuntimeError(f"{scenario} exited during the soak:\n{processor.tail()}")
    finally:
        procs.stop_all()

    steady = [s for s in samples if s.seconds >= args.warmup]
    if len(steady) < 3:
        raise SystemExit(f"--duration {args.duration:g} leaves too few samples after --warmup {args.warmup:g}")
    per_request = slope([(s.requests, s.rss_bytes) for s in steady])
    return Result(
        scenario=scenario,
        duration_s=round(elapsed, 1),
        requests=load.answered,
        requests_per_s=round(load.answered / elapsed, 1),
        failures=load.failures,
        rss_start_mb=round(samples[0].rss_bytes / 2**20, 1),
        rss_after_warmup_mb=round(steady[0].rss_bytes / 2**20, 1),
        rss_end_mb=round(samples[-1].rss_bytes / 2**20, 1),
        growth_mb_per_100k=round(per_request * 100_000 / 2**20, 2),
        ext_proc={name.removeprefix("ext_proc."): value for name, value in counters.items() if name.startswith("ext_proc.")},
        samples=samples,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load per scenario (default 300)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds left out of the growth (default: a fifth of --duration)")
    parser.add_argument("--chain", choices=("body", "headers"), default="body",
                        help="bench/chains/body.yaml (default) or headers.yaml, and the bare processor's matching mode")
    parser.add_argument("--rate", type=float, default=400.0, help="requests per second (default 400)")
    parser.add_argument("--connections", type=int, default=16, help="client connections to Envoy (default 16)")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=None,
                        help="default: bare and sidecar, and sidecar-before with --before")
    parser.add_argument("--before", type=Path, help="a checkout whose sidecar/ to run as sidecar-before")
    parser.add_argument("--envoy-runtime", nargs="*", default=[], metavar="KEY=VALUE",
                        help="runtime flags for the gateway Envoy, e.g. envoy.reloadable_features.ext_proc_graceful_grpc_close=true")
    parser.add_argument("--output", type=Path, help="write the results (with every sample) as JSON")
    parser.add_argument("--verbose", action="store_true", help="print the RSS every 10 s")
    args = parser.parse_args()
    args.warmup = args.duration / 5 if args.warmup is None else args.warmup
    scenarios = args.scenarios or (["bare", "sidecar"] + (["sidecar-before"] if args.before else []))
    if "sidecar-before" in scenarios and args.before is None:
        parser.error("sidecar-before needs --before DIR")

    results = []
    with tempfile.TemporaryDirectory(prefix="pluginchain-soak-") as tmp:
        for scenario in scenarios:
            print(f"{scenario}: {args.duration:g}s at {args.rate:g} requests/s ...", flush=True)
            results.append(soak(scenario, args, Path(tmp)))

    print(f"\n{platform.node()}, {os.cpu_count()} CPUs, warm-up {args.warmup:g}s left out\n")
    print("| scenario | requests | requests/s | failures | RSS start → after warm-up → end (MB) | growth per 100k requests | "
          "ext_proc streams started / ended by the processor (Envoy's server_half_closed) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.scenario} | {r.requests} | {r.requests_per_s:g} | {r.failures} | "
              f"{r.rss_start_mb:g} → {r.rss_after_warmup_mb:g} → {r.rss_end_mb:g} | {r.growth_mb_per_100k:+.2f} MB | "
              f"{r.ext_proc['streams_started']} / {r.ext_proc.get('server_half_closed', 0)} |")
    if args.output is not None:
        args.output.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
