"""The built-in ``auth``: who is calling, from an API key or a JWT, before anything else runs.

On success it establishes the consumer (``data.set_consumer``: ``key: consumer`` in the
limiters, ``ctx.consumer`` in later plugins), removes the client's credential from the request,
and, with ``upstream_auth``, sets the provider's own credential from a file. Otherwise the
client gets 401 ``{"error": {"type": "authentication_error", "code": "invalid_api_key"}}`` with
``www-authenticate: Bearer realm="pluginchain"`` (plus ``error="invalid_token"`` for a rejected
JWT, as RFC 6750 has it). The message says missing, invalid or expired, never which keys exist
or what exactly was wrong (that goes to the DEBUG log, without the credential).

**API keys** come as ``Authorization: Bearer <key>`` or, with ``header: x-api-key``, as the whole
value of that header. They are configured only as SHA-256 digests with a consumer name, inline
(``keys``) or in a file (``keys_file``, a mounted Secret holding a YAML or JSON list of
``{consumer, sha256}``). The presented key's SHA-256 is compared in constant time with every
configured digest, all of them every time. One consumer may have several keys; one digest may
not belong to two entries. Inline keys and the file's keys both count (inline ones first).

**JWTs** (``jwt:``) are verified with joserfc: the signature with a key of ``jwks_file``,
``jwks_url`` (HS256/384/512: of ``secret_file``), the algorithm against ``algorithms`` (``none``
never), then ``iss``, ``aud`` (one of ``audiences``), ``exp`` (required), ``nbf`` and ``iat``
with ``clock_skew``; the consumer is the ``consumer_claim`` (``sub``). With both keys and
``jwt``, a bearer token shaped like a JWT (three dot-separated base64url parts) is verified as
one, anything else as an API key.

Files (``keys_file``, ``jwks_file``, ``secret_file``, ``upstream_auth.value_file``) are read on
first use, not when the plan is built (``pluginchain validate`` works without them), and re-read
whenever they change (one ``stat`` per request; see :mod:`pluginchain.plugins._secrets`). A
problem is logged once, naming the file and the problem, never the contents:

- ``keys_file``/``jwks_file`` that do not parse keep the keys they held before (a broken
  rotation locks nobody out); missing or unreadable ones hold no keys: every credential they
  would have checked is refused with 401, as for a wrong key (the sidecar starts all the same);
- ``secret_file`` missing, unreadable or shorter than 32 bytes: HS tokens are refused with 401;
- ``upstream_auth.value_file`` missing, unreadable, empty or holding a line break: every
  authenticated request is refused with 500 ``upstream_credential_unavailable`` (fail closed,
  never forwarded without the provider's credential);
- ``jwks_url`` is fetched on first use (with ``jwks_timeout``), refreshed in the background
  every ``jwks_refresh``, and fetched again for a token whose ``kid`` it does not know, at most
  once per ``jwks_min_refresh`` however many such tokens arrive (they wait for that one fetch).
  A failed fetch keeps the keys fetched before; with none yet, JWTs are refused with 503
  ``authentication_unavailable`` (the client may retry; its token may be fine).

The plugin never fails open: it raises nothing a chain's ``on_error`` would handle, and an entry
with ``on_error: fail_open`` is refused when the plan is built (a timeout would otherwise let
unauthenticated requests through). Credentials, tokens, digests and file contents are never
logged and never in metrics.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import re
import time
from collections.abc import Callable, Collection, Mapping
from typing import Annotated, Any, ClassVar, TypeGuard
from urllib.parse import urlsplit, urlunsplit

import httpx
import yaml
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import Key, KeySet, OctKey
from joserfc.jws import JWSRegistry
from pydantic import BaseModel, BeforeValidator, Field, PlainSerializer, ValidationError, WithJsonSchema, field_validator, model_validator

from pluginchain._api.durations import Duration, format_duration, parse_duration
from pluginchain._api.plugin import (
    InstanceSettings,
    Needs,
    Plugin,
    PluginConfig,
    PluginContext,
    PluginData,
    Reject,
    Stage,
)
from pluginchain.plugins._call_failures import describe_error, traceback_if_debug
from pluginchain.plugins._http import check_http_url
from pluginchain.plugins._secrets import SecretFile, SecretFileProblem

logger = logging.getLogger("pluginchain.plugins.auth")

ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "Ed25519"}
)
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
SUPPORTED_ALGORITHMS = ASYMMETRIC_ALGORITHMS | HMAC_ALGORITHMS

MIN_SECRET_BYTES = 32
"""Shortest ``secret_file`` accepted for HS algorithms: 256 bits (RFC 7518 3.2 asks for at least
the hash's size)."""

MAX_JWKS_BYTES = 1 << 20
"""Largest JWKS read from ``jwks_url``."""

MAX_JWT_HEADER_BYTES = 8192
"""Largest JWT header (base64url) read; joserfc's default, 512, leaves out an ``x5c`` chain."""

MAX_CONSUMER_CHARS = 256

_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


# --- Config ------------------------------------------------------------------------------------


def _check_consumer(value: str) -> str:
    if not value or len(value) > MAX_CONSUMER_CHARS or _CONTROL.search(value):
        raise ValueError(f"consumer must be 1 to {MAX_CONSUMER_CHARS} characters without control characters")
    return value


def _check_header_name(value: str, field: str) -> str:
    if not _HEADER_NAME.fullmatch(value):
        raise ValueError(f"{field} is not a valid header name: {value!r}")
    return value.lower()


def _check_path(value: str, field: str) -> str:
    if not value.strip():
        raise ValueError(f"{field} must name a file")
    return value


class ApiKey(PluginConfig):
    """One API key: who it belongs to, and the SHA-256 of the key (never the key itself)."""

    consumer: str
    """The consumer the key authenticates; several keys may share one."""

    sha256: str
    """The key's SHA-256 as 64 hexadecimal characters (``printf %s "$KEY" | sha256sum``)."""

    @field_validator("consumer")
    @classmethod
    def _consumer_is_printable(cls, value: str) -> str:
        return _check_consumer(value)

    @field_validator("sha256", mode="before")
    @classmethod
    def _sha256_is_text(cls, value: object) -> object:
        if not isinstance(value, str):
            raise ValueError("sha256 must be a string of 64 hexadecimal characters; quote it in YAML (a digest of digits reads as a number)")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256_is_a_digest(cls, value: str) -> str:
        digest = value.strip().lower()
        if not _SHA256_HEX.fullmatch(digest):
            # The length only: a key pasted here by mistake must not reach an error message.
            raise ValueError(
                "sha256 must be the 64 hexadecimal characters of a SHA-256 digest "
                f"(printf %s \"$KEY\" | sha256sum), got {len(value)} characters"
            )
        return digest


def _check_no_duplicate_digests(keys: tuple[ApiKey, ...], where: str) -> None:
    seen: dict[str, int] = {}
    for index, key in enumerate(keys):
        if key.sha256 in seen:
            raise ValueError(f"{where}[{index}] has the same sha256 as {where}[{seen[key.sha256]}]: a key belongs to one consumer")
        seen[key.sha256] = index


def _skew(value: object) -> float:
    """A duration that may be 0."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return 0.0
    if isinstance(value, str) and re.fullmatch(r"\s*0+(\.0+)?\s*(ms|s|m|h|d)?\s*", value):
        return 0.0
    return parse_duration(value)


ClockSkew = Annotated[
    float,
    BeforeValidator(_skew),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer"}]}),
]
"""A duration that may be 0 (``"0s"``, ``0``)."""


class JwtConfig(PluginConfig):
    """How bearer JWTs are verified."""

    issuer: str = Field(min_length=1)
    """The ``iss`` every token must carry, exactly."""

    audiences: tuple[str, ...] = Field(min_length=1)
    """The token's ``aud`` (a string or a list) must contain one of these."""

    algorithms: tuple[str, ...] = ("RS256", "ES256")
    """Signature algorithms accepted: RS256/384/512, PS256/384/512, ES256/384/512, Ed25519 (keys
    from ``jwks_file`` or ``jwks_url``), HS256/384/512 (only with ``secret_file``). ``none`` is
    never accepted. Default RS256 and ES256."""

    jwks_file: str | None = None
    """A JWKS (``{"keys": [...]}``) in a file, e.g. a mounted ConfigMap; re-read when it changes."""

    jwks_url: str | None = None
    """Where the issuer publishes its JWKS (``https://idp.example/.well-known/jwks.json``)."""

    jwks_refresh: Duration = 300.0
    """How often ``jwks_url`` is fetched again, in the background. Default 5m."""

    jwks_min_refresh: Duration = 30.0
    """Least time between two fetches of ``jwks_url``: an unknown ``kid`` fetches it again at most
    this often, and a failed fetch is retried no sooner. Default 30s."""

    jwks_timeout: Duration = 2.0
    """Limit of one fetch of ``jwks_url``. Default 2s."""

    secret_file: str | None = None
    """The shared secret of HS256/384/512 (raw bytes, surrounding whitespace stripped, at least
    32 bytes), e.g. a mounted Secret; re-read when it changes."""

    clock_skew: ClockSkew = 30.0
    """Tolerance for ``exp``, ``nbf`` and ``iat`` against this clock (a duration, ``0`` allowed).
    Default 30s."""

    consumer_claim: str = Field("sub", min_length=1)
    """The claim naming the consumer (a non-empty string). Default ``sub``."""

    @field_validator("algorithms")
    @classmethod
    def _algorithms_are_supported(cls, algorithms: tuple[str, ...]) -> tuple[str, ...]:
        if not algorithms:
            raise ValueError("algorithms must name at least one algorithm, e.g. [RS256]")
        for name in algorithms:
            if name.strip().lower() == "none":
                raise ValueError("algorithm 'none' is never allowed: it accepts unsigned tokens")
            if name not in SUPPORTED_ALGORITHMS:
                raise ValueError(f"unsupported algorithm {name!r}; expected some of {', '.join(sorted(SUPPORTED_ALGORITHMS))}")
        return tuple(dict.fromkeys(algorithms))

    @field_validator("jwks_url")
    @classmethod
    def _jwks_url_is_http(cls, url: str | None) -> str | None:
        return None if url is None else check_http_url(url, "jwks_url")

    @field_validator("jwks_file", "secret_file")
    @classmethod
    def _file_is_named(cls, value: str | None) -> str | None:
        return None if value is None else _check_path(value, "a file setting")

    @model_validator(mode="after")
    def _keys_match_algorithms(self) -> JwtConfig:
        hmac_algs = [a for a in self.algorithms if a in HMAC_ALGORITHMS]
        asymmetric = [a for a in self.algorithms if a in ASYMMETRIC_ALGORITHMS]
        if hmac_algs and self.secret_file is None:
            raise ValueError(f"{', '.join(hmac_algs)} needs secret_file (the shared secret); HS keys never come from a JWKS")
        if self.secret_file is not None and not hmac_algs:
            raise ValueError("secret_file is only used by HS256, HS384 or HS512; add one to algorithms")
        if self.jwks_file is not None and self.jwks_url is not None:
            raise ValueError("set jwks_file or jwks_url, not both")
        has_jwks = self.jwks_file is not None or self.jwks_url is not None
        if asymmetric and not has_jwks:
            raise ValueError(f"{', '.join(asymmetric)} needs the issuer's public keys: set jwks_file or jwks_url")
        if has_jwks and not asymmetric:
            raise ValueError("jwks_file/jwks_url are only used by RS, PS, ES or Ed25519 algorithms; add one to algorithms")
        if self.jwks_min_refresh > self.jwks_refresh:
            raise ValueError("jwks_min_refresh must not be longer than jwks_refresh")
        return self


class UpstreamAuthConfig(PluginConfig):
    """The provider's credential, set on every authenticated request."""

    header: str = "authorization"
    """Header it goes in. Default ``authorization``."""

    value_file: str
    """File holding the credential (a mounted Secret); whitespace around it is stripped."""

    prefix: str = ""
    """Put before the file's contents, e.g. ``"Bearer "``. Default none."""

    @field_validator("header")
    @classmethod
    def _header_is_a_name(cls, value: str) -> str:
        return _check_header_name(value, "upstream_auth.header")

    @field_validator("value_file")
    @classmethod
    def _file_is_named(cls, value: str) -> str:
        return _check_path(value, "value_file")

    @field_validator("prefix")
    @classmethod
    def _prefix_fits_a_header(cls, value: str) -> str:
        if _CONTROL.search(value):
            raise ValueError("prefix must not contain control characters or line breaks")
        return value


class AuthConfig(PluginConfig):
    """Config of ``auth``: at least one of ``keys``, ``keys_file`` or ``jwt``."""

    header: str | None = None
    """Where API keys come from: ``authorization`` (``Authorization: Bearer <key>``, the default)
    or another header whose whole value is the key (``x-api-key``). JWTs always come as
    ``Authorization: Bearer``."""

    keys: tuple[ApiKey, ...] = ()
    """API keys as ``{consumer, sha256}``."""

    keys_file: str | None = None
    """A file (a mounted Secret) holding more keys as a YAML or JSON list of ``{consumer, sha256}``."""

    jwt: JwtConfig | None = None
    """Accept JWTs, verified as configured here."""

    upstream_auth: UpstreamAuthConfig | None = None
    """Set the provider's credential from a file on every authenticated request."""

    realm: str = "pluginchain"
    """The realm of ``www-authenticate``. Default ``pluginchain``."""

    @field_validator("header")
    @classmethod
    def _header_is_a_name(cls, value: str | None) -> str | None:
        return None if value is None else _check_header_name(value, "header")

    @field_validator("keys_file")
    @classmethod
    def _file_is_named(cls, value: str | None) -> str | None:
        return None if value is None else _check_path(value, "keys_file")

    @field_validator("realm")
    @classmethod
    def _realm_is_quotable(cls, value: str) -> str:
        if not value or '"' in value or "\\" in value or _CONTROL.search(value):
            raise ValueError("realm must be non-empty, without quotes, backslashes or control characters")
        return value

    @model_validator(mode="after")
    def _something_authenticates(self) -> AuthConfig:
        has_keys = bool(self.keys) or self.keys_file is not None
        if not has_keys and self.jwt is None:
            raise ValueError("configure keys, keys_file or jwt: without any, every request would be refused")
        if self.header not in (None, "authorization") and not has_keys:
            raise ValueError("header is where API keys come from, but no keys or keys_file is configured (JWTs come as Authorization: Bearer)")
        _check_no_duplicate_digests(self.keys, "keys")
        return self


# --- API keys ----------------------------------------------------------------------------------


class _KeyTable:
    """Digests and their consumers; a match compares the presented key with every one of them."""

    __slots__ = ("_entries",)

    def __init__(self, keys: tuple[ApiKey, ...]):
        self._entries = tuple((bytes.fromhex(key.sha256), key.consumer) for key in keys)

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, digest: bytes) -> str | None:
        found: str | None = None
        for expected, consumer in self._entries:
            # Every digest compared, in constant time each: the time taken tells nothing of which
            # key matched, or how much of one did.
            if hmac.compare_digest(digest, expected) and found is None:
                found = consumer
        return found


