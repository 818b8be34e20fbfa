"""The Prometheus collector over real shared-memory tables: sums, histograms, gauges, dead workers, retired tables."""

from __future__ import annotations

import os
import signal

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nexus.config import parse_config
from nexus.observability.exposition import NexusCollector
from nexus.shm.metrics import MetricSlots, fold_tables, sum_tables
from nexus.shm.state import SharedState
from nexus.shm.workers import WorkerState
from nexus.telemetry import DURATION_BOUNDS_NS, RequestMetrics, build_layout
from tests.forking import Children

CONFIG = """
listen: ["127.0.0.1:0"]
upstreams:
  app:
    targets: ["http://127.0.0.1:9001", "http://127.0.0.1:9002/"]
    concurrency: {initial_limit: 12}
routes:
  - {name: catalog, upstream: app, match: {path_prefix: /catalog}, rate_limit: {rate: 10/s}}
  - {name: orders, upstream: app}
"""


@pytest.fixture
def state():
    config = parse_config(CONFIG)
    layout = build_layout(config)
    shared = SharedState.create(config, 2, layout)
    yield config, layout, shared
    shared.close()


def scrape(collector: NexusCollector) -> dict[str, dict[tuple, float]]:
    """Render the collector as Prometheus text, parse it back, and index samples by name and labels."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def test_requests_and_durations_sum_over_workers(state):
    config, layout, shared = state
    first = RequestMetrics(shared.metrics.for_worker(0), layout, config)
    second = RequestMetrics(shared.metrics.for_worker(1), layout, config)
    for _ in range(3):
        first.request("catalog", "GET", 200, 2_000_000)  # 2 ms
    second.request("catalog", "GET", 204, 40_000_000)  # 40 ms
    second.request("catalog", "POST", 503, 1_000)
    second.request("nowhere", "GET", 404, 1_000)
    first.upstream_response("orders", "http://127.0.0.1:9002/", 3_000_000)

    collector = NexusCollector(config, shared, lambda: sum_tables([(layout, shared.metrics)]))
    samples = scrape(collector)

    assert value(samples, "nexus_http_requests_total", route="catalog", method_class="safe", status_class="2xx") == 4
    assert value(samples, "nexus_http_requests_total", route="catalog", method_class="unsafe", status_class="5xx") == 1
    assert value(samples, "nexus_http_requests_total", route="(none)", method_class="safe", status_class="4xx") == 1
    assert value(samples, "nexus_http_requests_total", route="orders", method_class="safe", status_class="2xx") == 0
    # Cumulative buckets in seconds: three requests at or below 2.5 ms, the 40 ms one below 50 ms.
    buckets = samples["nexus_http_request_duration_seconds_bucket"]
    assert buckets[(("le", "0.0025"), ("route", "catalog"))] == 4  # 3 x 2 ms and the 1 us one
    assert buckets[(("le", "0.025"), ("route", "catalog"))] == 4
    assert buckets[(("le", "0.05"), ("route", "catalog"))] == 5
    assert buckets[(("le", "+Inf"), ("route", "catalog"))] == 5
    assert value(samples, "nexus_http_request_duration_seconds_count", route="catalog") == 5
    assert value(samples, "nexus_http_request_duration_seconds_sum", route="catalog") == pytest.approx(0.046001)
    assert value(samples, "nexus_upstream_request_duration_seconds_count", upstream="app", target="http://127.0.0.1:9002") == 1
    assert value(samples, "nexus_upstream_request_duration_seconds_count", upstream="app", target="http://127.0.0.1:9001") == 0
    assert len(buckets) == 3 * (len(DURATION_BOUNDS_NS) + 1)  # three routes: (none), catalog, orders


def test_tries_ejections_and_retries_by_target(state):
    config, layout, shared = state
    metrics = RequestMetrics(shared.metrics.for_worker(1), layout, config)
    tries = metrics.tries("app", ["http://127.0.0.1:9001", "http://127.0.0.1:9002"])
    tries.succeeded(0)
    tries.failed(1, "connect failure")
    tries.failed(1, "connect timeout")
    tries.failed(1, "status 503")
    tries.failed(0, "reset")
    tries.ejected(1)
    tries.retried()

    samples = scrape(NexusCollector(config, shared, lambda: sum_tables([(layout, shared.metrics)])))
    first, second = "http://127.0.0.1:9001", "http://127.0.0.1:9002"
    assert value(samples, "nexus_upstream_tries_total", upstream="app", target=first, outcome="ok") == 1
    assert value(samples, "nexus_upstream_tries_total", upstream="app", target=first, outcome="reset") == 1
    assert value(samples, "nexus_upstream_tries_total", upstream="app", target=second, outcome="failure_status") == 1
    assert value(samples, "nexus_upstream_connect_failures_total", upstream="app", target=second) == 2
    assert value(samples, "nexus_upstream_connect_failures_total", upstream="app", target=first) == 0
    assert value(samples, "nexus_upstream_ejections_total", upstream="app", target=second) == 1
    assert value(samples, "nexus_upstream_retries_total", upstream="app") == 1


def test_gauges_from_the_other_tables(state):
    config, layout, shared = state
    shared.health.set_up(1, False)
    shared.health.record_probe(1, -2, 0, 0)
    index = shared.concurrency.index_of("app")
    assert shared.concurrency.try_acquire(index, 0, 100)
    metrics = RequestMetrics(shared.metrics.for_worker(0), layout, config)
    metrics.rate_limit("catalog", "catalog.rate", "denied")
    shared.workers.reset(0, 1234, 1, 0, 0)
    shared.workers.set_state(0, WorkerState.SERVING)
    shared.rings[0].push(99)
    for _ in range(shared.rings.capacity + 3):
        shared.rings[1].push(1)
    # Slot 1 is in the idle bank: its exited worker belongs to a past generation.
    shared.workers.reset(1, 1233, 0, 0, 0)
    shared.workers.set_state(1, WorkerState.EXITED)
    counters = {
        "worker_restarts": 4, "reloads": 2, "reloads_failed": 1, "generation": 3, "started_at": 1700000000, "worker_slots": [0],
    }  # fmt: skip

    samples = scrape(NexusCollector(config, shared, lambda: sum_tables([(layout, shared.metrics)]), lambda: counters))
    assert value(samples, "nexus_upstream_target_up", upstream="app", target="http://127.0.0.1:9001") == 1
    assert value(samples, "nexus_upstream_target_up", upstream="app", target="http://127.0.0.1:9002") == 0
    assert value(samples, "nexus_upstream_health_probe_failures_total", upstream="app", target="http://127.0.0.1:9002") == 1
    assert value(samples, "nexus_upstream_concurrency_limit", upstream="app") == 12
    assert value(samples, "nexus_upstream_in_flight", upstream="app") == 1
    assert value(samples, "nexus_ratelimit_decisions_total", route="catalog", policy="catalog.rate", result="denied") == 1
    assert value(samples, "nexus_shared_memory_bytes", table="metrics") == len(shared.metrics.segment.mapping)
    assert value(samples, "nexus_ring_dropped_records_total") == 3
    assert value(samples, "nexus_ring_pending_records") == shared.rings.capacity + 1
    assert value(samples, "nexus_workers", state="serving") == 1
    assert value(samples, "nexus_workers", state="exited") == 0
    assert value(samples, "nexus_worker_restarts_total") == 4
    assert value(samples, "nexus_reloads_total") == 2
    assert value(samples, "nexus_generation") == 3
    assert value(samples, "nexus_cache_entries") == 0
    build = samples["nexus_build_info"]
    assert list(build.values()) == [1.0]


def test_cache_hit_ratio_per_route():
    config = parse_config(CONFIG.replace("{name: orders, upstream: app}", "{name: orders, upstream: app, cache: {}}")
                          + "  - {name: images, upstream: app, match: {path_prefix: /img}, cache: {}}\n")  # fmt: skip
    layout = build_layout(config)
    shared = SharedState.create(config, 2, layout)
    try:
        for worker, results in ((0, ["hit", "hit", "miss"]), (1, ["stale", "l2_hit", "bypass", "miss", "hit"])):
            metrics = RequestMetrics(shared.metrics.for_worker(worker), layout, config)
            for result in results:
                metrics.cache("orders", result)
        samples = scrape(NexusCollector(config, shared, lambda: sum_tables([(layout, shared.metrics)])))
    finally:
        shared.close()
    # hit, hit, stale, l2_hit, hit of 8 lookups; no lookups on images yet.
    assert value(samples, "nexus_cache_hit_ratio", route="orders") == 5 / 8
    assert value(samples, "nexus_cache_hit_ratio", route="images") == 0


def test_killed_worker_counts_stay(state):
    config, layout, shared = state

    def count_then_wait() -> None:
        metrics = RequestMetrics(shared.metrics.for_worker(1), layout, config)
        for _ in range(250):
            metrics.request("orders", "GET", 200, 1_000_000)
        os.kill(os.getpid(), signal.SIGSTOP)

    collector = NexusCollector(config, shared, lambda: sum_tables([(layout, shared.metrics)]))
    with Children() as children:
        pid = children.fork(count_then_wait)
        _, status = os.waitpid(pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        before = value(scrape(collector), "nexus_http_requests_total", route="orders", method_class="safe", status_class="2xx")
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        children.running.remove(pid)
    after = value(scrape(collector), "nexus_http_requests_total", route="orders", method_class="safe", status_class="2xx")
    assert before == after == 250


def test_retired_generation_tables_add_up(state):
    config, layout, shared = state
    # A reload removed the route "orders" and added "search".
    new_config = parse_config(CONFIG.replace("name: orders", "name: search"))
    new_layout = build_layout(new_config)
    new_slots = MetricSlots.create(new_layout, 2)
    try:
        RequestMetrics(shared.metrics.for_worker(0), layout, config).request("orders", "GET", 200, 1000)
        RequestMetrics(shared.metrics.for_worker(0), layout, config).request("catalog", "GET", 200, 1000)
        RequestMetrics(new_slots.for_worker(0), new_layout, new_config).request("catalog", "GET", 200, 1000)
        RequestMetrics(new_slots.for_worker(1), new_layout, new_config).request("search", "GET", 200, 1000)

        sums = sum_tables([(layout, shared.metrics), (new_layout, new_slots)])
        assert sums.counters[("requests", "catalog", "safe", "2xx")] == 2
        assert sums.counters[("requests", "orders", "safe", "2xx")] == 1
        assert sums.counters[("requests", "search", "safe", "2xx")] == 1
        assert sum(sums.histograms[("duration", "catalog")][1]) == 2
    finally:
        new_slots.close()


def test_folded_tables_sum_as_the_originals(state):
    config, layout, shared = state
    new_config = parse_config(CONFIG.replace("name: orders", "name: search"))
    new_layout = build_layout(new_config)
    new_slots = MetricSlots.create(new_layout, 2)
    try:
        RequestMetrics(shared.metrics.for_worker(0), layout, config).request("orders", "POST", 503, 2_000_000)
        RequestMetrics(shared.metrics.for_worker(1), layout, config).request("catalog", "GET", 200, 1000)
        RequestMetrics(new_slots.for_worker(1), new_layout, new_config).request("search", "GET", 404, 5_000_000_000)
        tables = [(layout, shared.metrics), (new_layout, new_slots)]

        folded_layout, folded = fold_tables(tables)
        try:
            assert folded.workers == 1
            assert sum_tables([(folded_layout, folded)]) == sum_tables(tables)
        finally:
            folded.close()
    finally:
        new_slots.close()
