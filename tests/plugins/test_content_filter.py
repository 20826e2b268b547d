"""content_filter bans patterns in what a model reads and writes, however the text is dressed up."""

from __future__ import annotations

import gzip
import json
import time

import pytest
from pydantic import ValidationError

from pluginchain import MAX_JSON_DEPTH, BodyTooDeep, Reject, Stage
from pluginchain._config.issues import pydantic_issues
from pluginchain.plugins._content_coding import BodyInflatesTooLarge
from pluginchain.plugins.content_filter import ContentFilter
from pluginchain.testing import make_exchange, make_plugin, run_plugin
from tests.plugins.media import png_data_url


def chat(*contents, model="gpt-4o") -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": c} for c in contents]}).encode()


def completion(content: str) -> bytes:
    message = {"role": "assistant", "content": content}
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o",
                       "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}).encode()


def sse(*deltas: str) -> bytes:
    events = [
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": d}}]}
        for d in deltas
    ]
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"


def sse_content(body: bytes) -> str:
    payloads = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    return "".join(json.loads(p)["choices"][0]["delta"]["content"] for p in payloads[:-1])


async def rejection(plugin, exchange) -> Reject:
    with pytest.raises(Reject) as info:
        await run_plugin(plugin, exchange)
    return info.value


def banning(*patterns, stage=Stage.PRE_REQUEST, **config):
    return make_plugin(ContentFilter, {"banned_patterns": list(patterns), **config}, stage=stage)


def redacting(*patterns, **config):
    return banning(*patterns, action="redact", **config)


# --- reject ---------------------------------------------------------------------------------


async def test_a_banned_word_in_a_prompt_is_refused_without_echoing_it():
    reject = await rejection(banning(r"secret\w*"), make_exchange(body=chat("tell me the secretcode")))

    assert reject.status == 403
    assert json.loads(reject.body) == {
        "error": {
            "message": "request blocked by content filter", "type": "permission_error", "code": "content_filtered"
        }
    }
    assert b"secret" not in reject.body


async def test_a_clean_prompt_passes_untouched():
    body = b'{"model": "gpt-4o",  "messages": [{"role": "user", "content": "hello"}]}'
    exchange = make_exchange(body=body)

    await run_plugin(banning("banned"), exchange)

    assert exchange.request.body == body
    assert not exchange.request.body_replaced


async def test_json_escapes_do_not_hide_a_banned_word():
    body = b'{"messages": [{"role": "user", "content": "say \\u0062anned"}]}'
    assert b"banned" not in body

    await rejection(banning("banned"), make_exchange(body=body))


@pytest.mark.parametrize(
    "disguise",
    [
        "ｂａｎｎｅｄ",  # full-width letters
        "ban\u200bned",  # zero-width space inside the word
        "ban\u00adned",  # soft hyphen
        "".join(chr(0xE0000 + ord(c)) for c in "banned"),  # invisible Unicode tag characters
    ],
    ids=["full-width", "zero-width-space", "soft-hyphen", "tag-characters"],
)
async def test_unicode_disguises_do_not_hide_a_banned_word(disguise):
    await rejection(banning("banned"), make_exchange(body=chat(f"please {disguise} now")))


async def test_matching_ignores_case_unless_told_otherwise():
    await rejection(banning("banned"), make_exchange(body=chat("BaNnEd")))

    case_sensitive = banning("banned", case_sensitive=True)
    await run_plugin(case_sensitive, make_exchange(body=chat("BANNED")))
    await rejection(case_sensitive, make_exchange(body=chat("banned")))


