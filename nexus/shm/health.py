"""Target health table: written by the master's health checker, read by workers.

One slot of eight 64-bit words per upstream target, indexed by the target's
global slot number (`nexus.upstream.target_slots`). A zeroed slot means "up", so a
target is in rotation from the start and a checker that has not probed yet
takes nothing out. Only the master writes; workers only read, so each word
is a single aligned store and no lock is needed.

    0  flags          bit 0 set = marked down by active health checks
    1  probe_streak   consecutive same-result probes (positive: successes, negative stored as 2**64 - n)
    2  checked_at_ns  wall-clock time of the last probe, from time.time_ns()
    3  latency_us     duration of the last successful probe, in microseconds
    4  ewma_us        moving average of successful probe durations, in microseconds
                      (each probe weighs EWMA_WEIGHT); 0 until the first success
    5  probes         probes sent, ever
    6  failures       probes that failed, ever
    7  (reserved)
"""

from __future__ import annotations

from nexus.shm.segment import SlotTable

__all__ = ["HealthTable"]

_DOWN = 1

# Weight of the newest probe in the latency average: with probes every
# 250 ms, a change in latency shows half its size after about 0.5 s.
EWMA_WEIGHT = 0.3


class HealthTable(SlotTable):
    """Shared up/down state and last probe result for every upstream target."""

    KIND = b"health"
    LAYOUT = 2
    SLOT_WORDS = 8

    def is_up(self, slot: int) -> bool:
        return not self._words[self._base + slot * self.SLOT_WORDS] & _DOWN

    def set_up(self, slot: int, up: bool) -> None:
        self._words[self._base + slot * self.SLOT_WORDS] = 0 if up else _DOWN

    def record_probe(self, slot: int, streak: int, checked_at_ns: int, latency_us: int) -> None:
        """Store the last probe's result; `streak` is negative for failures."""
        base = self._base + slot * self.SLOT_WORDS
        words = self._words
        words[base + 1] = streak & 0xFFFF_FFFF_FFFF_FFFF
        words[base + 2] = checked_at_ns
        words[base + 3] = latency_us
        words[base + 5] += 1
        if streak < 0:
            words[base + 6] += 1
        elif latency_us > 0:
            previous = words[base + 4]
            words[base + 4] = latency_us if previous == 0 else round(previous + EWMA_WEIGHT * (latency_us - previous))

    def latency_ewma_us(self, slot: int) -> int:
        """Moving average of probe durations in microseconds; 0 before the first successful probe."""
        return self._words[self._base + slot * self.SLOT_WORDS + 4]

    def probe_counts(self, slot: int) -> tuple[int, int]:
        """Return (probes sent, probes failed) since the table was created."""
        base = self._base + slot * self.SLOT_WORDS
        return self._words[base + 5], self._words[base + 6]

    def probe(self, slot: int) -> tuple[int, int, int]:
        """Return (streak, checked_at_ns, latency_us) of the last probe."""
        base = self._base + slot * self.SLOT_WORDS
        streak = self._words[base + 1]
        if streak >= 1 << 63:
            streak -= 1 << 64
        return streak, self._words[base + 2], self._words[base + 3]
