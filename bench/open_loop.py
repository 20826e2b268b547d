"""Open-loop latency: what the bare processor and each chain add over Envoy direct at a fixed request rate.

``run_bench.py`` is closed-loop (wrk: each connection sends its next request when the last one is
answered), so it measures saturation well but cannot say what a request costs below it: a slow
answer delays the next send, and the tail hides (coordinated omission). Here requests are sent on
a schedule fixed before the run (constant rate, or Poisson with ``--poisson``), whatever the
answers do, one request per keep-alive connection at a time, a new connection opened when every
open one is busy. Latency is measured from each request's *scheduled* send time, so a late send
counts against the scenario, and the schedule's own accuracy is reported: how late each send was
(p50/p99/max), how many were more than 1 ms late, and how many were dropped (``--max-in-flight``).

The load generator is this process: asyncio with raw sockets and a pre-built request (no HTTP
library on the hot path, tens of µs of CPU per request) on an event loop whose timers wake to the
microsecond (the default one rounds every wait up to a whole millisecond, which at ~1,000
requests/s would make sends late by 0.5 ms on average). Its CPU use is reported per measurement,
because on a small machine it shares the CPUs with both Envoys and the processor.

One run:

1. reference: a closed-loop run of the bare processor (headers and body, ``--saturation-connections``
   connections); the lower of the two requests/s is the reference rate (or ``--rate``);
2. per round: every gateway is started (direct, bare-headers, chain-headers, bare-body, chain-body;
   the same processes and Envoy configuration as ``run_bench.py``, each checked as there), then
   one request at a time (``--sequential`` requests per scenario), then every scenario in turn at
   saturation (closed loop, 2 s warm-up and ``--saturation-duration`` s), then for each of
   ``--load-percent`` (default 25 50 75 % of the reference rate) every scenario in turn at that rate,
   so direct, bare and chain are measured next to each other.

The report gives, per scenario, the saturated requests/s and latency with each chain's ratio to its
bare processor (per round, then the median), the latency added over Envoy direct (same round, same
rate) at p50/p99/p99.9 per open-loop rate and one at a time, the processor's CPU per request, and
issue 14's targets for the chains (met or not), each as the median over rounds with min..max.
JSON goes to ``--output``.

    .venv/bin/python bench/open_loop.py                                  # 3 rounds, 10 s per measurement, ~15 minutes
    .venv/bin/python bench/open_loop.py --rounds 2 --duration 10 --load-percent 50
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import gc
import json
import os
import random
import re
import select
import selectors
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run_bench import (
    API_KEY,
    PATH,
    SCENARIOS,
    BenchmarkRun,
    Proc,
    Processes,
    chat_body,
    envoy_counters,
    expected_messages_per_stream,
    ext_proc_failures,
    free_port,
    functional_check,
    gateway_config,
    machine_busy_jiffies,
    port_open,
    processor_argv,
    sidecar_metric,
    start_envoy,
    upstream_config,
    versions,
    wait_until,
)


def raw_request(port: int) -> bytes:
    body = chat_body()
    head = (f"POST {PATH} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
            f"x-api-key: {API_KEY}\r\ncontent-length: {len(body)}\r\n\r\n")
    return head.encode() + body


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


# --------------------------------------------------------------------------- the load generator


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with at most one request in flight (no pipelining)."""

    def __init__(self, generator: Generator):
        self.generator = generator
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.expected: int | None = None
        self.status = 0
        self.index = -1  # the request in flight, -1 when idle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, index: int) -> None:
        self.index = index
        self.generator.sent[index] = time.monotonic()
        assert self.transport is not None
        self.transport.write(self.generator.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()  # before any parsing: the answer is here
        self.buffer += data
        if self.expected is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end + 2])
            self.status = int(head[9:12])
            length = _CONTENT_LENGTH.search(head)
            self.expected = end + 4 + (int(length[1]) if length else 0)
        if len(self.buffer) < self.expected:
            return
        index, status = self.index, self.status
        self.buffer.clear()
        self.expected = None
        self.index = -1
        self.generator.answered(self, index, status, now)

    def connection_lost(self, exc: Exception | None) -> None:
        self.generator.lost(self)


