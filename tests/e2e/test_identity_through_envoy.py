"""Identity through the real Envoy, the real sidecar and the demo upstream, with the official
``openai`` SDK as the client: ``auth`` (API keys, JWTs from a JWKS served over HTTP, the provider's
credential from a file), limits per consumer and per session, ``session`` ids, and the
``audit_log`` records (a file sink, and HTTP sinks that are down).

One gateway serves every test, a chain per concern on its own route prefix; the SDK's
``base_url`` carries the prefix (``<gateway>/jwt/v1``), which Envoy forwards unchanged to the demo
upstream (it answers any POST as a chat completion). Every test uses keys, tenants and messages
of its own, so the upstream's request log and the audit files tell its requests apart.

Audit records are written after the exchange is over, so the tests poll the files for them.

Latencies are compared within one test, never against a fixed figure. The demo upstream writes a
response's headers and body in two sends with Nagle's algorithm on, so a keep-alive connection
often waits for a delayed ACK (about 40 ms) before the body: a request takes either a few ms or
about 45 ms, depending on the requests before it. The comparison alternates the order and allows
for that.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import statistics
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey
from prometheus_client.parser import text_string_to_metric_families

from tests.support.harness import Gateway, free_port, start_upstream, wait_until

MODEL = "demo-model"
ISSUER = "https://idp.e2e.test"
AUDIENCE = "pluginchain-e2e"
KID = "k1"
AUDIT_HTTP_TIMEOUT = 1.0
"""``http_timeout`` of the audit sink that never answers: a request that waited for it would
take at least this long."""

ROUTES = (
    ("/rotate/", "rotate"),
    ("/limited/", "limited"),
    ("/jwt/", "jwt"),
    ("/audited/", "audited"),
    ("/failing/", "failing"),
    ("/audit-down/", "audit_down"),
    ("/no-audit/", "no_audit"),
    ("/session/", "session"),
)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Setup:
    """What the module's gateway was configured with."""

    gw: Gateway
    keys: dict[str, str]
    """Consumer name -> its API key (the client's secret)."""
    provider_key: str
    """What the ``upstream_auth`` of most chains sends the upstream."""
    rotate_file: Path
    """The provider key file of the ``rotate`` chain, which its test rewrites."""
    jwt_audit: Path
    audit_file: Path
    failing_audit: Path
    down_port: int
    """A closed port: the ``audit_down`` chain's first HTTP sink."""
    hung_port: int
    """A port that accepts connections and never answers: its second HTTP sink."""


# --- Servers the sidecar reaches over real HTTP -------------------------------------------------


@dataclass
class Jwks:
    key: RSAKey
    url: str
    fetches: list[str]


