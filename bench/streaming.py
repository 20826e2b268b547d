"""Streamed completions through the gateway: pluginchain's redacting chain against a bare ext_proc server.

In one run on one machine, the same gateway Envoy configuration (pluginchain's own,
``pluginchain._sidecar.envoy_config.render``) in front of the same upstream
(``examples/demo_upstream.py``'s handler, which streams a chat completion as server-sent events,
one event per word of "You said: <prompt>"), with two ext_proc servers:

    bare     bench/bare_processor.py --mode stream: switches the response body to STREAMED and
             answers every chunk unchanged (an empty BodyResponse)
    chain    pluginchain serve --config bench/chains/stream.yaml: rate limiter, and a post_request
             content_filter that redacts SSNs (``action: redact``) event by event

and, as a latency reference, the client straight to the upstream (``upstream``, no gateway).
Each is checked before it is measured: a streamed request returns 200 ``text/event-stream`` with
the prompt's text, the SSN redacted by the chain and untouched by bare, Envoy sent the response
body to the processor, and the chain's plugins counted the request. Interleaved over ``--rounds``:

- latency: the upstream waits ``--delay`` s between events (45 events). Time from the request
  to the first event, to the first non-empty content delta (time to first token) and to the end
  of the stream; how much later each event arrives than through bare; gaps between events;
- paced: events ``--paced-delay`` s apart, so each reaches the processor as its own chunk, as
  an LLM's tokens do. Events/s and the processor's CPU per event;
- throughput: no delay, the answer repeated ``--repeat`` times. Envoy hands the processor many
  events per chunk. Events/s at the client and the processor's CPU per event and per chunk;
- memory, once per gateway after the rounds: one ~``--big-mb`` MB stream without delay. The
  processor's RSS (``VmRSS``) is sampled every 20 ms before, during and after it; the target for
  the chain is growth under 10 MB.

The processors' CPU time comes from ``/proc/<pid>/task/*/schedstat`` (ns), the other processes'
from ``/proc/<pid>/stat``. The upstream runs with TCP_NODELAY (see ``serve_upstream``).

    .venv/bin/python bench/streaming.py [--rounds 3] [--output bench/profiles/streaming.json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run_bench import (
    API_KEY,
    EXT_PROC_FAILURE_COUNTERS,
    PATH,
    BenchmarkRun,
    Proc,
    Processes,
    envoy_counters,
    free_port,
    gateway_config,
    http_request,
    machine_busy_jiffies,
    port_open,
    sidecar_metric,
    start_envoy,
    wait_until,
)

from pluginchain._sidecar.gateway import envoy_binary

ROOT = BENCH.parent
GATEWAYS = ("bare", "chain")
SSN = "123-45-6789"
MASK = "[REDACTED]"
CHAIN_FILE = BENCH / "chains" / "stream.yaml"
REDACTOR = "ssn_redactor"  # the content_filter's id in chains/stream.yaml
MEMORY_TARGET_MB = 10.0
HOLDBACK_CHARS = 10  # the SSN pattern matches at most 11 characters: the redactor keeps back 10

# 40 words; the answer "You said: <prompt>" is 42 words: 42 content events per repeat, plus the
# role event before and the finish and [DONE] events after the last repeat.
PROMPT = (
    f"please remember my social security number {SSN} and then list the words alpha bravo charlie "
    "delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec romeo "
    "sierra tango uniform victor whiskey xray yankee zulu in order"
)


def chat_request(prompt: str) -> bytes:
    return json.dumps({
        "model": "demo-model",
        "stream": True,
        "messages": [{"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": prompt}],
    }, separators=(",", ":")).encode()


def expected_content(scenario: str, repeat: int) -> str:
    text = " ".join([f"You said: {PROMPT}"] * repeat)
    return text.replace(SSN, MASK) if scenario == "chain" else text


def serve_upstream(port: int) -> None:
    """``examples/demo_upstream.py``'s handler with TCP_NODELAY on its connections, as production
    HTTP servers set it. http.server writes a response's headers and its first event in two
    writes; with Nagle's algorithm the event then waits for the peer's delayed ACK (~40 ms) on
    about every other stream, which would swamp the first-event times."""
    from http.server import ThreadingHTTPServer

    sys.path.insert(0, str(ROOT / "examples"))
    from demo_upstream import DemoUpstream

    class NoDelayUpstream(DemoUpstream):
        disable_nagle_algorithm = True

    server = ThreadingHTTPServer(("127.0.0.1", port), NoDelayUpstream)
    server.daemon_threads = True
    print(f"demo upstream (TCP_NODELAY) on 127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()


# --------------------------------------------------------------------------- client


@dataclass
class Received:
    """One streamed response as the client saw it: each network chunk with its arrival time."""

    status: int
    content_type: str
    started: float
    ended: float
    chunks: list[tuple[float, bytes]]

    @property
    def size(self) -> int:
        return sum(len(c) for _, c in self.chunks)


@dataclass
class Event:
    at: float  # arrival of the chunk that completed the event
    data: str | None
    content: str | None  # choices[0].delta.content, when present


def stream(client: httpx.Client, base_url: str, delay: float = 0.0, repeat: int = 1, progress: list[int] | None = None) -> Received:
    headers = {"content-type": "application/json", "x-api-key": API_KEY, "x-demo-repeat": str(repeat)}
    if delay:
        headers["x-demo-delay"] = f"{delay:g}"
    chunks: list[tuple[float, bytes]] = []
    started = time.monotonic()
    with client.stream("POST", base_url + PATH, content=chat_request(PROMPT), headers=headers) as response:
        if progress is None:
            for chunk in response.iter_bytes():
                chunks.append((time.monotonic(), chunk))
        else:
            for chunk in response.iter_bytes():
                chunks.append((time.monotonic(), chunk))
                progress[0] += len(chunk)
        return Received(response.status_code, response.headers.get("content-type", ""), started, time.monotonic(), chunks)


def events_of(received: Received, parse: bool = True) -> list[Event]:
    """The stream cut at blank lines (the demo upstream and the sidecar both write ``\\n\\n``)."""
    events: list[Event] = []
    buffer = b""
    for at, chunk in received.chunks:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n\n")
        for raw in complete:
            events.append(_event(at, raw) if parse else Event(at, None, None))
    if buffer.strip():
        events.append(_event(received.ended, buffer) if parse else Event(received.ended, None, None))
    return events


def _event(at: float, raw: bytes) -> Event:
    data = [line[5:].lstrip() for line in raw.decode("utf-8", "replace").splitlines() if line.startswith("data:")]
    if not data:
        return Event(at, None, None)
    text = "\n".join(data)
    content = None
    if text != "[DONE]":
        with contextlib.suppress(ValueError, KeyError, IndexError, TypeError, AttributeError):
            content = json.loads(text)["choices"][0]["delta"].get("content")
    return Event(at, text, content)


def check_stream(what: str, received: Received, events: list[Event], expected: str) -> list[str]:
    """What is wrong with a response; empty when it is the streamed answer we expect."""
    if received.status != 200:
        return [f"{what}: status {received.status}: {b''.join(c for _, c in received.chunks)[:300]!r}"]
    problems = []
    if not received.content_type.startswith("text/event-stream"):
        problems.append(f"{what}: content-type {received.content_type!r}")
    content = "".join(e.content or "" for e in events)
    if content != expected:
        at = next((i for i, (a, b) in enumerate(zip(content, expected)) if a != b), min(len(content), len(expected)))
        problems.append(f"{what}: content differs from the expected at character {at} "
                        f"(got {len(content)} characters, expected {len(expected)}): {content[max(0, at - 40):at + 40]!r}")
    if not events or events[-1].data != "[DONE]":
        problems.append(f"{what}: the stream does not end with data: [DONE]")
    return problems


def arrival(received: Received, burst_gap: float = 0.002) -> dict:
    """How evenly the bytes arrived: the longest pause, and the most bytes in one burst (chunks
    less than ``burst_gap`` s apart)."""
    gaps, bursts, burst = [], [], 0
    previous = received.started
    for at, chunk in received.chunks:
        gap = at - previous
        gaps.append(gap)
        if gap >= burst_gap and burst:
            bursts.append(burst)
            burst = 0
        burst += len(chunk)
        previous = at
    bursts.append(burst)
    return {"client_max_gap_ms": 1000 * max(gaps[1:], default=0.0), "client_max_burst_bytes": max(bursts)}


# --------------------------------------------------------------------------- processes


@dataclass
class Target:
    """Where the client sends its requests, and what runs behind it."""

    name: str
    url: str
    processor: Proc | None = None
    envoy: Proc | None = None
    admin_port: int | None = None
    metrics_port: int | None = None
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=httpx.Timeout(120.0, connect=5.0)))


def start_gateway(name: str, procs: Processes, upstream_port: int, envoy_concurrency: int | None) -> Target:
    listen_port, admin_port, processor_port, metrics_port = (free_port() for _ in range(4))
    if name == "bare":
        argv = [sys.executable, str(BENCH / "bare_processor.py"), "--port", str(processor_port), "--mode", "stream"]
    else:
        argv = [sys.executable, "-m", "pluginchain.cli", "serve", "--config", str(CHAIN_FILE),
                "--sidecar-port", str(processor_port), "--metrics-port", str(metrics_port),
                "--log-level", "warning", "--grace", "1"]
    processor = procs.start(f"{name}-processor", argv)
    wait_until(lambda: port_open(processor_port), f"{name} processor listening", processor)
    if name == "chain":
        wait_until(lambda: port_open(metrics_port), f"{name} metrics listening", processor)
    config = gateway_config(upstream_port, listen_port, admin_port, processor_port, ext_proc=True)
    envoy = start_envoy(procs, f"{name}-envoy", config, envoy_concurrency)
    return Target(name, f"http://127.0.0.1:{listen_port}", processor, envoy, admin_port,
                  metrics_port if name == "chain" else None)


def cpu_seconds(proc: Proc) -> float:
    """CPU time of the process's live threads in ns (``/proc/<pid>/task/*/schedstat``): the clock
    ticks of /proc/<pid>/stat (10 ms) are too coarse for short runs. The processors' threads
    (event loop, grpc's poller) live as long as they do."""
    total = 0
    try:
        for task in Path(f"/proc/{proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                total += int((task / "schedstat").read_text().split()[0])
    except OSError:
        return proc.cpu_seconds()
    return total / 1e9 if total else proc.cpu_seconds()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def gateway_stats(target: Target) -> dict[str, int]:
    """The gateway's ext_proc counters, and the bytes it read from the upstream."""
    if target.admin_port is None:
        return {}
    counters = {k.removeprefix("ext_proc."): v for k, v in envoy_counters(target.admin_port).items() if k.startswith("ext_proc.")}
    status, _, payload = http_request(target.admin_port, "GET", "/stats?format=json&filter=^cluster\\.llm_upstream\\.upstream_cx_rx_bytes_total$")
    if status == 200:
        for stat in json.loads(payload).get("stats", []):
            if stat.get("name") == "cluster.llm_upstream.upstream_cx_rx_bytes_total":
                counters["upstream_rx_bytes"] = stat["value"]
    return counters


def ext_proc_problems(what: str, delta: dict[str, int], streams: int) -> list[str]:
    problems = [f"{what}: Envoy's ext_proc.{bad} = {delta[bad]}" for bad in EXT_PROC_FAILURE_COUNTERS if delta.get(bad)]
    if delta.get("streams_started", 0) != streams:
        problems.append(f"{what}: Envoy opened {delta.get('streams_started', 0)} ext_proc streams, expected {streams}")
    return problems


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items()}


def check_target(target: Target) -> dict:
    """One short stream proves the scenario is wired as it claims; raises if not."""
    name = target.name

    def chain_counts() -> dict[str, float]:
        port = target.metrics_port
        return {
            "rate_limiter_allowed": sidecar_metric(port, "pluginchain_plugin_decisions_total", plugin="rate_limiter", outcome="allow"),
            "redactor_decisions": sidecar_metric(port, "pluginchain_plugin_decisions_total", plugin=REDACTOR),
            "requests_allowed": sidecar_metric(port, "pluginchain_requests_total", outcome="allow"),
        }

    before = gateway_stats(target)
    counts_before = chain_counts() if name == "chain" else {}
    received = stream(target.client, target.url, repeat=3)
    events = events_of(received)
    problems = check_stream(f"{name} check", received, events, expected_content(name, 3))
    checks: dict = {"status": received.status, "events": len(events), "bytes": received.size,
                    "redacted": "".join(e.content or "" for e in events).count(MASK)}
    if target.admin_port is not None:
        delta = _delta(before, gateway_stats(target))
        problems += ext_proc_problems(f"{name} check", delta, 1)
        # The request headers, the response headers, then the response body: at least one chunk.
        checks["ext_proc_msgs_sent"] = delta.get("stream_msgs_sent", 0)
        if checks["ext_proc_msgs_sent"] < 3:
            problems.append(f"{name} check: Envoy sent the processor {checks['ext_proc_msgs_sent']} messages: "
                            "the response body did not reach it")
    if name == "chain":
        counts = _delta(counts_before, chain_counts())
        checks.update(counts)
        if counts["rate_limiter_allowed"] != 1:
            problems.append(f"chain check: the rate limiter allowed {counts['rate_limiter_allowed']:g} requests, expected 1")
        if counts["redactor_decisions"] < len(events) - 2:
            problems.append(f"chain check: the redactor judged {counts['redactor_decisions']:g} events of {len(events)}")
        if counts["requests_allowed"] != 1:
            problems.append(f"chain check: the sidecar counted {counts['requests_allowed']:g} allowed requests, expected 1")
        if checks["redacted"] != 3:
            problems.append(f"chain check: {checks['redacted']} SSNs redacted of 3")
    if problems:
        raise RuntimeError("; ".join(problems))
    return checks


# --------------------------------------------------------------------------- measurements


class RssSampler(threading.Thread):
    """Samples a process's VmRSS, with the bytes the client has received so far, every ``interval`` s."""

    def __init__(self, pid: int, progress: list[int], interval: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.progress, self.interval = pid, progress, interval
        self.samples: list[tuple[float, int, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            with contextlib.suppress(OSError, RuntimeError):
                self.samples.append((time.monotonic(), self.progress[0], rss_bytes(self.pid)))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def latency_run(target: Target, delay: float) -> dict:
    """One stream with ``delay`` s between the upstream's events: when things reach the client."""
    cpu_before = cpu_seconds(target.processor) if target.processor else 0.0
    received = stream(target.client, target.url, delay=delay)
    events = events_of(received)
    row: dict = {"problems": check_stream(f"{target.name} latency", received, events, expected_content(target.name, 1))}
    start = received.started
    first_content = next((e.at for e in events if e.content), None)
    content_times = [e.at for e in events if e.content is not None]
    gaps = [1000 * (b - a) for a, b in zip(content_times, content_times[1:])]
    row.update({
        "first_event_ms": 1000 * (events[0].at - start) if events else None,
        "ttft_ms": 1000 * (first_content - start) if first_content is not None else None,
        "total_ms": 1000 * (received.ended - start),
        "events": len(events),
        "gap_ms": {"p50": _pct(gaps, 50), "p90": _pct(gaps, 90), "min": min(gaps, default=None), "max": max(gaps, default=None)},
        # A gap under a fifth of the upstream's: two events that left it apart arrived together.
        "burst_gaps": sum(1 for g in gaps if g < 200 * delay),
        "_times": [e.at - start for e in events],
    })
    if target.processor is not None:
        row["processor_cpu_us_per_event"] = 1e6 * (cpu_seconds(target.processor) - cpu_before) / max(1, len(events))
    return row


def flow_run(target: Target, procs: Processes, repeat: int, delay: float = 0.0, big: bool = False) -> dict:
    """One stream of ``repeat`` answers: events/s, where the CPU went, the processor's CPU per
    event and chunk, and its RSS (sampled every 20 ms; with ``big``, a settled baseline first)."""
    assert target.processor is not None
    pid = target.processor.pid
    baseline = []
    for _ in range(10 if big else 1):
        baseline.append(rss_bytes(pid))
        if big:
            time.sleep(0.05)
    rss_before = statistics.median(baseline)
    stats_before = gateway_stats(target)
    cpu_before = {p.name: cpu_seconds(p) if p is target.processor else p.cpu_seconds() for p in procs.running}
    client_before = time.process_time()
    busy_before, total_before = machine_busy_jiffies()
    progress = [0]
    sampler = RssSampler(pid, progress)
    sampler.start()
    try:
        received = stream(target.client, target.url, delay=delay, repeat=repeat, progress=progress)
        busy_after, total_after = machine_busy_jiffies()
        client_cpu = time.process_time() - client_before
        cpu_after = {p.name: cpu_seconds(p) if p is target.processor else p.cpu_seconds() for p in procs.running}
        if big:
            time.sleep(1.0)  # RSS after the stream, once the processor has let go of it
    finally:
        sampler.stop()
    rss_after = rss_bytes(pid)
    delta = _delta(stats_before, gateway_stats(target))
    wall = received.ended - received.started
    events = events_of(received)
    row: dict = {
        "repeat": repeat, "delay_s": delay,
        "problems": check_stream(f"{target.name} x{repeat}", received, events, expected_content(target.name, repeat)),
        "events": len(events), "bytes": received.size, "seconds": wall,
        "events_per_s": len(events) / wall, "mb_per_s": received.size / wall / 1e6,
        "redacted": "".join(e.content or "" for e in events).count(MASK),
        **arrival(received),
    }
    row["problems"] += ext_proc_problems(f"{target.name} x{repeat}", delta, 1)
    role = {"upstream": "upstream", f"{target.name}-processor": "processor", f"{target.name}-envoy": "gateway_envoy"}
    cpu = {role[n]: 100 * (cpu_after[n] - cpu_before.get(n, 0.0)) / wall for n in cpu_after if n in role}
    cpu["client"] = 100 * client_cpu / wall
    cpu["machine_busy"] = 100 * os.cpu_count() * (busy_after - busy_before) / max(1, total_after - total_before)
    cpu["other"] = max(0.0, cpu["machine_busy"] - sum(v for k, v in cpu.items() if k != "machine_busy"))
    row["cpu_percent"] = {k: round(v, 1) for k, v in cpu.items()}
    processor_cpu = cpu_after[target.processor.name] - cpu_before[target.processor.name]
    chunks = max(1, delta.get("stream_msgs_sent", 0) - 2)  # minus the request and the response headers
    row.update({
        "processor_cpu_s": processor_cpu,
        "processor_cpu_us_per_event": 1e6 * processor_cpu / max(1, len(events)),
        "body_chunks": chunks,
        "events_per_chunk": len(events) / chunks,
        "processor_cpu_us_per_chunk": 1e6 * processor_cpu / chunks,
        "upstream_bytes": delta.get("upstream_rx_bytes"),
        "mean_chunk_bytes": delta["upstream_rx_bytes"] / chunks if delta.get("upstream_rx_bytes") else None,
    })
    during = [(b, r) for t, b, r in sampler.samples if t <= received.ended]
    peak = max([r for _, r in during] + [rss_before])
    row.update({"rss_before_mb": rss_before / 1e6, "rss_max_mb": peak / 1e6, "rss_after_mb": rss_after / 1e6,
                "rss_growth_max_mb": (peak - rss_before) / 1e6, "rss_growth_after_mb": (rss_after - rss_before) / 1e6,
                "rss_samples": len(during)})
    if big:
        total = max(1, received.size)
        row["rss_growth_by_share_streamed_mb"] = {
            f"{q}%": (max(r for b, r in during if b <= total * q / 100) - rss_before) / 1e6
            if any(b <= total * q / 100 for b, _ in during) else None
            for q in (25, 50, 75, 100)
        }
        # (bytes at the client, RSS) every ~0.25 s, to see how memory follows the stream.
        step = max(1, len(during) // max(1, int(wall * 4)))
        row["rss_timeline_mb"] = [[round(b / 1e6, 2), round(r / 1e6, 2)] for b, r in during[::step]]
    return row


# --------------------------------------------------------------------------- report


def _pct(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))]


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _by_round(rows: list[dict], key: str) -> dict[int, dict[str, float]]:
    rounds: dict[int, dict[str, list[float]]] = {}
    for r in rows:
        if r.get(key) is not None:
            rounds.setdefault(r["round"], {}).setdefault(r["scenario"], []).append(r[key])
    return {n: {s: statistics.median(v) for s, v in d.items()} for n, d in sorted(rounds.items())}


def _ratio(rows: list[dict], key: str) -> dict | None:
    """chain/bare: the ratio of the medians, and the median of each round's own ratio."""
    chain = _median(r.get(key) for r in rows if r["scenario"] == "chain")
    bare = _median(r.get(key) for r in rows if r["scenario"] == "bare")
    if not chain or not bare:
        return None
    per_round = [d["chain"] / d["bare"] for d in _by_round(rows, key).values() if "chain" in d and d.get("bare")]
    return {"ratio_of_medians": chain / bare, "median_of_round_ratios": _median(per_round), "round_ratios": [round(x, 3) for x in per_round]}


def _added(rows: list[dict], key: str) -> dict | None:
    """chain - bare, per round (medians of the round's streams)."""
    per_round = [d["chain"] - d["bare"] for d in _by_round(rows, key).values() if "chain" in d and "bare" in d]
    return {"median": _median(per_round), "rounds": [round(x, 2) for x in per_round]} if per_round else None


def _flow_summary(rows: list[dict]) -> dict:
    keys = ("events_per_s", "mb_per_s", "processor_cpu_us_per_event", "processor_cpu_us_per_chunk", "events_per_chunk",
            "mean_chunk_bytes", "client_max_gap_ms", "client_max_burst_bytes", "rss_growth_max_mb")
    return {**{k: _median(r.get(k) for r in rows) for k in keys},
            "rounds_events_per_s": [round(r["events_per_s"]) for r in rows],
            "cpu_percent": {k: _median(r["cpu_percent"].get(k) for r in rows) for k in rows[0]["cpu_percent"]}}


def summarise(latency: list[dict], paced: list[dict], throughput: list[dict], memory: dict[str, dict]) -> dict:
    summary: dict = {"latency": {}, "paced": {}, "throughput": {}, "memory": memory, "compared": {}}
    for name in ("upstream", *GATEWAYS):
        rows = [r for r in latency if r["scenario"] == name]
        if rows:
            summary["latency"][name] = {
                **{k: _median(r.get(k) for r in rows) for k in ("first_event_ms", "ttft_ms", "total_ms", "processor_cpu_us_per_event")},
                "gap_p50_ms": _median(r["gap_ms"]["p50"] for r in rows),
                "gap_p90_ms": _median(r["gap_ms"]["p90"] for r in rows),
                "gap_max_ms": max((r["gap_ms"]["max"] or 0) for r in rows),
                "burst_gaps": sum(r["burst_gaps"] for r in rows),
                "streams": len(rows),
            }
        for kind, runs in (("paced", paced), ("throughput", throughput)):
            rows = [r for r in runs if r["scenario"] == name]
            if rows:
                summary[kind][name] = _flow_summary(rows)

    compared = summary["compared"]
    # Per-event delay through the chain: the n-th event of the chain's streams against the n-th of
    # bare's (same upstream timing). The chain sends one event per upstream event, and one more
    # with the held-back text just before the finishing event: the role and word events line up
    # from the start, [DONE] from the end.
    bare_times = [r["_times"] for r in latency if r["scenario"] == "bare"]
    chain_times = [r["_times"] for r in latency if r["scenario"] == "chain"]
    if bare_times and chain_times:
        words = min(len(t) for t in bare_times + chain_times) - 3
        per_event = [1000 * (_median(t[i] for t in chain_times) - _median(t[i] for t in bare_times)) for i in range(max(0, words))]
        if per_event:
            compared["event_delay_added_ms"] = {
                "median": _median(per_event), "max": max(per_event), "first_event": per_event[0],
                "done_event": 1000 * (_median(t[-1] for t in chain_times) - _median(t[-1] for t in bare_times)),
            }
    compared.update({
        "ttft_added_ms": _added(latency, "ttft_ms"),
        "first_event_added_ms": _added(latency, "first_event_ms"),
        "total_added_ms": _added(latency, "total_ms"),
        "ttft_chain/bare": _ratio(latency, "ttft_ms"),
        "total_chain/bare": _ratio(latency, "total_ms"),
        "latency_cpu_per_event_chain/bare": _ratio(latency, "processor_cpu_us_per_event"),
        "paced_events_per_s_chain/bare": _ratio(paced, "events_per_s"),
        "paced_cpu_per_event_chain/bare": _ratio(paced, "processor_cpu_us_per_event"),
        "throughput_events_per_s_chain/bare": _ratio(throughput, "events_per_s"),
        "throughput_cpu_per_event_chain/bare": _ratio(throughput, "processor_cpu_us_per_event"),
    })
    if "bare" in memory and "chain" in memory:
        compared["memory_growth_chain_minus_bare_mb"] = memory["chain"]["rss_growth_max_mb"] - memory["bare"]["rss_growth_max_mb"]
    return summary


def _ratio_line(label: str, ratio: dict | None) -> None:
    if ratio:
        rounds = ", ".join(f"{x:.2f}" for x in ratio["round_ratios"])
        print(f"  {label} chain/bare: {ratio['ratio_of_medians']:.2f}x (median of round ratios {ratio['median_of_round_ratios']:.2f}x; rounds {rounds})")


def _bottleneck(name: str, row: dict) -> str:
    """Which process limits a run: the busiest one. The demo upstream is one Python thread per stream."""
    cpu = row["cpu_percent"]
    busiest = max(("processor", "gateway_envoy", "upstream", "client"), key=lambda k: cpu.get(k) or 0)
    if busiest == "upstream":
        return (f"{name}: the demo upstream is the busiest process ({cpu['upstream']:.0f}% of a CPU, one Python thread; the processor "
                f"{cpu.get('processor') or 0:.0f}%): the upstream, not the processor, bounds {row['events_per_s']:.0f} events/s")
    return (f"{name}: the {busiest.replace('_', ' ')} is the busiest process ({cpu.get(busiest) or 0:.0f}% of a CPU; the upstream "
            f"{cpu.get('upstream') or 0:.0f}%)")


def print_report(summary: dict, settings: dict) -> list[str]:
    """Prints the tables; returns the findings, which go into the JSON too."""
    notes: list[str] = []
    lat, compared, memory = summary["latency"], summary["compared"], summary["memory"]
    print(f"\nLatency: the upstream waits {settings['delay_s'] * 1000:g} ms between events ({settings['latency_events']} events), "
          f"{settings['latency_streams']} stream(s) per scenario and round; medians")
    print(f"{'scenario':<10}{'first event ms':>15}{'TTFT ms':>10}{'total ms':>10}{'event gaps p50/p90/max ms':>28}{'bursts':>8}"
          f"{'proc µs/event':>15}")
    for name, row in lat.items():
        gaps = f"{_fmt(row['gap_p50_ms'])}/{_fmt(row['gap_p90_ms'])}/{_fmt(row['gap_max_ms'])}"
        print(f"{name:<10}{_fmt(row['first_event_ms']):>15}{_fmt(row['ttft_ms']):>10}{_fmt(row['total_ms']):>10}{gaps:>28}"
              f"{row['burst_gaps']:>8}{_fmt(row['processor_cpu_us_per_event'], 0):>15}")
    for key, label in (("ttft_added_ms", "TTFT"), ("first_event_added_ms", "first event"), ("total_added_ms", "whole stream")):
        if compared.get(key):
            rounds = ", ".join(f"{x:+.1f}" for x in compared[key]["rounds"])
            print(f"  {label} added by pluginchain vs bare: {compared[key]['median']:+.1f} ms (rounds: {rounds})")
    if compared.get("event_delay_added_ms"):
        d = compared["event_delay_added_ms"]
        print(f"  each event reaches the client later through the chain than through bare by: median {d['median']:+.1f} ms, "
              f"max {d['max']:+.1f} ms (first event {d['first_event']:+.1f}, [DONE] {d['done_event']:+.1f})")
    _ratio_line("TTFT", compared.get("ttft_chain/bare"))
    _ratio_line("whole stream", compared.get("total_chain/bare"))
    _ratio_line("processor CPU per event", compared.get("latency_cpu_per_event_chain/bare"))
    holdback_words = settings["holdback_events"]
    print(f"  (the redactor keeps back the last {HOLDBACK_CHARS} characters of text; \"You said: \" is exactly {HOLDBACK_CHARS}, "
          f"so the first content leaves with word {holdback_words + 1}: {holdback_words} x {settings['delay_s'] * 1000:g} ms of the "
          "added TTFT is that hold-back, by design)")

    for kind, title in (("paced", f"Paced: {settings['paced_delay_s'] * 1000:g} ms between events (one event per chunk), "
                                  f"answer x{settings['paced_repeat']}"),
                        ("throughput", f"Throughput: no delay, answer x{settings['repeat']}")):
        table = summary[kind]
        if not table:
            continue
        print(f"\n{title}; one stream per scenario and round; medians")
        print(f"{'scenario':<10}{'events/s':>10}{'MB/s':>7}{'µs/event':>10}{'µs/chunk':>10}{'events/chunk':>14}{'RSS +MB':>9}"
              f"{'max gap ms':>12}   CPU % (100 = one CPU): processor / gateway envoy / upstream / client / other   rounds (events/s)")
        for name, row in table.items():
            cpu = row["cpu_percent"]
            cpus = " / ".join(_fmt(cpu.get(k), 0) for k in ("processor", "gateway_envoy", "upstream", "client", "other"))
            print(f"{name:<10}{row['events_per_s']:>10.0f}{row['mb_per_s']:>7.1f}{_fmt(row['processor_cpu_us_per_event']):>10}"
                  f"{_fmt(row['processor_cpu_us_per_chunk'], 0):>10}{_fmt(row['events_per_chunk']):>14}{_fmt(row['rss_growth_max_mb']):>9}"
                  f"{_fmt(row['client_max_gap_ms']):>12}   {cpus:<52}{', '.join(str(x) for x in row['rounds_events_per_s'])}")
        _ratio_line("events/s", compared.get(f"{kind}_events_per_s_chain/bare"))
        _ratio_line("processor CPU per event", compared.get(f"{kind}_cpu_per_event_chain/bare"))
        for name, row in table.items():
            note = f"{kind}: " + _bottleneck(name, row)
            print(f"  {note}")
            notes.append(note)

    if memory:
        print(f"\nMemory: one stream of ~{settings['big_mb']:g} MB from the upstream (answer x{settings['big_repeat']}, no delay) per gateway; "
              "processor VmRSS sampled every 20 ms")
        print(f"{'scenario':<10}{'MB in':>7}{'MB out':>8}{'events':>8}{'s':>6}{'events/s':>10}{'chunks':>8}{'KB/chunk':>10}"
              f"{'RSS before':>12}{'max':>8}{'after':>8}{'growth':>8}   growth at 25/50/75/100% of the stream   max gap ms   max burst MB")
        for name, row in memory.items():
            quarters = " / ".join(_fmt(v) for v in row["rss_growth_by_share_streamed_mb"].values())
            print(f"{name:<10}{(row['upstream_bytes'] or 0) / 1e6:>7.1f}{row['bytes'] / 1e6:>8.1f}{row['events']:>8}{row['seconds']:>6.1f}"
                  f"{row['events_per_s']:>10.0f}{row['body_chunks']:>8}{_fmt((row['mean_chunk_bytes'] or 0) / 1024):>10}"
                  f"{row['rss_before_mb']:>12.1f}{row['rss_max_mb']:>8.1f}{row['rss_after_mb']:>8.1f}{row['rss_growth_max_mb']:>8.1f}"
                  f"   {quarters:<38}{row['client_max_gap_ms']:>13.0f}{row['client_max_burst_bytes'] / 1e6:>15.2f}")
        if "chain" in memory:
            row = memory["chain"]
            verdict = "met" if row["rss_growth_max_mb"] < MEMORY_TARGET_MB else "NOT met"
            note = (f"sidecar RSS growth while a {(row['upstream_bytes'] or 0) / 1e6:.0f} MB stream passes the redacting chain: "
                    f"max {row['rss_growth_max_mb']:.1f} MB, {row['rss_growth_after_mb']:+.1f} MB a second after it ended "
                    f"(target < {MEMORY_TARGET_MB:g} MB: {verdict})")
            print(f"  {note}")
            notes.append(note)
    print()
    return notes


def machine() -> dict:
    import grpc

    def first_line(argv: list[str]) -> str | None:
        with contextlib.suppress(Exception):
            completed = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10)
            return (completed.stdout + completed.stderr).strip().splitlines()[0]
        return None

    cpu_model = None
    with contextlib.suppress(OSError):
        cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("model name")), None)
    dirty = None
    with contextlib.suppress(Exception):
        completed = subprocess.run(["git", "status", "--porcelain", "--", "sidecar"], cwd=ROOT, check=False, capture_output=True, text=True, timeout=10)
        dirty = bool(completed.stdout.strip()) if completed.returncode == 0 else None
    return {"envoy": first_line([envoy_binary(), "--version"]), "grpcio": grpc.__version__, "httpx": httpx.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(), "cpu_model": cpu_model, "kernel": platform.release(),
            "git_commit": first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]), "sidecar_uncommitted_changes": dirty}


