"""A PluginChain spec is judged by the same models as a chain file, with errors located in it."""

from __future__ import annotations

import json

import pytest

from pluginchain._config.issues import ConfigError
from pluginchain._config.registry import default_registry
from pluginchain_operator.resources import LabelSelector, check_spec, manifest_chains
from tests.support.scripted import scripted_registry

SELECTOR = {"matchLabels": {"app": "gateway"}}


@pytest.fixture(scope="module")
def registry():
    return default_registry()


def issues_of(spec, registry) -> list[str]:
    return [str(issue) for issue in check_spec(spec, registry)[0]]


def test_a_good_spec_has_no_issues(registry):
    spec = {"selector": SELECTOR, "chain": "premium", "plugins": [{"name": "rate_limiter", "config": {"limit": 5}}]}
    issues, checked = check_spec(spec, registry)
    assert issues == []
    assert checked is not None and checked.chain.name == "premium"
    assert [plugin.entry.name for plugin in checked.chain.plugins] == ["rate_limiter"]


def test_every_issue_is_located_in_the_spec(registry):
    spec = {
        "selector": {"matchLabels": {"app": "gateway"}, "matchExpressions": [{"key": "tier", "operator": "Near"}]},
        "chain": "Not A Name",
        "plugins": [
            {"name": "content_filter", "config": {"banned_patterns": ["(unclosed"]}},
            {"name": "rate_limiter", "parallel": True},
        ],
    }
    issues = issues_of(spec, registry)
    assert "spec.plugins[0] (content_filter).config.banned_patterns[0]: not a valid RE2 pattern: missing )" in issues
    assert "spec.plugins[1] (rate_limiter).parallel: rate_limiter does not support parallel execution" in issues
    assert any(i.startswith("spec.selector.matchExpressions[0].operator:") for i in issues)
    assert any(i.startswith("spec.chain:") for i in issues)


def test_a_spec_without_plugins_or_selector_is_refused(registry):
    issues = issues_of({"plugins": []}, registry)
    assert "spec.selector: required field is missing" in issues
    assert any(i.startswith("spec.plugins: List should have at least 1 item") for i in issues)


def test_a_plugin_that_cannot_be_built_is_located_at_its_entry_in_the_resource():
    spec = {
        "selector": SELECTOR,
        "chain": "premium",
        "plugins": [{"name": "scripted", "id": "boom", "config": {"refuse_to_build": "no credentials"}}],
    }
    assert issues_of(spec, scripted_registry()) == ["spec.plugins[0] (boom): cannot build plugin: no credentials"]

    manifest = {"apiVersion": "pluginchain.io/v1alpha1", "kind": "PluginChain", "metadata": {"name": "gw", "namespace": "prod"}, "spec": spec}
    with pytest.raises(ConfigError) as caught:
        manifest_chains(json.dumps(manifest), "pc.json", scripted_registry())
    assert [str(issue) for issue in caught.value.issues] == [
        "PluginChain prod/gw: spec.plugins[0] (boom): cannot build plugin: no credentials"
    ]


@pytest.mark.parametrize(
    ("selector", "labels", "selected"),
    [
        ({"matchLabels": {"app": "gw"}}, {"app": "gw", "zone": "a"}, True),
        ({"matchLabels": {"app": "gw"}}, {"app": "other"}, False),
        ({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]}, {"zone": "b"}, True),
        ({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}, {"zone": "a"}, False),
        ({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}, {}, True),
        ({"matchExpressions": [{"key": "canary", "operator": "Exists"}]}, {"canary": ""}, True),
        ({"matchExpressions": [{"key": "canary", "operator": "DoesNotExist"}]}, {"canary": "1"}, False),
        # An empty selector selects nothing: a typo must not push a chain onto every pod.
        ({}, {"app": "gw"}, False),
    ],
)
def test_label_selectors_select_as_kubernetes_does(selector, labels, selected):
    assert LabelSelector.model_validate(selector).matches(labels) is selected