@pytest.fixture(scope="module")
def jwks() -> Iterator[Jwks]:
    """The issuer's signing key, and its public JWKS served on a free port until the module ends."""
    key = RSAKey.generate_key(2048, parameters={"kid": KID})
    document = json.dumps({"keys": [key.as_dict(private=False)]}).encode()
    fetches: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args) -> None:
            pass

        def do_GET(self) -> None:
            fetches.append(self.path)
            if self.path != "/jwks.json":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(document)))
            self.end_headers()
            self.wfile.write(document)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Jwks(key, f"http://127.0.0.1:{server.server_port}/jwks.json", fetches)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def hung_port() -> Iterator[int]:
    """A listening socket that is never accepted from: connections complete, requests get no answer."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


def chains_yaml(setup_dir: Path, keys: dict[str, str], jwks_url: str, down_port: int, hung_port: int) -> str:
    key_list = ", ".join(f'{{consumer: {consumer}, sha256: "{digest(key)}"}}' for consumer, key in keys.items())
    provider = setup_dir / "provider-key"
    auth = f'{{keys: [{key_list}], upstream_auth: {{value_file: "{provider}", prefix: "Bearer "}}}}'
    rotate_auth = f'{{keys: [{key_list}], upstream_auth: {{header: x-provider-key, value_file: "{setup_dir / "rotating-key"}"}}}}'
    audit_sink = f"sink: none, http_timeout: {AUDIT_HTTP_TIMEOUT:g}s, flush_interval: 50ms, close_timeout: 500ms"
    return f"""
        chains:
          default:
            - {{name: auth, config: {auth}}}
          rotate:
            - {{name: auth, config: {rotate_auth}}}
          limited:
            - {{name: auth, priority: 0, config: {auth}}}
            - {{name: rate_limiter, priority: 1, config: {{limit: 2, window: 1h, key: consumer}}}}
          jwt:
            - name: auth
              priority: 0
              config:
                jwt: {{issuer: "{ISSUER}", audiences: [{AUDIENCE}], jwks_url: "{jwks_url}"}}
            - {{name: audit_log, priority: 1, config: {{sink: file, path: "{setup_dir / 'jwt-audit.jsonl'}", headers: [x-tenant]}}}}
          audited:
            - {{name: auth, priority: 0, config: {auth}}}
            - name: audit_log
              priority: 1
              parallel: true
              config: {{sink: file, path: "{setup_dir / 'audit.jsonl'}", headers: [x-tenant, ":path"]}}
            - name: content_filter
              priority: 1
              parallel: true
              config: {{banned_patterns: ["forbidden-word"]}}
          failing:
            - {{name: auth, priority: 0, config: {auth}}}
            - {{name: audit_log, priority: 1, config: {{sink: file, path: "{setup_dir / 'failing-audit.jsonl'}", headers: [x-tenant]}}}}
            - {{name: explode, priority: 2}}
          audit_down:
            - {{name: rate_limiter, priority: 0, config: {{limit: 100000, window: 1m}}}}
            - id: audit_closed
              name: audit_log
              priority: 1
              config: {{http_url: "http://127.0.0.1:{down_port}/records", http_retries: 1, {audit_sink}}}
            - id: audit_hung
              name: audit_log
              priority: 1
              config: {{http_url: "http://127.0.0.1:{hung_port}/records", http_retries: 0, {audit_sink}}}
          no_audit:
            - {{name: rate_limiter, priority: 0, config: {{limit: 100000, window: 1m}}}}
          session:
            - {{name: session, priority: 0}}
            - {{name: rate_limiter, priority: 1, config: {{limit: 2, window: 1h, key: session}}}}
    """


@pytest.fixture(scope="module")
def setup(tmp_path_factory, jwks, hung_port) -> Iterator[Setup]:
    """The demo upstream, one sidecar serving every chain (with the custom ``explode``) and Envoy."""
    log_dir = tmp_path_factory.mktemp("identity")
    keys = {"team-a": f"sk-a-{uuid.uuid4().hex}", "team-b": f"sk-b-{uuid.uuid4().hex}"}
    provider_key = f"sk-provider-{uuid.uuid4().hex}"
    (log_dir / "provider-key").write_text(provider_key + "\n")
    (log_dir / "rotating-key").write_text("provider-one\n")
    down_port = free_port()  # bound and released: nothing listens there
    chain_file = log_dir / "chain.yaml"
    chain_file.write_text(textwrap.dedent(chains_yaml(log_dir, keys, jwks.url, down_port, hung_port)))
    upstream = start_upstream(log_dir)
    gw = Gateway(log_dir, chain_file, upstream, routes=ROUTES, plugin_modules=("tests/support/custom_plugins.py",))
    try:
        gw.start_sidecar()
        gw.start_envoy()
        yield Setup(
            gw, keys, provider_key, log_dir / "rotating-key",
            log_dir / "jwt-audit.jsonl", log_dir / "audit.jsonl", log_dir / "failing-audit.jsonl",
            down_port, hung_port,
        )
    finally:
        gw.stop()
        upstream.process.stop()


# --- Helpers ------------------------------------------------------------------------------------


@contextmanager
def sdk(gw: Gateway, api_key: str, prefix: str = "", headers: dict[str, str] | None = None) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=f"{gw.url}{prefix}/v1", api_key=api_key, max_retries=0, default_headers=headers)
    try:
        yield client
    finally:
        client.close()


def say(client: openai.OpenAI, content: str, **extra):
    """A chat completion: (its response headers, the completion)."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **extra
    )
    return raw.headers, raw.parse()