class Generator:
    """Requests to one port, open-loop (on a schedule) or closed-loop (each connection sends on the answer)."""

    def __init__(self, port: int):
        self.port = port
        self.request = raw_request(port)
        self.loop = asyncio.get_running_loop()
        self.idle: collections.deque[_Connection] = collections.deque()
        self.connections: set[_Connection] = set()
        self.in_flight = 0
        self.errors = 0
        self.non_200 = 0
        self.scheduled: list[float] = []
        self.sent: list[float] = []
        self.done: list[float] = []
        self._closed_loop_until: float | None = None  # set while a closed-loop run goes on
        self._all_answered: asyncio.Event | None = None
        self._finished = asyncio.Event()
        self._active = 0
        self._limit: int | None = None
        self._dropped = self._grown = self._next = 0
        self._max_in_flight = 0
        self._last_sent = asyncio.Event()

    async def open(self, count: int) -> None:
        for _ in range(count):
            self.idle.append(await self._connect())

    async def _connect(self) -> _Connection:
        _, connection = await self.loop.create_connection(lambda: _Connection(self), "127.0.0.1", self.port)
        self.connections.add(connection)
        return connection

    def close(self) -> None:
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()

    def _reset(self, count: int) -> None:
        self.scheduled = [0.0] * count
        self.sent = [0.0] * count
        self.done = [0.0] * count
        self.errors = self.non_200 = 0

    def answered(self, connection: _Connection, index: int, status: int, now: float) -> None:
        self.done[index] = now
        if status != 200:
            self.non_200 += 1
        if self._closed_loop_until is not None:
            self._next_closed_loop(connection, now)
            return
        self.in_flight -= 1
        self.idle.append(connection)
        if self.in_flight == 0 and self._all_answered is not None:
            self._all_answered.set()

    def lost(self, connection: _Connection) -> None:
        self.connections.discard(connection)
        with contextlib.suppress(ValueError):
            self.idle.remove(connection)
        if connection.index >= 0:
            self.errors += 1
            self.in_flight -= 1
            connection.index = -1
            if self.in_flight == 0 and self._all_answered is not None:
                self._all_answered.set()

    async def open_loop(self, offsets: list[float], max_in_flight: int, drain_timeout: float = 5.0) -> dict:
        """Send request i at start + offsets[i], whatever the answers do; returns the raw timings."""
        count = len(offsets)
        self._reset(count)
        self._all_answered = asyncio.Event()
        self._dropped = self._grown = 0
        self._max_in_flight = max_in_flight
        self._next = 0
        self._last_sent = asyncio.Event()
        start = self.loop.time() + 0.02
        self.scheduled = [start + offset for offset in offsets]
        # One timer at a time, a plain callback: cheaper per send than a coroutine's sleep.
        self.loop.call_at(self.scheduled[0], self._send_due)
        await self._last_sent.wait()
        dropped, grown = self._dropped, self._grown
        if self.in_flight:
            self._all_answered.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_answered.wait(), drain_timeout)
        unanswered = self.in_flight
        self._all_answered = None
        return {"dropped": dropped, "connections_opened_during_run": grown, "unanswered": unanswered}

    def _send_due(self) -> None:
        """Sends every request whose time has come (more than one only when the loop was late), then waits for the next."""
        now = self.loop.time()
        scheduled = self.scheduled
        while self._next < len(scheduled) and scheduled[self._next] <= now:
            index = self._next
            self._next += 1
            if self.in_flight >= self._max_in_flight:
                self._dropped += 1
                scheduled[index] = -1.0
                continue
            self.in_flight += 1
            if self.idle:
                self.idle.popleft().send(index)
            else:
                # Every open connection is busy: open one more rather than wait (waiting would close the loop).
                self._grown += 1
                self.loop.create_task(self._send_on_new_connection(index))
        if self._next < len(scheduled):
            self.loop.call_at(scheduled[self._next], self._send_due)
        else:
            self._last_sent.set()

    async def _send_on_new_connection(self, index: int) -> None:
        try:
            connection = await self._connect()
        except OSError:
            self.errors += 1
            self.in_flight -= 1
            return
        connection.send(index)

    async def closed_loop(self, connections: int, seconds: float | None = None, requests: int | None = None) -> float:
        """Each of ``connections`` sends its next request as soon as its answer is in; returns the seconds it ran."""
        while len(self.idle) < connections:
            self.idle.append(await self._connect())
        self._reset(0)
        self._finished.clear()
        self._active = connections
        self._limit = requests
        start = self.loop.time()
        self._closed_loop_until = start + seconds if seconds is not None else float("inf")
        for _ in range(connections):
            self._next_closed_loop(self.idle.popleft(), start)
        await self._finished.wait()
        self._closed_loop_until = None
        return self.loop.time() - start

    def _next_closed_loop(self, connection: _Connection, now: float) -> None:
        assert self._closed_loop_until is not None
        if now >= self._closed_loop_until or (self._limit is not None and len(self.scheduled) >= self._limit):
            self.idle.append(connection)
            self._active -= 1
            if self._active == 0:
                self._finished.set()
            return
        self.scheduled.append(now)
        self.sent.append(0.0)
        self.done.append(0.0)
        connection.send(len(self.scheduled) - 1)


