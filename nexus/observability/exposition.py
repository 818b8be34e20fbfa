"""The Prometheus collector: sums the workers' metric slots and reads the other shared tables.

Workers count in shared memory (`nexus.telemetry`); nothing here runs on
the request path. At each scrape the collector sums every worker block of
every metric segment it is given, the current generation's and the retired
ones', so a counter never goes backwards: a killed worker's counts stay in
its block, and a retired generation's segment keeps its totals. Gauges
come from the health, concurrency, cache, ring, worker and rate-limit
tables, and from the master's counters.

Names follow the Prometheus conventions: the `nexus_` prefix, base units
(seconds, bytes), `_total` on counters. Labels are bounded by the config
(route, upstream, target, policy) and never name a consumer or a path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from nexus import __version__
from nexus.config import Config
from nexus.shm.metrics import SlotSums
from nexus.shm.state import SharedState
from nexus.shm.workers import WorkerState
from nexus.telemetry import SERVED_FROM_CACHE, TRY_OUTCOMES
from nexus.upstream import target_slots

__all__ = ["NexusCollector"]


def _seconds_buckets(bounds_ns: tuple[int, ...], buckets: list[int]) -> list[tuple[str, int]]:
    """Turn non-cumulative nanosecond buckets into Prometheus' cumulative `le` buckets in seconds."""
    result = []
    running = 0
    for bound, count in zip(bounds_ns, buckets):
        running += count
        result.append((repr(bound / 1e9), running))
    running += buckets[-1]
    result.append(("+Inf", running))
    return result


