"""Plugins register one way, built-in or custom, and a malformed class is refused at registration."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pluginchain import Needs, Plugin, PluginConfig
from pluginchain._config.issues import ConfigError
from pluginchain._config.registry import (
    PluginRegistrationError,
    PluginRegistry,
    default_registry,
)
from pluginchain._config.validation import validate_document
from pluginchain._engine.plan import compile_plan

CLI = str(Path(sys.executable).parent / "pluginchain")


def test_the_built_ins_come_from_the_entry_point_group():
    assert default_registry().names() == [
        "audit_log", "auth", "content_filter", "content_validator", "external_validator", "rate_limiter", "session", "token_limiter",
    ]


class Good(Plugin):
    name = "good"

    async def execute(self, ctx, data):
        return None


class LooseConfig(PluginConfig):
    model_config = {"extra": "allow"}


@pytest.mark.parametrize(
    ("attributes", "problem"),
    [
        ({"name": "Bad Name"}, "`name` must be a lower-case identifier"),
        ({"Config": dict}, "`Config` must be a pydantic model"),
        ({"Config": LooseConfig}, "`Config` must forbid unknown fields"),
        ({"stages": frozenset()}, "`stages` must be a non-empty set of pluginchain.Stage"),
        ({"stages": {"pre_request"}}, "`stages` must be a non-empty set of pluginchain.Stage"),
        ({"supports_parallel": "yes"}, "`supports_parallel` must be a bool"),
        ({"reads_body": 1}, "`reads_body` must be a bool"),
        ({"suspends": property(lambda self: False)}, "`suspends` must be a bool (a class attribute; per-config needs go in `needs()`)"),
        ({"needs": Needs()}, "`needs` must be a method"),
        ({"execute": lambda self, ctx, data: None}, "`execute` must be `async def execute(self, ctx, data)`"),
    ],
)
def test_malformed_classes_are_refused_with_the_reason(attributes, problem):
    broken = type("Broken", (Good,), attributes)
    with pytest.raises(PluginRegistrationError, match="Broken is malformed") as caught:
        PluginRegistry().register(broken)
    assert problem in str(caught.value)


def test_a_class_without_execute_or_outside_the_hierarchy_is_refused():
    class NoExecute(Plugin):
        name = "no_execute"

    with pytest.raises(PluginRegistrationError, match="does not implement execute"):
        PluginRegistry().register(NoExecute)
    with pytest.raises(PluginRegistrationError, match="not a subclass of pluginchain.Plugin"):
        PluginRegistry().register(dict)


def test_an_instance_that_needs_more_than_its_class_declares_is_not_built():
    class Overreaching(Good):
        name = "overreaching"
        suspends = False

        def needs(self):
            return Needs(request_body=True, suspends=False)

    registry = PluginRegistry()
    registry.register(Overreaching)
    with pytest.raises(ConfigError) as caught:
        compile_plan(validate_document([{"name": "overreaching", "id": "greedy"}], registry), registry)
    assert [str(issue) for issue in caught.value.issues] == [
        "[0] (greedy): cannot build plugin: needs() asks for a body, but the class declares reads_body = False"
    ]


def test_two_classes_cannot_share_a_name():
    registry = PluginRegistry()
    registry.register(Good)
    with pytest.raises(PluginRegistrationError, match="'good'.*already registered by"):
        registry.register(type("Impostor", (Good,), {}))


CUSTOM_PLUGIN = textwrap.dedent(
    '''
    from pluginchain import Plugin, PluginConfig, Reject, Stage

    class TenantConfig(PluginConfig):
        tenants: list[str]

    class TenantGate(Plugin):
        name = "tenant_gate"
        Config = TenantConfig
        stages = frozenset({Stage.PRE_REQUEST})

        async def execute(self, ctx, data):
            if data.headers.get("x-tenant") not in self.config.tenants:
                raise Reject(403, "unknown tenant")
    '''
)
CHAIN = '{"plugins": [{"name": "tenant_gate", "config": {"tenants": ["acme"]}}]}'


def installed_package(tmp_path: Path, package: str, entry_point: str) -> Path:
    """A site directory holding ``package`` (CUSTOM_PLUGIN) installed with one plugin entry point."""
    site = tmp_path / "site"
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text(CUSTOM_PLUGIN)
    dist_info = site / f"{package}-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(f"[pluginchain.plugins]\n{entry_point}\n")
    return site


def test_a_custom_plugin_from_a_module_file(tmp_path):
    (tmp_path / "tenant_plugins.py").write_text(CUSTOM_PLUGIN)
    (tmp_path / "chain.json").write_text(CHAIN)
    result = subprocess.run(
        [CLI, "plan", str(tmp_path / "chain.json"), "--plugins", str(tmp_path / "tenant_plugins.py")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "tenant_gate  sequential" in result.stdout


def test_a_custom_plugin_module_in_the_working_directory_needs_no_pythonpath(tmp_path):
    (tmp_path / "tenant_plugins.py").write_text(CUSTOM_PLUGIN)
    (tmp_path / "chain.json").write_text(CHAIN)
    # As a user runs it: the console script, in the directory holding the module, no PYTHONPATH.
    result = subprocess.run(
        [CLI, "validate", "chain.json", "--plugins", "tenant_plugins"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "OK\n", "")

    missing = subprocess.run(
        [CLI, "validate", "chain.json", "--plugins", "no_such_plugins"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )
    assert missing.returncode == 2
    assert missing.stderr == "error: cannot import plugin module 'no_such_plugins': No module named 'no_such_plugins'\n"


def test_a_custom_plugin_from_an_installed_entry_point(tmp_path):
    site = installed_package(tmp_path, "tenant_plugins", "tenant_gate = tenant_plugins:TenantGate")
    (tmp_path / "chain.json").write_text(CHAIN.replace('"acme"', "42"))
    result = subprocess.run(
        [CLI, "validate", str(tmp_path / "chain.json")],
        capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    # The entry point was found: its config model, not "unknown plugin", judged the file.
    assert result.returncode == 1
    assert "plugins[0] (tenant_gate).config.tenants[0]: Input should be a valid string" in result.stderr


def test_a_misnamed_entry_point_is_refused_before_its_class_is_registered(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(installed_package(tmp_path, "misnamed", "other_name = misnamed:TenantGate")))
    registry = PluginRegistry()

    with pytest.raises(PluginRegistrationError, match="entry point name must equal the plugin's name 'tenant_gate'"):
        registry.load_entry_points()
    assert "tenant_gate" not in registry
