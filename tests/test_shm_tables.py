"""Shared-memory segments and the health and worker tables, across real forks."""

from __future__ import annotations

import os

import pytest

from nexus.shm.health import HealthTable
from nexus.shm.segment import Segment, SegmentError
from nexus.shm.workers import WorkerState, WorkerTable


def _in_child(action) -> int:
    """Run `action` in a forked child; return its exit code."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            action()
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_segment_attach_checks_header():
    segment = Segment.create(b"health", 1, 128)
    attached = Segment.attach(segment.fd, b"health", 1)
    assert len(attached.mapping) == len(segment.mapping)


@pytest.mark.parametrize(
    ("kind", "layout", "message"),
    [
        (b"workers", 1, "holds b'health', expected b'workers'"),
        (b"health", 2, "has layout version 1, this Nexus reads version 2"),
    ],
)
def test_segment_attach_rejects_mismatch(kind, layout, message):
    segment = Segment.create(b"health", 1, 128)
    with pytest.raises(SegmentError, match=message):
        Segment.attach(segment.fd, kind, layout)


def test_segment_attach_rejects_missing_magic():
    segment = Segment.create(b"health", 1, 128)
    segment.words[0] = 0
    with pytest.raises(SegmentError, match="no Nexus header"):
        segment.check(b"health", 1)


def test_health_table_starts_up_and_is_shared():
    table = HealthTable.create(4)
    assert all(table.is_up(slot) for slot in range(4))

    assert _in_child(lambda: table.set_up(2, False)) == 0

    assert table.is_up(1)
    assert not table.is_up(2)


def test_health_table_probe_streak_sign():
    table = HealthTable.create(2)
    table.record_probe(0, -3, 123, 0)
    table.record_probe(1, 5, 456, 789)
    assert table.probe(0) == (-3, 123, 0)
    assert table.probe(1) == (5, 456, 789)


def test_worker_table_written_by_child_read_by_parent():
    table = WorkerTable.create(2)
    table.reset(1, pid=4242, generation=7, cpu=1, started_ns=1)

    def child() -> None:
        table.set_state(1, WorkerState.SERVING)
        table.beat(1, 999)
        table.add_requests(1, 5)

    assert _in_child(child) == 0
    assert table.state(1) is WorkerState.SERVING
    assert table.heartbeat_ns(1) == 999
    assert table.requests(1) == 5
    assert table.state(0) is WorkerState.EMPTY


def test_shared_state_handed_to_a_new_process_by_file_descriptor(tmp_path):
    """A separately started process (not a fork) maps every table from its memfd and sees the same data."""
    import json
    import subprocess
    import sys

    from nexus.config import parse_config
    from nexus.shm.state import SharedState
    from nexus.telemetry import build_layout

    config = parse_config(
        'listen: ["127.0.0.1:0"]\n'
        "upstreams: {a: {targets: ['http://127.0.0.1:9']}}\n"
        "routes: [{name: r, upstream: a, rate_limit: {rate: 10/s}}]\n"
    )
    layout = build_layout(config)
    state = SharedState.create(config, 2, layout)
    state.health.set_up(0, False)
    state.gcra.acquire(1234, 100_000, 100_000, now_us=5_000_000)
    state.rings[1].push(7, 8, 9)
    state.metrics.for_worker(1).inc(layout.counter(("requests", "r", "safe", "2xx")), 3)
    assert state.cache.put(b"GET /a", b"meta", b"body", ttl_us=60_000_000)
    fds = state.fds()

    (tmp_path / "config.yaml").write_text(
        'listen: ["127.0.0.1:0"]\n'
        "upstreams: {a: {targets: ['http://127.0.0.1:9']}}\n"
        "routes: [{name: r, upstream: a, rate_limit: {rate: 10/s}}]\n"
    )
    script = f"""
import json
from nexus.config import load_config
from nexus.shm.state import SharedState
from nexus.telemetry import build_layout
layout = build_layout(load_config({str(tmp_path / "config.yaml")!r}))
state = SharedState.attach({fds!r}, layout)
print(json.dumps({{
    "up": state.health.is_up(0),
    "second_decision": state.gcra.acquire(1234, 100_000, 100_000, now_us=5_000_000).outcome,
    "ring": state.rings[1].drain(),
    "requests": state.metrics.total(("requests", "r", "safe", "2xx")),
    "cached": state.cache.get(b"GET /a").body.decode(),
}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], pass_fds=list(fds.values()), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["up"] is False
    # Burst 1 was used by this process, so the new process is refused at the same instant.
    assert seen["second_decision"] == 1
    assert seen["ring"] == [[7, 8, 9, 0, 0, 0, 0, 0]]
    assert seen["requests"] == 3
    assert seen["cached"] == "body"
    state.close()


def test_health_table_keeps_a_probe_latency_average_and_counts():
    """Successful probes move the average by EWMA_WEIGHT; failures are counted and leave it alone."""
    from nexus.shm.health import EWMA_WEIGHT

    table = HealthTable.create(1)
    assert table.latency_ewma_us(0) == 0

    table.record_probe(0, 1, 1, 1000)
    table.record_probe(0, 2, 2, 2000)
    table.record_probe(0, -1, 3, 0)

    assert table.latency_ewma_us(0) == round(1000 + EWMA_WEIGHT * (2000 - 1000))
    assert table.probe_counts(0) == (3, 1)
