"""The audit log: what a record holds for each way an exchange ends, what it never holds, and
its sinks (stdout, a file, an HTTP endpoint served in-process on a free port), which must never
delay a request: a slow or dead endpoint costs records, counted, not time.

``finish`` is called as the engine calls it once the exchange is over (directly, or through a
compiled chain). Writes happen in the sinks' background tasks, so tests wait for a condition
(records counted, a batch received) with a deadline, never for a fixed time; ``aclose`` writes
what is still queued.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import REGISTRY
from pydantic import ValidationError

from pluginchain import Exchange, HttpMessage, Needs, Plugin, PluginContext, PluginData, Reject, Stage, Usage
from pluginchain._config.issues import ConfigError
from pluginchain._config.registry import PluginRegistry
from pluginchain._config.validation import validate_document
from pluginchain._engine.plan import compile_plan
from pluginchain.plugins.audit_log import AuditLog
from pluginchain.plugins.session import Session
from pluginchain.testing import make_exchange, make_plugin

CANARY = "canary-7f3a9c-do-not-log"
RECORD_FIELDS = {
    "time", "request_id", "chain", "consumer", "session", "model", "decision", "plugin", "code", "status", "latency_ms", "usage",
}


@pytest.fixture
def chain() -> str:
    """A chain name of this test alone, so counters never leak between tests."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def build(chain: str) -> AsyncIterator[Callable[..., AuditLog]]:
    """Builds audit logs on this test's chain and closes every one after the test, also when it fails."""
    built: list[AuditLog] = []

    def build_log(config: dict[str, Any] | None = None, **settings: Any) -> AuditLog:
        plugin = make_plugin(AuditLog, config or {}, chain=chain, **settings)
        assert isinstance(plugin, AuditLog)
        built.append(plugin)
        return plugin

    yield build_log
    for plugin in built:
        await plugin.aclose()


