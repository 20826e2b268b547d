"""The chain runs exactly as DESIGN.md's execution semantics say."""

from __future__ import annotations

import time

import pytest

from pluginchain import Exchange, HttpMessage, Stage
from pluginchain._config.validation import validate_document
from pluginchain._engine.plan import compile_plan
from tests.support.scripted import scripted_registry


def chain_of(*entries: dict):
    registry = scripted_registry()
    plan = compile_plan(validate_document(list(entries), registry), registry)
    return plan.get("default")


def step(plugin_id: str, priority: int = 0, parallel: bool = False, stage: str = "pre_request", **config) -> dict:
    return {"name": "scripted", "id": plugin_id, "priority": priority, "parallel": parallel, "stage": stage, "config": config}


def new_exchange() -> Exchange:
    return Exchange(request=HttpMessage({"host": "example"}), request_id="r1")


def order(exchange: Exchange, event: str = "start") -> list[str]:
    return [e[1] for e in exchange.metadata["events"] if e[0] == event]


async def test_groups_run_by_ascending_priority_then_declaration_order():
    chain = chain_of(step("c", priority=3), step("a", priority=1), step("b1", priority=2), step("b2", priority=2))
    exchange = new_exchange()
    result = await chain.run_stage(Stage.PRE_REQUEST, exchange)
    assert result.rejection is None
    assert order(exchange) == ["a", "b1", "b2", "c"]


async def test_sequential_members_run_before_the_parallel_ones_of_their_group():
    chain = chain_of(
        step("p1", parallel=True, sleep=0.01),
        step("s1", sleep=0.01),
        step("p2", parallel=True),
        step("s2"),
    )
    exchange = new_exchange()
    await chain.run_stage(Stage.PRE_REQUEST, exchange)
    started = order(exchange)
    assert started[:2] == ["s1", "s2"]
    assert set(started[2:]) == {"p1", "p2"}
    # s2 started only after s1 ended: sequential means one at a time.
    events = [e[:2] for e in exchange.metadata["events"]]
    assert events.index(("end", "s1")) < events.index(("start", "s2"))


async def test_parallel_members_run_concurrently():
    parallel = chain_of(step("a", parallel=True, sleep=0.2), step("b", parallel=True, sleep=0.2))
    sequential = chain_of(step("a", sleep=0.2), step("b", sleep=0.2))

    async def elapsed(chain) -> float:
        started = time.perf_counter()
        result = await chain.run_stage(Stage.PRE_REQUEST, new_exchange())
        assert result.rejection is None
        return time.perf_counter() - started

    sequential_time = await elapsed(sequential)
    parallel_time = await elapsed(parallel)
    assert parallel_time < sequential_time * 0.75


async def test_a_reject_stops_later_priorities():
    chain = chain_of(step("gate", priority=1, reject_status=429), step("later", priority=2))
    exchange = new_exchange()
    result = await chain.run_stage(Stage.PRE_REQUEST, exchange)
    assert result.rejection is not None
    assert result.rejection.status == 429
    assert result.rejection.plugin_id == "gate"
    assert "later" not in order(exchange)


async def test_a_reject_cancels_running_siblings_and_drops_their_changes():
    chain = chain_of(
        step("slow", parallel=True, sleep=5, set_headers={"x-slow": "1"}),
        step("fast", parallel=True, sleep=0.01, reject_status=403),
    )
    exchange = new_exchange()
    started = time.perf_counter()
    result = await chain.run_stage(Stage.PRE_REQUEST, exchange)
    assert result.rejection.status == 403
    assert ("cancelled", "slow") in [e[:2] for e in exchange.metadata["events"]]
    assert "slow" not in order(exchange, "end")
    assert "x-slow" not in exchange.request.headers
    assert time.perf_counter() - started < 2.5  # far below the sibling's 5 s sleep: it was cancelled


