"""The gateway's metric layout and the per-request counting done by workers.

`build_layout(config)` fixes a word in the shared metric slots for every
counter and histogram the workers update, with only bounded labels: route,
method class, status class, upstream, target, rate-limit policy and result
(never a consumer or client). The master builds it before forking, so
every worker and the master agree on the indexes. Workers count through
`RequestMetrics`, which turns names into precomputed indexes once, and
`TryCounter`, one per upstream pool, which counts upstream tries and
ejections per target. The master exports the sums
(`nexus.observability.exposition`).
"""

from __future__ import annotations

from nexus.config import Config
from nexus.ratelimit import route_limit_names
from nexus.shm.metrics import MetricLayout, WorkerMetrics

__all__ = [
    "DURATION_BOUNDS_NS",
    "METHOD_CLASSES",
    "NO_ROUTE",
    "CACHE_RESULTS",
    "RATE_LIMIT_RESULTS",
    "SERVED_FROM_CACHE",
    "STATUS_CLASSES",
    "TRY_OUTCOMES",
    "RequestMetrics",
    "TryCounter",
    "build_layout",
    "method_class",
]

# The label for requests that matched no route.
NO_ROUTE = "(none)"

STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")

# Safe methods (RFC 9110 section 9.2.1) only read; every other method may write.
METHOD_CLASSES = ("safe", "unsafe")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})

RATE_LIMIT_RESULTS = ("allowed", "denied", "dry_run_denied", "failed_open")

# Results of a request on a route with a cache (`nexus.cache.layer`): served
# fresh, served stale, fetched (miss; expired: a stale entry replaced),
# validated with a 304, answered by another request's fill, not looked up,
# fetched but not storable, served from Redis; and L2 failures and queue drops.
CACHE_RESULTS = (
    "hit", "stale", "miss", "expired", "revalidated", "coalesced", "bypass", "uncacheable", "l2_hit", "l2_error", "l2_dropped",
)
# Cache results of responses served without waiting for the upstream.
SERVED_FROM_CACHE = frozenset({"hit", "stale", "l2_hit"})

# The outcome of one try against an upstream target. `failure_status` is a 502,
# 503 or 504 from the target; `connect_failure` includes connect timeouts.
TRY_OUTCOMES = ("ok", "connect_failure", "timeout", "reset", "failure_status", "error")
_FAILURE_OUTCOMES = {
    "connect failure": "connect_failure",
    "connect timeout": "connect_failure",
    "timeout": "timeout",
    "reset": "reset",
}

