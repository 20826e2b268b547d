"""content_filter on a streamed completion judges skeletons and flexible spaces event by event,
and no part of a disguised match leaves before the verdict."""

from __future__ import annotations

import json
from typing import Any

from pluginchain import Exchange, HttpMessage
from pluginchain._config.registry import default_registry
from pluginchain._config.validation import validate_document
from pluginchain._engine.plan import compile_plan
from pluginchain._engine.streaming import ResponseStream


def stream_through(**config: Any) -> ResponseStream:
    entry = {"name": "content_filter", "stage": "post_request", "config": config}
    chain = compile_plan(validate_document([entry], default_registry()), default_registry()).chains["default"]
    exchange = Exchange(request=HttpMessage({}), response=HttpMessage({":status": "200", "content-type": "text/event-stream"}))
    return ResponseStream(chain, exchange, max_event_bytes=1 << 20, max_buffer_bytes=1 << 20)


def chat_stream(*pieces: str) -> list[bytes]:
    def event(delta: dict, finish: str | None = None) -> bytes:
        chunk = {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    return [event({"role": "assistant", "content": ""}), *(event({"content": p}) for p in pieces), event({}, "stop"), b"data: [DONE]\n\n"]


async def received_per_chunk(stream: ResponseStream, chunks: list[bytes]) -> list[str]:
    """The delta text the client got for each chunk fed, the last chunk ending the stream."""
    texts = []
    for number, chunk in enumerate(chunks):
        out = await stream.feed(chunk, number == len(chunks) - 1)
        text = ""
        for block in out.decode().split("\n\n"):
            if block.startswith("data: {"):
                document = json.loads(block[6:])
                text += "".join(choice["delta"].get("content") or "" for choice in document.get("choices", []))
        texts.append(text)
    return texts


async def test_a_homoglyph_phrase_split_over_events_is_redacted_and_no_part_leaves_early():
    stream = stream_through(banned_patterns=["launch codes"], match="skeleton", action="redact")
    pieces = ["The lаunсh ", "сodеs are ", "secret; rеmember them."]  # Cyrillic а с е

    received = await received_per_chunk(stream, chat_stream(*pieces))

    assert "".join(received) == "The [REDACTED] are secret; rеmember them."
    assert received[1:3] == ["", "The "]  # "lаunсh " could still grow into a match: it waited


async def test_a_skeleton_match_is_masked_over_the_characters_it_came_from():
    # m folds to "rn": the pattern's "rn" and the text's "m" meet in the skeleton, lengths differ.
    stream = stream_through(banned_patterns=["corn"], match="skeleton", action="redact")

    received = await received_per_chunk(stream, chat_stream("a co", "m field, a cor", "n field"))

    assert "".join(received) == "a [REDACTED] field, a [REDACTED] field"


async def test_a_rejected_stream_sends_nothing_of_a_disguised_match():
    # A flexible space has no longest match: stream_window characters of the skeleton wait.
    config = {"match": "skeleton", "flexible_whitespace": True, "stream_window": 40}
    stream = stream_through(banned_patterns=["ignore previous instructions"], **config)
    pieces = ["Sure. " * 10, "іgnоrе\u3164", "рrеvіоus\n", "іnstruсtіоns now"]

    received = await received_per_chunk(stream, chat_stream(*pieces))

    sent = "".join(received)
    assert sent and ("Sure. " * 10).startswith(sent)  # the clean text left; nothing of the phrase did
    assert stream.rejection is not None and stream.rejection.code == "content_filtered"
