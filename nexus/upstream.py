"""Upstream pools inside a worker: target choice, passive ejection, retry budget.

A worker has one UpstreamPool per configured upstream. The pool decides
which target gets a try: a target must be up in the shared health table
(written by the master's active checks) and not ejected by this worker's
passive checks; the balancer picks among those. The pool also owns the
keep-alive connections to each target (`nexus.http1_client`), the cap on
requests in flight (`max_connections`), the retry budget and, for an
upstream with a `concurrency` section, the worker's side of its adaptive
concurrency limit (`nexus.concurrency`). Sending requests is
`nexus.proxy`'s job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from nexus.balance import TargetState, make_balancer
from nexus.concurrency import ConcurrencyLimiter
from nexus.config import Config, Upstream
from nexus.errors import NoHealthyTarget
from nexus.http1_client import TargetConnections
from nexus.shm.concurrency import ConcurrencyTable
from nexus.shm.health import HealthTable
from nexus.telemetry import TryCounter

__all__ = ["UpstreamPool", "target_slots"]

log = logging.getLogger("nexus.upstream")


def target_slots(config: Config) -> dict[str, int]:
    """Return each upstream's first slot in the health table, in config order."""
    slots: dict[str, int] = {}
    next_slot = 0
    for name, upstream in config.upstreams.items():
        slots[name] = next_slot
        next_slot += len(upstream.targets)
    return slots


@dataclass(slots=True)
class _Ejection:
    """Passive health of one target, as this worker has seen it."""

    consecutive_failures: int = 0
    ejected_until: float = 0.0


