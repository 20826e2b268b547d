"""pluginchain: the plugin system of an AI gateway.

The stable import path for plugin authors: everything a plugin needs is importable from here.
"""

from pluginchain.api import (
    BodyNeeds,
    BodyNotJSON,
    Exchange,
    Failure,
    HttpMessage,
    InstanceSettings,
    Plugin,
    PluginConfig,
    PluginContext,
    PluginData,
    Reject,
    Stage,
)
from pluginchain.durations import Duration

__all__ = [
    "BodyNeeds",
    "BodyNotJSON",
    "Duration",
    "Exchange",
    "Failure",
    "HttpMessage",
    "InstanceSettings",
    "Plugin",
    "PluginConfig",
    "PluginContext",
    "PluginData",
    "Reject",
    "Stage",
]
