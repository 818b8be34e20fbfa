"""Per-consumer and per-route usage, aggregated by the master from the drained access records.

Prometheus gets no consumer label, because consumers can number in the
thousands and every label value is a series. The master keeps usage here
instead, one row per consumer and per route (both bounded by the config),
and serves it as JSON on the admin API (GET /usage) for `nexusctl top`.

A row counts requests, server errors (status 500 and above), client errors
(400-499 except 429), rate-limited requests (429), response body bytes, and
a latency histogram of fixed log-spaced buckets, from which p50, p90 and
p99 are estimated (each within one bucket, about 19% of the value).
"""

from __future__ import annotations

import threading
import time

from nexus.observability.access_log import Names

__all__ = ["LATENCY_BOUNDS_US", "UsageRow", "UsageTable"]

ANONYMOUS = "(anonymous)"
NO_ROUTE = "(none)"

# Bucket upper bounds in microseconds: 50 us to about 120 s, each 1.19 times the last.
LATENCY_BOUNDS_US = tuple(round(50 * 1.19**step) for step in range(85))
QUANTILES = (0.5, 0.9, 0.99)


class UsageRow:
    """Counts and a latency histogram of one consumer or one route."""

    __slots__ = ("buckets", "bytes_sent", "client_errors", "errors", "rate_limited", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.client_errors = 0
        self.rate_limited = 0
        self.bytes_sent = 0
        self.buckets = [0] * (len(LATENCY_BOUNDS_US) + 1)

    def add(self, status: int, bucket: int, count: int) -> None:
        """Count `count` responses with `status` whose latency falls in `bucket`."""
        self.requests += count
        if status >= 500:
            self.errors += count
        elif status == 429:
            self.rate_limited += count
        elif status >= 400:
            self.client_errors += count
        self.buckets[bucket] += count

    def quantile(self, share: float) -> float | None:
        """Estimate the `share` quantile of the latency in seconds (the upper bound of its bucket)."""
        if not self.requests:
            return None
        rank = share * self.requests
        seen = 0
        for index, count in enumerate(self.buckets):
            seen += count
            if seen >= rank and count:
                bound = LATENCY_BOUNDS_US[min(index, len(LATENCY_BOUNDS_US) - 1)]
                return bound / 1e6
        return LATENCY_BOUNDS_US[-1] / 1e6

    def as_json(self) -> dict:
        latency = {f"p{round(share * 100)}": self.quantile(share) for share in QUANTILES}
        return {
            "requests": self.requests,
            "errors": self.errors,
            "client_errors": self.client_errors,
            "rate_limited": self.rate_limited,
            "bytes": self.bytes_sent,
            "latency_s": latency,
        }


class UsageTable:
    """Usage by consumer and by route since the master started; safe to read from another thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.consumers: dict[str, UsageRow] = {}
        self.routes: dict[str, UsageRow] = {}
        self.records = 0
        self.started = time.time()

    def add(self, counts: dict[tuple[int, int, int, int], int], sent: dict[tuple[int, int], int], names: Names) -> None:
        """Count a drain's records (`Batch.counts` and `Batch.sent`), whose ids are those of `names`.

        `counts` maps (consumer id, route id, status, latency bucket) to
        records, and `sent` maps (consumer id, route id) to response bytes.
        """
        with self._lock:
            for (consumer, route, status, bucket), count in counts.items():
                self.records += count
                self._consumer(names, consumer).add(status, bucket, count)
                self._route(names, route).add(status, bucket, count)
            for (consumer, route), bytes_sent in sent.items():
                self._consumer(names, consumer).bytes_sent += bytes_sent
                self._route(names, route).bytes_sent += bytes_sent

    def _consumer(self, names: Names, consumer: int) -> UsageRow:
        name = (names.consumers[consumer] or ANONYMOUS) if consumer < len(names.consumers) else f"#{consumer}"
        return _row(self.consumers, name)

    def _route(self, names: Names, route: int) -> UsageRow:
        name = (names.routes[route] or NO_ROUTE) if route < len(names.routes) else f"#{route}"
        return _row(self.routes, name)

    def snapshot(self, limit: int | None = None) -> dict:
        """Return usage as JSON: consumers and routes, busiest first, at most `limit` of each."""
        with self._lock:
            consumers = _ranked(self.consumers, limit)
            routes = _ranked(self.routes, limit)
            records = self.records
        return {
            "time": time.time(),
            "since": self.started,
            "records": records,
            "consumers": consumers,
            "routes": routes,
        }


def _row(rows: dict[str, UsageRow], name: str) -> UsageRow:
    row = rows.get(name)
    if row is None:
        row = rows[name] = UsageRow()
    return row


def _ranked(rows: dict[str, UsageRow], limit: int | None) -> list[dict]:
    ordered = sorted(rows.items(), key=lambda item: item[1].requests, reverse=True)
    if limit is not None:
        ordered = ordered[:limit]
    return [{"name": name, **row.as_json()} for name, row in ordered]
