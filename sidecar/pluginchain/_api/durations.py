"""Durations as users write them in chain files: ``"250ms"``, ``"30s"``, ``"1m"``, ``"1h"``, ``"1d"``
or a plain number of seconds, parsed once at validation into float seconds."""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: object) -> float:
    """Return seconds for a duration string or number; raise ValueError naming the accepted forms."""
    if isinstance(value, bool):
        raise ValueError("not a duration: expected e.g. '250ms', '30s', '1m', '1h', '1d' or seconds")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError(f"duration {value} is out of range") from None
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]
    else:
        raise ValueError(
            f"not a duration: {value!r}; expected e.g. '250ms', '30s', '1m', '1h', '1d' or seconds"
        )
    if not math.isfinite(seconds):
        # JSON parsers take NaN and Infinity; a NaN timeout would never fire, nor compare.
        raise ValueError(f"duration must be a finite number, got {value!r}")
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact spelling of ``seconds`` in the units users write."""
    for unit in ("d", "h", "m", "s"):
        count = seconds / _UNIT_SECONDS[unit]
        if count >= 1 and count == int(count):
            return f"{int(count)}{unit}"
    milliseconds = seconds * 1000
    if milliseconds == int(milliseconds):
        return f"{int(milliseconds)}ms"
    return f"{seconds:g}s"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    # Whole seconds or a string: what a Kubernetes int-or-string field carries.
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer"}]}),
]
"""A positive duration in seconds; accepts ``"30s"``-style strings or numbers."""
