"""Suite-wide fixtures: fail a test that leaks asyncio tasks, and undo a command's logging setup."""

from __future__ import annotations

import asyncio
import logging

import pytest


@pytest.fixture(autouse=True)
def root_logging_restored():
    """A command run in-process (``cli.main``) points the root logger at the stderr of its test,
    which pytest closes afterwards: later log lines (a server thread's) would hit a closed file."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


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
