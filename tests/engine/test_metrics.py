"""What an operator reads on /metrics after real plugin runs: each execution counted by what the
plugin did, with the error code the client got from it; each stage timed under its own name; and
no label that input can grow without end."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from prometheus_client import REGISTRY

from pluginchain import Exchange, HttpMessage, Plugin, PluginContext, PluginData, Reject, Stage
from pluginchain._config.registry import PluginRegistry, default_registry
from pluginchain._config.validation import validate_document
from pluginchain._engine.plan import CompiledChain, compile_plan
from pluginchain._engine.streaming import ResponseStream
from pluginchain._metrics import ERROR_CODES, OTHER, PLUGIN_DECISIONS, BoundedLabel, EngineMetrics
from tests.support.scripted import Scripted

SSN = r"\b\d{3}-\d{2}-\d{4}\b"


class EchoCode(Plugin):
    """Rejects with the code a header names: a plugin whose codes come from its input."""

    name = "echo_code"
    stages = frozenset({Stage.PRE_REQUEST})

    async def execute(self, ctx: PluginContext, data: PluginData) -> None:
        raise Reject(400, "refused", code=data.headers.get("x-code"))


def plugins() -> PluginRegistry:
    registry = default_registry()
    registry.register(Scripted)
    registry.register(EchoCode)
    return registry


def serving(*entries: dict[str, Any]) -> CompiledChain:
    """A chain compiled as the serving sidecar compiles it, under a name of this test alone."""
    name = f"metrics-{uuid.uuid4().hex[:12]}"
    registry = plugins()
    document = {"chains": {name: list(entries)}, "no_default_chain": True}
    return compile_plan(validate_document(document, registry), registry, EngineMetrics()).chains[name]


def decisions(chain: CompiledChain) -> dict[tuple[str, str, str], float]:
    """pluginchain_plugin_decisions_total of ``chain``: (plugin, outcome, code) -> count, zeros left out."""
    found = {}
    for metric in PLUGIN_DECISIONS.collect():
        for sample in metric.samples:
            labels = sample.labels
            if sample.name.endswith("_total") and labels["chain"] == chain.name and sample.value:
                found[(labels["plugin"], labels["outcome"], labels["code"])] = sample.value
    return found


def stage_runs(chain: CompiledChain, stage: str) -> float | None:
    return REGISTRY.get_sample_value("pluginchain_stage_duration_seconds_count", {"chain": chain.name, "stage": stage})


def step(plugin_id: str, priority: int = 0, stage: str = "pre_request", **entry: Any) -> dict[str, Any]:
    config = {key: entry.pop(key) for key in list(entry) if key not in ("parallel", "timeout", "on_error")}
    return {"name": "scripted", "id": plugin_id, "priority": priority, "stage": stage, "config": config, **entry}


def prompt(text: str, **headers: str) -> Exchange:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()
    return Exchange(request=HttpMessage({"content-type": "application/json", **headers}, body), request_id="r1")


async def test_a_redaction_is_counted_as_redacted_and_a_reject_with_its_code():
    chain = serving(
        {"name": "content_filter", "id": "redactor", "config": {"banned_patterns": [SSN], "action": "redact"}},
        {"name": "content_filter", "id": "gate", "priority": 1, "config": {"banned_patterns": ["launch codes"]}},
        step("stamper", priority=2, set_headers={"x-checked": "1"}),
    )
    for text in ("My SSN is 123-45-6789", "the launch codes, please", "hello"):
        await chain.run_stage(Stage.PRE_REQUEST, prompt(text))

    assert decisions(chain) == {
        ("redactor", "redacted", "none"): 1,
        ("redactor", "allow", "none"): 2,
        ("gate", "allow", "none"): 2,
        ("gate", "reject", "content_filtered"): 1,
        ("stamper", "allow", "none"): 2,  # a header alone is no redaction
    }
    assert stage_runs(chain, "pre_request") == 3


async def test_failures_are_errors_or_timeouts_with_the_code_the_client_got():
    chain = serving(
        step("open_error", fail="boom", on_error="fail_open"),
        step("open_slow", priority=1, sleep=5, timeout="10ms", on_error="fail_open"),
        step("closed_error", priority=2, fail="boom"),
    )
    slow = serving(step("closed_slow", sleep=5, timeout="10ms"))

    result = await chain.run_stage(Stage.PRE_REQUEST, prompt("hi"))
    assert result.rejection is not None and result.rejection.code == "plugin_failed"
    result = await slow.run_stage(Stage.PRE_REQUEST, prompt("hi"))
    assert result.rejection is not None and result.rejection.code == "plugin_timeout"

    assert decisions(chain) == {
        ("open_error", "error", "none"): 1,  # fail_open: the request went on
        ("open_slow", "timeout", "none"): 1,
        ("closed_error", "error", "plugin_failed"): 1,
    }
    assert decisions(slow) == {("closed_slow", "timeout", "plugin_timeout"): 1}


async def test_a_member_cancelled_by_its_group_or_a_request_gone_is_counted_cancelled():
    chain = serving(
        step("slow", parallel=True, sleep=5),
        step("fast", parallel=True, sleep=0.01, reject_status=403),
    )
    result = await chain.run_stage(Stage.PRE_REQUEST, prompt("hi"))
    assert result.rejection is not None and result.rejection.plugin_id == "fast"
    assert decisions(chain) == {("slow", "cancelled", "none"): 1, ("fast", "reject", "scripted"): 1}

    waiting = serving(step("waiting", sleep=5))
    exchange = prompt("hi")
    run = asyncio.ensure_future(waiting.run_stage(Stage.PRE_REQUEST, exchange))
    await asyncio.sleep(0)  # one loop turn: the plugin has started and waits on its sleep
    assert ("start", "waiting") in exchange.metadata["events"]
    run.cancel()  # what the sidecar's stream sees when Envoy resets it
    await asyncio.gather(run, return_exceptions=True)
    assert decisions(waiting) == {("waiting", "cancelled", "none"): 1}


async def test_the_error_stage_is_timed_as_error_and_its_own_failure_gives_the_client_no_code():
    chain = serving(
        step("breaks", fail="boom"),
        step("alerting", stage="error", fail="alert sink down"),
    )
    result = await chain.run_stage(Stage.PRE_REQUEST, prompt("hi"))
    assert result.rejection is not None and result.rejection.code == "plugin_failed"
    assert decisions(chain) == {("breaks", "error", "plugin_failed"): 1, ("alerting", "error", "none"): 1}
    assert stage_runs(chain, "pre_request") == 1
    assert stage_runs(chain, "error") == 1


def chat_event(text: str | None = None, finish: str | None = None) -> bytes:
    delta = {} if text is None else {"content": text}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return b"data: " + json.dumps({"object": "chat.completion.chunk", "choices": [choice]}).encode() + b"\n\n"


async def test_a_streamed_redaction_is_counted_per_event_and_timed_as_post_request_event():
    chain = serving({"name": "content_filter", "id": "answers", "stage": "post_request", "config": {"banned_patterns": [SSN], "action": "redact"}})
    response = HttpMessage({":status": "200", "content-type": "text/event-stream"})
    stream = ResponseStream(chain, Exchange(request=HttpMessage({}), response=response), max_event_bytes=1 << 20, max_buffer_bytes=1 << 20)
    chunks = [chat_event("My number is 123"), chat_event("-45-6789, call me."), chat_event(finish="stop"), b"data: [DONE]\n\n"]
    received = b"".join([await stream.feed(chunk, index == len(chunks) - 1) for index, chunk in enumerate(chunks)])
    assert b"[REDACTED]" in received and b"6789" not in received

    counted = decisions(chain)
    event_runs = stage_runs(chain, "post_request_event")
    assert counted[("answers", "redacted", "none")] == 1
    assert counted[("answers", "redacted", "none")] + counted[("answers", "allow", "none")] == event_runs
    assert event_runs is not None and event_runs >= len(chunks)
    assert not stage_runs(chain, "post_request")  # the stream's event runs do not pass for whole-response runs

    whole = serving({"name": "content_filter", "id": "answers", "stage": "post_request", "config": {"banned_patterns": [SSN], "action": "redact"}})
    body = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "SSN 123-45-6789"}}]}).encode()
    await whole.run_stage(Stage.POST_REQUEST, Exchange(request=HttpMessage({}), response=HttpMessage({":status": "200"}, body)))
    assert decisions(whole) == {("answers", "redacted", "none"): 1}
    assert stage_runs(whole, "post_request") == 1 and not stage_runs(whole, "post_request_event")


async def test_reject_codes_from_input_are_bounded():
    chain = serving({"name": "echo_code"})
    codes = [f"code-{n}" for n in range(100)] + ["x" * 65, ""]
    for code in codes:
        await chain.run_stage(Stage.PRE_REQUEST, prompt("hi", **({"x-code": code} if code else {})))

    counted = decisions(chain)
    labels = {code for (_, _, code) in counted}
    assert sum(counted.values()) == len(codes)
    assert OTHER in labels and "x" * 65 not in labels
    assert "none" in labels  # a reject without a code
    assert len(labels - {OTHER, "none"}) <= ERROR_CODES.limit


def test_a_bounded_label_keeps_the_first_values_and_names_the_rest_other():
    models = BoundedLabel(2, missing="unknown")
    assert [models(value) for value in ("a", "b", "c", "a", None, "")] == ["a", "b", OTHER, "a", "unknown", "unknown"]


def test_the_readme_lists_every_metric_with_its_type_and_exact_labels():
    from pathlib import Path

    from prometheus_client.metrics import MetricWrapperBase

    from pluginchain import _metrics

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## Metrics\n"):readme.index("## Pushed configuration")]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (cells[1], [label.strip("` ") for label in cells[2].split(",") if label.strip()])
    declared = [value for value in vars(_metrics).values() if isinstance(value, MetricWrapperBase)]
    for metric in declared:
        name = metric._name + ("_total" if metric._type == "counter" else "")
        assert rows.get(name) == (metric._type, list(metric._labelnames)), name
    assert len(rows) == len(declared)
