"""Per-worker metric slots: counters and histograms that the master sums without locks.

Every worker owns one block of 64-bit words and is the only process that
writes it, so an increment is a plain load and a release store (no locked
instruction, no lock), and the master reads each word with one aligned load
that never tears. The master sums the blocks of all worker slots at scrape
time. A worker that is replaced starts from the counts its predecessor left,
so totals never go backwards while the segment lives.

A `MetricLayout` assigns word indexes before the segment is created; the
master builds it from the config before forking, so workers and master use
the same object. Its fingerprint is stored in the header, and `attach`
refuses a segment laid out differently.

Histograms hold one word per bucket (non-cumulative counts; the last bucket
is +Inf) followed by one word for the sum of observed values, in the unit
the caller chose (nanoseconds for durations).

Geometry in the segment header: word 4 = worker slots, word 5 = words per
worker block, word 6 = layout fingerprint.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import xxhash

from nexus.shm.segment import HEADER_BYTES, Segment, SegmentError

__all__ = ["HistogramSnapshot", "MetricLayout", "MetricSlots", "SlotSums", "WorkerMetrics", "fold_tables", "sum_tables"]


@dataclass(frozen=True)
class _Histogram:
    index: int
    bounds: tuple[int, ...]


@dataclass
class MetricLayout:
    """Word indexes of every counter and histogram, keyed by any hashable id."""

    counters: dict[Hashable, int] = field(default_factory=dict)
    histograms: dict[Hashable, _Histogram] = field(default_factory=dict)
    words: int = 0

    def counter(self, key: Hashable) -> int:
        """Return the word index of counter `key`, adding it on first use."""
        if key not in self.counters:
            self.counters[key] = self.words
            self.words += 1
        return self.counters[key]

    def histogram(self, key: Hashable, bounds: Sequence[int]) -> int:
        """Return the first word index of histogram `key` with upper `bounds` (ascending)."""
        bounds = tuple(bounds)
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"histogram {key!r} bounds must be strictly ascending, got {bounds}")
        existing = self.histograms.get(key)
        if existing is not None:
            if existing.bounds != bounds:
                raise ValueError(f"histogram {key!r} is already laid out with bounds {existing.bounds}")
            return existing.index
        histogram = _Histogram(self.words, bounds)
        self.histograms[key] = histogram
        self.words += len(bounds) + 2  # the buckets, +Inf, and the sum
        return histogram.index

    def fingerprint(self) -> int:
        """A hash of the layout, so a segment is never read with another layout."""
        text = repr((sorted(map(repr, self.counters.items())), sorted(map(repr, self.histograms.items()))))
        return xxhash.xxh3_64_intdigest(text.encode())


@dataclass(frozen=True)
class HistogramSnapshot:
    """Summed bucket counts (non-cumulative, last is +Inf), sum and count."""

    bounds: tuple[int, ...]
    buckets: tuple[int, ...]
    total: int

    @property
    def count(self) -> int:
        return sum(self.buckets)


class WorkerMetrics:
    """One worker's block: increments from the hot path, no locks, no allocation."""

    def __init__(self, slots: MetricSlots, worker: int) -> None:
        self._region = slots.segment.region
        self._base = slots.block_offset(worker)
        self._layout = slots.layout

    def inc(self, index: int, amount: int = 1) -> None:
        self._region.add_local(self._base + index * 8, amount)

    def observe(self, key: Hashable, value: int) -> None:
        """Count `value` in histogram `key` (slower: looks the histogram up)."""
        histogram = self._layout.histograms[key]
        self.observe_at(histogram.index, histogram.bounds, value)

    def observe_at(self, index: int, bounds: tuple[int, ...], value: int) -> None:
        bucket = bisect.bisect_left(bounds, value)
        self._region.add_local(self._base + (index + bucket) * 8, 1)
        self._region.add_local(self._base + (index + len(bounds) + 1) * 8, value)


