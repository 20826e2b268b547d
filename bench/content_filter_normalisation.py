"""What content_filter's ``match: skeleton`` and ``flexible_whitespace`` cost, and strict JSON.

Runs the real plugin (pluginchain.testing) on chat requests of about 1 KB and 32 KB, in ASCII
and in mixed scripts, with the default config and with the options, and prints each option's
time as a ratio of the default's, measured in the same run. Also prints what reading a body
strictly (``parse_json``: strict UTF-8, duplicate keys refused) costs against a plain
``json.loads``. Nothing matches in these prompts: the clean request is the common case.

    .venv/bin/python bench/content_filter_normalisation.py [--repeat 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sidecar"))

from pluginchain import parse_json
from pluginchain._api.plugin import _unique_keys  # the hook itself, to time it apart
from pluginchain.plugins.content_filter import ContentFilter
from pluginchain.testing import make_exchange, make_plugin, run_plugin

PATTERNS = ["ignore previous instructions", "launch codes", r"(?i)system prompt", r"\bpassword\s*[:=]"]

CONFIGS = {
    "default": {},
    "skeleton": {"match": "skeleton"},
    "flexible_whitespace": {"flexible_whitespace": True},
    "skeleton+flexible": {"match": "skeleton", "flexible_whitespace": True},
}

ASCII_TEXT = (
    "Could you summarise the quarterly report below and list the three biggest risks? "
    "Revenue grew 12% year over year, driven by the enterprise segment; churn in small "
    "business accounts rose to 4.1%. Keep the answer under 200 words, please. "
)
MIXED_TEXT = (
    "Résumé de la réunion: le café était froid. Привет, как дела? Расскажи о погоде в Москве. "
    "Καλημέρα, τι κάνεις; 東京の天気はどうですか。مرحبا بكم 👋🏽 naïve Zürich façade — “quoted” text. "
)


def chat_request(text: str, size: int) -> bytes:
    """A chat request of about ``size`` bytes: a system prompt, then user and assistant turns."""
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    while len(json.dumps(messages, ensure_ascii=False).encode()) < size:
        role = "user" if len(messages) % 2 else "assistant"
        messages.append({"role": role, "content": text})
    return json.dumps({"model": "gpt-4o", "messages": messages, "temperature": 0.2}, ensure_ascii=False).encode()


async def seconds_per_request(plugins: dict, body: bytes, iterations: int, repeat: int) -> dict[str, float]:
    """Per plugin, the fastest over ``repeat`` rounds of the mean time of one request (parse
    included). The plugins take turns within each round, so a load that drifts during the run
    weighs on all of them alike, and the fastest round is the one least disturbed."""
    rounds: dict[str, list[float]] = {name: [] for name in plugins}
    for _ in range(repeat):
        for name, plugin in plugins.items():
            started = time.perf_counter()
            for _ in range(iterations):
                await run_plugin(plugin, make_exchange(headers={"content-type": "application/json"}, body=body))
            rounds[name].append((time.perf_counter() - started) / iterations)
    return {name: min(times) for name, times in rounds.items()}


def json_reading_times(body: bytes, iterations: int, repeat: int) -> dict[str, float]:
    """Plain ``json.loads``, the same with the duplicate-key hook ``parse_json`` uses, and
    ``parse_json`` whole (strict UTF-8, the hook, the depth count, the lone-surrogate search)."""
    with_hook = json.JSONDecoder(object_pairs_hook=_unique_keys)
    readers = {
        "json.loads": json.loads,
        "json.loads + duplicate-key hook": lambda raw: with_hook.decode(raw.decode("utf-8")),
        "parse_json": parse_json,
    }
    rounds: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(repeat):
        for name, read in readers.items():
            started = time.perf_counter()
            for _ in range(iterations):
                read(body)
            rounds[name].append((time.perf_counter() - started) / iterations)
    return {name: min(times) for name, times in rounds.items()}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="rounds per measurement (the fastest is kept)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    plugins = {name: make_plugin(ContentFilter, {"banned_patterns": PATTERNS, **config}) for name, config in CONFIGS.items()}
    results = []
    print(f"python {platform.python_version()} on {platform.machine()}; fastest of {args.repeat} interleaved rounds\n")
    header = f"{'prompt':<14}{'bytes':>7}{'default µs':>12}" + "".join(f"{name:>20}" for name in list(CONFIGS)[1:])
    print(header)
    for script, text in (("ascii", ASCII_TEXT), ("mixed-script", MIXED_TEXT)):
        for size in (1024, 32 * 1024):
            body = chat_request(text, size)
            iterations = max(20, 2_000_000 // len(body))
            for plugin in plugins.values():  # warm: skeleton pieces are computed once per character
                await run_plugin(plugin, make_exchange(body=body))
            times = await seconds_per_request(plugins, body, iterations, args.repeat)
            ratios = {name: times[name] / times["default"] for name in CONFIGS}
            print(f"{script:<14}{len(body):>7}{times['default'] * 1e6:>12.1f}" + "".join(f"{ratios[n]:>19.2f}x" for n in list(CONFIGS)[1:]))
            results.append({"prompt": script, "bytes": len(body), "seconds": times, "ratio_to_default": ratios})

    print("\nreading JSON strictly, against json.loads:")
    for size in (2 * 1024, 20 * 1024):
        body = chat_request(ASCII_TEXT, size)
        times = json_reading_times(body, max(50, 4_000_000 // len(body)), args.repeat)
        plain = times["json.loads"]
        print(f"  {len(body):>6} bytes: " + ", ".join(f"{name} {t * 1e6:.1f} µs ({t / plain:.2f}x)" for name, t in times.items()))
        results.append({"json_bytes": len(body), "seconds": times})
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
