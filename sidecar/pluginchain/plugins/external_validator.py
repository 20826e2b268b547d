"""Let an HTTP service of the operator's own decide whether a request may go on.

Each request (and, in ``post_request``, each response) is POSTed as JSON to ``url``; a 2xx
answer allows it, a 4xx answer rejects it with the service's own status and message, and an
unreachable or failing service raises :class:`ExternalValidatorUnavailable` so that the chain
entry's ``on_error`` policy (``fail_closed`` or ``fail_open``), not this plugin, decides what the
client gets.

**Default endpoint.** ``url`` defaults to ``http://127.0.0.1:8090/validate`` (a validator running
next to the sidecar in the same pod) because the spec's parallel example configures
``external_validator`` with no config at all and must still load. Set ``url`` for anything else.

The request to the service::

    POST <url>
    {"stage": "pre_request" | "post_request", "chain": "...", "request_id": "...",
     "request": {"headers": {...}, "body": <JSON value, or text when the body is not JSON>},
     "response": {"headers": {...}, "body": ...}}        # post_request only

In ``post_request`` a streamed completion (``text/event-stream``) is sent whole, once it has
ended: the service judges the completion, never a part of it as if it were all. The client gets
nothing of the stream before the verdict (WHOLE mode; a stream longer than the sidecar's body
limit ends with a ``stream_too_large`` error event). Put ``content_filter`` in front for checks
that must not delay the first token.

``request``/``response`` carry only the parts listed in ``send``. Credentials are never sent
unless named: a header whose name is a credential's (``authorization``, ``proxy-authorization``,
``cookie``, ``set-cookie``, ``api-key``, ``x-api-key``, ``x-goog-api-key``,
``x-amz-security-token``, any name with a part such as ``key``, ``token``, ``secret``,
``signature``: see :mod:`pluginchain.plugins._secrets`) only when ``forward_headers`` names it;
a credential query parameter (``key``, ``api_key``, ``apikey``, ``token``, ``access_token``,
``sig``, ``signature``, ``X-Amz-Signature``...) in a forwarded path or URL (``:path``,
``referer``, ``location``...) only when ``forward_query_parameters`` names it; otherwise the
parameter is left out, the rest of the path as it was.

How the answer is read:

- 2xx: allow.
- 429, 5xx, connection errors and timeouts: retried ``retries`` times with exponential backoff
  (``backoff``, doubled each retry, +-10 % jitter), never past the plugin's own deadline; when
  the attempts are spent, :class:`ExternalValidatorUnavailable` is raised.
- other 4xx: :class:`~pluginchain.Reject` with that status; the message is taken from a JSON body
  (``{"error": {"message", "code"}}``, ``{"message"}`` or ``{"detail"}``) or else from the text
  (at most 1 KiB); the code from the JSON, else ``external_validation_failed``. Never retried.
- anything else (3xx, redirects are not followed): :class:`ExternalValidatorUnavailable`.

A request the validator could not judge is one warning line (the plugin failure), naming the
endpoint without credentials or query and the last cause (``ConnectError: All connection
attempts failed``); retries and the traceback are logged at DEBUG only.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

import httpx
from pydantic import field_validator

from pluginchain._api.durations import Duration
from pluginchain._api.plugin import (
    BodyNotJSON,
    InstanceSettings,
    Needs,
    Plugin,
    PluginConfig,
    PluginContext,
    PluginData,
    Reject,
    Stage,
)
from pluginchain._api.stream import StreamMode
from pluginchain.plugins._call_failures import describe_error, safe_endpoint
from pluginchain.plugins._http import check_http_url
from pluginchain.plugins._secrets import is_credential_name, without_credential_parameters

DEFAULT_URL = "http://127.0.0.1:8090/validate"

SECRET_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key",
    "x-goog-api-key", "x-amz-security-token",
})
"""The best known credential headers. The validator is spared every header whose name
:func:`~pluginchain.plugins._secrets.is_credential_name` matches, these and many more."""

SEND_PARTS = ("headers", "body")

MAX_MESSAGE_CHARS = 1024
"""Longest message passed through from the validator to the client."""

DEFAULT_REJECT_CODE = "external_validation_failed"

_JITTER = 0.1
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class ExternalValidatorUnavailable(RuntimeError):
    """The validator could not give a verdict: unreachable, too slow, overloaded or failing.

    Carries the endpoint (without credentials or query) and the last cause, never request
    content; the chain entry's ``on_error`` policy decides whether the request goes on.
    """

    def __init__(self, url: str, attempts: int, cause: str):
        super().__init__(f"external validator {url} unavailable after {attempts} attempt(s): {cause}")
        self.url = url
        self.attempts = attempts
        self.cause = cause


class ExternalValidatorConfig(PluginConfig):
    """Where the validator lives, what it is sent, and how hard to try."""

    url: str = DEFAULT_URL
    """The validator's endpoint, an ``http://`` or ``https://`` URL. Default
    ``http://127.0.0.1:8090/validate``: a validator in the same pod, so that an entry without
    config (as in the spec's example) is valid. User info in the URL is sent as basic auth;
    put other credentials in ``headers``, not in the query, which httpx logs at INFO."""

    timeout: Duration = 2.0
    """Limit of one attempt, connection included (default ``"2s"``). Keep
    ``timeout * (retries + 1)`` plus backoff under the chain entry's own ``timeout``; retries
    that would start past it are skipped."""

    retries: int = 2
    """Extra attempts after the first on connection errors, timeouts, 429 and 5xx answers
    (default 2). Never on other 4xx: those are verdicts."""

    backoff: Duration = 0.1
    """Wait before the first retry (default ``"100ms"``), doubled for each further retry, with
    +-10 % jitter so that many requests do not retry in step."""

    send: tuple[str, ...] = SEND_PARTS
    """Which parts of the messages to send: ``"headers"``, ``"body"`` or both (default both).
    Sending ``body`` makes the sidecar buffer the request body (and, in ``post_request``, the
    response body too)."""

    forward_headers: tuple[str, ...] | None = None
    """Names of the headers to send (case-insensitive). Default: every header except
    credentials (``authorization``, ``proxy-authorization``, ``cookie``, ``set-cookie``,
    ``api-key``, ``x-api-key``, ``x-goog-api-key``, ``x-amz-security-token``, and any name with a
    part ``auth``, ``key``, ``token``, ``secret``, ``password``, ``credential``, ``signature``,
    ``sig``, ``jwt``); those are sent only when named here."""

    forward_query_parameters: tuple[str, ...] = ()
    """Credential query parameters to leave in the paths and URLs of forwarded headers
    (``:path``, ``referer``...), case-insensitive. Default none: ``key``, ``api_key``,
    ``apikey``, ``token``, ``access_token``, ``sig``, ``signature``, ``X-Amz-Signature`` and any
    other name with a credential part are taken out. Other parameters are always sent."""

    headers: dict[str, str] = {}
    """Extra headers on the call to the validator, e.g. its own ``authorization``
    (default none). Never logged."""

    max_connections: int = 100
    """Most connections kept open to the validator at once (default 100); more concurrent
    requests wait for a free one, within ``timeout``."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        return check_http_url(url, "url")

    @field_validator("retries")
    @classmethod
    def _check_retries(cls, retries: int) -> int:
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, got {retries}")
        return retries

    @field_validator("max_connections")
    @classmethod
    def _check_max_connections(cls, count: int) -> int:
        if count < 1:
            raise ValueError(f"max_connections must be 1 or more, got {count}")
        return count

    @field_validator("send")
    @classmethod
    def _check_send(cls, parts: tuple[str, ...]) -> tuple[str, ...]:
        for part in parts:
            if part not in SEND_PARTS:
                raise ValueError(f"unknown part {part!r} in send; expected 'headers' or 'body'")
        return tuple(dict.fromkeys(parts))

    @field_validator("forward_headers")
    @classmethod
    def _check_forward_headers(cls, names: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if names is None:
            return None
        for name in names:
            # Envoy passes HTTP/2 pseudo-headers such as ":path" along with the others.
            if not _HEADER_NAME.fullmatch(name.removeprefix(":")):
                raise ValueError(f"not a valid header name in forward_headers: {name!r}")
        return tuple(dict.fromkeys(name.lower() for name in names))

    @field_validator("forward_query_parameters")
    @classmethod
    def _check_forward_query_parameters(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            if not name or any(c in name for c in "&=?#"):
                raise ValueError(f"not a query parameter name in forward_query_parameters: {name!r}")
        return tuple(dict.fromkeys(name.lower() for name in names))

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"not a valid header name in headers: {name!r}")
            if any(c in value for c in "\r\n\0"):
                # The value may be a credential: name the header, not the value.
                raise ValueError(f"value of header {name!r} contains a line break or NUL")
        return headers


class ExternalValidator(Plugin):
    """Ask an external HTTP service for a verdict on each request or response."""

    name: ClassVar[str] = "external_validator"
    Config: ClassVar[type[PluginConfig]] = ExternalValidatorConfig
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.PRE_REQUEST, Stage.POST_REQUEST})
    supports_parallel: ClassVar[bool] = True
    reads_body: ClassVar[bool] = True
    streams: ClassVar[frozenset[StreamMode]] = frozenset({StreamMode.WHOLE})

    config: ExternalValidatorConfig

    def __init__(self, config: ExternalValidatorConfig, settings: InstanceSettings):
        super().__init__(config, settings)
        self._safe_url = safe_endpoint(config.url)
        self._request_url, self._auth = _split_credentials(config.url)
        self._send_headers = "headers" in config.send
        self._send_body = "body" in config.send
        self._client: httpx.AsyncClient | None = None

    def needs(self) -> Needs:
        # In post_request the service is sent the request as well as the response.
        response_body = self._send_body and self.stage is Stage.POST_REQUEST
        return Needs(
            request_body=self._send_body,
            response_body=response_body,
            stream=StreamMode.WHOLE if response_body else None,
        )

    async def execute(self, ctx: PluginContext, data: PluginData) -> None:
        payload: dict[str, Any] = {"stage": str(data.stage), "chain": ctx.chain, "request_id": ctx.request_id}
        if data.stage == Stage.POST_REQUEST:
            payload["request"] = self._describe(data.request)
            payload["response"] = self._describe(data)
        else:
            payload["request"] = self._describe(data)
        response = await self._post(ctx, payload)
        if not 200 <= response.status_code < 300:
            raise _reject_from(response)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _describe(self, message: Any) -> dict[str, Any]:
        """The configured parts of a message (a PluginData view or an HttpMessage)."""
        part: dict[str, Any] = {}
        if self._send_headers:
            part["headers"] = self._pick_headers(message.headers)
        if self._send_body:
            part["body"] = _body_value(message)
        return part

    def _pick_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        wanted = self.config.forward_headers
        keep = self.config.forward_query_parameters
        picked = {}
        for name, value in headers.items():
            sent = (name in wanted) if wanted is not None else not is_credential_name(name)
            if sent:
                # A path or URL may carry a key in its query (``?key=``, a presigned signature).
                picked[name] = without_credential_parameters(value, keep) if "?" in value else value
        return picked

    def _http(self) -> httpx.AsyncClient:
        # Built on first use, inside the event loop that serves requests, and shared by them all
        # so that connections are kept alive and reused.
        if self._client is None:
            limit = self.config.max_connections
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.config.timeout),
                limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
                headers={"user-agent": "pluginchain-external-validator", **self.config.headers},
                auth=self._auth,
                follow_redirects=False,
                # Proxy variables of the sidecar's environment must not reroute verdicts.
                trust_env=False,
            )
        return self._client

    async def _post(self, ctx: PluginContext, payload: dict[str, Any]) -> httpx.Response:
        """POST with retries; returns a 2xx or a verdict 4xx, raises when no verdict came."""
        config = self.config
        client = self._http()
        loop = asyncio.get_running_loop()
        attempts = 0
        while True:
            attempts += 1
            try:
                async with asyncio.timeout(config.timeout):
                    response = await client.post(self._request_url, json=payload)
            except (httpx.TransportError, TimeoutError) as error:
                cause = _describe_error(error, config.timeout, self._request_url)
                last_error: BaseException | None = error
            else:
                status = response.status_code
                if status < 300 or (400 <= status < 500 and status != 429):
                    return response
                if status < 400:
                    raise ExternalValidatorUnavailable(
                        self._safe_url, attempts, f"unexpected HTTP {status} (redirects are not followed)"
                    )
                cause, last_error = f"HTTP {status}", None

            retries_done = attempts - 1
            if retries_done >= config.retries:
                raise ExternalValidatorUnavailable(self._safe_url, attempts, cause) from last_error
            delay = config.backoff * 2**retries_done * random.uniform(1 - _JITTER, 1 + _JITTER)
            if loop.time() + delay >= ctx.deadline:
                raise ExternalValidatorUnavailable(
                    self._safe_url, attempts, f"{cause}; no time left in the plugin timeout to retry"
                ) from last_error
            ctx.logger.debug(
                "external validator %s: attempt %d failed (%s), retrying in %.3fs",
                self._safe_url, attempts, cause, delay,
            )
            await asyncio.sleep(delay)