# --------------------------------------------------------------------------- main


def _print_flow(kind: str, round_number: int | str, name: str, row: dict) -> None:
    cpu = row["cpu_percent"]
    print(f"{kind} round {round_number} {name:<6} {row['events_per_s']:7.0f} events/s {row['mb_per_s']:5.1f} MB/s  "
          f"proc {row['processor_cpu_us_per_event']:.1f} µs/event, {row['events_per_chunk']:.1f} events/chunk, "
          f"RSS {row['rss_growth_max_mb']:+.1f} MB  CPU %: proc {_fmt(cpu.get('processor'), 0)} envoy {_fmt(cpu.get('gateway_envoy'), 0)} "
          f"upstream {_fmt(cpu.get('upstream'), 0)} client {_fmt(cpu.get('client'), 0)} other {_fmt(cpu.get('other'), 0)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the latency, paced and throughput runs, interleaved (default 3; 0: memory only)")
    parser.add_argument("--delay", type=float, default=0.05, help="seconds between the upstream's events in the latency runs (default 0.05)")
    parser.add_argument("--latency-streams", type=int, default=2, help="latency streams per scenario and round (default 2)")
    parser.add_argument("--paced-delay", type=float, default=0.0001, help="seconds between events in the paced runs (default 0.0001)")
    parser.add_argument("--paced-repeat", type=int, default=200, help="x-demo-repeat of the paced stream, 42 events each (default 200)")
    parser.add_argument("--repeat", type=int, default=2000, help="x-demo-repeat of the throughput stream, 42 events each (default 2000)")
    parser.add_argument("--big-mb", type=float, default=50, help="MB the upstream sends in the memory run (default 50; 0 skips it)")
    parser.add_argument("--envoy-concurrency", type=int, default=None, help="gateway Envoy worker threads (default: Envoy's, one per CPU)")
    parser.add_argument("--output", type=Path, default=BENCH / "profiles" / "streaming.json",
                        help="JSON results (default bench/profiles/streaming.json; bench/profiles/ is ignored by git)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs and configs (their directory is printed)")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the upstream process itself
    args = parser.parse_args(argv)
    if args.serve_upstream is not None:
        serve_upstream(args.serve_upstream)
        return 0

    run = BenchmarkRun("pluginchain-bench-streaming-", args.keep_logs)
    log_dir, procs = run.log_dir, run.procs
    targets: dict[str, Target] = {}
    started = datetime.datetime.now(datetime.UTC)
    run_started = time.monotonic()
    latency: list[dict] = []
    paced: list[dict] = []
    throughput: list[dict] = []
    memory: dict[str, dict] = {}
    checks: dict[str, dict] = {}
    problems: list[str] = []
    settings: dict = {
        "rounds": args.rounds, "delay_s": args.delay, "latency_streams": args.latency_streams,
        "paced_delay_s": args.paced_delay, "paced_repeat": args.paced_repeat, "repeat": args.repeat, "big_mb": args.big_mb,
        "gateway_envoy_concurrency": args.envoy_concurrency or "default (one per CPU)",
        "prompt_words": len(PROMPT.split()), "chain_file": str(CHAIN_FILE.relative_to(ROOT)),
        "holdback_events": len("You said: ".split()),
    }
    machine_info = machine()  # before anything starts: the commit whose sidecar code is measured
    with run:
        upstream_port = free_port()
        upstream = procs.start("upstream", [sys.executable, str(Path(__file__).resolve()), "--serve-upstream", str(upstream_port)])
        wait_until(lambda: port_open(upstream_port), "demo upstream listening", upstream)
        targets["upstream"] = Target("upstream", f"http://127.0.0.1:{upstream_port}")
        for name in GATEWAYS:
            targets[name] = start_gateway(name, procs, upstream_port, args.envoy_concurrency)
        print(f"upstream, bare and chain running; logs in {log_dir}", flush=True)

        received = stream(targets["upstream"].client, targets["upstream"].url, repeat=3)
        upstream_problems = check_stream("upstream check", received, events_of(received), expected_content("upstream", 3))
        if upstream_problems:
            raise RuntimeError("; ".join(upstream_problems))
        checks["upstream"] = {"status": received.status, "bytes": received.size}
        for name in GATEWAYS:
            checks[name] = check_target(targets[name])
        for name, check in checks.items():
            print(f"check {name}: {check}", flush=True)

        one = stream(targets["upstream"].client, targets["upstream"].url)
        settings["latency_events"] = len(events_of(one, parse=False))
        # Warm-up: every path once at full speed (connections, the sidecar's caches and allocator).
        for name in GATEWAYS:
            stream(targets[name].client, targets[name].url, repeat=args.repeat)

        for round_number in range(1, args.rounds + 1):
            # Alternate which gateway goes first, so neither always follows the other.
            gateways = list(GATEWAYS) if round_number % 2 else list(reversed(GATEWAYS))
            for name in ["upstream", *gateways]:
                for _ in range(args.latency_streams):
                    row = latency_run(targets[name], args.delay)
                    row.update(scenario=name, round=round_number)
                    latency.append(row)
                    problems += [f"round {round_number}: {p}" for p in row["problems"]]
                print(f"latency round {round_number} {name:<8} first event {_fmt(row['first_event_ms'])} ms, TTFT {_fmt(row['ttft_ms'])} ms, "
                      f"total {_fmt(row['total_ms'])} ms, gaps p50 {_fmt(row['gap_ms']['p50'])} max {_fmt(row['gap_ms']['max'])} ms", flush=True)
            for kind, runs, repeat, delay in (("paced", paced, args.paced_repeat, args.paced_delay),
                                              ("throughput", throughput, args.repeat, 0.0)):
                for name in gateways:
                    row = flow_run(targets[name], procs, repeat, delay)
                    row.update(scenario=name, round=round_number)
                    runs.append(row)
                    problems += [f"round {round_number} {kind}: {p}" for p in row["problems"]]
                    _print_flow(kind, round_number, name, row)

        if args.big_mb > 0:
            # Bytes per repeat from the last throughput stream as the upstream sent it (through bare).
            bare_rows = [r for r in throughput if r["scenario"] == "bare"] or [None]
            per_repeat = bare_rows[-1]["bytes"] / args.repeat if bare_rows[-1] else 8750
            big_repeat = max(1, math.ceil(args.big_mb * 1e6 / per_repeat))
            settings["big_repeat"] = big_repeat
            for name in GATEWAYS:
                row = flow_run(targets[name], procs, big_repeat, big=True)
                memory[name] = row
                problems += [f"memory: {p}" for p in row["problems"]]
                if name == "chain" and row["redacted"] != big_repeat:
                    problems.append(f"memory: the chain redacted {row['redacted']} SSNs of {big_repeat}")
                print(f"memory {name:<6} {(row['upstream_bytes'] or 0) / 1e6:.1f} MB from the upstream, {row['events']} events in "
                      f"{row['seconds']:.1f} s ({row['body_chunks']} chunks): RSS {row['rss_before_mb']:.1f} MB before, max "
                      f"{row['rss_max_mb']:.1f}, {row['rss_after_mb']:.1f} after (max growth {row['rss_growth_max_mb']:+.1f} MB)", flush=True)
    for target in targets.values():
        target.client.close()

    if not (latency or memory):
        return 1
    summary = summarise(latency, paced, throughput, memory)
    notes = print_report(summary, settings)
    for row in latency:
        row.pop("_times", None)
    report = {
        "date": started.isoformat(timespec="seconds"),
        "complete": not run.failed,
        "wall_seconds": round(time.monotonic() - run_started, 1),
        "settings": settings,
        "machine": machine_info,
        "checks": checks,
        **summary,
        "notes": notes,
        "problems": problems,
        "runs": {"latency": latency, "paced": paced, "throughput": throughput},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {args.output}  ({report['wall_seconds']:.0f} s)")
    if problems:
        print("PROBLEMS (these runs are suspect):\n  " + "\n  ".join(problems))
    return 1 if run.failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
