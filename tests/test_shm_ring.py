"""Single-producer single-consumer event rings of nexus.shm.ring, with forked producers.

Producers are forked children that push records while the parent drains
them. Every record carries its producer id, a sequence number and a checksum
word over the other seven, so a torn or reordered record is detected.
Children leave with `os._exit`, every child is reaped, and any child still
alive when a test ends is SIGKILLed and reaped.
"""

from __future__ import annotations

import random
import signal
import time
from operator import mul

import pytest

from nexus.shm.ratelimit import GcraTable
from nexus.shm.ring import RECORD_WORDS, RingCounts, RingSet
from nexus.shm.segment import SegmentError
from tests.forking import Children

WORD_MASK = (1 << 64) - 1
# Odd weights, so a change in any single word changes the checksum.
CHECKSUM_WEIGHTS = tuple(((2 * position + 1) * 0x9E37_79B9_7F4A_7C15) & WORD_MASK for position in range(7))


def checksum(words: tuple[int, ...] | list[int]) -> int:
    """Return a weighted sum of seven words modulo 2**64, which changes when any single word changes."""
    return sum(map(mul, CHECKSUM_WEIGHTS, words)) & WORD_MASK


def make_record(producer: int, sequence: int) -> list[int]:
    """Eight words: producer, sequence, five payload words derived from both, and their checksum."""
    words = [producer, sequence]
    words += [(sequence * 0x1_0000_0001 + producer + position) & WORD_MASK for position in range(5)]
    words.append(checksum(words))
    return words


def check_record(record: tuple[int, ...]) -> tuple[int, int]:
    """Assert that `record` is whole (its checksum matches) and return (producer, sequence)."""
    assert len(record) == RECORD_WORDS
    assert record[7] == checksum(record[:7]), f"torn record {record}"
    return record[0], record[1]


# ---- FIFO order with a concurrent producer ----


def test_ring_fifo_million_records():
    """1M records from a forked producer through a 1024-record ring arrive in order, with gaps only for counted drops.

    The parent drains while the child pushes, so the ring wraps about a
    thousand times. A full ring drops the record instead of waiting, so
    sequence numbers may skip, but only as many as the drop counter records.
    """
    total = 1_000_000
    rings = RingSet.create(1, 1024)
    ring = rings[0]

    def produce() -> None:
        for sequence in range(total):
            ring.push(*make_record(7, sequence))

    received = 0
    last_sequence = -1
    with Children() as children:
        pid = children.fork(produce)
        code = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            finished = code is not None
            for record in ring.drain():
                producer, sequence = check_record(record)
                assert producer == 7
                assert sequence > last_sequence
                last_sequence = sequence
                received += 1
            if finished:
                break
            code = children.exited(pid)
        if code is None:
            code = children.kill(pid)

    assert code == 0
    counts = ring.counts()
    assert received + counts.dropped == total
    assert counts.published == received
    assert counts.consumed == received
    assert counts.pending == 0
    # The drain kept up at least part of the time, so the ring really wrapped.
    assert received > 10 * rings.capacity


def test_ring_four_producers():
    """4 forked workers each push 100k records into their own ring, and the parent drains all four in order."""
    producers, per_producer = 4, 100_000
    rings = RingSet.create(producers, 256)
    last = [-1] * producers
    received = [0] * producers

    def produce(index: int) -> None:
        for sequence in range(per_producer):
            rings[index].push(*make_record(index, sequence))

    with Children() as children:
        pids = [children.fork(lambda index=index: produce(index)) for index in range(producers)]
        codes: dict[int, int] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            finished = len(codes) == producers
            for index, ring in enumerate(rings):
                for record in ring.drain():
                    producer, sequence = check_record(record)
                    assert producer == index
                    assert sequence > last[index]
                    last[index] = sequence
                    received[index] += 1
            if finished:
                break
            for pid in pids:
                if pid not in codes and (code := children.exited(pid)) is not None:
                    codes[pid] = code

    assert sorted(codes.values()) == [0] * producers
    for index, ring in enumerate(rings):
        counts = ring.counts()
        assert received[index] + counts.dropped == per_producer
        assert counts.consumed == counts.published == received[index]


# ---- full ring, drain limits, arguments ----


def test_full_ring_drops_and_counts():
    """A full ring rejects the record, counts the drop and keeps the older records. A drain makes room again."""
    rings = RingSet.create(1, 5)
    ring = rings[0]
    assert rings.capacity == 8

    pushed = [ring.push(sequence, sequence * 10) for sequence in range(10)]

    assert pushed == [True] * 8 + [False] * 2
    assert ring.counts() == RingCounts(published=8, consumed=0, dropped=2)
    records = ring.drain()
    assert records == [(sequence, sequence * 10, 0, 0, 0, 0, 0, 0) for sequence in range(8)]
    assert ring.counts() == RingCounts(published=8, consumed=8, dropped=2)
    assert ring.push(99) is True
    assert ring.drain() == [(99, 0, 0, 0, 0, 0, 0, 0)]


