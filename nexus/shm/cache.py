"""Shared-memory response cache: key -> (meta, body) with a TTL, a byte budget and CLOCK eviction.

The master creates the store before it forks workers. Every worker reads and
writes it through the inherited mapping, and a new process can attach with
the segment's fd alone. The operations are in C (`nexus/shm/native/cache.c`),
and this module sizes the segment, writes its geometry and wraps the calls.

Reads take no lock. Each index entry has a sequence word: a writer makes it
odd while it changes the entry or reuses the bytes the entry points to. A
reader copies the record out between two loads of that word and returns a
miss if the word was odd or changed (after one retry), so a read returns a
whole entry or nothing, and never waits. Writes (put, delete, set_flags,
clear, eviction) hold a robust lock for a few microseconds. A put that cannot
get the lock within 2 ms returns False. When a writer is killed while holding
the lock, the next writer takes it over and repairs the store: it clears
entries left with an odd sequence word, checks that the log can be walked
from tail to head (and empties the cache if not), and recounts the entries.

Values live in a circular log (the arena) of `capacity_bytes`, the byte
budget. A put appends a record at the head. Before that it frees space at the
tail: it skips dead records, evicts expired and unreferenced ones, and moves
a referenced live record to the head once instead of evicting it (CLOCK second
chance; a get sets the entry's reference byte). The index is set-associative,
8 ways per set, sized so that `max_entries` live keys fill about half of it.
A key whose set is full evicts the set's expired entry, else its oldest
unreferenced one, else its oldest. An expired entry reads as a miss at once,
but its bytes are reclaimed only when the tail reaches them.

Layout after the 64-byte segment header (`nexus.shm.segment`), by byte offset
from the start of the segment. All words are 64-bit little-endian.

    Cache header, line 0 (64): written once by create(), read by every call
        64   sets              number of sets, a power of two
        72   ways              entries per set (8)
        80   capacity_bytes    arena size, a multiple of 8: the byte budget
        88   max_object_bytes  largest len(key) + len(meta) + len(body) accepted
        96   index_offset      256
        104  refs_offset       index_offset + sets * ways * 32
        112  arena_offset      refs_offset + sets * ways, rounded up to 64
        120  hash_seed         random seed of the key hash in this segment
    Cache header, line 1 (128): written only by the holder of the lock
        128  lock              robust lock word: 0 free, else the holder's thread id
        136  head              log position after the newest record
        144  tail              log position of the oldest record
        152  entries           live index entries (expired ones count until removed)
        160  bytes_used        sum of the record sizes of those entries, headers included
        168  max_entries       the max_entries given to create(), for attach()
        176  state_offset      byte offset of the fill and tag tables (`nexus.shm.cache_state`), after the arena
        184  (reserved)
    Counters, line 2 (192): added to with fetch-add, never reset
        192  evictions         live unexpired entries removed to make room
        200  expired           expired entries removed
        208  put_failures      puts that returned False (too big or lock timeout)
        216  recoveries        lock takeovers from a dead holder, each followed by a repair
        224  lock_timeouts     writers that gave up waiting for the lock
        232  too_big           puts rejected for exceeding max_object_bytes
        240  second_chances    referenced records moved from tail to head
        248  (reserved)
    Index (256): sets * 8 entries of 4 words; a key lives in set hash % sets
        0  seq     even when stable, odd while a writer changes the entry
        1  hash    64-bit hash of the key
        2  pos     log position of the record, with bit 0 set while the entry is in use
        3  flags   flag bits, ORed in place by set_flags()
    Reference bytes (refs_offset): one per index entry, set by get, cleared by writers
    Arena (arena_offset): capacity_bytes of records, each at log position % capacity_bytes
        0  magic        b"NXRECORD" as a little-endian word; b"NXPADEND" marks padding up to the arena end
        1  bytes        record size, header included, a multiple of 8
        2  hash         the key's hash, to find the record's index entry from the tail
        3  lengths      key length in bits 0-31, meta length in bits 32-63
        4  body_length
        5  stored_at    CLOCK_REALTIME microseconds
        6  expires_at   CLOCK_REALTIME microseconds
        then the key, meta and body bytes, zero-padded to a multiple of 8

The fill slots and tag purge times of `nexus.shm.cache_state` follow the
arena at state_offset, in the same segment.

Log positions only grow (a 64-bit byte count), so head - tail is the number of
bytes the log occupies, at most capacity_bytes. A record never crosses the end
of the arena: when it does not fit, the writer pads to the end and starts
again at offset 0.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from nexus.shm import _native
from nexus.shm.cache_state import CacheState, state_bytes
from nexus.shm.segment import HEADER_BYTES, Segment, SegmentError

__all__ = ["CacheStore", "Entry"]

Entry = _native.cache_entry_type()

WAYS = 8
ENTRY_BYTES = 32
RECORD_HEADER_BYTES = 56
INDEX_OFFSET = 256
MAX_OBJECT_LIMIT = 2**32 - 1

# Word numbers of the cache header, counted from the start of the segment.
_SETS, _WAYS, _CAPACITY, _MAX_OBJECT, _INDEX_OFFSET, _REFS_OFFSET, _ARENA_OFFSET, _HASH_SEED = range(8, 16)
_LOCK, _HEAD, _TAIL, _ENTRIES, _BYTES_USED, _MAX_ENTRIES, _STATE_OFFSET = range(16, 23)

# Coalescing fill slots and tag purge buckets (`nexus.shm.cache_state`).
FILL_SLOTS = 4096
TAG_BUCKETS = 65536
_COUNTERS = {
    "evictions": 24,
    "expired": 25,
    "put_failures": 26,
    "recoveries": 27,
    "lock_timeouts": 28,
    "too_big": 29,
    "second_chances": 30,
}

_cache_get = _native.cache_get
_cache_put = _native.cache_put


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def _geometry(sets: int) -> tuple[int, int]:
    """Return (refs_offset, arena_offset) for an index of `sets` sets."""
    refs_offset = INDEX_OFFSET + sets * WAYS * ENTRY_BYTES
    return refs_offset, _round_up(refs_offset + sets * WAYS, 64)


class CacheStore:
    """A response cache in one shared-memory segment, usable from every forked worker."""

    KIND = b"cache"
    LAYOUT = 1

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self._region = segment.region
        words = segment.words
        self.sets = words[_SETS]
        self.capacity_bytes = words[_CAPACITY]
        self.max_object_bytes = words[_MAX_OBJECT]
        self.max_entries = words[_MAX_ENTRIES]
        self.state = CacheState(segment, words[_STATE_OFFSET])

    @classmethod
    def create(cls, capacity_bytes: int, max_entries: int, max_object_bytes: int) -> CacheStore:
        """Create an empty store in a new segment.

        `capacity_bytes` (rounded down to a multiple of 8) bounds the bytes of
        all records, 56 bytes of header each included. `max_entries` sizes the
        index, `max_object_bytes` bounds len(key) + len(meta) + len(body).
        """
        capacity_bytes -= capacity_bytes % 8
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        if not 1 <= max_object_bytes <= MAX_OBJECT_LIMIT:
            raise ValueError(f"max_object_bytes must be between 1 and {MAX_OBJECT_LIMIT}, got {max_object_bytes}")
        largest_record = _round_up(RECORD_HEADER_BYTES + max_object_bytes, 8)
        if capacity_bytes < largest_record:
            raise ValueError(
                f"capacity_bytes {capacity_bytes} cannot hold one record of max_object_bytes {max_object_bytes} "
                f"({largest_record} bytes with its header): raise capacity_bytes or lower max_object_bytes"
            )

        # Half of the ways in use at max_entries keeps full sets rare: with
        # 4 keys per 8-way set on average, about 2% of sets are full.
        min_sets = -(-2 * max_entries // WAYS)
        sets = 1 << (min_sets - 1).bit_length()
        refs_offset, arena_offset = _geometry(sets)
        state_offset = arena_offset + capacity_bytes
        total = state_offset + state_bytes(FILL_SLOTS, TAG_BUCKETS)
        segment = Segment.create(cls.KIND, cls.LAYOUT, total - HEADER_BYTES)
        CacheState.initialise(segment, state_offset, FILL_SLOTS, TAG_BUCKETS)

        words = segment.words
        words[_SETS] = sets
        words[_WAYS] = WAYS
        words[_CAPACITY] = capacity_bytes
        words[_MAX_OBJECT] = max_object_bytes
        words[_INDEX_OFFSET] = INDEX_OFFSET
        words[_REFS_OFFSET] = refs_offset
        words[_ARENA_OFFSET] = arena_offset
        words[_HASH_SEED] = int.from_bytes(os.urandom(8), "little")
        words[_MAX_ENTRIES] = max_entries
        words[_STATE_OFFSET] = state_offset
        return cls(segment)

    @classmethod
    def attach(cls, fd: int) -> CacheStore:
        """Map the store in segment `fd`, reading the geometry from its header.

        Raises SegmentError if `fd` is not a cache segment at this layout
        version, or if its geometry words do not fit its size. The fd stays
        open then, as with Segment.attach.
        """
        segment = Segment.attach(fd, cls.KIND, cls.LAYOUT)
        words = segment.words
        sets = words[_SETS]
        refs_offset, arena_offset = _geometry(sets)
        valid = (
            sets > 0
            and sets & (sets - 1) == 0
            and words[_WAYS] == WAYS
            and words[_INDEX_OFFSET] == INDEX_OFFSET
            and words[_REFS_OFFSET] == refs_offset
            and words[_ARENA_OFFSET] == arena_offset
            and words[_CAPACITY] % 8 == 0
            and arena_offset + words[_CAPACITY] <= len(segment.mapping)
            and _round_up(RECORD_HEADER_BYTES + words[_MAX_OBJECT], 8) <= words[_CAPACITY]
            and words[_STATE_OFFSET] == arena_offset + words[_CAPACITY]
            and words[_STATE_OFFSET] + state_bytes(FILL_SLOTS, TAG_BUCKETS) <= len(segment.mapping)
        )
        if not valid:
            raise SegmentError(
                f"shared-memory segment cache (fd {fd}) has invalid geometry words "
                f"(sets {sets}, capacity {words[_CAPACITY]}): recreate the cache"
            )
        return cls(segment)

    @property
    def fd(self) -> int:
        return self.segment.fd

    def hash_key(self, key: bytes) -> int:
        """Return the 64-bit hash the store uses for `key` in this segment."""
        return _native.cache_hash(self._region, key)

    def get(self, key: bytes) -> Entry | None:
        """Return a copy of the live entry for `key`, or None (missing, expired or being written)."""
        return _cache_get(self._region, key)

    def put(self, key: bytes, meta: bytes, body: bytes, ttl_us: int, flags: int = 0) -> bool:
        """Store an entry that expires `ttl_us` microseconds from now, replacing any entry for `key`.

        Returns False, and counts a put failure, when the entry is bigger
        than max_object_bytes or another process held the lock for 2 ms.
        """
        return _cache_put(self._region, key, meta, body, ttl_us, flags)

    def delete(self, key: bytes) -> bool:
        """Remove the entry for `key`, expired or not, and return whether there was one.

        Raises TimeoutError if another process held the lock for 2 ms.
        """
        return _native.cache_delete(self._region, key)

    def set_flags(self, key: bytes, bits: int) -> bool:
        """OR `bits` into the flags of the live entry for `key` in place, and return whether there is one.

        Raises TimeoutError if another process held the lock for 2 ms.
        """
        return _native.cache_set_flags(self._region, key, bits)

    def keys(self, prefix: bytes = b"") -> Iterator[bytes]:
        """Iterate the keys of live, unexpired entries that start with `prefix`.

        The keys are collected without locking before the first one is
        returned, so an entry written meanwhile may or may not be included.
        """
        return iter(_native.cache_keys(self._region, prefix))

    def clear(self) -> None:
        """Remove every entry. Raises TimeoutError if another process held the lock for 2 ms."""
        _native.cache_clear(self._region)

    def verify(self) -> list[str]:
        """Check the index, the log and the counters under the lock; return the problems found (none: [])."""
        return _native.cache_verify(self._region)

    def stats(self) -> dict[str, int]:
        """Return the counters of the layout's lines 1 and 2.

        Each value is one word read without the lock, so while writers run
        the values may come from slightly different moments. `log_bytes` is
        head - tail, the arena bytes in use by live and dead records.
        """
        words = self.segment.words
        head = words[_HEAD]
        tail = words[_TAIL]
        stats = {
            "entries": words[_ENTRIES],
            "bytes_used": words[_BYTES_USED],
            "capacity_bytes": self.capacity_bytes,
            "log_bytes": min(max(head - tail, 0), self.capacity_bytes),
        }
        for name, word in _COUNTERS.items():
            stats[name] = words[word]
        return stats

    def close(self) -> None:
        """Unmap the segment and close its fd in this process."""
        self.segment.close()
