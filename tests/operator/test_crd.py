"""The checked-in CRD is the one the models generate, and its schema is a valid structural schema."""

from __future__ import annotations

from pathlib import Path

import yaml

from pluginchain_operator.crd import CRD_PATH, render_crd

ROOT = Path(__file__).parents[2]


def test_the_checked_in_crd_matches_the_models():
    checked_in = yaml.safe_load((ROOT / CRD_PATH).read_text())
    assert checked_in == render_crd(), f"{CRD_PATH} drifted from the models: regenerate it with `pluginchain crd > {CRD_PATH}`"


def test_the_schema_carries_the_plugin_entry_rules():
    version = render_crd()["spec"]["versions"][0]
    plugin = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["plugins"]["items"]
    assert plugin["required"] == ["name"]
    assert plugin["properties"]["stage"]["enum"] == ["pre_request", "post_request", "error"]
    assert plugin["properties"]["on_error"]["enum"] == ["fail_closed", "fail_open"]
    assert plugin["properties"]["priority"]["type"] == "integer"
    assert plugin["properties"]["timeout"] == {**plugin["properties"]["timeout"], "x-kubernetes-int-or-string": True}
    assert plugin["properties"]["config"]["x-kubernetes-preserve-unknown-fields"] is True
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Chain", "Plugins", "Sidecars", "Ready", "Age"]


def test_the_schema_is_structural():
    """What the API server demands: every node typed (or int-or-string / preserved), no refs, no
    anyOf/oneOf carrying types, no additionalProperties beside properties."""

    def check(node: dict, where: str) -> None:
        assert "$ref" not in node and "anyOf" not in node and "oneOf" not in node, where
        assert "type" in node or node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields"), where
        assert not ("properties" in node and "additionalProperties" in node), where
        for name, child in node.get("properties", {}).items():
            check(child, f"{where}.{name}")
        if isinstance(node.get("items"), dict):
            check(node["items"], f"{where}[]")
        if isinstance(node.get("additionalProperties"), dict):
            check(node["additionalProperties"], f"{where}{{}}")

    check(render_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"], "openAPIV3Schema")
