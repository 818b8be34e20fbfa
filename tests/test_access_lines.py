"""The C formatter of access log lines against the record layout, for any record and any request id."""

from __future__ import annotations

import datetime

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus.config import parse_config
from nexus.observability.access_log import CACHE_RESULTS, LIMIT_RESULTS, METHODS, Names, format_lines

NAMES = Names(
    parse_config(
        """
listen: ["127.0.0.1:0"]
upstreams:
  app: {targets: ["http://127.0.0.1:9001", "http://[::1]:9002"]}
routes:
  - {name: catalog.v2, upstream: app, match: {path_prefix: /catalog}}
  - {name: orders, upstream: app, auth: api_key}
consumers:
  acme: {keys: ["sha256:0000000000000000000000000000000000000000000000000000000000000000"]}
"""
    )
)
U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)


def name(table, index: int) -> str | None:
    """The reference lookup: None for id 0 (except methods), "#id" past the table."""
    if index >= len(table):
        return f"#{index}"
    return table[index] or None


def expected(row: tuple[int, ...], text: bytes, worker: int) -> dict:
    """What the line of `row` must hold, read off the record layout in nexus/observability/access_log.py."""
    head, started, parties, sent, durations, high, low, flags = row
    trace = f"{high << 64 | low:032x}" if high or low else None
    upstream = durations >> 32
    when = datetime.datetime.fromtimestamp(started // 10**9, datetime.UTC)
    return {
        "time": f"{when:%Y-%m-%dT%H:%M:%S}.{started % 10**9 // 1000:06d}Z",
        "request_id": trace if flags & 1 else (text.decode("ascii", "replace") or None),
        "trace_id": trace,
        "worker": worker,
        "method": METHODS[head >> 56] if head >> 56 < len(METHODS) else f"#{head >> 56}",
        "route": name(NAMES.routes, (head >> 32) & 0xFFFF),
        "consumer": name(NAMES.consumers, parties & 0xFFFF_FFFF),
        "target": name(NAMES.targets, parties >> 32),
        "status": (head >> 16) & 0xFFFF,
        "bytes": sent,
        "duration_s": (durations & 0xFFFF_FFFF) / 1e6,
        "upstream_s": (upstream - 1) / 1e6 if upstream else None,
        "cache": name(CACHE_RESULTS, (head >> 48) & 0xF),
        "rate_limit": name(LIMIT_RESULTS, (head >> 52) & 0xF),
    }


@st.composite
def records(draw) -> tuple[tuple[int, ...], bytes]:
    head = 1 | draw(st.integers(0, 0xFFFF)) << 16 | draw(st.integers(0, 0xFFFF)) << 32 | draw(st.integers(0, 0xFF)) << 48
    head |= draw(st.integers(0, 0xFF)) << 56
    # Times from 1970 to 2200, in nanoseconds.
    started = draw(st.integers(0, 7_258_118_400 * 10**9))
    parties = draw(st.integers(0, 5)) | draw(st.sampled_from([0, 1, 2, 3, 2**32 - 1])) << 32
    row = (head, started, parties, draw(U64), draw(U64), draw(U64), draw(U64), draw(st.integers(0, 1)))
    return row, draw(st.binary(max_size=120))


@settings(max_examples=400, deadline=None)
@given(st.lists(records(), max_size=5), st.integers(0, 1023))
def test_lines_match_the_layout(entries, worker) -> None:
    data = format_lines(entries, worker, NAMES)
    lines = data.splitlines()
    assert len(lines) == len(entries)
    for line, (row, text) in zip(lines, entries, strict=True):
        assert msgspec.json.decode(line) == expected(row, text, worker)
    assert data.endswith(b"\n") or not entries


def test_field_order_and_escapes() -> None:
    row = (1 | 200 << 16 | 1 << 32 | 1 << 56, 1_764_894_072_000_001_000, 1, 5, 1_500_000 | 4212 << 32, 0, 0, 0)
    [line] = format_lines([(row, b'a"b\\c\n\xff')], 3, NAMES).splitlines()
    assert line == (
        b'{"time":"2025-12-05T00:21:12.000001Z","request_id":"a\\"b\\\\c\\u000a\\ufffd","trace_id":null,"worker":3,'
        b'"method":"GET","route":"catalog.v2","consumer":"acme","target":null,"status":200,"bytes":5,'
        b'"duration_s":1.5,"upstream_s":0.004211,"cache":null,"rate_limit":null}'
    )


@pytest.mark.parametrize(
    ("entries", "problem"),
    [
        ([((1, 2, 3), b"")], "tuple of 8 ints"),
        ([((1,) * 8, "text")], "text must be bytes"),
        ([((1,) * 8,)], "(record, text) pair"),
        ([((-1,) + (0,) * 7, b"")], "negative"),
    ],
)
def test_bad_entries_raise(entries, problem) -> None:
    with pytest.raises((TypeError, OverflowError, ValueError)) as raised:
        format_lines(entries, 0, NAMES)
    assert problem in str(raised.value)
