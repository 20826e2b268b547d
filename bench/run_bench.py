"""Throughput and latency of Envoy + pluginchain against Envoy alone and Envoy + a bare ext_proc server.

In one run on one machine, with wrk as the load generator, every scenario gets a fresh Envoy
(pluginchain's own generated configuration) in front of the same upstream (a separate Envoy that
answers every request with a canned chat completion from a ``direct_response`` route):

    direct          Envoy, no ext_proc filter
    bare-headers    Envoy + bench/bare_processor.py --mode headers (CONTINUE; request headers only)
    chain-headers   Envoy + pluginchain serve, bench/chains/headers.yaml (header-only chain)
    bare-body       Envoy + bench/bare_processor.py --mode body (CONTINUE; headers + buffered body)
    chain-body      Envoy + pluginchain serve, bench/chains/body.yaml (reads the request body)

wrk POSTs a ~300-byte OpenAI-style chat request. Each scenario is checked before it is measured
(a clean request gets the canned 200; chain-body answers a request with a banned marker word 403;
the chains' rate_limiter counts the check request in the sidecar's metrics) and after (no socket
errors, no non-2xx, Envoy's ext_proc stream and message counts match the processing mode).
``--rounds`` repeats the whole sequence, interleaved, and the table shows each scenario's median.

    .venv/bin/python bench/run_bench.py [--duration 10] [--rounds 3] [--output bench/results.json]

Needs wrk (Debian/Ubuntu: ``apt-get install wrk``). ``--profile cprofile`` runs the pluginchain
sidecar under cProfile and prints where its time goes (cProfile slows it down: its numbers are
not benchmark results).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import platform
import pstats
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pluginchain._sidecar.envoy_config import EXT_PROC_FILTER, EnvoySettings, render
from pluginchain._sidecar.gateway import envoy_binary

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

SCENARIOS = ("direct", "bare-headers", "chain-headers", "bare-body", "chain-body")
PATH = "/v1/chat/completions"
API_KEY = "bench-key-0001"
MARKER = "pluginchainbenchmarker"  # banned by bench/chains/body.yaml

_PROMPT = (
    "Summarise the plot of Hamlet in three sentences for a school essay, mentioning Ophelia, "
    "Polonius and the ghost, and keep the tone neutral."
)


def chat_body(prompt: str = _PROMPT) -> bytes:
    return json.dumps({
        "model": "bench-model",
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": prompt},
        ],
        "temperature": 0.2,
        "max_tokens": 256,
    }, separators=(",", ":")).encode()


CANNED_COMPLETION = json.dumps({
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "bench-model",
    "choices": [{
        "index": 0,
        "message": {"role": "assistant", "content": "Prince Hamlet avenges his father, whose ghost names his killer."},
        "finish_reason": "stop",
    }],
    "usage": {"prompt_tokens": 52, "completion_tokens": 14, "total_tokens": 66},
}, separators=(",", ":"))


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Proc:
    """A child in its own process group; its output goes to a log file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=ROOT, env={**os.environ, **(env or {})}, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process (all its threads) so far."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL it if it lingers."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)  # stragglers of the group, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self._log.close()


class Processes:
    """Everything the benchmark started, stopped in reverse order whatever happens."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.running: list[Proc] = []

    def start(self, name: str, argv: list[str], env: dict | None = None) -> Proc:
        proc = Proc(name, argv, self.log_dir, env)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        while self.running:
            self.stop(self.running[-1])


class BenchmarkRun:
    """The processes and logs of one benchmark run: everything started through ``procs`` is
    stopped when the ``with`` block ends, also on an error, Ctrl-C or SIGTERM. An error or an
    interruption is printed and recorded in ``failed`` rather than raised, so that what was
    measured until then is still reported; the logs are kept when it failed or when asked."""

    def __init__(self, prefix: str, keep_logs: bool):
        # SIGTERM unwinds like Ctrl-C, through __exit__.
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        self.log_dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.procs = Processes(self.log_dir)
        self.failed = False
        self._keep_logs = keep_logs

    def __enter__(self) -> BenchmarkRun:
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            print("\ninterrupted; stopping everything", file=sys.stderr)
            self.failed = True
        elif isinstance(error, Exception):
            print(f"\nerror: {error!r}", file=sys.stderr)
            self.failed = True
        self.procs.stop_all()
        if self._keep_logs or self.failed:
            print(f"logs and configs kept in {self.log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        return kind is not None and self.failed


EXT_PROC_FAILURE_COUNTERS = ("streams_failed", "failure_mode_allowed", "message_timeouts", "spurious_msgs_received")
"""Envoy's ext_proc counters (``ext_proc.<name>``) that must not move in a measurement."""


