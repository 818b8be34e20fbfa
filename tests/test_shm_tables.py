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
