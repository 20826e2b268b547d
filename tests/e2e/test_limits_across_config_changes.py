"""Limits survive config changes, through a real Envoy and a real sidecar process: the operator's
pushes (every PluginChain edit is one) and chain-file edits never hand a key a fresh limit, and
a chain file rewritten in place is never served half-written.

The client is the official ``openai`` SDK, without retries, as an application calls the gateway.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import openai
import pytest

from pluginchain.v1 import config_pb2, config_pb2_grpc
from tests.support.harness import Gateway, free_port
from tests.support.valkey import valkey_url

__all__ = ["valkey_url"]

TOKEN = "push-token-for-limit-tests-0123456789"
BANNED = "ignore previous instructions"


@contextmanager
def pushable_gateway(tmp_path, upstream, chain_yaml: str) -> Iterator[tuple[Gateway, config_pb2_grpc.ConfigServiceStub]]:
    """Envoy in front of a sidecar in push mode (started from ``chain_yaml``), and a ConfigService
    client holding the push token, as the operator does."""
    token_file = tmp_path / "push-token"
    token_file.write_text(TOKEN)
    chain_file = tmp_path / "chain.yaml"
    chain_file.write_text(chain_yaml)
    config_port = free_port()
    gateway = Gateway(tmp_path, chain_file, upstream, extra_args=(
        "--config-port", str(config_port), "--config-host", "127.0.0.1", "--token-file", str(token_file),
        "--state-file", str(tmp_path / "state.json"),
    ))
    channel = grpc.insecure_channel(f"127.0.0.1:{config_port}")
    try:
        gateway.start_sidecar()
        gateway.start_envoy()
        yield gateway, config_pb2_grpc.ConfigServiceStub(channel)
    finally:
        channel.close()
        gateway.stop()


def push(config: config_pb2_grpc.ConfigServiceStub, version: int, chains: dict[str, list[dict]]) -> None:
    chain_set = config_pb2.ChainSet(version=version, chains=[
        config_pb2.Chain(name=name, source=f"PluginChain test/{name}", plugins=[
            config_pb2.PluginEntry(
                name=entry["name"], id=entry.get("id", ""), priority=entry.get("priority", 0),
                config_json=json.dumps(entry.get("config", {})),
            )
            for entry in entries
        ])
        for name, entries in chains.items()
    ])
    reply = config.Apply(config_pb2.ApplyRequest(chain_set=chain_set), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10)
    assert reply.changed and reply.active_version == version


@contextmanager
def sdk(gateway: Gateway, api_key: str) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, default_headers={"x-api-key": api_key})
    try:
        yield client
    finally:
        client.close()


def got_through(client: openai.OpenAI, content: str = "hello") -> bool:
    try:
        client.chat.completions.create(model="demo-model", messages=[{"role": "user", "content": content}])
    except openai.RateLimitError as refused:
        assert refused.body["code"] == "rate_limit_exceeded", refused.body
        return False
    return True


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_key_limited_to_5_per_hour_gets_5_of_100_requests_while_100_pushes_change_the_config(
    tmp_path, upstream, backend, request
):
    limiter_config: dict = {"limit": 5, "window": "1h", "key": "header:x-api-key", "backend": backend}
    if backend == "redis":
        limiter_config |= {"redis_url": request.getfixturevalue("valkey_url"), "key_prefix": f"test:{uuid.uuid4().hex}"}
    start = f"chains: {{default: [{{name: rate_limiter, config: {json.dumps(limiter_config)}}}]}}"
    with pushable_gateway(tmp_path, upstream, start) as (gateway, config), sdk(gateway, "alice") as alice:
        admitted = 0
        for version in range(1, 101):
            # Each push changes the chain around the limiter and the limiter itself: its priority,
            # how its window is written, and every other push its burst (4 per 48 minutes: the
            # same rate, one request less at once). Another chain has a limiter of the same id.
            limiter = {"name": "rate_limiter", "priority": version % 3, "config": {
                **limiter_config, "window": ("1h", "60m", "3600s")[version % 3],
            }}
            if version % 2:
                limiter["config"] |= {"limit": 4, "window": "48m"}
            content_filter = {"name": "content_filter", "priority": 5, "config": {"banned_patterns": [BANNED, f"v{version}"]}}
            push(config, version, {
                "default": [limiter, content_filter],
                "other": [{"name": "rate_limiter", "config": {**limiter_config, "limit": 1}}],
            })
            admitted += got_through(alice)
        assert admitted == 5
        with sdk(gateway, "bob") as bob:
            assert got_through(bob)


def test_a_chain_file_rewritten_in_place_while_requests_pass_never_lets_a_banned_prompt_through(gateway):
    """The issue's attack: the chain file is rewritten in place, over and over, truncated and
    written in two parts; the first part is a valid chain without the content filter. Banned
    prompts go through Envoy all the while; every one must be refused."""
    with_filter = (
        "chains:\n  default:\n"
        "    - {name: content_validator, config: {max_messages: 50}}\n"
        f"    - {{name: content_filter, config: {{banned_patterns: ['{BANNED}']}}}}\n"
    )
    without_filter = with_filter[: with_filter.index("    - {name: content_filter")]
    gw = gateway(with_filter)
    statuses: list[int] = []
    stop = threading.Event()

    def rewrite_forever() -> None:
        while not stop.is_set():
            with open(gw.chain_file, "r+b") as file:
                file.truncate(0)
                file.write(without_filter.encode())
                file.flush()
                file.write(with_filter[len(without_filter):].encode())

    writer = threading.Thread(target=rewrite_forever)
    writer.start()
    def partial_reads() -> int:
        """How often the watcher read the file mid-write (a content it did not serve)."""
        return gw.sidecar.output().count("changed; serving it once it stays the same")

    try:
        # Until the watcher (once a second) has caught the file mid-write three times, or
        # something other than the filter's refusal came back.
        while partial_reads() < 3 and len(statuses) < 20_000 and set(statuses) <= {403}:
            statuses.append(gw.chat(f"please {BANNED}").status_code)
    finally:
        stop.set()
        writer.join()
    assert set(statuses) == {403}, {status: statuses.count(status) for status in set(statuses)}
    assert partial_reads() >= 3
    assert gw.chat(f"please {BANNED}").status_code == 403
    assert gw.sidecar.alive()
