"""The PluginChain CustomResourceDefinition, generated from the pydantic models.

``kubectl apply`` then rejects a bad shape (an unknown stage, a string priority, an unknown field)
before the operator sees it; the plugins' own configs stay free-form there and are validated by
the operator with the plugins' models. Regenerate the checked-in copy with ``pluginchain crd``.
"""

from __future__ import annotations

from typing import Any

from pluginchain_operator.resources import (
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    PluginChainSpec,
)

CRD_PATH = "deploy/helm/pluginchain/crds/pluginchains.pluginchain.io.yaml"
HEADER = "# Generated from the pydantic models by `pluginchain crd`; do not edit. A test fails when it drifts.\n"

PRINTER_COLUMNS = [
    {"name": "Chain", "type": "string", "jsonPath": ".spec.chain"},
    {"name": "Plugins", "type": "integer", "jsonPath": ".status.pluginCount"},
    {"name": "Sidecars", "type": "string", "description": "sidecars applied / selected", "jsonPath": ".status.sidecars"},
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def render_crd() -> dict[str, Any]:
    spec_schema = structural(PluginChainSpec.model_json_schema())
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
            },
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "required": ["spec"],
                    "properties": {
                        "spec": spec_schema,
                        # Written by the operator (and kopf's own progress records).
                        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    },
                }},
            }],
        },
    }


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    """Turn a pydantic JSON schema into a Kubernetes structural schema: inline ``$ref``s, express
    ``Optional`` as ``nullable``, duration unions as int-or-string, free-form objects as
    preserved unknown fields, and drop what Kubernetes does not accept."""
    definitions = schema.get("$defs", {})

    def convert(node: dict[str, Any]) -> dict[str, Any]:
        if "$ref" in node:
            target = definitions[node["$ref"].rsplit("/", 1)[-1]]
            merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
            return convert(merged)
        node = dict(node)
        if "anyOf" in node:
            options = node.pop("anyOf")
            kinds = sorted(option.get("type", "") for option in options)
            if kinds == ["integer", "string"]:
                node["x-kubernetes-int-or-string"] = True
            else:
                non_null = [option for option in options if option.get("type") != "null"]
                if len(non_null) != 1:
                    raise ValueError(f"cannot express {options} in a structural schema")
                node = {**convert(non_null[0]), **node}
                node["nullable"] = True
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in ("title", "default", "$defs"):
                continue
            if key == "additionalProperties":
                if value is True:
                    out["x-kubernetes-preserve-unknown-fields"] = True
                elif isinstance(value, dict):
                    out[key] = convert(value)
                # False: the API server prunes or, with kubectl's strict field validation, rejects
                # unknown fields; structural schemas do not allow it beside `properties`.
                continue
            if key == "properties":
                out[key] = {name: convert(prop) for name, prop in value.items()}
            elif key == "items":
                out[key] = convert(value)
            else:
                out[key] = value
        return out

    return convert(schema)