@pytest.mark.parametrize("first_finisher", ["a", "b"])
async def test_parallel_changes_land_in_declaration_order_whatever_finishes_first(first_finisher):
    slow, fast = (0.05, 0.0) if first_finisher == "b" else (0.0, 0.05)
    chain = chain_of(
        step("a", parallel=True, sleep=slow, set_headers={"x-winner": "a", "x-a": "1"}),
        step("b", parallel=True, sleep=fast, set_headers={"x-winner": "b", "x-b": "1"}),
        step("after", priority=1),
    )
    exchange = new_exchange()
    await chain.run_stage(Stage.PRE_REQUEST, exchange)
    assert order(exchange, "end")[0] == first_finisher
    assert exchange.request.headers["x-winner"] == "b"
    assert exchange.request.set_headers == {"x-winner": "b", "x-a": "1", "x-b": "1"}


async def test_parallel_members_share_a_snapshot_and_sequential_members_see_earlier_changes():
    chain = chain_of(
        step("first", set_headers={"x-first": "1"}),
        step("p1", parallel=True, set_headers={"x-p1": "1"}),
        step("p2", parallel=True, sleep=0.01),
        step("next", priority=1),
    )
    exchange = new_exchange()
    await chain.run_stage(Stage.PRE_REQUEST, exchange)
    seen = {e[1]: e[2] for e in exchange.metadata["events"] if e[0] == "seen"}
    assert "x-first" in seen["p1"] and "x-first" in seen["p2"]
    assert "x-p1" not in seen["p2"]
    assert "x-p1" in seen["next"]


async def test_fail_closed_timeout_answers_504_and_the_error_stage_sees_it():
    chain = chain_of(
        {**step("slow", sleep=5), "timeout": "50ms"},
        step("never", priority=1),
        step("watcher", stage="error", remember_error=True),
    )
    exchange = new_exchange()
    result = await chain.run_stage(Stage.PRE_REQUEST, exchange)
    assert result.rejection.status == 504
    assert b"plugin_timeout" in result.rejection.body
    assert "never" not in order(exchange)
    [failure] = [e[2] for e in exchange.metadata["events"] if e[0] == "error"]
    assert (failure.plugin_id, failure.kind, failure.fail_open) == ("slow", "timeout", False)


async def test_fail_closed_exception_answers_500_without_internals():
    chain = chain_of(step("broken", fail="database password is hunter2"))
    result = await chain.run_stage(Stage.PRE_REQUEST, new_exchange())
    assert result.rejection.status == 500
    assert b"hunter2" not in result.rejection.body
    assert b"broken" in result.rejection.body
    assert [f.kind for f in result.failures] == ["exception"]


async def test_fail_open_goes_on_drops_the_changes_and_still_runs_the_error_stage():
    chain = chain_of(
        {**step("flaky", set_headers={"x-flaky": "1"}, fail="boom"), "on_error": "fail_open"},
        {**step("slow", parallel=True, sleep=5), "timeout": "50ms", "on_error": "fail_open"},
        step("sibling", parallel=True, set_headers={"x-sibling": "1"}),
        step("after", priority=1),
        step("watcher", stage="error", remember_error=True),
    )
    exchange = new_exchange()
    result = await chain.run_stage(Stage.PRE_REQUEST, exchange)
    assert result.rejection is None
    assert "after" in order(exchange, "end")
    assert "x-flaky" not in exchange.request.headers
    assert exchange.request.headers["x-sibling"] == "1"
    seen = sorted((e[2].plugin_id, e[2].kind, e[2].fail_open) for e in exchange.metadata["events"] if e[0] == "error")
    assert seen == [("flaky", "exception", True), ("slow", "timeout", True)]


async def test_the_error_stage_can_replace_the_error_response():
    chain = chain_of(step("broken", fail="boom"), step("custom", stage="error", reject_status=503))
    result = await chain.run_stage(Stage.PRE_REQUEST, new_exchange())
    assert result.rejection.status == 503
    assert result.rejection.plugin_id == "custom"