def test_drain_limit_takes_oldest_first():
    """drain(limit) consumes at most `limit` records, oldest first, and leaves the rest pending."""
    ring = RingSet.create(1, 16)[0]
    for sequence in range(10):
        assert ring.push(sequence)

    assert [record[0] for record in ring.drain(3)] == [0, 1, 2]
    assert ring.counts().pending == 7
    assert [record[0] for record in ring.drain(100)] == list(range(3, 10))
    assert ring.drain() == []


def test_drain_limit_zero_consumes_nothing():
    """drain(limit=0) requests no records, so it returns none and leaves every record pending."""
    ring = RingSet.create(1, 16)[0]
    for sequence in range(4):
        assert ring.push(sequence)

    records = ring.drain(0)

    assert records == []
    assert ring.counts().pending == 4


def test_push_words_and_padding():
    """push takes 1 to 8 words, stores negative words as two's complement and pads missing words with 0."""
    ring = RingSet.create(1, 8)[0]

    with pytest.raises(TypeError):
        ring.push()
    with pytest.raises(TypeError):
        ring.push(*range(9))
    assert ring.counts() == RingCounts(0, 0, 0)

    assert ring.push(-1, 2**64 - 2, *range(6))
    assert ring.drain() == [(2**64 - 1, 2**64 - 2, 0, 1, 2, 3, 4, 5)]


def test_rings_in_set_independent():
    """Filling one ring of a set leaves its neighbours' records and counters untouched."""
    rings = RingSet.create(3, 4)
    for index, ring in enumerate(rings):
        for sequence in range(4):
            assert ring.push(*make_record(index, sequence))
    assert rings[1].push(*make_record(1, 4)) is False

    for index, ring in enumerate(rings):
        records = ring.drain()
        assert [check_record(record) for record in records] == [(index, sequence) for sequence in range(4)]
        assert ring.counts().dropped == (1 if index == 1 else 0)


# ---- killed producers ----


def test_killed_producer_no_torn_record():
    """Producers SIGKILLed 30 times mid-run never expose a torn record, and each successor continues the ring.

    Each producer pushes as fast as it can and is killed after a random 2-20 ms.
    The parent drains during and after each run. All records must be whole and
    in order per producer, and every published record must be consumed.
    """
    rings = RingSet.create(1, 64)
    ring = rings[0]
    generator = random.Random(3)
    received = 0
    last: dict[int, int] = {}

    def produce(producer: int) -> None:
        for sequence in range(10_000_000):
            ring.push(*make_record(producer, sequence))

    def drain_and_check() -> None:
        nonlocal received
        for record in ring.drain():
            producer, sequence = check_record(record)
            assert sequence > last.get(producer, -1)
            last[producer] = sequence
            received += 1

    with Children() as children:
        for producer in range(30):
            pid = children.fork(lambda producer=producer: produce(producer))
            run_until = time.monotonic() + generator.uniform(0.002, 0.02)
            while time.monotonic() < run_until:
                drain_and_check()
            assert children.kill(pid) == -signal.SIGKILL
            drain_and_check()

    counts = ring.counts()
    assert counts.pending == 0
    assert counts.published == received
    # Most producers got far enough to publish something.
    assert len(last) >= 20


# ---- attaching ----


def test_attach_in_child_shares_rings():
    """A child attaching the RingSet fd gets the same geometry and both directions of traffic work."""
    rings = RingSet.create(2, 32)
    for sequence in range(5):
        assert rings[0].push(*make_record(0, sequence))

    def consume_and_produce() -> None:
        attached = RingSet.attach(rings.segment.fd)
        assert (attached.count, attached.capacity) == (2, 32)
        assert [check_record(record) for record in attached[0].drain()] == [(0, sequence) for sequence in range(5)]
        for sequence in range(3):
            assert attached[1].push(*make_record(1, sequence))

    with Children() as children:
        assert children.wait(children.fork(consume_and_produce), timeout_s=5) == 0

    assert rings[0].counts() == RingCounts(published=5, consumed=5, dropped=0)
    assert [check_record(record) for record in rings[1].drain()] == [(1, sequence) for sequence in range(3)]


def test_attach_wrong_kind_raises():
    """RingSet.attach on a rate-limit table's fd raises SegmentError naming both kinds."""
    table = GcraTable.create(4)

    with pytest.raises(SegmentError, match=r"holds b'gcra', expected b'rings'"):
        RingSet.attach(table.segment.fd)
