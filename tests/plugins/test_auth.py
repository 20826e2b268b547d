"""The auth plugin as a client sees it: API keys, JWTs, the credential swapped for the provider's.

Keys and secrets live in files the tests rewrite the way Kubernetes rotates a mounted Secret (a
new file moved into place). JWTs are signed with keys generated here; the clock that judges
``exp``/``nbf``/``iat`` and spaces JWKS fetches is a fake one that moves only when a test
advances it. ``jwks_url`` is served by an aiohttp server on a free port that counts its requests
and is stopped after every test, also a failed one.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from joserfc import jws, jwt
from joserfc.jwk import ECKey, KeySet, OctKey, RSAKey
from joserfc.registry import HeaderParameter
from pydantic import ValidationError

from pluginchain import Exchange, InstanceSettings, PluginContext, PluginData, Reject, Stage
from pluginchain.plugins.auth import Auth
from pluginchain.testing import make_exchange, run_plugin

NOW = 1_700_000_000.0
ISSUER = "https://idp.example"
AUDIENCE = "pluginchain-gateway"
CHALLENGE = 'Bearer realm="pluginchain"'
TOKEN_CHALLENGE = 'Bearer realm="pluginchain", error="invalid_token"'

KEY_A = "sk-team-a-0123456789abcdef"
KEY_A2 = "sk-team-a-second-key-fedcba"
KEY_B = "sk-team-b-9876543210fedcba"
SECRET = b"an-hs256-shared-secret-of-at-least-32-bytes"


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class FakeClock:
    """Unix seconds that move only when the test calls :meth:`advance`."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def build(clock: FakeClock) -> AsyncIterator[Callable[..., Auth]]:
    """Build auth plugins on the test's clock; every one is closed after the test."""
    built: list[Auth] = []

    def build_auth(*, on_error: str = "fail_closed", **config: Any) -> Auth:
        plugin = Auth(
            Auth.Config.model_validate(config),
            InstanceSettings(id="auth", stage=Stage.PRE_REQUEST, chain=f"test-{uuid.uuid4().hex[:8]}", on_error=on_error),
            clock=clock,
        )
        built.append(plugin)
        return plugin

    yield build_auth
    for plugin in built:
        await plugin.aclose()


async def attempt(plugin: Auth, headers: dict[str, str] | None = None) -> tuple[Exchange, Reject | None]:
    exchange = make_exchange(headers=headers or {})
    try:
        await run_plugin(plugin, exchange)
    except Reject as reject:
        return exchange, reject
    return exchange, None


async def consumer_of(plugin: Auth, headers: dict[str, str]) -> str | None:
    exchange, reject = await attempt(plugin, headers)
    assert reject is None, f"refused: {reject!r}"
    return exchange.consumer


def assert_unauthenticated(reject: Reject | None, message: str, *, token: bool = False, presented: str | None = None) -> None:
    assert reject is not None, "the request was let through"
    assert reject.status == 401
    body = json.loads(reject.body)
    assert body == {"error": {"message": message, "type": "authentication_error", "code": "invalid_api_key"}}
    assert reject.response_headers()["www-authenticate"] == (TOKEN_CHALLENGE if token else CHALLENGE)
    if presented:
        assert presented not in reject.body.decode()
        assert all(presented not in value for value in reject.response_headers().values())


def replace_file(path: Path, content: str | bytes) -> None:
    """Rotate the file as Kubernetes rotates a mounted Secret: a new file moved into place."""
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    staging.write_bytes(content.encode() if isinstance(content, str) else content)
    os.replace(staging, path)


def bearer(credential: str) -> dict[str, str]:
    return {"authorization": f"Bearer {credential}"}


# -- API keys -------------------------------------------------------------------------------------


KEYS = [
    {"consumer": "team-a", "sha256": sha256(KEY_A)},
    {"consumer": "team-a", "sha256": sha256(KEY_A2)},
    {"consumer": "team-b", "sha256": sha256(KEY_B).upper()},
]


async def test_a_valid_key_names_its_consumer_and_never_reaches_the_upstream(build):
    plugin = build(keys=KEYS)

    exchange, reject = await attempt(plugin, {**bearer(KEY_A), "x-other": "kept"})

    assert reject is None
    assert exchange.consumer == "team-a"
    assert "authorization" not in exchange.request.headers
    assert "authorization" in exchange.request.removed_headers
    assert exchange.request.headers["x-other"] == "kept"
    assert await consumer_of(plugin, bearer(KEY_A2)) == "team-a"  # one consumer, several keys
    assert await consumer_of(plugin, bearer(KEY_B)) == "team-b"  # digests are case-insensitive
    assert await consumer_of(plugin, {"authorization": f"bearer   {KEY_B}  "}) == "team-b"


@pytest.mark.parametrize(
    ("headers", "message", "presented"),
    [
        ({}, "missing API key: send Authorization: Bearer <API key>", None),
        (bearer("sk-wrong-key-000000000000"), "invalid API key", "sk-wrong-key-000000000000"),
        (bearer(KEY_A + "x"), "invalid API key", KEY_A + "x"),
        ({"authorization": f"Basic {KEY_A}"}, "missing API key: send Authorization: Bearer <API key>", KEY_A),
        ({"authorization": "Bearer   "}, "missing API key: send Authorization: Bearer <API key>", None),
        ({"x-api-key": KEY_A}, "missing API key: send Authorization: Bearer <API key>", KEY_A),
    ],
    ids=["missing", "wrong", "one-char-longer", "basic-scheme", "empty-bearer", "other-header"],
)
async def test_missing_and_invalid_keys_get_401_without_their_key_echoed(build, headers, message, presented):
    plugin = build(keys=KEYS)

    exchange, reject = await attempt(plugin, headers)

    assert_unauthenticated(reject, message, presented=presented)
    assert exchange.consumer is None