def answer(client: openai.OpenAI, content: str, **extra) -> str:
    return say(client, content, **extra)[1].choices[0].message.content


def upstream_saw(gw: Gateway, text: str) -> list[dict]:
    """The requests the upstream received whose body holds ``text``."""
    return [request for request in gw.upstream.received() if text in request["body"]]


def assert_unauthenticated(error: openai.AuthenticationError, secret: str | None = None) -> dict:
    assert error.status_code == 401
    response = error.response
    assert response.headers["www-authenticate"].startswith('Bearer realm="pluginchain"'), response.headers
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()["error"]
    assert (body["type"], body["code"]) == ("authentication_error", "invalid_api_key"), body
    assert body["message"]
    assert (error.type, error.code) == ("authentication_error", "invalid_api_key")
    if secret is not None:
        assert secret not in response.text
        assert secret not in str(error)
        assert secret not in str(dict(response.headers))
    return body


def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record_of(path: Path, tenant: str) -> dict:
    """The one audit record of the request that carried ``x-tenant: tenant``, once it is written."""
    found: list[dict] = []

    def written() -> bool:
        found[:] = [record for record in records(path) if (record.get("headers") or {}).get("x-tenant") == tenant]
        return bool(found)

    wait_until(written, timeout=10, what=f"the audit record of {tenant}")
    assert len(found) == 1, found
    return found[0]


def metric(gw: Gateway, name: str, **labels: str) -> float:
    text = httpx.get(gw.metrics_url, timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(label) == value for label, value in labels.items())
    )


def token(jwks: Jwks, *, key: RSAKey | None = None, **claims) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "svc-reports", "iat": now, "exp": now + 300, **claims}
    return jwt.encode({"alg": "RS256", "kid": KID}, payload, key or jwks.key)


# --- 1. API keys ---------------------------------------------------------------------------------


def test_a_valid_key_is_answered_and_a_wrong_or_missing_one_gets_401(setup):
    gw = setup.gw
    with sdk(gw, setup.keys["team-a"]) as client:
        assert answer(client, "hello with a good key") == "You said: hello with a good key"

    wrong = f"sk-wrong-{uuid.uuid4().hex}"
    with sdk(gw, wrong) as client, pytest.raises(openai.AuthenticationError) as refused:
        say(client, "hello with a wrong key")
    body = assert_unauthenticated(refused.value, secret=wrong)
    assert "invalid" in body["message"]

    # A well-formed key of the right shape that is one character off is refused all the same.
    almost = setup.keys["team-a"][:-1] + ("0" if setup.keys["team-a"][-1] != "0" else "1")
    with sdk(gw, almost) as client, pytest.raises(openai.AuthenticationError) as refused:
        say(client, "hello with an almost right key")
    assert_unauthenticated(refused.value, secret=almost)

    # No credential at all (the SDK insists on a key, so plain httpx).
    response = gw.chat("hello without a key")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="pluginchain"'
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
    assert "missing" in error["message"]
    # A bearer scheme without a token is no credential either.
    response = gw.chat("hello with a bearer scheme without a token", headers={"authorization": "Bearer"})
    assert response.status_code == 401 and "missing" in response.json()["error"]["message"]

    # None of the refused requests reached the upstream, and no key is in the sidecar's log.
    for content in ("wrong key", "almost right key", "without a key", "scheme without a token"):
        assert upstream_saw(gw, content) == [], content
    assert gw.sidecar is not None
    log = gw.sidecar.output()
    assert all(key not in log for key in (wrong, almost, *setup.keys.values()))


# --- 2. The client's credential is swapped for the provider's -------------------------------------


