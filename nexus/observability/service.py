"""The master-side observability service: /metrics, the ring drain, the access log and usage.

The master starts it before forking (`nexus.services.master_services`).
It runs two threads beside the master loop, never on the request path:

- the metrics listener on `admin.metrics`, prometheus_client's HTTP server
  over `NexusCollector`, which reads shared memory at each scrape;
- the drain, which every DRAIN_INTERVAL empties the workers' rings,
  adds every access record to the usage table and writes the sampled ones
  to the access log.

SIGUSR1 to the master, or `nexusctl access-log reopen` (POST
/access-log/reopen on the admin API), reopens the access log file after
logrotate renamed it.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric

from nexus.config import Config, parse_listen_address
from nexus.master_fds import close_in_children, keep_in_children
from nexus.observability.access_log import AccessLogWriter, Names, decode
from nexus.observability.exposition import NexusCollector
from nexus.observability.usage import UsageTable
from nexus.services import AdminError, AdminHandler

if TYPE_CHECKING:
    from nexus.master import Master

__all__ = ["DRAIN_INTERVAL", "ObservabilityService"]

log = logging.getLogger("nexus.observability")

# How often the master empties the rings, in seconds. A worker's ring holds
# `shared_memory.event_ring_records` records, two per request with a
# generated request id: 16384 records are 8192 requests, 0.8 s of a worker
# at 10,000 requests/s.
DRAIN_INTERVAL = 0.1


class ObservabilityService:
    """Serves /metrics and GET /usage, drains the rings and writes the access log."""

    name = "observability"

    def __init__(self, master: Master) -> None:
        self.master = master
        self.config: Config = master.config
        self.usage = UsageTable()
        # Names of each live generation's config, by id(config): (config, names).
        self._names: dict[int, tuple[Config, Names]] = {}
        # The rings drained last pass, by (id(ring set), first slot).
        self._last_sources: dict[tuple[int, int], tuple[Config, Any, range]] = {}
        # Handlers for ring records of other kinds, by kind: handler(worker, row, text).
        self.ring_handlers: dict[int, Callable[[int, tuple[int, ...], bytes], None]] = {}
        self.records_drained = 0
        self.writer = self._make_writer(self.config)
        self.metrics_address: str | None = None
        self._server = None
        self._stop = threading.Event()
        self._reopen = threading.Event()
        self._drain_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.collector = NexusCollector(
            self.config, master.shared, self._metric_tables, self._master_counters, self._own_metrics
        )

    # Service protocol.

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ring-drain", daemon=True)
        self._thread.start()
        self._start_metrics(self.config.admin.metrics)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, lambda _signum, _frame: self._reopen.set())

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        self.drain_once()
        self._stop_metrics()
        if self.writer is not None:
            self.writer.close()

    def check(self, config: Config) -> None:
        """Reject a reload whose new access log path cannot be opened for appending."""
        path = config.access_log.path
        if path is None or path == "-" or path == self.config.access_log.path:
            return
        try:
            with open(path, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise AdminError(
                422,
                f"access_log.path: cannot open {path!r} for appending: {exc.strerror}; "
                "create its directory with write access for the service user, or choose another path",
            ) from None

    def reconfigure(self, config: Config) -> None:
        old = self.config
        self.config = config
        # The new generation may have new tables (more workers, other targets).
        self.collector.config = config
        self.collector.shared = self.master.shared
        if config.access_log != old.access_log:
            with self._drain_lock:
                if self.writer is not None:
                    self.writer.close()
                self.writer = self._make_writer(config)
        if config.admin.metrics != old.admin.metrics:
            self._stop_metrics()
            self._start_metrics(config.admin.metrics)

    def admin_routes(self) -> dict[tuple[str, str], AdminHandler]:
        return {
            ("GET", "/usage"): self._get_usage,
            ("POST", "/access-log/reopen"): self._post_reopen,
        }

    # The drain.

    def _run(self) -> None:
        while not self._stop.wait(DRAIN_INTERVAL):
            if self._reopen.is_set():
                self._reopen.clear()
                if self.writer is not None:
                    self.writer.reopen()
            try:
                self.drain_once()
            except Exception:
                log.exception("draining the event rings failed; retrying in %g s", DRAIN_INTERVAL)

    def drain_once(self) -> int:
        """Empty every worker's ring once; return the access records read.

        Each generation's records are named by its own config: during a
        reload the old workers still push route and target ids of the old
        config, which may mean other routes in the new one. A generation
        that has retired since the last pass is drained once more, so the
        records its workers pushed just before they exited are kept.
        """
        read = 0
        with self._drain_lock:
            sources = self._ring_sources()
            for config, rings, slots in {**self._last_sources, **sources}.values():
                names = self._names_of(config)
                for worker in slots:
                    read += self._drain_ring(rings[worker], worker, names)
            self._last_sources = sources
            live = {id(config) for config, _, _ in sources.values()}
            self._names = {key: cached for key, cached in self._names.items() if key in live}
        self.records_drained += read
        return read

    def _drain_ring(self, ring, worker: int, names: Names) -> int:
        rows = ring.drain()
        if not rows:
            return 0
        records = decode(rows, worker, names, self.ring_handlers)
        self.usage.add(records)
        if self.writer is not None:
            self.writer.write(records)
        return len(records)

    def _ring_sources(self) -> dict[tuple[int, int], tuple[Config, Any, range]]:
        """Return the live generations' rings, keyed by (ring set, first slot)."""
        sources = getattr(self.master, "ring_sources", None)
        if sources is None:
            listed = [(self.config, self.master.shared.rings, range(len(self.master.shared.rings)))]
        else:
            listed = sources()
        return {(id(rings), slots.start): (config, rings, slots) for config, rings, slots in listed}

    def _names_of(self, config: Config) -> Names:
        cached = self._names.get(id(config))
        if cached is None or cached[0] is not config:
            cached = (config, Names(config))
            self._names[id(config)] = cached
        return cached[1]

    # Admin routes.

    def _get_usage(self, query: dict[str, str], _body: Any) -> dict:
        limit = query.get("limit")
        if limit is not None and not (limit.isdigit() and int(limit) > 0):
            raise AdminError(400, f"invalid limit {limit!r}: give a positive whole number of rows, such as limit=10")
        return self.usage.snapshot(int(limit) if limit else None)

    def _post_reopen(self, _query: dict[str, str], _body: Any) -> dict:
        if self.writer is None:
            raise AdminError(409, "no access log file is configured: set access_log.path to a file")
        with self._drain_lock:
            self.writer.reopen()
        return {"reopened": self.writer.path}

    # Metrics.

    def _metric_tables(self):
        tables = getattr(self.master, "metric_tables", None)
        if tables is not None:
            return tables()
        return [(self.master.metric_layout, self.master.shared.metrics)]

    def _master_counters(self) -> dict[str, Any]:
        counters = getattr(self.master, "counters", None)
        return counters() if counters is not None else {"generation": getattr(self.master, "generation", 0)}

    def _own_metrics(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "nexus_access_records", "Access records the master read from the workers' rings.", value=self.records_drained
        )
        writer = self.writer
        yield CounterMetricFamily(
            "nexus_access_log_lines", "Lines written to the access log.", value=writer.lines if writer else 0
        )
        yield CounterMetricFamily(
            "nexus_access_log_write_errors",
            "Batches of access log lines that could not be written.",
            value=writer.write_errors if writer else 0,
        )

    def _start_metrics(self, address: str | None) -> None:
        if address is None:
            return
        host, port = parse_listen_address(address)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        try:
            self._server, _thread = start_http_server(port, host, registry)
        except OSError as exc:
            log.error("cannot serve metrics address=%s: %s; /metrics is off until a reload fixes it", address, exc.strerror)
            return
        # Workers forked later must not keep the port bound after this
        # master closes it (an upgraded master binds it next).
        close_in_children(self._server.socket.fileno())
        bound = self._server.server_address
        self.metrics_address = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        log.info("metrics listening address=%s", self.metrics_address)

    def _stop_metrics(self) -> None:
        if self._server is not None:
            keep_in_children(self._server.socket.fileno())
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @staticmethod
    def _make_writer(config: Config) -> AccessLogWriter | None:
        """Open the configured access log; on failure log why and serve without one, not stop the gateway."""
        settings = config.access_log
        if settings.path is None:
            return None
        try:
            return AccessLogWriter(settings.path, float(settings.sample), settings.always_log_errors)
        except OSError as exc:
            log.error(
                "cannot open the access log path=%s: %s; no access log is written until a reload with a "
                "writable access_log.path",
                settings.path,
                exc.strerror or exc,
            )
            return None