class _PreciseEpollSelector(selectors.EpollSelector):
    """epoll, but waiting to the microsecond.

    ``epoll_wait`` takes whole milliseconds and Python rounds every timeout up, so the default loop
    would send each request up to 1 ms late (0.5 ms on average). An epoll descriptor is itself
    readable when any of its sockets is ready, so a ``select()`` on that one descriptor (whose
    timeout is a timeval) does the waiting, and ``epoll_wait(0)`` collects what is ready.
    Two system calls per wake-up, and no limit on the number of sockets.
    """

    def select(self, timeout: float | None = None):
        if timeout is None or timeout > 0:
            select.select([self.fileno()], [], [], timeout)
        return super().select(0)


def precise_loop() -> asyncio.AbstractEventLoop:
    return asyncio.SelectorEventLoop(_PreciseEpollSelector())


def schedule(rate: float, seconds: float, poisson: bool, seed: int) -> list[float]:
    """Send offsets from the start: evenly spaced, or exponential gaps (a Poisson process) of the same mean."""
    if not poisson:
        return [i / rate for i in range(int(rate * seconds))]
    chooser = random.Random(seed)
    offsets: list[float] = []
    t = 0.0
    while True:
        t += chooser.expovariate(rate)
        if t >= seconds:
            return offsets
        offsets.append(t)


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(fraction * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


# --------------------------------------------------------------------------- measurements


@dataclass
class Measurement:
    scenario: str
    round: int
    kind: str  # open-loop, sequential, saturation
    target_rate: float | None
    requests: int
    achieved_rate: float
    latency_ms: dict[str, float]  # from the scheduled send time (open loop) or the send (closed loop)
    latency_from_send_ms: dict[str, float]
    send_lag_ms: dict[str, float] = field(default_factory=dict)
    schedule: dict = field(default_factory=dict)
    cpu_percent: dict[str, float] = field(default_factory=dict)
    checks: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _percentiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"p50": round(1e3 * percentile(values, 0.50), 3), "p99": round(1e3 * percentile(values, 0.99), 3),
            "p99.9": round(1e3 * percentile(values, 0.999), 3), "max": round(1e3 * values[-1], 3) if values else float("nan"),
            "mean": round(1e3 * statistics.fmean(values), 3) if values else float("nan")}


@dataclass
class Gateway:
    scenario: str
    listen_port: int
    admin_port: int
    metrics_port: int
    envoy: Proc
    processor: Proc | None


def start_gateway(procs: Processes, scenario: str, upstream_port: int, envoy_concurrency: int | None, round_number: int) -> Gateway:
    listen_port, admin_port, processor_port, metrics_port = (free_port() for _ in range(4))
    argv = processor_argv(scenario, processor_port, metrics_port, SimpleNamespace(profile=None, profile_dir=None))
    processor = None
    if argv is not None:
        processor = procs.start(f"{scenario}-processor-r{round_number}", argv)
        wait_until(lambda: port_open(processor_port), f"{scenario} processor listening", processor)
        if scenario.startswith("chain"):
            wait_until(lambda: port_open(metrics_port), f"{scenario} metrics listening", processor)
    config = gateway_config(upstream_port, listen_port, admin_port, processor_port, ext_proc=argv is not None)
    envoy = start_envoy(procs, f"{scenario}-envoy-r{round_number}", config, envoy_concurrency)
    gateway = Gateway(scenario, listen_port, admin_port, metrics_port, envoy, processor)
    functional_check(scenario, listen_port, admin_port, metrics_port)
    return gateway


def _rate_limiter_allowed(gateway: Gateway) -> float:
    if not gateway.scenario.startswith("chain"):
        return 0.0
    return sidecar_metric(gateway.metrics_port, "pluginchain_plugin_decisions_total", plugin="rate_limiter", outcome="allow")


@dataclass
class _Run:
    """What one measured run left behind: the generator's timings and everybody's counters around it."""

    generator: Generator
    counters_before: dict
    allowed_before: float
    info: dict
    wall: float
    cpu_seconds: dict[str, float]
    busy_jiffies: int
    total_jiffies: int


