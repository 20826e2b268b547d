"""The session plugin as a client sees it: an id it sends is kept, a missing one is issued and
returned, an invalid one is refused (or replaced), and later plugins see the session."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, ClassVar

import pytest
from pydantic import ValidationError

from pluginchain import Exchange, HttpMessage, Needs, Plugin, PluginContext, PluginData, Reject, Stage
from pluginchain._config.issues import ConfigError
from pluginchain._config.registry import PluginRegistry
from pluginchain._config.validation import validate_document
from pluginchain._engine.plan import compile_plan
from pluginchain.plugins.rate_limiter import RateLimiter
from pluginchain.plugins.session import DEFAULT_PATTERN, Session
from pluginchain.testing import make_exchange, make_plugin, run_plugin

ISSUED = re.compile(r"[A-Za-z0-9_-]{24}")
GIVEN = "conv-2024.01~abc_DEF"


def session(config: dict[str, Any] | None = None) -> Session:
    plugin = make_plugin(Session, config or {})
    assert isinstance(plugin, Session)
    return plugin


# -- the id a client sends --------------------------------------------------------------------------


async def test_a_valid_id_becomes_the_session_and_nothing_else_changes():
    exchange = make_exchange(headers={"x-session-id": GIVEN})

    data = await run_plugin(session(), exchange)

    assert exchange.session == GIVEN and data.session == GIVEN
    assert exchange.response_headers == {}
    assert exchange.request.set_headers == {} and exchange.request.headers["x-session-id"] == GIVEN


@pytest.mark.parametrize(
    "value",
    ["short", "x" * 129, "has space-in-it", "comma,separated", "semi;colon", "ünïcode-id", "new\nline-id", "quote\"d-id-value"],
    ids=["too-short", "too-long", "space", "comma", "semicolon", "non-ascii", "newline", "quote"],
)
async def test_an_invalid_id_is_refused_with_400_and_never_echoed(value):
    exchange = make_exchange(headers={"x-session-id": value})

    with pytest.raises(Reject) as refused:
        await run_plugin(session(), exchange)

    reject = refused.value
    assert (reject.status, reject.code, reject.type) == (400, "invalid_session_id", "invalid_request_error")
    assert "x-session-id" in reject.message and DEFAULT_PATTERN in reject.message
    assert value not in reject.body.decode() and json.dumps(value)[1:-1] not in reject.body.decode()
    assert exchange.session is None and exchange.response_headers == {}


@pytest.mark.parametrize("length", [8, 128])
async def test_ids_of_the_boundary_lengths_are_valid(length):
    exchange = make_exchange(headers={"x-session-id": "a" * length})
    await run_plugin(session(), exchange)
    assert exchange.session == "a" * length


async def test_on_invalid_replace_issues_a_new_id_in_its_place():
    exchange = make_exchange(headers={"x-session-id": "bad id"})

    await run_plugin(session({"on_invalid": "replace"}), exchange)

    issued = exchange.session
    assert issued is not None and ISSUED.fullmatch(issued)
    assert exchange.request.headers["x-session-id"] == issued  # the upstream never sees the bad one
    assert exchange.response_headers == {"x-session-id": issued}


# -- no id ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"x-session-id": ""}], ids=["absent", "empty"])
async def test_a_request_without_an_id_is_issued_one_returned_on_the_response_and_sent_upstream(headers):
    exchange = make_exchange(headers=headers)

    await run_plugin(session(), exchange)

    issued = exchange.session
    assert issued is not None and ISSUED.fullmatch(issued)
    assert exchange.response_headers == {"x-session-id": issued}
    assert exchange.request.set_headers == {"x-session-id": issued}


async def test_every_issued_id_is_new_and_is_accepted_when_the_client_sends_it_back():
    plugin = session()
    issued = set()
    for _ in range(50):
        exchange = make_exchange()
        await run_plugin(plugin, exchange)
        issued.add(exchange.session)
    assert len(issued) == 50

    returning = make_exchange(headers={"x-session-id": next(iter(issued))})
    await run_plugin(plugin, returning)
    assert returning.session in issued and returning.response_headers == {}


async def test_header_and_pattern_are_configurable():
    plugin = session({"header": "X-Conversation", "pattern": r"[A-Za-z0-9_-]{20,40}"})
    given = make_exchange(headers={"x-conversation": "c" * 20, "x-session-id": "ignored-here"})
    await run_plugin(plugin, given)
    assert given.session == "c" * 20

    missing = make_exchange(headers={"x-session-id": "not-this-header"})
    await run_plugin(plugin, missing)
    assert missing.session != "not-this-header" and missing.response_headers == {"x-conversation": missing.session}

    with pytest.raises(Reject):  # the whole value must match, anchors or not
        await run_plugin(plugin, make_exchange(headers={"x-conversation": "c" * 20 + "!"}))


# -- later plugins --------------------------------------------------------------------------------


class Probe(Plugin):
    """Records the session a later plugin sees, through data and ctx."""

    name = "session_probe"
    suspends = False
    seen: ClassVar[list[tuple[str | None, str | None]]] = []

    async def execute(self, ctx: PluginContext, data: PluginData) -> None:
        Probe.seen.append((data.session, ctx.session))


def chain_with(*entries: dict[str, Any]):
    registry = PluginRegistry()
    for plugin_class in (Session, Probe, RateLimiter):
        registry.register(plugin_class)
    return compile_plan(validate_document(list(entries), registry), registry)


async def test_later_plugins_see_the_session_and_a_new_id_reaches_the_client():
    plan = chain_with({"name": "session", "priority": 0}, {"name": "session_probe", "priority": 1})
    chain = plan.chains["default"]
    try:
        Probe.seen.clear()
        given = Exchange(request=HttpMessage({"x-session-id": GIVEN}))
        assert (await chain.run_stage(Stage.PRE_REQUEST, given)).rejection is None
        missing = Exchange(request=HttpMessage({}))
        assert (await chain.run_stage(Stage.PRE_REQUEST, missing)).rejection is None

        assert Probe.seen == [(GIVEN, GIVEN), (missing.session, missing.session)]
        assert missing.session is not None and missing.response_headers == {"x-session-id": missing.session}
        # The sidecar asks Envoy for the response headers (to put the new id on them), not for bodies.
        assert chain.phases.response_headers and not chain.phases.request_body and not chain.phases.response_body
    finally:
        await plan.aclose()


async def test_a_rate_limit_per_session_counts_each_conversation_apart():
    limiter = {"name": "rate_limiter", "id": f"per-session-{uuid.uuid4().hex[:8]}", "priority": 1,
               "config": {"limit": 1, "window": "1h", "key": "session"}}
    plan = chain_with({"name": "session"}, limiter)
    chain = plan.chains["default"]
    try:
        async def status(session_id: str) -> int:
            result = await chain.run_stage(Stage.PRE_REQUEST, Exchange(request=HttpMessage({"x-session-id": session_id})))
            return 200 if result.rejection is None else result.rejection.status

        assert [await status("session-a1"), await status("session-a1"), await status("session-b2")] == [200, 429, 200]
    finally:
        await plan.aclose()


async def test_an_invalid_id_stops_the_chain_before_later_plugins():
    plan = chain_with({"name": "session"}, {"name": "session_probe", "priority": 1})
    try:
        Probe.seen.clear()
        result = await plan.chains["default"].run_stage(Stage.PRE_REQUEST, Exchange(request=HttpMessage({"x-session-id": "no"})))
        assert result.rejection is not None and result.rejection.code == "invalid_session_id"
        assert result.rejection.plugin_id == "session" and Probe.seen == []
    finally:
        await plan.aclose()


# -- what it is, and config --------------------------------------------------------------------


def test_it_runs_inline_and_needs_only_the_response_headers():
    assert session().needs() == Needs(suspends=False, response_headers=True)


def test_it_is_a_sequential_pre_request_plugin():
    registry = PluginRegistry()
    registry.register(Session)
    for wrong, problem in [
        ({"parallel": True}, "session does not support parallel execution"),
        ({"stage": "post_request"}, "session cannot run in post_request"),
    ]:
        with pytest.raises(ConfigError, match=problem):
            validate_document([{"name": "session", **wrong}], registry)


def test_defaults():
    assert Session.Config.model_validate({}).model_dump() == {
        "header": "x-session-id",
        "pattern": DEFAULT_PATTERN,
        "on_invalid": "reject",
    }


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"pattern": "(unclosed"}, "not a valid RE2 pattern: missing \\)"),
        ({"pattern": ""}, "at least 1 character"),
        ({"pattern": "^[0-9a-f]{32}$"}, "refuses ids this plugin issues, such as 'ABCDEFGHIJKLMNOPQRSTUVWX'"),
        ({"pattern": "^[A-Za-z][A-Za-z0-9_-]+$"}, "refuses ids this plugin issues, such as '0123456789-_"),
        ({"pattern": "^[A-Za-z0-9]{8,64}$"}, "refuses ids this plugin issues, such as 'wxyz0123456789-_"),
        ({"header": "x session"}, "not a valid header name: 'x session'"),
        ({"header": ""}, "not a valid header name"),
        ({"on_invalid": "ignore"}, "'reject' or 'replace'"),
        ({"issue": False}, "Extra inputs are not permitted"),
    ],
)
def test_config_errors_name_what_is_wrong(config, message):
    with pytest.raises(ValidationError, match=message):
        Session.Config.model_validate(config)
