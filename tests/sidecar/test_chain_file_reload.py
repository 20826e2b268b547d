"""The chain-file watcher: a change is served once it has settled, read once and completely; a
file caught half-written or invalid never replaces the plan; limits survive reloads.

The watcher is driven directly: each ``reload()`` is one poll, and the settle time is measured on
a fake clock the tests step, so nothing sleeps. The file is written the ways editors, deploy
scripts and attackers write it: in place (truncated, then written in parts), or replaced.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from pluginchain import Stage
from pluginchain._config.registry import default_registry
from pluginchain._sidecar.plans import ChainFileWatcher, PlanHolder, load_chain_file, serving_plan
from pluginchain.plugins import rate_limiter, token_limiter
from pluginchain.testing import make_exchange
from tests.support.clock import FakeClock

SETTLE = 1.0
BANNED = "ignore previous instructions"
LIMITER = {"name": "rate_limiter", "config": {"limit": 5, "window": "1h", "key": "header:x-api-key"}}
FILTER = {"name": "content_filter", "config": {"banned_patterns": [BANNED]}}


def chain_file_text(*entries: dict) -> str:
    return json.dumps({"chains": {"default": list(entries)}}, indent=2)


class Watched:
    """A chain file, the plan holder a sidecar would serve from, and its watcher on a fake clock."""

    def __init__(self, path: Path, text: str, settle: float = SETTLE):
        path.write_text(text)
        self.path = path
        self.clock = FakeClock()
        self.registry = default_registry()
        reading, chains = load_chain_file(path, self.registry)
        self.holder = PlanHolder(serving_plan(chains, self.registry))
        self.watcher = ChainFileWatcher(path, self.registry, self.holder, reading, settle=settle, clock=self.clock)

    async def poll(self, after: float = 0.0) -> bool:
        self.clock.advance(after)
        return await self.watcher.reload()

    def plugin_ids(self) -> list[str]:
        return [plugin.id for plugin in self.holder.plan.chains["default"].plugins]

    async def status(self, text: str = "hello", api_key: str = "alice") -> int:
        """What the serving plan answers a chat request: the reject's status, or 200."""
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()
        exchange = make_exchange(headers={"x-api-key": api_key, "content-type": "application/json"}, body=body)
        result = await self.holder.plan.chains["default"].run_stage(Stage.PRE_REQUEST, exchange)
        return result.rejection.status if result.rejection is not None else 200

    async def close(self) -> None:
        await self.holder.aclose()


@pytest.fixture
async def watched(tmp_path):
    started: list[Watched] = []

    def start(text: str, settle: float = SETTLE) -> Watched:
        started.append(Watched(tmp_path / "chain.json", text, settle))
        return started[-1]

    yield start
    for one in started:
        await one.close()


def reloads(result: str) -> float:
    return REGISTRY.get_sample_value("pluginchain_config_reloads_total", {"result": result}) or 0.0


def rewrite_in_place(path: Path, text: str) -> None:
    """What `echo ... > chain.json` or an editor without atomic saves does: same file, truncated."""
    with open(path, "r+b") as file:
        file.truncate(0)
        file.write(text.encode())


def append(path: Path, text: str) -> None:
    with open(path, "ab") as file:
        file.write(text.encode())


# -- settling ----------------------------------------------------------------------------------


async def test_a_change_is_served_once_two_reads_settle_seconds_apart_saw_the_same_file(watched):
    w = watched(chain_file_text(FILTER))
    w.path.write_text(chain_file_text(FILTER, {"name": "content_validator", "config": {}}))

    assert not await w.poll()
    assert w.watcher.waiting
    assert not await w.poll(after=SETTLE - 0.01)
    assert w.plugin_ids() == ["content_filter"]
    assert await w.poll(after=0.01)
    assert w.plugin_ids() == ["content_filter", "content_validator"]
    assert not w.watcher.waiting
    assert not await w.poll(after=5)  # nothing new