def ext_proc_failures(delta: dict) -> list[str]:
    """A problem for each of :data:`EXT_PROC_FAILURE_COUNTERS` that moved in ``delta``, Envoy's
    stats over one measurement."""
    return [f"ext_proc.{bad} = {delta[f'ext_proc.{bad}']}" for bad in EXT_PROC_FAILURE_COUNTERS if delta.get(f"ext_proc.{bad}", 0)]


def wait_until(check, what: str, proc: Proc | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode} before {what}:\n{proc.tail()}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if check():
                return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached within {timeout:g}s" + (f"; {proc.name} log:\n{proc.tail()}" if proc else ""))


def port_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True


# --------------------------------------------------------------------------- HTTP helpers


def http_request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                 timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def post_chat(port: int, body: bytes) -> tuple[int, bytes]:
    status, _, payload = http_request(
        port, "POST", PATH, body, {"content-type": "application/json", "x-api-key": API_KEY},
    )
    return status, payload


def envoy_counters(admin_port: int) -> dict[str, int]:
    """The gateway's counters that tell what happened to requests and ext_proc streams."""
    status, _, payload = http_request(admin_port, "GET", "/stats?format=json&filter=^http\\.gateway\\.")
    if status != 200:
        raise RuntimeError(f"envoy admin /stats answered {status}")
    counters = {}
    for stat in json.loads(payload).get("stats", []):
        if "value" in stat and isinstance(stat["value"], int):
            counters[stat["name"].removeprefix("http.gateway.")] = stat["value"]
    return counters


_METRIC_LINE = re.compile(r'^(?P<name>[a-z_:]+)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$')


def sidecar_metric(metrics_port: int, name: str, **labels: str) -> float:
    """Sum of a Prometheus metric's samples whose labels include ``labels``."""
    status, _, payload = http_request(metrics_port, "GET", "/metrics")
    if status != 200:
        raise RuntimeError(f"sidecar /metrics answered {status}")
    total = 0.0
    for line in payload.decode().splitlines():
        match = _METRIC_LINE.match(line)
        if not match or match["name"] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match["value"])
    return total


def machine_busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal
    return total - idle, total


# --------------------------------------------------------------------------- Envoy configs


def upstream_config(port: int, admin_port: int) -> dict:
    """An Envoy that answers every request with the canned completion: the same fast upstream for all."""
    connection_manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "upstream",
        "route_config": {"name": "upstream", "virtual_hosts": [{
            "name": "llm", "domains": ["*"],
            "routes": [{
                "match": {"prefix": "/"},
                "direct_response": {"status": 200, "body": {"inline_string": CANNED_COMPLETION}},
                "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
            }],
        }]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [{
            "name": "upstream",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": connection_manager}]}],
        }]},
    }


def gateway_config(upstream_port: int, listen_port: int, admin_port: int, sidecar_port: int, ext_proc: bool) -> dict:
    """pluginchain's own generated Envoy configuration; without the ext_proc filter for ``direct``."""
    config = render(EnvoySettings(
        upstream=f"http://127.0.0.1:{upstream_port}",
        listen_host="127.0.0.1",
        listen_port=listen_port,
        admin_port=admin_port,
        sidecar_port=sidecar_port,
    ))
    if not ext_proc:
        manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        manager["http_filters"] = [f for f in manager["http_filters"] if f["name"] != EXT_PROC_FILTER]
    return config


def start_envoy(procs: Processes, name: str, config: dict, concurrency: int | None) -> Proc:
    path = procs.log_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [envoy_binary(), "-c", str(path), "--log-level", "error", "--disable-hot-restart"]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    proc = procs.start(name, argv)
    admin_port = config["admin"]["address"]["socket_address"]["port_value"]
    wait_until(lambda: http_request(admin_port, "GET", "/ready", timeout=1)[0] == 200, f"{name} ready", proc)
    return proc


# --------------------------------------------------------------------------- wrk


_WRK_SCRIPT = """
wrk.method = "POST"
wrk.path = "%(path)s"
wrk.body = '%(body)s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-api-key"] = "%(api_key)s"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%%d,"duration_us":%%d,"bytes":%%d,' ..
    '"errors":{"connect":%%d,"read":%%d,"write":%%d,"status":%%d,"timeout":%%d},' ..
    '"latency_us":{"min":%%d,"mean":%%.1f,"stdev":%%.1f,"max":%%d,"p50":%%d,"p90":%%d,"p99":%%d,"p999":%%d}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
"""


