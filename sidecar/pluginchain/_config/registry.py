"""The one place plugin classes are registered, checked, and looked up by name.

Built-ins and custom plugins arrive the same way: through the ``pluginchain.plugins`` entry-point
group (the built-ins are listed in our own pyproject), or from a module named on the command
line (``--plugins``), found as ``python -m`` finds one: in the working directory too. A
malformed class is refused here, at registration, never at request time.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from pydantic import BaseModel

from pluginchain._api.plugin import Plugin, Stage
from pluginchain._api.stream import StreamMode

ENTRY_POINT_GROUP = "pluginchain.plugins"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class PluginRegistrationError(Exception):
    """A plugin class or plugin source that cannot be registered; the message says why."""


class PluginRegistry:
    """Plugin classes by name."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Plugin]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._classes

    def get(self, name: str) -> type[Plugin] | None:
        return self._classes.get(name)

    def names(self) -> list[str]:
        return sorted(self._classes)

    def register(self, plugin_class: object, *, source: str | None = None) -> type[Plugin]:
        """Check ``plugin_class`` and add it; raise :class:`PluginRegistrationError` if malformed."""
        where = f" (from {source})" if source else ""
        problems = _problems_of(plugin_class)
        if problems:
            label = getattr(plugin_class, "__qualname__", repr(plugin_class))
            raise PluginRegistrationError(f"plugin class {label}{where} is malformed: " + "; ".join(problems))
        assert isinstance(plugin_class, type) and issubclass(plugin_class, Plugin)
        existing = self._classes.get(plugin_class.name)
        if existing is not None and existing is not plugin_class:
            raise PluginRegistrationError(
                f"plugin name {plugin_class.name!r}{where} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}"
            )
        self._classes[plugin_class.name] = plugin_class
        return plugin_class

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Register every class published in the entry-point ``group``."""
        for entry_point in entry_points(group=group):
            source = f"entry point {entry_point.name} = {entry_point.value}"
            try:
                plugin_class = entry_point.load()
            except Exception as error:
                raise PluginRegistrationError(f"cannot load {source}: {error}") from error
            name = getattr(plugin_class, "name", None)
            if name != entry_point.name:
                # Checked before registering: a refused entry point leaves the registry as it was.
                raise PluginRegistrationError(f"{source}: the entry point name must equal the plugin's name {name!r}")
            self.register(plugin_class, source=source)

    def load_module(self, module_ref: str) -> list[type[Plugin]]:
        """Import a module (dotted name or ``.py`` path) and register the plugin classes it defines.

        A dotted name is looked up on ``sys.path`` and then in the working directory, which is
        added to its end for good (the module may import its neighbours later): ``pluginchain
        serve --plugins my_plugins`` in the directory holding ``my_plugins.py`` needs no
        ``PYTHONPATH``, and no module there can shadow an installed one.
        """
        module = _import(module_ref)
        found = [
            obj
            for obj in vars(module).values()
            if isinstance(obj, type)
            and issubclass(obj, Plugin)
            and obj is not Plugin
            and obj.__module__ == module.__name__
            and not inspect.isabstract(obj)
        ]
        if not found:
            # Name the file: an installed module of the same name wins over the working directory's.
            where = f" ({module.__file__})" if getattr(module, "__file__", None) else ""
            raise PluginRegistrationError(f"module {module_ref!r}{where} defines no Plugin subclass")
        for plugin_class in found:
            self.register(plugin_class, source=f"module {module_ref}")
        return found


def default_registry(plugin_modules: Iterable[str] = ()) -> PluginRegistry:
    """The built-ins and installed plugins from entry points, plus ``plugin_modules``."""
    registry = PluginRegistry()
    registry.load_entry_points()
    for module_ref in plugin_modules:
        registry.load_module(module_ref)
    return registry


def _import(module_ref: str) -> ModuleType:
    path = Path(module_ref)
    if module_ref.endswith(".py"):
        if not path.is_file():
            raise PluginRegistrationError(f"plugin module file {module_ref!r} does not exist")
        name = f"pluginchain_custom_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            del sys.modules[name]
            raise PluginRegistrationError(f"cannot import plugin module {module_ref!r}: {error}") from error
        return module
    _search_working_directory()
    try:
        return importlib.import_module(module_ref)
    except Exception as error:
        raise PluginRegistrationError(f"cannot import plugin module {module_ref!r}: {error}") from error


def _search_working_directory() -> None:
    # A console script's sys.path starts with its bin/ directory, not the working directory as
    # `python -m` does; appended, not prepended, so that installed packages always win.
    working_directory = os.getcwd()
    if not any(os.path.abspath(entry or os.curdir) == working_directory for entry in sys.path):
        sys.path.append(working_directory)


def _problems_of(plugin_class: object) -> list[str]:
    if not isinstance(plugin_class, type) or not issubclass(plugin_class, Plugin):
        return ["it is not a subclass of pluginchain.Plugin"]
    problems = []
    name = getattr(plugin_class, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        problems.append(f"`name` must be a lower-case identifier like 'my_plugin', got {name!r}")
    config = plugin_class.Config
    if not (isinstance(config, type) and issubclass(config, BaseModel)):
        problems.append("`Config` must be a pydantic model (subclass pluginchain.PluginConfig)")
    elif config.model_config.get("extra") != "forbid":
        problems.append("`Config` must forbid unknown fields (model_config extra='forbid')")
    stages = plugin_class.stages
    if not isinstance(stages, (set, frozenset)) or not stages or not all(isinstance(s, Stage) for s in stages):
        problems.append("`stages` must be a non-empty set of pluginchain.Stage")
    streams = plugin_class.streams
    if not isinstance(streams, (set, frozenset)) or not all(isinstance(mode, StreamMode) for mode in streams):
        problems.append("`streams` must be a set of pluginchain.StreamMode (empty: it cannot judge streamed responses)")
    for flag in ("supports_parallel", "reads_body", "suspends"):
        if not isinstance(getattr(plugin_class, flag), bool):
            problems.append(f"`{flag}` must be a bool (a class attribute; per-config needs go in `needs()`)")
    if not inspect.isfunction(getattr(plugin_class, "needs", None)):
        problems.append("`needs` must be a method `def needs(self) -> pluginchain.Needs`")
    if inspect.isabstract(plugin_class):
        missing = ", ".join(sorted(plugin_class.__abstractmethods__))
        problems.append(f"it does not implement {missing}")
    elif not inspect.iscoroutinefunction(plugin_class.execute):
        problems.append("`execute` must be `async def execute(self, ctx, data)`")
    return problems
