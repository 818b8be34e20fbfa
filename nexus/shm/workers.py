"""Worker table: one slot per worker, written by that worker, read by the master.

The master uses it for liveness (a heartbeat the worker refreshes every
second) and readiness (the worker's state moves to SERVING once granian
accepts connections). Each word has one writer: the worker in its slot,
except `pid` and `generation`, which the master writes before it forks.

    0  pid             process id of the worker in this slot
    1  generation      worker generation; a reload starts a new one
    2  state           a WorkerState value
    3  heartbeat_ns    time.monotonic_ns() of the worker's last heartbeat
    4  cpu             the CPU the worker is pinned to
    5  requests        requests this worker process has finished
    6  started_ns      time.time_ns() when the worker was forked
    7  (reserved)
"""

from __future__ import annotations

import enum

from nexus.shm.segment import SlotTable

__all__ = ["WorkerState", "WorkerTable"]


class WorkerState(enum.IntEnum):
    """Lifecycle state of a worker process, as recorded in the worker table."""

    EMPTY = 0
    BOOTING = 1
    SERVING = 2
    DRAINING = 3
    EXITED = 4


class WorkerTable(SlotTable):
    """Per-worker pid, state, heartbeat and request count in shared memory."""

    KIND = b"workers"
    LAYOUT = 1
    SLOT_WORDS = 8

    def _offset(self, slot: int, word: int) -> int:
        return self._base + slot * self.SLOT_WORDS + word

    def reset(self, slot: int, pid: int, generation: int, cpu: int, started_ns: int) -> None:
        """Prepare a slot for a newly forked worker (master side)."""
        self._words[self._offset(slot, 2)] = WorkerState.BOOTING
        self._words[self._offset(slot, 3)] = 0
        self._words[self._offset(slot, 5)] = 0
        self._words[self._offset(slot, 0)] = pid
        self._words[self._offset(slot, 1)] = generation
        self._words[self._offset(slot, 4)] = cpu
        self._words[self._offset(slot, 6)] = started_ns

    def pid(self, slot: int) -> int:
        return self._words[self._offset(slot, 0)]

    def set_pid(self, slot: int, pid: int) -> None:
        """Record the forked worker's pid (master side, after `reset`)."""
        self._words[self._offset(slot, 0)] = pid

    def generation(self, slot: int) -> int:
        return self._words[self._offset(slot, 1)]

    def started_ns(self, slot: int) -> int:
        return self._words[self._offset(slot, 6)]

    def set_state(self, slot: int, state: WorkerState) -> None:
        self._words[self._offset(slot, 2)] = state

    def state(self, slot: int) -> WorkerState:
        return WorkerState(self._words[self._offset(slot, 2)])

    def beat(self, slot: int, now_ns: int) -> None:
        self._words[self._offset(slot, 3)] = now_ns

    def heartbeat_ns(self, slot: int) -> int:
        return self._words[self._offset(slot, 3)]

    def add_requests(self, slot: int, count: int) -> None:
        """Add to the slot's request count; only the slot's own worker calls this."""
        offset = self._offset(slot, 5)
        self._words[offset] = self._words[offset] + count

    def requests(self, slot: int) -> int:
        return self._words[self._offset(slot, 5)]
