"""The wire form of chains (``pluginchain.v1.ChainSet``), which pushes and the state file carry.

Exactly one conversion each way: :func:`chain_to_wire` turns a validated chain into its message,
entries in plan order; :func:`validate_chain_set` reads a chain set back through the same
validation as a chain file, errors located as ``chains.NAME[INDEX] (ID).field``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from pluginchain._api.plugin import Stage
from pluginchain._config.issues import ConfigError, ConfigIssue, EntryRef, Path
from pluginchain._config.models import ValidatedChain
from pluginchain._config.registry import PluginRegistry
from pluginchain._config.validation import check_chain_name, validate_chain
from pluginchain.v1 import config_pb2

_STAGE_ORDER = {stage: index for index, stage in enumerate(Stage)}


def chain_to_wire(chain: ValidatedChain, source: str) -> config_pb2.Chain:
    """A validated chain as the wire message. Entries are in plan order (stage, priority,
    sequential before parallel, then declaration order, which the receiver keeps), so chains
    that run alike are sent alike."""
    ordered = sorted(
        enumerate(chain.plugins),
        key=lambda item: (_STAGE_ORDER[item[1].entry.stage], item[1].entry.priority, item[1].entry.parallel, item[0]),
    )
    entries = []
    for _, validated in ordered:
        entry = validated.entry
        entries.append(config_pb2.PluginEntry(
            name=entry.name,
            id=entry.id or "",
            enabled=entry.enabled,
            stage=str(entry.stage),
            priority=entry.priority,
            parallel=entry.parallel,
            timeout_seconds=entry.timeout,
            on_error=entry.on_error,
            config_json=json.dumps(entry.config, sort_keys=True, separators=(",", ":")),
        ))
    return config_pb2.Chain(name=chain.name, plugins=entries, source=source)


def validate_chain_set(chain_set: config_pb2.ChainSet, registry: PluginRegistry) -> dict[str, ValidatedChain]:
    """Validate a pushed (or saved) chain set; raise :class:`ConfigError` with every issue.

    A chain set without chains is valid: it runs nothing (every request gets 500).
    """
    issues: list[ConfigIssue] = []
    validated: dict[str, ValidatedChain] = {}
    seen: dict[str, int] = {}
    for chain_index, chain in enumerate(chain_set.chains):
        if chain.name in seen:
            problem = f"duplicate chain name {chain.name!r} (also chains[{seen[chain.name]}])"
            issues.append(ConfigIssue(("chains", chain_index, "name"), problem))
            continue
        seen[chain.name] = chain_index
        path: Path = ("chains", chain.name)
        issues += check_chain_name(chain.name, path)
        entries, unreadable = [], []
        for index, message in enumerate(chain.plugins):
            here = path + (EntryRef(index, message.id or message.name or None),)
            raw, problems = _entry_document(message)
            issues += [issue.under(here) for issue in problems]
            if any(issue.path == ("config_json",) for issue in problems):
                unreadable.append(here + ("config",))
            entries.append(raw)
        validated[chain.name], found = validate_chain(chain.name, entries, registry, path)
        # An entry whose config_json did not parse was checked with an empty config; what that
        # reports (say, a missing required field) is noise beside the parse error.
        issues += [issue for issue in found if not any(issue.path[: len(bad)] == bad for bad in unreadable)]
    if issues:
        raise ConfigError(issues)
    return validated


def _entry_document(entry: config_pb2.PluginEntry) -> tuple[dict[str, Any], list[ConfigIssue]]:
    """One wire entry as the chain-file entry it stands for (unset fields take the file's
    defaults), and what is wrong with the wire fields themselves, located at the proto's names."""
    raw: dict[str, Any] = {"name": entry.name, "priority": entry.priority, "parallel": entry.parallel}
    problems: list[ConfigIssue] = []
    if entry.id:
        raw["id"] = entry.id
    if entry.HasField("enabled"):
        raw["enabled"] = entry.enabled
    if entry.stage:
        raw["stage"] = entry.stage
    if not math.isfinite(entry.timeout_seconds):
        problem = f"must be a finite number of seconds, got {entry.timeout_seconds}"
        problems.append(ConfigIssue(("timeout_seconds",), problem))
    elif entry.timeout_seconds:
        raw["timeout"] = entry.timeout_seconds
    if entry.on_error:
        raw["on_error"] = entry.on_error
    if entry.config_json:
        try:
            raw["config"] = json.loads(entry.config_json)
        except (ValueError, RecursionError) as error:
            problems.append(ConfigIssue(("config_json",), f"not valid JSON: {error}"))
    return raw, problems


def wire_sources(chain_set: config_pb2.ChainSet) -> Mapping[str, str]:
    """Where each chain of a chain set came from (``PluginChain ns/name``, ``file ...``)."""
    return {chain.name: chain.source for chain in chain_set.chains}
