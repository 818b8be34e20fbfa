"""Target health table: written by the master's health checker, read by workers.

One slot of four 64-bit words per upstream target, indexed by the target's
global slot number (`nexus.upstream_slots`). A zeroed slot means "up", so a
target is in rotation from the start and a checker that has not probed yet
takes nothing out. Only the master writes; workers only read, so each word
is a single aligned store and no lock is needed.

    0  flags          bit 0 set = marked down by active health checks
    1  probe_streak   consecutive same-result probes (positive: successes, negative stored as 2**64 - n)
    2  checked_at_ns  wall-clock time of the last probe, from time.time_ns()
    3  latency_us     duration of the last successful probe, in microseconds
"""

from __future__ import annotations

from nexus.shm.segment import Segment

__all__ = ["HealthTable"]

_KIND = b"health"
_LAYOUT = 1
_SLOT_WORDS = 4
_DOWN = 1


class HealthTable:
    """Shared up/down state and last probe result for every upstream target."""

    def __init__(self, segment: Segment, slots: int) -> None:
        self.segment = segment
        self.slots = slots
        self._words = segment.words
        self._base = segment.payload_offset_words

    @classmethod
    def create(cls, slots: int) -> HealthTable:
        return cls(Segment.create(_KIND, _LAYOUT, max(slots, 1) * _SLOT_WORDS * 8), slots)

    @classmethod
    def attach(cls, fd: int, slots: int) -> HealthTable:
        return cls(Segment.attach(fd, _KIND, _LAYOUT), slots)

    def is_up(self, slot: int) -> bool:
        return not self._words[self._base + slot * _SLOT_WORDS] & _DOWN

    def set_up(self, slot: int, up: bool) -> None:
        self._words[self._base + slot * _SLOT_WORDS] = 0 if up else _DOWN

    def record_probe(self, slot: int, streak: int, checked_at_ns: int, latency_us: int) -> None:
        """Store the last probe's result; `streak` is negative for failures."""
        base = self._base + slot * _SLOT_WORDS
        self._words[base + 1] = streak & 0xFFFF_FFFF_FFFF_FFFF
        self._words[base + 2] = checked_at_ns
        self._words[base + 3] = latency_us

    def probe(self, slot: int) -> tuple[int, int, int]:
        """Return (streak, checked_at_ns, latency_us) of the last probe."""
        base = self._base + slot * _SLOT_WORDS
        streak = self._words[base + 1]
        if streak >= 1 << 63:
            streak -= 1 << 64
        return streak, self._words[base + 2], self._words[base + 3]