async def test_a_failing_error_stage_plugin_leaves_the_original_error_response():
    chain = chain_of(step("broken", fail="boom"), step("also_broken", stage="error", fail="again"))
    result = await chain.run_stage(Stage.PRE_REQUEST, new_exchange())
    assert result.rejection.status == 500
    assert result.rejection.plugin_id is None


async def test_post_request_works_on_the_response():
    chain = chain_of(step("pre"), step("post", stage="post_request", set_headers={"x-post": "1"}))
    exchange = new_exchange()
    exchange.response = HttpMessage({":status": "200"}, b"{}")
    await chain.run_stage(Stage.POST_REQUEST, exchange)
    assert order(exchange) == ["post"]
    assert exchange.response.headers["x-post"] == "1"
    assert "x-post" not in exchange.request.headers


def test_phases_follow_what_the_plugins_need():
    headers_only = chain_of(step("a"))
    assert headers_only.phases.names() == ["request_headers"]
    body = chain_of(step("a", reads_body=True))
    assert body.phases.names() == ["request_headers", "request_body"]
    post = chain_of(step("a"), step("b", stage="post_request", reads_body=True))
    assert post.phases.names() == ["request_headers", "response_headers", "response_body"]
    error_only = chain_of(step("a"), step("e", stage="error"))
    assert error_only.phases.names() == ["request_headers", "response_headers"]


def test_disabled_plugins_are_validated_but_never_run():
    chain = chain_of(step("on"), {**step("off"), "enabled": False})
    assert [p.id for p in chain.plugins] == ["on"]


async def test_members_that_never_suspend_keep_the_parallel_semantics():
    inline = {"never_suspends": True}
    chain = chain_of(
        step("a", parallel=True, set_headers={"x-winner": "a"}, **inline),
        step("b", parallel=True, set_headers={"x-winner": "b", "x-b": "1"}, **inline),
        step("c", parallel=True, reject_status=None, **inline),
        step("later", priority=1, **inline),
    )
    exchange = new_exchange()
    await chain.run_stage(Stage.PRE_REQUEST, exchange)
    seen = {e[1]: e[2] for e in exchange.metadata["events"] if e[0] == "seen"}
    assert "x-winner" not in seen["b"]  # b saw the group's snapshot, not a's change
    assert exchange.request.headers["x-winner"] == "b"
    assert "x-b" in seen["later"]

    rejecting = chain_of(
        step("gate", parallel=True, reject_status=403, **inline),
        step("other", parallel=True, set_headers={"x-o": "1"}, **inline),
    )
    exchange = new_exchange()
    result = await rejecting.run_stage(Stage.PRE_REQUEST, exchange)
    assert result.rejection.status == 403 and "x-o" not in exchange.request.headers

    # A member that says it never suspends and then awaits fails, in parallel or alone, saying so.
    for lying in (chain_of(step("sleeper", parallel=True, sleep=0.01, **inline), step("other", parallel=True, **inline)),
                  chain_of(step("sleeper", sleep=0.01, **inline))):
        result = await lying.run_stage(Stage.PRE_REQUEST, new_exchange())
        assert result.rejection.status == 500 and result.failures[0].plugin_id == "sleeper"
        assert "said it never suspends but awaited" in result.failures[0].message


async def test_a_sibling_that_rejects_at_once_cancels_a_suspended_member_at_its_own_await():
    # "slow" is started first and suspends; "gate" rejects without ever suspending. slow must see
    # the cancellation inside its await (its cleanup runs, its outcome is counted as cancelled),
    # not be dropped half-run.
    chain = chain_of(
        step("slow", parallel=True, sleep=5, set_headers={"x-slow": "1"}),
        step("gate", parallel=True, reject_status=403),
    )
    exchange = new_exchange()
    result = await chain.run_stage(Stage.PRE_REQUEST, exchange)
    assert result.rejection.status == 403 and result.rejection.plugin_id == "gate"
    events = [e[:2] for e in exchange.metadata["events"]]
    assert events.index(("start", "slow")) < events.index(("start", "gate"))  # declaration order
    assert ("cancelled", "slow") in events
    assert "x-slow" not in exchange.request.headers