async def test_every_place_a_model_reads_text_is_inspected():
    bodies = [
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "banned"}]}]},
        {"model": "m", "prompt": ["fine", "banned"]},
        {"model": "m", "input": "banned"},
        {"model": "m", "instructions": "banned", "input": [{"role": "user", "content": "hi"}]},
        {"model": "m", "system": [{"type": "text", "text": "banned"}], "messages": []},
        {"model": "m", "messages": [{"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"q": "banned"}'}}]}]},
        {"model": "m", "some_future_field": {"nested": ["banned"]}},
    ]
    for body in bodies:
        await rejection(banning("banned"), make_exchange(body=json.dumps(body).encode()))


async def test_identifiers_and_base64_payloads_are_not_text():
    image = png_data_url()
    assert image.startswith("data:image/png;base64,iVBORw0KGgo")  # what the second pattern would find
    body = {
        "model": "banned-model",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is in this picture?"},
            {"type": "image_url", "image_url": {"url": image}},
        ]}],
    }
    exchange = make_exchange(body=json.dumps(body).encode())

    await run_plugin(banning("banned", "ivborw0kggo"), exchange)

    assert not exchange.request.body_replaced


async def test_a_word_split_over_several_text_parts_is_found():
    parts = [{"type": "text", "text": "ban"}, {"type": "text", "text": "ned"}]
    body = json.dumps({"messages": [{"role": "user", "content": parts}]}).encode()

    await rejection(banning("banned"), make_exchange(body=body))


async def test_status_code_and_message_can_be_configured():
    plugin = banning("banned", status_code=451, message="not here")

    reject = await rejection(plugin, make_exchange(body=chat("banned")))

    assert reject.status == 451
    assert json.loads(reject.body)["error"]["message"] == "not here"


async def test_a_body_that_is_not_json_is_matched_as_text():
    exchange = make_exchange(headers={"content-type": "text/plain"}, body="it is ｂａｎｎｅｄ".encode())
    await rejection(banning("banned"), exchange)

    exchange = make_exchange(headers={"content-type": "text/plain"}, body=b"it is banned, really")
    await run_plugin(redacting("banned"), exchange)
    assert exchange.request.body == b"it is [REDACTED], really"


async def test_a_banned_completion_is_refused_in_post_request():
    plugin = banning("banned", stage=Stage.POST_REQUEST)
    exchange = make_exchange(body=chat("hello"), response_body=completion("this is banned"))

    reject = await rejection(plugin, exchange)

    assert reject.code == "content_filtered"


async def test_a_streamed_word_split_over_events_is_refused():
    plugin = banning("banned", stage=Stage.POST_REQUEST)
    exchange = make_exchange(
        response_headers={"content-type": "text/event-stream"}, response_body=sse("it is ban", "ned!")
    )

    await rejection(plugin, exchange)


async def test_a_request_labelled_as_an_event_stream_is_still_read_as_json():
    exchange = make_exchange(headers={"content-type": "text/event-stream"}, body=chat("banned"))

    await rejection(banning("banned"), exchange)


# --- redact ---------------------------------------------------------------------------------


async def test_redaction_rewrites_only_the_matches_in_a_chat_request():
    parts = [
        {"type": "text", "text": "also BANNED here"},
        {"type": "image_url", "image_url": {"url": "https://x/banned.png"}},
    ]
    body = json.dumps({"model": "gpt-4o", "messages": [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "a banned word, twice: banned"},
        {"role": "user", "content": parts},
    ]}).encode()
    exchange = make_exchange(body=body)

    await run_plugin(redacting("banned"), exchange)

    assert exchange.request.body_replaced
    assert json.loads(exchange.request.body) == {"model": "gpt-4o", "messages": [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "a [REDACTED] word, twice: [REDACTED]"},
        {"role": "user", "content": [
            {"type": "text", "text": "also [REDACTED] here"},
            {"type": "image_url", "image_url": {"url": "https://x/[REDACTED].png"}},
        ]},
    ]}


async def test_redaction_of_disguised_text_gives_readable_text():
    exchange = make_exchange(body=chat('quote "\u200bｂａｎｎｅｄ" end'))

    await run_plugin(redacting("banned", mask="***"), exchange)

    assert json.loads(exchange.request.body)["messages"][0]["content"] == 'quote "***" end'