class Collector:
    """An HTTP endpoint that records the batches POSTed to it; it answers ``statuses`` in turn (the
    last repeats), and while ``hold`` is set it answers nothing until the test ends."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.headers: list[dict[str, str]] = []
        self.statuses = [200]
        self.hold = False
        self.released = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        self.batches.append(await request.json())
        if self.hold:
            await self.released.wait()
        return web.Response(status=self.statuses[min(len(self.batches), len(self.statuses)) - 1])

    def records(self) -> list[dict[str, Any]]:
        return [record for batch in self.batches for record in batch]


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    fake = Collector()
    app = web.Application()
    app.router.add_post("/ingest", fake.handle)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        fake.url = f"http://127.0.0.1:{port}/ingest"
        yield fake
    finally:
        fake.released.set()
        await runner.cleanup()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/ingest"


async def finish(plugin: Plugin, exchange: Exchange) -> None:
    """What the engine does once the exchange is over."""
    deadline = asyncio.get_running_loop().time() + plugin.settings.timeout
    ctx = PluginContext(plugin.settings.chain, exchange.request_id, plugin.id, deadline, exchange.consumer, exchange.session)
    await plugin.finish(ctx, PluginData(plugin.stage, exchange))


async def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait for a condition the sinks' tasks bring about (polling, with a deadline)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        await asyncio.sleep(0.005)


def counted(chain: str, sink: str, result: str, plugin: str = "audit_log") -> float:
    labels = {"chain": chain, "plugin": plugin, "sink": sink, "result": result}
    return REGISTRY.get_sample_value("pluginchain_audit_records_total", labels) or 0.0


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def completed(**overrides: Any) -> Exchange:
    """An exchange whose upstream answered 200 with usage, 250 ms after it reached the sidecar."""
    exchange = make_exchange(
        headers={"content-type": "application/json", "user-agent": "openai-python/1.0"},
        response_headers={":status": "200"},
        request_id="req-1",
        consumer="acme",
        session="conv-0001",
    )
    exchange.started_at = time.monotonic() - 0.25
    exchange.usage = Usage(11, 22, 33, "gpt-4o-mini-2024-07-18")
    for name, value in overrides.items():
        setattr(exchange, name, value)
    return exchange


# -- records --------------------------------------------------------------------------------------


async def test_an_allowed_exchange_is_recorded_with_its_status_usage_identity_and_latency(build, chain, tmp_path):
    path = tmp_path / "audit.jsonl"
    plugin = build({"sink": "file", "path": str(path)})
    before = time.time()

    await finish(plugin, completed())
    await plugin.aclose()

    [record] = read_records(path)
    assert set(record) == RECORD_FIELDS  # no headers without an allow-list
    assert record["request_id"] == "req-1" and record["chain"] == chain
    assert (record["consumer"], record["session"]) == ("acme", "conv-0001")
    assert (record["decision"], record["plugin"], record["code"], record["status"]) == ("allowed", None, None, 200)
    assert record["usage"] == {"input_tokens": 11, "output_tokens": 22, "total_tokens": 33}
    assert record["model"] == "gpt-4o-mini-2024-07-18"  # the body was not read: the response's model
    assert 250 <= record["latency_ms"] < 250 + 5000
    # When the request reached the sidecar, in UTC.
    assert record["time"].endswith("Z")
    at = datetime.fromisoformat(record["time"])
    assert at.tzinfo == UTC and before - 0.25 - 1 <= at.timestamp() <= time.time()
    assert counted(chain, "file", "written") == 1


async def test_the_request_model_is_recorded_when_the_body_was_read_else_the_response_one(build, tmp_path):
    path = tmp_path / "audit.jsonl"
    plugin = build({"sink": "file", "path": str(path)})
    body = json.dumps({"model": "gpt-4o-mini", "messages": []}).encode()

    await finish(plugin, completed(request=HttpMessage({}, body)))
    await finish(plugin, completed(request=HttpMessage({}, b"not json")))
    await finish(plugin, completed(request=HttpMessage({}, json.dumps({"model": "m" * 1000}).encode())))
    await finish(plugin, completed(usage=None))
    await plugin.aclose()

    models = [record["model"] for record in read_records(path)]
    assert models == ["gpt-4o-mini", "gpt-4o-mini-2024-07-18", "m" * 256, None]


async def test_a_client_that_went_away_has_no_status_and_no_usage(build, tmp_path):
    path = tmp_path / "audit.jsonl"
    plugin = build({"sink": "file", "path": str(path)})

    await finish(plugin, completed(response=None, usage=None, consumer=None, session=None))
    await plugin.aclose()

    [record] = read_records(path)
    assert (record["decision"], record["status"], record["usage"], record["consumer"], record["session"]) == (
        "allowed", None, None, None, None,
    )


class Gate(Plugin):
    """Rejects requests that ask for it, and fails on those that ask for that."""

    name = "gate"
    suspends = False

    async def execute(self, ctx: PluginContext, data: PluginData) -> None:
        if data.headers.get("x-test") == "reject":
            raise Reject(403, "not for you", code="gate_closed")
        if data.headers.get("x-test") == "fail":
            raise RuntimeError("gate broke")


@pytest.mark.parametrize(
    ("header", "response", "expected"),
    [
        ("allow", {":status": "201"}, {"decision": "allowed", "plugin": None, "code": None, "status": 201}),
        ("reject", None, {"decision": "rejected", "plugin": "front_gate", "code": "gate_closed", "status": 403}),
        ("fail", None, {"decision": "failed", "plugin": None, "code": "plugin_failed", "status": 500}),
    ],
)
async def test_the_decision_is_recorded_as_the_engine_made_it(header, response, expected, chain, tmp_path):
    path = tmp_path / "audit.jsonl"
    registry = PluginRegistry()
    for plugin_class in (Session, Gate, AuditLog):
        registry.register(plugin_class)
    entries = [
        {"name": "audit_log", "parallel": True, "config": {"sink": "file", "path": str(path)}},
        {"name": "session"},
        {"name": "gate", "id": "front_gate", "priority": 1},
    ]
    plan = compile_plan(validate_document({"chains": {chain: entries}, "no_default_chain": True}, registry), registry)
    compiled = plan.chains[chain]
    try:
        exchange = Exchange(request=HttpMessage({"x-test": header, "x-session-id": "conv-0042"}), request_id="req-9")
        exchange.started_at = time.monotonic()
        result = await compiled.run_stage(Stage.PRE_REQUEST, exchange)
        # What the sidecar does: the client gets the rejection, or the upstream's response.
        exchange.rejection = result.rejection
        if response is not None:
            exchange.response = HttpMessage(response)
        await compiled.finish(exchange)
    finally:
        await plan.aclose()

    [record] = read_records(path)
    assert {name: record[name] for name in expected} == expected
    assert (record["chain"], record["request_id"], record["session"]) == (chain, "req-9", "conv-0042")
    assert record["latency_ms"] >= 0


async def test_a_secret_in_the_request_appears_in_no_record(build, tmp_path):
    path = tmp_path / "audit.jsonl"
    plugin = build({"sink": "file", "path": str(path), "headers": ["User-Agent", ":path", "x-tenant", "x-missing"]})
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": f"my password is {CANARY}"}]}).encode()
    headers = {
        "authorization": f"Bearer {CANARY}",
        "x-api-key": CANARY,
        "cookie": f"sid={CANARY}",
        "x-custom-secret-ish": CANARY,  # not listed: not recorded
        ":path": f"/v1/chat/completions?key={CANARY}",
        "user-agent": "openai-python/1.2",
        "x-tenant": "acme",
    }
    exchange = completed(request=HttpMessage(headers, body))
    exchange.response = HttpMessage({":status": "200", "set-cookie": CANARY}, f'{{"content": "{CANARY}"}}'.encode())

    await finish(plugin, exchange)
    await plugin.aclose()

    text = path.read_text()
    assert CANARY not in text
    [record] = read_records(path)
    assert record["headers"] == {"user-agent": "openai-python/1.2", ":path": "/v1/chat/completions", "x-tenant": "acme"}
    assert record["model"] == "gpt-4o"


@pytest.mark.parametrize(
    "name",
    ["authorization", "Proxy-Authorization", "cookie", "set-cookie", "x-api-key", "api-key", "x-goog-api-key",
     "x-amz-security-token", "x-auth-request-email", "x-client-secret", "openai-apikey"],
)
def test_headers_that_may_carry_credentials_cannot_be_allow_listed(name):
    with pytest.raises(ValidationError, match=f"header '{name.lower()}' may carry a credential and is never recorded"):
        AuditLog.Config.model_validate({"headers": ["user-agent", name]})


# -- sinks ----------------------------------------------------------------------------------------


async def test_stdout_gets_one_json_line_per_record(build, capsys):
    plugin = build()

    for request_id in ("a", "b", "c"):
        await finish(plugin, completed(request_id=request_id))
    await plugin.aclose()

    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["a", "b", "c"]


async def test_the_file_sink_appends_and_follows_a_rotation(build, chain, tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text('{"earlier": true}\n')
    plugin = build({"sink": "file", "path": str(path)})

    await finish(plugin, completed(request_id="first"))
    await until(lambda: counted(chain, "file", "written") == 1, "first record written")
    path.rename(tmp_path / "audit.jsonl.1")  # what logrotate does
    await finish(plugin, completed(request_id="second"))
    await until(lambda: counted(chain, "file", "written") == 2, "second record written")

    earlier, first = read_records(tmp_path / "audit.jsonl.1")
    assert earlier == {"earlier": True} and first["request_id"] == "first"
    assert [record["request_id"] for record in read_records(path)] == ["second"]


async def test_a_file_that_cannot_be_written_counts_failures_and_never_raises(build, chain, tmp_path, caplog):
    plugin = build({"sink": "file", "path": str(tmp_path / "missing-dir" / "audit.jsonl")})

    with caplog.at_level(logging.WARNING, logger="pluginchain.plugin"):
        await finish(plugin, completed())
        await until(lambda: counted(chain, "file", "failed") == 1, "failure counted")

    assert "audit log file sink failed, 1 records lost: FileNotFoundError" in caplog.text


async def test_the_http_sink_posts_full_batches_at_once_and_the_rest_on_close(build, chain, collector):
    plugin = build({"sink": "none", "http_url": collector.url, "batch_size": 2, "flush_interval": "1h",
                    "http_headers": {"authorization": "Bearer collector-token"}})

    for n in range(5):
        await finish(plugin, completed(request_id=f"r{n}"))
    await until(lambda: len(collector.batches) == 2, "two full batches")
    await plugin.aclose()  # the partial batch goes on close, not after an hour

    assert [[record["request_id"] for record in batch] for batch in collector.batches] == [["r0", "r1"], ["r2", "r3"], ["r4"]]
    assert collector.headers[0]["authorization"] == "Bearer collector-token"
    assert collector.headers[0]["content-type"] == "application/json"
    assert counted(chain, "http", "written") == 5


async def test_a_batch_that_is_not_full_is_posted_after_flush_interval(build, collector):
    plugin = build({"sink": "none", "http_url": collector.url, "flush_interval": "20ms"})

    await finish(plugin, completed(request_id="lonely"))
    await until(lambda: len(collector.batches) == 1, "the batch of one")

    assert collector.records()[0]["request_id"] == "lonely"


async def test_stdout_and_http_each_get_every_record(build, chain, collector, capsys):
    plugin = build({"sink": "stdout", "http_url": collector.url, "flush_interval": "10ms"})

    await finish(plugin, completed())
    await until(lambda: len(collector.batches) == 1, "the batch")
    await plugin.aclose()

    assert json.loads(capsys.readouterr().out) == collector.records()[0]
    assert counted(chain, "stdout", "written") == counted(chain, "http", "written") == 1


async def test_a_failing_endpoint_is_retried_then_counted(build, chain, collector):
    collector.statuses = [503, 200, 400]
    plugin = build({"sink": "none", "http_url": collector.url, "flush_interval": "1ms", "http_retries": 1})

    await finish(plugin, completed(request_id="retried"))
    await until(lambda: counted(chain, "http", "written") == 1, "the retried batch written")
    await finish(plugin, completed(request_id="refused"))  # a 4xx is not retried
    await until(lambda: counted(chain, "http", "failed") == 1, "the refused batch counted")

    assert [record["request_id"] for record in collector.records()] == ["retried", "retried", "refused"]


async def test_an_endpoint_that_is_down_never_delays_a_request_and_is_counted(build, chain, caplog):
    url = closed_port_url()
    plugin = build({"sink": "none", "http_url": url, "flush_interval": "1ms", "http_retries": 0})

    started = time.perf_counter()
    await finish(plugin, completed())
    assert time.perf_counter() - started < 0.5  # finish only queues; generous for a busy machine
    with caplog.at_level(logging.WARNING, logger="pluginchain.plugin"):
        await until(lambda: counted(chain, "http", "failed") == 1, "the failure counted")
    assert f"audit log http sink failed, 1 records lost: POST {url} failed after 1 attempt(s)" in caplog.text


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
async def test_a_failed_post_is_one_line_naming_the_endpoint_and_the_error_with_a_traceback_only_at_debug(build, chain, caplog, level):
    caplog.set_level(level, logger="pluginchain")
    url = closed_port_url()
    plugin = build({"sink": "none", "http_url": url + "?access_token=s3cret", "flush_interval": "1ms", "http_retries": 0})

    await finish(plugin, completed())
    await until(lambda: counted(chain, "http", "failed") == 1, "the failure counted")

    [line] = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert line.getMessage().startswith(f"audit log http sink failed, 1 records lost: POST {url} failed after 1 attempt(s): ConnectError: ")
    assert "\n" not in line.getMessage()
    assert bool(line.exc_info) == (level == logging.DEBUG)
    assert "s3cret" not in caplog.text


async def test_an_endpoint_that_never_answers_never_delays_a_request_and_close_gives_up_in_time(build, chain, collector):
    collector.hold = True
    delay = 10.0  # what a POST could take: the endpoint holds it until http_timeout
    plugin = build({"sink": "none", "http_url": collector.url, "flush_interval": "1ms", "http_timeout": delay,
                    "close_timeout": "200ms"})

    await finish(plugin, completed(request_id="stuck"))
    await until(lambda: len(collector.batches) == 1, "the endpoint holding the first batch")
    # The sink's task is now waiting on the endpoint; requests finish as if it were not there.
    durations = []
    for n in range(20):
        started = time.perf_counter()
        await finish(plugin, completed(request_id=f"r{n}"))
        durations.append(time.perf_counter() - started)
    assert sum(durations) < delay / 10

    started = time.perf_counter()
    await plugin.aclose()
    assert time.perf_counter() - started < 0.2 + delay / 10
    assert counted(chain, "http", "failed") == 1  # the batch in flight
    assert counted(chain, "http", "dropped") == 20  # still queued at close
    assert counted(chain, "http", "written") == 0


async def test_a_full_queue_drops_and_counts_and_the_other_sink_gets_everything(build, chain, collector, tmp_path):
    collector.hold = True
    path = tmp_path / "audit.jsonl"
    plugin = build({"sink": "file", "path": str(path), "http_url": collector.url, "queue_size": 2, "batch_size": 1,
                    "flush_interval": "1ms"})

    await finish(plugin, completed(request_id="r0"))
    await until(lambda: len(collector.batches) == 1, "the endpoint holding the first batch")
    for n in range(1, 7):
        await finish(plugin, completed(request_id=f"r{n}"))
        await until(lambda n=n: counted(chain, "file", "written") == n + 1, f"r{n} in the file")
    # The file took every record as it came; the endpoint's queue held two, the rest was dropped.
    assert counted(chain, "http", "dropped") == 4

    collector.released.set()
    await until(lambda: counted(chain, "http", "written") == 3, "the queued records posted")
    await plugin.aclose()

    assert [record["request_id"] for record in collector.records()] == ["r0", "r1", "r2"]
    assert counted(chain, "http", "dropped") == 4
    assert [record["request_id"] for record in read_records(path)] == [f"r{n}" for n in range(7)]
    assert counted(chain, "file", "dropped") == 0


async def test_records_after_close_are_dropped_and_start_nothing(build, chain, tmp_path):
    plugin = build({"sink": "file", "path": str(tmp_path / "audit.jsonl")})
    await plugin.aclose()  # never used: nothing to stop

    await finish(plugin, completed())

    assert counted(chain, "file", "dropped") == 1
    assert not (tmp_path / "audit.jsonl").exists()


# -- what it is, and config --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "needs"),
    [
        ({}, Needs(suspends=False, finish=True, response_headers=True)),
        ({"read_model": True}, Needs(request_body=True, suspends=False, finish=True, response_headers=True)),
    ],
)
def test_it_runs_inline_and_reads_bodies_only_with_read_model(config, needs, chain):
    assert make_plugin(AuditLog, config, chain=chain).needs() == needs


async def test_a_chain_with_it_sees_response_statuses_but_no_bodies():
    registry = PluginRegistry()
    registry.register(AuditLog)
    entry = {"name": "audit_log", "parallel": True, "priority": 5}

    plan = compile_plan(validate_document([entry], registry), registry)
    phases = plan.chains["default"].phases
    await plan.aclose()

    assert (phases.request_headers, phases.request_body, phases.response_headers, phases.response_body) == (True, False, True, False)
    with pytest.raises(ConfigError, match="audit_log cannot run in post_request"):
        validate_document([{**entry, "stage": "post_request"}], registry)


def test_defaults():
    assert AuditLog.Config.model_validate({}).model_dump() == {
        "sink": "stdout",
        "path": None,
        "http_url": None,
        "http_headers": {},
        "http_timeout": "5s",
        "http_retries": 2,
        "batch_size": 100,
        "flush_interval": "1s",
        "queue_size": 10000,
        "close_timeout": "5s",
        "headers": (),
        "read_model": False,
    }


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"sink": "file"}, "sink 'file' needs path"),
        ({"path": "/tmp/audit.jsonl"}, "path is set but sink is 'stdout'"),
        ({"sink": "file", "path": ""}, "path must be a non-empty file path"),
        ({"sink": "none"}, "sink 'none' writes only to http_url, which is not set"),
        ({"sink": "syslog"}, "'stdout', 'file' or 'none'"),
        ({"http_url": "ftp://collector/ingest"}, "http_url must start with http:// or https://"),
        ({"http_url": "http:///ingest"}, "http_url has no host"),
        ({"http_url": "http://user:hunter2@collector/ingest"}, "http_url carries credentials; put them in http_headers"),
        ({"http_headers": {"authorization": "x"}}, "http_headers is set but http_url is not"),
        ({"http_url": "http://c/i", "http_headers": {"x": "a\nb"}}, "value of header 'x' contains a line break"),
        ({"headers": ["bad header"]}, "not a valid header name in headers: 'bad header'"),
        ({"batch_size": 0}, "greater than 0"),
        ({"queue_size": True}, "must be an integer, got True"),
        ({"http_retries": -1}, "greater than or equal to 0"),
        ({"flush_interval": "0s"}, "duration must be positive"),
        ({"fields": ["status"]}, "Extra inputs are not permitted"),
    ],
)
def test_config_errors_name_what_is_wrong(config, message):
    with pytest.raises(ValidationError, match=message) as error:
        AuditLog.Config.model_validate(config)
    assert "hunter2" not in str(error.value).split("input_value")[0]
