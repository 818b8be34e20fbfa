"""Concurrency table: the adaptive in-flight limit of each upstream, shared by a node's workers.

This module is the shared state and its atomic updates. The algorithm that
moves the limit, and the queue in front of it, are in `nexus.concurrency`.

An upstream's row is its position in `config.upstreams` (the order of the
YAML mapping), and the row also stores the 64-bit xxhash of the upstream's
name, so `index_of(name)` finds it in a table mapped from a file descriptor.
Every upstream has a row; the rows of upstreams without a `concurrency`
section stay unused.

Shared row, one per upstream (eight 64-bit words, one cache line):
    0  name_hash      xxh3_64 of the upstream name
    1  in_flight      requests holding a slot, summed over all workers
    2  limit          the current limit x LIMIT_SCALE (fixed point)
    3  long_rtt_ns    long-term RTT average, nanoseconds; 0 before the first sample
    4  short_rtt_ns   short-term RTT average, nanoseconds; 0 before the first sample
    5  samples        RTT samples recorded, ever
    6  long_at_ns     time.monotonic_ns() of the last long-term RTT update
    7  (reserved)

Worker block, one per (worker slot, upstream), after all shared rows; only
the worker in that slot writes it, with a plain load and release store:
    0  in_flight        slots this worker holds now
    1  admitted         requests that got a slot, at once or after waiting
    2  queued           requests that had to wait in the worker's queue
    3  shed             requests rejected with 503 (any reason)
    4  queue_timeouts   the part of `shed` that waited the whole queue wait
    5-7 (reserved)

Crash cleanup: a worker acquires by raising the shared count first (a
compare-and-swap that checks the cap) and then its own word, and releases
in the opposite order. So the shared count is never below the sum of the
worker words, and a dead worker's word is what it still held.
`reclaim(index, worker)` moves that word back to zero and subtracts it from
the shared count. The next worker in the slot calls it for each of its
upstreams when it starts (`nexus.upstream.UpstreamPool`); the master may
call `reclaim_worker` as soon as it reaps a worker. A worker killed between
the two stores of one acquire or release leaves one slot counted that no
one holds.

Geometry in the segment header: word 4 = upstream rows, word 5 = worker slots.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import xxhash

from nexus.shm.segment import HEADER_BYTES, Segment

__all__ = [
    "ADMITTED",
    "LIMIT_SCALE",
    "QUEUED",
    "QUEUE_TIMEOUTS",
    "SHED",
    "ConcurrencyCounters",
    "ConcurrencyTable",
    "name_hash",
]

# The limit is stored as an integer number of 1/65536ths of a request.
LIMIT_SCALE = 1 << 16

_ROW_BYTES = 64
_BLOCK_BYTES = 64

# Words of a shared row, as byte offsets inside it.
_NAME_HASH = 0
_IN_FLIGHT = 8
_LIMIT = 16
_LONG_RTT = 24
_SHORT_RTT = 32
_SAMPLES = 40
_LONG_AT = 48

# Words of a worker block, as byte offsets inside it; the counters are for `count`.
_WORKER_IN_FLIGHT = 0
ADMITTED = 8
QUEUED = 16
SHED = 24
QUEUE_TIMEOUTS = 32

# A compare-and-swap that keeps losing to other workers gives up after this
# many tries, because losing one RTT update is harmless and spinning in the
# event loop is not.
_CAS_TRIES = 8


class ConcurrencyCounters(NamedTuple):
    """Counts of one upstream's admission decisions, summed over all worker slots."""

    admitted: int
    queued: int
    shed: int
    queue_timeouts: int


def name_hash(name: str) -> int:
    return xxhash.xxh3_64_intdigest(name.encode())