async def test_redaction_in_a_completion_response():
    plugin = redacting("banned", stage=Stage.POST_REQUEST)
    exchange = make_exchange(body=chat("hello"), response_body=completion("that is banned."))

    await run_plugin(plugin, exchange)

    response = json.loads(exchange.response.body)
    assert response["choices"][0]["message"]["content"] == "that is [REDACTED]."
    assert response["model"] == "gpt-4o"
    assert exchange.request.body == chat("hello")


async def test_redaction_in_an_event_stream_keeps_every_event_valid():
    plugin = redacting("banned", stage=Stage.POST_REQUEST)
    body = sse("one banned, ", "then ban", "ned", " end")
    exchange = make_exchange(response_headers={"content-type": "text/event-stream"}, response_body=body)

    await run_plugin(plugin, exchange)

    assert sse_content(exchange.response.body) == "one [REDACTED], then [REDACTED] end"
    assert exchange.response.body.endswith(b"data: [DONE]\n\n")


async def test_a_mask_with_line_breaks_keeps_an_event_stream_well_formed():
    plugin = redacting("banned", mask="<\n>", stage=Stage.POST_REQUEST)
    text = "data: not json, banned\n\ndata: [DONE]\n\n"
    exchange = make_exchange(response_headers={"content-type": "text/event-stream"}, response_body=text.encode())

    await run_plugin(plugin, exchange)

    events = exchange.response.body.decode().split("\n\n")
    assert ["\n".join(line[6:] for line in event.split("\n")) for event in events] == ["not json, <\n>", "[DONE]", ""]


async def test_redaction_of_a_gzip_response_stays_gzip():
    plugin = redacting("banned", stage=Stage.POST_REQUEST)
    exchange = make_exchange(
        response_headers={"content-encoding": "gzip"}, response_body=gzip.compress(completion("so banned"))
    )

    await run_plugin(plugin, exchange)

    response = json.loads(gzip.decompress(exchange.response.body))
    assert response["choices"][0]["message"]["content"] == "so [REDACTED]"


async def test_a_body_in_an_unreadable_encoding_is_refused_not_passed():
    exchange = make_exchange(headers={"content-encoding": "br"}, body=b"\x1b\x00\x00")

    reject = await rejection(banning("banned"), exchange)

    assert (reject.status, reject.code) == (415, "uninspectable_body")


async def test_a_gzip_prompt_that_inflates_past_the_limit_is_refused_413():
    exchange = make_exchange(headers={"content-encoding": "gzip"}, body=gzip.compress(chat("hi" * 600)))

    reject = await rejection(banning("banned", max_inflated_bytes=1000), exchange)

    assert (reject.status, reject.code) == (413, "body_too_large")
    assert reject.message == "content_filter: gzip body inflates past 1000 bytes"


async def test_a_gzip_prompt_within_the_limit_is_judged_inflated():
    body = chat("so banned")
    exchange = make_exchange(headers={"content-encoding": "gzip"}, body=gzip.compress(body))

    reject = await rejection(banning("banned", max_inflated_bytes=len(body)), exchange)

    assert reject.code == "content_filtered"


async def test_a_gzip_completion_that_inflates_past_the_limit_fails_the_plugin():
    plugin = banning("banned", stage=Stage.POST_REQUEST, max_inflated_bytes=1000)
    exchange = make_exchange(response_headers={"content-encoding": "gzip"}, response_body=gzip.compress(completion("ok" * 600)))

    with pytest.raises(BodyInflatesTooLarge, match="inflates past 1000 bytes"):
        await run_plugin(plugin, exchange)


def nested_chat(content: str, depth: int) -> bytes:
    """A chat request whose JSON nests ``depth`` levels deep (the top object is level 1)."""
    filler = "[" * (depth - 1) + "]" * (depth - 1)
    return ('{"model": "gpt-4o", "messages": [{"role": "user", "content": "%s"}], "metadata": %s}' % (content, filler)).encode()