class _KeysFileModel(BaseModel):
    keys: tuple[ApiKey, ...]


def _parse_keys_file(raw: bytes) -> _KeyTable:
    try:
        document = json.loads(raw)
    except ValueError:
        document = _parse_yaml(raw)
    if not isinstance(document, list):
        raise SecretFileProblem("is not a list of {consumer, sha256}")
    try:
        keys = _KeysFileModel.model_validate({"keys": document}).keys
    except ValidationError as error:
        first = error.errors()[0]
        place = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"][1:])
        raise SecretFileProblem(f"has a bad entry{place}: {first['msg']}") from None
    _check_no_duplicate_digests(keys, "entry")
    return _KeyTable(keys)


def _parse_yaml(raw: bytes) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as error:
        # Only the problem and its place: yaml's own text quotes the offending line.
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise SecretFileProblem(f"is not valid YAML or JSON{where}: {getattr(error, 'problem', None) or 'cannot be parsed'}") from None


# --- JWT keys ----------------------------------------------------------------------------------


def _parse_jwks(raw: bytes) -> KeySet:
    try:
        document = json.loads(raw)
    except ValueError as error:
        raise SecretFileProblem(f"is not JSON: {getattr(error, 'msg', None) or 'cannot be decoded'}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise SecretFileProblem('is not a JWKS: expected {"keys": [...]}')
    try:
        return KeySet.import_key_set(document)  # type: ignore[arg-type]
    except (JoseError, ValueError, TypeError, KeyError) as error:
        raise SecretFileProblem(f"is not a usable JWKS ({type(error).__name__})") from None


def _parse_secret(raw: bytes) -> OctKey:
    secret = raw.strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretFileProblem("is empty" if not secret else f"holds fewer than {MIN_SECRET_BYTES} bytes")
    return OctKey.import_key(secret)


def _parse_header_value(raw: bytes) -> str:
    try:
        value = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SecretFileProblem("is not UTF-8 text") from None
    if not value:
        raise SecretFileProblem("is empty")
    if _CONTROL.search(value):
        raise SecretFileProblem("holds a line break or control character inside the value")
    return value


def _safe_url(url: str) -> str:
    """``url`` without user info, query or fragment: what log lines may show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class _RemoteJwks:
    """The issuer's JWKS from ``jwks_url``: fetched on first use, refreshed every ``refresh`` in
    the background, fetched again for an unknown ``kid`` at most once per ``min_refresh``.

    One fetch runs at a time, as a task of its own: requests that need it wait for it (a
    cancelled request does not cancel it), and a failed fetch keeps the keys fetched before.
    """

    def __init__(self, url: str, *, timeout: float, refresh: float, min_refresh: float, clock: Callable[[], float]):
        self.url = url
        self._safe_url = _safe_url(url)
        self._timeout = timeout
        self._refresh = refresh
        self._min_refresh = min_refresh
        self._clock = clock
        self._keys: KeySet | None = None
        self._fetched_at = -math.inf
        self._attempted_at = -math.inf
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._problem: str | None = None

    def retry_in(self) -> float:
        """Seconds until the next fetch may start."""
        return max(0.0, self._attempted_at + self._min_refresh - self._clock())

    async def keys(self) -> KeySet | None:
        """The keys to verify with; waits for a fetch only when there are none yet."""
        now = self._clock()
        spaced = now - self._attempted_at >= self._min_refresh
        if self._keys is None:
            if self._task is not None or spaced:
                await asyncio.shield(self._start())
        elif spaced and now - self._fetched_at >= self._refresh:
            self._start()  # in the background; the keys held serve meanwhile
        return self._keys

    async def keys_knowing(self, kid: str) -> KeySet | None:
        """The keys after a token named ``kid``, which they do not hold: fetched again unless a
        fetch started less than ``min_refresh`` ago (one in flight is waited for)."""
        if self._keys is not None and any(key.kid == kid for key in self._keys.keys):
            return self._keys
        if self._task is not None or self._clock() - self._attempted_at >= self._min_refresh:
            await asyncio.shield(self._start())
        return self._keys

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._attempted_at = self._clock()
            self._task = asyncio.get_running_loop().create_task(self._fetch(), name="pluginchain-auth-jwks")
        return self._task

    async def _fetch(self) -> None:
        try:
            keys = await self._download()
        except SecretFileProblem as problem:
            self._report(str(problem), problem)
        except Exception as error:  # a background task: nobody else would hear of it
            self._report(f"could not be fetched ({describe_error(error, self.url)})", error)
        else:
            self._keys = keys
            self._fetched_at = self._clock()
            if self._problem is not None:
                logger.info("JWKS from %s is usable again", self._safe_url)
            self._problem = None
        finally:
            self._task = None

    async def _download(self) -> KeySet:
        if self._client is None:
            # Built on first use, in the loop that serves requests. The environment's proxy and
            # CA settings apply: a JWKS usually lives at an issuer outside the cluster.
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self._timeout),
                follow_redirects=False,
                headers={"user-agent": "pluginchain-auth", "accept": "application/json"},
            )
        body = bytearray()
        try:
            async with asyncio.timeout(self._timeout):
                async with self._client.stream("GET", self.url) as response:
                    if response.status_code != 200:
                        raise SecretFileProblem(f"answered HTTP {response.status_code}")
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_JWKS_BYTES:
                            raise SecretFileProblem(f"is larger than {MAX_JWKS_BYTES} bytes")
        except TimeoutError:
            raise SecretFileProblem(f"did not answer within {self._timeout:g}s") from None
        except (httpx.HTTPError, OSError) as error:
            # Chained for the DEBUG traceback; the message says enough at any other level.
            raise SecretFileProblem(f"cannot be fetched ({describe_error(error, self.url)})") from error
        return _parse_jwks(bytes(body))

    def _report(self, problem: str, error: BaseException) -> None:
        """One line when the problem is new (the same one again is not news); the traceback at DEBUG only."""
        if problem == self._problem:
            return
        self._problem = problem
        exc_info = traceback_if_debug(logger, error)
        if self._keys is None:
            logger.error("JWKS from %s %s; JWTs are refused until it can be fetched", self._safe_url, problem, exc_info=exc_info)
        else:
            logger.warning(
                "JWKS from %s %s; keeping the %d keys fetched before", self._safe_url, problem, len(self._keys.keys), exc_info=exc_info
            )


# --- The plugin --------------------------------------------------------------------------------


class _Refused(Exception):
    """Why a credential was refused: ``public`` for the client, ``reason`` for the DEBUG log.
    Neither holds the credential."""

    def __init__(self, public: str, reason: str):
        super().__init__(reason)
        self.public = public
        self.reason = reason


class _Unavailable(Exception):
    """The keys to check a JWT with cannot be had right now (``jwks_url`` never answered)."""


class Auth(Plugin):
    """Authenticate the caller by API key or JWT; establish the consumer; swap the credential."""

    name: ClassVar[str] = "auth"
    Config: ClassVar[type[PluginConfig]] = AuthConfig
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.PRE_REQUEST})
    supports_parallel: ClassVar[bool] = False
    reads_body: ClassVar[bool] = False
    suspends: ClassVar[bool] = True  # only with jwt.jwks_url; see needs()

    config: AuthConfig

    def __init__(self, config: AuthConfig, settings: InstanceSettings, *, clock: Callable[[], float] | None = None):
        """``clock`` returns Unix seconds (default ``time.time``): what ``exp``, ``nbf`` and
        ``iat`` are judged against, and what spaces JWKS fetches. Tests step it."""
        super().__init__(config, settings)
        if settings.on_error == "fail_open":
            raise ValueError("auth must not fail open: with on_error: fail_open a failure or timeout would let unauthenticated requests through")
        self._clock = clock or time.time
        self._key_header = config.header or "authorization"
        self._has_keys = bool(config.keys) or config.keys_file is not None
        self._inline_keys = _KeyTable(config.keys)
        self._keys_file = (
            SecretFile(
                config.keys_file, _parse_keys_file, what="auth: API keys file", refusal="its keys are refused",
                keep_last_good=True, logger=logger,
            )
            if config.keys_file is not None
            else None
        )
        jwt_config = config.jwt
        self._jwt = jwt_config
        self._jwks_file: SecretFile[KeySet] | None = None
        self._jwks_url: _RemoteJwks | None = None
        self._secret: SecretFile[OctKey] | None = None
        if jwt_config is not None:
            if jwt_config.jwks_file is not None:
                self._jwks_file = SecretFile(
                    jwt_config.jwks_file, _parse_jwks, what="auth: JWKS file", refusal="JWTs signed with its keys are refused",
                    keep_last_good=True, logger=logger,
                )
            if jwt_config.jwks_url is not None:
                self._jwks_url = _RemoteJwks(
                    jwt_config.jwks_url, timeout=jwt_config.jwks_timeout, refresh=jwt_config.jwks_refresh,
                    min_refresh=jwt_config.jwks_min_refresh, clock=self._clock,
                )
            if jwt_config.secret_file is not None:
                self._secret = SecretFile(
                    jwt_config.secret_file, _parse_secret, what="auth: JWT secret file", refusal="HS tokens are refused", logger=logger,
                )
        # One registry per algorithm, so that a token is verified with exactly the algorithm its
        # key was picked for. Header parameters nobody marked critical are ignored (RFC 7515 4),
        # and headers carrying a certificate chain (x5c) fit.
        algorithms = jwt_config.algorithms if jwt_config is not None else ()
        self._registries = {alg: _registry([alg]) for alg in algorithms}
        self._header_registry = _registry(algorithms)
        upstream = config.upstream_auth
        self._upstream_value = (
            SecretFile(
                upstream.value_file, _parse_header_value, what="auth: upstream credential file",
                refusal="authenticated requests are refused (500 upstream_credential_unavailable)", logger=logger,
            )
            if upstream is not None
            else None
        )
        # Every header a client credential may come in: none of them goes upstream.
        self._credential_headers = tuple(dict.fromkeys(
            ([self._key_header] if self._has_keys else []) + (["authorization"] if jwt_config is not None else [])
        ))
        self._challenge = f'Bearer realm="{config.realm}"'
        self._missing_message = self._describe_missing()

    def needs(self) -> Needs:
        # Keys and files are checked in memory; only a JWKS fetched over HTTP awaits.
        return Needs(suspends=self._jwks_url is not None)

    async def execute(self, ctx: PluginContext, data: PluginData) -> None:
        headers = data.headers
        kind, credential = self._credential(headers)
        if credential is None:
            ctx.logger.debug("auth: refused: no credential")
            raise self._reject(self._missing_message, token=False)
        try:
            if kind == "jwt":
                consumer = await self._verify_jwt(credential)
            else:
                consumer = self._verify_key(credential)
        except _Refused as refused:
            ctx.logger.debug("auth: refused %s: %s", "a JWT" if kind == "jwt" else "an API key", refused.reason)
            raise self._reject(refused.public, token=kind == "jwt") from None
        except _Unavailable:
            assert self._jwks_url is not None
            raise Reject(
                503, "authentication is temporarily unavailable", code="authentication_unavailable", type="server_error",
                headers={"retry-after": str(max(1, math.ceil(self._jwks_url.retry_in())))},
            ) from None

        upstream = self.config.upstream_auth
        value: str | None = None
        if upstream is not None:
            assert self._upstream_value is not None
            value = self._upstream_value.get()
            if value is None:
                # Logged by the file itself, once; never forwarded without the provider's credential.
                raise Reject(
                    500, "the gateway's credential for the upstream is unavailable",
                    code="upstream_credential_unavailable", type="server_error",
                )
        data.set_consumer(consumer)
        for name in self._credential_headers:
            if name in headers:
                data.remove_header(name)
        if upstream is not None and value is not None:
            data.set_header(upstream.header, upstream.prefix + value)

    async def aclose(self) -> None:
        if self._jwks_url is not None:
            await self._jwks_url.aclose()

    # -- credentials ------------------------------------------------------------------------------

    def _credential(self, headers: Mapping[str, str]) -> tuple[str, str | None]:
        """(``"jwt"`` or ``"key"``, the credential or None when the request carries none)."""
        bearer: str | None = None
        authorization = headers.get("authorization")
        if authorization is not None:
            scheme, _, rest = authorization.strip().partition(" ")
            if scheme.lower() == "bearer" and rest.strip():
                bearer = rest.strip()
        if self._jwt is not None and bearer is not None and (not self._has_keys or _JWT_SHAPE.fullmatch(bearer)):
            return "jwt", bearer
        if not self._has_keys:
            return "jwt", None
        if self._key_header == "authorization":
            return "key", bearer
        return "key", (headers.get(self._key_header) or "").strip() or None

    def _verify_key(self, key: str) -> str:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        consumer = self._inline_keys.match(digest)
        if self._keys_file is not None:
            table = self._keys_file.get()
            if table is not None:
                from_file = table.match(digest)
                consumer = consumer or from_file
        if consumer is None:
            raise _Refused("invalid API key", "no configured key has its digest")
        return consumer

    async def _verify_jwt(self, token: str) -> str:
        config = self._jwt
        assert config is not None
        if not _JWT_SHAPE.fullmatch(token):
            raise _Refused("invalid token", "not a JWS compact serialization")
        try:
            header = jws.extract_compact(token.encode("ascii"), registry=self._header_registry).headers()
        except (JoseError, ValueError, TypeError, KeyError) as error:
            raise _Refused("invalid token", f"unreadable header ({type(error).__name__})") from None
        alg = header.get("alg")
        kid = header.get("kid")
        if not isinstance(alg, str) or alg.strip().lower() == "none":
            raise _Refused("invalid token", "unsigned (alg none) or no alg")
        if alg not in config.algorithms:
            raise _Refused("invalid token", f"algorithm {alg[:20]!r} is not allowed")
        if kid is not None and not isinstance(kid, str):
            raise _Refused("invalid token", "kid is not a string")
        if "b64" in header:
            raise _Refused("invalid token", "unencoded payload (b64) is not a JWT")

        claims = await self._verified_claims(token, alg, kid)
        self._check_claims(claims, config)
        consumer = claims.get(config.consumer_claim)
        if not isinstance(consumer, str) or not consumer or len(consumer) > MAX_CONSUMER_CHARS or _CONTROL.search(consumer):
            raise _Refused("invalid token", f"claim {config.consumer_claim!r} is not a usable consumer name")
        return consumer

    async def _verified_claims(self, token: str, alg: str, kid: str | None) -> dict[str, Any]:
        if alg in HMAC_ALGORITHMS:
            assert self._secret is not None
            secret = self._secret.get()
            if secret is None:
                raise _Refused("invalid token", "the secret file is unusable")
            candidates: list[Key] = [secret]
        else:
            key_set = await self._key_set()
            candidates = _candidates(key_set, kid)
            if not candidates and kid is not None and self._jwks_url is not None:
                candidates = _candidates(await self._jwks_url.keys_knowing(kid), kid)
            if not candidates:
                raise _Refused("invalid token", "no key with its kid" if kid is not None else "no keys")
        registry = self._registries[alg]
        for key in candidates:
            try:
                return jwt.decode(token, key, registry=registry).claims
            except (JoseError, ValueError, TypeError, KeyError):
                continue
        raise _Refused("invalid token", "bad signature, or a key that does not fit its algorithm")

    async def _key_set(self) -> KeySet | None:
        if self._jwks_file is not None:
            return self._jwks_file.get()
        assert self._jwks_url is not None
        keys = await self._jwks_url.keys()
        if keys is None:
            raise _Unavailable()
        return keys

    def _check_claims(self, claims: dict[str, Any], config: JwtConfig) -> None:
        if claims.get("iss") != config.issuer:
            raise _Refused("invalid token", "wrong or no iss")
        audience = claims.get("aud")
        audiences = [audience] if isinstance(audience, str) else audience if isinstance(audience, list) else []
        if not any(isinstance(a, str) and a in config.audiences for a in audiences):
            raise _Refused("invalid token", "aud names none of the audiences")
        now = self._clock()
        skew = config.clock_skew
        expires = claims.get("exp")
        if not _is_time(expires):
            raise _Refused("invalid token", "no exp, or not a NumericDate")
        for name in ("nbf", "iat"):
            if name in claims and not _is_time(claims[name]):
                raise _Refused("invalid token", f"{name} is not a NumericDate")
        if "nbf" in claims and claims["nbf"] > now + skew:
            raise _Refused("invalid token", "not yet valid (nbf)")
        if "iat" in claims and claims["iat"] > now + skew:
            raise _Refused("invalid token", "issued in the future (iat)")
        if expires <= now - skew:
            raise _Refused("token expired", "expired (exp)")

    # -- answers ----------------------------------------------------------------------------------

    def _reject(self, message: str, *, token: bool) -> Reject:
        challenge = f'{self._challenge}, error="invalid_token"' if token else self._challenge
        return Reject(
            401, message, code="invalid_api_key", type="authentication_error", headers={"www-authenticate": challenge},
        )

    def _describe_missing(self) -> str:
        if not self._has_keys:
            return "missing bearer token: send Authorization: Bearer <token>"
        if self._key_header == "authorization":
            what = "API key or token" if self._jwt is not None else "API key"
            return f"missing {what}: send Authorization: Bearer <{what}>"
        if self._jwt is not None:
            return f"missing API key or token: send the API key in the {self._key_header} header, or Authorization: Bearer <token>"
        return f"missing API key: send it in the {self._key_header} header"


def _registry(algorithms: Collection[str]) -> JWSRegistry:
    registry = JWSRegistry(algorithms=list(algorithms), strict_check_header=False)
    registry.max_header_length = MAX_JWT_HEADER_BYTES
    return registry


def _candidates(key_set: KeySet | None, kid: str | None) -> list[Key]:
    if key_set is None:
        return []
    if kid is None:
        return list(key_set.keys)
    return [key for key in key_set.keys if key.kid == kid]


def _is_time(value: object) -> TypeGuard[int | float]:
    return not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)))
