"""Token usage, read from what OpenAI-style APIs report, and asked of streams that would not.

A chain whose plugins need usage (``Needs.usage``) gets it on ``Exchange.usage`` from:

- a completion's JSON body: chat completions' and completions' ``usage.prompt_tokens`` /
  ``completion_tokens`` / ``total_tokens``, the Responses API's ``usage.input_tokens`` /
  ``output_tokens`` / ``total_tokens``;
- a stream: the chat usage chunk (``"choices": []`` with ``usage``), or the Responses API's
  ``response.completed`` event.

A chat or completions stream reports usage only when asked (``stream_options.include_usage``):
:func:`ask_for_stream_usage` adds that to the request going upstream, and the stream then hides
the extra usage chunk (and the ``"usage": null`` OpenAI adds to every other chunk) from a client
that did not ask, so it receives exactly the events it would have without the gateway.
"""

from __future__ import annotations

from typing import Any

from pluginchain._api.plugin import BodyNotJSON, Usage, parse_json


def usage_of(document: Any) -> Usage | None:
    """The usage a response body or stream event reports, if it reports one."""
    if not isinstance(document, dict):
        return None
    usage = document.get("usage")
    model = document.get("model")
    if document.get("type") in ("response.completed", "response.incomplete") and isinstance(document.get("response"), dict):
        response = document["response"]
        usage, model = response.get("usage"), response.get("model")
    if not isinstance(usage, dict):
        return None
    input_tokens = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
    output_tokens = _count(usage.get("completion_tokens", usage.get("output_tokens")))
    if input_tokens is None and output_tokens is None:
        return None
    input_tokens, output_tokens = input_tokens or 0, output_tokens or 0
    total = _count(usage.get("total_tokens"))
    return Usage(input_tokens, output_tokens, total if total is not None else input_tokens + output_tokens,
                 model if isinstance(model, str) else None)


def usage_of_body(body: bytes | None) -> Usage | None:
    if not body:
        return None
    try:
        return usage_of(parse_json(body))
    except BodyNotJSON:
        return None


def ask_for_stream_usage(request: Any) -> Any | None:
    """``request`` with ``stream_options.include_usage`` set, for a chat or completions stream
    that does not ask for usage already; None when it needs no change."""
    if not isinstance(request, dict) or request.get("stream") is not True:
        return None
    if "messages" not in request and "prompt" not in request:
        return None  # the Responses API reports usage in every stream
    options = request.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return None
    if options is not None and not isinstance(options, dict):
        return None  # the upstream will refuse it; not ours to mend
    return {**request, "stream_options": {**(options or {}), "include_usage": True}}


def is_usage_chunk(document: Any) -> bool:
    """The chunk a chat or completions stream sends only because usage was asked for."""
    return isinstance(document, dict) and document.get("choices") == [] and isinstance(document.get("usage"), dict)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
