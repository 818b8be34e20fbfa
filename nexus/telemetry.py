"""The gateway's metric layout and the per-request counting done by workers.

`build_layout(config)` fixes a word in the shared metric slots for every
counter and histogram the workers update, with only bounded labels: route,
status class, rate-limit policy and result (never a consumer or client). The master builds it before
forking, so every worker and the master agree on the indexes. Workers count
through `RequestMetrics`, which turns names into precomputed indexes once.
"""

from __future__ import annotations

from nexus.config import Config
from nexus.ratelimit import route_limit_names
from nexus.shm.metrics import MetricLayout, WorkerMetrics

__all__ = [
    "DURATION_BOUNDS_NS",
    "NO_ROUTE",
    "RATE_LIMIT_RESULTS",
    "STATUS_CLASSES",
    "RequestMetrics",
    "build_layout",
]

# The label for requests that matched no route.
NO_ROUTE = "(none)"

STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")

RATE_LIMIT_RESULTS = ("allowed", "denied", "dry_run_denied", "failed_open")

# Upper bounds of the request duration buckets, in nanoseconds: from 0.25 ms
# (a cache hit) to 30 s (the default total upstream timeout).
DURATION_BOUNDS_NS = tuple(
    int(seconds * 1e9)
    for seconds in (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
)


def build_layout(config: Config) -> MetricLayout:
    layout = MetricLayout()
    for route in [NO_ROUTE, *(route.name for route in config.routes)]:
        for status_class in STATUS_CLASSES:
            layout.counter(("requests", route, status_class))
        layout.histogram(("duration", route), DURATION_BOUNDS_NS)
    for route in config.routes:
        for policy in route_limit_names(route, config):
            for result in RATE_LIMIT_RESULTS:
                layout.counter(("ratelimit", route.name, policy, result))
    return layout


class RequestMetrics:
    """A worker's view of the layout: counts one finished request in a few word updates."""

    def __init__(self, metrics: WorkerMetrics, layout: MetricLayout) -> None:
        self._metrics = metrics
        self._requests = {
            route: [layout.counters[("requests", route, status_class)] for status_class in STATUS_CLASSES]
            for (kind, route, *_rest) in layout.counters
            if kind == "requests"
        }
        self._durations = {
            key[1]: histogram.index for key, histogram in layout.histograms.items() if key[0] == "duration"
        }
        self._limits = {key[1:]: index for key, index in layout.counters.items() if key[0] == "ratelimit"}

    def request(self, route: str, status: int, duration_ns: int) -> None:
        counters = self._requests.get(route) or self._requests[NO_ROUTE]
        status_class = min(max(status // 100, 1), 5) - 1
        self._metrics.inc(counters[status_class])
        index = self._durations.get(route, self._durations[NO_ROUTE])
        self._metrics.observe_at(index, DURATION_BOUNDS_NS, duration_ns)

    def rate_limit(self, route: str, policy: str, result: str) -> None:
        index = self._limits.get((route, policy, result))
        if index is not None:
            self._metrics.inc(index)
