"""One request cannot make the gateway work without bound, through a real Envoy: a zip bomb (61 KB
of gzip that inflates to 60 MiB) is refused with 413 once its inflation passes the body limit,
and the requests of other clients are not held up while bombs are being inflated.

Latencies are compared as ratios between the same requests with and without bombs in flight, so
the test holds on a slow or busy machine; no latency is compared with a fixed number of seconds.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai

from pluginchain._config.defaults import DEFAULTS

CHAIN = """
    plugins:
      - name: content_validator
        parallel: true
        config: {allowed_models: [demo-model]}
      - name: content_filter
        parallel: true
        config: {banned_patterns: [forbidden]}
"""

MiB = 1 << 20
SAMPLES = 200
"""Requests timed per round, with bombs and without."""


def zip_bomb(inflated_bytes: int = 60 * MiB) -> bytes:
    """A gzip body of zeros: 60 MiB of them fit in about 61 KB."""
    compressor = zlib.compressobj(9, wbits=zlib.MAX_WBITS | 16)
    chunk = bytes(MiB)
    return b"".join(compressor.compress(chunk) for _ in range(inflated_bytes // MiB)) + compressor.flush()


def send_bomb(client: httpx.Client) -> httpx.Response:
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    return client.post("/v1/chat/completions", content=BOMB, headers=headers)


BOMB = zip_bomb()


def latencies(client: openai.OpenAI, count: int) -> list[float]:
    """Seconds each of ``count`` chat completions took, one after another."""
    taken = []
    for number in range(count):
        started = time.perf_counter()
        completion = client.chat.completions.create(model="demo-model", messages=[{"role": "user", "content": f"hello {number}"}])
        taken.append(time.perf_counter() - started)
        assert completion.choices[0].message.content == f"You said: hello {number}"
    return taken


def p95(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=20)[-1]


def test_a_zip_bomb_is_refused_413_as_soon_as_it_inflates_past_the_body_limit(gateway):
    gw = gateway(CHAIN)
    assert len(BOMB) < 64_000

    with httpx.Client(base_url=gw.url, timeout=30) as client:
        refused = send_bomb(client)
        bombs = [timed(lambda: send_bomb(client)) for _ in range(10)]
        largest = [timed(lambda: client.post("/v1/chat/completions", json=LARGEST_PROMPT)) for _ in range(5)]

    assert refused.status_code == 413
    error = refused.json()["error"]
    assert error["code"] == "body_too_large"
    assert f"gzip body inflates past {DEFAULTS.max_body_bytes} bytes" in error["message"]
    assert len(gw.upstream.received()) == len(largest)  # no bomb went on
    # Inflated no further than the body limit: a bomb costs less than the largest plain prompt
    # the gateway takes (judged whole), not the 60 MiB it would inflate to.
    ratio = statistics.median(bombs) / statistics.median(largest)
    print(f"a bomb is refused in {ratio:.2f}x the time the largest plain prompt takes")
    assert ratio < 1


LARGEST_PROMPT = {"model": "demo-model", "messages": [{"role": "user", "content": "hello " * (DEFAULTS.max_body_bytes // 6 - 100)}]}
"""A prompt just under the body limit."""


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def test_other_requests_are_not_held_up_while_bombs_are_inflated(gateway, tmp_path):
    gw = gateway(CHAIN)
    bomb_file = tmp_path / "bomb.gz"
    bomb_file.write_bytes(BOMB)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    latencies(client, 50)  # warm-up: connections, caches, the first plan use
    ratios: list[float] = []
    refused: list[str] = []
    try:
        # Alternated, so that a change in what else the machine does hits both alike. A round
        # that a burst of other work on this 2-core machine spoils says nothing about stalls; a
        # stall behind bombs shows in every round, so the best round must be within the bound.
        for _ in range(ROUNDS):
            quiet = latencies(client, SAMPLES)
            with bombs_in_flight(gw.url, bomb_file) as statuses:
                loaded = latencies(client, SAMPLES)
            refused += statuses
            ratios.append(p95(loaded) / p95(quiet))
    finally:
        client.close()

    print(f"p95 of other requests with bombs in flight, per round: {', '.join(f'{r:.2f}x' for r in ratios)}")
    assert len(refused) >= 10, "too few bombs were sent to load the sidecar"
    assert set(refused) == {"413"}
    # Off the loop this measures 2.4-3.4x here (the bombs' inflation shares the 2 cores); the same
    # capped inflation on the event loop measured 6.8-10x, the uncapped one 91x.
    assert min(ratios) < 5, f"p95 of other requests grew {min(ratios):.1f}x or more in every round with bombs in flight"

ROUNDS = 3
BOMB_INTERVAL = 0.05
"""Seconds between two bombs: a steady stream that leaves the machine's cores to the requests
measured, so that what is measured is waiting behind a bomb, not a share of an overloaded CPU."""


@contextlib.contextmanager
def bombs_in_flight(url: str, bomb_file: Path) -> Iterator[list[str]]:
    """Bombs sent from a process of its own (so that sending them takes nothing from this one,
    which times the other requests) while the block runs; the list gets the statuses they got."""
    statuses: list[str] = []
    bomber = subprocess.Popen([sys.executable, "-c", BOMBER, url, str(bomb_file), str(BOMB_INTERVAL)], stdout=subprocess.PIPE, text=True)
    try:
        assert bomber.stdout is not None
        statuses.append(bomber.stdout.readline().strip())  # the first has landed
        yield statuses
    finally:
        bomber.terminate()
        rest, _ = bomber.communicate(timeout=30)
        statuses += rest.split()


BOMBER = """
import sys, time, httpx
url, bomb, interval = sys.argv[1], open(sys.argv[2], "rb").read(), float(sys.argv[3])
headers = {"content-type": "application/json", "content-encoding": "gzip"}
with httpx.Client(base_url=url, timeout=30) as client:
    while True:
        print(client.post("/v1/chat/completions", content=bomb, headers=headers).status_code, flush=True)
        time.sleep(interval)
"""
