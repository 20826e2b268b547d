"""The ``token_limiter`` through the real Envoy, the real sidecar and the demo upstream, with the
official ``openai`` SDK as the client: the token headers it reads, the 429 it raises, streams
whose usage the sidecar asks for and hides, exact charges under concurrency, per-model budgets,
``reserve: max_tokens`` and the token metrics.

Every test has its own bucket (a unique ``x-api-key``, or a chain of its own). Windows are a day
long: a token is then worth 86.4 s (or more) of refill, so no bucket refills by a whole token
while the file runs and every remaining count is exact.

Charges land in the plugin's ``finish`` hook, just after the ext_proc stream ends, so the client
may see its response before the charge. The tests wait for it with a free probe: ``GET
<prefix>/v1/models`` runs the chain (its response carries the token headers) but reports no
usage, so it is never charged.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.harness import Gateway, running_gateway, wait_until

LIMIT = 1000
MODELS_LIMIT, DEMO_MODEL_LIMIT = 30, 10
RESERVE_LIMIT = 100
DAY_SECONDS = 86400
SECONDS_PER_TOKEN = DAY_SECONDS / LIMIT

CHAINS = f"""
    chains:
      default:
        - name: token_limiter
          config: {{limit: {LIMIT}, window: 1d, key: "header:x-api-key"}}
      models:
        - name: token_limiter
          config:
            limit: {MODELS_LIMIT}
            window: 1d
            key: "header:x-api-key"
            models: {{demo-model: {DEMO_MODEL_LIMIT}}}
      reserve:
        - name: token_limiter
          config: {{limit: {RESERVE_LIMIT}, window: 1d, key: "header:x-api-key", reserve: max_tokens}}
      metered:
        - name: token_limiter
          config: {{limit: 1000000, window: 1d}}
"""
ROUTES = (("/models/", "models"), ("/reserve/", "reserve"), ("/metered/", "metered"))

LIMIT_HEADER = "x-ratelimit-limit-tokens"
REMAINING_HEADER = "x-ratelimit-remaining-tokens"
RESET_HEADER = "x-ratelimit-reset-tokens"
# Go's notation, as OpenAI writes it: 6m0s, 1h0m0s, 1.5s, 20ms.
RESET_FORMAT = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)$")


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Iterator[Gateway]:
    """One gateway for every test: the ``default`` chain on ``/``, the others on their prefixes."""
    with running_gateway(tmp_path_factory.mktemp("tokens"), CHAINS, ROUTES) as gw:
        yield gw


@pytest.fixture
def key() -> str:
    """An API key no other test uses: a bucket of this test's own."""
    return f"key-{uuid.uuid4().hex}"


@contextmanager
def sdk(gw: Gateway, key: str, prefix: str = "") -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(
        base_url=f"{gw.url}{prefix}/v1", api_key="test", max_retries=0, default_headers={"x-api-key": key}
    )
    try:
        yield client
    finally:
        client.close()


def say(client: openai.OpenAI, content: str, model: str = "demo-model", **extra):
    """A non-streamed chat completion: (its headers, the completion)."""
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content}], **extra
    )
    return raw.headers, raw.parse()


def probe(gw: Gateway, key: str, prefix: str = "") -> httpx.Response:
    """A request through the chain that reports no usage, hence costs no tokens."""
    return httpx.get(f"{gw.url}{prefix}/v1/models", headers={"x-api-key": key}, timeout=10)


def remaining(gw: Gateway, key: str, prefix: str = "") -> int:
    response = probe(gw, key, prefix)
    assert REMAINING_HEADER in response.headers, (response.status_code, dict(response.headers))
    return int(response.headers[REMAINING_HEADER])


def settled(read: Callable[[], int], expected: int, timeout: float = 5.0) -> int:
    """What ``read`` returns once it returns ``expected`` (charges are made after the response),
    or the last value it returned when it never did."""
    seen: list[int] = []

    def reached() -> bool:
        seen.append(read())
        return seen[-1] == expected

    try:
        wait_until(reached, timeout=timeout, what=f"{expected} tokens remaining")
    except TimeoutError:
        pass
    return seen[-1]


