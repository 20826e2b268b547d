"""content_validator refuses malformed or oversized requests, saying which rule and by how much."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest
from pydantic import ValidationError

from pluginchain import MAX_JSON_DEPTH, Reject
from pluginchain._config.issues import pydantic_issues
from pluginchain.plugins.content_validator import ContentValidator
from pluginchain.testing import make_exchange, make_plugin, run_plugin


def chat(messages=1, content="hi", model="gpt-4o", **extra) -> bytes:
    conversation = [{"role": "user", "content": content} for _ in range(messages)]
    return json.dumps({"model": model, "messages": conversation, **extra}).encode()


def validator(**config):
    return make_plugin(ContentValidator, config)


async def rejection(plugin, body: bytes | None) -> Reject:
    with pytest.raises(Reject) as info:
        await run_plugin(plugin, make_exchange(body=body))
    return info.value


def error_of(reject: Reject) -> tuple[int, str, str]:
    error = json.loads(reject.body)["error"]
    assert error["type"] == "invalid_request_error"
    return reject.status, error["code"], error["message"]


async def test_a_request_within_every_rule_passes_unchanged():
    plugin = validator(
        max_body_bytes=10_000, max_messages=3, max_chars=100,
        allowed_models=["gpt-4o", "gpt-4o-mini"], required_fields=["messages", "metadata.user"],
    )
    exchange = make_exchange(body=chat(messages=3, content="x" * 33, metadata={"user": "u1"}))

    await run_plugin(plugin, exchange)

    assert not exchange.request.body_replaced


async def test_a_body_over_max_body_bytes_is_413():
    body = chat()
    reject = await rejection(validator(max_body_bytes=len(body) - 1), body)

    assert error_of(reject) == (
        413, "max_body_bytes",
        f"content_validator: max_body_bytes: body of {len(body)} bytes exceeds the limit of {len(body) - 1} bytes",
    )


@pytest.mark.parametrize("require_json", [True, False])
async def test_json_nested_deeper_than_the_gateway_decodes_is_refused_whatever_the_rules(require_json):
    # Skipping the rules for it would hand the upstream, whose parser may go deeper, a request no rule checked.
    deep = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    body = ('{"model": "not-allowed", "messages": [], "metadata": %s}' % deep).encode()

    reject = await rejection(validator(require_json=require_json, allowed_models=["gpt-4o"]), body)

    status, code, message = error_of(reject)
    assert (status, code) == (400, "json_depth")
    assert message == f"content_validator: json_depth: body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels"


async def test_malformed_json_is_refused_by_default():
    status, code, message = error_of(await rejection(validator(), b'{"model": "gpt-4o",'))

    assert (status, code) == (400, "require_json")
    assert message.startswith("content_validator: require_json: body is not valid JSON: ")


async def test_a_json_body_must_be_an_object():
    reject = await rejection(validator(), b'["gpt-4o"]')

    assert error_of(reject) == (
        400, "require_json", "content_validator: require_json: body is a JSON array, expected an object"
    )


async def test_without_require_json_a_text_body_passes():
    await run_plugin(validator(require_json=False, allowed_models=["gpt-4o"]), make_exchange(body=b"plain text"))


async def test_a_request_without_a_body_has_nothing_to_validate():
    plugin = validator(allowed_models=["gpt-4o"], required_fields=["model"])

    await run_plugin(plugin, make_exchange(headers={":method": "GET", ":path": "/v1/models"}))


async def test_too_many_messages_are_counted_in_the_message():
    reject = await rejection(validator(max_messages=10), chat(messages=12))

    assert error_of(reject) == (
        400, "max_messages", "content_validator: max_messages: 12 messages exceed the limit of 10"
    )


async def test_responses_api_input_items_count_as_messages():
    body = json.dumps({"model": "gpt-4o", "input": [{"role": "user", "content": "hi"}] * 3}).encode()

    reject = await rejection(validator(max_messages=2), body)

    assert reject.code == "max_messages"


async def test_too_many_characters_across_messages_and_parts():
    parts = [{"type": "text", "text": "é" * 30}, {"type": "text", "text": "y" * 5}]
    body = json.dumps({"model": "gpt-4o", "messages": [
        {"role": "system", "content": "x" * 40},
        {"role": "user", "content": parts},
    ]}).encode()

    await run_plugin(validator(max_chars=75), make_exchange(body=body))
    reject = await rejection(validator(max_chars=74), body)

    assert error_of(reject) == (400, "max_chars", "content_validator: max_chars: 75 characters exceed the limit of 74")


async def test_a_model_outside_the_allow_list_is_named_with_the_allowed_ones():
    plugin = validator(allowed_models=["gpt-4o", "gpt-4o-mini"])

    reject = await rejection(plugin, chat(model="gpt-5"))

    assert error_of(reject) == (
        400, "allowed_models",
        "content_validator: allowed_models: model 'gpt-5' is not allowed; allowed models: gpt-4o, gpt-4o-mini",
    )


async def test_leaving_the_model_out_does_not_bypass_the_allow_list():
    reject = await rejection(validator(allowed_models=["gpt-4o"]), b'{"messages": []}')

    assert error_of(reject)[2] == "content_validator: allowed_models: request names no model; allowed models: gpt-4o"


async def test_a_missing_required_field_is_named():
    plugin = validator(required_fields=["messages", "metadata.user"])

    for body in (chat(), chat(metadata={"team": "a"}), chat(metadata={"user": None})):
        reject = await rejection(plugin, body)
        assert error_of(reject) == (
            400, "required_fields", "content_validator: required_fields: field 'metadata.user' is missing"
        )


# --- config ---------------------------------------------------------------------------------


def config_issues(config: dict) -> list[str]:
    with pytest.raises(ValidationError) as info:
        ContentValidator.Config.model_validate(config)
    return [str(issue) for issue in pydantic_issues(info.value, "config")]


def test_an_empty_config_requires_json():
    assert ContentValidator.Config.model_validate({}).require_json


@pytest.mark.parametrize(
    ("config", "issue"),
    [
        ({"require_json": False},
         "config: no rule is set: set require_json, max_body_bytes, max_messages, max_chars, "
         "allowed_models or required_fields"),
        ({"max_messages": 0}, "config.max_messages: Input should be greater than 0"),
        ({"allowed_models": []},
         "config.allowed_models: an empty list would refuse everything or nothing; leave the rule out instead"),
        ({"required_fields": ["metadata..user"]},
         "config.required_fields[0]: 'metadata..user' is not a field path: "
         "write object keys joined by dots, like 'metadata.user'"),
        ({"max_tokens": 5}, "config.max_tokens: unknown field"),
    ],
)
def test_config_mistakes_are_reported(config, issue):
    assert config_issues(config) == [issue]


# --- one reading only ----------------------------------------------------------------------------


@pytest.mark.parametrize("require_json", [True, False])
@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"model": "not-allowed", "model": "gpt-4o", "messages": []}', "duplicate_json_keys"),
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "a", "content": "b"}]}', "duplicate_json_keys"),
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "\xff"}]}', "invalid_utf8"),
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "\\udc00"}]}', "invalid_utf8"),
    ],
    ids=["duplicate-model", "duplicate-deep", "invalid-utf8", "lone-surrogate"],
)
async def test_json_two_parsers_may_read_differently_is_refused_whatever_the_rules(body, code, require_json):
    # One parser takes the first "model", another the last: the allow-list must not judge one of them.
    reject = await rejection(validator(require_json=require_json, allowed_models=["gpt-4o"]), body)

    status, error_code, message = error_of(reject)
    assert (status, error_code) == (400, code)
    assert message.startswith(f"content_validator: {code}: body ")


async def test_without_require_json_a_body_meant_as_json_must_still_parse():
    # A lenient upstream may read the document and ignore what follows it: the rules would be skipped.
    plugin = validator(require_json=False, allowed_models=["gpt-4o"])
    reject = await rejection(plugin, b'{"model": "not-allowed", "messages": []} trailing')

    status, code, message = error_of(reject)
    assert (status, code) == (400, "uninspectable_body")
    assert "Extra data" in message

    await run_plugin(plugin, make_exchange(body=b"plain text \xff, not meant as JSON"))


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
async def test_a_compressed_request_is_inflated_and_judged_like_a_plain_one(coding):
    plugin = validator(allowed_models=["gpt-4o"], max_messages=2)
    compressed = gzip.compress if coding == "gzip" else zlib.compress

    await run_plugin(plugin, make_exchange(headers={"content-encoding": coding}, body=compressed(chat())))
    with pytest.raises(Reject) as info:
        await run_plugin(plugin, make_exchange(headers={"content-encoding": coding}, body=compressed(chat(messages=3))))

    assert error_of(info.value) == (400, "max_messages", "content_validator: max_messages: 3 messages exceed the limit of 2")


async def test_inflated_json_is_read_as_strictly_as_plain_json():
    plugin = validator(allowed_models=["gpt-4o"])
    with pytest.raises(Reject) as info:
        body = gzip.compress(b'{"model": "gpt-4o", "model": "evil"}')
        await run_plugin(plugin, make_exchange(headers={"content-encoding": "gzip"}, body=body))

    assert error_of(info.value)[:2] == (400, "duplicate_json_keys")


async def test_a_compressed_request_that_inflates_past_the_limit_is_refused_413():
    plugin = validator(max_inflated_bytes=1000)
    with pytest.raises(Reject) as info:
        await run_plugin(plugin, make_exchange(headers={"content-encoding": "gzip"}, body=gzip.compress(chat(content="hi" * 600))))

    assert error_of(info.value) == (413, "body_too_large", "content_validator: body_too_large: gzip body inflates past 1000 bytes")


async def test_a_body_in_a_coding_the_validator_cannot_read_fails_require_json_saying_so():
    plugin = validator(allowed_models=["gpt-4o"])
    with pytest.raises(Reject) as info:
        await run_plugin(plugin, make_exchange(headers={"content-encoding": "br"}, body=b"\x1b\x00\x00"))

    assert error_of(info.value) == (
        400, "require_json",
        "content_validator: require_json: cannot inspect a body with content-encoding 'br'; send JSON plain, gzip- or deflate-encoded",
    )


async def test_without_require_json_an_unreadable_body_passes_unless_declared_json():
    plugin = validator(require_json=False, max_chars=10)

    await run_plugin(plugin, make_exchange(headers={"content-encoding": "br"}, body=b"\x1b\x00\x00"))
    with pytest.raises(Reject) as info:
        headers = {"content-encoding": "gzip", "content-type": "application/json"}
        await run_plugin(plugin, make_exchange(headers=headers, body=b"not gzip"))

    assert error_of(info.value)[:2] == (400, "uninspectable_body")


