"""The sidecar's own CPU cost per streamed event, without gRPC, Envoy or a network in the way.

bench/streaming.py measures the processors behind Envoy; this drives ``ExternalProcessor.Process``
(pluginchain, with bench/chains/stream.yaml compiled as the sidecar compiles it, metrics bound)
and the bare processor's ``Process`` (``bare_processor.py --mode stream``) directly on one event
loop, with the messages Envoy sends for one streamed completion in the paced scenario: the request
headers, the response headers (``text/event-stream``), then every event of the answer ("You said:
<prompt>", 42 words, one with an SSN, repeated ``--repeat`` times) as its own response_body chunk,
as an LLM's tokens arrive, and an empty last chunk with end_of_stream. Every answer is serialized,
as grpc does. It reports microseconds per event; chain - bare is what pluginchain's Python adds
per event on top of the gRPC and event-loop work both processors share.

Each chain stream is checked: the client gets the whole answer with every SSN redacted.
``--events-per-chunk N`` hands the events over N per chunk instead, as Envoy does when the
upstream is faster than the processor (bench/streaming.py's throughput run: about 38 for bare,
150 for the chain).

    .venv/bin/python bench/streaming_overhead.py [--repeat 200] [--streams 5] [--events-per-chunk 1] [--profile]

``--profile`` prints the top functions of the chain runs under cProfile (cProfile inflates every
Python call, so read its percentages, not its absolute times).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import pstats
import sys
import time
from pathlib import Path

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from bare_processor import BareProcessor
from extproc_overhead import _Context
from run_bench import API_KEY, PATH
from streaming import MASK, PROMPT, SSN, chat_request

from pluginchain._config.files import load_file
from pluginchain._config.registry import default_registry
from pluginchain._sidecar.extproc import ExternalProcessor
from pluginchain._sidecar.plans import PlanHolder, serving_plan

CHAIN_FILE = BENCH / "chains" / "stream.yaml"


def answer_events(repeat: int) -> list[bytes]:
    """The events examples/demo_upstream.py streams for the benchmark's prompt, byte for byte."""
    ident, created = "chatcmpl-demo-1764400000000", 1764400000

    def event(delta: dict, finish_reason: str | None = None) -> bytes:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
        body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": "demo-model", "choices": choices}
        return f"data: {json.dumps(body)}\n\n".encode()

    words = " ".join([f"You said: {PROMPT}"] * repeat).split(" ")
    events = [event({"role": "assistant", "content": ""})]
    events += [event({"content": word + (" " if number + 1 < len(words) else "")}) for number, word in enumerate(words)]
    return [*events, event({}, "stop"), b"data: [DONE]\n\n"]


def envoy_messages(repeat: int, stream_number: int, events_per_chunk: int = 1) -> list[pb.ProcessingRequest]:
    """What Envoy sends the processor for one streamed completion, ``events_per_chunk`` events per body chunk."""
    body = chat_request(PROMPT)
    request_headers = [
        (":authority", "127.0.0.1:8080"), (":path", PATH), (":method", "POST"), (":scheme", "http"),
        ("content-length", str(len(body))), ("content-type", "application/json"), ("x-api-key", API_KEY),
        ("x-forwarded-proto", "http"), ("x-request-id", f"5f0c7e2a-0000-4000-8000-{stream_number:012d}"),
    ]
    response_headers = [(":status", "200"), ("content-type", "text/event-stream"), ("transfer-encoding", "chunked")]

    def header_map(headers: list[tuple[str, str]]) -> base_pb2.HeaderMap:
        return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers])

    messages = [
        pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=header_map(request_headers), end_of_stream=False)),
        pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=header_map(response_headers), end_of_stream=False)),
    ]
    events = answer_events(repeat)
    chunks = [b"".join(events[start:start + events_per_chunk]) for start in range(0, len(events), events_per_chunk)]
    messages += [pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk, end_of_stream=False)) for chunk in chunks]
    messages.append(pb.ProcessingRequest(response_body=pb.HttpBody(body=b"", end_of_stream=True)))
    return messages


async def _messages(items):
    for item in items:
        yield item


