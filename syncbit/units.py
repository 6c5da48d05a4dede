"""Parsing of human sizes ("4MiB", "500GiB", "80%") and durations ("5s", "2m")."""

from __future__ import annotations

import math
import re

from .errors import ConfigError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUM = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z%]*)\s*$")


def _finite(n: float, key: str, value) -> float:
    if not math.isfinite(n) or n < 0 or n > 2**63:
        raise ConfigError(f"{key}: {value!r} is not a usable non-negative number")
    return n


def parse_size(value: str | int | float, *, key: str = "size") -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size, got {value!r}")
    if isinstance(value, (int, float)):
        return int(_finite(float(value), key, value))
    m = _NUM.match(str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(f"{key}: cannot parse size {value!r} (examples: 4MiB, 500GiB, 1073741824)")
    return int(_finite(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()], key, value))


def parse_duration(value: str | int | float, *, key: str = "duration") -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        return _finite(float(value), key, value)
    m = _NUM.match(str(value))
    if not m or m.group(2).lower() not in _DURATION_UNITS:
        raise ConfigError(f"{key}: cannot parse duration {value!r} (examples: 5s, 2m, 500ms)")
    return _finite(float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()], key, value)


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError
