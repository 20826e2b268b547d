"""The chain config model, one for every way a chain arrives: a chain file, a PluginChain spec, a
pushed chain set and the sidecar's state file all hold these plugin entries."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pluginchain._api.durations import Duration
from pluginchain._api.plugin import OnError, PluginConfig, Stage
from pluginchain._config.issues import Path

DEFAULT_CHAIN = "default"
"""The chain a request runs when its route names none."""
NO_DEFAULT_CHAIN = "no_default_chain"
"""The chain-file key that says every route names its chain, so the file needs no ``default``."""
CHAIN_METADATA_KEY = "x-pluginchain-chain"
"""The gRPC initial metadata by which an Envoy route names the chain its requests run."""
CHAIN_NAME = re.compile(r"^[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?$")


class PluginEntry(BaseModel):
    """One plugin in a chain, as the spec writes it."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str
    """The registered plugin name, e.g. ``rate_limiter``."""
    id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Instance name, unique in its chain; defaults to ``name``. Needed to use a plugin twice."""
    enabled: bool = True
    """A disabled entry is still validated, so enabling it later cannot surprise, but never runs."""
    stage: Stage = Stage.PRE_REQUEST
    """When it runs: ``pre_request`` (default), ``post_request`` or ``error``."""
    priority: int = 0
    """Lower runs first; entries with equal priority form one group."""
    parallel: bool = False
    """Run concurrently with the group's other parallel members (after its sequential ones)."""
    timeout: Duration = 5.0
    """Longest one execution may take (default 5s); past it the plugin has failed."""
    on_error: OnError = "fail_closed"
    """On failure or timeout: ``fail_closed`` (default) answers the client with an error;
    ``fail_open`` lets the request go on. Both run the error stage, log and count."""
    config: dict[str, Any] = Field(default_factory=dict)
    """The plugin's own settings, validated by its config model."""

    @property
    def instance_id(self) -> str:
        return self.id or self.name


@dataclass(frozen=True, slots=True)
class ValidatedPlugin:
    """An entry that validated, with its config parsed by the plugin's own model."""

    entry: PluginEntry
    config: PluginConfig
    path: Path
    """Where the entry is in its source, for errors found later (building the instance)."""


@dataclass(frozen=True, slots=True)
class ValidatedChain:
    name: str
    plugins: tuple[ValidatedPlugin, ...]
