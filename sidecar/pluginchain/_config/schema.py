"""The chain config model: one schema for chain files, PluginChain specs and pushed plans.

Validation reports every problem at once, each with the place it is at, as the user wrote it:
``plugins[1] (content_filter).config.banned_patterns[0]: not a valid RE2 pattern: missing )``.
Nothing here knows about gRPC, Envoy or Kubernetes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import json5
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pluginchain._api.plugin import OnError, PluginConfig, Stage
from pluginchain._api.durations import Duration
from pluginchain._config.registry import PluginRegistry

DEFAULT_CHAIN = "default"
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
class ConfigIssue:
    """One thing wrong with a config, and where."""

    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message


class ConfigError(Exception):
    """A config that cannot be used; carries every issue found, not only the first."""

    def __init__(self, issues: list[ConfigIssue], source: str | None = None):
        self.issues = issues
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.source}: " if self.source else ""
        count = len(self.issues)
        lines = [f"{head}{count} error{'s' if count != 1 else ''} in chain config"]
        lines += [f"  {issue}" for issue in self.issues]
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class ValidatedPlugin:
    entry: PluginEntry
    config: PluginConfig
    location: str
    """Where the entry is in its source, for errors found later (e.g. building the instance)."""


@dataclass(frozen=True, slots=True)
class ValidatedChain:
    name: str
    plugins: tuple[ValidatedPlugin, ...]


def parse_text(text: str, source: str = "<config>") -> Any:
    """Parse a chain file's text: JSON (``//`` comments allowed), a bare ``"key": [...]`` JSON
    fragment as the spec writes one, or YAML."""
    if source.endswith((".yaml", ".yml")):
        return _parse_yaml(text, source)
    try:
        return json5.loads(text)
    except ValueError as json_error:
        if text.lstrip().startswith('"'):
            try:
                return json5.loads("{" + text + "}")
            except ValueError:
                pass
        if source.endswith((".json", ".json5")) or text.lstrip()[:1] in ("{", "["):
            raise ConfigError([ConfigIssue("", f"not valid JSON: {json_error}")], source) from None
    return _parse_yaml(text, source)


def load_file(path: str | Path, registry: PluginRegistry) -> dict[str, ValidatedChain]:
    """Read, parse and validate a chain file; raise :class:`ConfigError` with every issue."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([ConfigIssue("", f"cannot read file: {error}")], str(path)) from None
    document = parse_text(text, str(path))
    try:
        return validate_document(document, registry)
    except ConfigError as error:
        raise ConfigError(error.issues, str(path)) from None


def validate_document(document: Any, registry: PluginRegistry) -> dict[str, ValidatedChain]:
    """Validate a parsed chain file: a list of plugins, ``{"plugins": [...]}``,
    ``{"plugin_chain": [...]}``, or ``{"chains": {NAME: [...] or {"plugins": [...]}}}``."""
    issues: list[ConfigIssue] = []
    chains: dict[str, ValidatedChain] = {}
    for name, entries, location in _chain_sources(document, issues):
        chains[name] = validate_chain(name, entries, registry, issues, location)
    if not chains and not issues:
        issues.append(ConfigIssue("", "the config defines no chain"))
    if issues:
        raise ConfigError(issues)
    return chains


def validate_chain(
    name: str,
    entries: Any,
    registry: PluginRegistry,
    issues: list[ConfigIssue],
    location: str = "plugins",
) -> ValidatedChain:
    """Validate one chain's plugin list, appending every problem to ``issues``."""
    if not CHAIN_NAME.match(name):
        issues.append(ConfigIssue(location, f"chain name {name!r} must be lower-case letters, digits, '-', '_' or '.'"))
    if not isinstance(entries, list):
        issues.append(ConfigIssue(location, f"expected a list of plugins, got {_kind(entries)}"))
        return ValidatedChain(name, ())
    plugins: list[ValidatedPlugin] = []
    seen_ids: dict[str, int] = {}
    for index, raw in enumerate(entries):
        label = raw.get("name") if isinstance(raw, Mapping) and isinstance(raw.get("name"), str) else None
        here = f"{location}[{index}]" + (f" ({label})" if label else "")
        plugin = _validate_entry(raw, registry, here, issues)
        if plugin is None:
            continue
        instance_id = plugin.entry.instance_id
        if instance_id in seen_ids:
            issues.append(ConfigIssue(
                f"{here}.id",
                f"duplicate plugin id {instance_id!r} (also {location}[{seen_ids[instance_id]}]); "
                "give each instance a unique `id`",
            ))
            continue
        seen_ids[instance_id] = index
        plugins.append(plugin)
    return ValidatedChain(name, tuple(plugins))