async def test_a_configured_header_carries_the_whole_key(build):
    plugin = build(header="X-API-Key", keys=KEYS)

    exchange, reject = await attempt(plugin, {"x-api-key": f" {KEY_B} ", "authorization": "Bearer upstream-ignored"})
    assert reject is None
    assert exchange.consumer == "team-b"
    assert "x-api-key" not in exchange.request.headers
    assert exchange.request.headers["authorization"] == "Bearer upstream-ignored"  # not a credential of ours

    _, reject = await attempt(plugin, bearer(KEY_A))
    assert_unauthenticated(reject, "missing API key: send it in the x-api-key header", presented=KEY_A)
    _, reject = await attempt(plugin, {"x-api-key": "Bearer " + KEY_A})
    assert_unauthenticated(reject, "invalid API key", presented=KEY_A)


async def test_a_keys_file_is_re_read_when_it_changes_and_a_broken_rewrite_keeps_the_old_keys(build, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pluginchain")
    keys_file = tmp_path / "keys.yaml"
    replace_file(keys_file, f"- {{consumer: team-a, sha256: {sha256(KEY_A)}}}\n")
    plugin = build(keys_file=str(keys_file))

    assert await consumer_of(plugin, bearer(KEY_A)) == "team-a"
    _, reject = await attempt(plugin, bearer(KEY_B))
    assert_unauthenticated(reject, "invalid API key", presented=KEY_B)

    # Rotated: the next request sees the new keys, the removed one is refused.
    replace_file(keys_file, json.dumps([{"consumer": "team-b", "sha256": sha256(KEY_B)}]))
    assert await consumer_of(plugin, bearer(KEY_B)) == "team-b"
    _, reject = await attempt(plugin, bearer(KEY_A))
    assert_unauthenticated(reject, "invalid API key", presented=KEY_A)

    # A broken rewrite keeps the keys held before, and is logged once, naming file and problem.
    replace_file(keys_file, f"- {{consumer: team-c, sha256: {sha256(KEY_A)[:40]}}}\n")
    for _ in range(3):
        assert await consumer_of(plugin, bearer(KEY_B)) == "team-b"
    [problem] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert str(keys_file) in problem.getMessage()
    assert "[0].sha256" in problem.getMessage() and "64 hexadecimal" in problem.getMessage()
    assert "keeping what it held before" in problem.getMessage()
    assert sha256(KEY_A)[:40] not in caplog.text

    replace_file(keys_file, "{not: [a list")
    assert await consumer_of(plugin, bearer(KEY_B)) == "team-b"
    assert "is not valid YAML or JSON at line" in caplog.text

    # Fixed: usable again (and said so).
    replace_file(keys_file, f"[{{consumer: team-a, sha256: {sha256(KEY_A)}}}]")
    assert await consumer_of(plugin, bearer(KEY_A)) == "team-a"
    assert "is usable again" in caplog.text


async def test_a_keys_file_edited_in_place_is_re_read_too(build, tmp_path):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps([{"consumer": "team-a", "sha256": sha256(KEY_A)}]))
    plugin = build(keys_file=str(keys_file))
    assert await consumer_of(plugin, bearer(KEY_A)) == "team-a"

    keys_file.write_text(json.dumps([{"consumer": "team-a", "sha256": sha256(KEY_A)}, {"consumer": "team-b", "sha256": sha256(KEY_B)}]))
    assert await consumer_of(plugin, bearer(KEY_B)) == "team-b"


