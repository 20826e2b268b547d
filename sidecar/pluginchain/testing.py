"""Helpers to exercise one plugin instance without a chain or a sidecar, for plugin authors' tests."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from pluginchain._api.plugin import (
    Exchange,
    Failure,
    HttpMessage,
    InstanceSettings,
    Plugin,
    PluginContext,
    PluginData,
    Stage,
)


def make_plugin(
    plugin_class: type[Plugin], config: Mapping[str, Any] | None = None, **settings: Any
) -> Plugin:
    """Build ``plugin_class`` with ``config`` validated by its own model.

    ``settings`` are :class:`InstanceSettings` fields; ``id`` defaults to the plugin's name and
    ``stage`` to its first supported stage in declaration order of :class:`Stage`.
    """
    settings.setdefault("id", plugin_class.name)
    settings["stage"] = Stage(settings.get("stage") or next(s for s in Stage if s in plugin_class.stages))
    return plugin_class(plugin_class.Config.model_validate(dict(config or {})), InstanceSettings(**settings))


def make_exchange(
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    response_headers: Mapping[str, str] | None = None,
    response_body: bytes | None = None,
    client_address: str | None = "127.0.0.1",
    request_id: str = "test-request",
    consumer: str | None = None,
    session: str | None = None,
) -> Exchange:
    response = None
    if response_headers is not None or response_body is not None:
        response = HttpMessage(response_headers, response_body)
    return Exchange(
        request=HttpMessage(headers, body),
        response=response,
        client_address=client_address,
        request_id=request_id,
        consumer=consumer,
        session=session,
    )


async def run_plugin(plugin: Plugin, exchange: Exchange, error: Failure | None = None) -> PluginData:
    """Execute ``plugin`` once on ``exchange`` and apply its changes; :class:`Reject` propagates."""
    data = PluginData(plugin.stage, exchange, error)
    deadline = asyncio.get_running_loop().time() + plugin.settings.timeout
    ctx = PluginContext(plugin.settings.chain, exchange.request_id, plugin.id, deadline, exchange.consumer, exchange.session)
    await plugin.execute(ctx, data)
    data.apply()
    return data
