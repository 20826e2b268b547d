"""pluginchain: the plugin system of an AI gateway.

The stable import path for plugin authors: everything a plugin needs is importable from here.
"""

from pluginchain._api.plugin import (
    BodyNeeds,
    BodyNotJSON,
    BodyTooDeep,
    Exchange,
    Failure,
    HttpMessage,
    InstanceSettings,
    MAX_JSON_DEPTH,
    Plugin,
    PluginConfig,
    PluginContext,
    PluginData,
    Reject,
    Stage,
    parse_json,
)
from pluginchain._api.durations import Duration

__all__ = [
    "BodyNeeds",
    "BodyNotJSON",
    "BodyTooDeep",
    "Duration",
    "Exchange",
    "Failure",
    "HttpMessage",
    "InstanceSettings",
    "MAX_JSON_DEPTH",
    "Plugin",
    "PluginConfig",
    "PluginContext",
    "PluginData",
    "Reject",
    "Stage",
    "parse_json",
]
