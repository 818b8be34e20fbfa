"""Parsers for the unit strings used in config files: durations, sizes, ratios.

Each parser takes the raw YAML value and returns a plain number in base units
(seconds, bytes, a fraction of 1). Each raises ValueError with a message that
shows the value and an accepted example, so config errors can name the fix.
"""

from __future__ import annotations

import re

__all__ = ["parse_duration", "parse_size", "parse_ratio"]

_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

# Binary units are exact powers of two; decimal units follow SI, as in
# systemd's and Kubernetes' size strings.
_SIZE_UNITS = {
    "B": 1,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "TiB": 1 << 40,
    "kB": 10**3,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
}

_NUMBER_WITH_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z%]*)\s*$")


def parse_duration(value: object) -> float:
    """Parse a duration such as `250ms`, `2s`, `1.5m` or `1h` into seconds."""
    unit, number = _split(value, "duration", "250ms, 2s, 1m")
    if unit not in _DURATION_UNITS:
        raise ValueError(
            f"invalid duration {value!r}: unit {unit or '(none)'!r} is not one of "
            f"{', '.join(_DURATION_UNITS)} (example: 250ms, 2s)"
        )
    return number * _DURATION_UNITS[unit]


def parse_size(value: object) -> int:
    """Parse a size such as `64KiB`, `10MiB` or `512B` into bytes.

    A bare integer is taken as bytes, because YAML authors often write
    `max_body: 1048576`.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"invalid size {value!r}: must not be negative")
        return value
    unit, number = _split(value, "size", "64KiB, 10MiB, 1GiB")
    if unit not in _SIZE_UNITS:
        raise ValueError(
            f"invalid size {value!r}: unit {unit or '(none)'!r} is not one of "
            f"{', '.join(_SIZE_UNITS)} (example: 10MiB)"
        )
    return int(number * _SIZE_UNITS[unit])


def parse_ratio(value: object) -> float:
    """Parse a percentage such as `20%` (or a fraction such as 0.2) into 0..1."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        unit, number = _split(value, "percentage", "20%")
        if unit != "%":
            raise ValueError(f"invalid percentage {value!r}: expected a number followed by % (example: 20%)")
        number /= 100.0
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"invalid percentage {value!r}: must be between 0% and 100%")
    return number


def _split(value: object, kind: str, examples: str) -> tuple[str, float]:
    """Split `value` into (unit, number), or raise a ValueError naming `kind`."""
    if not isinstance(value, str):
        raise ValueError(f"invalid {kind} {value!r}: expected a string with a unit, such as {examples}")
    match = _NUMBER_WITH_UNIT.match(value)
    if match is None:
        raise ValueError(f"invalid {kind} {value!r}: expected a number with a unit, such as {examples}")
    return match.group(2), float(match.group(1))