def _validate_entry(raw: Any, registry: PluginRegistry, here: str, issues: list[ConfigIssue]) -> ValidatedPlugin | None:
    if not isinstance(raw, Mapping):
        issues.append(ConfigIssue(here, f"expected a plugin object, got {_kind(raw)}"))
        return None
    try:
        entry = PluginEntry.model_validate(raw)
    except ValidationError as error:
        issues.extend(pydantic_issues(error, here))
        # Still check the plugin's own config so one run reports everything.
        entry = None
    name = raw.get("name")
    plugin_class = registry.get(name) if isinstance(name, str) else None
    if isinstance(name, str) and plugin_class is None:
        known = ", ".join(registry.names()) or "none"
        issues.append(ConfigIssue(f"{here}.name", f"unknown plugin {name!r}; registered plugins: {known}"))
    if plugin_class is None:
        return None
    config = None
    raw_config = raw.get("config", {})
    if raw_config is None:
        raw_config = {}
    if not isinstance(raw_config, Mapping):
        issues.append(ConfigIssue(f"{here}.config", f"expected an object, got {_kind(raw_config)}"))
    else:
        try:
            config = plugin_class.Config.model_validate(dict(raw_config))
        except ValidationError as error:
            issues.extend(pydantic_issues(error, f"{here}.config"))
    if entry is None:
        return None
    if entry.stage not in plugin_class.stages:
        supported = ", ".join(sorted(plugin_class.stages))
        issues.append(ConfigIssue(f"{here}.stage", f"{entry.name} cannot run in {entry.stage}; it supports: {supported}"))
        return None
    if entry.parallel and not plugin_class.supports_parallel:
        issues.append(ConfigIssue(f"{here}.parallel", f"{entry.name} does not support parallel execution"))
        return None
    if config is None:
        return None
    return ValidatedPlugin(entry, config, here)


def pydantic_issues(error: ValidationError, prefix: str) -> list[ConfigIssue]:
    """Turn pydantic errors into issues located as the user wrote them: ``a.b[0].c``."""
    issues = []
    for detail in error.errors(include_url=False):
        location = prefix
        for part in detail["loc"]:
            location += f"[{part}]" if isinstance(part, int) else f".{part}"
        issues.append(ConfigIssue(location, _message(detail)))
    return issues


def _message(detail: Mapping[str, Any]) -> str:
    kind = detail["type"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    message = str(detail["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


def _chain_sources(document: Any, issues: list[ConfigIssue]):
    if isinstance(document, list):
        yield DEFAULT_CHAIN, document, ""
        return
    if not isinstance(document, Mapping):
        issues.append(ConfigIssue("", f"expected a list of plugins or an object, got {_kind(document)}"))
        return
    known = {"plugins", "plugin_chain", "chains"}
    for key in document:
        if key not in known:
            issues.append(ConfigIssue(str(key), "unknown field; expected `plugins`, `plugin_chain` or `chains`"))
    single = [key for key in ("plugins", "plugin_chain") if key in document]
    if len(single) == 2 or (single and "chains" in document):
        issues.append(ConfigIssue("", "use one of `plugins`, `plugin_chain` or `chains`, not several"))
        return
    if single:
        yield DEFAULT_CHAIN, document[single[0]], single[0]
        return
    if "chains" not in document:
        if not issues:
            issues.append(ConfigIssue("", "expected `plugins`, `plugin_chain` or `chains`"))
        return
    chains = document["chains"]
    if not isinstance(chains, Mapping):
        issues.append(ConfigIssue("chains", f"expected an object of named chains, got {_kind(chains)}"))
        return
    for name, body in chains.items():
        location = f"chains.{name}"
        if isinstance(body, Mapping):
            extra = set(body) - {"plugins"}
            if extra:
                issues.append(ConfigIssue(f"{location}.{sorted(extra)[0]}", "unknown field; a chain has only `plugins`"))
            yield str(name), body.get("plugins"), f"{location}.plugins"
        else:
            yield str(name), body, location


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError([ConfigIssue("", f"not valid YAML or JSON: {error}")], source) from None


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(type(value), type(value).__name__)
