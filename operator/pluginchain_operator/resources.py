"""The PluginChain resource's spec as pydantic models: the one source of the CRD schema and of the
operator's validation, built on the same plugin-entry model the sidecar validates with."""

from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field

from pluginchain.schema import CHAIN_NAME, DEFAULT_CHAIN, PluginEntry

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