class NexusCollector:
    """A prometheus_client collector over the node's shared memory.

    `sums` returns the metric slots summed over every worker block of every
    metric segment (`master.metric_sums()`).
    `master_counters` returns the master's counters (`master.counters()`:
    worker_restarts, reloads, reloads_failed, generation, started_at).
    `extra` returns further families, such as the access log's counters.
    """

    def __init__(
        self,
        config: Config,
        shared: SharedState,
        sums: Callable[[], SlotSums],
        master_counters: Callable[[], dict[str, Any]] | None = None,
        extra: Callable[[], Iterator[Metric]] | None = None,
    ) -> None:
        self.config = config
        self.shared = shared
        self._sums = sums
        self._master_counters = master_counters
        self._extra = extra

    def describe(self) -> list[Metric]:
        # No describe pass at registration: the families depend on the config.
        return []

    def collect(self) -> Iterator[Metric]:
        sums = self._sums()
        yield from self._requests(sums)
        yield from self._rate_limits(sums)
        yield from self._upstreams(sums)
        yield from self._cache(sums)
        yield from self._tables_usage()
        yield from self._redis()
        yield from self._workers()
        info = GaugeMetricFamily("nexus_build_info", "The running Nexus version; always 1.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        if self._extra is not None:
            yield from self._extra()

    def _requests(self, sums: SlotSums) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "nexus_http_requests",
            "Downstream requests answered, by route, method class (safe: GET, HEAD, OPTIONS, TRACE) and status class.",
            labels=["route", "method_class", "status_class"],
        )
        for key, value in sums.counters.items():
            if key[0] == "requests":
                requests.add_metric(list(key[1:]), value)
        yield requests
        durations = HistogramMetricFamily(
            "nexus_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by route.",
            labels=["route"],
        )
        upstream = HistogramMetricFamily(
            "nexus_upstream_request_duration_seconds",
            "Time from a request's arrival to the response head of the target that answered, "
            "retries and concurrency queueing included.",
            labels=["upstream", "target"],
        )
        families = {("duration", 2): durations, ("upstream_duration", 3): upstream}
        for key, (bounds, buckets, total) in sums.histograms.items():
            # A table from a master of an older version, still mapped after an
            # upgrade, may key a histogram by fewer labels; it is left out.
            family = families.get((key[0], len(key)))
            if family is not None:
                family.add_metric(list(key[1:]), _seconds_buckets(bounds, buckets), total / 1e9)
        yield durations
        yield upstream

    def _rate_limits(self, sums: SlotSums) -> Iterator[Metric]:
        decisions = CounterMetricFamily(
            "nexus_ratelimit_decisions",
            "Rate-limit decisions, by route, policy and result.",
            labels=["route", "policy", "result"],
        )
        for key, value in sums.counters.items():
            if key[0] == "ratelimit":
                decisions.add_metric(list(key[1:]), value)
        yield decisions

    def _upstreams(self, sums: SlotSums) -> Iterator[Metric]:
        tries = CounterMetricFamily(
            "nexus_upstream_tries",
            f"Tries sent to upstream targets, by outcome ({', '.join(TRY_OUTCOMES)}).",
            labels=["upstream", "target", "outcome"],
        )
        connect = CounterMetricFamily(
            "nexus_upstream_connect_failures",
            "Tries that could not connect to the target (refused, unreachable or timed out).",
            labels=["upstream", "target"],
        )
        ejections = CounterMetricFamily(
            "nexus_upstream_ejections",
            "Times a worker took a target out of rotation after consecutive failures (passive health).",
            labels=["upstream", "target"],
        )
        retries = CounterMetricFamily("nexus_upstream_retries", "Retries sent to another target.", labels=["upstream"])
        for key, value in sums.counters.items():
            kind = key[0]
            if kind == "upstream_tries":
                tries.add_metric(list(key[1:]), value)
                if key[3] == "connect_failure":
                    connect.add_metric(list(key[1:3]), value)
            elif kind == "upstream_ejections":
                ejections.add_metric(list(key[1:]), value)
            elif kind == "upstream_retries":
                retries.add_metric([key[1]], value)
        yield from (tries, connect, ejections, retries)
        yield from self._target_health()
        yield from self._concurrency()

    def _target_health(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "nexus_upstream_target_up",
            "1 when the active health checks have the target in rotation, 0 when they marked it down.",
            labels=["upstream", "target"],
        )
        probes = CounterMetricFamily("nexus_upstream_health_probes", "Active health probes sent.", labels=["upstream", "target"])
        failures = CounterMetricFamily(
            "nexus_upstream_health_probe_failures", "Active health probes that failed.", labels=["upstream", "target"]
        )
        health = self.shared.health
        for name, first in target_slots(self.config).items():
            for offset, target in enumerate(self.config.upstreams[name].target_list()):
                labels = [name, target.url.rstrip("/")]
                slot = first + offset
                up.add_metric(labels, 1 if health.is_up(slot) else 0)
                sent, failed = health.probe_counts(slot)
                probes.add_metric(labels, sent)
                failures.add_metric(labels, failed)
        yield from (up, probes, failures)

    def _concurrency(self) -> Iterator[Metric]:
        table = self.shared.concurrency
        limit = GaugeMetricFamily(
            "nexus_upstream_concurrency_limit", "The adaptive concurrency limit, node-wide.", labels=["upstream"]
        )
        in_flight = GaugeMetricFamily(
            "nexus_upstream_in_flight", "Requests holding a concurrency slot, node-wide.", labels=["upstream"]
        )
        counted = {
            name: CounterMetricFamily(f"nexus_upstream_{name}", text, labels=["upstream"])
            for name, text in (
                ("admitted", "Requests that got a concurrency slot, at once or after waiting."),
                ("queued", "Requests that waited for a concurrency slot."),
                ("shed", "Requests answered 503 because no concurrency slot was free."),
                ("queue_timeouts", "Shed requests that waited the whole queue wait."),
            )
        }
        for index, (name, upstream) in enumerate(self.config.upstreams.items()):
            if upstream.concurrency is None or index >= table.upstreams:
                continue
            limit.add_metric([name], table.limit(index))
            in_flight.add_metric([name], table.in_flight(index))
            for counter, value in table.counters(index)._asdict().items():
                counted[counter].add_metric([name], value)
        yield limit
        yield in_flight
        yield from counted.values()

    def _cache(self, sums: SlotSums) -> Iterator[Metric]:
        results = CounterMetricFamily(
            "nexus_cache_requests", "Requests on cached routes, by route and cache result.", labels=["route", "result"]
        )
        hits: dict[str, int] = {}
        lookups: dict[str, int] = {}
        for key, value in sums.counters.items():
            if key[0] == "cache":
                route = key[1]
                results.add_metric([route, key[2]], value)
                lookups[route] = lookups.get(route, 0) + value
                hits[route] = hits.get(route, 0) + (value if key[2] in SERVED_FROM_CACHE else 0)
        yield results
        ratio = GaugeMetricFamily(
            "nexus_cache_hit_ratio",
            "Share of requests on a cached route served from the cache (hit, stale or l2_hit), "
            "over every generation's counts; 0 before the first request.",
            labels=["route"],
        )
        for route, count in lookups.items():
            ratio.add_metric([route], hits[route] / count if count else 0.0)
        yield ratio
        stats = self.shared.cache.stats()
        yield GaugeMetricFamily("nexus_cache_entries", "Entries in the response cache.", value=stats["entries"])
        yield GaugeMetricFamily("nexus_cache_bytes", "Bytes of live cache entries.", value=stats["bytes_used"])
        yield GaugeMetricFamily(
            "nexus_cache_capacity_bytes", "Size of the cache's storage arena.", value=stats["capacity_bytes"]
        )
        yield CounterMetricFamily(
            "nexus_cache_evictions", "Entries evicted to make room for new ones.", value=stats["evictions"]
        )

    def _tables_usage(self) -> Iterator[Metric]:
        sizes = GaugeMetricFamily(
            "nexus_shared_memory_bytes", "Mapped bytes of each shared-memory table.", labels=["table"]
        )
        for name, size in self.shared.sizes().items():
            sizes.add_metric([name], size)
        yield sizes
        slots = GaugeMetricFamily("nexus_ratelimit_table_slots", "Slots of a rate-limit table.", labels=["table"])
        occupied = GaugeMetricFamily(
            "nexus_ratelimit_table_occupied_slots", "Slots holding a key.", labels=["table"]
        )
        failed_open = CounterMetricFamily(
            "nexus_ratelimit_table_failed_open",
            "Decisions allowed because the table had no free slot for the key.",
            labels=["table"],
        )
        for name, table in (("gcra", self.shared.gcra), ("quotas", self.shared.quotas)):
            usage = table.usage()
            slots.add_metric([name], usage.slots)
            occupied.add_metric([name], usage.occupied)
            failed_open.add_metric([name], usage.failed_open)
        yield from (slots, occupied, failed_open)
        published = dropped = pending = 0
        for ring in self.shared.rings:
            counts = ring.counts()
            published += counts.published
            dropped += counts.dropped
            pending += counts.pending
        yield CounterMetricFamily(
            "nexus_ring_records", "Records workers published to their event rings.", value=published
        )
        yield CounterMetricFamily(
            "nexus_ring_dropped_records",
            "Records dropped because a worker's event ring was full (the master drained too slowly).",
            value=dropped,
        )
        yield GaugeMetricFamily("nexus_ring_pending_records", "Records waiting in the rings.", value=pending)

    def _redis(self) -> Iterator[Metric]:
        if self.config.redis is None:
            return
        from nexus.redis_sync import read_status

        status = read_status(self.shared.quotas)
        yield GaugeMetricFamily(
            "nexus_redis_sync_connected", "1 while rate-limit sync rounds with Redis succeed.", value=int(status.connected)
        )
        yield GaugeMetricFamily("nexus_redis_sync_live_nodes", "Nodes seen in the last sync round.", value=status.live_nodes)
        lag = time.time() - status.last_sync_us / 1e6 if status.last_sync_us else float("nan")
        yield GaugeMetricFamily(
            "nexus_redis_sync_lag_seconds", "Seconds since the last successful sync round (NaN before the first).", value=lag
        )
        yield GaugeMetricFamily(
            "nexus_redis_sync_batch_keys", "Keys synced in the last successful round.", value=status.keys_synced
        )
        yield GaugeMetricFamily(
            "nexus_redis_sync_batch_calls", "Script calls in the last successful round.", value=status.script_calls
        )
        yield CounterMetricFamily("nexus_redis_sync_errors", "Failed sync rounds.", value=status.errors)

    def _workers(self) -> Iterator[Metric]:
        counters = self._master_counters() if self._master_counters is not None else {}
        states = GaugeMetricFamily(
            "nexus_workers", "Worker slots of the running generations, by the state of their process.", labels=["state"]
        )

        # The other bank of slots keeps the exited workers of the last
        # generation until the next reload. They are past workers, so not counted.
        table = self.shared.workers
        slots = counters.get("worker_slots", range(table.slots))
        counts = dict.fromkeys(WorkerState, 0)
        for slot in slots:
            counts[table.state(slot)] += 1
        for state, count in counts.items():
            if state is not WorkerState.EMPTY:
                states.add_metric([state.name.lower()], count)
        yield states
        if self._master_counters is None:
            return
        yield CounterMetricFamily(
            "nexus_worker_restarts", "Workers restarted after they exited unexpectedly.", value=counters.get("worker_restarts", 0)
        )
        yield CounterMetricFamily("nexus_reloads", "Config reloads applied.", value=counters.get("reloads", 0))
        yield CounterMetricFamily(
            "nexus_reloads_failed", "Config reloads rejected or failed.", value=counters.get("reloads_failed", 0)
        )
        yield GaugeMetricFamily(
            "nexus_generation", "Generation of the serving workers; each reload adds one.", value=counters.get("generation", 0)
        )
        yield GaugeMetricFamily(
            "nexus_start_time_seconds", "Unix time the master started.", value=counters.get("started_at", 0)
        )