def received_with(gw: Gateway, key: str) -> list[dict]:
    """The requests the upstream received with this API key, bodies parsed."""
    return [
        {**request, "body": json.loads(request["body"]) if request["body"] else None}
        for request in gw.upstream.received()
        if request["headers"].get("x-api-key") == key
    ]


def words(count: int) -> str:
    return " ".join(f"w{number}" for number in range(count))


def test_admitted_responses_show_the_budget_and_each_charge_is_the_usage_reported(shared, key):
    with sdk(shared, key) as client:
        headers, first = say(client, "hello there")
        assert headers[LIMIT_HEADER] == str(LIMIT)
        assert headers[REMAINING_HEADER] == str(LIMIT)  # what was left before this request
        used = first.usage.total_tokens
        assert (first.usage.prompt_tokens, first.usage.completion_tokens, used) == (2, 4, 6)

        assert settled(lambda: remaining(shared, key), LIMIT - used) == LIMIT - used
        headers, second = say(client, "a somewhat longer question this time")
        assert headers[LIMIT_HEADER] == str(LIMIT)
        assert headers[REMAINING_HEADER] == str(LIMIT - used)

        used += second.usage.total_tokens
        assert settled(lambda: remaining(shared, key), LIMIT - used) == LIMIT - used
        headers, _ = say(client, "and once more")
        assert headers[REMAINING_HEADER] == str(LIMIT - used)


def test_a_spent_budget_answers_429_with_openai_headers_and_the_sdk_raises_rate_limit_error(shared, key):
    with sdk(shared, key) as client:
        # 600 words in, "You said:" and 600 words out: 1202 tokens, more than the whole budget.
        headers, big = say(client, words(600))
        assert headers[REMAINING_HEADER] == str(LIMIT)  # admitted on an unspent budget
        assert big.usage.total_tokens == 1202
        wait_until(lambda: probe(shared, key).status_code == 429, timeout=5, what="the budget spent")
        asked_before = len(received_with(shared, key))

        with pytest.raises(openai.RateLimitError) as refused:
            say(client, "one more, please")

    error = refused.value
    assert error.status_code == 429
    headers = error.response.headers
    assert headers[LIMIT_HEADER] == str(LIMIT)
    assert headers[REMAINING_HEADER] == "0"
    # In debt by 202 tokens: one more token (203 in all) refills in 203 * 86.4 s.
    assert abs(int(headers["retry-after"]) - 203 * SECONDS_PER_TOKEN) <= 2, headers["retry-after"]
    # Full again once all 1202 have refilled: 28h50m52.8s.
    assert RESET_FORMAT.match(headers[RESET_HEADER]), headers[RESET_HEADER]
    assert headers[RESET_HEADER].startswith("28h50m"), headers[RESET_HEADER]
    assert headers["content-type"].startswith("application/json")
    body = error.response.json()["error"]
    assert body["type"] == "tokens" and body["code"] == "rate_limit_exceeded" and body["message"]
    assert error.type == "tokens" and error.code == "rate_limit_exceeded"
    assert isinstance(error.body, dict) and error.body["type"] == "tokens"
    # The refusal came before the upstream.
    assert len(received_with(shared, key)) == asked_before


def test_a_stream_without_include_usage_is_charged_yet_the_client_sees_no_usage(shared, key):
    content = "tell me a story"
    with sdk(shared, key) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="demo-model", messages=[{"role": "user", "content": content}], stream=True
        )
        assert raw.headers[REMAINING_HEADER] == str(LIMIT)
        with raw.parse() as stream:
            chunks = list(stream)

    assert chunks
    assert all(chunk.usage is None for chunk in chunks), [chunk.usage for chunk in chunks if chunk.usage]
    assert all(chunk.choices for chunk in chunks), "the client got a chunk without choices"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == f"You said: {content}"
    [upstream_request] = received_with(shared, key)
    assert upstream_request["body"]["stream_options"] == {"include_usage": True}
    # The demo upstream reports a stream's usage as 3 prompt tokens and a token per word.
    charged = 3 + len(text.split())
    assert settled(lambda: remaining(shared, key), LIMIT - charged) == LIMIT - charged


