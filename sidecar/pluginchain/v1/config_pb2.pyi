from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PluginEntry(_message.Message):
    __slots__ = ("name", "id", "enabled", "stage", "priority", "parallel", "timeout_seconds", "on_error", "config_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PARALLEL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ON_ERROR_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    id: str
    enabled: bool
    stage: str
    priority: int
    parallel: bool
    timeout_seconds: float
    on_error: str
    config_json: str
    def __init__(self, name: _Optional[str] = ..., id: _Optional[str] = ..., enabled: _Optional[bool] = ..., stage: _Optional[str] = ..., priority: _Optional[int] = ..., parallel: _Optional[bool] = ..., timeout_seconds: _Optional[float] = ..., on_error: _Optional[str] = ..., config_json: _Optional[str] = ...) -> None: ...

class Chain(_message.Message):
    __slots__ = ("name", "plugins", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PLUGINS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    plugins: _containers.RepeatedCompositeFieldContainer[PluginEntry]
    source: str
    def __init__(self, name: _Optional[str] = ..., plugins: _Optional[_Iterable[_Union[PluginEntry, _Mapping]]] = ..., source: _Optional[str] = ...) -> None: ...

class ChainSet(_message.Message):
    __slots__ = ("version", "chains")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHAINS_FIELD_NUMBER: _ClassVar[int]
    version: int
    chains: _containers.RepeatedCompositeFieldContainer[Chain]
    def __init__(self, version: _Optional[int] = ..., chains: _Optional[_Iterable[_Union[Chain, _Mapping]]] = ...) -> None: ...

class ApplyRequest(_message.Message):
    __slots__ = ("chain_set",)
    CHAIN_SET_FIELD_NUMBER: _ClassVar[int]
    chain_set: ChainSet
    def __init__(self, chain_set: _Optional[_Union[ChainSet, _Mapping]] = ...) -> None: ...

class ApplyResponse(_message.Message):
    __slots__ = ("active_version", "changed")
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    active_version: int
    changed: bool
    def __init__(self, active_version: _Optional[int] = ..., changed: _Optional[bool] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("chain_set", "origin")
    CHAIN_SET_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    chain_set: ChainSet
    origin: str
    def __init__(self, chain_set: _Optional[_Union[ChainSet, _Mapping]] = ..., origin: _Optional[str] = ...) -> None: ...
