"""pluginchain: the plugin system of an AI gateway.

The stable import path for plugin authors: everything a plugin needs is importable from here.
"""

from pluginchain._api.durations import Duration
from pluginchain._api.plugin import (
    FRAMING_HEADERS,
    MAX_JSON_DEPTH,
    BodyDuplicateKeys,
    BodyNotJSON,
    BodyNotUTF8,
    BodyTooDeep,
    BodyUninspectable,
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
    "FRAMING_HEADERS",
    "BodyDuplicateKeys",
    "BodyNotJSON",
    "BodyNotUTF8",
    "BodyTooDeep",
    "BodyUninspectable",
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
