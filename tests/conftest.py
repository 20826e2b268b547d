"""Suite-wide fixtures: fail a test that leaks asyncio tasks."""

from __future__ import annotations

import asyncio

import pytest


@pytest.fixture(autouse=True)
async def no_leaked_tasks():
    before = asyncio.all_tasks()
    yield

    def leaked() -> list[asyncio.Task]:
        current = asyncio.current_task()
        return [t for t in asyncio.all_tasks() - before if not t.done() and t is not current]

    # Tasks that are merely finishing (a server winding down its handlers) get a moment.
    for _ in range(50):
        if not leaked():
            break
        await asyncio.sleep(0.02)
    assert not leaked(), f"test leaked asyncio tasks: {leaked()}"
