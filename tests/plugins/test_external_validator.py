"""The external validator against a real HTTP endpoint served in-process on a free port."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import time
from dataclasses import dataclass

import pytest
from aiohttp import web
from pydantic import ValidationError

from pluginchain import Needs, Reject, Stage, StreamMode
from pluginchain._config.registry import default_registry
from pluginchain._config.validation import validate_document
from pluginchain._engine.plan import compile_plan
from pluginchain.plugins.external_validator import (
    DEFAULT_URL,
    ExternalValidator,
    ExternalValidatorUnavailable,
)
from pluginchain.testing import make_exchange, make_plugin, run_plugin

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]}).encode()


@dataclass(frozen=True)
class Answer:
    status: int = 200
    body: str = ""
    content_type: str = "text/plain"
    delay: float = 0.0


def json_answer(status: int, document: object) -> Answer:
    return Answer(status, json.dumps(document), "application/json")


@dataclass(frozen=True)
class Call:
    payload: dict
    headers: dict[str, str]
    peer: tuple
    at: float


class FakeValidator:
    """Answers from a script (the last answer repeats) and records every call it gets."""

    def __init__(self) -> None:
        self.script: list[Answer] = [Answer(200)]
        self.calls: list[Call] = []
        self.url = ""
        self.released = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        payload = await request.json()
        peer = request.transport.get_extra_info("peername")
        self.calls.append(Call(payload, {k.lower(): v for k, v in request.headers.items()}, peer, time.monotonic()))
        answer = self.script[min(len(self.calls), len(self.script)) - 1]
        if answer.delay:
            # Ends early when the fixture shuts the server down.
            try:
                await asyncio.wait_for(self.released.wait(), answer.delay)
            except TimeoutError:
                pass
        return web.Response(status=answer.status, text=answer.body, content_type=answer.content_type)


@pytest.fixture
async def validator():
    fake = FakeValidator()
    app = web.Application()
    app.router.add_post("/validate", fake.handle)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        fake.url = f"http://127.0.0.1:{port}/validate"
        yield fake
    finally:
        fake.released.set()
        await runner.cleanup()


@pytest.fixture
async def plugins():
    """Builds plugins and closes every one of them after the test, also when it fails."""
    built: list[ExternalValidator] = []

    def build(config: dict | None = None, **settings) -> ExternalValidator:
        plugin = make_plugin(ExternalValidator, config or {}, **settings)
        built.append(plugin)
        return plugin

    yield build
    for plugin in built:
        await plugin.aclose()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/validate"


# -- verdicts -------------------------------------------------------------------------------------


async def test_2xx_allows_the_request_and_the_validator_sees_it(validator, plugins):
    plugin = plugins({"url": validator.url})
    exchange = make_exchange(headers={"content-type": "application/json", "x-tenant": "acme"}, body=CHAT, request_id="r-1")

    await run_plugin(plugin, exchange)

    [call] = validator.calls
    assert call.payload["stage"] == "pre_request"
    assert call.payload["chain"] == "default"
    assert call.payload["request_id"] == "r-1"
    assert call.payload["request"]["headers"]["x-tenant"] == "acme"
    assert call.payload["request"]["body"] == json.loads(CHAT)
    assert "response" not in call.payload


@pytest.mark.parametrize(
    ("answer", "status", "message", "code"),
    [
        (json_answer(403, {"error": {"message": "prompt mentions a project codename", "code": "codename"}}),
         403, "prompt mentions a project codename", "codename"),
        (json_answer(400, {"message": "too many tokens"}), 400, "too many tokens", "external_validation_failed"),
        (json_answer(422, {"detail": "model not allowed for tenant"}), 422, "model not allowed for tenant", "external_validation_failed"),
        (Answer(403, "blocked by policy 7\n"), 403, "blocked by policy 7", "external_validation_failed"),
        (Answer(451, ""), 451, "rejected by external validator (HTTP 451)", "external_validation_failed"),
    ],
    ids=["openai-json", "message-json", "detail-json", "plain-text", "empty"],
)
async def test_4xx_rejects_with_the_validators_status_and_message(validator, plugins, answer, status, message, code):
    validator.script = [answer]
    plugin = plugins({"url": validator.url})

    with pytest.raises(Reject) as raised:
        await run_plugin(plugin, make_exchange(body=CHAT))

    assert raised.value.status == status
    assert raised.value.code == code
    assert json.loads(raised.value.body)["error"]["message"] == message


async def test_a_long_plain_text_verdict_is_cut_to_about_one_kilobyte(validator, plugins):
    validator.script = [Answer(403, "x" * 10_000)]
    plugin = plugins({"url": validator.url})

    with pytest.raises(Reject) as raised:
        await run_plugin(plugin, make_exchange(body=CHAT))

    assert 500 < len(raised.value.message) <= 1024


async def test_post_request_sends_the_response_as_well(validator, plugins):
    plugin = plugins({"url": validator.url}, stage=Stage.POST_REQUEST)
    exchange = make_exchange(
        headers={"x-tenant": "acme"},
        body=CHAT,
        response_headers={":status": "200", "content-type": "application/json"},
        response_body=b'{"choices": [{"message": {"content": "hi"}}]}',
    )

    await run_plugin(plugin, exchange)

    [call] = validator.calls
    assert call.payload["stage"] == "post_request"
    assert call.payload["response"] == {
        "headers": {":status": "200", "content-type": "application/json"},
        "body": {"choices": [{"message": {"content": "hi"}}]},
    }
    assert call.payload["request"]["headers"] == {"x-tenant": "acme"}
    assert call.payload["request"]["body"] == json.loads(CHAT)


async def test_a_body_that_is_not_json_is_sent_as_text(validator, plugins):
    plugin = plugins({"url": validator.url})

    await run_plugin(plugin, make_exchange(body=b"plain words \xff"))

    assert validator.calls[0].payload["request"]["body"] == "plain words \ufffd"


# -- what the validator is sent -------------------------------------------------------------------

SECRETS = {
    "authorization": "Bearer sk-client-secret",
    "cookie": "session=s3cr3t",
    "x-api-key": "key-123",
    "proxy-authorization": "Basic cHJveHk=",
}

MORE_SECRETS = {
    "x-goog-api-key": "AIza-goog-secret",
    "api-key": "azure-secret",
    "ocp-apim-subscription-key": "apim-secret",
    "x-amz-security-token": "amz-session-secret",
    "x-amz-signature": "amz-signature-secret",
    "x-auth-token": "auth-token-secret",
    "x-client-secret": "client-secret-value",
    "set-cookie": "id=cookie-secret",
}
"""Credential headers by other names, each value a secret the validator must never see."""

NOT_SECRETS = {
    "x-tenant": "acme",
    "content-type": "application/json",
    "x-ratelimit-remaining-tokens": "900",
    "x-amz-date": "20250101T000000Z",
    "x-request-id": "r-1",
}


async def test_credentials_are_not_forwarded_by_default(validator, plugins):
    plugin = plugins({"url": validator.url, "headers": {"authorization": "Bearer validator-token"}})

    await run_plugin(plugin, make_exchange(headers={**SECRETS, "x-tenant": "acme"}, body=CHAT))

    [call] = validator.calls
    assert call.payload["request"]["headers"] == {"x-tenant": "acme"}
    # The validator's own credential, from config, is what authenticates the call.
    assert call.headers["authorization"] == "Bearer validator-token"


async def test_no_credential_header_is_forwarded_whatever_its_name(validator, plugins):
    plugin = plugins({"url": validator.url})

    await run_plugin(plugin, make_exchange(headers={**SECRETS, **MORE_SECRETS, **NOT_SECRETS}, body=CHAT))

    [call] = validator.calls
    assert call.payload["request"]["headers"] == NOT_SECRETS
    sent = json.dumps(call.payload)
    assert not [value for value in {**SECRETS, **MORE_SECRETS}.values() if value in sent]


GEMINI_PATH = "/v1beta/models/gemini-pro:streamGenerateContent?alt=sse&key=AIza-query-secret"
PRESIGNED = (
    "https://bucket.s3.amazonaws.com/doc.pdf?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA-secret%2F20250101"
    "&X-Amz-Security-Token=amz-token-secret&X-Amz-Signature=amz-sig-secret&part=2"
)
QUERY_SECRETS = ("AIza-query-secret", "AKIA-secret", "amz-token-secret", "amz-sig-secret", "tok-secret", "sas-secret", "k2-secret")


async def test_credential_query_parameters_are_taken_out_of_every_forwarded_path_and_url(validator, plugins):
    plugin = plugins({"url": validator.url})
    headers = {
        ":path": GEMINI_PATH,
        "referer": "https://app.example/chat?page=2&access_token=tok-secret&sig=sas-secret#top",
        "x-original-url": "/v1/chat/completions?API_KEY=k2-secret",
        "x-query-note": "what? no url here",
    }

    await run_plugin(plugin, make_exchange(headers=headers, body=CHAT))

    forwarded = validator.calls[0].payload["request"]["headers"]
    assert forwarded == {
        ":path": "/v1beta/models/gemini-pro:streamGenerateContent?alt=sse",
        "referer": "https://app.example/chat?page=2#top",
        "x-original-url": "/v1/chat/completions",
        "x-query-note": "what? no url here",
    }
    sent = json.dumps(validator.calls[0].payload)
    assert not [secret for secret in QUERY_SECRETS if secret in sent]


async def test_a_presigned_url_loses_its_signature_and_keeps_the_rest(validator, plugins):
    plugin = plugins({"url": validator.url})

    await run_plugin(plugin, make_exchange(headers={"x-source-url": PRESIGNED}, body=CHAT))

    assert validator.calls[0].payload["request"]["headers"]["x-source-url"] == (
        "https://bucket.s3.amazonaws.com/doc.pdf?X-Amz-Algorithm=AWS4-HMAC-SHA256&part=2"
    )


async def test_named_headers_and_parameters_are_forwarded_and_nothing_else_is(validator, plugins):
    plugin = plugins({
        "url": validator.url, "forward_headers": [":path", "x-goog-api-key"], "forward_query_parameters": ["KEY"],
    })
    headers = {":path": GEMINI_PATH + "&access_token=tok-secret", "x-goog-api-key": "AIza-goog-secret", "x-tenant": "acme"}

    await run_plugin(plugin, make_exchange(headers=headers, body=CHAT))

    assert validator.calls[0].payload["request"]["headers"] == {
        # key is named: kept; access_token is not: taken out even from a named header.
        ":path": GEMINI_PATH,
        "x-goog-api-key": "AIza-goog-secret",
    }


async def test_forward_headers_sends_exactly_the_named_headers(validator, plugins):
    plugin = plugins({"url": validator.url, "forward_headers": ["Authorization", "x-tenant"]})

    await run_plugin(plugin, make_exchange(headers={**SECRETS, "x-tenant": "acme", "x-other": "1"}, body=CHAT))

    assert validator.calls[0].payload["request"]["headers"] == {
        "authorization": "Bearer sk-client-secret",
        "x-tenant": "acme",
    }


@pytest.mark.parametrize(
    ("send", "parts", "needs"),
    [
        (["headers"], {"headers"}, Needs()),
        (["body"], {"body"}, Needs(request_body=True)),
        (["headers", "body"], {"headers", "body"}, Needs(request_body=True)),
    ],
)
async def test_send_limits_the_parts_sent_and_the_bodies_asked_of_envoy(validator, plugins, send, parts, needs):
    plugin = plugins({"url": validator.url, "send": send})

    await run_plugin(plugin, make_exchange(headers={"x-tenant": "acme"}, body=CHAT))

    assert set(validator.calls[0].payload["request"]) == parts
    assert plugin.needs() == needs


def test_post_request_with_body_asks_envoy_for_both_bodies(plugins):
    assert plugins({}, stage=Stage.POST_REQUEST).needs() == Needs(request_body=True, response_body=True, stream=StreamMode.WHOLE)
    assert plugins({"send": ["headers"]}, stage=Stage.POST_REQUEST).needs() == Needs()


# -- retries, timeouts, failures ------------------------------------------------------------------


@pytest.mark.parametrize("overloaded", [503, 429])
async def test_overload_is_retried_with_growing_backoff_until_allowed(validator, plugins, overloaded, caplog):
    caplog.set_level(logging.DEBUG, logger="pluginchain")
    validator.script = [Answer(overloaded), Answer(overloaded), Answer(200)]
    plugin = plugins({"url": validator.url, "retries": 2, "backoff": "100ms"})

    await run_plugin(plugin, make_exchange(body=CHAT))

    assert len(validator.calls) == 3
    # The delays the plugin chose, as it logs them: the backoff, then doubled (each +-10 % jitter).
    delays = [float(m) for m in re.findall(r"retrying in ([0-9.]+)s", caplog.text)]
    assert len(delays) == 2
    assert 0.09 <= delays[0] <= 0.11 and 0.18 <= delays[1] <= 0.22
    # And it really waited them: a sleep is never shorter than asked (network time only adds).
    first, second, third = (call.at for call in validator.calls)
    assert second - first >= delays[0] - 0.005 and third - second >= delays[1] - 0.005


async def test_a_failing_validator_raises_after_all_retries(validator, plugins):
    validator.script = [Answer(503)]
    plugin = plugins({"url": validator.url, "retries": 2, "backoff": "10ms"})

    with pytest.raises(ExternalValidatorUnavailable, match="after 3 attempt.*HTTP 503"):
        await run_plugin(plugin, make_exchange(body=CHAT))

    assert len(validator.calls) == 3


async def test_a_4xx_verdict_is_not_retried(validator, plugins):
    validator.script = [Answer(400, "bad"), Answer(200)]
    plugin = plugins({"url": validator.url, "retries": 2, "backoff": "10ms"})

    with pytest.raises(Reject):
        await run_plugin(plugin, make_exchange(body=CHAT))

    assert len(validator.calls) == 1


async def test_a_slow_validator_times_out_each_attempt(validator, plugins):
    slow = 10.0
    validator.script = [Answer(200, delay=slow)]
    plugin = plugins({"url": validator.url, "timeout": "100ms", "retries": 1, "backoff": "10ms"})

    started = time.monotonic()
    with pytest.raises(ExternalValidatorUnavailable, match="no answer within 0.1s"):
        await run_plugin(plugin, make_exchange(body=CHAT))

    assert time.monotonic() - started < slow / 4
    assert len(validator.calls) == 2


async def test_a_refused_connection_raises(plugins):
    url = closed_port_url()
    plugin = plugins({"url": url, "retries": 1, "backoff": "10ms"})

    with pytest.raises(ExternalValidatorUnavailable, match="ConnectError") as raised:
        await run_plugin(plugin, make_exchange(body=CHAT))

    assert url in str(raised.value)
    assert raised.value.attempts == 2


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
async def test_an_unreachable_validator_is_one_log_line_per_request_with_a_traceback_only_at_debug(caplog, level):
    caplog.set_level(level, logger="pluginchain")
    url = closed_port_url()
    registry = default_registry()
    entry = {"name": "external_validator", "config": {"url": url.replace("http://", "http://user:pw@") + "?token=s3cret", "retries": 1, "backoff": "1ms"}}
    plan = compile_plan(validate_document([entry], registry), registry)
    try:
        for _ in range(2):
            result = await plan.get("default").run_stage(Stage.PRE_REQUEST, make_exchange(body=CHAT))
            assert result.rejection is not None and result.rejection.status == 500
    finally:
        await plan.aclose()

    lines = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(lines) == 2  # one per request, retries included
    for line in lines:
        assert f"external validator {url} unavailable after 2 attempt(s): ConnectError: " in line.getMessage()
        assert bool(line.exc_info) == (level == logging.DEBUG)
    assert "s3cret" not in caplog.text and ":pw@" not in caplog.text


async def test_retries_stop_where_the_plugin_timeout_would_cut_them(validator, plugins):
    validator.script = [Answer(503)]
    plugin = plugins({"url": validator.url, "retries": 5, "backoff": "1s"}, timeout=0.5)

    with pytest.raises(ExternalValidatorUnavailable, match="no time left"):
        await run_plugin(plugin, make_exchange(body=CHAT))

    assert len(validator.calls) == 1


async def test_failures_reveal_no_request_content_or_credentials(validator, plugins, caplog):
    caplog.set_level(logging.DEBUG)
    validator.script = [Answer(503, "echo: SECRET-PROMPT")]
    url = validator.url.replace("http://", "http://user:url-password@") + "?token=url-token"
    plugin = plugins({"url": url, "retries": 1, "backoff": "10ms", "headers": {"x-validator-key": "validator-token"}})
    body = json.dumps({"messages": [{"role": "user", "content": "SECRET-PROMPT"}]}).encode()

    with pytest.raises(ExternalValidatorUnavailable) as raised:
        await run_plugin(plugin, make_exchange(headers=SECRETS, body=body))

    # The URL's user info still authenticates the call, as basic auth.
    assert validator.calls[0].headers["authorization"].startswith("Basic ")
    assert "retrying" in caplog.text
    everything_logged = caplog.text + str(raised.value)
    for secret in ("SECRET-PROMPT", "url-password", "validator-token", *SECRETS.values()):
        assert secret not in everything_logged
    # httpx itself logs request URLs (query included) at INFO; what pluginchain says must not.
    ours = "".join(r.getMessage() for r in caplog.records if r.name.startswith("pluginchain")) + str(raised.value)
    assert "url-token" not in ours


# -- connections ----------------------------------------------------------------------------------


async def test_sequential_calls_reuse_one_connection(validator, plugins):
    plugin = plugins({"url": validator.url})

    for _ in range(5):
        await run_plugin(plugin, make_exchange(body=CHAT))

    assert len(validator.calls) == 5
    assert len({call.peer for call in validator.calls}) == 1


async def test_concurrent_requests_are_validated_concurrently(validator, plugins):
    validator.script = [Answer(200, delay=0.1)]
    plugin = plugins({"url": validator.url})

    started = time.monotonic()
    for _ in range(5):
        await run_plugin(plugin, make_exchange(body=CHAT))
    five_sequential = time.monotonic() - started

    started = time.monotonic()
    await asyncio.gather(*(run_plugin(plugin, make_exchange(body=CHAT)) for _ in range(20)))
    twenty_concurrent = time.monotonic() - started

    assert len(validator.calls) == 25
    # Twenty in parallel take less than five one after another (sequential would take four times that).
    assert twenty_concurrent < five_sequential


async def test_a_closed_plugin_can_be_closed_again(validator, plugins):
    plugin = plugins({"url": validator.url})
    await run_plugin(plugin, make_exchange(body=CHAT))

    await plugin.aclose()
    await plugin.aclose()


# -- config ---------------------------------------------------------------------------------------


def test_an_entry_without_config_validates_against_the_local_default(plugins):
    plugin = plugins({})

    assert plugin.config.url == DEFAULT_URL
    assert plugin.config.timeout == 2.0
    assert plugin.config.retries == 2
    assert plugin.config.backoff == 0.1
    assert plugin.config.send == ("headers", "body")


@pytest.mark.parametrize(
    ("config", "complaint"),
    [
        ({"url": "ftp://validator/check"}, "url must start with http:// or https://"),
        ({"url": "validator:8090/check"}, "url must start with http:// or https://"),
        ({"url": "http:///check"}, "url has no host"),
        ({"retries": -1}, "retries must be 0 or more, got -1"),
        ({"max_connections": 0}, "max_connections must be 1 or more"),
        ({"retry": 3}, "Extra inputs are not permitted"),
        ({"send": ["headers", "cookies"]}, "unknown part 'cookies' in send"),
        ({"timeout": "soon"}, "not a duration"),
        ({"headers": {"x bad": "1"}}, "not a valid header name in headers"),
        ({"headers": {"authorization": "Bearer a\r\nx-injected: 1"}}, "value of header 'authorization'"),
        ({"forward_headers": ["x tenant"]}, "not a valid header name in forward_headers"),
        ({"forward_query_parameters": ["key=1"]}, "not a query parameter name in forward_query_parameters"),
    ],
)
def test_config_errors_name_what_is_wrong(config, complaint):
    with pytest.raises(ValidationError, match=complaint):
        ExternalValidator.Config.model_validate(config)