# Upper bounds of the request duration buckets, in nanoseconds: from 0.25 ms
# (a cache hit) to 30 s (the default total upstream timeout).
DURATION_BOUNDS_NS = tuple(
    int(seconds * 1e9)
    for seconds in (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
)


def method_class(method: str) -> int:
    """Return the index in METHOD_CLASSES of a request method."""
    return 0 if method in _SAFE_METHODS else 1


def build_layout(config: Config) -> MetricLayout:
    layout = MetricLayout()
    for route in [NO_ROUTE, *(route.name for route in config.routes)]:
        for methods in METHOD_CLASSES:
            for status_class in STATUS_CLASSES:
                layout.counter(("requests", route, methods, status_class))
        layout.histogram(("duration", route), DURATION_BOUNDS_NS)
    for route in config.routes:
        for policy in route_limit_names(route, config):
            for result in RATE_LIMIT_RESULTS:
                layout.counter(("ratelimit", route.name, policy, result))
    for route in config.routes:
        if route.cache is not None and route.cache.enabled:
            for result in CACHE_RESULTS:
                layout.counter(("cache", route.name, result))
    for name, upstream in config.upstreams.items():
        layout.counter(("upstream_retries", name))
        for target in upstream.target_list():
            url = target.url.rstrip("/")
            layout.histogram(("upstream_duration", name, url), DURATION_BOUNDS_NS)
            for outcome in TRY_OUTCOMES:
                layout.counter(("upstream_tries", name, url, outcome))
            layout.counter(("upstream_ejections", name, url))
    return layout


class RequestMetrics:
    """A worker's view of the layout: counts one finished request in a few word updates."""

    def __init__(self, metrics: WorkerMetrics, layout: MetricLayout, config: Config | None = None) -> None:
        self._metrics = metrics
        self._layout = layout
        routes = {key[1] for key in layout.counters if key[0] == "requests"}
        # Per route: [safe counters by status class, unsafe counters by status class].
        self._requests = {
            route: [
                [layout.counters[("requests", route, methods, status_class)] for status_class in STATUS_CLASSES]
                for methods in METHOD_CLASSES
            ]
            for route in routes
        }
        self._durations = {
            key[1]: histogram.index for key, histogram in layout.histograms.items() if key[0] == "duration"
        }
        self._limits = {key[1:]: index for key, index in layout.counters.items() if key[0] == "ratelimit"}
        self._cache = {key[1:]: index for key, index in layout.counters.items() if key[0] == "cache"}
        # The upstream duration histograms of each route's upstream, by target URL.
        self._route_targets: dict[str, dict[str, int]] = {}
        if config is not None:
            by_upstream: dict[str, dict[str, int]] = {}
            for key, histogram in layout.histograms.items():
                if key[0] == "upstream_duration":
                    by_upstream.setdefault(key[1], {})[key[2]] = histogram.index
            self._route_targets = {
                route.name: by_upstream[route.upstream] for route in config.routes if route.upstream in by_upstream
            }

    def request(self, route: str, method: str, status: int, duration_ns: int) -> None:
        counters = self._requests.get(route) or self._requests[NO_ROUTE]
        status_class = min(max(status // 100, 1), 5) - 1
        self._metrics.inc(counters[0 if method in _SAFE_METHODS else 1][status_class])
        index = self._durations.get(route, self._durations[NO_ROUTE])
        self._metrics.observe_at(index, DURATION_BOUNDS_NS, duration_ns)

    def upstream_response(self, route: str, target: str, duration_ns: int) -> None:
        """Count the time from a request of `route` arriving to the response head of `target` (a URL)."""
        index = self._route_targets.get(route, {}).get(target.rstrip("/"))
        if index is not None:
            self._metrics.observe_at(index, DURATION_BOUNDS_NS, duration_ns)

    def cache(self, route: str, result: str) -> None:
        index = self._cache.get((route, result))
        if index is not None:
            self._metrics.inc(index)

    def rate_limit(self, route: str, policy: str, result: str) -> None:
        index = self._limits.get((route, policy, result))
        if index is not None:
            self._metrics.inc(index)

    def tries(self, upstream: str, target_urls: list[str]) -> TryCounter:
        """Return the counter of tries and ejections for one upstream pool."""
        return TryCounter(self._metrics, self._layout, upstream, target_urls)


class TryCounter:
    """Counts the tries, retries and passive ejections of one upstream's targets, by target index."""

    def __init__(self, metrics: WorkerMetrics, layout: MetricLayout, upstream: str, target_urls: list[str]) -> None:
        self._metrics = metrics
        counters = layout.counters
        self._tries = [
            {outcome: counters[("upstream_tries", upstream, url, outcome)] for outcome in TRY_OUTCOMES}
            for url in target_urls
        ]
        self._ejections = [counters[("upstream_ejections", upstream, url)] for url in target_urls]
        self._retries = counters[("upstream_retries", upstream)]

    def succeeded(self, target: int) -> None:
        self._metrics.inc(self._tries[target]["ok"])

    def failed(self, target: int, reason: str) -> None:
        """Count a failed try; `reason` is what the proxy passes to `UpstreamPool.record_failure`."""
        outcome = _FAILURE_OUTCOMES.get(reason)
        if outcome is None:
            outcome = "failure_status" if reason.startswith("status") else "error"
        self._metrics.inc(self._tries[target][outcome])

    def ejected(self, target: int) -> None:
        self._metrics.inc(self._ejections[target])

    def retried(self) -> None:
        self._metrics.inc(self._retries)