def measure(gateway: Gateway, upstream: Proc, round_number: int, kind: str, warm, run, target_rate: float | None,
            args: argparse.Namespace) -> Measurement:
    """``warm(generator)``, then ``run(generator)`` measured and its timings turned into a checked Measurement."""
    ours = {"gateway_envoy": gateway.envoy, "upstream_envoy": upstream, **({"processor": gateway.processor} if gateway.processor else {})}

    async def body() -> _Run:
        generator = Generator(gateway.listen_port)
        await generator.open(args.connections if kind == "open-loop" else 1)
        await warm(generator)
        # Read while nothing is in flight (blocking the loop is harmless here), so the counts match exactly.
        counters_before, allowed_before = envoy_counters(gateway.admin_port), _rate_limiter_allowed(gateway)
        cpu_before = {role: proc.cpu_seconds() for role, proc in ours.items()}
        generator_cpu_before = time.process_time()
        busy_before, total_before = machine_busy_jiffies()
        wall_start = time.monotonic()
        info = await run(generator)
        wall = time.monotonic() - wall_start
        generator_cpu = time.process_time() - generator_cpu_before
        cpu_after = {role: proc.cpu_seconds() - cpu_before[role] for role, proc in ours.items()}
        busy_after, total_after = machine_busy_jiffies()
        generator.close()
        await asyncio.sleep(0.05)
        return _Run(generator, counters_before, allowed_before, info or {}, wall, {**cpu_after, "generator": generator_cpu},
                    busy_after - busy_before, total_after - total_before)

    # The generator must not stop for a collection of this process's (large, idle) heap mid-run.
    gc.collect()
    gc.disable()
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    if args.generator_nice != nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.generator_nice)  # this thread only; children started later are not affected
    try:
        with asyncio.Runner(loop_factory=precise_loop) as runner:
            measured = runner.run(body())
    finally:
        gc.enable()
        if args.generator_nice != nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)

    generator, info, wall, cpu_seconds = measured.generator, measured.info, measured.wall, measured.cpu_seconds
    sent_indices = [i for i, at in enumerate(generator.scheduled) if at >= 0]
    answered = [i for i in sent_indices if generator.done[i]]
    latencies = [generator.done[i] - generator.scheduled[i] for i in answered]
    from_send = [generator.done[i] - generator.sent[i] for i in answered]
    lags = [generator.sent[i] - generator.scheduled[i] for i in sent_indices if generator.sent[i]]
    if kind == "open-loop":
        span = (generator.scheduled[-1] - generator.scheduled[0]) if len(generator.scheduled) > 1 else wall
        achieved = len(answered) / span if span else 0.0
    else:
        achieved = len(answered) / wall
    result = Measurement(
        scenario=gateway.scenario, round=round_number, kind=kind, target_rate=target_rate, requests=len(answered),
        achieved_rate=round(achieved, 1), latency_ms=_percentiles(latencies), latency_from_send_ms=_percentiles(from_send),
    )
    if kind == "open-loop":
        late = sum(1 for lag in lags if lag > 1e-3)
        result.send_lag_ms = {k: v for k, v in _percentiles(lags).items() if k in ("p50", "p99", "max")}
        result.schedule = {**info, "scheduled": len(generator.scheduled), "late_over_1ms": late,
                           "late_over_1ms_percent": round(100 * late / max(1, len(lags)), 2)}
    cpu = {role: round(100 * seconds / wall, 1) for role, seconds in cpu_seconds.items()}
    machine_busy = round(100 * (os.cpu_count() or 1) * measured.busy_jiffies / max(1, measured.total_jiffies), 1)
    cpu["foreign"] = round(max(0.0, machine_busy - sum(cpu.values())), 1)
    cpu["machine_busy"] = machine_busy
    cpu["generator_us_per_request"] = round(1e6 * cpu_seconds["generator"] / max(1, len(sent_indices)), 1)
    if "processor" in cpu_seconds:
        # From the CPU seconds and the count, not percent / achieved rate: an open-loop run's wall time includes the drain.
        cpu["processor_us_per_request"] = round(1e6 * cpu_seconds["processor"] / max(1, len(answered)), 1)
    result.cpu_percent = cpu
    check(result, gateway, generator, measured.counters_before, measured.allowed_before, info, args)
    return result


def check(result: Measurement, gateway: Gateway, generator: Generator, counters_before: dict, allowed_before: float, info: dict,
          args: argparse.Namespace) -> None:
    """Every request answered 200 by Envoy, each through one ext_proc stream (and the chain) where there is one."""
    counters = envoy_counters(gateway.admin_port)
    delta = {k: counters.get(k, 0) - counters_before.get(k, 0) for k in counters}
    served = delta.get("downstream_rq_completed", 0)
    result.checks = {"envoy_requests_completed": served, "envoy_2xx": delta.get("downstream_rq_2xx", 0)}
    if generator.errors or generator.non_200:
        result.problems.append(f"{generator.errors} connection errors, {generator.non_200} answers other than 200")
    if info.get("unanswered"):
        result.problems.append(f"{info['unanswered']} requests unanswered 5 s after the last send")
    if info.get("dropped"):
        result.problems.append(f"{info['dropped']} sends dropped (more than --max-in-flight {args.max_in_flight} in flight)")
    if served != result.requests or delta.get("downstream_rq_2xx", 0) != served:
        result.problems.append(f"Envoy completed {served} requests ({delta.get('downstream_rq_2xx', 0)} 2xx), the generator got {result.requests}")
    expected = expected_messages_per_stream(gateway.scenario)
    if expected:
        streams = delta.get("ext_proc.streams_started", 0)
        sent = delta.get("ext_proc.stream_msgs_sent", 0)
        result.checks |= {"ext_proc_streams": streams, "ext_proc_msgs_sent": sent}
        if streams != served or sent != expected * streams:
            result.problems.append(f"{streams} ext_proc streams and {sent} messages for {served} requests (expected {expected} per stream)")
        result.problems += ext_proc_failures(delta)
    if gateway.scenario.startswith("chain"):
        allowed = _rate_limiter_allowed(gateway) - allowed_before
        result.checks["rate_limiter_allowed"] = allowed
        if allowed != served:
            result.problems.append(f"the chain ran {allowed:.0f} times for {served} requests")
    if result.cpu_percent.get("foreign", 0) > args.max_foreign_cpu:
        result.problems.append(f"other processes used {result.cpu_percent['foreign']:.0f}% of a CPU during the measurement")