async def test_members_that_may_suspend_but_do_not_finish_inline_with_the_same_results():
    # Declared able to suspend (the default here), these members never await: they run without a
    # task, yet the group keeps its snapshot, its declaration order and its failure handling.
    chain = chain_of(
        step("a", parallel=True, set_headers={"x-winner": "a"}),
        step("slow", parallel=True, sleep=0.02, set_headers={"x-slow": "1"}),
        step("b", parallel=True, set_headers={"x-winner": "b"}),
        step("later", priority=1),
    )
    exchange = new_exchange()
    result = await chain.run_stage(Stage.PRE_REQUEST, exchange)
    assert result.rejection is None
    assert order(exchange, "end")[-1] == "later" and order(exchange, "end")[:2] == ["a", "b"]
    assert exchange.request.set_headers == {"x-winner": "b", "x-slow": "1"}
    seen = {e[1]: e[2] for e in exchange.metadata["events"] if e[0] == "seen"}
    assert "x-winner" not in seen["b"] and seen["later"]["x-slow"] == "1"


async def test_a_member_that_yields_to_the_loop_without_a_future_is_finished_in_its_task():
    # asyncio.sleep(0) suspends with a bare yield, no future: the task that finishes the member
    # must give it the loop turn and resume it, alone or beside a sibling.
    chain = chain_of(
        step("yielder", parallel=True, yield_once=True, set_headers={"x-winner": "yielder", "x-y": "1"}),
        step("plain", parallel=True, set_headers={"x-winner": "plain"}),
        step("alone", priority=1, yield_once=True, set_headers={"x-alone": "1"}),
    )
    exchange = new_exchange()
    result = await chain.run_stage(Stage.PRE_REQUEST, exchange)
    assert result.rejection is None
    assert order(exchange, "end") == ["plain", "yielder", "alone"]
    assert exchange.request.set_headers == {"x-winner": "plain", "x-y": "1", "x-alone": "1"}


async def test_a_timeout_counts_from_the_start_of_a_member_that_suspends_late():
    # A member that works inline for a while and only then awaits gets what is left of its timeout.
    chain = chain_of({**step("late", parallel=True, busy=0.2, sleep=5), "timeout": "250ms"}, step("other", parallel=True))
    started = time.perf_counter()
    result = await chain.run_stage(Stage.PRE_REQUEST, new_exchange())
    assert result.rejection.status == 504 and result.failures[0].plugin_id == "late"
    assert time.perf_counter() - started < 0.4  # 250 ms from its start, not 200 + 250 ms


async def test_only_a_serving_plan_creates_metric_series():
    from prometheus_client import REGISTRY

    from pluginchain._metrics import EngineMetrics

    registry = scripted_registry()

    def decisions(chain: str) -> float | None:
        labels = {"chain": chain, "plugin": "a", "outcome": "allow", "code": "none"}
        return REGISTRY.get_sample_value("pluginchain_plugin_decisions_total", labels)

    checked = compile_plan(validate_document({"chains": {"checked-only": [step("a")]}, "no_default_chain": True}, registry), registry)
    await checked.chains["checked-only"].run_stage(Stage.PRE_REQUEST, new_exchange())
    assert decisions("checked-only") is None  # the operator and the CLI compile like this

    serving = compile_plan(validate_document({"chains": {"serving": [step("a")]}, "no_default_chain": True}, registry), registry, EngineMetrics())
    await serving.chains["serving"].run_stage(Stage.PRE_REQUEST, new_exchange())
    assert decisions("serving") == 1.0