def test_a_stream_that_asks_for_usage_gets_the_usage_chunk_and_is_charged_it(shared, key):
    with sdk(shared, key) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="demo-model",
            messages=[{"role": "user", "content": "count my tokens"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        assert raw.headers[REMAINING_HEADER] == str(LIMIT)
        with raw.parse() as stream:
            chunks = list(stream)

    *text_chunks, last = chunks
    assert last.choices == [] and last.usage is not None
    assert all(chunk.choices and chunk.usage is None for chunk in text_chunks)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in text_chunks)
    assert text == "You said: count my tokens"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, len(text.split()))
    [upstream_request] = received_with(shared, key)
    assert upstream_request["body"]["stream_options"] == {"include_usage": True}
    charged = last.usage.total_tokens
    assert settled(lambda: remaining(shared, key), LIMIT - charged) == LIMIT - charged


def test_concurrent_requests_are_all_charged_exactly(shared, key):
    count = 10

    def one(number: int):
        with sdk(shared, key) as client:
            return say(client, words(number + 1))

    with ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(one, range(count)))

    used = [completion.usage.total_tokens for _, completion in answers]
    # n words in, "You said:" and the n words out.
    assert used == [2 * (number + 1) + 2 for number in range(count)]
    for headers, _ in answers:
        # Admitted on what was left before it; some of the others may have been charged already.
        assert LIMIT - sum(used) < int(headers[REMAINING_HEADER]) <= LIMIT
    expected = LIMIT - sum(used)
    assert settled(lambda: remaining(shared, key), expected) == expected
    assert remaining(shared, key) == expected  # and nothing more is charged afterwards


def test_a_model_with_a_limit_of_its_own_has_a_budget_of_its_own(shared, key):
    other_key = f"{key}-other"
    with sdk(shared, key, "/models") as client, sdk(shared, other_key, "/models") as other_client:
        headers, completion = say(client, "one two three four five six")
        assert (headers[LIMIT_HEADER], headers[REMAINING_HEADER]) == (str(DEMO_MODEL_LIMIT), str(DEMO_MODEL_LIMIT))
        assert completion.model == "demo-model" and completion.usage.total_tokens == 14  # over its 10

        def demo_model_refused() -> bool:
            try:
                say(client, "hi")
            except openai.RateLimitError as error:
                assert error.response.headers[LIMIT_HEADER] == str(DEMO_MODEL_LIMIT)
                return True
            return False

        wait_until(demo_model_refused, timeout=5, what="demo-model refused")
        # Another model is counted against ``limit``, which demo-model's tokens did not touch.
        headers, completion = say(client, "hi", model="other-model")
        assert completion.model == "other-model"
        assert (headers[LIMIT_HEADER], headers[REMAINING_HEADER]) == (str(MODELS_LIMIT), str(MODELS_LIMIT))

        # The other way round, on another key: spend ``limit`` with another model...
        headers, completion = say(other_client, words(20), model="other-model")
        assert completion.usage.total_tokens == 42  # over its 30
        wait_until(lambda: probe(shared, other_key, "/models").status_code == 429, timeout=5, what="limit spent")
        with pytest.raises(openai.RateLimitError) as refused:
            say(other_client, "hi", model="another-model")
        assert refused.value.response.headers[LIMIT_HEADER] == str(MODELS_LIMIT)
        # ...and demo-model still has all of its own.
        headers, _ = say(other_client, "hi")
        assert (headers[LIMIT_HEADER], headers[REMAINING_HEADER]) == (str(DEMO_MODEL_LIMIT), str(DEMO_MODEL_LIMIT))