def write_wrk_script(directory: Path) -> Path:
    body = chat_body().decode()
    assert "'" not in body and "\\" not in body
    path = directory / "chat.lua"
    path.write_text(_WRK_SCRIPT % {"path": PATH, "body": body, "api_key": API_KEY})
    return path


def run_wrk(wrk: str, script: Path, port: int, duration: float, connections: int, threads: int) -> tuple[dict, float]:
    """wrk's results (from the script's done()), and the CPU seconds wrk used."""
    argv = [wrk, "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s",
            "--timeout", "5s", "-s", str(script), f"http://127.0.0.1:{port}{PATH}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    completed = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=duration + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    for line in completed.stdout.splitlines():
        if line.startswith("WRK_RESULT "):
            return json.loads(line.removeprefix("WRK_RESULT ")), cpu
    raise RuntimeError(f"wrk failed (exit {completed.returncode}):\n{completed.stdout}\n{completed.stderr}")


# --------------------------------------------------------------------------- scenarios


@dataclass
class Settings:
    wrk: str
    script: Path
    duration: float
    warmup: float
    connections: int
    threads: int
    envoy_concurrency: int | None
    upstream_port: int
    profile: str | None
    profile_dir: Path
    py_spy: str | None = None
    py_spy_rate: int = 250
    max_foreign_cpu: float = 15.0
    attempts: int = 3
    quiet_wait: float = 60.0


@dataclass
class Result:
    scenario: str
    round: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    wrk: dict
    checks: dict = field(default_factory=dict)
    cpu_percent: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    profile: str | None = None
    attempts: int = 1


def processor_argv(scenario: str, port: int, metrics_port: int, settings: Settings) -> list[str] | None:
    if scenario == "direct":
        return None
    kind, mode = scenario.split("-")
    if kind == "bare":
        return [sys.executable, str(BENCH / "bare_processor.py"), "--port", str(port), "--mode", mode]
    python = [sys.executable]
    if settings.profile == "cprofile":
        python += ["-m", "cProfile", "-o", str(settings.profile_dir / f"{scenario}.prof")]
    return python + [
        "-m", "pluginchain.cli", "serve",
        "--config", str(BENCH / "chains" / f"{mode}.yaml"),
        "--sidecar-port", str(port),
        # A free port rather than -1: the benchmark reads the chain's counters to prove it ran.
        # Metrics are counted either way; the endpoint is only read before and after measuring.
        "--metrics-port", str(metrics_port),
        "--log-level", "warning",
        "--grace", "1",
    ]


def functional_check(scenario: str, listen_port: int, admin_port: int, metrics_port: int) -> dict:
    """One request per behaviour that proves the scenario is wired as it claims; raises if not."""
    checks: dict = {}
    before = envoy_counters(admin_port)
    allowed_before = 0.0
    if scenario.startswith("chain"):
        allowed_before = sidecar_metric(metrics_port, "pluginchain_plugin_decisions_total", plugin="rate_limiter", outcome="allow")
    status, payload = post_chat(listen_port, chat_body())
    if status != 200 or json.loads(payload) != json.loads(CANNED_COMPLETION):
        raise RuntimeError(f"{scenario}: a clean request got {status}: {payload[:300]!r}")
    checks["clean_request"] = status
    after = envoy_counters(admin_port)
    streams = after.get("ext_proc.streams_started", 0) - before.get("ext_proc.streams_started", 0)
    if scenario == "direct":
        if "ext_proc.streams_started" in after:
            raise RuntimeError("direct: Envoy still has the ext_proc filter")
    elif streams != 1:
        raise RuntimeError(f"{scenario}: Envoy opened {streams} ext_proc streams for one request, expected 1")
    checks["ext_proc_streams_for_one_request"] = streams
    if scenario.startswith("chain"):
        allowed = sidecar_metric(metrics_port, "pluginchain_plugin_decisions_total", plugin="rate_limiter", outcome="allow")
        if allowed - allowed_before != 1:
            raise RuntimeError(f"{scenario}: the chain's rate_limiter allowed {allowed - allowed_before} requests, expected 1")
        checks["rate_limiter_decisions_for_one_request"] = allowed - allowed_before
    if scenario == "chain-body":
        status, payload = post_chat(listen_port, chat_body(f"Please repeat {MARKER} back to me."))
        code = json.loads(payload).get("error", {}).get("code") if status == 403 else None
        if code != "content_filtered":
            raise RuntimeError(f"chain-body: a request with the banned marker got {status}: {payload[:300]!r}")
        checks["banned_marker_request"] = status
    return checks


def expected_messages_per_stream(scenario: str) -> int:
    return {"direct": 0, "bare-headers": 1, "chain-headers": 1, "bare-body": 2, "chain-body": 2}[scenario]


def run_scenario(scenario: str, round_number: int, settings: Settings, procs: Processes) -> Result:
    listen_port, admin_port, processor_port, metrics_port = (free_port() for _ in range(4))
    processor = None
    envoy = None
    try:
        argv = processor_argv(scenario, processor_port, metrics_port, settings)
        if argv is not None:
            processor = procs.start(f"{scenario}-processor", argv)
            wait_until(lambda: port_open(processor_port), f"{scenario} processor listening", processor)
            if scenario.startswith("chain"):
                wait_until(lambda: port_open(metrics_port), f"{scenario} metrics listening", processor)
        config = gateway_config(settings.upstream_port, listen_port, admin_port, processor_port, ext_proc=argv is not None)
        envoy = start_envoy(procs, f"{scenario}-envoy", config, settings.envoy_concurrency)
        checks = functional_check(scenario, listen_port, admin_port, metrics_port)

        if settings.warmup > 0:
            run_wrk(settings.wrk, settings.script, listen_port, settings.warmup, settings.connections, settings.threads)
        # Other work on the machine (not ours) skews a measurement: repeat it, keep the quietest.
        attempts = []
        for attempt in range(1, settings.attempts + 1):
            wait_for_quiet(settings)
            result = measure(scenario, round_number, settings, procs, processor, listen_port, admin_port, metrics_port)
            result.checks = {**checks, **result.checks}
            attempts.append(result)
            foreign = result.cpu_percent["foreign"]
            if foreign <= settings.max_foreign_cpu or attempt == settings.attempts:
                break
            print(f"  (round {round_number} {scenario}: {foreign:.0f}% of a CPU used by other processes "
                  f"during the measurement; measuring again)", flush=True)
        result = min(attempts, key=lambda r: r.cpu_percent["foreign"])
        result.attempts = len(attempts)
        if result.cpu_percent["foreign"] > settings.max_foreign_cpu:
            result.problems.append(f"other processes used {result.cpu_percent['foreign']:.0f}% of a CPU during the measurement")
        return result
    finally:
        if envoy is not None:
            procs.stop(envoy)
        if processor is not None:
            procs.stop(processor)


def wait_for_quiet(settings: Settings) -> None:
    """Wait (up to ``settings.quiet_wait`` s) until other processes leave the CPUs alone.

    Called while our processes are idle, so what keeps the CPUs busy is someone else's work.
    """
    deadline = time.monotonic() + settings.quiet_wait
    waited = False
    while True:
        busy_before, total_before = machine_busy_jiffies()
        time.sleep(1.0)
        busy_after, total_after = machine_busy_jiffies()
        busy = 100 * os.cpu_count() * (busy_after - busy_before) / max(1, total_after - total_before)
        if busy <= settings.max_foreign_cpu or time.monotonic() >= deadline:
            if waited:
                print(f"  (waited for other processes to calm down: now {busy:.0f}% of a CPU)", flush=True)
            return
        waited = True


def measure(scenario: str, round_number: int, settings: Settings, procs: Processes, processor: Proc | None,
            listen_port: int, admin_port: int, metrics_port: int) -> Result:
    """One wrk measurement of a running scenario, with the checks that say whether it is valid."""
    chain = scenario.startswith("chain")

    def rate_limiter_allowed() -> float:
        return sidecar_metric(metrics_port, "pluginchain_plugin_decisions_total", plugin="rate_limiter", outcome="allow") if chain else 0.0

    counters_before = envoy_counters(admin_port)
    allowed_before = rate_limiter_allowed()
    cpu_before = {p.name: p.cpu_seconds() for p in procs.running}
    busy_before, total_before = machine_busy_jiffies()
    spy = spy_output = None
    if settings.profile == "py-spy" and processor is not None:
        # Python stacks only, sampled without pausing the process: no native frames, little skew.
        spy_output = settings.profile_dir / f"{scenario}-round{round_number}.pyspy.txt"
        spy = procs.start(f"{scenario}-py-spy", [
            settings.py_spy, "record", "--pid", str(processor.pid), "--duration", str(max(1, int(settings.duration) - 1)),
            "--rate", str(settings.py_spy_rate), "--nonblocking", "--format", "raw", "--output", str(spy_output),
        ])
    wall_start = time.monotonic()
    wrk_result, wrk_cpu = run_wrk(settings.wrk, settings.script, listen_port, settings.duration, settings.connections, settings.threads)
    wall = time.monotonic() - wall_start
    busy_after, total_after = machine_busy_jiffies()
    cpu_after = {p.name: p.cpu_seconds() for p in procs.running}
    if spy is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.popen.wait(30)
        procs.stop(spy)
    counters_after = envoy_counters(admin_port)
    allowed = rate_limiter_allowed()
    delta = {k: counters_after.get(k, 0) - counters_before.get(k, 0) for k in counters_after}

    seconds = wrk_result["duration_us"] / 1e6
    result = Result(
        scenario=scenario,
        round=round_number,
        requests_per_s=wrk_result["requests"] / seconds,
        p50_ms=wrk_result["latency_us"]["p50"] / 1000,
        p99_ms=wrk_result["latency_us"]["p99"] / 1000,
        wrk=wrk_result,
    )
    if spy_output is not None and spy_output.exists():
        result.profile = str(spy_output)
    role = {"upstream": "upstream_envoy", f"{scenario}-envoy": "gateway_envoy", f"{scenario}-processor": "processor",
            f"{scenario}-py-spy": "profiler"}
    cpu = {role[name]: 100 * (cpu_after[name] - cpu_before.get(name, 0.0)) / wall for name in cpu_after if name in role}
    cpu["wrk"] = 100 * wrk_cpu / wall
    ours = sum(cpu.values())
    cpu["machine_busy"] = 100 * os.cpu_count() * (busy_after - busy_before) / max(1, total_after - total_before)
    # What the machine did besides our processes (other people's jobs); kernel work on our
    # loopback traffic is mostly charged to our processes, so this stays near 0 on a quiet machine.
    cpu["foreign"] = max(0.0, cpu["machine_busy"] - ours)
    result.cpu_percent = {k: round(v, 1) for k, v in cpu.items()}

    # After: every request answered 2xx, and the ext_proc exchange is the one the mode implies.
    errors = {k: v for k, v in wrk_result["errors"].items() if v}
    if errors:
        result.problems.append(f"wrk reported errors: {errors}")
    non_2xx = {k: delta.get(k, 0) for k in ("downstream_rq_1xx", "downstream_rq_3xx", "downstream_rq_4xx", "downstream_rq_5xx") if delta.get(k, 0)}
    if non_2xx:
        result.problems.append(f"Envoy answered non-2xx responses: {non_2xx}")
    served = delta.get("downstream_rq_completed", 0)
    result.checks["envoy_requests_completed"] = served
    result.checks["envoy_2xx"] = delta.get("downstream_rq_2xx", 0)
    expected = expected_messages_per_stream(scenario)
    if expected:
        streams = delta.get("ext_proc.streams_started", 0)
        sent = delta.get("ext_proc.stream_msgs_sent", 0)
        result.checks["ext_proc_streams"] = streams
        result.checks["ext_proc_msgs_sent_per_stream"] = round(sent / streams, 3) if streams else None
        result.problems += ext_proc_failures(delta)
        # Counters are read while no load runs, but up to one request per connection may have
        # been in flight at either edge of the measurement window.
        slack = settings.connections
        if streams < served - slack:
            result.problems.append(f"only {streams} ext_proc streams for {served} requests")
        if abs(sent - expected * streams) > expected * slack:
            result.problems.append(f"{sent / max(1, streams):.3f} ext_proc messages per stream, expected {expected}")
    if chain:
        result.checks["rate_limiter_allowed"] = allowed - allowed_before
        if allowed - allowed_before < served - settings.connections:
            result.problems.append(f"the chain ran {allowed - allowed_before:.0f} times for {served} requests")
    return result


# --------------------------------------------------------------------------- report


PAIRS = (("chain-headers", "bare-headers"), ("chain-body", "bare-body"),
         ("chain-headers", "direct"), ("chain-body", "direct"),
         ("bare-headers", "direct"), ("bare-body", "direct"))
TARGET_PAIRS = ("chain-headers/bare-headers", "chain-body/bare-body")


def summarise(results: list[Result], scenarios: list[str]) -> dict:
    summary = {}
    for scenario in scenarios:
        rows = [r for r in results if r.scenario == scenario]
        if not rows:
            continue
        summary[scenario] = {
            "requests_per_s": statistics.median(r.requests_per_s for r in rows),
            "p50_ms": statistics.median(r.p50_ms for r in rows),
            "p99_ms": statistics.median(r.p99_ms for r in rows),
            # CPU time the ext_proc server spent per request, all its threads.
            "processor_cpu_us_per_request": statistics.median(
                1e4 * r.cpu_percent.get("processor", 0.0) / r.requests_per_s for r in rows),
            "rounds_requests_per_s": [round(r.requests_per_s, 1) for r in rows],
            "cpu_percent": {k: statistics.median(r.cpu_percent.get(k, 0.0) for r in rows) for k in rows[0].cpu_percent},
        }
    ratios = {}
    for chain, base in PAIRS:
        if chain not in summary or base not in summary:
            continue
        # Each round measures the pair minutes apart at most; the median of the rounds' own
        # ratios is steadier on a machine whose load drifts than the ratio of the medians.
        by_round = {}
        for r in results:
            if r.scenario in (chain, base):
                by_round.setdefault(r.round, {})[r.scenario] = r.requests_per_s
        per_round = [v[chain] / v[base] for v in by_round.values() if chain in v and base in v]
        ratios[f"{chain}/{base}"] = {
            "ratio_of_medians": summary[chain]["requests_per_s"] / summary[base]["requests_per_s"],
            "median_of_round_ratios": statistics.median(per_round),
            "round_ratios": [round(x, 3) for x in per_round],
        }
    return {"scenarios": summary, "ratios": ratios}


def print_report(summary: dict, target: float) -> None:
    print()
    print(f"{'scenario':<15}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'proc us/req':>13}   "
          f"CPU % (100 = one CPU): processor / gateway envoy / upstream envoy / wrk / other processes")
    for scenario, row in summary["scenarios"].items():
        cpu = row["cpu_percent"]
        cpus = " / ".join(f"{cpu.get(k, 0):.0f}" for k in ("processor", "gateway_envoy", "upstream_envoy", "wrk", "foreign"))
        rounds = ", ".join(f"{v:.0f}" for v in row["rounds_requests_per_s"])
        per_request = f"{row['processor_cpu_us_per_request']:.0f}" if row["processor_cpu_us_per_request"] else "-"
        print(f"{scenario:<15}{row['requests_per_s']:>8.0f}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}{per_request:>13}   "
              f"{cpus:<24} rounds: {rounds}")
    print()
    if not summary["ratios"]:
        return
    print(f"  {'requests/s ratio':<28} {'of medians':>10} {'median of rounds':>17}   rounds")
    for name, ratio in summary["ratios"].items():
        verdict = ""
        if name in TARGET_PAIRS:
            met = ratio["ratio_of_medians"] >= target and ratio["median_of_round_ratios"] >= target
            verdict = f"  target >= {target:.2f}: {'met' if met else 'NOT met'}"
        rounds = ", ".join(f"{x:.2f}" for x in ratio["round_ratios"])
        print(f"  {name:<28} {ratio['ratio_of_medians']:9.2f}x {ratio['median_of_round_ratios']:16.2f}x   {rounds}{verdict}")
    print()


def print_profile(path: Path, limit: int = 25) -> None:
    if not path.exists():
        print(f"(no profile at {path})")
        return
    stats = pstats.Stats(str(path))
    total = stats.total_tt  # type: ignore[attr-defined]
    print(f"\n=== {path.name}: total {total:.2f} s profiled ===")
    rows = []
    for (filename, line, function), (_calls, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((tt, ct, nc, f"{_short(filename)}:{line}({function})"))
    print(f"{'tottime %':>9} {'cumtime %':>9} {'calls':>9}  function   (by own time)")
    for tt, ct, nc, name in sorted(rows, reverse=True)[:limit]:
        print(f"{100 * tt / total:9.1f} {100 * ct / total:9.1f} {nc:9d}  {name}")
    print(f"\n{'tottime %':>9} {'cumtime %':>9} {'calls':>9}  function   (by cumulative time, pluginchain and grpc only)")
    interesting = [r for r in rows if "pluginchain" in r[3] or "grpc" in r[3]]
    for tt, ct, nc, name in sorted(interesting, key=lambda r: r[1], reverse=True)[:limit]:
        print(f"{100 * tt / total:9.1f} {100 * ct / total:9.1f} {nc:9d}  {name}")


def print_py_spy(result: Result, rate: int, limit: int = 25) -> None:
    """Where the processor's Python-visible time went, from py-spy's raw (collapsed) stacks.

    Each sample is charged to the innermost frame of our own code on its stack (pluginchain or the
    bare processor), together with the library function that frame was in when sampled, so the
    table says which line of ours is responsible for time spent in asyncio, prometheus_client,
    protobuf or json. Samples with no frame of ours are the event loop and grpc's Cython layer
    (time in C/Cython shows as the Python frame that called it, e.g. ``Handle._run``).
    """
    path = Path(result.profile or "")
    stacks: list[tuple[list[str], int]] = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    total = sum(count for _, count in stacks)
    if not total:
        print(f"(no samples in {path})")
        return
    requests = result.wrk["requests"]
    seconds = result.wrk["duration_us"] / 1e6
    print(f"\n=== py-spy: {result.scenario} (round {result.round}), {total} active samples at {rate} Hz over ~{seconds:.0f} s, "
          f"{result.requests_per_s:.0f} req/s while profiled ===")
    print(f"    Python-active time per request: {1e6 * total / rate / max(1, requests) * (seconds / max(1, seconds - 1)):.0f} us "
          f"(all threads; samples/rate/requests)")
    ours = ("pluginchain/", "bare_processor.py")
    charged: dict[str, int] = {}
    charged_detail: dict[tuple[str, str], int] = {}
    leaf: dict[str, int] = {}
    for frames, count in stacks:
        leaf[frames[-1]] = leaf.get(frames[-1], 0) + count
        # Frames above the event loop's dispatch (the process's main(), asyncio.run) own nothing.
        dispatch = max((i for i, f in enumerate(frames)
                        if f.startswith(("BaseEventLoop.run_forever ", "Handle._run ", "Thread.run "))), default=-1)
        owner = next((i for i in range(len(frames) - 1, dispatch, -1) if any(o in frames[i] for o in ours)), None)
        if owner is None:
            root = "grpc poller thread" if any(f.startswith("Thread.run ") for f in frames) else "event loop, grpc callbacks"
            charged[f"(no frame of ours: {root})"] = charged.get(f"(no frame of ours: {root})", 0) + count
            charged_detail[(f"(no frame of ours: {root})", frames[-1])] = charged_detail.get((f"(no frame of ours: {root})", frames[-1]), 0) + count
            continue
        function = _frame_function(frames[owner])
        callee = _frame_function(frames[owner + 1]) if owner + 1 < len(frames) else "(own code)"
        charged[function] = charged.get(function, 0) + count
        charged_detail[(function, callee)] = charged_detail.get((function, callee), 0) + count
    print(f"\n  {'%':>5}  charged to (innermost frame of ours, all its library callees included)")
    for function, count in sorted(charged.items(), key=lambda kv: -kv[1])[:limit]:
        print(f"  {100 * count / total:5.1f}  {function}")
        details = sorted(((c, callee) for (f, callee), c in charged_detail.items() if f == function), reverse=True)[:4]
        for c, callee in details:
            if c / total >= 0.005:
                print(f"  {'':5}    {100 * c / total:5.1f}  -> {callee}")
    print(f"\n  {'%':>5}  own time (the sampled frame itself)")
    for frame, count in sorted(leaf.items(), key=lambda kv: -kv[1])[:limit]:
        print(f"  {100 * count / total:5.1f}  {frame}")


def _frame_function(frame: str) -> str:
    """``name (path:line)`` without the line, so one function's lines add up."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def _short(filename: str) -> str:
    for marker in ("site-packages/", "sidecar/", "lib/python3.11/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def versions(wrk: str) -> dict:
    def out(argv):
        with contextlib.suppress(Exception):
            completed = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10)
            return (completed.stdout + completed.stderr).strip().splitlines()[0]
        return None
    import grpc
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "envoy": out([envoy_binary(), "--version"]),
        "wrk": out([wrk, "-v"]),
        "grpcio": grpc.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds measured per scenario (default 10)")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of load before measuring (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="times the whole scenario sequence runs; medians are reported (default 3)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--envoy-concurrency", type=int, default=None, help="gateway Envoy worker threads (default: Envoy's, one per CPU)")
    parser.add_argument("--upstream-concurrency", type=int, default=1, help="upstream Envoy worker threads (default 1)")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--max-foreign-cpu", type=float, default=15.0,
                        help="a measurement during which other processes used more than this %% of a CPU is repeated (default 15)")
    parser.add_argument("--attempts", type=int, default=3, help="measurements per scenario and round at most, the quietest kept (default 3)")
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help="seconds to wait, before each measurement, for other processes to stop using the CPUs (default 60)")
    parser.add_argument("--target", type=float, default=0.8, help="required chain/bare requests/s ratio (default 0.8)")
    parser.add_argument("--output", type=Path, default=BENCH / "results.json", help="JSON results (default bench/results.json)")
    parser.add_argument("--profile", choices=("py-spy", "cprofile"), default=None,
                        help="py-spy: sample the processor (bare and pluginchain) while measuring, with py-spy from PATH or --py-spy; "
                             "cprofile: run the pluginchain sidecar under cProfile. Either way print where the time goes "
                             "(profiling slows the processor: these runs are not benchmark results)")
    parser.add_argument("--py-spy", dest="py_spy", default=None, help="py-spy executable (default: py-spy on PATH)")
    parser.add_argument("--profile-dir", type=Path, default=BENCH / "profiles", help="where --profile writes .prof files")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs and configs (their directory is printed)")
    args = parser.parse_args(argv)

    wrk = shutil.which("wrk")
    if wrk is None:
        print("error: wrk not found. Install it (Debian/Ubuntu: sudo apt-get install wrk; macOS: brew install wrk).", file=sys.stderr)
        return 2
    if args.profile:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    py_spy = args.py_spy or shutil.which("py-spy")
    if args.profile == "py-spy" and not py_spy:
        print("error: py-spy not found; pip install py-spy (a throwaway venv will do) and pass --py-spy PATH", file=sys.stderr)
        return 2

    run = BenchmarkRun("pluginchain-bench-", args.keep_logs)
    log_dir, procs = run.log_dir, run.procs
    results: list[Result] = []
    started = datetime.datetime.now(datetime.UTC)
    with run:
        upstream_port, upstream_admin = free_port(), free_port()
        start_envoy(procs, "upstream", upstream_config(upstream_port, upstream_admin), args.upstream_concurrency)
        settings = Settings(
            wrk=wrk, script=write_wrk_script(log_dir), duration=args.duration, warmup=args.warmup,
            connections=args.connections, threads=args.threads, envoy_concurrency=args.envoy_concurrency,
            upstream_port=upstream_port, profile=args.profile, profile_dir=args.profile_dir, py_spy=py_spy,
            max_foreign_cpu=args.max_foreign_cpu, attempts=max(1, args.attempts), quiet_wait=args.quiet_wait,
        )
        print(f"wrk -t{args.threads} -c{args.connections}, {args.duration:g} s per scenario after {args.warmup:g} s warm-up, "
              f"{args.rounds} round(s), request body {len(chat_body())} bytes; logs in {log_dir}", flush=True)
        for round_number in range(1, args.rounds + 1):
            for scenario in args.scenarios:
                result = run_scenario(scenario, round_number, settings, procs)
                results.append(result)
                cpu = result.cpu_percent
                print(f"round {round_number} {scenario:<14} {result.requests_per_s:7.0f} req/s  p50 {result.p50_ms:6.2f} ms"
                      f"  p99 {result.p99_ms:6.2f} ms  CPU %: processor {cpu.get('processor', 0):.0f}, gateway envoy "
                      f"{cpu['gateway_envoy']:.0f}, upstream {cpu['upstream_envoy']:.0f}, wrk {cpu['wrk']:.0f}, other {cpu['foreign']:.0f}",
                      flush=True)
                for problem in result.problems:
                    print(f"  PROBLEM: {problem}", flush=True)

    if not results:
        return 1
    summary = summarise(results, args.scenarios)
    print_report(summary, args.target)
    problems = [f"round {r.round} {r.scenario}: {p}" for r in results for p in r.problems]
    report = {
        "date": started.isoformat(timespec="seconds"),
        "complete": not run.failed,
        "profiled": args.profile,
        "settings": {
            "duration_s": args.duration, "warmup_s": args.warmup, "rounds": args.rounds,
            "wrk_connections": args.connections, "wrk_threads": args.threads,
            "gateway_envoy_concurrency": args.envoy_concurrency or "default (one per CPU)",
            "upstream_envoy_concurrency": args.upstream_concurrency,
            "request_body_bytes": len(chat_body()), "response_body_bytes": len(CANNED_COMPLETION),
            "max_foreign_cpu_percent": args.max_foreign_cpu, "attempts": args.attempts,
        },
        "machine": versions(wrk),
        **summary,
        "target": args.target,
        "problems": problems,
        "runs": [r.__dict__ for r in results],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {args.output}")
    if problems:
        print("PROBLEMS (these runs are suspect):\n  " + "\n  ".join(problems))
    if args.profile == "cprofile":
        for scenario in args.scenarios:
            if scenario.startswith("chain"):
                print_profile(args.profile_dir / f"{scenario}.prof")
    elif args.profile == "py-spy":
        for result in results:
            if result.profile:
                print_py_spy(result, settings.py_spy_rate)
    return 1 if run.failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
