"""A plugin whose behaviour each chain entry scripts, so engine tests can stage any situation.

Every execution appends (event, plugin id) to the list in ``exchange.metadata["events"]``.
"""

from __future__ import annotations

import asyncio

from pluginchain import InstanceSettings, Plugin, PluginConfig, PluginContext, PluginData, Reject, Stage
from pluginchain._config.registry import PluginRegistry


class ScriptedConfig(PluginConfig):
    sleep: float = 0.0
    """Seconds to wait before acting."""
    set_headers: dict[str, str] = {}
    reject_status: int | None = None
    fail: str | None = None
    """Raise RuntimeError with this message."""
    reads_body: bool = False
    remember_error: bool = False
    """In the error stage: record the failure seen in the events."""
    refuse_to_build: str | None = None
    """Raise ValueError with this message from the constructor (a plugin that cannot be built)."""


class Scripted(Plugin):
    name = "scripted"
    Config = ScriptedConfig
    stages = frozenset(Stage)
    supports_parallel = True

    def __init__(self, config: ScriptedConfig, settings: InstanceSettings):
        if config.refuse_to_build:
            raise ValueError(config.refuse_to_build)
        super().__init__(config, settings)

    def body_needs(self):
        from pluginchain import BodyNeeds

        if not self.config.reads_body:
            return BodyNeeds()
        return BodyNeeds(request=self.stage is Stage.PRE_REQUEST, response=self.stage is Stage.POST_REQUEST)

    async def execute(self, ctx: PluginContext, data: PluginData) -> None:
        events = data.exchange.metadata.setdefault("events", [])
        events.append(("start", self.id))
        try:
            if self.config.sleep:
                await asyncio.sleep(self.config.sleep)
        except asyncio.CancelledError:
            events.append(("cancelled", self.id))
            raise
        events.append(("seen", self.id, dict(data.headers)))
        if self.config.remember_error and data.error is not None:
            events.append(("error", self.id, data.error))
        if self.config.fail:
            raise RuntimeError(self.config.fail)
        if self.config.reject_status:
            raise Reject(self.config.reject_status, f"rejected by {self.id}", code="scripted")
        for name, value in self.config.set_headers.items():
            data.set_header(name, value)
        events.append(("end", self.id))


class Sequential(Scripted):
    """The same, for a plugin class that cannot run in parallel."""

    name = "sequential_only"
    supports_parallel = False


def scripted_registry() -> PluginRegistry:
    registry = PluginRegistry()
    registry.register(Scripted)
    registry.register(Sequential)
    return registry