def test_reserve_max_tokens_refuses_what_may_not_fit_before_the_upstream_and_settles_to_the_usage(shared, key):
    def left() -> int:
        return remaining(shared, key, "/reserve")

    with sdk(shared, key, "/reserve") as client:
        # More than the whole limit: refused at once, with no retry-after (it never could be admitted).
        with pytest.raises(openai.RateLimitError) as too_big:
            say(client, "hello there", max_tokens=RESERVE_LIMIT + 1)
        assert too_big.value.response.headers[LIMIT_HEADER] == str(RESERVE_LIMIT)
        assert "retry-after" not in too_big.value.response.headers
        assert too_big.value.type == "tokens"

        # Admitted: the header shows what is left after the reservation; settled to the usage.
        headers, completion = say(client, "hello there", max_tokens=60)
        assert headers[REMAINING_HEADER] == str(RESERVE_LIMIT - 60)
        used = completion.usage.total_tokens
        assert used == 6
        assert settled(left, RESERVE_LIMIT - used) == RESERVE_LIMIT - used

        # One token more than is left: refused before the upstream, though the budget is not spent.
        with pytest.raises(openai.RateLimitError) as refused:
            say(client, "hello again", max_tokens=RESERVE_LIMIT - used + 1)
        headers = refused.value.response.headers
        assert headers[LIMIT_HEADER] == str(RESERVE_LIMIT)
        assert headers[REMAINING_HEADER] == str(RESERVE_LIMIT - used)
        assert int(headers["retry-after"]) >= 1 and RESET_FORMAT.match(headers[RESET_HEADER])
        assert refused.value.type == "tokens"

        # Exactly what is left: admitted, with nothing left after its reservation.
        headers, completion = say(client, "hello again", max_tokens=RESERVE_LIMIT - used)
        assert headers[REMAINING_HEADER] == "0"
        used += completion.usage.total_tokens
        assert settled(left, RESERVE_LIMIT - used) == RESERVE_LIMIT - used

    bodies = [request["body"] for request in received_with(shared, key)]
    assert [body["max_tokens"] for body in bodies] == [60, RESERVE_LIMIT - 6]


def metric_samples(gw: Gateway, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` with these labels (over the labels not given)."""
    text = httpx.get(gw.metrics_url, timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(label) == value for label, value in labels.items())
    )


def test_the_metrics_count_the_tokens_and_the_upstream_responses(shared, key):
    prompts = ["hello there", "what is the weather like", "one"]
    with sdk(shared, key, "/metered") as client:
        completions = [say(client, prompt)[1] for prompt in prompts]
        with client.chat.completions.create(
            model="demo-model", messages=[{"role": "user", "content": "stream it"}], stream=True,
            stream_options={"include_usage": True},
        ) as stream:
            usages = [chunk.usage for chunk in stream if chunk.usage is not None]
        with client.chat.completions.create(
            model="demo-model", messages=[{"role": "user", "content": "hidden usage"}], stream=True
        ) as stream:
            hidden = list(stream)
    assert all(chunk.usage is None for chunk in hidden)
    usages += [completion.usage for completion in completions]
    # The client did not see the last stream's usage; the demo upstream reports 3 prompt tokens
    # and a completion token per word of "You said: hidden usage".
    expected_input = sum(usage.prompt_tokens for usage in usages) + 3
    expected_output = sum(usage.completion_tokens for usage in usages) + 4
    requests = len(prompts) + 2

    def counted() -> tuple[float, ...]:
        return (
            metric_samples(shared, "gen_ai_client_token_usage_sum", chain="metered", type="input"),
            metric_samples(shared, "gen_ai_client_token_usage_sum", chain="metered", type="output"),
            metric_samples(shared, "gen_ai_client_token_usage_count", chain="metered", type="input"),
            metric_samples(shared, "pluginchain_upstream_response_seconds_count", chain="metered"),
            metric_samples(shared, "gen_ai_server_time_to_first_token_seconds_count", chain="metered"),
            metric_samples(
                shared, "pluginchain_requests_total", chain="metered", outcome="allow", status_class="2xx"
            ),
        )

    expected = (expected_input, expected_output, requests, requests, 2, requests)
    seen: list[tuple[float, ...]] = []
    try:
        wait_until(lambda: seen.append(counted()) or seen[-1] == expected, timeout=5, what="metrics")
    except TimeoutError:
        pass
    assert seen[-1] == expected
