"""A streamed response through a chain, chunk by chunk, as the sidecar feeds it from Envoy.

What a client would notice: the events it receives, when text leaves, what never leaves.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from pluginchain import (
    Exchange,
    HttpMessage,
    Plugin,
    PluginConfig,
    PluginContext,
    PluginData,
    Reject,
    Stage,
    StreamMode,
)
from pluginchain._config.issues import ConfigError
from pluginchain._config.registry import PluginRegistry, default_registry
from pluginchain._config.validation import validate_document
from pluginchain._engine.plan import compile_plan
from pluginchain._engine.streaming import EventFramer, RawEvent, ResponseStream

SSN = r"\b\d{3}-\d{2}-\d{4}\b"
ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"


class WholeConfig(PluginConfig):
    limit_bytes: int | None = None
    reject_if: str | None = None


class WholeJudge(Plugin):
    """Sees the whole stream at its end, like an external validator that wants everything."""

    name = "whole_judge"
    Config = WholeConfig
    stages = frozenset({Stage.POST_REQUEST})
    reads_body = True
    streams = frozenset({StreamMode.WHOLE})
    seen: list[bytes] = []

    def needs(self):
        return super().needs().__class__(response_body=True, stream=StreamMode.WHOLE, stream_limit_bytes=self.config.limit_bytes)

    async def execute(self, ctx: PluginContext, data: PluginData) -> None:
        assert data.event is None and data.body is not None
        WholeJudge.seen.append(data.body)
        if self.config.reject_if and self.config.reject_if.encode() in data.body:
            raise Reject(403, "judged whole and refused", code="whole_refused")


class StreamsNothing(Plugin):
    name = "streams_nothing"
    stages = frozenset({Stage.POST_REQUEST})
    reads_body = True
    streams = frozenset()

    async def execute(self, ctx: PluginContext, data: PluginData) -> None:
        return None


def registry() -> PluginRegistry:
    registry = default_registry()
    registry.register(WholeJudge)
    registry.register(StreamsNothing)
    return registry


def stream_through(*plugins: dict[str, Any], limit: int = 1 << 20) -> ResponseStream:
    chain = compile_plan(validate_document(list(plugins), registry()), registry()).chains["default"]
    exchange = Exchange(request=HttpMessage({}), response=HttpMessage({":status": "200", "content-type": "text/event-stream"}))
    return ResponseStream(chain, exchange, max_event_bytes=limit, max_buffer_bytes=limit)


def redactor(action: str = "redact", **config: Any) -> dict[str, Any]:
    return {"name": "content_filter", "stage": "post_request", "config": {"banned_patterns": [SSN], "action": action, **config}}


def chat_event(text: str | None = None, *, finish: str | None = None, index: int = 0, **delta: Any) -> bytes:
    if text is not None:
        delta["content"] = text
    choice = {"index": index, "delta": delta, "finish_reason": finish}
    return b"data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "choices": [choice]}).encode() + b"\n\n"


def chat_stream(*words: str) -> list[bytes]:
    return [chat_event("", role="assistant"), *(chat_event(word) for word in words), chat_event(finish="stop"), b"data: [DONE]\n\n"]


async def feed_all(stream: ResponseStream, chunks: list[bytes]) -> list[bytes]:
    """What the client receives for each chunk, the last one ending the stream."""
    return [await stream.feed(chunk, index == len(chunks) - 1) for index, chunk in enumerate(chunks)]


def events(received: bytes) -> list[dict[str, Any] | str]:
    """The data of each event the client got, JSON decoded (``[DONE]`` as is)."""
    found: list[dict[str, Any] | str] = []
    for block in received.decode().split("\n\n"):
        data = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        if data:
            payload = "\n".join(data)
            found.append(payload if payload == "[DONE]" else json.loads(payload))
    return found


def content(received: bytes, kind: str = "content") -> str:
    return "".join(
        choice["delta"].get(kind) or ""
        for event in events(received) if isinstance(event, dict)
        for choice in event.get("choices", [])
    )


async def test_a_match_split_over_events_is_redacted_and_the_text_adds_up():
    stream = stream_through(redactor())
    received = await feed_all(stream, chat_stream("My number is 123", "-45", "-67", "89, call me."))

    whole = b"".join(received)
    assert content(whole) == "My number is [REDACTED], call me."
    assert b"6789" not in whole and b"123" not in whole
    assert events(whole)[-1] == "[DONE]"


async def test_text_leaves_as_soon_as_no_match_can_reach_it():
    stream = stream_through(redactor())
    first_words = "Once upon a time there was a gateway that streamed every word it could."
    received = await feed_all(stream, chat_stream(first_words, " The end."))

    # The pattern matches at most 11 characters: all but the last 10 left with the first event.
    assert content(received[1]) == first_words[:-10]
    assert content(b"".join(received)) == first_words + " The end."


async def test_only_the_strictest_member_decides_what_is_held_back():
    windowed = redactor(banned_patterns=["x+y"], stream_window=40)
    stream = stream_through(redactor(), {**windowed, "id": "windowed"})
    text = "a" * 100
    received = await feed_all(stream, chat_stream(text))
    assert content(received[1]) == text[:-40]


async def test_events_split_across_chunks_and_chunks_holding_several_events_are_both_judged():
    whole = b"".join(chat_stream("My number is ", "123-45-6789", " ok"))
    for size in (1, 7, 64, len(whole)):
        chunks = [whole[i:i + size] for i in range(0, len(whole), size)]
        received = b"".join(await feed_all(stream_through(redactor()), chunks))
        assert content(received) == "My number is [REDACTED] ok", size
        assert all(isinstance(event, dict) or event == "[DONE]" for event in events(received))


async def test_crlf_framing_and_a_last_event_without_its_blank_line():
    framer = EventFramer(1 << 10)
    assert framer.feed(b"data: a\r\n\r\ndata: b\r") == [b"data: a\r\n\r\n"]
    assert framer.feed(b"\n\r\ndata: c") == [b"data: b\r\n\r\n"]
    assert framer.rest() == b"data: c"

    received = await feed_all(stream_through(redactor()), [chat_event("id 123-45-6789").rstrip(b"\n")])
    assert content(b"".join(received)) == "id [REDACTED]"


async def test_events_the_chain_does_not_understand_pass_byte_for_byte():
    unknown = [b": keep-alive\n\n", b"event: demo.progress\ndata: {\"type\": \"demo.progress\",  \"n\": 1}\n\n", b"retry: 100\n\n"]
    received = await feed_all(stream_through(redactor()), [chat_event("hello"), *unknown, chat_event(finish="stop")])
    assert received[1:4] == unknown


async def test_a_reject_mid_stream_ends_it_with_one_error_event_and_no_part_of_the_match():
    stream = stream_through(redactor("reject"))
    chunks = chat_stream("The code is 123", "-45-", "6789 and more", " and more")
    received = await feed_all(stream, chunks)

    whole = b"".join(received)
    error = events(whole)[-1]
    assert error == {"error": {"message": "request blocked by content filter", "type": "permission_error", "code": "content_filtered"}}
    assert b"123" not in whole and b"[DONE]" not in whole
    rejected_at = next(i for i, chunk in enumerate(received) if b'"error"' in chunk)
    assert all(chunk == b"" for chunk in received[rejected_at + 1:])  # later upstream chunks are dropped
    assert stream.rejection is not None and stream.rejection.plugin_id == "content_filter"


async def test_invisible_characters_do_not_let_the_start_of_a_match_out_early():
    stream = stream_through(redactor("reject"))
    stretched = "\u200b".join("123-45")  # zero-width spaces: dropped before matching
    received = await feed_all(stream, chat_stream("padding " * 3 + stretched, "-6789"))
    leaked = content(b"".join(received[:-1]))
    assert "1" not in leaked and "2" not in leaked
    assert events(b"".join(received))[-1]["error"]["code"] == "content_filtered"  # type: ignore[index]


async def test_tool_call_arguments_are_filtered_like_content():
    def call(arguments: str) -> bytes:
        tool_call = {"index": 0, "function": {"arguments": arguments}}
        return chat_event(None, tool_calls=[tool_call])

    received = b"".join(await feed_all(stream_through(redactor()), [call('{"ssn": "123-4'), call('5-6789"}'), chat_event(finish="tool_calls")]))
    arguments = "".join(
        choice["delta"]["tool_calls"][0]["function"]["arguments"]
        for event in events(received) if isinstance(event, dict)
        for choice in event["choices"] if choice["delta"].get("tool_calls")
    )
    assert arguments == '{"ssn": "[REDACTED]"}'


async def test_each_choice_is_its_own_text():
    chunks = [chat_event("a 123-45", index=0), chat_event("-6789 b", index=1), chat_event("-6789", index=0), chat_event(finish="stop", index=0)]
    received = b"".join(await feed_all(stream_through(redactor()), chunks))
    per_choice: dict[int, str] = {}
    for event in events(received):
        for choice in event["choices"] if isinstance(event, dict) else ():
            per_choice[choice["index"]] = per_choice.get(choice["index"], "") + (choice["delta"].get("content") or "")
    assert per_choice == {0: "a [REDACTED]", 1: "-6789 b"}


async def test_completions_and_responses_api_deltas_are_judged_too():
    completion = [b"data: " + json.dumps({"object": "text_completion", "choices": [{"index": 0, "text": text}]}).encode() + b"\n\n"
                  for text in ("ssn 123-45", "-6789.")]
    received = b"".join(await feed_all(stream_through(redactor()), completion))
    assert "".join(event["choices"][0]["text"] for event in events(received) if isinstance(event, dict)) == "ssn [REDACTED]."

    def responses(kind: str, **fields: Any) -> bytes:
        return f"event: {kind}\ndata: ".encode() + json.dumps({"type": kind, "output_index": 0, "content_index": 0, **fields}).encode() + b"\n\n"

    chunks = [
        responses("response.output_text.delta", delta="ssn 123-4"),
        responses("response.output_text.delta", delta="5-6789."),
        responses("response.output_text.done", text="ssn 123-45-6789."),
        responses("response.completed", response={"output": [{"content": [{"type": "output_text", "text": "ssn 123-45-6789."}]}]}),
    ]
    received = b"".join(await feed_all(stream_through(redactor()), chunks))
    got = events(received)
    deltas = "".join(event["delta"] for event in got if isinstance(event, dict) and event["type"] == "response.output_text.delta")
    assert deltas == "ssn [REDACTED]."
    assert b"6789" not in received  # the whole texts of the done and completed events are masked too
    assert received.count(b"event: response.output_text.delta") >= 2


async def test_a_whole_mode_member_sees_the_whole_stream_before_any_of_it_leaves():
    WholeJudge.seen.clear()
    stream = stream_through(redactor(), {"name": "whole_judge", "stage": "post_request"})
    received = await feed_all(stream, chat_stream("ssn 123-45-6789", " fine"))

    assert received[:-1] == [b""] * (len(received) - 1)
    assert content(received[-1]) == "ssn [REDACTED] fine"
    assert WholeJudge.seen == [received[-1]]  # after the per-event redaction

    refused = stream_through({"name": "whole_judge", "stage": "post_request", "config": {"reject_if": "fine"}})
    received = await feed_all(refused, chat_stream("all fine"))
    assert b"fine" not in b"".join(received)
    assert events(received[-1]) == [{"error": {"message": "judged whole and refused", "type": "permission_error", "code": "whole_refused"}}]


async def test_a_whole_mode_member_past_its_limit_ends_the_stream_with_an_error_event():
    stream = stream_through({"name": "whole_judge", "stage": "post_request", "config": {"limit_bytes": 300}})
    received = await feed_all(stream, chat_stream(*["word "] * 20))
    error = events(b"".join(received))
    assert [e["error"]["code"] for e in error if isinstance(e, dict)] == ["stream_too_large"]
    assert b"word" not in b"".join(received)


async def test_an_event_larger_than_the_limit_ends_the_stream_instead_of_growing_memory():
    stream = stream_through(redactor(), limit=1000)
    received = await stream.feed(b"data: " + b"x" * 2000, False)
    assert events(received)[0]["error"]["code"] == "stream_too_large"  # type: ignore[index]
    assert await stream.feed(b"\n\n", True) == b""


def test_a_plugin_that_cannot_judge_streams_is_refused_in_post_request():
    with pytest.raises(ConfigError) as caught:
        validate_document([{"name": "streams_nothing", "stage": "post_request"}], registry())
    assert "cannot judge a streamed response" in str(caught.value)


async def test_the_readme_example_plugin_calms_shouts_streamed_or_not():
    example = ROOT / "examples" / "plugins" / "shout_guard.py"
    assert example.read_text().split('"""', 2)[2].strip() in README.read_text(), "README shows examples/plugins/shout_guard.py"
    registry = default_registry([str(example)])
    chain = compile_plan(validate_document([{"name": "shout_guard", "stage": "post_request"}], registry), registry).chains["default"]

    exchange = Exchange(request=HttpMessage({}), response=HttpMessage({":status": "200"}))
    stream = ResponseStream(chain, exchange, max_event_bytes=1 << 20, max_buffer_bytes=1 << 20)
    received = await feed_all(stream, chat_stream("I SAID HELL", "O THERE", ", OK? FINE."))
    assert content(b"".join(received)) == "I said hello there, OK? fine."

    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "STOP SHOUTING"}}]}
    exchange = Exchange(request=HttpMessage({}), response=HttpMessage({":status": "200"}, json.dumps(body).encode()))
    await chain.run_stage(Stage.POST_REQUEST, exchange)
    assert json.loads(exchange.response.body)["choices"][0]["message"]["content"] == "stop shouting"


