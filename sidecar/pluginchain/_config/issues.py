"""Config errors and where they are: every problem found, each at a structured path.

A path is a tuple of keys (``str``), list indexes (``int``) and :class:`EntryRef` (a plugin entry,
shown with the name people know it by). It is rendered once, for people, as they wrote the
config: ``plugins[1] (content_filter).config.banned_patterns[0]``. Locations are built by joining
paths, never by rewriting rendered strings, so an error found in a PluginChain reads
``PluginChain ns/name: spec.plugins[0] (boom): ...`` wherever it was found (validating or
building the plugin).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError


@dataclass(frozen=True, slots=True)
class EntryRef:
    """A plugin entry in its chain's list: its index, and its id (or name) when it has one."""

    index: int
    label: str | None = None

    def __str__(self) -> str:
        return f"[{self.index}]" + (f" ({self.label})" if self.label else "")


PathPart = str | int | EntryRef
Path = tuple[PathPart, ...]


def render_path(path: Path) -> str:
    """``("plugins", EntryRef(1, "x"), "config", "a", 0)`` -> ``plugins[1] (x).config.a[0]``."""
    text = ""
    for part in path:
        if isinstance(part, str):
            text += f".{part}" if text else part
        elif isinstance(part, EntryRef):
            text += str(part)
        else:
            text += f"[{part}]"
    return text


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One thing wrong with a config, where it is, and in which resource (e.g. a PluginChain)."""

    path: Path
    message: str
    resource: str | None = None
    """``PluginChain ns/name`` for an issue in a Kubernetes resource; None in a chain file or push."""

    @property
    def location(self) -> str:
        where = render_path(self.path)
        if self.resource is None:
            return where
        return f"{self.resource}: {where}" if where else self.resource

    def under(self, prefix: Path) -> ConfigIssue:
        """The same issue, found in a part of a larger document at ``prefix``."""
        return replace(self, path=prefix + self.path)

    def in_resource(self, resource: str) -> ConfigIssue:
        return replace(self, resource=resource)

    def __str__(self) -> str:
        location = self.location
        return f"{location}: {self.message}" if location else self.message


class ConfigError(Exception):
    """A config that cannot be used; carries every issue found, not only the first."""

    def __init__(self, issues: list[ConfigIssue], source: str | None = None):
        self.issues = issues
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.source}: " if self.source else ""
        count = len(self.issues)
        lines = [f"{head}{count} error{'s' if count != 1 else ''} in chain config"]
        lines += [f"  {issue}" for issue in self.issues]
        return "\n".join(lines)


def pydantic_issues(error: ValidationError, prefix: Path | str = ()) -> list[ConfigIssue]:
    """Pydantic's errors as issues at ``prefix`` + pydantic's own location."""
    root: Path = (prefix,) if isinstance(prefix, str) else prefix
    return [ConfigIssue(root + tuple(detail["loc"]), _message(detail)) for detail in error.errors(include_url=False)]


def _message(detail: Mapping[str, Any]) -> str:
    kind = detail["type"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    message = str(detail["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


def kind_of(value: Any) -> str:
    """What a value is, in the words of an error message."""
    kinds = {dict: "an object", list: "a list", str: "a string", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)
