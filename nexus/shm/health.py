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

from nexus.shm.segment import SlotTable

__all__ = ["HealthTable"]

_DOWN = 1


class HealthTable(SlotTable):
    """Shared up/down state and last probe result for every upstream target."""

    KIND = b"health"
    LAYOUT = 1
    SLOT_WORDS = 4

    def is_up(self, slot: int) -> bool:
        return not self._words[self._base + slot * self.SLOT_WORDS] & _DOWN

    def set_up(self, slot: int, up: bool) -> None:
        self._words[self._base + slot * self.SLOT_WORDS] = 0 if up else _DOWN

    def record_probe(self, slot: int, streak: int, checked_at_ns: int, latency_us: int) -> None:
        """Store the last probe's result; `streak` is negative for failures."""
        base = self._base + slot * self.SLOT_WORDS
        self._words[base + 1] = streak & 0xFFFF_FFFF_FFFF_FFFF
        self._words[base + 2] = checked_at_ns
        self._words[base + 3] = latency_us

    def probe(self, slot: int) -> tuple[int, int, int]:
        """Return (streak, checked_at_ns, latency_us) of the last probe."""
        base = self._base + slot * self.SLOT_WORDS
        streak = self._words[base + 1]
        if streak >= 1 << 63:
            streak -= 1 << 64
        return streak, self._words[base + 2], self._words[base + 3]