def test_the_upstream_sees_the_provider_key_never_the_clients(setup):
    gw = setup.gw
    marker = f"swap-{uuid.uuid4().hex}"
    with sdk(gw, setup.keys["team-b"]) as client:
        assert answer(client, marker) == f"You said: {marker}"
    [request] = upstream_saw(gw, marker)
    assert request["headers"]["authorization"] == f"Bearer {setup.provider_key}"

    # Across everything the upstream has received in this module so far: no client key anywhere.
    for received in gw.upstream.received():
        for name, value in received["headers"].items():
            for consumer, key in setup.keys.items():
                assert key not in value, f"{consumer}'s key reached the upstream in {name}"


def test_a_rotated_provider_key_file_is_used_from_the_next_request_on(setup):
    gw = setup.gw

    def provider_key_sent(marker: str) -> str | None:
        with sdk(gw, setup.keys["team-a"], "/rotate") as client:
            assert answer(client, marker) == f"You said: {marker}"
        [request] = upstream_saw(gw, marker)
        assert "authorization" not in request["headers"], request["headers"]  # the client's, removed
        return request["headers"].get("x-provider-key")

    assert provider_key_sent(f"before-{uuid.uuid4().hex}") == "provider-one"

    # Rotated as Kubernetes does: a new file moved over the old one.
    staged = setup.rotate_file.with_suffix(".new")
    staged.write_text("provider-two\n")
    os.replace(staged, setup.rotate_file)
    wait_until(lambda: provider_key_sent(f"after-{uuid.uuid4().hex}") == "provider-two", timeout=5, what="the rotated key sent")

    # Rewritten in place, by hand.
    setup.rotate_file.write_text("provider-three-longer\n")
    wait_until(lambda: provider_key_sent(f"again-{uuid.uuid4().hex}") == "provider-three-longer", timeout=5, what="the rewritten key sent")


# --- 3. Limits per consumer ----------------------------------------------------------------------


def test_each_consumer_has_a_rate_limit_of_its_own(setup):
    gw = setup.gw
    with sdk(gw, setup.keys["team-a"], "/limited") as team_a, sdk(gw, setup.keys["team-b"], "/limited") as team_b:
        assert answer(team_a, "a one") == "You said: a one"
        assert answer(team_a, "a two") == "You said: a two"
        with pytest.raises(openai.RateLimitError) as refused:
            say(team_a, "a three")
        assert refused.value.status_code == 429
        assert refused.value.code == "rate_limit_exceeded"
        assert int(refused.value.response.headers["retry-after"]) > 0

        # team-b's bucket is untouched by team-a's requests.
        assert answer(team_b, "b one") == "You said: b one"
        assert answer(team_b, "b two") == "You said: b two"
        with pytest.raises(openai.RateLimitError):
            say(team_b, "b three")


# --- 4. JWTs --------------------------------------------------------------------------------------


def test_a_valid_jwt_is_answered_as_its_subject_and_bad_ones_get_401(setup, jwks):
    gw = setup.gw
    tenant = f"tenant-{uuid.uuid4().hex}"
    good = token(jwks, sub="svc-reports")
    with sdk(gw, good, "/jwt", {"x-tenant": tenant}) as client:
        assert answer(client, "hello with a token") == "You said: hello with a token"
    assert "/jwks.json" in jwks.fetches  # verified with the keys fetched over HTTP

    record = record_of(setup.jwt_audit, tenant)
    assert (record["consumer"], record["decision"], record["status"], record["chain"]) == ("svc-reports", "allowed", 200, "jwt")
    [request] = upstream_saw(gw, "hello with a token")
    assert all(good not in value for value in request["headers"].values())

    now = int(time.time())
    other_key = RSAKey.generate_key(2048, parameters={"kid": KID})
    bad_tokens = {
        "expired": token(jwks, iat=now - 7200, exp=now - 3600),
        "wrong audience": token(jwks, aud="someone-else"),
        "wrong issuer": token(jwks, iss="https://evil.example"),
        "signed by another key": token(jwks, key=other_key),
    }
    for what, bad in bad_tokens.items():
        with sdk(gw, bad, "/jwt") as client, pytest.raises(openai.AuthenticationError) as refused:
            say(client, f"hello with a token that is {what}")
        body = assert_unauthenticated(refused.value, secret=bad)
        assert 'error="invalid_token"' in refused.value.response.headers["www-authenticate"], what
        if what == "expired":
            assert "expired" in body["message"]
        assert upstream_saw(gw, f"that is {what}") == [], what
    assert gw.sidecar is not None
    log = gw.sidecar.output()
    assert all(secret not in log for secret in (good, *bad_tokens.values()))


