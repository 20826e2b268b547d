"""The PluginChain resource's spec as pydantic models: the one source of the CRD schema and of the
operator's validation, built on the same plugin-entry model the sidecar validates with."""

from __future__ import annotations

from typing import Any, Literal, Mapping

import yaml

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pluginchain._engine.plan import compile_plan
from pluginchain._config.registry import PluginRegistry
from pluginchain._config.schema import (
    CHAIN_NAME,
    DEFAULT_CHAIN,
    ConfigError,
    ConfigIssue,
    PluginEntry,
    ValidatedChain,
    pydantic_issues,
    validate_document,
)

GROUP = "pluginchain.io"
VERSION = "v1alpha1"
KIND = "PluginChain"
PLURAL = "pluginchains"
SINGULAR = "pluginchain"
SHORT_NAMES = ("pc",)
CONFIG_PORT_ANNOTATION = "pluginchain.io/config-port"
DEFAULT_CONFIG_PORT = 50052


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


def spec_document(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec as a chain document the shared schema validates: ``{"chains": {chain: plugins}}``."""
    return {"chains": {spec.get("chain", DEFAULT_CHAIN): spec.get("plugins")}}


def validate_spec(spec: Mapping[str, Any], registry: PluginRegistry) -> list[ConfigIssue]:
    """Every problem of a PluginChain spec, located under ``spec.``."""
    return check_spec(spec, registry)[0]


def check_spec(spec: Mapping[str, Any], registry: PluginRegistry) -> tuple[list[ConfigIssue], dict[str, ValidatedChain]]:
    """Every problem of a PluginChain spec, located under ``spec.``, and, when there is none,
    its validated chain by name (validated once, for callers that go on to use it)."""
    issues: list[ConfigIssue] = []
    try:
        PluginChainSpec.model_validate(spec)
    except ValidationError as error:
        issues.extend(i for i in pydantic_issues(error, "spec") if not i.location.startswith("spec.plugins["))
    chains: dict[str, ValidatedChain] = {}
    try:
        chains = validate_document(spec_document(spec), registry)
    except ConfigError as error:
        chain = spec.get("chain", "default")
        prefix = f"chains.{chain}"
        for issue in error.issues:
            location = issue.location.replace(prefix, "spec.plugins", 1) if issue.location.startswith(prefix) else issue.location
            issues.append(ConfigIssue(location, issue.message))
    if not issues:
        try:
            compile_plan(chains, registry)
        except ConfigError as error:
            issues.extend(error.issues)
    return issues, (chains if not issues else {})


def manifest_chains(text: str, source: str, registry: PluginRegistry) -> dict[str, dict[str, ValidatedChain]] | None:
    """The chains of the PluginChain resources in a file of Kubernetes manifests (YAML documents,
    or JSON such as ``kubectl get pc -o json``), by resource (``PluginChain NAMESPACE/NAME``);
    None when the file holds no PluginChain (it is then a chain file). Other kinds are skipped.
    Raises :class:`ConfigError` with every issue of every resource, each located in it."""
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError:
        return None  # not a manifest stream: the chain-file parser says what is wrong
    resources = []
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
        metadata = resource.get("metadata") if isinstance(resource.get("metadata"), dict) else {}
        name = f"{metadata['namespace']}/{metadata.get('name', '?')}" if metadata.get("namespace") else metadata.get("name", "?")
        label = f"{KIND} {name}"
        if resource.get("apiVersion") != f"{GROUP}/{VERSION}":
            issues.append(ConfigIssue(f"{label}: apiVersion", f"expected {GROUP}/{VERSION}, got {resource.get('apiVersion')!r}"))
        spec = resource.get("spec")
        if not isinstance(spec, dict):
            issues.append(ConfigIssue(f"{label}: spec", "required object is missing"))
            continue
        found, validated = check_spec(spec, registry)
        issues.extend(ConfigIssue(f"{label}: {issue.location}", issue.message) for issue in found)
        if not found:
            chains[label] = validated
    if issues:
        raise ConfigError(issues, source)
    return chains
