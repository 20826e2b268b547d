"""examples/pluginchain.yaml is the spec's two examples as PluginChains for the chart's gateway: the
plugin entries are the spec's as written there, the operator accepts both, the CRD's schema
admits them, and they select the pods the chart installs. examples/pluginchain-auth.yaml takes
its keys from Secrets the chart mounts where its plugins look."""

from __future__ import annotations

import json

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
from tests.helm.chart import ROOT, container, render

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


AUTH_EXAMPLE = ROOT / "examples" / "pluginchain-auth.yaml"


def test_the_authenticated_example_reads_its_keys_from_secrets_the_chart_mounts():
    text = AUTH_EXAMPLE.read_text()
    documents = [doc for doc in yaml.safe_load_all(text) if doc]
    secrets = {doc["metadata"]["name"]: doc["stringData"] for doc in documents if doc["kind"] == "Secret"}
    [chain] = [doc for doc in documents if doc["kind"] == KIND]
    assert check_spec(chain["spec"], default_registry([]))[0] == []
    schema = render_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    jsonschema.validate(chain, schema)

    # The values its header comment installs the chart with mount those Secrets into the sidecar...
    mounts = json.loads(text.split("gateway.sidecar.secretMounts=", 1)[1].split("'", 1)[0])
    sidecar = container(render({"gateway": {"sidecar": {"secretMounts": mounts}}}).deployment("gateway"), "sidecar")
    mounted = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"] if m.get("readOnly")}
    secret_of = {mount["name"]: mount["secretName"] for mount in mounts}

    # ...where the auth plugin looks for its files, and the files hold what it reads.
    auth = next(plugin["config"] for plugin in chain["spec"]["plugins"] if plugin["name"] == "auth")
    for path in (auth["keys_file"], auth["upstream_auth"]["value_file"]):
        directory, _, file_name = path.rpartition("/")
        assert directory in mounted, path
        assert file_name in secrets[secret_of[mounted[directory]]], path
    keys = yaml.safe_load(secrets["llm-gateway-keys"]["keys.yaml"])
    assert {entry["consumer"] for entry in keys} == {"team-a", "team-b"}
    assert check_spec({**chain["spec"], "plugins": [{"name": "auth", "config": {"keys": keys}}]}, default_registry([]))[0] == []