async def test_a_stream_inventing_a_new_channel_per_event_is_ended_not_remembered():
    stream = stream_through(redactor())
    chunks = [chat_event(None, tool_calls=[{"index": i, "function": {"arguments": "x"}}]) for i in range(1100)]
    received = b"".join(await feed_all(stream, chunks))
    assert events(received)[-1]["error"]["code"] == "stream_too_large"  # type: ignore[index]


async def test_text_released_before_a_reject_reaches_the_client_however_the_chunks_were_cut():
    chunks = chat_stream("Before ", "the reject, plenty of allowed text. ", "Now 123-45-6789", " after")
    one_per_event = b"".join(await feed_all(stream_through(redactor("reject")), chunks))
    all_at_once = await stream_through(redactor("reject")).feed(b"".join(chunks), True)
    # The last 10 characters before the match were still held back (the pattern's longest match less one).
    assert content(one_per_event) == content(all_at_once) == "Before the reject, plenty of allowed text. "[:-10]
    assert events(all_at_once)[-1]["error"]["code"] == "content_filtered"  # type: ignore[index]


async def test_an_event_too_deeply_nested_to_read_ends_the_stream():
    nested = b"data: " + b'{"a":' * 200 + b'"x"' + b"}" * 200 + b"\n\n"
    received = await stream_through(redactor()).feed(chat_event("fine " * 5) + nested, True)
    assert content(received) == ("fine " * 5)[:-10]  # what was released before it, not what was held
    assert events(received)[-1]["error"]["code"] == "stream_unreadable"  # type: ignore[index]


