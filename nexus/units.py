"""Parsers for the unit strings used in config files: durations, sizes, ratios.

Each parser takes the raw YAML value and returns a plain number in base units
(seconds, bytes, a fraction of 1). Each raises ValueError with a message that
shows the value as it was written and an accepted form, so config errors can
name the fix. `show_value` renders a value the way these messages quote it.
"""

from __future__ import annotations

import json
import math
import re

__all__ = ["MONTH", "parse_duration", "parse_quota", "parse_rate", "parse_ratio", "parse_size", "show_value"]

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

# Periods of rates and quotas, in seconds. A month has no fixed length: a
# quota per month counts calendar months, and MONTH (30 days) stands for one
# where a length is needed. Rates per month are not accepted.
MONTH = 30 * 86400
_PERIODS = {"s": 1, "min": 60, "h": 3600, "day": 86400}

_PER_PERIOD = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*/\s*([a-z]+)\s*$")

# A sign is accepted here only so that a negative value gets its own message.
_NUMBER_WITH_UNIT = re.compile(r"^\s*([-+]?[0-9]+(?:\.[0-9]+)?)\s*([A-Za-z%]*)\s*$")


def show_value(value: object) -> str:
    """Render a YAML value for an error message, in YAML flow style.

    Strings are double-quoted and None, True and False are written as YAML
    writes them. Long lists and mappings are cut at 60 characters.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, list, dict)):
        text = json.dumps(value, ensure_ascii=False, default=str)
        return text if len(text) <= 60 else text[:57] + "..."
    return repr(value)


def parse_duration(value: object) -> float:
    """Parse a duration such as `250ms`, `2s`, `1.5m` or `1h` into seconds."""
    number, unit = _split(value, "duration", "a number with a unit, such as 250ms, 2s or 1m")
    if not unit:
        raise ValueError(
            f"invalid duration {show_value(value)}: a unit is required, "
            f'such as "{_plain(number)}s" or "{_plain(number)}ms"'
        )
    if unit not in _DURATION_UNITS:
        raise ValueError(
            f'invalid duration {show_value(value)}: unknown unit "{unit}": use one of {", ".join(_DURATION_UNITS)}'
        )
    return number * _DURATION_UNITS[unit]


def parse_size(value: object) -> int:
    """Parse a size such as `64KiB`, `10MiB` or `512B` into bytes.

    A bare integer is taken as bytes, because YAML authors often write
    `max_body: 1048576`.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"invalid size {show_value(value)}: must not be negative")
        return value
    number, unit = _split(value, "size", "a number with a unit, such as 64KiB or 10MiB")
    if unit not in _SIZE_UNITS:
        raise ValueError(
            f'invalid size {show_value(value)}: unknown unit "{unit}": use one of {", ".join(_SIZE_UNITS)}'
            if unit
            else f'invalid size {show_value(value)}: a unit is required, such as "{_plain(number)}KiB", '
            "or an integer number of bytes"
        )
    size = number * _SIZE_UNITS[unit]
    # Fractions are fine while the product is whole ("1.5KiB" is 1536 bytes);
    # rounding "1.5B" silently would change the limit the author wrote.
    if size != int(size):
        raise ValueError(f"invalid size {show_value(value)}: {size:g} is not a whole number of bytes")
    return int(size)


def parse_ratio(value: object) -> float:
    """Parse a percentage such as `20%`, or a fraction such as 0.2, into 0..1."""
    number, unit = _split(value, "percentage", "a percentage such as 20% or a fraction from 0 to 1 such as 0.2")
    if unit == "%":
        number /= 100.0
    elif unit:
        raise ValueError(f'invalid percentage {show_value(value)}: expected a number followed by "%", such as "20%"')
    elif number > 1.0:
        # A bare 20 is far more likely to mean 20% than 2000%.
        raise ValueError(
            f"invalid percentage {show_value(value)}: a number without % is a fraction from 0 to 1, "
            f'so write "{_plain(number)}%" for a percentage'
        )
    if number > 1.0:
        raise ValueError(f"invalid percentage {show_value(value)}: must be between 0% and 100%")
    return number


def parse_rate(value: object) -> float:
    """Parse a rate such as `100/s`, `30/min` or `0.5/s` into requests per second."""
    count, period = _per_period(value, "rate", "100/s or 30/min")
    if count == 0:
        raise ValueError(f"invalid rate {show_value(value)}: must be more than 0, such as 1/s")
    return count / period


def parse_quota(value: object) -> tuple[int, int]:
    """Parse a quota such as `300/min`, `10000/day` or `1000000/month` into (requests, window seconds).

    A month comes back as MONTH seconds; the caller treats it as a calendar month.
    """
    count, period = _per_period(value, "quota", "300/min or 10000/day", months=True)
    if count != int(count) or count < 1:
        raise ValueError(f"invalid quota {show_value(value)}: the count must be a whole number of at least 1")
    return int(count), period


def _per_period(value: object, kind: str, example: str, months: bool = False) -> tuple[float, int]:
    match = _PER_PERIOD.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"invalid {kind} {show_value(value)}: expected a count per period, such as {example}")
    unit = match.group(2)
    if months and unit == "month":
        return float(match.group(1)), MONTH
    if unit not in _PERIODS:
        choices = "s, min, h, day, month" if months else "s, min, h, day"
        raise ValueError(f'invalid {kind} {show_value(value)}: unknown period "{unit}": use one of {choices}')
    return float(match.group(1)), _PERIODS[unit]


def _split(value: object, kind: str, expected: str) -> tuple[float, str]:
    """Split `value` into (number, unit), or raise a ValueError naming `kind`.

    Numbers come back as they are with an empty unit, so that each parser can
    name the missing unit. Negative and non-finite numbers are rejected.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    elif isinstance(value, str) and (match := _NUMBER_WITH_UNIT.match(value)):
        number, unit = float(match.group(1)), match.group(2)
    else:
        raise ValueError(f"invalid {kind} {show_value(value)}: expected {expected}")

    if not math.isfinite(number):
        raise ValueError(f"invalid {kind} {show_value(value)}: expected a finite number")
    if number < 0:
        raise ValueError(f"invalid {kind} {show_value(value)}: must not be negative")
    return number, unit


def _plain(number: float) -> str:
    """Format a number without a needless ".0", for suggestions such as "5s"."""
    return f"{number:g}"
