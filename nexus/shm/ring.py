"""Event rings: one single-producer single-consumer ring per worker.

A worker pushes fixed-size records (eight 64-bit words: a kind and seven
values), meant for cache events and access records, and the master drains
them in bulk. A full ring drops the record and counts the
drop, so a worker never waits for the master. The word-level layout and the
publication protocol are in `nexus/shm/native/ring.c`.

Geometry in the segment header: word 4 = number of rings, word 5 = records
per ring (a power of two).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Iterator
from typing import NamedTuple

from nexus.shm import _native
from nexus.shm.segment import HEADER_BYTES, Segment

__all__ = ["RECORD_WORDS", "Ring", "RingCounts", "RingSet"]

RECORD_WORDS = 8
# One record as the native extension stores it: eight native 64-bit words.
_RECORD = struct.Struct(f"={RECORD_WORDS}Q")
_CONTROL_BYTES = 128


class RingCounts(NamedTuple):
    """Records ever published, ever consumed, and dropped because the ring was full."""

    published: int
    consumed: int
    dropped: int

    @property
    def pending(self) -> int:
        return self.published - self.consumed


class Ring:
    """One worker's ring; push from its worker, drain from the master."""

    def __init__(self, segment: Segment, offset: int, capacity: int) -> None:
        self._region = segment.region
        self._offset = offset
        self.capacity = capacity

    def push(self, *words: int) -> bool:
        """Publish one record of up to eight words; False if the ring was full."""
        return _native.ring_push(self._region, self._offset, self.capacity, *words)

    def pusher(self) -> Callable[..., bool]:
        """Return `push` as one native call with this ring bound, for a producer's hot path."""
        return functools.partial(_native.ring_push, self._region, self._offset, self.capacity)

    def access_pusher(self) -> Callable[..., bool]:
        """Return the native access-record push with this ring bound (`nexus.observability.access_log`).

        It takes (head, started_ns, parties, bytes_sent, duration_ns,
        upstream_ns or None, trace_id, flags) and packs the durations and the
        128-bit trace id in C, which in Python took most of a record's cost.
        """
        return functools.partial(_native.ring_push_access, self._region, self._offset, self.capacity)

    def drain(self, limit: int | None = None) -> list[tuple[int, ...]]:
        """Consume up to `limit` records (all pending ones by default), oldest first."""
        raw = self.drain_raw(limit)
        if not raw:
            return []
        return list(_RECORD.iter_unpack(raw))

    def drain_raw(self, limit: int | None = None) -> bytes:
        """Consume up to `limit` records, oldest first, as bytes: 8 native 64-bit words each."""
        return _native.ring_drain(self._region, self._offset, self.capacity, self.capacity if limit is None else limit)

    def counts(self) -> RingCounts:
        return RingCounts(*_native.ring_counts(self._region, self._offset, self.capacity))


class RingSet:
    """The segment holding every worker's ring, indexed by worker slot."""

    KIND = b"rings"
    LAYOUT = 1

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.count, self.capacity = segment.geometry[0], segment.geometry[1]
        stride = _CONTROL_BYTES + self.capacity * RECORD_WORDS * 8
        self._rings = [Ring(segment, HEADER_BYTES + index * stride, self.capacity) for index in range(self.count)]

    @classmethod
    def create(cls, count: int, capacity: int) -> RingSet:
        """Create `count` rings of `capacity` records each (rounded up to a power of two)."""
        if count < 1 or capacity < 1:
            raise ValueError(f"need at least one ring of at least one record, got {count} rings of {capacity}")
        capacity = 1 << (capacity - 1).bit_length()
        stride = _CONTROL_BYTES + capacity * RECORD_WORDS * 8
        return cls(Segment.create(cls.KIND, cls.LAYOUT, count * stride, geometry=(count, capacity)))

    @classmethod
    def attach(cls, fd: int) -> RingSet:
        return cls(Segment.attach(fd, cls.KIND, cls.LAYOUT))

    def __getitem__(self, index: int) -> Ring:
        return self._rings[index]

    def __iter__(self) -> Iterator[Ring]:
        return iter(self._rings)

    def __len__(self) -> int:
        return self.count

    def close(self) -> None:
        self._rings.clear()
        self.segment.close()
