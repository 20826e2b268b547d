"""The PluginChain resource's spec as pydantic models: the one source of the CRD schema and of the
operator's validation, built on the same plugin-entry model the sidecar validates with."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pluginchain._config.defaults import DEFAULTS
from pluginchain._config.issues import ConfigError, ConfigIssue, Path, pydantic_issues
from pluginchain._config.models import (
    CHAIN_NAME,
    DEFAULT_CHAIN,
    PluginEntry,
    ValidatedChain,
)
from pluginchain._config.registry import PluginRegistry
from pluginchain._config.validation import validate_chain
from pluginchain._engine.plan import compile_plan

GROUP = "pluginchain.io"
VERSION = "v1alpha1"
KIND = "PluginChain"
PLURAL = "pluginchains"
SINGULAR = "pluginchain"
SHORT_NAMES = ("pc",)
CONFIG_PORT_ANNOTATION = "pluginchain.io/config-port"
DEFAULT_CONFIG_PORT = DEFAULTS.config_port


class LabelSelectorRequirement(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    key: str
    """The label key the selector applies to."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """How the key relates to the values."""
    values: list[str] = Field(default_factory=list)
    """For In and NotIn: the values; for Exists and DoesNotExist: empty."""


class LabelSelector(BaseModel):
    """A Kubernetes label selector; all requirements must hold (an empty selector selects nothing)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, use_attribute_docstrings=True)

    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels")
    """Labels the gateway pods must carry, exactly."""
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, alias="matchExpressions")
    """Further requirements on the pods' labels."""

    def is_empty(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def matches(self, labels: Mapping[str, str]) -> bool:
        # Selecting every pod in the namespace by accident would push this chain everywhere.
        if self.is_empty():
            return False
        if any(labels.get(key) != value for key, value in self.match_labels.items()):
            return False
        for requirement in self.match_expressions:
            present = requirement.key in labels
            value = labels.get(requirement.key)
            if requirement.operator == "In" and value not in requirement.values:
                return False
            if requirement.operator == "NotIn" and present and value in requirement.values:
                return False
            if requirement.operator == "Exists" and not present:
                return False
            if requirement.operator == "DoesNotExist" and present:
                return False
        return True


class PluginChainSpec(BaseModel):
    """Which gateway pods run which chain of plugins."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    selector: LabelSelector
    """The gateway pods (in this namespace) whose sidecars run this chain."""
    chain: str = Field(default=DEFAULT_CHAIN, pattern=CHAIN_NAME.pattern)
    """The chain name Envoy routes select (gRPC metadata x-pluginchain-chain); `default` runs for
    routes that select none."""
    plugins: list[PluginEntry] = Field(min_length=1)
    """The plugin entries, as in a chain file."""


@dataclass(frozen=True)
class CheckedSpec:
    """A PluginChain spec without a problem: the spec, and its chain validated and built once."""

    spec: PluginChainSpec
    chain: ValidatedChain


def check_spec(spec: Mapping[str, Any], registry: PluginRegistry) -> tuple[list[ConfigIssue], CheckedSpec | None]:
    """Every problem of a PluginChain spec, located under ``spec.``, and, when there is none, the
    checked spec. Plugin entries are validated as in a chain file, then built, so a plugin that
    cannot be built is reported at its entry too."""
    issues: list[ConfigIssue] = []
    parsed: PluginChainSpec | None = None
    try:
        parsed = PluginChainSpec.model_validate(spec)
    except ValidationError as error:
        # Inside an entry, validate_chain below says it all, the plugin's own config included.
        issues += [issue for issue in pydantic_issues(error, ("spec",)) if not _inside_an_entry(issue.path)]
    entries = spec.get("plugins")
    if not isinstance(entries, list):
        return issues, None  # the spec model said what is wrong with it
    chain, found = validate_chain(str(spec.get("chain", DEFAULT_CHAIN)), entries, registry, ("spec", "plugins"))
    issues += found
    if issues or parsed is None:
        return issues, None
    try:
        compile_plan({chain.name: chain}, registry)
    except ConfigError as error:
        return error.issues, None
    return [], CheckedSpec(parsed, chain)


def _inside_an_entry(path: Path) -> bool:
    return len(path) > 2 and path[:2] == ("spec", "plugins")


def manifest_chains(text: str, source: str, registry: PluginRegistry) -> dict[str, dict[str, ValidatedChain]] | None:
    """The chains of the PluginChain resources in a file of Kubernetes manifests (YAML documents,
    or JSON such as ``kubectl get pc -o json``), by resource (``PluginChain NAMESPACE/NAME``);
    None when the file holds no PluginChain (it is then a chain file). Other kinds are skipped.
    Raises :class:`ConfigError` with every issue of every resource, each located in it."""
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError:
        return None  # not a manifest stream: the chain-file parser says what is wrong
    resources: list[dict[str, Any]] = []
    for document in documents:
        if isinstance(document, dict) and isinstance(document.get("items"), list):  # a List
            resources.extend(item for item in document["items"] if isinstance(item, dict) and item.get("kind") == KIND)
        elif isinstance(document, dict) and document.get("kind") == KIND:
            resources.append(document)
    if not resources:
        return None
    chains: dict[str, dict[str, ValidatedChain]] = {}
    issues: list[ConfigIssue] = []
    for resource in resources:
        metadata = resource["metadata"] if isinstance(resource.get("metadata"), dict) else {}
        name = f"{metadata['namespace']}/{metadata.get('name', '?')}" if metadata.get("namespace") else metadata.get("name", "?")
        label = f"{KIND} {name}"
        if resource.get("apiVersion") != f"{GROUP}/{VERSION}":
            problem = f"expected {GROUP}/{VERSION}, got {resource.get('apiVersion')!r}"
            issues.append(ConfigIssue(("apiVersion",), problem, resource=label))
        spec = resource.get("spec")
        if not isinstance(spec, dict):
            issues.append(ConfigIssue(("spec",), "required object is missing", resource=label))
            continue
        found, checked = check_spec(spec, registry)
        issues += [issue.in_resource(label) for issue in found]
        if checked is not None:
            chains[label] = {checked.chain.name: checked.chain}
    if issues:
        raise ConfigError(issues, source)
    return chains
