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
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric

from nexus.config import Config, parse_listen_address
from nexus.master_fds import close_in_children, keep_in_children
from nexus.observability.access_log import AccessLogWriter, Names, drain_batch
from nexus.observability.exposition import NexusCollector
from nexus.observability.metrics_http import start_metrics_server
from nexus.observability.usage import LATENCY_BOUNDS_US, UsageTable
from nexus.services import AdminError, AdminHandler
from nexus.shm.metrics import SlotSums, sum_tables
from nexus.supervision import StartError

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
        # A relative access_log.path is relative to the config file's directory.
        config_path = getattr(master, "config_path", None)
        self._base_dir = os.path.dirname(config_path) if config_path else os.getcwd()
        # Lines and write errors of access log writers replaced by reloads,
        # so that their counters never go backwards.
        self._retired_lines = 0
        self._retired_write_errors = 0
        self.writer = self._make_writer(self.config)
        self.metrics_address: str | None = None
        self._server = None
        self._stop = threading.Event()
        self._reopen = threading.Event()
        self._drain_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.collector = NexusCollector(
            self.config, master.shared, self._metric_sums, self._master_counters, self._own_metrics
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
        with self._drain_lock:
            self._retire_writer()

    def startup_check(self) -> None:
        """Raise StartError if the access log cannot be opened or the metrics address cannot be bound.

        Called on a fresh start only, before any worker is forked, so a
        gateway never starts without the log or the metrics it was given.
        """
        problems = [
            problem
            for problem in (self._log_problem(self.config, None), _metrics_problem(self.config.admin.metrics, None))
            if problem is not None
        ]
        if problems:
            raise StartError("; ".join(problems))

    def check(self, config: Config) -> None:
        """Reject a reload whose access log cannot be opened or whose new metrics address cannot be bound."""
        # An unchanged path or address is not tested: a log directory that
        # went away must not block reloads; reconfigure tries it again.
        for problem in (
            self._log_problem(config, self.config),
            _metrics_problem(config.admin.metrics, self.config.admin.metrics),
        ):
            if problem is not None:
                raise AdminError(422, problem)

    def reconfigure(self, config: Config) -> None:
        old = self.config
        self.config = config
        # The new generation may have new tables (more workers, other targets).
        self.collector.config = config
        self.collector.shared = self.master.shared
        # A log or listener that failed before is tried again, even with the
        # same settings: the operator may have fixed the directory or the port.
        if config.access_log != old.access_log or (self.writer is None and config.access_log.path is not None):
            with self._drain_lock:
                self._retire_writer()
                self.writer = self._make_writer(config)
        if config.admin.metrics != old.admin.metrics or (self._server is None and config.admin.metrics is not None):
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
                try:
                    self._reopen_log()
                except AdminError as exc:
                    log.error("SIGUSR1: %s", exc.message)
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
        raw = ring.drain_raw()
        if not raw:
            return 0
        writer = self.writer
        # Without a log, no line is wanted: sample nothing, not even errors.
        sample, errors = (writer.sample, writer.always_log_errors) if writer is not None else (0.0, False)
        batch = drain_batch(raw, worker, names, LATENCY_BOUNDS_US, sample, errors)
        for row, text in batch.others:
            handler = self.ring_handlers.get(row[0] & 0xFF)
            if handler is not None:
                handler(worker, row, text)
        self.usage.add(batch.counts, batch.sent, names)
        if writer is not None:
            writer.write(batch.lines, batch.written)
        return batch.records

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
        usage = self.usage.snapshot(int(limit) if limit else None)
        # Workers send records only with usage or an access log on.
        usage["recording"] = bool(self.config.usage or self.config.access_log.path is not None)
        return usage

    def _post_reopen(self, _query: dict[str, str], _body: Any) -> dict:
        return {"reopened": self._reopen_log()}

    def _reopen_log(self) -> str:
        """Reopen the access log file (or open it, if it failed before); return its path or raise AdminError."""
        path = self._log_path(self.config)
        if path is None:
            raise AdminError(409, "no access log file is configured: set access_log.path to a file and reload")
        if path == "-":
            raise AdminError(409, "the access log goes to stderr, which has no file to reopen")
        with self._drain_lock:
            if self.writer is None:
                self.writer = self._make_writer(self.config)
                if self.writer is None:
                    raise AdminError(503, f"{self._log_problem(self.config, None)}; no access log is written")
                return path
            try:
                self.writer.reopen()
            except OSError as exc:
                raise AdminError(
                    503,
                    f"cannot reopen the access log {path!r}: {exc.strerror}; still writing to the old file; "
                    "create the directory with write access for the service user and retry",
                ) from None
        return path

    def _retire_writer(self) -> None:
        """Close the writer (if any) and keep its counts; the caller holds the drain lock."""
        if self.writer is None:
            return
        self._retired_lines += self.writer.lines
        self._retired_write_errors += self.writer.write_errors
        self.writer.close()
        self.writer = None

    def _log_path(self, config: Config) -> str | None:
        path = config.access_log.path
        if path is None or path == "-":
            return path
        return os.path.join(self._base_dir, path)

    def _log_problem(self, config: Config, current: Config | None) -> str | None:
        """Return why `config`'s access log cannot be opened, or None; unchanged from `current` needs no test."""
        path = self._log_path(config)
        if path is None or path == "-" or (current is not None and self._log_path(current) == path):
            return None
        return _file_problem(path)

    # Metrics.

    def _metric_sums(self) -> SlotSums:
        sums = getattr(self.master, "metric_sums", None)
        if sums is not None:
            return sums()
        return sum_tables([(self.master.metric_layout, self.master.shared.metrics)])

    def _master_counters(self) -> dict[str, Any]:
        counters = getattr(self.master, "counters", None)
        return counters() if counters is not None else {"generation": getattr(self.master, "generation", 0)}

    def _own_metrics(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "nexus_access_records", "Access records the master read from the workers' rings.", value=self.records_drained
        )
        writer = self.writer
        yield CounterMetricFamily(
            "nexus_access_log_lines",
            "Lines written to the access log.",
            value=self._retired_lines + (writer.lines if writer else 0),
        )
        yield CounterMetricFamily(
            "nexus_access_log_write_errors",
            "Batches of access log lines that could not be written.",
            value=self._retired_write_errors + (writer.write_errors if writer else 0),
        )

    def _start_metrics(self, address: str | None) -> None:
        if address is None:
            return
        host, port = parse_listen_address(address)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        try:
            self._server = start_metrics_server(host, port, registry)
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

    def _make_writer(self, config: Config) -> AccessLogWriter | None:
        """Open the configured access log; on failure log why and serve without one until a reload or reopen."""
        settings = config.access_log
        path = self._log_path(config)
        if path is None:
            return None
        try:
            return AccessLogWriter(path, float(settings.sample), settings.always_log_errors)
        except OSError as exc:
            log.error(
                "cannot open the access log path=%s: %s; no access log is written until `nexusctl access-log "
                "reopen` or a reload succeeds",
                path,
                exc.strerror or exc,
            )
            return None


def _file_problem(path: str) -> str | None:
    """Return why `path` cannot be opened for appending, or None."""
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except IsADirectoryError:
        return f"access_log.path: {path!r} is a directory; give a file in it, such as {os.path.join(path, 'access.log')!r}"
    except OSError as exc:
        return (
            f"access_log.path: cannot open {path!r} for appending: {exc.strerror}; "
            "create its directory with write access for the service user, or choose another path"
        )
    return None


def _metrics_problem(address: str | None, current: str | None) -> str | None:
    """Return why `address` cannot be bound for /metrics, or None; the address already served needs no test."""
    if address is None or address == current:
        return None
    host, port = parse_listen_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As the metrics server binds: with SO_REUSEADDR, so TIME_WAIT does not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return f"admin.metrics: cannot listen on {address}: {exc.strerror}; stop what uses it or choose another address"
    return None
