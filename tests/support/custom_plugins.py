"""Custom plugins the end-to-end tests load with ``pluginchain serve --plugins``."""

from __future__ import annotations

import asyncio

from pluginchain import Plugin, PluginConfig, PluginContext, PluginData, Stage


class StampConfig(PluginConfig):
    header: str = "x-pluginchain-stamp"
    value: str = "stamped"


class Stamp(Plugin):
    """Sets a header on the message its stage works on, and tells whether it saw a body."""

    name = "stamp"
    Config = StampConfig
    stages = frozenset({Stage.PRE_REQUEST, Stage.POST_REQUEST})
    supports_parallel = True

    async def execute(self, ctx: PluginContext, data: PluginData) -> None:
        data.set_header(self.config.header, self.config.value)
        data.set_header(f"{self.config.header}-saw-body", "no" if data.body is None else "yes")


class SlowConfig(PluginConfig):
    seconds: float = 1.0


class Slow(Plugin):
    """Takes its time, for drain and cancellation tests."""

    name = "slow"
    Config = SlowConfig
    stages = frozenset({Stage.PRE_REQUEST})
    supports_parallel = True

    async def execute(self, ctx: PluginContext, data: PluginData) -> None:
        await asyncio.sleep(self.config.seconds)


class Explode(Plugin):
    """Always fails, for error-path tests."""

    name = "explode"
    stages = frozenset({Stage.PRE_REQUEST})

    async def execute(self, ctx: PluginContext, data: PluginData) -> None:
        raise RuntimeError("exploded on purpose")
