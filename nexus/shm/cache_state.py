"""Shared state of the HTTP cache beside the store: fills in progress and tag purge times.

Two arrays in one segment, both indexed by a hash, both lossy in the safe
direction:

- Fill slots (request coalescing). A worker that misses a key takes the
  key's slot with one compare-and-swap of a word holding 42 bits of the key's
  hash and the worker's thread id, fetches the response, stores it, and
  clears the slot. Other workers that miss the same key see the slot held
  for their key and poll the store instead of going upstream. One slot per
  hash bucket and no probing: a key whose bucket is held for another key is
  simply not coalesced. A holder that died (its thread is gone, checked with
  `task_alive`) or that has held the slot longer than `STALE_FILL_US` can be
  taken over.
- Tag purge times. A purge by tag stores the purge time (CLOCK_REALTIME
  microseconds) in the tag's bucket, hard and soft separately. An entry that
  carries the tag and was requested before that time is invalid (hard) or
  stale (soft). Two tags that share a bucket purge each other's entries,
  which costs hits but never serves a purged entry.

Only the master's cache service writes tag purge times (one writer, plain
8-byte stores), workers read them with plain loads.

The tables live in the cache store's segment, after its arena
(`nexus.shm.cache`), so they are created, inherited and handed to a new
master together with the store. Layout, in 64-bit words from the table's
base offset:
    0                 fill_slots: number of fill slots, a power of two
    1                 tag_buckets: number of tag buckets, a power of two
    2                 epoch: bumped by every clear of the store
    3..7              (reserved)
    8                 fill slots: 2 words each, (hash tag << 22 | thread id), start time in us
    8 + 2 * slots     hard purge times, one word per tag bucket
    then              soft purge times, one word per tag bucket
"""

from __future__ import annotations

from nexus.shm import _native
from nexus.shm.segment import Segment

__all__ = ["CacheState", "STALE_FILL_US", "state_bytes"]

# A fill held longer than this is presumed abandoned and may be taken over,
# in microseconds: longer than any sane upstream total timeout.
STALE_FILL_US = 120_000_000

_TID_BITS = 22
_TID_MASK = (1 << _TID_BITS) - 1
_DATA_WORD = 8


def state_bytes(fill_slots: int, tag_buckets: int) -> int:
    """Return the bytes the tables take for these counts, which must be powers of two."""
    for name, value in (("fill_slots", fill_slots), ("tag_buckets", tag_buckets)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")
    return 8 * (_DATA_WORD + 2 * fill_slots + 2 * tag_buckets)


class CacheState:
    """Fill slots and tag purge times of one node, at `base` bytes into a shared segment."""

    def __init__(self, segment: Segment, base: int) -> None:
        self.segment = segment
        self._region = segment.region
        self._words = segment.words
        first = base // 8
        self.fill_slots, self.tag_buckets = self._words[first], self._words[first + 1]
        self._epoch = first + 2
        self._fills = first + _DATA_WORD
        self._hard = self._fills + 2 * self.fill_slots
        self._soft = self._hard + self.tag_buckets

    @staticmethod
    def initialise(segment: Segment, base: int, fill_slots: int, tag_buckets: int) -> None:
        """Write the geometry of new, zeroed tables at `base`."""
        segment.words[base // 8] = fill_slots
        segment.words[base // 8 + 1] = tag_buckets

    # Fill slots.

    def _fill_word(self, key_hash: int) -> tuple[int, int]:
        """Return the byte offset of the key's fill slot and the word a holder of this key writes there."""
        slot = key_hash & (self.fill_slots - 1)
        tag = (key_hash >> 22) & ((1 << 42) - 1)
        # The thread id is read per call: the master creates this object and workers fork from it.
        return 8 * (self._fills + 2 * slot), (tag << _TID_BITS) | (_native.thread_id() & _TID_MASK)

    def try_begin_fill(self, key_hash: int) -> int:
        """Take the fill slot of `key_hash` for this thread.

        Returns 1 if this thread now holds it, 0 if another live holder fills
        the same key (wait for it), and -1 if the slot is held for another key
        (do not coalesce).
        """
        offset, mine = self._fill_word(key_hash)
        region = self._region
        now = _native.realtime_us()
        for _ in range(2):
            holder = region.load(offset)
            if holder == 0:
                if region.cas(offset, 0, mine):
                    region.store(offset + 8, now)
                    return 1
                continue
            if holder >> _TID_BITS != mine >> _TID_BITS:
                return -1
            if self._is_abandoned(holder, region.load(offset + 8), now):
                if region.cas(offset, holder, mine):
                    region.store(offset + 8, now)
                    return 1
                continue
            return 0
        return 0

    def is_filling(self, key_hash: int) -> bool:
        """Return whether a live holder still fills `key_hash`."""
        offset, mine = self._fill_word(key_hash)
        holder = self._region.load(offset)
        if holder == 0 or holder >> _TID_BITS != mine >> _TID_BITS:
            return False
        return not self._is_abandoned(holder, self._region.load(offset + 8), _native.realtime_us())

    def end_fill(self, key_hash: int) -> None:
        """Release the fill slot of `key_hash` if this thread holds it."""
        offset, mine = self._fill_word(key_hash)
        self._region.cas(offset, mine, 0)

    @staticmethod
    def _is_abandoned(holder: int, started_us: int, now_us: int) -> bool:
        if started_us and now_us - started_us > STALE_FILL_US:
            return True
        return not _native.task_alive(holder & _TID_MASK)

    # Tag purge times.

    def tag_bucket(self, tag_hash: int) -> int:
        return tag_hash & (self.tag_buckets - 1)

    def purge_tag(self, bucket: int, soft: bool, at_us: int) -> None:
        """Record a purge of the tags in `bucket` at `at_us`; only the master's cache service calls this."""
        index = (self._soft if soft else self._hard) + bucket
        if self._words[index] < at_us:
            self._words[index] = at_us

    def tag_purged_at(self, bucket: int) -> tuple[int, int]:
        """Return (hard, soft) purge times of `bucket`, CLOCK_REALTIME microseconds, 0 for never."""
        return self._words[self._hard + bucket], self._words[self._soft + bucket]

    # Epoch.

    @property
    def epoch(self) -> int:
        return self._words[self._epoch]

    def bump_epoch(self) -> None:
        self._region.fetch_add(8 * self._epoch, 1)