async def test_each_write_starts_the_wait_again(watched):
    w = watched(chain_file_text(FILTER))
    w.path.write_text(chain_file_text(FILTER, {"name": "content_validator", "config": {}}))
    assert not await w.poll()
    for _ in range(5):
        # The same bytes written again still change the mtime: the writer is not done.
        os.utime(w.path, ns=(w.path.stat().st_atime_ns, w.path.stat().st_mtime_ns + 1_000_000))
        assert not await w.poll(after=SETTLE)
    assert await w.poll(after=SETTLE)


async def test_the_poll_loop_checks_again_exactly_when_a_change_is_due(watched):
    w = watched(chain_file_text(FILTER))
    w.watcher.interval = 5.0
    assert w.watcher.next_check_in() == 5.0
    w.path.write_text(chain_file_text(FILTER, LIMITER))
    assert not await w.poll()
    w.clock.advance(0.25)
    assert w.watcher.next_check_in() == pytest.approx(SETTLE - 0.25)
    assert await w.poll(after=w.watcher.next_check_in())


async def test_settle_zero_serves_a_change_at_the_first_read(watched):
    w = watched(chain_file_text(FILTER), settle=0)
    w.path.write_text(chain_file_text(FILTER, LIMITER))
    assert await w.poll()
    assert w.plugin_ids() == ["content_filter", "rate_limiter"]


# -- the attack: a chain file rewritten in place -------------------------------------------------


@pytest.mark.parametrize("cut", [0.0, 0.3, 0.6, 0.9, 0.99])
async def test_a_file_rewritten_in_place_is_never_served_half_written(watched, cut):
    """The issue's attack: the file is truncated and written in two parts, the first a valid
    chain on its own that lacks the content filter. Polls land before, between and after the
    parts; the filter must never stop serving, and the whole new file is served in the end."""
    full = chain_file_text({"name": "content_validator", "config": {}}, FILTER)
    w = watched(full)
    partial = chain_file_text({"name": "content_validator", "config": {}})  # valid, no filter
    new_full = chain_file_text({"name": "content_validator", "config": {"max_messages": 50}}, FILTER)

    for _ in range(20):
        rewrite_in_place(w.path, partial)
        await w.poll()
        await w.poll(after=cut)
        assert await w.status(BANNED) != 200
        w.clock.advance(SETTLE - cut - 0.01)  # the writer finishes just within the settle time
        rewrite_in_place(w.path, new_full)
        await w.poll()
        assert "content_filter" in w.plugin_ids()
        assert await w.status(BANNED) != 200
        rewrite_in_place(w.path, full)
        await w.poll(after=0.01)
    assert "content_filter" in w.plugin_ids()

    # Left alone, the final content settles and is served.
    rewrite_in_place(w.path, new_full)
    assert not await w.poll()
    assert await w.poll(after=SETTLE)
    assert w.holder.plan.chains["default"].plugins[0].config.max_messages == 50
    assert await w.status(BANNED) != 200


async def test_a_file_written_in_parts_is_served_only_whole(watched):
    w = watched(chain_file_text(FILTER))
    text = chain_file_text(FILTER, {"name": "content_validator", "config": {}}, LIMITER)
    rewrite_in_place(w.path, "")
    for start in range(0, len(text), 40):
        append(w.path, text[start:start + 40])
        await w.poll(after=SETTLE / 2)
        assert w.plugin_ids() == ["content_filter"]
    assert await w.poll(after=SETTLE)
    assert w.plugin_ids() == ["content_filter", "content_validator", "rate_limiter"]


# -- invalid and unreadable files ----------------------------------------------------------------


async def test_a_file_that_does_not_validate_never_replaces_the_plan_and_is_reported_once(watched, caplog):
    w = watched(chain_file_text(FILTER))
    invalid_before = reloads("invalid")
    w.path.write_text(chain_file_text({"name": "content_filter", "config": {"banned_patterns": ["x"], "colour": "red"}}))
    assert not await w.poll()
    for _ in range(3):
        assert not await w.poll(after=SETTLE)
    assert reloads("invalid") == invalid_before + 1
    assert caplog.text.count("colour: unknown field") == 1
    assert await w.status(BANNED) != 200

    w.path.write_text("{ not json")
    assert not await w.poll()
    assert not await w.poll(after=SETTLE)
    assert reloads("invalid") == invalid_before + 2
    assert w.plugin_ids() == ["content_filter"]

    w.path.write_text(chain_file_text(FILTER, LIMITER))
    assert not await w.poll()
    assert await w.poll(after=SETTLE)
    assert w.plugin_ids() == ["content_filter", "rate_limiter"]