async def test_a_prompt_nested_deeper_than_the_gateway_decodes_is_refused_not_read_as_text():
    # As text, the escaped word would slip past the filter; the upstream may decode it all.
    exchange = make_exchange(body=nested_chat("\\u0062anned", MAX_JSON_DEPTH + 1))

    reject = await rejection(banning("banned"), exchange)

    assert (reject.status, reject.code) == (400, "uninspectable_body")
    assert f"deeper than {MAX_JSON_DEPTH} levels" in json.loads(reject.body)["error"]["message"]


async def test_a_prompt_at_the_depth_limit_is_decoded_and_judged():
    reject = await rejection(banning("banned"), make_exchange(body=nested_chat("\\u0062anned", MAX_JSON_DEPTH)))
    assert reject.code == "content_filtered"


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_completion_nested_too_deeply_fails_the_plugin_instead_of_passing(streamed):
    deep = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    body = f"data: {deep}\n\ndata: [DONE]\n\n".encode() if streamed else deep.encode()
    headers = {"content-type": "text/event-stream" if streamed else "application/json"}
    exchange = make_exchange(body=chat("hello"), response_headers=headers, response_body=body)

    with pytest.raises(BodyTooDeep):
        await run_plugin(banning("banned", stage=Stage.POST_REQUEST), exchange)


# --- linear time ----------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [r"(a+)+$", r"(a|aa)*b"])
async def test_a_redos_pattern_scans_100kb_about_as_fast_as_a_trivial_one(pattern):
    # Both patterns take a backtracking engine exponential time on a run of "a"s that then fails
    # to match; RE2 scans in time linear in the text whatever the pattern.
    body = b"a" * 100_000 + b"!"
    evil, trivial = banning(pattern), banning("zzz")

    async def fastest_scan(plugin) -> float:
        timings = []
        for _ in range(10):
            started = time.perf_counter()
            await run_plugin(plugin, make_exchange(headers={"content-type": "text/plain"}, body=body))
            timings.append(time.perf_counter() - started)
        return min(timings)

    baseline = await fastest_scan(trivial)
    assert await fastest_scan(evil) < 20 * baseline


# --- config ---------------------------------------------------------------------------------


def config_issues(config: dict) -> list[str]:
    with pytest.raises(ValidationError) as info:
        ContentFilter.Config.model_validate(config)
    return [str(issue) for issue in pydantic_issues(info.value, "config")]


def test_an_invalid_re2_pattern_is_named_by_its_position():
    assert config_issues({"banned_patterns": ["fine", "(abc"]}) == [
        "config.banned_patterns[1]: not a valid RE2 pattern: missing )"
    ]


@pytest.mark.parametrize(
    ("config", "issue"),
    [
        ({"banned_patterns": []}, "config.banned_patterns: at least one pattern is required"),
        ({}, "config.banned_patterns: required field is missing"),
        ({"banned_patterns": [r"(?=x)"]}, "config.banned_patterns[0]: not a valid RE2 pattern: invalid perl operator"),
        ({"banned_patterns": ["a*"]},
         "config.banned_patterns[0]: matches the empty string, so it would match every text"),
        ({"banned_patterns": ["ｂａｎ"]},
         "config.banned_patterns[0]: text is NFKC-normalised before matching, so write the pattern as 'ban'"),
        ({"banned_patterns": ["x"], "action": "drop"}, "config.action: Input should be 'reject' or 'redact'"),
        ({"banned_patterns": ["x"], "status_code": 200},
         "config.status_code: Input should be greater than or equal to 400"),
        ({"banned_patterns": ["x"], "patterns": ["y"]}, "config.patterns: unknown field"),
    ],
)
def test_config_mistakes_are_reported(config, issue):
    assert config_issues(config) == [issue]
