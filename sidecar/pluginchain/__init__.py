"""pluginchain: the plugin system of an AI gateway.

The stable import path for plugin authors: everything a plugin needs is importable from here.
"""

from pluginchain._api.durations import Duration
from pluginchain._api.plugin import (
    MAX_JSON_DEPTH,
    BodyNotJSON,
    BodyTooDeep,
    Exchange,
    Failure,
    HttpMessage,
    InstanceSettings,
    Needs,
    Plugin,
    PluginConfig,
    PluginContext,
    PluginData,
    Reject,
    Stage,
    Usage,
    parse_json,
)
from pluginchain._api.stream import StreamEvent, StreamMode, TextChannel

__all__ = [
    "BodyNotJSON",
    "BodyTooDeep",
    "Duration",
    "Exchange",
    "Failure",
    "HttpMessage",
    "InstanceSettings",
    "MAX_JSON_DEPTH",
    "Needs",
    "Plugin",
    "PluginConfig",
    "PluginContext",
    "PluginData",
    "Reject",
    "Stage",
    "StreamEvent",
    "StreamMode",
    "TextChannel",
    "Usage",
    "parse_json",
]
