"""SharedState: every shared-memory table of one node, created together by the master.

The master creates all segments before it forks any worker, so workers
inherit the mappings. Each segment is a memfd whose file descriptor `fds()`
lists by name, ready to be handed to a new master process.

A config reload gives the new worker generation a SharedState of its own
(`renew`). The tables whose contents must survive a reload (rate limits,
quotas, the cache) are always the same segments. The tables whose geometry
follows the config are kept when the new config fits them and created anew
when it does not: the health table (one slot per upstream target), the
concurrency table (one row per upstream), the metric slots (one word per
counter of the metric layout) and the per-worker tables (worker table,
rings). Per-worker tables hold two banks of slots, one per generation that
may run at once, so the new generation boots in one bank while the old one
drains in the other.
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

__all__ = ["SharedState", "table_shape", "worker_slot_capacity"]

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
        return cls(
            health=HealthTable.create(len(table_shape(config)["targets"])),
            workers=WorkerTable.create(worker_slots),
            gcra=GcraTable.create(sizes.rate_limit_keys),
            quotas=QuotaTable.create(sizes.rate_limit_keys),
            rings=RingSet.create(worker_slots, sizes.event_ring_records),
            metrics=MetricSlots.create(layout, worker_slots),
            cache=CacheStore.create(sizes.cache_size, sizes.cache_entries, sizes.cache_max_object),
            concurrency=_create_concurrency(config, worker_slots),
        )

    @classmethod
    def create_for(cls, config: Config, layout: MetricLayout) -> SharedState:
        """Create every table for `config` with two banks of worker slots."""
        return cls.create(config, worker_slot_capacity(config.worker_count()), layout)

    def renew(self, previous: dict[str, list], config: Config, layout: MetricLayout) -> SharedState:
        """Return the tables for a new generation running `config`, reusing those that fit.

        `self` holds the tables made for `previous` (a `table_shape`). Rate
        limits, quotas and the cache are always these same segments (the
        caller warns when `config.shared_memory` asks for other sizes, which
        only a restart applies). The config-shaped tables are reused when
        `config` fits them and created anew when it does not.
        """
        slots = self.workers.slots
        # Reuse the per-worker tables only while a bank holds the new generation.
        keep_slots = config.worker_count() <= slots // 2
        if not keep_slots:
            slots = worker_slot_capacity(config.worker_count())

        shape = table_shape(config)
        health = self.health if previous["targets"] == shape["targets"] else HealthTable.create(len(shape["targets"]))
        same_rows = previous["upstreams"] == shape["upstreams"]
        same_layout = self.metrics.layout.fingerprint() == layout.fingerprint()
        return SharedState(
            health=health,
            workers=self.workers if keep_slots else WorkerTable.create(slots),
            gcra=self.gcra,
            quotas=self.quotas,
            rings=self.rings if keep_slots else RingSet.create(slots, config.shared_memory.event_ring_records),
            metrics=self.metrics if keep_slots and same_layout else MetricSlots.create(layout, slots),
            cache=self.cache,
            concurrency=self.concurrency if keep_slots and same_rows else _create_concurrency(config, slots),
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


def worker_slot_capacity(workers: int) -> int:
    """Slots of the per-worker tables for `workers` workers: two banks, for two generations."""
    return 2 * workers


def table_shape(config: Config) -> dict[str, list]:
    """What the config-shaped tables are made for, as JSON (it travels to a new master on upgrade).

    `targets` lists every [upstream, target URL] in health-table slot order
    (`nexus.upstream.target_slots`); `upstreams` the concurrency rows in order.
    """
    return {
        "targets": [[name, target.url] for name, upstream in config.upstreams.items() for target in upstream.target_list()],
        "upstreams": list(config.upstreams),
    }


def _create_concurrency(config: Config, worker_slots: int) -> ConcurrencyTable:
    """Create the concurrency table: one row per upstream, in `config.upstreams` order."""
    limits = [
        (name, None if upstream.concurrency is None else upstream.concurrency.initial_limit)
        for name, upstream in config.upstreams.items()
    ]
    return ConcurrencyTable.create(limits, worker_slots)
