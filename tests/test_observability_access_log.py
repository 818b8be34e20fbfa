"""Access records through a real ring: packing, decoding, drops, sampling, reopening, usage."""

from __future__ import annotations

import json

import pytest

from nexus.config import parse_config
from nexus.observability.access_log import (
    INVALIDATE_KIND,
    AccessLogWriter,
    AccessRecorder,
    Names,
    decode,
    drain_batch,
    push_with_text,
)
from nexus.observability.usage import LATENCY_BOUNDS_US, UsageTable
from nexus.shm.ring import RingSet

CONFIG = parse_config(
    """
listen: ["127.0.0.1:0"]
upstreams:
  app: {targets: ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]}
routes:
  - {name: catalog, upstream: app, match: {path_prefix: /catalog}}
  - {name: orders, upstream: app, auth: api_key}
consumers:
  acme: {keys: ["sha256:0000000000000000000000000000000000000000000000000000000000000000"]}
"""
)
TRACE = 0x0AF7651916CD43DD8448EB211C80319C


@pytest.fixture
def rings():
    rings = RingSet.create(2, 64)
    yield rings
    rings.close()


def record(recorder: AccessRecorder, **overrides) -> bool:
    fields = dict(
        started_ns=1_764_894_072_345_678_000,
        duration_ns=4_211_000,
        method="GET",
        status=200,
        route="catalog",
        consumer="acme",
        target="http://127.0.0.1:9002",
        bytes_sent=5120,
        upstream_ns=3_902_000,
        cache="miss",
        rate_limit="allowed",
        request_id="4bf92f3577b34da6a3ce929d0e0e4736",
        trace_id=TRACE,
    )
    fields.update(overrides)
    return recorder.record(**fields)


def test_round_trip_through_a_ring(rings):
    names = Names(CONFIG)
    recorder = AccessRecorder(rings[1], names)
    long_id = "req-" + "x" * 150
    assert record(recorder)
    assert record(recorder, request_id=long_id, consumer=None, target=None, upstream_ns=None, status=404, method="BREW", route="(none)", cache=None, rate_limit=None, trace_id=0)

    records = decode(rings[1].drain(), 1, names)
    assert records == [
        {
            "time": "2025-12-05T00:21:12.345678Z",
            "request_id": "4bf92f3577b34da6a3ce929d0e0e4736",
            "trace_id": "0af7651916cd43dd8448eb211c80319c",
            "worker": 1,
            "method": "GET",
            "route": "catalog",
            "consumer": "acme",
            "target": "http://127.0.0.1:9002",
            "status": 200,
            "bytes": 5120,
            "duration_s": 0.004211,
            "upstream_s": 0.003902,
            "cache": "miss",
            "rate_limit": "allowed",
        },
        {
            "time": "2025-12-05T00:21:12.345678Z",
            "request_id": long_id,
            "trace_id": None,
            "worker": 1,
            "method": "OTHER",
            "route": None,
            "consumer": None,
            "target": None,
            "status": 404,
            "bytes": 5120,
            "duration_s": 0.004211,
            "upstream_s": None,
            "cache": None,
            "rate_limit": None,
        },
    ]


def test_request_id_that_is_the_trace_id_takes_one_record(rings):
    names = Names(CONFIG)
    recorder = AccessRecorder(rings[0], names)
    assert record(recorder, request_id=f"{TRACE:032x}", request_id_is_trace=True)
    rows = rings[0].drain()
    assert len(rows) == 1
    [entry] = decode(rows, 0, names)
    assert entry["request_id"] == entry["trace_id"] == "0af7651916cd43dd8448eb211c80319c"


def test_ids_past_the_config_decode_as_numbers(rings):
    # A record pushed under a larger config (route 9, consumer 5, target 77)
    # and with ids no table names (method 200, cache and rate-limit 15).
    head = 1 | 200 << 16 | 9 << 32 | 15 << 48 | 15 << 52 | 200 << 56
    row = (head, 1_764_894_072_345_678_000, 5 | 77 << 32, 10, 1000, 0, 0, 0)
    [entry] = decode([row], 0, Names(CONFIG))
    assert (entry["route"], entry["consumer"], entry["target"]) == ("#9", "#5", "#77")
    assert (entry["method"], entry["cache"], entry["rate_limit"]) == ("#200", "#15", "#15")
    assert entry["status"] == 200
    assert entry["upstream_s"] is None
    assert entry["request_id"] is None


def test_full_ring_drops_and_counts_without_blocking(rings):
    names = Names(CONFIG)
    recorder = AccessRecorder(rings[0], names)
    results = [record(recorder) for _ in range(40)]
    # Two records per request: 32 requests fit in 64 records.
    assert results.count(True) == 32
    assert rings[0].counts().dropped == 8
    assert len(decode(rings[0].drain(), 0, names)) == 32


