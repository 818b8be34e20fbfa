"""Active health checks, run once per node by the master.

One thread in the master runs an asyncio loop with one probe task per
target of every upstream that configures `health`. A probe is a plain
HTTP/1.1 GET of the health path on a new connection; 2xx and 3xx count as
success, anything else (another status, a timeout, a refused or reset
connection) as failure. After `unhealthy_after` failures in a row the target
is marked down in the shared health table, after `healthy_after` successes
up again. Workers read the table on every request, so N workers cost one
probe per interval, not N.

With the defaults (250 ms interval, 2 failures) a dead target is out of
rotation about 0.5-0.75 s after it dies. A refused connection fails a probe
at once, and a target that does not respond fails it after the probe timeout.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from nexus.config import Config, HealthCheck
from nexus.shm.health import HealthTable
from nexus.upstream import target_slots

__all__ = ["HealthChecker", "probe"]

log = logging.getLogger("nexus.health")

# Largest response head read from a probe; the status line is all that counts.
_MAX_HEAD = 8192


@dataclass(frozen=True, slots=True)
class _ProbeTarget:
    upstream: str
    url: str
    host: str
    port: int
    slot: int
    check: HealthCheck


async def probe(host: str, port: int, path: str, timeout: float) -> tuple[bool, str]:
    """Probe one target once; return (healthy, reason)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                request = f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: nexus-health-check\r\nConnection: close\r\n\r\n"
                writer.write(request.encode("latin-1"))
                status_line = await reader.readline()
            finally:
                writer.close()
    except TimeoutError:
        return False, f"no response within {timeout:g} s"
    except OSError as exc:
        return False, exc.strerror or str(exc)

    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return False, f"invalid status line {status_line[:80]!r}"
    status = int(parts[1])
    return 200 <= status < 400, f"status {status}"


class HealthChecker:
    """Runs the active probes of all upstreams in a background thread."""

    def __init__(self, config: Config, table: HealthTable) -> None:
        self._table = table
        self._targets = _probe_targets(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None

    @property
    def has_work(self) -> bool:
        return bool(self._targets)

    def start(self) -> None:
        if not self._targets:
            return
        self._thread = threading.Thread(target=self._run, name="nexus-health", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop probing and wait for the thread to finish."""
        if self._thread is None or self._loop is None:
            return
        loop, stopping = self._loop, self._stopping
        if stopping is not None:
            loop.call_soon_threadsafe(stopping.set)
        self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        tasks = [asyncio.create_task(self._watch(target)) for target in self._targets]
        await self._stopping.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch(self, target: _ProbeTarget) -> None:
        """Probe one target forever, at a fixed interval, updating the table."""
        streak = 0
        check = target.check
        while True:
            started = time.monotonic()
            healthy, reason = await probe(target.host, target.port, check.path, check.timeout)
            latency_us = int((time.monotonic() - started) * 1e6)
            streak = _next_streak(streak, healthy)
            self._table.record_probe(target.slot, streak, time.time_ns(), latency_us if healthy else 0)
            self._apply(target, streak, reason)
            await asyncio.sleep(max(0.0, check.interval - (time.monotonic() - started)))

    def _apply(self, target: _ProbeTarget, streak: int, reason: str) -> None:
        """Mark the target up or down when its streak crosses a threshold."""
        is_up = self._table.is_up(target.slot)
        if is_up and streak <= -target.check.unhealthy_after:
            self._table.set_up(target.slot, False)
            log.warning("target down upstream=%s target=%s failures=%d reason=%s", target.upstream, target.url, -streak, reason)
        elif not is_up and streak >= target.check.healthy_after:
            self._table.set_up(target.slot, True)
            log.info("target up upstream=%s target=%s successes=%d", target.upstream, target.url, streak)


def _next_streak(streak: int, healthy: bool) -> int:
    """Extend a run of equal results, or start a new one; negative counts failures."""
    if healthy:
        return streak + 1 if streak > 0 else 1
    return streak - 1 if streak < 0 else -1


def _probe_targets(config: Config) -> list[_ProbeTarget]:
    slots = target_slots(config)
    targets = []
    for name, upstream in config.upstreams.items():
        if upstream.health is None:
            continue
        for index, target in enumerate(upstream.target_list()):
            parts = urlsplit(target.url)
            assert parts.hostname is not None and parts.port is not None
            targets.append(_ProbeTarget(name, target.url, parts.hostname, parts.port, slots[name] + index, upstream.health))
    return targets
