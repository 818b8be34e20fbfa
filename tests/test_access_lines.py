"""The C formatter of access log lines against the record layout, for any record and any request id."""

from __future__ import annotations

import bisect
import datetime
import struct

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus.config import parse_config
from nexus.observability.access_log import CACHE_RESULTS, LIMIT_RESULTS, METHODS, Names, drain_batch, push_with_text
from nexus.observability.usage import LATENCY_BOUNDS_US
from nexus.shm.ring import RECORD_WORDS

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
    # Response sizes below 2^48 bytes (256 TiB): the drain sums them in 64 bits.
    row = (head, started, parties, draw(st.integers(0, 2**48)), draw(U64), draw(U64), draw(U64), draw(st.integers(0, 1)))
    return row, draw(st.binary(max_size=120))


def raw_of(entries: list[tuple[tuple[int, ...], bytes]]) -> bytes:
    """Ring bytes of `entries`, as a worker pushes them: each record, then its text records."""
    words: list[tuple[int, ...]] = []

    def push(*record: int) -> bool:
        words.append(record + (0,) * (RECORD_WORDS - len(record)))
        return True

    for row, text in entries:
        assert push_with_text(push, row[0], row[1:], text)
    return b"".join(struct.pack(f"={RECORD_WORDS}Q", *record) for record in words)


@settings(max_examples=400, deadline=None)
@given(st.lists(records(), max_size=5), st.integers(0, 1023))
def test_lines_and_counts_match_the_layout(entries, worker) -> None:
    batch = drain_batch(raw_of(entries), worker, NAMES, LATENCY_BOUNDS_US)
    lines = batch.lines.splitlines()
    assert (batch.records, batch.written, len(lines)) == (len(entries), len(entries), len(entries))
    for line, (row, text) in zip(lines, entries, strict=True):
        assert msgspec.json.decode(line) == expected(row, text, worker)

    counts: dict = {}
    sent: dict = {}
    for (head, _, parties, bytes_sent, durations, *_), _ in entries:
        key = (parties & 0xFFFF_FFFF, (head >> 32) & 0xFFFF)
        bucket = bisect.bisect_left(LATENCY_BOUNDS_US, durations & 0xFFFF_FFFF)
        counts[(*key, (head >> 16) & 0xFFFF, bucket)] = counts.get((*key, (head >> 16) & 0xFFFF, bucket), 0) + 1
        sent[key] = sent.get(key, 0) + bytes_sent
    assert batch.counts == counts
    assert batch.sent == sent


def test_field_order_and_escapes() -> None:
    row = (1 | 200 << 16 | 1 << 32 | 1 << 56, 1_764_894_072_000_001_000, 1, 5, 1_500_000 | 4212 << 32, 0, 0, 0)
    [line] = drain_batch(raw_of([(row, b'a"b\\c\n\xff')]), 3, NAMES, LATENCY_BOUNDS_US).lines.splitlines()
    assert line == (
        b'{"time":"2025-12-05T00:21:12.000001Z","request_id":"a\\"b\\\\c\\u000a\\ufffd","trace_id":null,"worker":3,'
        b'"method":"GET","route":"catalog.v2","consumer":"acme","target":null,"status":200,"bytes":5,'
        b'"duration_s":1.5,"upstream_s":0.004211,"cache":null,"rate_limit":null}'
    )


def test_partial_record_is_rejected() -> None:
    with pytest.raises(ValueError) as raised:
        drain_batch(b"\0" * 100, 0, NAMES, LATENCY_BOUNDS_US)
    assert "not whole 64-byte records" in str(raised.value)
