"""The built-in ``session``: which conversation a request belongs to.

The client names the conversation in a request header (``x-session-id`` by default). This plugin
checks the id against ``pattern`` (RE2, the whole value must match; by default 8 to 128 of
``A-Z a-z 0-9 . _ ~ -``) and establishes it as the exchange's session (``PluginData.set_session``),
which every later plugin and stage reads as ``data.session`` / ``ctx.session``: the limiters with
``key: session``, the audit log's records.

- A request without the header (or with an empty one) gets a new id, ``secrets.token_urlsafe``
  of :data:`ISSUED_ID_BYTES` random bytes (24 characters of ``A-Z a-z 0-9 - _``). It is put on the
  request that goes upstream, under the same header, and returned to the client on the
  upstream's response (whatever its status), so the client can send it with its next request of
  the conversation. A client that gets a reject instead (a later plugin's) is not told the id:
  that request began no conversation.
- A request whose id does not match is refused, 400 ``invalid_session_id`` (``on_invalid:
  reject``, the default): a client that sends an id expects its requests to be grouped under it,
  and silently grouping them under another would hide its bug. With ``on_invalid: replace`` it is
  treated as absent instead: a new id is issued, replaces the header upstream, and is returned.
  The refused value is never echoed or logged.

``pattern`` must accept the ids this plugin issues (a client that sends one back must not be
refused); config validation checks it on sample ids covering their whole alphabet.

A session id is what the client says it is, not a credential: anyone may start a new session
with every request. A limit per session (``key: session``) groups the requests of well-behaved
clients; it bounds nothing for a client that wants to evade it. Put a limit per consumer or
per API key beside it for that.
"""

from __future__ import annotations

import secrets
import string
from typing import Literal

import re2
from pydantic import Field, field_validator, model_validator

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

DEFAULT_HEADER = "x-session-id"
DEFAULT_PATTERN = r"^[A-Za-z0-9._~-]{8,128}$"

ISSUED_ID_BYTES = 18
"""Random bytes in an id this plugin issues: 144 bits, 24 URL-safe base64 characters."""

_ISSUED_ALPHABET = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
_HEADER_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


def _sample_issued_ids() -> tuple[str, ...]:
    """Ids of the length this plugin issues that, between them, use every character it may issue,
    starting with one of each class (upper, lower, digit, ``-``, ``_``); what ``pattern`` is
    checked against."""
    length = len(secrets.token_urlsafe(ISSUED_ID_BYTES))
    doubled = _ISSUED_ALPHABET * 2
    starts = sorted({*range(0, len(_ISSUED_ALPHABET), length), 26, 52, 62, 63})
    return tuple(doubled[start:start + length] for start in starts)


_SAMPLE_IDS = _sample_issued_ids()


def _compile(pattern: str) -> re2._Regexp:
    options = re2.Options()
    options.log_errors = False  # a bad pattern is a config error, not noise on stderr
    try:
        return re2.compile(pattern, options)
    except re2.error as error:
        # RE2 reports b"missing ): (abc": the reason, then the offending part of the pattern.
        reason = error.args[0] if error.args else error
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise ValueError(f"not a valid RE2 pattern: {str(reason).split(': ', 1)[0]}") from None


class SessionConfig(PluginConfig):
    """Config of ``session``. ``{}`` is valid: ids from ``x-session-id``, 8 to 128 URL-safe characters."""

    header: str = DEFAULT_HEADER
    """The request header that carries the session id, and the response header a new id is
    returned in. Default ``x-session-id``."""

    pattern: str = Field(DEFAULT_PATTERN, min_length=1)
    """RE2 pattern (https://github.com/google/re2/wiki/Syntax) the whole id must match: its form
    and its length. Default ``^[A-Za-z0-9._~-]{8,128}$``. It must accept the ids this plugin
    issues (24 characters of ``A-Z a-z 0-9 - _``)."""

    on_invalid: Literal["reject", "replace"] = "reject"
    """What a request with an id that does not match gets: ``reject`` (default; 400
    ``invalid_session_id``) or ``replace`` (a new id, as if it had sent none)."""

    @field_validator("header")
    @classmethod
    def _header_is_a_header_name(cls, value: str) -> str:
        name = value.strip().lower()
        if not name or not set(name) <= _HEADER_TOKEN:
            raise ValueError(f"not a valid header name: {value!r}")
        return name

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, value: str) -> str:
        _compile(value)
        return value

    @model_validator(mode="after")
    def _pattern_accepts_issued_ids(self) -> SessionConfig:
        compiled = _compile(self.pattern)
        refused = next((sample for sample in _SAMPLE_IDS if compiled.fullmatch(sample) is None), None)
        if refused is not None:
            raise ValueError(
                f"pattern {self.pattern!r} refuses ids this plugin issues, such as {refused!r} "
                f"({len(refused)} characters of A-Z a-z 0-9 - _); a client sending one back would be refused"
            )
        return self


class Session(Plugin):
    """Establish the request's session from a header, issuing (and returning) a new id when it has none."""

    name = "session"
    Config = SessionConfig
    stages = frozenset({Stage.PRE_REQUEST})
    supports_parallel = False
    reads_body = False
    suspends = False

    config: SessionConfig

    def __init__(self, config: SessionConfig, settings: InstanceSettings):
        super().__init__(config, settings)
        self._pattern = _compile(config.pattern)
        self._invalid_message = f"invalid session id in header {config.header}: it must match {config.pattern}"

    def needs(self) -> Needs:
        # A matching is pure computation; a new id goes back on the client's response.
        return Needs(suspends=False, response_headers=True)

    async def execute(self, ctx: PluginContext, data: PluginData) -> None:
        header = self.config.header
        given = data.headers.get(header, "")
        if given and self._pattern.fullmatch(given) is not None:
            data.set_session(given)
            return
        if given and self.config.on_invalid == "reject":
            raise Reject(400, self._invalid_message, code="invalid_session_id")
        issued = secrets.token_urlsafe(ISSUED_ID_BYTES)
        data.set_header(header, issued)  # the upstream sees the session the client will send next
        data.set_response_header(header, issued)
        data.set_session(issued)
