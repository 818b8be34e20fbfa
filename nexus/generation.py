"""Worker generations: the workers started from one config, and the master's record of each worker.

A generation is the set of workers the master started for one config, with
the shared tables, listening sockets and health checker they use. A reload
starts generation N+1 next to generation N and drains N once every worker
of N+1 serves; an upgrade does the same across two master processes. While
both run, each uses its own bank of worker slots (`nexus.shm.state`), so
their per-worker table entries never overlap.

A generation moves BOOTING -> ACTIVE -> DRAINING -> GONE, or BOOTING ->
GONE when it never became ready. This module holds the records and the
allowed moves; the master (`nexus.master`) decides and acts.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from nexus.config import Config
from nexus.health import HealthChecker
from nexus.listeners import Listener
from nexus.shm.metrics import MetricLayout
from nexus.shm.state import SharedState

__all__ = ["Counters", "Generation", "GenerationState", "SlotRestarts", "Worker"]


class GenerationState(enum.Enum):
    BOOTING = "booting"
    ACTIVE = "active"
    DRAINING = "draining"
    GONE = "gone"


_MOVES = {
    GenerationState.BOOTING: {GenerationState.ACTIVE, GenerationState.GONE},
    GenerationState.ACTIVE: {GenerationState.DRAINING},
    GenerationState.DRAINING: {GenerationState.GONE},
    GenerationState.GONE: set(),
}


@dataclass(eq=False)
class Generation:
    """The workers of one config, and what they share."""

    number: int
    config: Config
    config_hash: str
    shared: SharedState
    metric_layout: MetricLayout
    # Worker slots of this generation in its per-worker tables.
    slots: range
    listeners: list[Listener]
    health_checker: HealthChecker | None
    state: GenerationState = GenerationState.BOOTING
    # time.monotonic() when draining workers get SIGTERM, and when SIGKILL.
    term_at: float = 0.0
    kill_at: float = 0.0
    term_sent: bool = False
    # Why a BOOTING generation cannot become active, once known.
    failure: str | None = None

    def move(self, state: GenerationState) -> None:
        """Change state, or raise RuntimeError on a move the lifecycle does not allow."""
        if state not in _MOVES[self.state]:
            raise RuntimeError(f"generation {self.number} cannot move from {self.state.value} to {state.value}")
        self.state = state


@dataclass(slots=True, eq=False)
class Worker:
    """The master's record of one forked worker process."""

    pid: int
    slot: int
    generation: Generation
    cpu: int | None
    started: float  # time.monotonic() at fork
    kill_sent: bool = False


@dataclass(slots=True)
class SlotRestarts:
    """Restart bookkeeping for one worker slot, across the processes that fill it."""

    crashes: int = 0
    restart_at: float = 0.0
    restarts: int = 0


@dataclass
class Counters:
    """The master's lifetime counts, carried over to a new master on upgrade."""

    started_at: float  # Unix seconds when the first master of this node started
    worker_restarts: int = 0
    reloads: int = 0
    reloads_failed: int = 0
    upgrades_failed: int = 0
