"""Streamed completions through the real Envoy, the real sidecar and the demo upstream: what a
client application notices (words arriving as they are generated, redacted, or cut off by an
error it can read) and what it must never see (a banned word, a broken event)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import NamedTuple

import httpx
import openai
import pytest

from tests.support.harness import Gateway, running_gateway

# A US social security number, with dashes or spaces: the demo upstream streams one word per
# event, so "123 45 6789" reaches the gateway in three events. Its longest match is 11
# characters, so the filter keeps 10 back.
SSN = r"\b\d{3}[- ]\d{2}[- ]\d{4}\b"
REJECT_MESSAGE = "the answer mentioned something it must not"

CHAINS = """
    chains:
      default:
        - name: content_filter
          stage: post_request
          config: {banned_patterns: ['%s'], action: redact}
      plain: []
      rejecting:
        - name: content_filter
          stage: post_request
          config: {banned_patterns: ['launch codes'], action: reject, message: '%s'}
""" % (SSN, REJECT_MESSAGE)
ROUTES = (("/plain/", "plain"), ("/rejecting/", "rejecting"))


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Iterator[Gateway]:
    """One gateway for the tests that need no Envoy settings of their own: the redacting chain
    by default, ``/plain/`` without a post_request plugin, ``/rejecting/`` rejecting."""
    with running_gateway(tmp_path_factory.mktemp("streaming"), CHAINS, ROUTES) as gw:
        yield gw


@contextmanager
def sdk(gw: Gateway, prefix: str = "") -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=f"{gw.url}{prefix}/v1", api_key="test", max_retries=0)
    try:
        yield client
    finally:
        client.close()


class Event(NamedTuple):
    raw: bytes
    type: str | None
    data: str | None


def parse_events(raw: bytes) -> list[Event]:
    """The events of a complete event stream, asserting each is well formed: lines of known
    fields or comments, ended by a blank line, and JSON data (but for ``[DONE]``)."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    events = []
    for block in raw[:-2].split(b"\n\n"):
        kind, data = None, []
        assert block, f"an empty event in {raw!r}"
        for line in block.decode().split("\n"):
            if line.startswith(":"):
                continue
            name, colon, value = line.partition(": ")
            assert colon and name in ("data", "event", "id", "retry"), f"not an SSE line: {line!r}"
            if name == "data":
                data.append(value)
            elif name == "event":
                kind = value
        joined = "\n".join(data) if data else None
        if joined is not None and joined != "[DONE]":
            json.loads(joined)
        events.append(Event(block + b"\n\n", kind, joined))
    return events


def content_of(events: list[Event]) -> str:
    """The completion text: the chat chunks' delta contents, joined."""
    text = ""
    for event in events:
        if event.data is None or event.data == "[DONE]":
            continue
        for choice in json.loads(event.data).get("choices", []):
            text += choice.get("delta", {}).get("content") or ""
    return text


def stream_raw(gw: Gateway, content: str, *, prefix: str = "", headers: dict | None = None) -> list[tuple[float, bytes]]:
    """A streamed chat completion's body as the client reads it: (seconds since the request
    was sent, bytes) per network read, the last one empty, when the response ended."""
    body = {"model": "demo-model", "messages": [{"role": "user", "content": content}], "stream": True}
    reads = []
    start = time.perf_counter()
    with httpx.stream("POST", f"{gw.url}{prefix}/v1/chat/completions", json=body, headers=headers or {}, timeout=30) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for data in response.iter_raw():
            reads.append((time.perf_counter() - start, data))
        reads.append((time.perf_counter() - start, b""))
    return reads


def timed_events(reads: list[tuple[float, bytes]]) -> list[tuple[float, Event]]:
    """Each event with the time the read that completed it arrived."""
    timed, buffer = [], b""
    for at, data in reads:
        buffer += data
        *complete, buffer = buffer.split(b"\n\n")
        timed.extend((at, event) for block in complete for event in parse_events(block + b"\n\n"))
    assert buffer == b""
    return timed


def without_ids(raw: bytes) -> bytes:
    """The stream without its chunk ids and timestamps, whose digits are the upstream's own."""
    return re.sub(rb'"(?:id|created)":\s*(?:"[^"]*"|\d+)', b"", raw)


WORDS = "alpha bravo charlie delta echo foxtrot golf hotel"


