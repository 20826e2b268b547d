"""A plugin whose behaviour each chain entry scripts, so engine tests can stage any situation.

Every execution appends (event, plugin id) to the list in ``exchange.metadata["events"]``. The
sidecar tests load this module too (``--plugins tests/support/scripted.py``) to stage what a
custom plugin might try, framing headers and bodies included.
"""

from __future__ import annotations

import asyncio
import time

from pluginchain import (
    InstanceSettings,
    Needs,
    Plugin,
    PluginConfig,
    PluginContext,
    PluginData,
    Reject,
    Stage,
)
from pluginchain._config.registry import PluginRegistry


class ScriptedConfig(PluginConfig):
    busy: float = 0.0
    """Seconds of work done inline, without awaiting, before the ``sleep`` (a CPU-bound plugin)."""
    sleep: float = 0.0
    """Seconds to wait before acting."""
    yield_once: bool = False
    """Give the event loop one turn first (``asyncio.sleep(0)``: a bare yield, no future)."""
    set_headers: dict[str, str] = {}
    remove_headers: list[str] = []
    response_headers: dict[str, str] = {}
    """Set on the client's response with ``set_response_header``."""
    set_body: str | None = None
    """Replace the body of the stage's message with this text."""
    reject_status: int | None = None
    reject_headers: dict[str, str] = {}
    fail: str | None = None
    """Raise RuntimeError with this message."""
    reads_body: bool = False
    remember_error: bool = False
    """In the error stage: record the failure seen in the events."""
    never_suspends: bool = False
    """Say so in needs(), so the engine runs it inline (then ``sleep`` is a lie it catches)."""
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

    reads_body = True

    def needs(self) -> Needs:
        return Needs(
            request_body=self.config.reads_body and self.stage is Stage.PRE_REQUEST,
            response_body=self.config.reads_body and self.stage is Stage.POST_REQUEST,
            suspends=not self.config.never_suspends,
            response_headers=bool(self.config.response_headers),
        )

    async def execute(self, ctx: PluginContext, data: PluginData) -> None:
        events = data.exchange.metadata.setdefault("events", [])
        events.append(("start", self.id))
        busy_until = time.perf_counter() + self.config.busy
        while time.perf_counter() < busy_until:
            pass
        try:
            if self.config.yield_once:
                await asyncio.sleep(0)
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
            raise Reject(self.config.reject_status, f"rejected by {self.id}", code="scripted", headers=self.config.reject_headers)
        for name, value in self.config.set_headers.items():
            data.set_header(name, value)
        for name in self.config.remove_headers:
            data.remove_header(name)
        for name, value in self.config.response_headers.items():
            data.set_response_header(name, value)
        if self.config.set_body is not None:
            data.set_body(self.config.set_body.encode())
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
