"""Shared rate-limit tables: GCRA for rates with bursts, sliding windows for quotas.

Each table is one segment whose payload is laid out by
`nexus/shm/native/ratelimit.c` (read its header comment for the word-level
layout and the concurrency argument). In short: one slot per key, found by
open addressing on the key's 64-bit xxhash; a decision is one
compare-and-swap on the key's state word, so a limit holds exactly across
every worker of a node, and a process killed mid-decision leaves nothing
to repair. Slots of idle keys are taken over by new keys. When no slot can
be found (the table is full within the probe limit) the decision fails
open, which is counted and exported, because refusing traffic for lack of
table space would turn a sizing mistake into an outage.

Slots are 8 words. Besides the decision state they carry what the master
needs to sync a key with other nodes through Redis (`nexus.redis_sync`):
the limit's parameters, an allowance leased from Redis, other nodes'
counts, and a dirty word the master's scan collects. The sync mode in the
control line makes decisions local, leased (connected) or split among the
live nodes (disconnected).

Geometry in the segment header: word 4 = slot count (a power of two).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from typing import NamedTuple

import xxhash

from nexus.shm import _native
from nexus.shm.segment import HEADER_BYTES, Segment

__all__ = ["Decision", "GcraTable", "Outcome", "QuotaTable", "SyncMode", "TableUsage", "key_hash"]

# A table is sized so that it is at most half full at its nominal key count:
# linear probing stays short, and idle slots are there to be reclaimed.
_LOAD_FACTOR = 2
_MIN_SLOTS = 64
_CONTROL_BYTES = 64


class Outcome(enum.IntEnum):
    """The outcome of a table decision, with the codes the C functions return."""

    ALLOWED = 0
    DENIED = 1
    FAILED_OPEN = 2


class SyncMode(enum.IntEnum):
    """Sync mode of decisions, stored in control word 4 with the live node count."""

    LOCAL = 0
    CONNECTED = 1
    DISCONNECTED = 2


# Control words of a table, after the insert lock and the usage counters.
_CONTROL_SYNC = 4


class Decision(NamedTuple):
    """One decision: `wait_us` is the time until the key is fully replenished
    when allowed (for a quota, the end of the next window, when this
    window's count has slid out), and the time after which the same request
    would be allowed when denied."""

    outcome: int
    remaining: int
    wait_us: int


class TableUsage(NamedTuple):
    """Occupancy and counters of one table, for metrics."""

    slots: int
    occupied: int
    failed_open: int
    reclaimed: int
    inserted: int


def key_hash(*parts: str | bytes) -> int:
    """Hash the parts of a rate-limit key (policy name, client id, ...) to 64 bits.

    Parts are joined with a 0 byte so ("ab", "c") and ("a", "bc") differ.
    """
    try:
        # The common case, all strings: one join and one encode.
        joined = "\0".join(parts).encode()  # type: ignore[arg-type]
    except TypeError:
        joined = b"\0".join(part.encode() if isinstance(part, str) else part for part in parts)
    return xxhash.xxh3_64_intdigest(joined)


def _slots_for(keys: int) -> int:
    wanted = max(keys * _LOAD_FACTOR, _MIN_SLOTS)
    return 1 << (wanted - 1).bit_length()


class _KeyedTable:
    """A segment holding one rate-limit table of `slots` slots."""

    KIND = b""
    # Layout 2: 8-word slots with sync words, sync mode in control word 4.
    LAYOUT = 2
    SLOT_WORDS = 8
    # The slot word that marks a key dirty for the master's scan.
    DIRTY_WORD = 0

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.slots = segment.geometry[0]
        self._region = segment.region
        self._offset = HEADER_BYTES

    @classmethod
    def create(cls, keys: int):
        """Create a table for about `keys` concurrently active keys."""
        if keys < 1:
            raise ValueError(f"a rate-limit table needs room for at least 1 key, got {keys}")
        slots = _slots_for(keys)
        payload = _CONTROL_BYTES + slots * cls.SLOT_WORDS * 8
        return cls(Segment.create(cls.KIND, cls.LAYOUT, payload, geometry=(slots,)))

    @classmethod
    def attach(cls, fd: int):
        """Map the table in segment `fd`, checking its kind and layout version."""
        return cls(Segment.attach(fd, cls.KIND, cls.LAYOUT))

    def usage(self) -> TableUsage:
        occupied, failed_open, reclaimed, inserted = _native.table_usage(
            self._region, self._offset, self.slots, self.SLOT_WORDS
        )
        return TableUsage(self.slots, occupied, failed_open, reclaimed, inserted)

    def set_sync(self, mode: SyncMode, live_nodes: int) -> None:
        """Set how decisions use the sync words, and the live node count that shares are computed with."""
        self.control(_CONTROL_SYNC, (max(1, live_nodes) << 8) | int(mode))

    def sync(self) -> tuple[SyncMode, int]:
        """Return the sync mode and live node count that decisions use now."""
        word = self.control(_CONTROL_SYNC)
        return SyncMode(word & 0xFF), max(1, word >> 8)

    def control(self, index: int, value: int | None = None) -> int:
        """Read control word `index` (4 to 7), or store `value` and return the old one."""
        if value is None:
            return _native.table_control(self._region, self._offset, self.slots, index)
        return _native.table_control(self._region, self._offset, self.slots, index, value)

    def collect(self) -> list[tuple[int, ...]]:
        """Return (slot index, word 0, ..., word 7) of every dirty slot and clear its dirty word."""
        return _native.table_collect(self._region, self._offset, self.slots, self.DIRTY_WORD)

    @property
    def size_bytes(self) -> int:
        return len(self.segment.mapping)

    def close(self) -> None:
        self.segment.close()


class GcraTable(_KeyedTable):
    """Generic cell rate algorithm: `rate` per second with bursts up to `burst`.

    Admitted requests for one key never exceed burst + rate x elapsed time,
    however many processes decide at once.
    """

    KIND = b"gcra"
    DIRTY_WORD = 5

    def acquire(self, key: int, interval_us: int, limit_us: int, cost: int = 1, now_us: int = 0) -> Decision:
        """Decide one request of `cost` for the hashed `key`.

        `interval_us` is 1e6 / rate and `limit_us` is burst x interval_us.
        `now_us` is CLOCK_MONOTONIC in microseconds; 0 reads the clock.
        """
        return Decision(*_native.gcra_acquire(self._region, self._offset, self.slots, key, interval_us, limit_us, cost, now_us))

    def acquire_raw(self) -> Callable[[int, int, int, int, int], tuple[int, int, int]]:
        """Return a function (key, interval_us, limit_us, cost, now_us) -> (outcome, remaining, wait_us).

        The same decision as `acquire`, without building a Decision, for the request path.
        """
        return functools.partial(_native.gcra_acquire, self._region, self._offset, self.slots)

    def release(self, key: int, interval_us: int, cost: int = 1) -> bool:
        """Give back an admission of `cost` (a later limit rejected the request); False if the key is gone."""
        return _native.gcra_release(self._region, self._offset, self.slots, key, interval_us, cost)

    def grant(self, index: int, key: int, tokens: int) -> bool:
        """Add leased tokens to the allowance of `key` in slot `index`; False if the slot changed hands."""
        return _native.gcra_grant(self._region, self._offset, self.slots, index, key, tokens)


class QuotaTable(_KeyedTable):
    """Sliding-window counters for quotas of `limit` per window.

    The estimate weighs the previous window's count by the share of it that
    still overlaps the sliding window. Windows are aligned to wall-clock
    time (CLOCK_REALTIME), so nodes agree on where a window starts.
    """

    KIND = b"quota"
    DIRTY_WORD = 7

    def acquire(self, key: int, window_us: int, limit: int, cost: int = 1, now_us: int = 0) -> Decision:
        """Decide one request of `cost` against `limit` per `window_us`.

        `now_us` is CLOCK_REALTIME in microseconds; 0 reads the clock.
        """
        return Decision(*_native.quota_acquire(self._region, self._offset, self.slots, key, window_us, limit, cost, now_us))

    def acquire_raw(self) -> Callable[[int, int, int, int, int], tuple[int, int, int]]:
        """Return a function (key, window_us, limit, cost, now_us) -> (outcome, remaining, wait_us).

        The same decision as `acquire`, without building a Decision, for the request path.
        """
        return functools.partial(_native.quota_acquire, self._region, self._offset, self.slots)

    def release(self, key: int, window_us: int, cost: int = 1, now_us: int = 0) -> bool:
        """Give back an admission of `cost` made at `now_us` (0 reads the clock); False if its window has passed."""
        return _native.quota_release(self._region, self._offset, self.slots, key, window_us, cost, now_us)

    def grant(self, index: int, key: int, window: int, remote_now: int, remote_before: int, count: int) -> bool:
        """Store other nodes' counts for `window` and the window before, and add `count` to the allowance.

        Returns False if slot `index` no longer contains `key` or has moved past `window`.
        """
        return _native.quota_grant(
            self._region, self._offset, self.slots, index, key, window, remote_now, remote_before, count
        )