def open_loop_run(rate: float, seconds: float, args: argparse.Namespace, seed: int):
    offsets = schedule(rate, seconds, args.poisson, seed)
    return lambda generator: generator.open_loop(offsets, args.max_in_flight)


def closed_loop_run(connections: int, seconds: float | None = None, requests: int | None = None):
    async def run(generator: Generator) -> dict:
        await generator.closed_loop(connections, seconds=seconds, requests=requests)
        return {}
    return run


def warm_up(rate: float, args: argparse.Namespace):
    offsets = schedule(rate, args.warmup, False, 0)
    return lambda generator: generator.open_loop(offsets, args.max_in_flight)


# --------------------------------------------------------------------------- report

# Each chain is compared with the bare processor that asks Envoy for the same phases.
PAIRS = {"headers": ("bare-headers", "chain-headers"), "body": ("bare-body", "chain-body")}
BARE_OF = {chain: bare for bare, chain in PAIRS.values()}


def _by_round(measurements: list[Measurement], kind: str, rate: float | None = None) -> list[dict[str, Measurement]]:
    """``{scenario: measurement}`` per round, for one kind (and open-loop rate). Round 0, the reference's saturation, is left out."""
    rounds: dict[int, dict[str, Measurement]] = {}
    for m in measurements:
        if m.kind == kind and m.round > 0 and (kind != "open-loop" or m.target_rate == rate):
            rounds.setdefault(m.round, {})[m.scenario] = m
    return [rounds[number] for number in sorted(rounds)]


def _per_round(rounds: list[dict[str, Measurement]], scenario: str, baseline: str, compare) -> list[float]:
    """``compare(scenario's measurement, baseline's)`` in every round that has both: comparisons never mix rounds."""
    return [round(compare(r[scenario], r[baseline]), 3) for r in rounds if scenario in r and baseline in r]


def _spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": min(values), "max": max(values), "rounds": values} if values else {}


def _difference(metric: str):
    return lambda m, baseline: m.latency_ms[metric] - baseline.latency_ms[metric]


def _ratio(value):
    return lambda m, baseline: value(m) / value(baseline)


def _requests_per_s(m: Measurement) -> float:
    return m.achieved_rate


def _p99(m: Measurement) -> float:
    return m.latency_ms["p99"]


def _processor_us(ms: list[Measurement]) -> dict:
    return _spread([m.cpu_percent["processor_us_per_request"] for m in ms if "processor_us_per_request" in m.cpu_percent])


@dataclass(frozen=True)
class Target:
    """One of issue 14's targets for the chains, checked per pair (headers, body) on the median of per-round values."""

    key: str
    description: str
    kind: str
    load_percent: float | None  # the open-loop rate it is measured at
    compare: Callable[[Measurement, Measurement], float]  # (chain's measurement, bare's) -> value
    comparison: str  # ">=" or "<="
    limit: float
    unit: str  # "x" (ratio) or "ms"

    def met(self, value: float) -> bool:
        return value >= self.limit if self.comparison == ">=" else value <= self.limit

    def text(self, value: float) -> str:
        return f"{value:.2f}x" if self.unit == "x" else f"{value:+.2f} ms"


TARGETS = (
    Target("saturation_requests_per_s_ratio", "saturation: requests/s, chain / bare", "saturation", None, _ratio(_requests_per_s), ">=", 0.95, "x"),
    Target("saturation_p99_ratio", "saturation: p99, chain / bare", "saturation", None, _ratio(_p99), "<=", 1.25, "x"),
    Target("load_50_percent_p99_ratio", "50 % load: p99, chain / bare", "open-loop", 50, _ratio(_p99), "<=", 1.25, "x"),
    Target("sequential_added_p50_ms", "one request at a time: p50, chain - bare", "sequential", None, _difference("p50"), "<=", 0.1, "ms"),
)