@pytest.mark.parametrize("unreadable", [
    b'data: {"choices":[{"index":0,"delta":{"content":"123-45-6789","content":"ok"}}]}\n\n',  # which one does the client take?
    b'data: {"choices":[{"index":0,"delta":{"content":"123-45-\\ud800-6789"}}]}\n\n',  # a lone surrogate
])
async def test_an_event_two_readers_may_read_differently_ends_the_stream(unreadable: bytes):
    received = await stream_through(redactor()).feed(chat_event("fine " * 5) + unreadable, True)
    assert "123" not in content(received)
    assert events(received)[-1]["error"]["code"] == "stream_unreadable"  # type: ignore[index]


async def test_events_whose_text_leaves_as_it_came_are_not_rewritten():
    role, first, done = chat_event("", role="assistant"), chat_event("a" * 40), chat_event(finish="stop")
    received = await feed_all(stream_through(redactor()), [role, first, chat_event(" and more"), done])
    assert received[0] == role  # no text to hold: byte for byte
    assert received[1] != first and content(received[1]) == "a" * 30  # 10 characters held back


@pytest.mark.parametrize("whole", [
    b"data: a\n\n",
    b"data: a\n\ndata: b\n\n",
    b"data: a\n\ndata: b",
    b"data: a\n\n\n",
    b"\n\n",
    b"\n",
    b"x",
    b"data: a\r\n\r\n",
    b"data: a\n\r\n",
    b"data: a\nid: 1\n\n",
    b"event: e\ndata: a\n\n",
    b"event: e\r\ndata: a\r\ndata: b\r\n\r\n",
])
def test_a_chunk_is_cut_into_the_same_events_whole_or_byte_by_byte(whole: bytes):
    # Whole, a one-event chunk takes the framer's shortcut; byte by byte it never can.
    at_once, by_byte = EventFramer(1 << 10), EventFramer(1 << 10)
    by_byte_events = [event for byte in range(len(whole)) for event in by_byte.feed(whole[byte:byte + 1])]
    assert at_once.feed(whole) == by_byte_events
    assert at_once.rest() == by_byte.rest()