async def test_a_missing_keys_file_starts_refusing_every_key_then_serves_once_it_appears(build, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pluginchain")
    keys_file = tmp_path / "secret" / "keys.yaml"
    plugin = build(keys_file=str(keys_file), keys=[{"consumer": "inline", "sha256": sha256(KEY_B)}])

    for _ in range(3):
        _, reject = await attempt(plugin, bearer(KEY_A))
        assert_unauthenticated(reject, "invalid API key", presented=KEY_A)
    assert await consumer_of(plugin, bearer(KEY_B)) == "inline"  # inline keys still count
    [problem] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert str(keys_file) in problem.getMessage() and "cannot be read" in problem.getMessage()

    keys_file.parent.mkdir()
    replace_file(keys_file, f"- consumer: team-a\n  sha256: {sha256(KEY_A)}\n")
    assert await consumer_of(plugin, bearer(KEY_A)) == "team-a"

    # Deleted: revoked, not remembered.
    keys_file.unlink()
    _, reject = await attempt(plugin, bearer(KEY_A))
    assert_unauthenticated(reject, "invalid API key")


async def test_keys_file_entries_are_judged_like_inline_ones(build, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pluginchain")
    keys_file = tmp_path / "keys.yaml"
    duplicate = [{"consumer": "a", "sha256": sha256(KEY_A)}, {"consumer": "b", "sha256": sha256(KEY_A)}]
    replace_file(keys_file, json.dumps(duplicate))
    plugin = build(keys_file=str(keys_file))

    _, reject = await attempt(plugin, bearer(KEY_A))

    assert_unauthenticated(reject, "invalid API key")
    assert "entry[1] has the same sha256 as entry[0]" in caplog.text


# -- the provider's credential --------------------------------------------------------------------


async def test_upstream_auth_replaces_the_clients_credential_with_the_providers_and_follows_its_file(build, tmp_path):
    value_file = tmp_path / "provider-key"
    replace_file(value_file, "sk-provider-one\n")
    plugin = build(keys=KEYS, upstream_auth={"value_file": str(value_file), "prefix": "Bearer "})

    exchange, reject = await attempt(plugin, bearer(KEY_A))
    assert reject is None
    assert exchange.request.headers["authorization"] == "Bearer sk-provider-one"
    assert exchange.request.set_headers == {"authorization": "Bearer sk-provider-one"}
    assert "authorization" not in exchange.request.removed_headers

    replace_file(value_file, "  sk-provider-two  \n")
    exchange, _ = await attempt(plugin, bearer(KEY_A))
    assert exchange.request.headers["authorization"] == "Bearer sk-provider-two"

    # An unauthenticated client learns nothing of the provider's credential.
    _, reject = await attempt(plugin, bearer("sk-nope"))
    assert_unauthenticated(reject, "invalid API key")
    assert "sk-provider" not in reject.body.decode() + json.dumps(reject.response_headers())


async def test_upstream_auth_in_another_header(build, tmp_path):
    value_file = tmp_path / "provider-key"
    replace_file(value_file, "provider-secret")
    plugin = build(header="x-api-key", keys=KEYS, upstream_auth={"header": "api-key", "value_file": str(value_file)})

    exchange, reject = await attempt(plugin, {"x-api-key": KEY_A})

    assert reject is None
    assert exchange.request.headers["api-key"] == "provider-secret"
    assert "x-api-key" not in exchange.request.headers


@pytest.mark.parametrize("content", [None, b"", b" \n", b"line-one\nline-two", b"\xff\xfe"], ids=["missing", "empty", "blank", "two-lines", "not-utf8"])
async def test_an_unusable_upstream_credential_fails_closed(build, tmp_path, caplog, content):
    caplog.set_level(logging.INFO, logger="pluginchain")
    value_file = tmp_path / "provider-key"
    if content is not None:
        replace_file(value_file, content)
    plugin = build(keys=KEYS, upstream_auth={"value_file": str(value_file), "prefix": "Bearer "})

    for _ in range(2):
        exchange, reject = await attempt(plugin, bearer(KEY_A))
        assert reject is not None and reject.status == 500
        assert json.loads(reject.body)["error"]["code"] == "upstream_credential_unavailable"
        assert exchange.consumer is None
    [problem] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert str(value_file) in problem.getMessage()
    assert "line-one" not in caplog.text

    replace_file(value_file, "sk-provider")
    exchange, reject = await attempt(plugin, bearer(KEY_A))
    assert reject is None and exchange.request.headers["authorization"] == "Bearer sk-provider"


# -- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "configure keys, keys_file or jwt"),
        ({"keys": []}, "configure keys, keys_file or jwt"),
        ({"keys": [{"consumer": "a", "sha256": KEY_A}]}, "sha256 must be the 64 hexadecimal characters"),
        ({"keys": [{"consumer": "a", "sha256": sha256(KEY_A)[:-1] + "g"}]}, "sha256 must be the 64 hexadecimal characters"),
        ({"keys": [{"consumer": "a", "sha256": sha256(KEY_A)}, {"consumer": "b", "sha256": sha256(KEY_A)}]},
         "keys[1] has the same sha256 as keys[0]"),
        ({"keys": [{"consumer": "a", "sha256": 1234}]}, "quote it in YAML"),
        ({"keys": [{"consumer": "", "sha256": sha256(KEY_A)}]}, "consumer must be 1 to 256 characters"),
        ({"keys": [{"consumer": "a\nb", "sha256": sha256(KEY_A)}]}, "consumer must be 1 to 256 characters"),
        ({"keys": [{"consumer": "a", "key": KEY_A}]}, "Field required"),
        ({"keys": KEYS, "header": "x api key"}, "header is not a valid header name"),
        ({"jwt": {"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": "/j"}, "header": "x-api-key"}, "header is where API keys come from"),
        ({"jwt": {"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": "/j", "algorithms": ["RS256", "none"]}},
         "algorithm 'none' is never allowed"),
        ({"jwt": {"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": "/j", "algorithms": ["NONE"]}}, "algorithm 'none' is never allowed"),
        ({"jwt": {"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": "/j", "algorithms": ["RS1"]}}, "unsupported algorithm 'RS1'"),
        ({"jwt": {"issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["HS256"]}}, "HS256 needs secret_file"),
        ({"jwt": {"issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["HS256"], "secret_file": "/s", "jwks_file": "/j"}},
         "jwks_file/jwks_url are only used by"),
        ({"jwt": {"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": "/j", "secret_file": "/s"}}, "secret_file is only used by HS256"),
        ({"jwt": {"issuer": ISSUER, "audiences": [AUDIENCE]}}, "RS256, ES256 needs the issuer's public keys"),
        ({"jwt": {"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": "/j", "jwks_url": "https://idp/jwks"}}, "not both"),
        ({"jwt": {"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_url": "ftp://idp/jwks"}}, "jwks_url must start with http:// or https://"),
        ({"jwt": {"issuer": ISSUER, "audiences": [], "jwks_file": "/j"}}, "at least 1 item"),
        ({"jwt": {"audiences": [AUDIENCE], "jwks_file": "/j"}}, "Field required"),
        ({"jwt": {"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_url": "https://idp/jwks", "jwks_refresh": "10s"}},
         "jwks_min_refresh must not be longer than jwks_refresh"),
        ({"jwt": {"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": "/j", "clock_skew": "-1s"}}, "not a duration"),
        ({"keys": KEYS, "upstream_auth": {"value_file": "/v", "prefix": "Bearer\n"}}, "prefix must not contain control characters"),
        ({"keys": KEYS, "upstream_auth": {"prefix": "Bearer "}}, "Field required"),
        ({"keys": KEYS, "realm": 'a"b'}, "realm must be non-empty"),
    ],
)
def test_config_errors_name_what_is_wrong(config, message):
    with pytest.raises(ValidationError) as info:
        Auth.Config.model_validate(config)
    messages = [error["msg"] for error in info.value.errors()]
    assert any(message in text for text in messages), messages
    assert KEY_A not in " ".join(messages)


def test_config_accepts_what_it_documents():
    config = Auth.Config.model_validate(
        {
            "header": "X-Api-Key",
            "keys": KEYS,
            "keys_file": "/secrets/keys.yaml",
            "jwt": {"issuer": ISSUER, "audiences": [AUDIENCE, "other"], "jwks_url": "https://idp.example/jwks.json",
                    "clock_skew": 0, "algorithms": ["RS256", "ES256", "HS256"], "secret_file": "/secrets/hs"},
            "upstream_auth": {"value_file": "/secrets/openai", "prefix": "Bearer "},
        }
    )
    assert config.header == "x-api-key"
    assert config.keys[2].sha256 == sha256(KEY_B)
    assert config.jwt is not None and config.jwt.clock_skew == 0.0 and config.jwt.jwks_min_refresh == 30.0


async def test_auth_never_fails_open_and_suspends_only_for_a_jwks_url(build, tmp_path):
    with pytest.raises(ValueError, match="must not fail open"):
        build(keys=KEYS, on_error="fail_open")
    assert Auth.supports_parallel is False and Auth.stages == frozenset({Stage.PRE_REQUEST})

    jwt_file = {"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": str(tmp_path / "jwks.json")}
    assert build(keys=KEYS).needs().suspends is False
    assert build(keys_file=str(tmp_path / "k"), jwt=jwt_file).needs().suspends is False
    assert build(jwt={**jwt_file, "jwks_file": None, "jwks_url": "http://127.0.0.1:9/jwks"}).needs().suspends is True


async def test_without_a_jwks_url_it_never_awaits(build, tmp_path):
    """What needs() promises: the engine drives such an instance to completion at once."""
    jwks_file = tmp_path / "jwks.json"
    replace_file(jwks_file, json.dumps(KeySet([rsa_key("k1")]).as_dict(private=False)))
    plugin = build(keys=KEYS, jwt={"issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": str(jwks_file)})

    for headers in (bearer(KEY_A), bearer(sign(rsa_key("k1"), claims())), bearer("sk-wrong"), {}):
        exchange = make_exchange(headers=headers)
        data = PluginData(Stage.PRE_REQUEST, exchange)
        coroutine = plugin.execute(PluginContext("c", "r", "auth", 0.0), data)
        with pytest.raises((StopIteration, Reject)):
            coroutine.send(None)
        coroutine.close()


# -- JWT ------------------------------------------------------------------------------------------


@functools.cache
def rsa_key(kid: str) -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": kid})


@functools.cache
def ec_key(kid: str) -> ECKey:
    return ECKey.generate_key("P-256", parameters={"kid": kid})


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "team-jwt", "iat": int(NOW), "exp": int(NOW) + 600}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(key: Any, payload: dict[str, Any], alg: str | None = None, kid: str | None | bool = True) -> str:
    alg = alg or {"RSA": "RS256", "EC": "ES256", "oct": "HS256"}[key.key_type]
    header: dict[str, Any] = {"alg": alg}
    if kid is True and key.kid:
        header["kid"] = key.kid
    elif isinstance(kid, str):
        header["kid"] = kid
    return jwt.encode(header, payload, key, algorithms=[alg])


def b64(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def unsigned(payload: dict[str, Any], alg: str = "none") -> str:
    return f"{b64({'alg': alg, 'typ': 'JWT'})}.{b64(payload)}."


def hs256_with_public_key(key: RSAKey, payload: dict[str, Any]) -> str:
    """The algorithm-confusion forgery: HS256 keyed with the issuer's public key (which joserfc
    refuses to sign with, so it is signed here by hand, as an attacker would)."""
    signing_input = f"{b64({'alg': 'HS256', 'kid': key.kid})}.{b64(payload)}"
    signature = hmac.new(key.as_pem(private=False), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def jwks_of(*keys: Any) -> dict[str, Any]:
    return dict(KeySet(list(keys)).as_dict(private=False))


@pytest.fixture
def jwks_file(tmp_path: Path) -> Path:
    path = tmp_path / "jwks.json"
    replace_file(path, json.dumps(jwks_of(rsa_key("rsa-1"), ec_key("ec-1"))))
    return path


def jwt_config(**overrides: Any) -> dict[str, Any]:
    return {"issuer": ISSUER, "audiences": [AUDIENCE, "second-audience"], **overrides}


@pytest.mark.parametrize("key", [rsa_key("rsa-1"), ec_key("ec-1")], ids=["RS256", "ES256"])
async def test_a_valid_jwt_names_its_consumer_and_is_removed(build, jwks_file, key):
    plugin = build(jwt=jwt_config(jwks_file=str(jwks_file)))
    token = sign(key, claims())

    exchange, reject = await attempt(plugin, bearer(token))

    assert reject is None
    assert exchange.consumer == "team-jwt"
    assert "authorization" not in exchange.request.headers
    assert await consumer_of(plugin, bearer(sign(key, claims(aud=["elsewhere", "second-audience"])))) == "team-jwt"
    assert await consumer_of(plugin, bearer(sign(key, claims(), kid=False))) == "team-jwt"  # no kid: every key is tried


@pytest.mark.parametrize("key", [rsa_key("rsa-1"), ec_key("ec-1")], ids=["RS256", "ES256"])
async def test_expiry_and_not_before_are_judged_with_the_skew_on_the_injected_clock(build, jwks_file, clock, key):
    plugin = build(jwt=jwt_config(jwks_file=str(jwks_file), clock_skew="30s"))
    token = sign(key, claims(exp=int(NOW) + 60))

    assert await consumer_of(plugin, bearer(token)) == "team-jwt"
    clock.advance(60 + 29)
    assert await consumer_of(plugin, bearer(token)) == "team-jwt"  # within the skew
    clock.advance(1)
    _, reject = await attempt(plugin, bearer(token))
    assert_unauthenticated(reject, "token expired", token=True, presented=token)

    clock.now = NOW
    early = sign(key, claims(nbf=int(NOW) + 100, iat=int(NOW) + 100))
    _, reject = await attempt(plugin, bearer(early))
    assert_unauthenticated(reject, "invalid token", token=True, presented=early)
    clock.advance(70)
    assert await consumer_of(plugin, bearer(early)) == "team-jwt"


@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        pytest.param(lambda: sign(rsa_key("rsa-1"), claims(aud="someone-else")), "aud names none", id="wrong-audience"),
        pytest.param(lambda: sign(rsa_key("rsa-1"), claims(aud=None)), "aud names none", id="no-audience"),
        pytest.param(lambda: sign(rsa_key("rsa-1"), claims(aud=[])), "aud names none", id="empty-audience-list"),
        pytest.param(lambda: sign(rsa_key("rsa-1"), claims(iss="https://evil.example")), "wrong or no iss", id="wrong-issuer"),
        pytest.param(lambda: sign(rsa_key("rsa-1"), claims(iss=None)), "wrong or no iss", id="no-issuer"),
        pytest.param(lambda: sign(rsa_key("rsa-1"), claims(exp=None)), "no exp", id="no-exp"),
        pytest.param(lambda: sign(rsa_key("rsa-1"), claims(exp="tomorrow")), "no exp", id="exp-not-a-number"),
        pytest.param(lambda: sign(rsa_key("rsa-1"), claims(iat=int(NOW) + 3600)), "issued in the future", id="issued-in-the-future"),
        pytest.param(lambda: sign(rsa_key("rsa-1"), claims(sub=None)), "not a usable consumer", id="no-consumer"),
        pytest.param(lambda: sign(rsa_key("rsa-1"), claims(sub=42)), "not a usable consumer", id="consumer-not-a-string"),
        pytest.param(lambda: sign(rsa_key("forged"), claims(), kid="rsa-1"), "bad signature", id="bad-signature"),
        pytest.param(lambda: sign(ec_key("forged"), claims(), kid="ec-1"), "bad signature", id="bad-signature-ec"),
        pytest.param(lambda: sign(rsa_key("rsa-1"), claims())[:-4] + "AAAA", "bad signature", id="tampered-signature"),
        pytest.param(lambda: sign(rsa_key("forged"), claims(), kid=False), "bad signature", id="no-kid-and-no-key-fits"),
        pytest.param(lambda: sign(rsa_key("rsa-1"), claims(), alg="RS512"), "'RS512' is not allowed", id="algorithm-not-allowed"),
        pytest.param(lambda: sign(ec_key("ec-1"), claims(), kid="rsa-1"), "bad signature", id="key-of-another-type"),
        pytest.param(lambda: sign(rsa_key("unknown"), claims()), "no key with its kid", id="unknown-kid"),
        pytest.param(lambda: unsigned(claims()), "alg none", id="alg-none"),
        pytest.param(lambda: unsigned(claims(), alg="None"), "alg none", id="alg-None"),
        pytest.param(lambda: unsigned(claims(), alg="RS256"), "bad signature", id="empty-signature"),
        pytest.param(lambda: hs256_with_public_key(rsa_key("rsa-1"), claims()), "'HS256' is not allowed", id="hs256-with-the-public-key"),
        pytest.param(lambda: "not-a-jwt", "not a JWS compact serialization", id="not-a-jwt"),
        pytest.param(lambda: "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.", "bad signature", id="no-signature"),
        pytest.param(lambda: "bm90IGpzb24.bm90IGpzb24.c2ln", "unreadable header", id="header-not-json"),
    ],
)
async def test_invalid_jwts_get_401_invalid_token(build, jwks_file, make_token, reason, caplog):
    caplog.set_level(logging.DEBUG)
    plugin = build(jwt=jwt_config(jwks_file=str(jwks_file), algorithms=["RS256", "ES256"]))
    token = make_token()

    exchange, reject = await attempt(plugin, bearer(token))

    assert_unauthenticated(reject, "invalid token", token=True, presented=token)
    assert exchange.consumer is None
    [refusal] = [r.getMessage() for r in caplog.records if "auth: refused" in r.getMessage()]
    assert reason in refusal, refusal
    assert token not in caplog.text


async def test_unregistered_header_parameters_are_ignored_unless_critical(build, jwks_file):
    plugin = build(jwt=jwt_config(jwks_file=str(jwks_file)))
    key = rsa_key("rsa-1")
    # An issuer that knows the parameter may sign with it, even marked critical.
    issuer = jws.JWSRegistry(header_registry={"x-idp-hint": HeaderParameter("a hint", "str")})

    relaxed = jwt.encode({"alg": "RS256", "kid": "rsa-1", "x-idp-hint": "a"}, claims(), key, registry=issuer)
    assert await consumer_of(plugin, bearer(relaxed)) == "team-jwt"
    critical = jwt.encode({"alg": "RS256", "kid": "rsa-1", "x-idp-hint": "a", "crit": ["x-idp-hint"]}, claims(), key, registry=issuer)
    _, reject = await attempt(plugin, bearer(critical))
    assert_unauthenticated(reject, "invalid token", token=True)


async def test_the_consumer_may_come_from_another_claim(build, jwks_file):
    plugin = build(jwt=jwt_config(jwks_file=str(jwks_file), consumer_claim="client_id"))

    assert await consumer_of(plugin, bearer(sign(rsa_key("rsa-1"), claims(client_id="billing-service")))) == "billing-service"
    _, reject = await attempt(plugin, bearer(sign(rsa_key("rsa-1"), claims())))
    assert_unauthenticated(reject, "invalid token", token=True)


async def test_a_missing_bearer_token_gets_the_plain_challenge(build, jwks_file):
    plugin = build(jwt=jwt_config(jwks_file=str(jwks_file)))

    _, reject = await attempt(plugin, {})
    assert_unauthenticated(reject, "missing bearer token: send Authorization: Bearer <token>")


async def test_with_keys_and_jwt_a_jwt_shaped_bearer_is_verified_as_one_and_anything_else_as_a_key(build, jwks_file):
    plugin = build(keys=KEYS, jwt=jwt_config(jwks_file=str(jwks_file)))

    assert await consumer_of(plugin, bearer(sign(rsa_key("rsa-1"), claims()))) == "team-jwt"
    assert await consumer_of(plugin, bearer(KEY_A)) == "team-a"
    _, reject = await attempt(plugin, bearer(sign(rsa_key("rsa-1"), claims(exp=int(NOW) - 100))))
    assert_unauthenticated(reject, "token expired", token=True)
    _, reject = await attempt(plugin, bearer("sk-unknown"))
    assert_unauthenticated(reject, "invalid API key")
    _, reject = await attempt(plugin, {})
    assert_unauthenticated(reject, "missing API key or token: send Authorization: Bearer <API key or token>")

    # API keys in their own header, JWTs as bearer tokens; neither credential goes upstream.
    plugin = build(header="x-api-key", keys=KEYS, jwt=jwt_config(jwks_file=str(jwks_file)))
    exchange, reject = await attempt(plugin, {"x-api-key": KEY_B, **bearer(sign(ec_key("ec-1"), claims()))})
    assert reject is None and exchange.consumer == "team-jwt"
    assert "x-api-key" not in exchange.request.headers and "authorization" not in exchange.request.headers
    exchange, reject = await attempt(plugin, {"x-api-key": KEY_B})
    assert reject is None and exchange.consumer == "team-b"


async def test_a_jwks_file_is_re_read_when_it_changes(build, jwks_file, caplog):
    caplog.set_level(logging.INFO, logger="pluginchain")
    plugin = build(jwt=jwt_config(jwks_file=str(jwks_file)))
    rotated = sign(rsa_key("rsa-2"), claims())

    _, reject = await attempt(plugin, bearer(rotated))
    assert_unauthenticated(reject, "invalid token", token=True)

    replace_file(jwks_file, json.dumps(jwks_of(rsa_key("rsa-2"))))
    assert await consumer_of(plugin, bearer(rotated)) == "team-jwt"

    replace_file(jwks_file, '{"keys": [')  # broken: the keys held before stay
    assert await consumer_of(plugin, bearer(rotated)) == "team-jwt"
    assert f"JWKS file {jwks_file} is not JSON" in caplog.text


async def test_hs256_with_a_secret_file_that_rotates(build, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pluginchain")
    secret_file = tmp_path / "hs-secret"
    replace_file(secret_file, SECRET + b"\n")
    plugin = build(jwt=jwt_config(algorithms=["HS256"], secret_file=str(secret_file)))
    key = OctKey.import_key(SECRET)

    token = sign(key, claims())
    assert await consumer_of(plugin, bearer(token)) == "team-jwt"
    _, reject = await attempt(plugin, bearer(sign(OctKey.import_key(b"x" * 40), claims())))
    assert_unauthenticated(reject, "invalid token", token=True)
    _, reject = await attempt(plugin, bearer(sign(key, claims(), alg="HS512")))
    assert_unauthenticated(reject, "invalid token", token=True)

    new_secret = b"a-new-shared-secret-that-is-also-32-bytes-long"
    replace_file(secret_file, new_secret)
    _, reject = await attempt(plugin, bearer(token))
    assert_unauthenticated(reject, "invalid token", token=True)
    assert await consumer_of(plugin, bearer(sign(OctKey.import_key(new_secret), claims()))) == "team-jwt"

    replace_file(secret_file, b"too-short")
    _, reject = await attempt(plugin, bearer(sign(OctKey.import_key(b"too-short" * 4), claims())))
    assert_unauthenticated(reject, "invalid token", token=True)
    assert f"JWT secret file {secret_file} holds fewer than 32 bytes" in caplog.text
    assert "too-short" not in caplog.text


async def test_hs_keys_come_only_from_the_secret_file_even_beside_a_jwks(build, jwks_file, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    secret_file = tmp_path / "hs-secret"
    replace_file(secret_file, SECRET)
    plugin = build(jwt=jwt_config(jwks_file=str(jwks_file), algorithms=["RS256", "HS256"], secret_file=str(secret_file)))

    assert await consumer_of(plugin, bearer(sign(rsa_key("rsa-1"), claims()))) == "team-jwt"
    assert await consumer_of(plugin, bearer(sign(OctKey.import_key(SECRET), claims()))) == "team-jwt"
    # The algorithm-confusion forgery: HS256 keyed with the RSA public key the JWKS publishes.
    forged = hs256_with_public_key(rsa_key("rsa-1"), claims())
    _, reject = await attempt(plugin, bearer(forged))
    assert_unauthenticated(reject, "invalid token", token=True, presented=forged)
    assert "bad signature" in caplog.records[-1].getMessage()


# -- jwks_url -------------------------------------------------------------------------------------


class JwksServer:
    """Serves a JWKS the test may rotate, answer with an error, or hold back; counts requests."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = jwks_of(rsa_key("url-1"))
        self.status = 200
        self.requests = 0
        self.hold: asyncio.Event | None = None
        self.url = ""
        self._arrived = asyncio.Condition()

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        async with self._arrived:
            self._arrived.notify_all()
        if self.hold is not None:
            await self.hold.wait()
        if self.status != 200:
            return web.Response(status=self.status, text="unavailable")
        return web.json_response(self.jwks)

    async def wait_for_requests(self, count: int) -> None:
        async with asyncio.timeout(5), self._arrived:
            await self._arrived.wait_for(lambda: self.requests >= count)


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", server.handle)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    try:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(runner, sock)
        await site.start()
        server.url = f"http://127.0.0.1:{sock.getsockname()[1]}/.well-known/jwks.json"
        yield server
    finally:
        if server.hold is not None:
            server.hold.set()
        await runner.cleanup()


def url_config(server: JwksServer, **overrides: Any) -> dict[str, Any]:
    return jwt_config(jwks_url=server.url, jwks_min_refresh="30s", jwks_refresh="5m", **overrides)


async def test_an_unknown_kid_fetches_the_jwks_again_once_and_then_succeeds(build, jwks_server, clock):
    plugin = build(jwt=url_config(jwks_server))

    assert await consumer_of(plugin, bearer(sign(rsa_key("url-1"), claims()))) == "team-jwt"
    assert await consumer_of(plugin, bearer(sign(rsa_key("url-1"), claims()))) == "team-jwt"
    assert jwks_server.requests == 1  # fetched on first use, then cached

    jwks_server.jwks = jwks_of(ec_key("url-2"))  # the issuer rotates its key
    clock.advance(30)
    rotated = sign(ec_key("url-2"), claims(iat=int(clock.now), exp=int(clock.now) + 600))
    assert await consumer_of(plugin, bearer(rotated)) == "team-jwt"
    assert jwks_server.requests == 2
    assert await consumer_of(plugin, bearer(rotated)) == "team-jwt"
    assert jwks_server.requests == 2

    # The retired key is unknown now, and within min-refresh that costs no fetch.
    _, reject = await attempt(plugin, bearer(sign(rsa_key("url-1"), claims(iat=int(clock.now), exp=int(clock.now) + 600))))
    assert_unauthenticated(reject, "invalid token", token=True)
    assert jwks_server.requests == 2


async def test_a_flood_of_unknown_kids_fetches_at_most_once_per_min_refresh(build, jwks_server, clock):
    plugin = build(jwt=url_config(jwks_server))
    assert await consumer_of(plugin, bearer(sign(rsa_key("url-1"), claims()))) == "team-jwt"
    assert jwks_server.requests == 1

    def flood_tokens(count: int) -> list[str]:
        return [sign(rsa_key("url-1"), claims(), kid=f"made-up-{uuid.uuid4().hex}") for _ in range(count)]

    async def flood(tokens: list[str]) -> list[Reject | None]:
        results = await asyncio.gather(*(attempt(plugin, bearer(token)) for token in tokens))
        return [reject for _, reject in results]

    # Within min-refresh of the first fetch: no fetch at all.
    rejects = await flood(flood_tokens(50))
    assert all(r is not None and r.status == 401 for r in rejects)
    assert jwks_server.requests == 1

    # Past it: one fetch, which every request of the flood waits for.
    clock.advance(30)
    jwks_server.hold = asyncio.Event()
    pending = asyncio.ensure_future(flood(flood_tokens(50)))
    await jwks_server.wait_for_requests(2)
    await asyncio.sleep(0.05)  # the rest of the flood queues up behind that fetch
    jwks_server.hold.set()
    jwks_server.hold = None
    rejects = await pending
    assert all(r is not None and r.status == 401 for r in rejects)
    assert jwks_server.requests == 2

    clock.advance(29)
    await flood(flood_tokens(50))
    assert jwks_server.requests == 2
    clock.advance(1)
    await flood(flood_tokens(50))
    await flood(flood_tokens(50))
    assert jwks_server.requests == 3

    # Known keys never waited for any of it.
    assert await consumer_of(plugin, bearer(sign(rsa_key("url-1"), claims(iat=int(clock.now), exp=int(clock.now) + 60)))) == "team-jwt"
    assert jwks_server.requests == 3


async def test_concurrent_first_requests_share_one_fetch_and_the_jwks_is_refreshed_in_the_background(build, jwks_server, clock):
    plugin = build(jwt=url_config(jwks_server))
    jwks_server.hold = asyncio.Event()
    token = sign(rsa_key("url-1"), claims(exp=int(NOW) + 3600))

    pending = asyncio.gather(*(consumer_of(plugin, bearer(token)) for _ in range(20)))
    await jwks_server.wait_for_requests(1)
    jwks_server.hold.set()
    jwks_server.hold = None
    assert await pending == ["team-jwt"] * 20
    assert jwks_server.requests == 1

    # Every jwks_refresh the keys are fetched again while the ones held keep serving.
    jwks_server.jwks = jwks_of(rsa_key("url-1"), ec_key("url-2"))
    clock.advance(300)
    assert await consumer_of(plugin, bearer(token)) == "team-jwt"
    await jwks_server.wait_for_requests(2)
    # A token of the new key waits for that fetch if it has not stored its keys yet.
    assert await consumer_of(plugin, bearer(sign(ec_key("url-2"), claims(iat=int(clock.now), exp=int(clock.now) + 60)))) == "team-jwt"
    assert jwks_server.requests == 2


async def test_a_jwks_url_that_never_answered_makes_jwts_503_until_it_does(build, jwks_server, clock, caplog):
    caplog.set_level(logging.INFO, logger="pluginchain")
    jwks_server.status = 500
    plugin = build(keys=KEYS, jwt=url_config(jwks_server))
    token = sign(rsa_key("url-1"), claims(exp=int(NOW) + 3600))

    for _ in range(3):
        _, reject = await attempt(plugin, bearer(token))
        assert reject is not None and reject.status == 503
        assert json.loads(reject.body)["error"]["code"] == "authentication_unavailable"
        assert 1 <= int(reject.response_headers()["retry-after"]) <= 30
    assert jwks_server.requests == 1  # failures are retried no sooner than min-refresh
    assert await consumer_of(plugin, bearer(KEY_A)) == "team-a"  # API keys do not depend on it
    [problem] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert jwks_server.url in problem.getMessage() and "HTTP 500" in problem.getMessage()

    jwks_server.status = 200
    clock.advance(30)
    assert await consumer_of(plugin, bearer(token)) == "team-jwt"
    assert jwks_server.requests == 2
    assert "is usable again" in caplog.text

    # Later failures keep the keys fetched before.
    jwks_server.status = 503
    clock.advance(300)
    assert await consumer_of(plugin, bearer(token)) == "team-jwt"
    for _ in range(200):
        if "keeping the 1 keys fetched before" in caplog.text:
            break
        await asyncio.sleep(0.01)
    assert "keeping the 1 keys fetched before" in caplog.text
    assert await consumer_of(plugin, bearer(token)) == "team-jwt"


async def test_an_unreachable_jwks_url_is_unavailable_not_a_crash(build, clock):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    plugin = build(jwt=jwt_config(jwks_url=f"http://127.0.0.1:{port}/jwks", jwks_timeout="1s"))

    _, reject = await attempt(plugin, bearer(sign(rsa_key("url-1"), claims())))

    assert reject is not None and reject.status == 503


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
async def test_an_unreachable_jwks_url_is_one_line_naming_it_and_the_error_with_a_traceback_only_at_debug(build, clock, caplog, level):
    caplog.set_level(level, logger="pluginchain")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}/jwks"
    plugin = build(jwt=jwt_config(jwks_url=endpoint + "?client_secret=s3cret", jwks_timeout="1s", jwks_min_refresh="30s"))

    for _ in range(3):  # three fetches that fail the same way
        clock.advance(30)
        _, reject = await attempt(plugin, bearer(sign(rsa_key("url-1"), claims())))
        assert reject is not None and reject.status == 503

    [line] = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert line.getMessage().startswith(f"JWKS from {endpoint} cannot be fetched (ConnectError: ")
    assert line.getMessage().endswith("); JWTs are refused until it can be fetched")
    assert bool(line.exc_info) == (level == logging.DEBUG)
    assert "s3cret" not in caplog.text


# -- secrets stay secret --------------------------------------------------------------------------


async def test_no_credential_ever_reaches_a_log_record(build, jwks_server, tmp_path, clock, caplog):
    caplog.set_level(logging.DEBUG)
    keys_file = tmp_path / "keys.yaml"
    replace_file(keys_file, json.dumps([{"consumer": "file", "sha256": sha256(KEY_B)}]))
    value_file = tmp_path / "provider"
    replace_file(value_file, "sk-provider-credential-xyz")
    plugin = build(keys=KEYS, keys_file=str(keys_file), jwt=url_config(jwks_server), upstream_auth={"value_file": str(value_file)})

    good = sign(rsa_key("url-1"), claims())
    forged = sign(rsa_key("forged"), claims(), kid="url-1")
    expired = sign(rsa_key("url-1"), claims(exp=int(NOW) - 100))
    unknown = sign(rsa_key("url-1"), claims(), kid="nobody")
    wrong_key = "sk-wrong-but-plausible-key-123"
    presented = [KEY_A, KEY_B, wrong_key, good, forged, expired, unknown]
    for credential in presented:
        await attempt(plugin, bearer(credential))
    replace_file(keys_file, "{broken")
    replace_file(value_file, "")
    for credential in presented:
        await attempt(plugin, bearer(credential))
    jwks_server.status = 500
    clock.advance(3600)
    await attempt(plugin, bearer(unknown))

    assert caplog.records, "the test should have produced log lines"
    secrets = [*presented, "sk-provider-credential-xyz", sha256(KEY_A), sha256(KEY_B)]
    for record in caplog.records:
        text = record.getMessage() + repr(record.args) + repr(getattr(record, "exc_text", ""))
        for secret in secrets:
            assert secret not in text, f"{record.name}: {record.getMessage()}"
            # Not even a recognisable part of a token (its signature).
            assert secret.rsplit(".", 1)[-1] not in text