def summarise(measurements: list[Measurement], rates: dict[float, float]) -> dict:
    """Per scenario: saturation, each open-loop rate and one at a time, each as the median and min..max over rounds; then the targets.

    Whatever compares two scenarios (added latency over direct, chain / bare) is computed within each
    round first, so that a slow round does not pass for a difference between scenarios.
    """
    summary: dict = {"saturation": {}, "open_loop": {}, "sequential": {}, "targets": {}}
    saturated = _by_round(measurements, "saturation")
    for scenario in SCENARIOS:
        ms = [r[scenario] for r in saturated if scenario in r]
        if not ms:
            continue
        row = {
            "requests_per_s": _spread([m.achieved_rate for m in ms]),
            "latency_ms": {metric: _spread([m.latency_ms[metric] for m in ms]) for metric in ("p50", "p99", "p99.9")},
            "processor_cpu_us_per_request": _processor_us(ms),
        }
        if scenario in BARE_OF:
            row["vs_bare"] = {"requests_per_s_ratio": _spread(_per_round(saturated, scenario, BARE_OF[scenario], _ratio(_requests_per_s))),
                              "p99_ratio": _spread(_per_round(saturated, scenario, BARE_OF[scenario], _ratio(_p99)))}
        summary["saturation"][scenario] = row

    for percent, rate in rates.items():
        rounds = _by_round(measurements, "open-loop", rate)
        rows = {}
        for scenario in SCENARIOS:
            ms = [r[scenario] for r in rounds if scenario in r]
            if not ms:
                continue
            rows[scenario] = {
                "latency_ms": {metric: _spread([m.latency_ms[metric] for m in ms]) for metric in ("p50", "p99", "p99.9")},
                "added_ms": {metric: _spread(_per_round(rounds, scenario, "direct", _difference(metric))) for metric in ("p50", "p99", "p99.9")}
                if scenario != "direct" else {},
                "processor_cpu_us_per_request": _processor_us(ms),
                "send_lag_ms": {metric: max(m.send_lag_ms[metric] for m in ms) for metric in ("p50", "p99", "max")},
                "late_over_1ms_percent_max": max(m.schedule["late_over_1ms_percent"] for m in ms),
                "dropped": sum(m.schedule["dropped"] for m in ms),
                "generator_cpu_percent_max": max(m.cpu_percent["generator"] for m in ms),
                "processor_cpu_percent_median": statistics.median(m.cpu_percent.get("processor", 0.0) for m in ms),
            }
        summary["open_loop"][f"{percent}%"] = {"rate": rate, "scenarios": rows}

    sequential = _by_round(measurements, "sequential")
    for scenario in SCENARIOS:
        ms = [r[scenario] for r in sequential if scenario in r]
        if ms:
            summary["sequential"][scenario] = {
                "latency_ms": {metric: _spread([m.latency_ms[metric] for m in ms]) for metric in ("p50", "p99")},
                "added_ms": {metric: _spread(_per_round(sequential, scenario, "direct", _difference(metric))) for metric in ("p50", "p99")}
                if scenario != "direct" else {},
                "processor_cpu_us_per_request": _processor_us(ms),
            }

    for target in TARGETS:
        target_rate = rates.get(target.load_percent) if target.load_percent is not None else None
        measured = target.load_percent is None or target_rate is not None  # 50 % may not be among --load-percent
        rounds = _by_round(measurements, target.kind, target_rate) if measured else []
        entry: dict = {"target": f"{target.description} {target.comparison} {target.text(target.limit)}"}
        for pair, (bare, chain) in PAIRS.items():
            values = _spread(_per_round(rounds, chain, bare, target.compare))
            entry[pair] = {**values, "met": target.met(values["median"]) if values else None}
        summary["targets"][target.key] = entry
    return summary


def _cell(spread: dict) -> str:
    if not spread:
        return "-"
    return f"{spread['median']:+.2f} ({spread['min']:+.2f}..{spread['max']:+.2f})"


def _ratio_cell(spread: dict) -> str:
    if not spread:
        return "-"
    return f"{spread['median']:.2f}x ({spread['min']:.2f}..{spread['max']:.2f})"


def _us_cell(spread: dict) -> str:
    return f"{spread['median']:.0f}" if spread else "-"