class MetricSlots:
    """The segment of metric blocks, one per worker slot."""

    KIND = b"metrics"
    LAYOUT = 1

    def __init__(self, segment: Segment, layout: MetricLayout) -> None:
        self.segment = segment
        self.layout = layout
        self.workers, self.block_words = segment.geometry[0], segment.geometry[1]
        self._words = segment.words

    @classmethod
    def create(cls, layout: MetricLayout, workers: int) -> MetricSlots:
        block_words = max(8, (layout.words + 7) // 8 * 8)  # whole cache lines per worker
        geometry = (workers, block_words, layout.fingerprint())
        return cls(Segment.create(cls.KIND, cls.LAYOUT, workers * block_words * 8, geometry=geometry), layout)

    @classmethod
    def attach(cls, fd: int, layout: MetricLayout) -> MetricSlots:
        segment = Segment.attach(fd, cls.KIND, cls.LAYOUT)
        if segment.geometry[2] != layout.fingerprint():
            raise SegmentError("metric slots were laid out for another set of metrics: restart instead of upgrading in place")
        return cls(segment, layout)

    def block_offset(self, worker: int) -> int:
        if not 0 <= worker < self.workers:
            raise IndexError(f"worker slot {worker} is outside 0..{self.workers - 1}")
        return HEADER_BYTES + worker * self.block_words * 8

    def for_worker(self, worker: int) -> WorkerMetrics:
        return WorkerMetrics(self, worker)

    def _word_sum(self, index: int) -> int:
        first = HEADER_BYTES // 8 + index
        return sum(self._words[first + worker * self.block_words] for worker in range(self.workers))

    def total(self, key: Hashable) -> int:
        """Sum of counter `key` over all worker slots."""
        return self._word_sum(self.layout.counters[key])

    def histogram(self, key: Hashable) -> HistogramSnapshot:
        """Sum of histogram `key` over all worker slots."""
        histogram = self.layout.histograms[key]
        buckets = tuple(self._word_sum(histogram.index + bucket) for bucket in range(len(histogram.bounds) + 1))
        return HistogramSnapshot(histogram.bounds, buckets, self._word_sum(histogram.index + len(histogram.bounds) + 1))

    def close(self) -> None:
        self.segment.close()


@dataclass
class SlotSums:
    """Counter values and histogram buckets summed over worker blocks and segments, by layout key."""

    counters: dict[Hashable, int] = field(default_factory=dict)
    # key -> (bounds in the layout's unit, non-cumulative buckets with +Inf last, sum)
    histograms: dict[Hashable, tuple[tuple[int, ...], list[int], int]] = field(default_factory=dict)


def _block_sums(slots: MetricSlots, words: int) -> list[int]:
    """Sum the first `words` words of every worker block, word by word."""
    all_words = slots.segment.words
    first = HEADER_BYTES // 8
    totals = [0] * words
    for worker in range(slots.workers):
        start = first + worker * slots.block_words
        block = all_words[start : start + words].tolist()
        totals = [total + value for total, value in zip(totals, block)]
    return totals


def sum_tables(tables: list[tuple[MetricLayout, MetricSlots]]) -> SlotSums:
    """Add up every counter and histogram over all worker blocks of all `tables`.

    Tables of different layouts (generations before and after a reload)
    add up key by key. A histogram whose bounds changed keeps the first
    bounds seen and skips the others.
    """
    sums = SlotSums()
    for layout, slots in tables:
        words = _block_sums(slots, layout.words)
        for key, index in layout.counters.items():
            sums.counters[key] = sums.counters.get(key, 0) + words[index]
        for key, histogram in layout.histograms.items():
            size = len(histogram.bounds) + 1
            buckets = words[histogram.index : histogram.index + size]
            total = words[histogram.index + size]
            known = sums.histograms.get(key)
            if known is None:
                sums.histograms[key] = (histogram.bounds, buckets, total)
            elif known[0] == histogram.bounds:
                sums.histograms[key] = (known[0], [a + b for a, b in zip(known[1], buckets)], known[2] + total)
    return sums


def fold_tables(tables: list[tuple[MetricLayout, MetricSlots]]) -> tuple[MetricLayout, MetricSlots]:
    """Return one single-block table holding the sums of `tables`, for tables no worker writes any more.

    The master folds the tables of retired generations into one. Otherwise
    each reload that changes the layout would keep a segment, and every
    scrape would sum them all. Summing the folded table gives what summing
    `tables` gave: the same keys, and for a histogram the first bounds seen.
    """
    sums = sum_tables(tables)
    layout = MetricLayout()
    for key in sums.counters:
        layout.counter(key)
    for key, (bounds, _, _) in sums.histograms.items():
        layout.histogram(key, bounds)
    folded = MetricSlots.create(layout, 1)
    block = folded.for_worker(0)
    for key, value in sums.counters.items():
        block.inc(layout.counters[key], value)
    for key, (bounds, buckets, total) in sums.histograms.items():
        index = layout.histograms[key].index
        for bucket, count in enumerate(buckets):
            block.inc(index + bucket, count)
        block.inc(index + len(bounds) + 1, total)
    return layout, folded
