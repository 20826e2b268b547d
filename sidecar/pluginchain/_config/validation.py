"""Where a chain is validated: plugin entries against the registered plugins' declarations and
config models, and the shapes a chain file may take. Every problem is reported at once, each at
its structured path.

A chain file's set of chains must hold ``default``, the chain every request whose route names no
chain runs, or say that no route leaves it out (``no_default_chain: true``): otherwise the file
validates and then those requests all get 500 ``unknown_chain``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from pydantic import ValidationError

from pluginchain._api.plugin import PluginConfig, Stage
from pluginchain._config.issues import (
    ConfigError,
    ConfigIssue,
    EntryRef,
    Path,
    kind_of,
    pydantic_issues,
    render_path,
)
from pluginchain._config.models import (
    CHAIN_METADATA_KEY,
    CHAIN_NAME,
    DEFAULT_CHAIN,
    NO_DEFAULT_CHAIN,
    PluginEntry,
    ValidatedChain,
    ValidatedPlugin,
)
from pluginchain._config.registry import PluginRegistry


def check_chain_name(name: str, path: Path) -> list[ConfigIssue]:
    if CHAIN_NAME.match(name):
        return []
    return [ConfigIssue(path, f"chain name {name!r} must be lower-case letters, digits, '-', '_' or '.'")]


def validate_chain(name: str, entries: Any, registry: PluginRegistry, path: Path) -> tuple[ValidatedChain, list[ConfigIssue]]:
    """Validate one chain's plugin list found at ``path``; return what validated and every issue."""
    issues: list[ConfigIssue] = []
    if not isinstance(entries, list):
        issues.append(ConfigIssue(path, f"expected a list of plugins, got {kind_of(entries)}"))
        return ValidatedChain(name, ()), issues
    plugins: list[ValidatedPlugin] = []
    seen_ids: dict[str, int] = {}
    for index, raw in enumerate(entries):
        here = path + (EntryRef(index, _label(raw)),)
        plugin = _validate_entry(raw, registry, here, issues)
        if plugin is None:
            continue
        instance_id = plugin.entry.instance_id
        if instance_id in seen_ids:
            also = render_path(path + (seen_ids[instance_id],))
            issues.append(ConfigIssue(
                here + ("id",), f"duplicate plugin id {instance_id!r} (also {also}); give each instance a unique `id`"
            ))
            continue
        seen_ids[instance_id] = index
        plugins.append(plugin)
    return ValidatedChain(name, tuple(plugins)), issues


def _label(raw: Any) -> str | None:
    """The name an entry is known by in errors: its id, else its plugin name."""
    if not isinstance(raw, Mapping):
        return None
    for key in ("id", "name"):
        if isinstance(raw.get(key), str) and raw[key]:
            return str(raw[key])
    return None


def _validate_entry(raw: Any, registry: PluginRegistry, here: Path, issues: list[ConfigIssue]) -> ValidatedPlugin | None:
    if not isinstance(raw, Mapping):
        issues.append(ConfigIssue(here, f"expected a plugin object, got {kind_of(raw)}"))
        return None
    entry: PluginEntry | None
    try:
        entry = PluginEntry.model_validate(raw)
    except ValidationError as error:
        issues.extend(pydantic_issues(error, here))
        entry = None  # still check the plugin's own config, so one run reports everything
    name = raw.get("name")
    plugin_class = registry.get(name) if isinstance(name, str) else None
    if isinstance(name, str) and plugin_class is None:
        known = ", ".join(registry.names()) or "none"
        issues.append(ConfigIssue(here + ("name",), f"unknown plugin {name!r}; registered plugins: {known}"))
    if plugin_class is None:
        return None
    config: PluginConfig | None = None
    raw_config = raw.get("config") or {}
    if not isinstance(raw_config, Mapping):
        issues.append(ConfigIssue(here + ("config",), f"expected an object, got {kind_of(raw_config)}"))
    else:
        try:
            config = plugin_class.Config.model_validate(dict(raw_config))
        except ValidationError as error:
            issues.extend(pydantic_issues(error, here + ("config",)))
    if entry is None:
        return None
    if entry.stage not in plugin_class.stages:
        supported = ", ".join(sorted(plugin_class.stages))
        issues.append(ConfigIssue(here + ("stage",), f"{entry.name} cannot run in {entry.stage}; it supports: {supported}"))
        return None
    if entry.stage is Stage.POST_REQUEST and plugin_class.reads_body and not plugin_class.streams:
        issues.append(ConfigIssue(
            here + ("stage",),
            f"{entry.name} reads response bodies but cannot judge a streamed response (its class declares no `streams`), "
            "so it cannot run in post_request",
        ))
        return None
    if entry.parallel and not plugin_class.supports_parallel:
        issues.append(ConfigIssue(here + ("parallel",), f"{entry.name} does not support parallel execution"))
        return None
    if config is None:
        return None
    return ValidatedPlugin(entry, config, here)