class ConcurrencyTable:
    """The segment of shared rows (one per upstream) and per-worker blocks."""

    KIND = b"conc"
    LAYOUT = 1

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.upstreams, self.workers = segment.geometry[0], segment.geometry[1]
        self._region = segment.region
        self._blocks = HEADER_BYTES + self.upstreams * _ROW_BYTES

    @classmethod
    def create(cls, upstreams: Iterable[tuple[str, float | None]], workers: int) -> ConcurrencyTable:
        """Create a table with one row per `(name, initial limit)`, in the given order.

        An initial limit of None leaves the row unused (the upstream has no limit).
        """
        upstreams = list(upstreams)
        if workers < 1:
            raise ValueError(f"a concurrency table needs at least one worker slot, got {workers}")
        hashes = [name_hash(name) for name, _ in upstreams]
        if len(set(hashes)) != len(hashes):
            raise ValueError("two upstream names have the same 64-bit hash; rename one of them")
        payload = len(upstreams) * _ROW_BYTES + len(upstreams) * workers * _BLOCK_BYTES
        table = cls(Segment.create(cls.KIND, cls.LAYOUT, max(payload, 8), geometry=(len(upstreams), workers)))
        for index, ((_, initial), hashed) in enumerate(zip(upstreams, hashes, strict=True)):
            table._region.store(table._row(index) + _NAME_HASH, hashed)
            if initial is not None:
                table.set_limit(index, initial)
        return table

    @classmethod
    def attach(cls, fd: int) -> ConcurrencyTable:
        return cls(Segment.attach(fd, cls.KIND, cls.LAYOUT))

    def _row(self, index: int) -> int:
        if not 0 <= index < self.upstreams:
            raise IndexError(f"upstream row {index} is outside 0..{self.upstreams - 1}")
        return HEADER_BYTES + index * _ROW_BYTES

    def _block(self, index: int, worker: int) -> int:
        if not 0 <= worker < self.workers:
            raise IndexError(f"worker slot {worker} is outside 0..{self.workers - 1}")
        self._row(index)
        return self._blocks + (worker * self.upstreams + index) * _BLOCK_BYTES

    def index_of(self, name: str) -> int:
        """Return the row of upstream `name`, or raise KeyError."""
        expected = name_hash(name)
        for index in range(self.upstreams):
            if self._region.load(self._row(index) + _NAME_HASH) == expected:
                return index
        raise KeyError(f"upstream {name!r} has no row in the concurrency table")

    # Slots.

    def try_acquire(self, index: int, worker: int, cap: int) -> bool:
        """Take one slot if fewer than `cap` are held node-wide; count it for `worker`."""
        region = self._region
        offset = self._row(index) + _IN_FLIGHT
        taken = region.load(offset)
        while taken < cap:
            if region.cas(offset, taken, taken + 1):
                region.add_local(self._block(index, worker) + _WORKER_IN_FLIGHT, 1)
                return True
            taken = region.load(offset)
        return False

    def release(self, index: int, worker: int) -> None:
        """Give back one slot that `worker` took with `try_acquire`."""
        self._region.add_local(self._block(index, worker) + _WORKER_IN_FLIGHT, -1)
        self._region.fetch_add(self._row(index) + _IN_FLIGHT, -1)

    def reclaim(self, index: int, worker: int) -> int:
        """Return the slots a dead worker held to the shared count; return how many.

        Only for a worker slot whose process has exited: a live worker's
        slots would be counted twice when it releases them.
        """
        region = self._region
        own = self._block(index, worker) + _WORKER_IN_FLIGHT
        left = region.load(own)
        if left == 0 or not region.cas(own, left, 0):
            return 0
        shared = self._row(index) + _IN_FLIGHT
        while True:
            current = region.load(shared)
            if region.cas(shared, current, max(0, current - left)):
                return left

    def reclaim_worker(self, worker: int) -> int:
        """Reclaim a dead worker's slots on every upstream; return how many."""
        return sum(self.reclaim(index, worker) for index in range(self.upstreams))

    def in_flight(self, index: int) -> int:
        """Requests holding a slot of upstream `index`, node-wide."""
        return self._region.load(self._row(index) + _IN_FLIGHT)

    def worker_in_flight(self, index: int, worker: int) -> int:
        return self._region.load(self._block(index, worker) + _WORKER_IN_FLIGHT)

    # The limit.

    def limit(self, index: int) -> float:
        """Return the current concurrency limit of upstream `index` (0.0 for an upstream without one)."""
        return self._region.load(self._row(index) + _LIMIT) / LIMIT_SCALE

    def set_limit(self, index: int, limit: float) -> None:
        self._region.store(self._row(index) + _LIMIT, round(limit * LIMIT_SCALE))

    def update_limit(self, index: int, step) -> float | None:
        """Replace the limit with `step(limit)` by compare-and-swap; return the new limit.

        Returns None when other workers changed the limit on every try.
        """
        region = self._region
        offset = self._row(index) + _LIMIT
        for _ in range(_CAS_TRIES):
            stored = region.load(offset)
            new = round(step(stored / LIMIT_SCALE) * LIMIT_SCALE)
            if new == stored or region.cas(offset, stored, new):
                return new / LIMIT_SCALE
        return None

    # RTT averages.

    def rtt(self, index: int) -> tuple[int, int]:
        """Return (long-term, short-term) RTT averages in nanoseconds; 0 before the first sample."""
        row = self._row(index)
        return self._region.load(row + _LONG_RTT), self._region.load(row + _SHORT_RTT)

    def samples(self, index: int) -> int:
        return self._region.load(self._row(index) + _SAMPLES)

    def update_short_rtt(self, index: int, rtt_ns: int, weight: float) -> int:
        """Move the short-term average toward `rtt_ns` by `weight` (0..1); return the new value."""
        row = self._row(index)
        self._region.fetch_add(row + _SAMPLES, 1)
        return self._blend(row + _SHORT_RTT, lambda old: rtt_ns if old == 0 else old + (rtt_ns - old) * weight)

    def claim_long_update(self, index: int, now_ns: int, min_interval_ns: int) -> int | None:
        """Claim the next long-term RTT update; return the nanoseconds since the last one.

        Returns None when the last update is less than `min_interval_ns` old
        or another worker claimed it first, so that at high request rates
        most samples skip the long-term average. The first claim returns 0.
        """
        offset = self._row(index) + _LONG_AT
        last = self._region.load(offset)
        if last and now_ns - last < min_interval_ns:
            return None
        if not self._region.cas(offset, last, now_ns):
            return None
        return now_ns - last if last else 0

    def update_long_rtt(self, index: int, step) -> int:
        """Replace the long-term average with `step(old)` (old is 0 before the first); return it."""
        return self._blend(self._row(index) + _LONG_RTT, step)

    def _blend(self, offset: int, step) -> int:
        region = self._region
        for _ in range(_CAS_TRIES):
            old = region.load(offset)
            new = max(1, round(step(old)))
            if new == old or region.cas(offset, old, new):
                return new
        return region.load(offset)

    # Counters.

    def count(self, index: int, worker: int, counter: int, amount: int = 1) -> None:
        """Add to one of `worker`'s counters (ADMITTED, QUEUED, SHED, QUEUE_TIMEOUTS)."""
        self._region.add_local(self._block(index, worker) + counter, amount)

    def counters(self, index: int) -> ConcurrencyCounters:
        """Admission counts of upstream `index`, summed over every worker slot."""
        totals = [0, 0, 0, 0]
        for worker in range(self.workers):
            block = self._block(index, worker)
            for position, counter in enumerate((ADMITTED, QUEUED, SHED, QUEUE_TIMEOUTS)):
                totals[position] += self._region.load(block + counter)
        return ConcurrencyCounters(*totals)

    def close(self) -> None:
        self.segment.close()