class UpstreamPool:
    """The targets of one upstream, with the state one worker keeps about them."""

    def __init__(
        self,
        name: str,
        spec: Upstream,
        health: HealthTable,
        first_slot: int,
        worker_id: int,
        concurrency: ConcurrencyTable | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.targets = [
            TargetState(index=i, url=target.url.rstrip("/"), weight=target.weight)
            for i, target in enumerate(spec.target_list())
        ]
        self.balancer = make_balancer(spec.balance, self.targets, hash_balance_factor=spec.hash_balance_factor)
        # One TargetConnections per target, by index; made by start() in the worker's loop.
        self.connections: list[TargetConnections] = []
        # Requests in flight to this upstream are capped at max_connections;
        # a request over the cap waits for a slot, within its header timeout.
        self.slots: asyncio.Semaphore | None = None
        self.in_flight = 0
        self.retries_in_flight = 0
        self._health = health
        self._first_slot = first_slot
        self._ejections = [_Ejection() for _ in self.targets]
        self._worker_id = worker_id
        # Whether the last choice found no target up and chose among all (logged once per spell).
        self._failing_open = False
        # p2c_ewma starts a target with no request latency of its own from the
        # probes' average in the shared health table, so a new worker does not
        # treat a slow target and a fast one alike.
        self._unseeded = list(self.targets) if spec.balance == "p2c_ewma" else []
        self.limiter = self._make_limiter(concurrency) if spec.concurrency is not None else None
        # Counts tries, retries and ejections in the metric slots (nexus.telemetry.TryCounter); set by the gateway.
        self.tries: TryCounter | None = None

    def _make_limiter(self, table: ConcurrencyTable | None) -> ConcurrencyLimiter:
        """Create this worker's limiter and reclaim the slots that a dead predecessor in its slot left taken.

        Runs in the worker process of slot `worker_id`, which the master
        forks only after reaping the slot's previous process.
        """
        assert self.spec.concurrency is not None
        if table is None:
            raise RuntimeError(
                f"upstream {self.name!r} has a concurrency limit but no shared concurrency table: "
                "pass SharedState.concurrency to UpstreamPool"
            )
        index = table.index_of(self.name)
        reclaimed = table.reclaim(index, self._worker_id)
        if reclaimed:
            log.warning(
                "reclaimed concurrency slots left by a previous worker worker=%d upstream=%s slots=%d",
                self._worker_id,
                self.name,
                reclaimed,
            )
        return ConcurrencyLimiter(table, index, self._worker_id, self.spec.concurrency, self.name)

    async def start(self) -> None:
        """Create the connection pools; must run inside the worker's event loop."""
        connect_timeout = self.spec.timeouts.connect
        self.connections = []
        for target in self.targets:
            parts = urlsplit(target.url)
            assert parts.hostname is not None and parts.port is not None  # checked by the config
            self.connections.append(TargetConnections(parts.hostname, parts.port, connect_timeout))
        self.slots = asyncio.Semaphore(self.spec.max_connections)

    async def close(self) -> None:
        for connections in self.connections:
            connections.close()
        self.connections = []

    def candidates(self, exclude: set[int]) -> list[int]:
        """Return the indexes of targets that may take a try now."""
        now = time.monotonic()
        return [
            target.index
            for target in self.targets
            if target.index not in exclude
            and self._health.is_up(self._first_slot + target.index)
            and self._ejections[target.index].ejected_until <= now
        ]

    def choose(self, key: bytes | None, exclude: set[int]) -> TargetState:
        """Pick the target for the next try, or raise NoHealthyTarget."""
        candidates = self.candidates(exclude)
        if self._unseeded:
            self._seed_latency()
        if not candidates:
            candidates = self._fail_open(exclude)
        elif self._failing_open:
            self._failing_open = False
            log.info("a target is up again: requests go to healthy targets only worker=%d upstream=%s", self._worker_id, self.name)
        if not candidates:
            tried = f" ({len(exclude)} already tried)" if exclude else ""
            raise NoHealthyTarget(f"upstream {self.name!r} has no healthy target{tried}", upstream=self.name)
        return self.targets[self.balancer.pick(candidates, key)]

    def _fail_open(self, exclude: set[int]) -> list[int]:
        """With no target up, return every target not tried yet (health.fail_open), else none.

        Health checks that are too strict, or a probe path that broke while
        the service works, would otherwise take the whole upstream out of
        service. Failing open turns a real outage into upstream errors
        (502, 504) rather than 503s, which retries and passive ejection
        still limit.
        """
        # Without active checks only passive ejections take targets out,
        # and those fail open as well.
        if self.spec.health is not None and not self.spec.health.fail_open:
            return []
        if not self._failing_open:
            self._failing_open = True
            log.warning(
                "no target is up: sending requests to all targets until one is (health.fail_open) worker=%d upstream=%s",
                self._worker_id,
                self.name,
            )
        return [target.index for target in self.targets if target.index not in exclude]

    def _seed_latency(self) -> None:
        """Give targets without a latency sample the probes' moving average, once it exists."""
        waiting = []
        for target in self._unseeded:
            if target.ewma_seconds != 0.0:
                continue
            probe_us = self._health.latency_ewma_us(self._first_slot + target.index)
            if probe_us:
                target.ewma_seconds = probe_us / 1e6
            else:
                waiting.append(target)
        self._unseeded = waiting

    def can_retry(self) -> bool:
        """Return whether the retry budget allows one more retry in flight.

        Retries in flight are capped at max(min_concurrent, budget x requests
        in flight), so a failing upstream gets a bounded share of extra load
        instead of a retry storm.
        """
        policy = self.spec.retries
        allowed = max(policy.min_concurrent, int(policy.budget * self.in_flight))
        return self.retries_in_flight < allowed

    def record_success(self, target: TargetState) -> None:
        self._ejections[target.index].consecutive_failures = 0
        if self.tries is not None:
            self.tries.succeeded(target.index)

    def record_retry(self) -> None:
        if self.tries is not None:
            self.tries.retried()

    def record_failure(self, target: TargetState, reason: str) -> None:
        """Count a failed try and eject the target after too many in a row."""
        if self.tries is not None:
            self.tries.failed(target.index, reason)
        ejection = self._ejections[target.index]
        ejection.consecutive_failures += 1
        passive = self.spec.passive
        if ejection.consecutive_failures < passive.consecutive_failures:
            return
        ejection.consecutive_failures = 0
        ejection.ejected_until = time.monotonic() + passive.eject_for
        if self.tries is not None:
            self.tries.ejected(target.index)
        log.warning(
            "ejected target worker=%d upstream=%s target=%s reason=%s eject_for_s=%.3f",
            self._worker_id,
            self.name,
            target.url,
            reason,
            passive.eject_for,
        )
