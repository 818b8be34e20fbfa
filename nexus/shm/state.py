"""SharedState: every shared-memory table of one node, created together by the master.

The master creates all segments before it forks any worker, so workers
inherit the mappings. Each segment is a memfd whose file descriptor `fds()`
lists by name, ready to be handed to a new master process.
"""

from __future__ import annotations

from dataclasses import dataclass

from nexus.config import Config
from nexus.shm.cache import CacheStore
from nexus.shm.concurrency import ConcurrencyTable
from nexus.shm.health import HealthTable
from nexus.shm.metrics import MetricLayout, MetricSlots
from nexus.shm.ratelimit import GcraTable, QuotaTable
from nexus.shm.ring import RingSet
from nexus.shm.workers import WorkerTable

__all__ = ["SharedState"]

_TABLES = ("health", "workers", "gcra", "quotas", "rings", "metrics", "cache", "concurrency")

@dataclass
class SharedState:
    """The node's shared tables, indexed by worker slot where per-worker."""

    health: HealthTable
    workers: WorkerTable
    gcra: GcraTable
    quotas: QuotaTable
    rings: RingSet
    metrics: MetricSlots
    cache: CacheStore
    concurrency: ConcurrencyTable

    @classmethod
    def create(cls, config: Config, worker_slots: int, layout: MetricLayout) -> SharedState:
        """Create every table for `config`, with `worker_slots` per-worker slots.

        The concurrency table has one row per upstream, in `config.upstreams`
        order, so an upstream's position there is its row index.
        """
        sizes = config.shared_memory
        total_targets = sum(len(upstream.targets) for upstream in config.upstreams.values())
        limits = [
            (name, None if upstream.concurrency is None else upstream.concurrency.initial_limit)
            for name, upstream in config.upstreams.items()
        ]
        return cls(
            health=HealthTable.create(total_targets),
            workers=WorkerTable.create(worker_slots),
            gcra=GcraTable.create(sizes.rate_limit_keys),
            quotas=QuotaTable.create(sizes.rate_limit_keys),
            rings=RingSet.create(worker_slots, sizes.event_ring_records),
            metrics=MetricSlots.create(layout, worker_slots),
            cache=CacheStore.create(sizes.cache_size, sizes.cache_entries, sizes.cache_max_object),
            concurrency=ConcurrencyTable.create(limits, worker_slots),
        )

    @classmethod
    def attach(cls, fds: dict[str, int], layout: MetricLayout) -> SharedState:
        """Map the tables another master created, from their file descriptors by name.

        Each table checks its header (kind, layout version, geometry), so a
        master built with different layouts refuses them instead of
        misreading them.
        """
        missing = sorted(set(_TABLES) - set(fds))
        if missing:
            raise ValueError(f"shared state is missing the tables {', '.join(missing)}")
        return cls(
            health=HealthTable.attach(fds["health"]),
            workers=WorkerTable.attach(fds["workers"]),
            gcra=GcraTable.attach(fds["gcra"]),
            quotas=QuotaTable.attach(fds["quotas"]),
            rings=RingSet.attach(fds["rings"]),
            metrics=MetricSlots.attach(fds["metrics"], layout),
            cache=CacheStore.attach(fds["cache"]),
            concurrency=ConcurrencyTable.attach(fds["concurrency"]),
        )

    def tables(self) -> dict[str, object]:
        return {
            "health": self.health,
            "workers": self.workers,
            "gcra": self.gcra,
            "quotas": self.quotas,
            "rings": self.rings,
            "metrics": self.metrics,
            "cache": self.cache,
            "concurrency": self.concurrency,
        }

    def fds(self) -> dict[str, int]:
        """The memfd of each table, by name, for handing the state to a new master."""
        return {name: table.segment.fd for name, table in self.tables().items()}

    def sizes(self) -> dict[str, int]:
        """Mapped bytes of each table, by name, for metrics and status."""
        return {name: len(table.segment.mapping) for name, table in self.tables().items()}

    def close(self) -> None:
        for table in self.tables().values():
            table.segment.close()
