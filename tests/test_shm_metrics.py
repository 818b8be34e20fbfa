"""Per-worker metric slots of nexus.shm.metrics, written by forked workers and summed by the parent.

Children leave with `os._exit`, every child is reaped, and any child still
alive when a test ends is SIGKILLed and reaped.
"""

from __future__ import annotations

import time

import pytest

from nexus.shm.metrics import MetricLayout, MetricSlots
from nexus.shm.segment import SegmentError
from tests.forking import Children

BOUNDS = (10, 100, 1000)


def make_layout() -> MetricLayout:
    """A layout of two counters and one latency histogram, built the same way in every process."""
    layout = MetricLayout()
    layout.counter("requests")
    layout.counter("errors")
    layout.histogram("latency_ns", BOUNDS)
    return layout


def test_counters_four_workers_exact():
    """4 forked workers incrementing their own block 100k times give an exact master total.

    While they run, the master's total never goes backwards and never exceeds
    the final count, which a torn or lost word would break.
    """
    workers, increments = 4, 100_000
    layout = make_layout()
    slots = MetricSlots.create(layout, workers)
    requests = layout.counters["requests"]
    errors = layout.counters["errors"]

    def count(worker: int) -> None:
        metrics = slots.for_worker(worker)
        for number in range(increments):
            metrics.inc(requests)
            if number % 10 == 0:
                metrics.inc(errors, 2)

    readings = []
    with Children() as children:
        pids = [children.fork(lambda worker=worker: count(worker)) for worker in range(workers)]
        codes = {}
        deadline = time.monotonic() + 20
        while len(codes) < workers and time.monotonic() < deadline:
            readings.append(slots.total("requests"))
            for pid in pids:
                if pid not in codes and (code := children.exited(pid)) is not None:
                    codes[pid] = code

    assert sorted(codes.values()) == [0] * workers
    assert slots.total("requests") == workers * increments
    assert slots.total("errors") == workers * (increments // 10) * 2
    assert readings == sorted(readings)
    assert max(readings) <= workers * increments


def test_worker_blocks_do_not_overlap():
    """Each worker's increments land only in its own block, one cache line apart at least."""
    layout = make_layout()
    slots = MetricSlots.create(layout, 3)
    assert slots.block_words % 8 == 0
    assert slots.block_words >= layout.words

    slots.for_worker(1).inc(layout.counters["errors"], 5)
    slots.for_worker(2).observe("latency_ns", 2000)

    words = slots.segment.words
    first = 8  # payload starts after the 64-byte header
    block_totals = [
        sum(words[first + worker * slots.block_words : first + (worker + 1) * slots.block_words]) for worker in range(3)
    ]
    assert block_totals == [0, 5, 1 + 2000]


def test_histogram_bucket_placement():
    """A value equal to a bound counts in that bound's bucket, one above the last bound in +Inf, and the sum adds up."""
    layout = make_layout()
    slots = MetricSlots.create(layout, 2)
    values = {
        0: [0, 1, 10],
        1: [11, 100],
        2: [101, 999, 1000],
        3: [1001, 10**12],
    }
    worker_metrics = [slots.for_worker(0), slots.for_worker(1)]
    observed = 0
    for bucket_values in values.values():
        for value in bucket_values:
            worker_metrics[observed % 2].observe("latency_ns", value)
            observed += 1

    snapshot = slots.histogram("latency_ns")

    assert snapshot.bounds == BOUNDS
    assert snapshot.buckets == tuple(len(values[bucket]) for bucket in range(len(BOUNDS) + 1))
    assert snapshot.total == sum(sum(bucket_values) for bucket_values in values.values())
    assert snapshot.count == observed


def test_histogram_from_forked_workers():
    """Observations made in 4 forked workers are all summed by the master."""
    workers = 4
    layout = make_layout()
    slots = MetricSlots.create(layout, workers)

    def observe(worker: int) -> None:
        metrics = slots.for_worker(worker)
        for value in range(2000):
            metrics.observe("latency_ns", value)

    with Children() as children:
        pids = [children.fork(lambda worker=worker: observe(worker)) for worker in range(workers)]
        codes = [children.wait(pid, timeout_s=10) for pid in pids]

    assert codes == [0] * workers
    snapshot = slots.histogram("latency_ns")
    # Values 0..1999: 11 are <= 10, 90 in (10, 100], 900 in (100, 1000], 999 above.
    assert snapshot.buckets == (11 * workers, 90 * workers, 900 * workers, 999 * workers)
    assert snapshot.total == workers * sum(range(2000))


def test_attach_same_layout_shares_counts():
    """A child attaching with an equal layout, built separately, reads and adds to the same words."""
    slots = MetricSlots.create(make_layout(), 2)
    slots.for_worker(0).inc(slots.layout.counters["requests"], 3)

    def add_from_attached() -> None:
        attached = MetricSlots.attach(slots.segment.fd, make_layout())
        assert attached.total("requests") == 3
        attached.for_worker(1).inc(attached.layout.counters["requests"], 4)

    with Children() as children:
        assert children.wait(children.fork(add_from_attached), timeout_s=5) == 0

    assert slots.total("requests") == 7


@pytest.mark.parametrize(
    "change",
    ["extra counter", "other bounds", "other order"],
)
def test_attach_with_other_layout_raises(change):
    """Attaching with a layout that differs in metrics, bounds or order raises SegmentError."""
    slots = MetricSlots.create(make_layout(), 2)
    other = MetricLayout()
    if change == "extra counter":
        other = make_layout()
        other.counter("timeouts")
    elif change == "other bounds":
        other.counter("requests")
        other.counter("errors")
        other.histogram("latency_ns", (10, 100, 2000))
    else:
        other.counter("errors")
        other.counter("requests")
        other.histogram("latency_ns", BOUNDS)

    with pytest.raises(SegmentError, match="laid out for another set of metrics"):
        MetricSlots.attach(slots.segment.fd, other)


def test_layout_rejects_bad_bounds():
    """Histogram bounds must be strictly ascending, and a histogram keeps its first bounds."""
    layout = make_layout()

    with pytest.raises(ValueError, match="strictly ascending"):
        layout.histogram("sizes", (10, 10, 20))
    with pytest.raises(ValueError, match="strictly ascending"):
        layout.histogram("sizes", (20, 10))
    with pytest.raises(ValueError, match="already laid out"):
        layout.histogram("latency_ns", (1, 2))
    assert layout.histogram("latency_ns", BOUNDS) == layout.histograms["latency_ns"].index


def test_for_worker_rejects_unknown_slot():
    """for_worker outside 0..workers-1 raises IndexError naming the slot."""
    slots = MetricSlots.create(make_layout(), 2)

    with pytest.raises(IndexError, match="worker slot 2 is outside 0..1"):
        slots.for_worker(2)
    with pytest.raises(IndexError, match="worker slot -1"):
        slots.for_worker(-1)