def validate_document(document: Any, registry: PluginRegistry) -> dict[str, ValidatedChain]:
    """Validate a parsed chain file: a list of plugins, ``{"plugins": [...]}``,
    ``{"plugin_chain": [...]}``, or ``{"chains": {NAME: [...] or {"plugins": [...]}}}`` (with
    ``"no_default_chain": true`` when it holds no ``default``); raise :class:`ConfigError` with
    every issue."""
    issues: list[ConfigIssue] = []
    chains: dict[str, ValidatedChain] = {}
    for name, entries, path in _chain_sources(document, issues):
        issues += check_chain_name(name, path)
        chains[name], found = validate_chain(name, entries, registry, path)
        issues += found
    if not chains and not issues:
        issues.append(ConfigIssue((), "the config defines no chain"))
    elif chains and isinstance(document, Mapping) and "chains" in document:
        issues += _default_chain_issues(document, chains)
    if issues:
        raise ConfigError(issues)
    return chains


def missing_default_chain(chain_names: Iterable[str]) -> str | None:
    """What is wrong with a set of chains that has no ``default``, for anyone who serves or pushes
    one (None when it has one): requests whose route names no chain would all get 500."""
    names = sorted(chain_names)
    if DEFAULT_CHAIN in names:
        return None
    defined = ", ".join(repr(name) for name in names) or "none"
    return (
        f"no chain named {DEFAULT_CHAIN!r} (chains defined: {defined}): requests on routes that name no chain "
        f"(no {CHAIN_METADATA_KEY} metadata) would get 500 unknown_chain"
    )


def _default_chain_issues(document: Mapping[str, Any], chains: Mapping[str, ValidatedChain]) -> list[ConfigIssue]:
    declared = document.get(NO_DEFAULT_CHAIN, False)
    if not isinstance(declared, bool):
        return [ConfigIssue((NO_DEFAULT_CHAIN,), f"expected true or false, got {kind_of(declared)}")]
    missing = missing_default_chain(chains)
    if declared and missing is None:
        return [ConfigIssue(
            (NO_DEFAULT_CHAIN,),
            f"says there is no default chain, but the file defines {DEFAULT_CHAIN!r}; remove one of them",
        )]
    if missing is not None and not declared:
        return [ConfigIssue(
            ("chains",),
            f"{missing}; add a {DEFAULT_CHAIN!r} chain, or, if every route names its chain "
            f"(with `pluginchain gateway`: a `--route /=CHAIN` for every path), say so with `{NO_DEFAULT_CHAIN}: true`",
        )]
    return []


def _chain_sources(document: Any, issues: list[ConfigIssue]) -> Iterator[tuple[str, Any, Path]]:
    if isinstance(document, list):
        yield DEFAULT_CHAIN, document, ()
        return
    if not isinstance(document, Mapping):
        issues.append(ConfigIssue((), f"expected a list of plugins or an object, got {kind_of(document)}"))
        return
    known = {"plugins", "plugin_chain", "chains", NO_DEFAULT_CHAIN}
    for key in document:
        if key not in known:
            issues.append(ConfigIssue((str(key),), f"unknown field; expected `plugins`, `plugin_chain` or `chains` (and `{NO_DEFAULT_CHAIN}`)"))
    if NO_DEFAULT_CHAIN in document and "chains" not in document:
        issues.append(ConfigIssue((NO_DEFAULT_CHAIN,), "goes with `chains` only: a single chain is the default chain"))
    single = [key for key in ("plugins", "plugin_chain") if key in document]
    if len(single) == 2 or (single and "chains" in document):
        issues.append(ConfigIssue((), "use one of `plugins`, `plugin_chain` or `chains`, not several"))
        return
    if single:
        yield DEFAULT_CHAIN, document[single[0]], (single[0],)
        return
    if "chains" not in document:
        if not issues:
            issues.append(ConfigIssue((), "expected `plugins`, `plugin_chain` or `chains`"))
        return
    chains = document["chains"]
    if not isinstance(chains, Mapping):
        issues.append(ConfigIssue(("chains",), f"expected an object of named chains, got {kind_of(chains)}"))
        return
    for name, body in chains.items():
        path: Path = ("chains", str(name))
        if isinstance(body, Mapping):
            extra = set(body) - {"plugins"}
            if extra:
                issues.append(ConfigIssue(path + (sorted(extra)[0],), "unknown field; a chain has only `plugins`"))
            yield str(name), body.get("plugins"), path + ("plugins",)
        else:
            yield str(name), body, path
