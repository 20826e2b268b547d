"""Token usage: read from every response shape, asked of streams that would not report it, and
hidden again from a client that did not ask."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pluginchain import Exchange, HttpMessage, Needs, Plugin, PluginContext, PluginData, Stage, Usage
from pluginchain._config.registry import PluginRegistry
from pluginchain._config.validation import validate_document
from pluginchain._engine.plan import compile_plan
from pluginchain._engine.streaming import ResponseStream
from pluginchain._engine.usage import ask_for_stream_usage, usage_of


class Meter(Plugin):
    """Needs usage and records what finish() saw."""

    name = "meter"
    stages = frozenset({Stage.PRE_REQUEST})
    suspends = False
    finished: list[Usage | None] = []

    def needs(self) -> Needs:
        return Needs(usage=True, finish=True, suspends=False)

    async def execute(self, ctx: PluginContext, data: PluginData) -> None:
        return None

    async def finish(self, ctx: PluginContext, data: PluginData) -> None:
        Meter.finished.append(data.exchange.usage)


def meter_chain():
    registry = PluginRegistry()
    registry.register(Meter)
    return compile_plan(validate_document([{"name": "meter"}], registry), registry).chains["default"]


@pytest.mark.parametrize(
    ("document", "usage"),
    [
        ({"object": "chat.completion", "model": "m1", "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}},
         Usage(3, 5, 8, "m1")),
        ({"object": "response", "model": "m2", "usage": {"input_tokens": 4, "output_tokens": 6, "total_tokens": 10}}, Usage(4, 6, 10, "m2")),
        ({"type": "response.completed", "response": {"model": "m3", "usage": {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}}},
         Usage(1, 2, 3, "m3")),
        ({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 0}}, Usage(7, 0, 7, None)),
        ({"choices": [{"delta": {"content": "x"}}], "usage": None}, None),
        ({"usage": {"prompt_tokens": -1, "completion_tokens": "many"}}, None),
    ],
)
def test_usage_is_read_from_every_response_shape(document: dict[str, Any], usage: Usage | None):
    assert usage_of(document) == usage


def test_a_chat_stream_is_asked_for_usage_unless_it_asks_already():
    chat = {"model": "m", "stream": True, "messages": []}
    assert ask_for_stream_usage(chat) == {**chat, "stream_options": {"include_usage": True}}
    assert ask_for_stream_usage({**chat, "stream_options": {"include_obfuscation": False}})["stream_options"] == {
        "include_obfuscation": False, "include_usage": True}
    assert ask_for_stream_usage({**chat, "stream_options": {"include_usage": True}}) is None
    assert ask_for_stream_usage({**chat, "stream": False}) is None
    assert ask_for_stream_usage({"model": "m", "stream": True, "input": "hi"}) is None  # Responses API: always reports


def chunk(document: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(document).encode() + b"\n\n"


STREAM = [
    chunk({"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}], "usage": None}),
    chunk({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None}),
    chunk({"id": "c", "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}),
    b"data: [DONE]\n\n",
]


async def test_usage_the_sidecar_asked_for_is_recorded_and_hidden_from_the_client():
    exchange = Exchange(request=HttpMessage({}), response=HttpMessage({":status": "200"}))
    stream = ResponseStream(meter_chain(), exchange, 1 << 20, 1 << 20, hide_usage=True)
    received = b"".join([await stream.feed(part, i == len(STREAM) - 1) for i, part in enumerate(STREAM)])

    assert exchange.usage == Usage(2, 1, 3, None)
    assert b"usage" not in received  # neither the usage chunk nor the nulls OpenAI adds when asked
    assert received.endswith(b"data: [DONE]\n\n")
    assert [json.loads(line[6:])["choices"][0]["finish_reason"] for line in received.split(b"\n\n")[:2]] == [None, "stop"]


async def test_usage_the_client_asked_for_passes_byte_for_byte():
    exchange = Exchange(request=HttpMessage({}), response=HttpMessage({":status": "200"}))
    stream = ResponseStream(meter_chain(), exchange, 1 << 20, 1 << 20, hide_usage=False)
    received = [await stream.feed(part, i == len(STREAM) - 1) for i, part in enumerate(STREAM)]
    assert received == STREAM
    assert exchange.usage == Usage(2, 1, 3, None)


async def test_a_chain_that_needs_usage_reads_requests_and_responses_and_finishes_with_it():
    chain = meter_chain()
    assert chain.phases.request_body and chain.phases.response_body and chain.needs_usage
    Meter.finished.clear()
    exchange = Exchange(request=HttpMessage({}), usage=Usage(1, 2, 3, "m"))
    await chain.finish(exchange)
    await chain.finish(Exchange(request=HttpMessage({})))
    assert Meter.finished == [Usage(1, 2, 3, "m"), None]


def test_every_metric_the_sidecar_exports_is_documented_in_the_readme():
    from pathlib import Path

    from prometheus_client.metrics import MetricWrapperBase

    from pluginchain import _metrics

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    metrics = [value for value in vars(_metrics).values() if isinstance(value, MetricWrapperBase)]
    assert len(metrics) >= 10
    for metric in metrics:
        name = metric._name + ("_total" if metric._type == "counter" else "")
        assert f"`{name}`" in readme, name