# --- 5. Audit records -----------------------------------------------------------------------------


def test_audit_records_tell_allowed_rejected_and_failed_requests_apart_and_hold_no_secrets(setup):
    gw = setup.gw
    canary_key = setup.keys["team-a"]  # a valid key: it must be in no record
    canary_body = f"canary-body-{uuid.uuid4().hex}"
    canary_header = f"canary-header-{uuid.uuid4().hex}"
    wrong_key = f"sk-canary-wrong-{uuid.uuid4().hex}"
    tenants = {what: f"tenant-{what}-{uuid.uuid4().hex}" for what in ("allowed", "rejected", "failed", "unauthenticated")}

    def client(what: str, key: str = canary_key, prefix: str = "/audited"):
        headers = {"x-tenant": tenants[what], "x-other": canary_header, "x-canary-secret": canary_header}
        return sdk(gw, key, prefix, headers)

    with client("allowed") as allowed:
        assert answer(allowed, f"a fine question {canary_body}") == f"You said: a fine question {canary_body}"
    with client("rejected") as rejected, pytest.raises(openai.PermissionDeniedError) as filtered:
        say(rejected, f"a forbidden-word question {canary_body}")
    assert filtered.value.code == "content_filtered"
    with client("failed", prefix="/failing") as failing, pytest.raises(openai.InternalServerError) as failed:
        say(failing, f"a question for a broken chain {canary_body}")
    assert failed.value.code == "plugin_failed"
    with client("unauthenticated", key=wrong_key) as unauthenticated, pytest.raises(openai.AuthenticationError):
        say(unauthenticated, f"a question with a wrong key {canary_body}")

    record = record_of(setup.audit_file, tenants["allowed"])
    assert {k: record[k] for k in ("chain", "consumer", "decision", "plugin", "code", "status", "model")} == {
        "chain": "audited", "consumer": "team-a", "decision": "allowed", "plugin": None, "code": None,
        "status": 200, "model": MODEL,
    }
    assert record["latency_ms"] > 0 and record["request_id"] and record["time"].endswith("Z")
    assert record["usage"] is None  # no member of the chain had the usage read
    # Only the allow-listed headers, as they went upstream; the path without its query.
    assert record["headers"] == {"x-tenant": tenants["allowed"], ":path": "/audited/v1/chat/completions"}

    record = record_of(setup.audit_file, tenants["rejected"])
    assert {k: record[k] for k in ("consumer", "decision", "plugin", "code", "status")} == {
        "consumer": "team-a", "decision": "rejected", "plugin": "content_filter", "code": "content_filtered", "status": 403,
    }
    assert record["latency_ms"] > 0

    record = record_of(setup.failing_audit, tenants["failed"])
    assert {k: record[k] for k in ("chain", "consumer", "decision", "plugin", "code", "status")} == {
        "chain": "failing", "consumer": "team-a", "decision": "failed", "plugin": None, "code": "plugin_failed", "status": 500,
    }
    assert record["headers"] == {"x-tenant": tenants["failed"]}

    # Refused by auth, which runs before audit_log: recorded all the same, with no consumer.
    record = record_of(setup.audit_file, tenants["unauthenticated"])
    assert {k: record[k] for k in ("consumer", "decision", "plugin", "code", "status")} == {
        "consumer": None, "decision": "rejected", "plugin": "auth", "code": "invalid_api_key", "status": 401,
    }

    for path in (setup.audit_file, setup.failing_audit):
        text = path.read_text()
        for secret in (canary_key, wrong_key, canary_body, canary_header, setup.provider_key, digest(canary_key)):
            assert secret not in text, f"a secret is in {path.name}"
        assert "x-other" not in text and "x-canary-secret" not in text and "authorization" not in text