def test_the_first_words_arrive_about_as_soon_through_a_redactor_as_without(shared):
    delay = 0.3

    def first_word_and_end(prefix: str) -> tuple[float, float, list[float], str]:
        with sdk(shared, prefix) as client:
            start = time.perf_counter()
            stream = client.chat.completions.create(
                model="demo-model", messages=[{"role": "user", "content": WORDS}], stream=True,
                extra_headers={"x-demo-delay": str(delay)},
            )
            arrivals, text = [], ""
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    arrivals.append(time.perf_counter() - start)
                    text += chunk.choices[0].delta.content
            return arrivals[0], time.perf_counter() - start, arrivals, text

    # Both at once: they share the machine's load, and the test takes one stream's time.
    with ThreadPoolExecutor(2) as pool:
        plain_run, redacted_run = pool.map(first_word_and_end, ["/plain", ""])
    plain_first, _, plain_arrivals, plain_text = plain_run
    redacted_first, redacted_total, _, redacted_text = redacted_run
    assert plain_text == redacted_text == f"You said: {WORDS}"
    # The time between two words, as this run measured it on the stream nothing held back.
    interval = (plain_arrivals[-1] - plain_arrivals[0]) / (len(plain_arrivals) - 1)
    # The redactor holds back 10 characters: "You said: " (2 events), then it lets text go.
    assert redacted_first < 0.5 * redacted_total, (redacted_first, redacted_total)
    assert redacted_first <= plain_first + 3 * interval, (redacted_first, plain_first, interval)


def test_the_client_receives_the_words_over_time_not_in_one_burst(shared):
    said = "one two three four five six"
    reads = stream_raw(shared, said, headers={"x-demo-delay": "0.08", "x-demo-repeat": "2"})
    duration = reads[-1][0]
    events = timed_events(reads)
    assert content_of([event for _, event in events]) == f"You said: {said} You said: {said}"
    worded = sorted({at for at, event in events if content_of([event])})
    # 16 words, 19 events; the redactor holds "You said: " back until the next word comes.
    assert len(worded) >= 12, worded
    assert len(reads) >= 16, [at for at, _ in reads]
    # Spread over the stream: no tenth of it brings more than a third of the words' arrivals.
    assert worded[-1] - worded[0] >= 0.5 * duration, (worded, duration)
    busiest = max(sum(1 for at in worded if start <= at < start + duration / 10) for start in worded)
    assert busiest <= len(worded) / 3, (worded, duration)


@pytest.mark.parametrize(("said", "expected"), [
    ("call 123-45-6789 now", "call [REDACTED] now"),
    ("call 123 45 6789 now", "call [REDACTED] now"),  # the number spans three events
    ("ends with 123 45 6789", "ends with [REDACTED]"),  # released only when the choice finishes
    ("a 123-45-6789 b 987 65 4321 c", "a [REDACTED] b [REDACTED] c"),
], ids=["one-event", "three-events", "at-the-end", "two-numbers"])
def test_a_number_split_over_events_and_network_chunks_is_redacted(shared, said, expected):
    reads = stream_raw(shared, said, headers={"x-demo-chunking": "split"})
    raw = b"".join(data for _, data in reads)
    events = parse_events(raw)
    assert content_of(events) == f"You said: {expected}"
    assert events[-1].data == "[DONE]"
    assert json.loads(events[-2].data or "")["choices"][0]["finish_reason"] == "stop"
    # No digit of the number anywhere, in any event, in any field.
    assert not re.search(rb"\d{2}", without_ids(raw)), without_ids(raw)


def test_a_banned_phrase_mid_stream_ends_it_with_an_error_the_sdk_raises(shared):
    said = "alpha bravo charlie launch codes delta echo foxtrot golf"
    reads = stream_raw(shared, said, prefix="/rejecting", headers={"x-demo-delay": "0.1"})
    raw = b"".join(data for _, data in reads)
    events = timed_events(reads)
    error_at, error_event = events[-1]
    assert json.loads(error_event.data or "") == {
        "error": {"message": REJECT_MESSAGE, "type": "permission_error", "code": "content_filtered"},
    }
    assert raw.endswith(error_event.raw)  # nothing after it, and no [DONE]
    assert b"[DONE]" not in raw
    # Not a word of the phrase left the gateway: it was held back until it was judged.
    assert b"launch" not in raw and b"codes" not in raw
    received = content_of([event for _, event in events[:-1]])
    assert received.startswith("You said: alpha bravo") and f"You said: {said}".startswith(received)
    # The error came as the phrase was generated, well before the upstream finished.
    assert error_at < 0.8 * reads[-1][0], (error_at, reads[-1][0])

    text, error = sdk_until_error(shared, said, {"x-demo-delay": "0.1"})
    assert error.message == REJECT_MESSAGE
    assert isinstance(error.body, dict) and error.body["code"] == "content_filtered"
    assert text == received