@pytest.mark.parametrize("payload", [b'{"a": "b"}', b"", b"x: y", b"caf\xc3\xa9", b"bad \xff\xfe utf-8 \xe2\x82", b"[DONE]"])
def test_an_event_of_one_data_line_reads_and_rewrites_as_the_line_by_line_reading(payload: bytes):
    lf, crlf = RawEvent.parse(b"data: " + payload + b"\n\n"), RawEvent.parse(b"data: " + payload + b"\r\n\r\n")
    assert lf.lone_data_line and not crlf.lone_data_line  # the shortcut, and the general reading
    assert (lf.type, lf.data) == (crlf.type, crlf.data)
    general = RawEvent(lf.raw, lf.type, lf.data)
    for new_data in ('{"a":"c"}', "two\nlines", "", "ünï"):
        assert lf.with_data(new_data) == general.with_data(new_data)


async def test_a_match_after_non_ascii_text_is_masked_where_it_is():
    # Non-ASCII text is matched as str (offsets mapped back from UTF-8), ASCII text as bytes.
    for before in ("Número ", "Number ", "№ ｏｎｅ "):
        stream = stream_through(redactor())
        received = content(b"".join(await feed_all(stream, chat_stream(before + "123", "-45-6789 and é", " more"))))
        # What was still held when the match was masked leaves in its canonical form (NFKC).
        assert unicodedata.normalize("NFKC", received) == unicodedata.normalize("NFKC", before) + "[REDACTED] and é more", before


async def test_an_event_of_several_crlf_lines_is_judged_as_one():
    # A CR and the LF after it are one line break, not the blank line that would end the event.
    stream = stream_through(redactor("reject", banned_patterns=["launch codes"], flexible_whitespace=True))
    received = await stream.feed(b"event: note\r\ndata: the launch\r\ndata: codes are 0000\r\n\r\n", True)
    assert b"launch" not in received
    assert events(received)[-1]["error"]["code"] == "content_filtered"  # type: ignore[index]