def _body_value(message: Any) -> Any:
    """The body as the validator gets it: parsed JSON, else text, else None when absent."""
    body = message.body
    if body is None:
        return None
    try:
        return message.json()
    except BodyNotJSON:
        return body.decode("utf-8", errors="replace")


def _reject_from(response: httpx.Response) -> Reject:
    """The validator's 4xx verdict as the client's rejection, its message passed through."""
    message: str | None = None
    code: str | None = None
    try:
        document = response.json()
    except ValueError:
        document = None
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict):
            message = _as_text(error.get("message"))
            code = error.get("code") if isinstance(error.get("code"), str) else None
        elif isinstance(error, str):
            message = error
        if message is None:
            message = _as_text(document.get("message")) or _as_text(document.get("detail"))
        if code is None and isinstance(document.get("code"), str):
            code = document["code"]
    if message is None:
        message = response.text.strip()
    if not message:
        message = f"rejected by external validator (HTTP {response.status_code})"
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "…"
    if not code or len(code) > 64:
        code = DEFAULT_REJECT_CODE
    return Reject(response.status_code, message, code=code)


def _as_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    # e.g. FastAPI's {"detail": [{"loc": ..., "msg": ...}]}
    return json.dumps(value, ensure_ascii=False)


def _describe_error(error: BaseException, timeout: float, url: str) -> str:
    if isinstance(error, (TimeoutError, httpx.TimeoutException)):
        return f"no answer within {timeout:g}s"
    return describe_error(error, url)


def _split_credentials(url: str) -> tuple[str, httpx.BasicAuth | None]:
    """``url`` without user info, and that user info as basic auth.

    httpx logs every request's URL; passing the password apart keeps it out of those lines.
    """
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    netloc = parts.netloc.rpartition("@")[2]
    auth = httpx.BasicAuth(unquote(parts.username or ""), unquote(parts.password or ""))
    return parts._replace(netloc=netloc).geturl(), auth


