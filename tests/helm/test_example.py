"""examples/pluginchain.yaml is the spec's two examples as PluginChains for the chart's gateway: the
plugin entries are the spec's as written there, the operator accepts both, the CRD's schema
admits them, and they select the pods the chart installs."""

from __future__ import annotations

import json5
import jsonschema
import yaml

from pluginchain._config.registry import default_registry
from pluginchain_operator.crd import render_crd
from pluginchain_operator.resources import (
    GROUP,
    KIND,
    VERSION,
    LabelSelector,
    check_spec,
)
from tests.helm.chart import ROOT, render

EXAMPLE = ROOT / "examples" / "pluginchain.yaml"


def _resources() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all(EXAMPLE.read_text()) if doc}


def _spec_example(name: str) -> list[dict]:
    text = (ROOT / "examples" / "spec" / name).read_text()
    if not text.lstrip().startswith("{"):
        text = "{" + text + "}"  # the spec's second example is a bare "plugin_chain": [...] member
    document = json5.loads(text)
    return document.get("plugins") or document["plugin_chain"]


def test_the_plugin_entries_are_the_specs():
    resources = _resources()
    assert sorted(resources) == ["basic-setup", "parallel-setup"]
    assert resources["basic-setup"]["spec"]["plugins"] == _spec_example("basic-setup.json")
    assert resources["parallel-setup"]["spec"]["plugins"] == _spec_example("parallel-setup.json")
    assert {r["spec"]["chain"] for r in resources.values()} == {"default", "parallel"}


def test_the_operator_and_the_crd_accept_both():
    registry = default_registry([])
    schema = render_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for name, resource in _resources().items():
        assert (resource["apiVersion"], resource["kind"]) == (f"{GROUP}/{VERSION}", KIND)
        assert check_spec(resource["spec"], registry)[0] == [], name
        jsonschema.validate(resource, schema)


def test_both_select_the_gateway_the_chart_installs():
    pod_labels = render().deployment("gateway")["spec"]["template"]["metadata"]["labels"]
    for resource in _resources().values():
        assert LabelSelector.model_validate(resource["spec"]["selector"]).matches(pod_labels)
