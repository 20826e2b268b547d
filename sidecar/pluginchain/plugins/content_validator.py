"""content_validator: reject malformed or oversized LLM requests before they reach the upstream.

Each rule is optional; a failed rule answers the client with status 400 (413 for
``max_body_bytes``, the status HTTP has for exactly that), an OpenAI-style error whose code is
the rule's name, and a message naming the rule and the numbers, e.g.
``content_validator: max_messages: 12 messages exceed the limit of 10``. The first rule that
fails answers; they are checked cheapest first: ``max_body_bytes``, ``require_json``,
``required_fields``, ``allowed_models``, ``max_messages``, ``max_chars``.

A request without a body (``GET /v1/models``) has no content to validate: only
``max_body_bytes`` applies to it. With ``require_json: false`` a body that is not a JSON object
passes the rules that read JSON (they have nothing to read); an LLM API refuses it anyway.

JSON the rules cannot judge safely is refused whatever the rules, because an upstream that reads
it another way would take it with no rule checked (:func:`pluginchain.parse_json`): nested
deeper than :data:`pluginchain.MAX_JSON_DEPTH` (code ``json_depth``), an object with a key twice
(``duplicate_json_keys``: one parser takes the first ``model``, another the last), bytes that
are not UTF-8 or a lone surrogate escape (``invalid_utf8``); with ``require_json: false`` also
a body declared as JSON (``application/json``, ``*/*+json``) or looking like it (first byte
``{`` or ``[``) that does not parse, e.g. with bytes after the document (``uninspectable_body``).

A gzip or deflate request body is inflated first, as ``content_filter`` does, and its JSON
judged: up to ``max_inflated_bytes`` (past it 413 ``body_too_large``, as soon as inflation passes
it; large bodies are inflated off the event loop). ``max_body_bytes`` counts the body as
received. A body in another coding (``br``, ``zstd``), or a corrupt one, cannot be read: it
fails ``require_json``; with ``require_json: false`` it passes unless it is declared JSON
(``uninspectable_body``).
Messages and characters are counted as :mod:`pluginchain.plugins._llm_text` defines them, so
the validator and ``content_filter`` agree on what the conversation is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, Field, field_validator, model_validator

from pluginchain._api.plugin import (
    BodyNotJSON,
    BodyNotUTF8,
    BodyTooDeep,
    BodyUninspectable,
    Plugin,
    PluginConfig,
    PluginContext,
    PluginData,
    Reject,
    Stage,
    parse_json,
)
from pluginchain.plugins._content_coding import DEFAULT_MAX_INFLATED_BYTES, BodyInflatesTooLarge, UnreadableBody, inflate_off_loop
from pluginchain.plugins._llm_text import conversation_chars, declares_or_looks_like_json, message_count

_ECHO_LIMIT = 100
"""Longest piece of client input quoted back in an error message, in characters."""


def _check_field_path(path: str) -> str:
    if not path or any(not segment for segment in path.split(".")):
        raise ValueError(f"{path!r} is not a field path: write object keys joined by dots, like 'metadata.user'")
    return path


FieldPath = Annotated[str, AfterValidator(_check_field_path)]


class ContentValidatorConfig(PluginConfig):
    """Settings of ``content_validator``; at least one rule must be set."""

    require_json: bool = True
    """Whether a request body must be a JSON object (default true); else 400 ``require_json``."""
    max_body_bytes: int | None = Field(default=None, gt=0)
    """Largest request body in bytes, as received (default: no limit); else 413."""
    max_messages: int | None = Field(default=None, gt=0)
    """Most entries of ``messages`` (chat) or ``input`` (Responses API) (default: no limit)."""
    max_chars: int | None = Field(default=None, gt=0)
    """Most characters (Unicode code points) of prompt text in ``messages``, ``prompt``,
    ``input``, ``instructions`` and ``system`` together (default: no limit)."""
    allowed_models: tuple[str, ...] | None = None
    """The only values ``model`` may have (default: any); a JSON request without ``model`` is
    refused too, so the allow-list cannot be bypassed by leaving the model out."""
    required_fields: tuple[FieldPath, ...] | None = None
    """Fields a JSON request must have, not null: top-level keys or dotted paths through nested
    objects such as ``metadata.user`` (default: none)."""
    max_inflated_bytes: int = Field(default=DEFAULT_MAX_INFLATED_BYTES, gt=0)
    """Largest size a gzip or deflate body may inflate to, in bytes (default 4194304, the
    sidecar's default ``--max-body-bytes``; raise it with that); past it 413 ``body_too_large``.
    Not a rule: it applies whichever rules are set."""

    @field_validator("allowed_models", "required_fields")
    @classmethod
    def _not_empty(cls, values: tuple[str, ...] | None) -> tuple[str, ...] | None:
        # Not min_length: pydantic would repeat that error whenever one entry is invalid.
        if values is not None and not values:
            raise ValueError("an empty list would refuse everything or nothing; leave the rule out instead")
        return values

    @model_validator(mode="after")
    def _some_rule_is_set(self) -> ContentValidatorConfig:
        limits = (self.max_body_bytes, self.max_messages, self.max_chars, self.allowed_models, self.required_fields)
        if not self.require_json and all(limit is None for limit in limits):
            raise ValueError(
                "no rule is set: set require_json, max_body_bytes, max_messages, max_chars, "
                "allowed_models or required_fields"
            )
        return self


class ContentValidator(Plugin):
    """Rejects requests that break the configured shape and size rules."""

    name = "content_validator"
    Config = ContentValidatorConfig
    stages = frozenset({Stage.PRE_REQUEST})
    supports_parallel = True
    suspends = True  # a large compressed body is inflated in a worker thread, awaited
    reads_body = True

    config: ContentValidatorConfig

    async def execute(self, ctx: PluginContext, data: PluginData) -> None:
        config = self.config
        body = data.body
        if not body:
            return
        if config.max_body_bytes is not None and len(body) > config.max_body_bytes:
            raise _rejection(
                "max_body_bytes", f"body of {len(body)} bytes exceeds the limit of {config.max_body_bytes} bytes", 413
            )
        encoding = data.headers.get("content-encoding", "").strip().lower()
        if encoding in ("", "identity"):
            document = self._json_object(data.headers, body, data.json)
        else:
            plain = await self._inflated(data.headers, body, encoding)
            if plain is None:
                return
            document = self._json_object(data.headers, plain, lambda: parse_json(plain))
        if document is None:
            return
        if config.required_fields:
            missing = [path for path in config.required_fields if _lookup(document, path) is None]
            if missing:
                names = ", ".join(repr(path) for path in missing)
                what = f"field {names} is" if len(missing) == 1 else f"fields {names} are"
                raise _rejection("required_fields", f"{what} missing")
        if config.allowed_models:
            self._check_model(document.get("model"))
        if config.max_messages is not None:
            count = message_count(document)
            if count > config.max_messages:
                raise _rejection("max_messages", f"{count} messages exceed the limit of {config.max_messages}")
        if config.max_chars is not None:
            chars = conversation_chars(document)
            if chars > config.max_chars:
                raise _rejection("max_chars", f"{chars} characters exceed the limit of {config.max_chars}")

    async def _inflated(self, headers: Mapping[str, str], body: bytes, encoding: str) -> bytes | None:
        """The body inflated from ``encoding``; None when it cannot be read and need not be."""
        try:
            return await inflate_off_loop(body, encoding, self.config.max_inflated_bytes)
        except BodyInflatesTooLarge as error:
            raise _rejection("body_too_large", str(error), 413) from None
        except UnreadableBody as error:
            if self.config.require_json:
                raise _rejection("require_json", f"{_clip(str(error))}; send JSON plain, gzip- or deflate-encoded") from None
            if declares_or_looks_like_json(headers, b""):  # by its content type: the bytes are compressed
                raise _rejection("uninspectable_body", _clip(str(error))) from None
            return None  # not JSON, and no rule reads text

    def _json_object(self, headers: Mapping[str, str], body: bytes, parse: Callable[[], Any]) -> dict | None:
        """``body`` (plain, ``parse`` decoding it) as the JSON object the rules read; None when it
        is none and ``require_json`` is off."""
        try:
            document = parse()
        except BodyTooDeep as error:
            # Whatever the rules: skipping them would let the upstream, which may parse it, get it unchecked.
            raise _rejection("json_depth", str(error)) from None
        except BodyUninspectable as error:
            if isinstance(error, BodyNotUTF8) and not self.config.require_json and not declares_or_looks_like_json(headers, body):
                return None  # not JSON, and no rule reads text
            raise _rejection(error.code, _clip(str(error))) from None
        except BodyNotJSON as error:
            if self.config.require_json:
                raise _rejection("require_json", _clip(str(error))) from None
            if declares_or_looks_like_json(headers, body):
                raise _rejection("uninspectable_body", _clip(str(error))) from None
            return None
        if isinstance(document, dict):
            return document
        if self.config.require_json:
            raise _rejection("require_json", f"body is a JSON {_json_kind(document)}, expected an object")
        return None

    def _check_model(self, model: Any) -> None:
        allowed = ", ".join(self.config.allowed_models or ())
        if model is None:
            raise _rejection("allowed_models", f"request names no model; allowed models: {allowed}")
        if not isinstance(model, str):
            raise _rejection("allowed_models", f"model must be a string, got a JSON {_json_kind(model)}")
        if model not in (self.config.allowed_models or ()):
            raise _rejection("allowed_models", f"model {_clip(model)!r} is not allowed; allowed models: {allowed}")


def _rejection(rule: str, detail: str, status: int = 400) -> Reject:
    return Reject(status, f"content_validator: {rule}: {detail}", code=rule, type="invalid_request_error")


def _lookup(document: dict, path: str) -> Any:
    value: Any = document
    for key in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _clip(text: str) -> str:
    return text if len(text) <= _ECHO_LIMIT else text[:_ECHO_LIMIT] + "…"


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(type(value), "null")
