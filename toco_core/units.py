"""Human sizes and durations for limits: "64MB", "2 MiB", "5ms", "1%"."""

from __future__ import annotations

import re

from toco_core.errors import ConfigError

_SIZE = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2,
         "gib": 1024**3, "k": 1000, "m": 1000**2, "g": 1000**3}
_TIME = {"": 1e-3, "ms": 1e-3, "s": 1.0, "us": 1e-6}


def _split(text: str, what: str) -> tuple[float, str]:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z%]*)\s*", str(text))
    if not m:
        raise ConfigError(f"{what} {text!r} is not a number with an optional unit", "write e.g. 64MB, 5ms, 1%")
    return float(m.group(1)), m.group(2).lower()


def parse_size(text: str | int) -> int:
    """Bytes from "64MB" (decimal), "64MiB" (binary) or a plain number of bytes.

    Raises ConfigError for an unknown unit or a malformed value.
    """
    if isinstance(text, int):
        return text
    value, unit = _split(text, "size")
    if unit not in _SIZE:
        raise ConfigError(f"size {text!r} has unknown unit {unit!r}", "use B, KB, MB, GB, KiB, MiB or GiB")
    return int(value * _SIZE[unit])


def parse_duration(text: str | float) -> float:
    """Seconds from "5ms", "0.2s", "300us"; a plain number means milliseconds.

    Raises ConfigError for an unknown unit or a malformed value.
    """
    if isinstance(text, (int, float)):
        return float(text) * 1e-3
    value, unit = _split(text, "duration")
    if unit not in _TIME:
        raise ConfigError(f"duration {text!r} has unknown unit {unit!r}", "use us, ms or s")
    return value * _TIME[unit]


def parse_fraction(text: str | float) -> float:
    """A share in [0, 1] from "1%" or "0.01". Raises ConfigError outside [0, 1]."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        value, unit = _split(text, "share")
        if unit == "%":
            value /= 100
        elif unit:
            raise ConfigError(f"share {text!r} has unknown unit {unit!r}", "write 1% or 0.01")
    if not 0 <= value <= 1:
        raise ConfigError(f"share {text!r} is outside 0..1", "write e.g. 1% or 0.01")
    return value


def format_size(n: float) -> str:
    """"1.2 MB"-style text (decimal units)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