def markdown(summary: dict, reference: dict) -> str:
    lines = [f"Reference: the bare processor's closed-loop rate, {reference['reference_rate']:.0f} requests/s "
             f"(headers {reference['bare-headers']:.0f}, body {reference['bare-body']:.0f}).", ""]

    lines += ["| target | headers | body |", "|---|---:|---:|"]
    by_key = {target.key: target for target in TARGETS}
    for key, entry in summary["targets"].items():
        cells = []
        for pair in PAIRS:
            result = entry[pair]
            if result["met"] is None:
                cells.append("not measured")
            else:
                bounds = f"{result['min']:.2f}..{result['max']:.2f}" if by_key[key].unit == "x" else f"{result['min']:+.2f}..{result['max']:+.2f}"
                cells.append(f"{by_key[key].text(result['median'])} ({bounds}): " + ("met" if result["met"] else "**not met**"))
        lines.append(f"| {entry['target']} | {' | '.join(cells)} |")

    lines += ["", "| saturation | requests/s | p50 / p99 / p99.9 ms | processor CPU µs/request | requests/s chain / bare | p99 chain / bare |",
              "|---|---:|---:|---:|---:|---:|"]
    for scenario, row in summary["saturation"].items():
        rate = row["requests_per_s"]
        absolute = " / ".join(f"{row['latency_ms'][m]['median']:.2f}" for m in ("p50", "p99", "p99.9"))
        vs_bare = row.get("vs_bare", {})
        lines.append(f"| {scenario} | {rate['median']:,.0f} ({rate['min']:,.0f}..{rate['max']:,.0f}) | {absolute} | "
                     f"{_us_cell(row['processor_cpu_us_per_request'])} | {_ratio_cell(vs_bare.get('requests_per_s_ratio', {}))} | "
                     f"{_ratio_cell(vs_bare.get('p99_ratio', {}))} |")

    lines += ["", "| load | scenario | added p50 ms | added p99 ms | added p99.9 ms | absolute p50 / p99 / p99.9 ms | processor CPU µs/request "
              "| send lag p50 / p99 ms | late > 1 ms | generator CPU |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for load, block in summary["open_loop"].items():
        for scenario, row in block["scenarios"].items():
            absolute = " / ".join(f"{row['latency_ms'][m]['median']:.2f}" for m in ("p50", "p99", "p99.9"))
            added = [_cell(row["added_ms"].get(m, {})) for m in ("p50", "p99", "p99.9")]
            lines.append(f"| {load} ({block['rate']:.0f}/s) | {scenario} | {' | '.join(added)} | {absolute} | "
                         f"{_us_cell(row['processor_cpu_us_per_request'])} | "
                         f"{row['send_lag_ms']['p50']:.3f} / {row['send_lag_ms']['p99']:.3f} | {row['late_over_1ms_percent_max']:.2f} % | "
                         f"{row['generator_cpu_percent_max']:.0f} % |")

    lines += ["", "| one request at a time | added p50 ms | added p99 ms | absolute p50 / p99 ms |", "|---|---:|---:|---:|"]
    for scenario, row in summary["sequential"].items():
        absolute = f"{row['latency_ms']['p50']['median']:.3f} / {row['latency_ms']['p99']['median']:.3f}"
        lines.append(f"| {scenario} | {_cell(row['added_ms'].get('p50', {}))} | {_cell(row['added_ms'].get('p99', {}))} | {absolute} |")

    lines += ["", "Saturation: closed loop, median over rounds (min..max). Chain / bare: the ratio within each round, median (min..max). "
              "Added: the scenario's percentile minus Envoy direct's in the same round at the same rate; median over rounds (min..max). "
              "Processor CPU: the processor's CPU seconds over the requests answered, median over rounds. "
              "Send lag and late sends: the worst round. Targets: the median of the per-round values."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds per open-loop measurement (default 10)")
    parser.add_argument("--warmup", type=float, default=2, help="seconds at the same rate before each measurement (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the spread over them is reported (default 3)")
    parser.add_argument("--load-percent", type=float, nargs="+", default=[25, 50, 75], help="rates as %% of the reference (default 25 50 75)")
    parser.add_argument("--rate", type=float, default=None, help="reference requests/s instead of measuring the saturation")
    parser.add_argument("--saturation-duration", type=float, default=8, help="seconds of each closed-loop saturation run (default 8)")
    parser.add_argument("--saturation-connections", type=int, default=32, help="closed-loop connections of the saturation run (default 32, as wrk's)")
    parser.add_argument("--sequential", type=int, default=1000, help="requests one at a time per scenario and round (default 1000)")
    parser.add_argument("--poisson", action="store_true", help="exponential gaps between sends (a Poisson process) instead of even ones")
    parser.add_argument("--connections", type=int, default=32, help="connections opened before an open-loop run; more when all are busy (default 32)")
    parser.add_argument("--max-in-flight", type=int, default=1000, help="a send beyond this many requests in flight is dropped and counted (default 1000)")
    parser.add_argument("--generator-nice", type=int, default=0,
                        help="the generator's nice value while it measures, e.g. -5 so that it is not the one starved (negative needs root; default 0)")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--envoy-concurrency", type=int, default=None, help="gateway Envoy worker threads (default: one per CPU)")
    parser.add_argument("--max-foreign-cpu", type=float, default=15.0, help="flag a measurement while others used more %% of a CPU (default 15)")
    parser.add_argument("--output", type=Path, default=BENCH / "profiles" / "open_loop.json", help="JSON results (default bench/profiles/open_loop.json)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)
    if "direct" not in args.scenarios:
        parser.error("direct is the baseline every added latency is measured against")

    run = BenchmarkRun("pluginchain-open-loop-", args.keep_logs)
    log_dir, procs = run.log_dir, run.procs
    measurements: list[Measurement] = []
    reference_rates: dict = {}
    started = datetime.datetime.now(datetime.UTC)

    def report(m: Measurement) -> None:
        measurements.append(m)
        lag = f"  send lag p50/p99/max {m.send_lag_ms['p50']:.3f}/{m.send_lag_ms['p99']:.3f}/{m.send_lag_ms['max']:.2f} ms, " \
              f"{m.schedule['late_over_1ms']} late > 1 ms" if m.send_lag_ms else ""
        print(f"round {m.round} {m.kind:<10} {m.scenario:<14} {m.achieved_rate:8.1f}/s  p50 {m.latency_ms['p50']:7.3f}  p99 {m.latency_ms['p99']:7.3f}"
              f"  p99.9 {m.latency_ms['p99.9']:7.3f} ms{lag}  CPU %: generator {m.cpu_percent['generator']:.0f} "
              f"({m.cpu_percent['generator_us_per_request']:.0f} us/request), processor "
              f"{m.cpu_percent.get('processor', 0):.0f} ({m.cpu_percent.get('processor_us_per_request', 0):.0f} us/request), "
              f"other {m.cpu_percent['foreign']:.0f}", flush=True)
        for problem in m.problems:
            print(f"  PROBLEM: {problem}", flush=True)

    def saturate(gateway: Gateway, round_number: int) -> Measurement:
        connections = args.saturation_connections
        m = measure(gateway, upstream, round_number, "saturation", closed_loop_run(connections, seconds=2),
                    closed_loop_run(connections, seconds=args.saturation_duration), None, args)
        report(m)
        return m

    with run:
        upstream_port, upstream_admin = free_port(), free_port()
        upstream = start_envoy(procs, "upstream", upstream_config(upstream_port, upstream_admin), 1)
        print(f"open loop ({'Poisson' if args.poisson else 'constant'} rate), {args.duration:g} s per measurement after {args.warmup:g} s, "
              f"{args.rounds} round(s); logs in {log_dir}", flush=True)
        if args.rate is None:
            for scenario in ("bare-headers", "bare-body"):
                gateway = start_gateway(procs, scenario, upstream_port, args.envoy_concurrency, 0)
                reference_rates[scenario] = saturate(gateway, 0).achieved_rate
                procs.stop(gateway.envoy)
                if gateway.processor:
                    procs.stop(gateway.processor)
            reference = min(reference_rates.values())
        else:
            reference = args.rate
            reference_rates = {"bare-headers": float("nan"), "bare-body": float("nan")}
        reference_rates["reference_rate"] = reference
        rates = {int(p) if p == int(p) else p: round(reference * p / 100, 1) for p in args.load_percent}
        print(f"reference rate {reference:.0f}/s; open-loop rates: " + ", ".join(f"{p}% = {r:g}/s" for p, r in rates.items()), flush=True)

        for round_number in range(1, args.rounds + 1):
            gateways = {s: start_gateway(procs, s, upstream_port, args.envoy_concurrency, round_number) for s in args.scenarios}
            try:
                for gateway in gateways.values():
                    report(measure(gateway, upstream, round_number, "sequential", closed_loop_run(1, requests=100),
                                   closed_loop_run(1, requests=args.sequential), None, args))
                # Saturation of every scenario, next to each other in the same round, for the chain / bare ratios.
                for gateway in gateways.values():
                    saturate(gateway, round_number)
                for index, rate in enumerate(rates.values()):
                    for gateway in gateways.values():
                        seed = 1000 * round_number + index  # every scenario of a round and rate gets the same Poisson schedule
                        report(measure(gateway, upstream, round_number, "open-loop", warm_up(rate, args),
                                       open_loop_run(rate, args.duration, args, seed), rate, args))
            finally:
                for gateway in gateways.values():
                    procs.stop(gateway.envoy)
                    if gateway.processor:
                        procs.stop(gateway.processor)

    if not measurements or "reference_rate" not in reference_rates:
        return 1
    summary = summarise(measurements, rates)
    table = markdown(summary, reference_rates)
    print("\n" + table)
    problems = [f"round {m.round} {m.kind} {m.scenario}: {p}" for m in measurements for p in m.problems]
    machine = {k: v for k, v in versions("true").items() if k != "wrk"}  # run_bench's versions() minus wrk
    output = {
        "date": started.isoformat(timespec="seconds"), "complete": not run.failed,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine, "reference": reference_rates, "rates": rates, **summary,
        "problems": problems, "measurements": [asdict(m) for m in measurements],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(output, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    print(f"\nresults written to {args.output}")
    if problems:
        print("PROBLEMS (these measurements are suspect):\n  " + "\n  ".join(problems))
    return 1 if run.failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
