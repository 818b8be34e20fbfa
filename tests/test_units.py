"""Tests of the unit parsers: durations, sizes and percentages, good and bad."""

from __future__ import annotations

import math

import pytest

from nexus.units import parse_duration, parse_ratio, parse_size, show_value

GOOD_DURATIONS = [
    ("250ms", 0.25),
    ("2s", 2.0),
    ("1.5m", 90.0),
    ("1h", 3600.0),
    ("500us", 0.0005),
    ("0s", 0.0),
    (" 2 s ", 2.0),
    ("0.1ms", 0.0001),
]


@pytest.mark.parametrize(("text", "seconds"), GOOD_DURATIONS)
def test_duration_parses(text: str, seconds: float) -> None:
    assert math.isclose(parse_duration(text), seconds, rel_tol=1e-12)


BAD_DURATIONS = [
    (5, 'invalid duration 5: a unit is required, such as "5s" or "5ms"'),
    (2.5, 'invalid duration 2.5: a unit is required, such as "2.5s" or "2.5ms"'),
    ("5", 'invalid duration "5": a unit is required, such as "5s" or "5ms"'),
    ("5sec", 'invalid duration "5sec": unknown unit "sec": use one of us, ms, s, m, h'),
    ("10MiB", 'invalid duration "10MiB": unknown unit "MiB": use one of us, ms, s, m, h'),
    ("fast", 'invalid duration "fast": expected a number with a unit, such as 250ms, 2s or 1m'),
    ("", 'invalid duration "": expected a number with a unit, such as 250ms, 2s or 1m'),
    ("1m30s", 'invalid duration "1m30s": expected a number with a unit, such as 250ms, 2s or 1m'),
    ("1e3ms", 'invalid duration "1e3ms": expected a number with a unit, such as 250ms, 2s or 1m'),
    ("-1s", 'invalid duration "-1s": must not be negative'),
    (-1, "invalid duration -1: must not be negative"),
    (float("inf"), "invalid duration inf: expected a finite number"),
    (float("nan"), "invalid duration nan: expected a finite number"),
    (True, "invalid duration true: expected a number with a unit, such as 250ms, 2s or 1m"),
    (None, "invalid duration null: expected a number with a unit, such as 250ms, 2s or 1m"),
    (["1s"], 'invalid duration ["1s"]: expected a number with a unit, such as 250ms, 2s or 1m'),
]


@pytest.mark.parametrize(("value", "message"), BAD_DURATIONS)
def test_duration_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(value)
    assert str(caught.value) == message


GOOD_SIZES = [
    ("512B", 512),
    ("64KiB", 64 * 1024),
    ("10MiB", 10 * 1024 * 1024),
    ("1GiB", 1 << 30),
    ("2TiB", 2 << 40),
    ("1.5KiB", 1536),
    ("10 KiB", 10240),
    ("1kB", 1000),
    ("1KB", 1000),
    ("5MB", 5_000_000),
    ("1GB", 10**9),
    ("1TB", 10**12),
    (1048576, 1048576),
    (0, 0),
    ("0B", 0),
]


@pytest.mark.parametrize(("value", "size"), GOOD_SIZES)
def test_size_parses(value: object, size: int) -> None:
    parsed = parse_size(value)
    assert parsed == size
    assert type(parsed) is int


BAD_SIZES = [
    ("10XB", 'invalid size "10XB": unknown unit "XB": use one of B, KiB, MiB, GiB, TiB, kB, KB, MB, GB, TB'),
    ("10mb", 'invalid size "10mb": unknown unit "mb": use one of B, KiB, MiB, GiB, TiB, kB, KB, MB, GB, TB'),
    ("20", 'invalid size "20": a unit is required, such as "20KiB", or an integer number of bytes'),
    (1.5, 'invalid size 1.5: a unit is required, such as "1.5KiB", or an integer number of bytes'),
    ("1.5B", 'invalid size "1.5B": 1.5 is not a whole number of bytes'),
    ("big", 'invalid size "big": expected a number with a unit, such as 64KiB or 10MiB'),
    ("-1KiB", 'invalid size "-1KiB": must not be negative'),
    (-1, "invalid size -1: must not be negative"),
    (True, "invalid size true: expected a number with a unit, such as 64KiB or 10MiB"),
    (None, "invalid size null: expected a number with a unit, such as 64KiB or 10MiB"),
]


@pytest.mark.parametrize(("value", "message"), BAD_SIZES)
def test_size_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_size(value)
    assert str(caught.value) == message


GOOD_RATIOS = [
    ("20%", 0.2),
    ("2.5%", 0.025),
    ("0%", 0.0),
    ("100%", 1.0),
    (" 50 % ", 0.5),
    (0.2, 0.2),
    (0, 0.0),
    (1, 1.0),
    ("0.5", 0.5),
]


@pytest.mark.parametrize(("value", "fraction"), GOOD_RATIOS)
def test_ratio_parses(value: object, fraction: float) -> None:
    assert math.isclose(parse_ratio(value), fraction, rel_tol=1e-12)


BAD_RATIOS = [
    ("120%", 'invalid percentage "120%": must be between 0% and 100%'),
    ("-5%", 'invalid percentage "-5%": must not be negative'),
    (-0.1, "invalid percentage -0.1: must not be negative"),
    (
        20,
        'invalid percentage 20: a number without % is a fraction from 0 to 1, so write "20%" for a percentage',
    ),
    (
        "20",
        'invalid percentage "20": a number without % is a fraction from 0 to 1, so write "20%" for a percentage',
    ),
    ("20pc", 'invalid percentage "20pc": expected a number followed by "%", such as "20%"'),
    (
        "lots",
        'invalid percentage "lots": expected a percentage such as 20% or a fraction from 0 to 1 such as 0.2',
    ),
    (float("nan"), "invalid percentage nan: expected a finite number"),
    (
        False,
        "invalid percentage false: expected a percentage such as 20% or a fraction from 0 to 1 such as 0.2",
    ),
]


@pytest.mark.parametrize(("value", "message"), BAD_RATIOS)
def test_ratio_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_ratio(value)
    assert str(caught.value) == message


SHOWN_VALUES = [
    ("lots", '"lots"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("é", '"é"'),
    (None, "null"),
    (True, "true"),
    (False, "false"),
    (3, "3"),
    (0.5, "0.5"),
    (["a", 1], '["a", 1]'),
    ({"a": 1}, '{"a": 1}'),
    (["x" * 100], '["' + "x" * 55 + "..."),
]


@pytest.mark.parametrize(("value", "shown"), SHOWN_VALUES)
def test_show_value_renders_yaml(value: object, shown: str) -> None:
    assert show_value(value) == shown