async def _one_stream(servicer, messages: list[pb.ProcessingRequest], context) -> bytes:
    """Run one stream; what the client receives (each chunk as it was, or as the processor replaced it)."""
    bodies = iter(m.response_body.body for m in messages if m.HasField("response_body"))
    received = []
    async for answer in servicer.Process(_messages(messages), context):
        answer.SerializeToString()  # what grpc does with every answer; a real cost both processors pay
        if answer.HasField("response_body"):
            original = next(bodies)
            mutation = answer.response_body.response.body_mutation
            received.append(mutation.body if mutation.HasField("body") else b"" if mutation.clear_body else original)
    return b"".join(received)


def _content(stream: bytes) -> str:
    text = []
    for raw in stream.split(b"\n\n"):
        if raw.startswith(b"data: {"):
            delta = json.loads(raw[6:])["choices"][0]["delta"]
            text.append(delta.get("content") or "")
    return "".join(text)


def _processor(kind: str):
    if kind == "bare":
        return BareProcessor("stream")
    registry = default_registry(())
    return ExternalProcessor(PlanHolder(serving_plan(load_file(CHAIN_FILE, registry), registry)))


async def _drive(servicer, prepared: list[list[pb.ProcessingRequest]], events: int, check: str | None) -> float:
    """Seconds per event over ``prepared``'s streams (``events`` in all), one after another."""
    context = _Context()
    started = time.perf_counter()
    outputs = [await _one_stream(servicer, messages, context) for messages in prepared]
    seconds = (time.perf_counter() - started) / events
    if check is not None:
        for output in outputs:
            if _content(output) != check:
                raise SystemExit(f"the chain's stream is not the redacted answer: {_content(output)[:300]!r}")
    return seconds


def _events(repeat: int) -> int:
    return len(answer_events(repeat))


async def _measure(kind: str, repeat: int, streams: int, rounds: int, events_per_chunk: int) -> float:
    servicer = _processor(kind)
    expected = " ".join([f"You said: {PROMPT}"] * repeat)
    check = expected.replace(SSN, MASK) if kind == "chain" else expected
    prepared = [envoy_messages(repeat, number, events_per_chunk) for number in range(streams)]
    await _drive(servicer, prepared[:1], _events(repeat), check)  # warm-up
    gc.collect()
    return min([await _drive(servicer, prepared, streams * _events(repeat), check) for _ in range(rounds)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200, help="answers per stream (42 events each; default 200, as the paced run)")
    parser.add_argument("--streams", type=int, default=5, help="streams per measured round")
    parser.add_argument("--rounds", type=int, default=5, help="best of this many rounds")
    parser.add_argument("--events-per-chunk", type=int, default=1, help="events Envoy hands over per body chunk (default 1, paced)")
    parser.add_argument("--only", choices=("bare", "chain"), help="measure one processor only")
    parser.add_argument("--profile", action="store_true", help="cProfile the chain runs and print their top functions")
    parser.add_argument("--top", type=int, default=30, help="functions listed per --profile table")
    args = parser.parse_args()

    results = {}
    for kind in ("bare", "chain"):
        if args.only in (None, kind):
            results[kind] = asyncio.run(_measure(kind, args.repeat, args.streams, args.rounds, args.events_per_chunk))
            print(f"{kind:<6} {results[kind] * 1e6:7.2f} us per event", flush=True)
    if len(results) == 2:
        print(f"  pluginchain adds {(results['chain'] - results['bare']) * 1e6:.2f} us per event", flush=True)

    if args.profile:
        servicer = _processor("chain")
        prepared = [envoy_messages(args.repeat, number, args.events_per_chunk) for number in range(args.streams)]
        asyncio.run(_drive(servicer, prepared[:1], 1, None))
        profiler = cProfile.Profile()
        profiler.enable()
        asyncio.run(_drive(servicer, prepared, 1, None))
        profiler.disable()
        events = args.streams * _events(args.repeat)
        stats = pstats.Stats(profiler)
        total = stats.total_tt  # type: ignore[attr-defined]
        print(f"\n=== chain under cProfile: {events} events ===")
        rows = [(tt, ct, nc, f"{Path(f).name}:{line}({fn})") for (f, line, fn), (cc, nc, tt, ct, _) in stats.stats.items()]  # type: ignore[attr-defined]
        for title, key in (("own time", 0), ("cumulative time", 1)):
            print(f"\n{'own %':>6} {'cum %':>6} {'calls/ev':>9}  function   (top {args.top} by {title})")
            for tt, ct, nc, name in sorted(rows, key=lambda row: row[key], reverse=True)[:args.top]:
                print(f"{100 * tt / total:6.1f} {100 * ct / total:6.1f} {nc / events:9.2f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