def sdk_until_error(gw: Gateway, said: str, headers: dict[str, str]) -> tuple[str, openai.APIError]:
    """What the openai SDK yields of a stream on the rejecting chain, and the error it raises."""
    with sdk(gw, "/rejecting") as client:
        stream = client.chat.completions.create(
            model="demo-model", messages=[{"role": "user", "content": said}], stream=True, extra_headers=headers,
        )
        text = ""
        with pytest.raises(openai.APIError) as raised:
            for chunk in stream:
                text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    return text, raised.value


def test_what_the_client_gets_before_an_error_does_not_depend_on_network_chunks(shared):
    said = "alpha bravo charlie launch codes delta echo"
    one_event_per_chunk, _ = sdk_until_error(shared, said, {"x-demo-delay": "0.1"})
    assert one_event_per_chunk.startswith("You said: alpha bravo")
    received = {
        # "launch " and "codes " in one chunk: the text the "launch " event lets go must still
        # reach the client, before the error that "codes " brings.
        "two events per chunk": sdk_until_error(shared, said, {"x-demo-delay": "0.1", "x-demo-chunking": "merge"})[0],
        # No delay: Envoy may read the whole stream at once, and hand the sidecar one chunk.
        "no delay": sdk_until_error(shared, said, {})[0],
    }
    assert received == dict.fromkeys(received, one_event_per_chunk)


@pytest.mark.parametrize("chunking", ["none", "split", "merge"])
def test_events_the_sidecar_does_not_know_pass_byte_for_byte(shared, chunking):
    reads = stream_raw(shared, "hello there", headers={"x-demo-extra-events": "1", "x-demo-chunking": chunking})
    raw = b"".join(data for _, data in reads)
    events = parse_events(raw)
    comment = b": keep-alive\n\n"
    progress = b'event: demo.progress\ndata: {"type": "demo.progress", "words": 1}\n\n'
    assert [event.raw for event in events if event.raw in (comment, progress)] == [comment, progress]
    assert content_of(events) == "You said: hello there"


def test_a_stream_longer_than_envoys_timeouts_completes(shared, tmp_path):
    # A second Envoy in front of the same sidecar, waiting at most 0.4 s for any of its answers
    # (message_timeout, also the gRPC stream's timeout).
    gw = Gateway(tmp_path, shared.chain_file, shared.upstream, sidecar_port=shared.sidecar_port)
    try:
        gw.start_envoy(message_timeout="0.4s")
        said = "my 123-45-6789 is safe"
        reads = stream_raw(gw, said, headers={"x-demo-delay": "0.08", "x-demo-repeat": "4"})
    finally:
        gw.stop()
    assert reads[-1][0] > 3 * 0.4  # the stream outlived the timeout three times
    events = parse_events(b"".join(data for _, data in reads))
    assert events[-1].data == "[DONE]"
    assert content_of(events) == " ".join(["You said: my [REDACTED] is safe"] * 4)


def test_the_openai_sdk_streams_through_the_gateway_with_usage(shared):
    said = "hello there general kenobi"
    with sdk(shared) as client:
        stream = client.chat.completions.create(
            model="demo-model", messages=[{"role": "user", "content": said}], stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == f"You said: {said}"
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason] == ["stop"]
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None
    assert usage.completion_tokens == 6 and usage.total_tokens == 9


def test_a_completion_that_is_not_streamed_is_still_redacted(shared):
    with sdk(shared) as client:
        completion = client.chat.completions.create(
            model="demo-model", messages=[{"role": "user", "content": "my SSN is 123 45 6789, keep it safe"}],
        )
    assert completion.choices[0].message.content == "You said: my SSN is [REDACTED], keep it safe"


def test_a_completion_larger_than_envoys_read_ahead_is_still_judged_whole(shared):
    # Envoy reads 64 KiB ahead of the chain into an upstream's answer; a buffered body goes on to
    # the body limit, and the redactor sees all of it.
    filler = "lorem ipsum " * 25_000  # 300 KB
    with sdk(shared) as client:
        completion = client.chat.completions.create(
            model="demo-model", messages=[{"role": "user", "content": f"{filler}my SSN is 123 45 6789"}],
        )
    assert completion.choices[0].message.content == f"You said: {filler}my SSN is [REDACTED]"