async def test_an_unreadable_file_keeps_the_plan(watched, caplog):
    w = watched(chain_file_text(FILTER))
    w.path.unlink()
    assert not await w.poll(after=SETTLE)
    assert "cannot be read" in caplog.text
    assert w.plugin_ids() == ["content_filter"]


# -- SIGHUP ------------------------------------------------------------------------------------


async def test_sighup_rebuilds_an_unchanged_file_and_obeys_the_settle_rule(watched):
    w = watched(chain_file_text(FILTER))
    before = w.holder.plan
    assert not await w.watcher.reload(force=True)
    assert await w.poll(after=SETTLE)
    assert w.holder.plan is not before

    # A changed file is not served by SIGHUP before it settled, but by the next poll after.
    w.path.write_text(chain_file_text(FILTER, LIMITER))
    assert not await w.watcher.reload(force=True)
    assert w.plugin_ids() == ["content_filter"]
    assert await w.poll(after=SETTLE)
    assert w.plugin_ids() == ["content_filter", "rate_limiter"]


# -- limits across reloads ---------------------------------------------------------------------


async def test_a_key_limited_to_5_per_hour_gets_5_of_100_while_the_file_changes_100_times(watched):
    w = watched(chain_file_text(LIMITER, FILTER))
    admitted = 0
    for change in range(100):
        # Everything but the limiter's identity changes: its window's spelling, priority and
        # error policy, the filter's patterns, and whether there is a validator.
        limiter = {**LIMITER, "priority": change % 3, "on_error": ("fail_open", "fail_closed")[change % 2]}
        limiter["config"] = {**LIMITER["config"], "window": ("1h", "60m", "3600s")[change % 3]}
        extra = [{"name": "content_validator", "config": {}}] if change % 2 else []
        w.path.write_text(chain_file_text(limiter, {**FILTER, "config": {"banned_patterns": [BANNED, f"x{change}"]}}, *extra))
        assert not await w.poll()
        assert await w.poll(after=SETTLE)
        admitted += await w.status() == 200
    assert admitted == 5
    assert await w.status(api_key="bob") == 200


async def test_a_raised_limit_in_the_file_carries_the_requests_used_over(watched):
    w = watched(chain_file_text(LIMITER))
    assert [await w.status() for _ in range(6)] == [200] * 5 + [429]
    raised = {**LIMITER, "config": {**LIMITER["config"], "limit": 8}}
    w.path.write_text(chain_file_text(raised))
    assert not await w.poll()
    assert await w.poll(after=SETTLE)
    assert [await w.status() for _ in range(4)] == [200] * 3 + [429]


async def test_the_buckets_of_removed_entries_are_freed_across_many_reloads(watched):
    w = watched(chain_file_text(LIMITER))
    await w.status()
    gc.collect()
    stores_before = len(rate_limiter._MEMORY_STORES), len(token_limiter._MEMORY_STORES)
    for change in range(200):
        renamed = {**LIMITER, "id": f"limiter-{change}"}
        tokens = {"name": "token_limiter", "id": f"tokens-{change}", "config": {"limit": 1000}}
        w.path.write_text(chain_file_text(renamed, tokens))
        await w.poll()
        assert await w.poll(after=SETTLE)
        await w.status()
    for _ in range(3):  # plans retired by reloads are closed by tasks: let them finish
        await asyncio.sleep(0)
    gc.collect()
    stores_after = len(rate_limiter._MEMORY_STORES), len(token_limiter._MEMORY_STORES)
    # Only the last plan's entries remain, plus none of the 199 before.
    assert stores_after[0] <= stores_before[0]
    assert stores_after[1] <= stores_before[1] + 1
