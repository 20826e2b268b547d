"""The attack corpus (``attack_corpus.yaml``) through a real Envoy and sidecar: each attempt to
talk a banned phrase past ``content_filter`` gets exactly the verdict the corpus records.

Prompts go to a chain that filters requests, completions to one that filters what the upstream
(which echoes the prompt) answers. Clients are the ``openai`` SDK where an application could send
the request, and raw HTTP where only an attacker would (duplicate keys, broken bytes).
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.support.harness import Gateway, running_gateway

CORPUS = yaml.safe_load((Path(__file__).parent / "attack_corpus.yaml").read_text(encoding="utf-8"))
CASES = {case["id"]: case for case in CORPUS["cases"]}
COMPLETION_PREFIX = "/checked-output"
_BYTE_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")


@pytest.fixture(scope="module")
def gw(tmp_path_factory) -> Iterator[Gateway]:
    routes = ((COMPLETION_PREFIX + "/", "checked_output"),)
    with running_gateway(tmp_path_factory.mktemp("corpus"), CORPUS["chains"], routes=routes) as gateway:
        yield gateway


def test_the_corpus_is_well_formed():
    assert len(CASES) == len(CORPUS["cases"]), "case ids must be unique"
    for case in CASES.values():
        assert case["expect"] == "allowed" or case["expect"] == "blocked" or set(case["expect"]) == {"refused"}, case["id"]
        assert len(set(case["send"]) & {"prompt", "messages", "json", "raw"}) == 1, case["id"]
    verdicts = [_verdict_name(case) for case in CASES.values()]
    assert verdicts.count("blocked") >= 60 and verdicts.count("refused") >= 10


@pytest.mark.parametrize("case_id", list(CASES))
def test_attack_gets_its_verdict(gw: Gateway, case_id: str):
    case = CASES[case_id]
    sent_before = len(gw.upstream.received())
    if case.get("side") == "completion":
        status, error, answer = _ask_for_completion(gw, case["send"])
    else:
        status, error, answer = _send_prompt(gw, case["send"])
    reached_upstream = len(gw.upstream.received()) > sent_before
    expect = case["expect"]
    context = f"{case_id}: status {status}, error {error}, answer {answer!r}"
    if expect == "allowed":
        assert status == 200 and error is None and answer, context
        assert reached_upstream, context
    elif expect == "blocked":
        assert error is not None and error["code"] == "content_filtered", context
        assert status in (200, 403), context  # 200: a stream cut by an error event
        assert "instructions" not in (answer or "") and "codes" not in (answer or ""), context
        if case.get("side") != "completion":
            assert status == 403 and not reached_upstream, context
    else:
        assert status in (400, 413, 415) and error is not None, context
        assert error["code"] == expect["refused"] and error["message"], context
        assert not reached_upstream, context


def _verdict_name(case: dict) -> str:
    return case["expect"] if isinstance(case["expect"], str) else "refused"


def _send_prompt(gw: Gateway, send: dict) -> tuple[int, dict | None, str | None]:
    """Status, OpenAI error (or None) and answer text of one prompt."""
    if ("prompt" in send or "messages" in send) and not send.keys() & {"encode", "headers", "pad"}:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
        try:
            completion = client.chat.completions.create(
                model="demo-model", messages=_messages(send), extra_body=send.get("extra"), timeout=30,
            )
        except openai.APIStatusError as refused:
            return refused.status_code, _error_of(refused.response), None
        finally:
            client.close()
        return 200, None, completion.choices[0].message.content
    response = httpx.post(gw.url + "/v1/chat/completions", content=_raw_body(send), headers=_headers(send), timeout=30)
    if response.status_code != 200:
        return response.status_code, _error_of(response), None
    return 200, None, response.json()["choices"][0]["message"]["content"]


def _ask_for_completion(gw: Gateway, send: dict) -> tuple[int, dict | None, str | None]:
    """Status, error and the text the client got of a completion echoing the prompt."""
    client = openai.OpenAI(base_url=f"{gw.url}{COMPLETION_PREFIX}/v1", api_key="unused", max_retries=0)
    try:
        if not send.get("stream"):
            completion = client.chat.completions.create(model="demo-model", messages=_messages(send), timeout=30)
            return 200, None, completion.choices[0].message.content
        received: list[str] = []
        try:
            for chunk in client.chat.completions.create(model="demo-model", messages=_messages(send), stream=True, timeout=30):
                received.extend(choice.delta.content or "" for choice in chunk.choices)
        except openai.APIError as cut:
            # The SDK raises on an error event in the stream: the body is that event's error.
            error = cut.body if isinstance(cut.body, dict) else None
            return 200, error, "".join(received)
        return 200, None, "".join(received)
    except openai.APIStatusError as refused:
        return refused.status_code, _error_of(refused.response), None
    finally:
        client.close()


def _messages(send: dict) -> list[dict[str, Any]]:
    if "messages" in send:
        return send["messages"]
    return [{"role": "user", "content": send["prompt"]}]


def _raw_body(send: dict) -> bytes:
    if "raw" in send:
        return _BYTE_ESCAPE.sub(lambda match: bytes([int(match[1], 16)]), send["raw"].encode())
    document = send["json"] if "json" in send else {"model": "demo-model", "messages": _messages(send), **send.get("extra", {})}
    if "pad" in send:
        filler = {"role": "user", "content": "lorem ipsum " * (send["pad"] // 12)}
        document = {**document, "messages": [filler, *document["messages"]]}
    text = json.dumps(document, ensure_ascii=False)
    encode = send.get("encode")
    if encode == "gzip":
        return gzip.compress(text.encode())
    if encode == "deflate":
        return zlib.compress(text.encode())
    if encode == "utf-16":
        return text.encode("utf-16")
    assert encode is None, f"unknown encode: {encode}"
    return text.encode()


def _headers(send: dict) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    if send.get("encode") in ("gzip", "deflate"):
        headers["content-encoding"] = send["encode"]
    return {**headers, **send.get("headers", {})}


def _error_of(response: httpx.Response) -> dict | None:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return None
    return error if isinstance(error, dict) else None