def test_orphan_text_records_and_other_kinds(rings):
    names = Names(CONFIG)
    seen = []
    rows = [
        (2 | 4 << 8, int.from_bytes(b"lost\0\0\0\0", "little"), 0, 0, 0, 0, 0, 0),  # text without its access record
        (9, 1, 2, 3, 4, 5, 6, 7),  # another producer's kind
    ]
    assert decode(rows, 0, names, {9: lambda worker, row, text: seen.append((worker, row, text))}) == []
    assert seen == [(0, rows[1], b"")]


def test_other_kind_gets_its_text(rings):
    names = Names(CONFIG)
    url = "http://api.example.com/items/7?" + "q" * 100
    assert push_with_text(rings[1].push, INVALIDATE_KIND, (), url.encode())
    assert record(AccessRecorder(rings[1], names))
    seen = []
    records = decode(rings[1].drain(), 1, names, {INVALIDATE_KIND: lambda worker, row, text: seen.append((worker, text))})
    assert seen == [(1, url.encode())]
    assert len(records) == 1


def test_sampling_keeps_errors(rings, tmp_path):
    names = Names(CONFIG)
    recorder = AccessRecorder(rings[0], names)
    for status in (200, 502, 200, 500, 200):
        assert record(recorder, status=status, request_id="r")
    raw = rings[0].drain_raw()
    batch = drain_batch(raw, 0, names, LATENCY_BOUNDS_US, 0.0, always_log_errors=True)
    assert (batch.records, batch.written) == (5, 2)
    path = tmp_path / "access.log"
    writer = AccessLogWriter(str(path), 0.0, always_log_errors=True)
    assert writer.write(batch.lines, batch.written) == 2
    writer.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["status"] for line in lines] == [502, 500]

    assert drain_batch(raw, 0, names, LATENCY_BOUNDS_US, 0.0, always_log_errors=False).written == 0
    written = sum(drain_batch(raw, 0, names, LATENCY_BOUNDS_US, 0.5, always_log_errors=False).written for _ in range(400))
    assert 800 < written < 1200  # 2000 records at 50%


def test_writer_reopens_after_rename(rings, tmp_path):
    names = Names(CONFIG)
    recorder = AccessRecorder(rings[0], names)
    path = tmp_path / "access.log"
    writer = AccessLogWriter(str(path), 1.0, always_log_errors=True)
    record(recorder, request_id="before")
    batch = drain_batch(rings[0].drain_raw(), 0, names, LATENCY_BOUNDS_US)
    writer.write(batch.lines, batch.written)
    path.rename(tmp_path / "access.log.1")
    writer.reopen()
    record(recorder, request_id="after")
    batch = drain_batch(rings[0].drain_raw(), 0, names, LATENCY_BOUNDS_US)
    writer.write(batch.lines, batch.written)
    writer.close()
    assert json.loads((tmp_path / "access.log.1").read_text())["request_id"] == "before"
    assert json.loads(path.read_text())["request_id"] == "after"


def test_usage_by_consumer_and_route(rings):
    names = Names(CONFIG)
    recorder = AccessRecorder(rings[0], names)
    for _ in range(10):
        record(recorder, duration_ns=1_000_000, bytes_sent=100)
    record(recorder, status=429, consumer=None)
    record(recorder, status=503, route="orders", duration_ns=900_000_000)
    table = UsageTable()
    batch = drain_batch(rings[0].drain_raw(), 0, names, LATENCY_BOUNDS_US)
    table.add(batch.counts, batch.sent, names)
    usage = table.snapshot()
    acme, anonymous = usage["consumers"]
    assert acme["name"] == "acme"
    assert acme["requests"] == 11
    assert acme["errors"] == 1
    assert acme["bytes"] == 10 * 100 + 5120
    assert anonymous == {**anonymous, "name": "(anonymous)", "requests": 1, "rate_limited": 1}
    # p50 is in the bucket of 1 ms (bucket bounds grow by 19%); p99 in that of 900 ms.
    assert 0.001 <= acme["latency_s"]["p50"] < 0.00119
    assert 0.9 <= acme["latency_s"]["p99"] < 1.08
    assert [route["name"] for route in usage["routes"]] == ["catalog", "orders"]
    assert table.snapshot(limit=1)["routes"][0]["requests"] == 11


def test_durations_are_capped_and_zero_upstream_kept(rings):
    names = Names(CONFIG)
    recorder = AccessRecorder(rings[0], names)
    assert record(recorder, duration_ns=2**45, upstream_ns=0)
    [entry] = decode(rings[0].drain(), 0, names)
    # 32 bits of microseconds: a little over 71 minutes.
    assert entry["duration_s"] == (2**32 - 1) / 1e6
    assert entry["upstream_s"] == 0.0


@pytest.mark.parametrize("trace_id", [2**128, -1])
def test_trace_id_outside_128_bits_raises(rings, trace_id):
    recorder = AccessRecorder(rings[0], Names(CONFIG))
    with pytest.raises(OverflowError):
        record(recorder, trace_id=trace_id)
    assert rings[0].counts().published == 0
