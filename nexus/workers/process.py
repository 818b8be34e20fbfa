"""The worker process: what runs in the child after the master forks.

`run_worker` never returns: it pins the CPU, resets the signal handlers
inherited from the master, builds the gateway, serves until SIGTERM or
SIGINT, and leaves with `os._exit` so no master code runs in the child.

Signals from the master: SIGUSR1 starts the drain. The worker stops
accepting connections, and every response on the ones it has carries
`Connection: close`, so keep-alive downstreams leave before the worker
stops. SIGTERM closes idle connections, finishes the requests in flight
and exits. A reload sends SIGUSR1, then SIGTERM half a second later
(`nexus.master`).

Exit statuses are a protocol with the master (`nexus.workers.exitcodes`).
A worker exits 0 after a clean drain. It exits BOOT_ERROR when it could not
start, for example on a config it cannot use or a dependency that fails to
import, so the master stops instead of restarting it in a loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import time
from dataclasses import dataclass

import uvloop

from nexus.config import Config
from nexus.gateway import Gateway
from nexus.shm.metrics import MetricLayout
from nexus.shm.state import SharedState
from nexus.shm.workers import WorkerState
from nexus.workers import exitcodes
from nexus.workers.granian_server import ServerSettings, serve

__all__ = ["WorkerSpec", "run_worker"]

log = logging.getLogger("nexus.worker")

# prctl option from <linux/prctl.h>.
_PR_SET_PDEATHSIG = 1

# How often a worker refreshes its heartbeat in the worker table, in seconds.
HEARTBEAT_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a forked worker needs from the master."""

    slot: int
    generation: int
    cpu: int | None
    config: Config
    listen_fds: list[int]
    shared: SharedState
    metric_layout: MetricLayout
    master_fds: list[int]
    master_pid: int


def run_worker(spec: WorkerSpec) -> None:
    """Run one worker process to completion and exit; never returns."""
    status = exitcodes.BOOT_ERROR
    try:
        status = _run(spec)
    except BaseException:
        log.exception("worker crashed worker=%d pid=%d", spec.slot, os.getpid())
        status = exitcodes.CRASH
    finally:
        logging.shutdown()
        os._exit(status)


def _run(spec: WorkerSpec) -> int:
    _reset_process(spec)
    pid = os.getpid()
    try:
        loop, gateway = _boot(spec)
    except Exception:
        log.exception("worker failed to boot worker=%d pid=%d", spec.slot, pid)
        return exitcodes.BOOT_ERROR

    heartbeat = _Heartbeat(loop, spec, gateway)
    heartbeat.start()
    settings = ServerSettings(
        worker_id=spec.slot,
        header_read_timeout_ms=int(spec.config.limits.header_timeout * 1000),
    )

    def on_drain() -> None:
        if gateway.draining:
            return
        spec.shared.workers.set_state(spec.slot, WorkerState.DRAINING)
        gateway.begin_drain()
        log.info("worker draining worker=%d pid=%d generation=%d", spec.slot, pid, spec.generation)

    spec.shared.workers.set_state(spec.slot, WorkerState.SERVING)
    log.info("worker serving worker=%d pid=%d cpu=%s generation=%d", spec.slot, pid, spec.cpu, spec.generation)
    serve(gateway, spec.listen_fds, settings, loop, on_drain)

    heartbeat.stop()
    loop.run_until_complete(gateway.shutdown())
    spec.shared.workers.set_state(spec.slot, WorkerState.EXITED)
    log.info("worker stopped worker=%d pid=%d requests=%d", spec.slot, pid, gateway.requests_done)
    return exitcodes.OK


def _reset_process(spec: WorkerSpec) -> None:
    """Undo what the child inherited from the master and pin its CPU."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_DFL)
    # A drain request that arrives while the worker boots must not kill it
    # (the default action of SIGUSR1); SIGTERM follows it anyway.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)
    for fd in spec.master_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    if spec.cpu is not None:
        os.sched_setaffinity(0, {spec.cpu})
    _stop_with_parent(spec.master_pid)


def _stop_with_parent(master_pid: int) -> None:
    """Ask the kernel for SIGTERM when the master dies, so no worker is orphaned.

    A master killed with SIGKILL cannot stop its workers itself. The check
    after prctl covers a master that died before the request was made.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("cannot set parent-death signal: %s", os.strerror(ctypes.get_errno()))
    if os.getppid() != master_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def _boot(spec: WorkerSpec) -> tuple[asyncio.AbstractEventLoop, Gateway]:
    """Create the event loop and the gateway, and open upstream clients."""
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    gateway = Gateway(spec.config, spec.shared, spec.metric_layout, spec.slot)
    loop.run_until_complete(gateway.startup())
    # What exists now (modules, config, tables) lives as long as the worker.
    # Frozen, these tens of thousands of objects are no longer walked in
    # every full collection.
    gc.freeze()
    return loop, gateway


class _Heartbeat:
    """Refreshes the worker's heartbeat and request count in the worker table."""

    def __init__(self, loop: asyncio.AbstractEventLoop, spec: WorkerSpec, gateway: Gateway) -> None:
        self._loop = loop
        self._spec = spec
        self._gateway = gateway
        self._reported = 0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._beat()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._flush()

    def _beat(self) -> None:
        if os.getppid() != self._spec.master_pid:
            # The parent-death signal covers this; this check is the fallback
            # if it was lost, so an orphan drains within a second.
            log.warning("master is gone, stopping worker=%d pid=%d", self._spec.slot, os.getpid())
            os.kill(os.getpid(), signal.SIGTERM)
        self._spec.shared.workers.beat(self._spec.slot, time.monotonic_ns())
        self._flush()
        self._handle = self._loop.call_later(HEARTBEAT_INTERVAL, self._beat)

    def _flush(self) -> None:
        done = self._gateway.requests_done
        self._spec.shared.workers.add_requests(self._spec.slot, done - self._reported)
        self._reported = done