# --- 6. A broken audit endpoint is never in the request's way --------------------------------------


def test_audit_http_sinks_that_are_down_neither_delay_nor_fail_requests(setup):
    gw = setup.gw
    rounds = 16
    timings: dict[str, list[float]] = {"/audit-down": [], "/no-audit": []}
    with sdk(gw, "unused", "/audit-down") as audited, sdk(gw, "unused", "/no-audit") as plain:
        clients = [("/audit-down", audited), ("/no-audit", plain)]
        for _, client in clients:  # connections and sink tasks started
            answer(client, "warm up")
        for number in range(rounds):
            # Each chain goes first in half of the rounds: a request's latency through the demo
            # upstream depends on what came just before it (see the module's docstring).
            for prefix, client in clients if number % 2 else clients[::-1]:
                started = time.perf_counter()
                assert answer(client, f"round {number}") == f"You said: round {number}"
                timings[prefix].append(time.perf_counter() - started)

    through_audit, without = statistics.median(timings["/audit-down"]), statistics.median(timings["/no-audit"])
    assert through_audit <= 3 * without + 0.05, (timings["/audit-down"], timings["/no-audit"])
    # None waited for the endpoint that never answers.
    assert max(timings["/audit-down"]) < AUDIT_HTTP_TIMEOUT, timings["/audit-down"]

    # The sinks did try, and failed: the records are counted as failed, not written.
    def failed(plugin: str) -> float:
        return metric(gw, "pluginchain_audit_records_total", chain="audit_down", plugin=plugin, sink="http", result="failed")

    wait_until(lambda: failed("audit_closed") > 0 and failed("audit_hung") > 0, timeout=10, what="the audit POSTs failed")
    for plugin in ("audit_closed", "audit_hung"):
        assert metric(gw, "pluginchain_audit_records_total", chain="audit_down", plugin=plugin, sink="http", result="written") == 0
    assert gw.sidecar is not None and gw.sidecar.alive()


# --- 7. Sessions ----------------------------------------------------------------------------------


def test_a_session_id_is_issued_returned_and_groups_the_requests_sent_with_it(setup):
    gw = setup.gw
    with sdk(gw, "unused", "/session") as client:
        headers, completion = say(client, "first of a conversation")
        assert completion.choices[0].message.content == "You said: first of a conversation"
        session_id = headers["x-session-id"]
        assert len(session_id) == 24, session_id
        [request] = upstream_saw(gw, "first of a conversation")
        assert request["headers"]["x-session-id"] == session_id  # the upstream saw the same id

        in_session = {"x-session-id": session_id}
        headers, _ = say(client, "second of the conversation", extra_headers=in_session)
        assert "x-session-id" not in headers  # nothing new to tell
        with pytest.raises(openai.RateLimitError) as refused:
            say(client, "third of the conversation", extra_headers=in_session)
        assert refused.value.code == "rate_limit_exceeded"

        # Another conversation, with an id of its own, is still admitted.
        headers, _ = say(client, "another conversation")
        other = headers["x-session-id"]
        assert other != session_id and len(other) == 24
        say(client, "another conversation, second", extra_headers={"x-session-id": other})
        # And so is one the client names itself.
        say(client, "my own conversation", extra_headers={"x-session-id": f"client-chosen-{uuid.uuid4().hex}"})

        # An id that does not match the pattern is refused, never silently replaced.
        with pytest.raises(openai.BadRequestError) as bad:
            say(client, "a bad session id", extra_headers={"x-session-id": "bad id!"})
        assert bad.value.code == "invalid_session_id"
        assert "bad id!" not in bad.value.response.text
