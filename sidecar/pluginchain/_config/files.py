"""Chain files: JSON (``//`` comments allowed), the spec's bare ``"plugin_chain": [...]``
fragment, or YAML, read and validated in one call.

:func:`load_bytes` validates bytes already read, so that a caller that must know exactly what it
validated (the sidecar's watcher hashes them, and compares them with an earlier read) reads the
file once and validates those same bytes, never a second read a writer may have changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import json5
import yaml

from pluginchain._config.issues import ConfigError, ConfigIssue
from pluginchain._config.models import ValidatedChain
from pluginchain._config.registry import PluginRegistry
from pluginchain._config.validation import validate_document


def parse_text(text: str, source: str = "<config>") -> Any:
    """Parse a chain file's text: JSON (``//`` comments allowed), a bare ``"key": [...]`` JSON
    fragment as the spec writes one, or YAML."""
    if source.endswith((".yaml", ".yml")):
        return _parse_yaml(text, source)
    try:
        return json5.loads(text)
    except ValueError as json_error:
        if text.lstrip().startswith('"'):
            try:
                return json5.loads("{" + text + "}")
            except ValueError:
                pass
        if source.endswith((".json", ".json5")) or text.lstrip()[:1] in ("{", "["):
            raise ConfigError([ConfigIssue((), f"not valid JSON: {json_error}")], source) from None
    return _parse_yaml(text, source)


def load_file(path: str | Path, registry: PluginRegistry) -> dict[str, ValidatedChain]:
    """Read, parse and validate a chain file; raise :class:`ConfigError` with every issue."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError([ConfigIssue((), f"cannot read file: {error}")], str(path)) from None
    return load_bytes(data, str(path), registry)


def load_bytes(data: bytes, source: str, registry: PluginRegistry) -> dict[str, ValidatedChain]:
    """Parse and validate a chain file's content, read from ``source`` (a path: its suffix picks
    YAML); raise :class:`ConfigError` with every issue."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError([ConfigIssue((), f"cannot read file: {error}")], source) from None
    document = parse_text(text, source)
    try:
        return validate_document(document, registry)
    except ConfigError as error:
        raise ConfigError(error.issues, source) from None


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError([ConfigIssue((), f"not valid YAML or JSON: {error}")], source) from None
