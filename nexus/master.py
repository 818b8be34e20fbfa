"""The master process: owns the sockets and shared memory, supervises workers.

The master binds the listening sockets, creates the shared-memory tables,
forks one worker per slot (pinned to a CPU) and runs the active health
checks and, with `redis:` configured, the rate-limit sync thread
(`nexus.redis_sync`). Then it loops. Each pass waits for a signal or a timeout, handles
queued signals, reaps exited workers, kills workers whose heartbeat stopped
and starts workers for empty slots. Signal handlers only queue the signal
and wake the loop, so all work and all logging happen in the loop.

Each worker belongs to a generation. There is one generation today. A
config reload will start the next generation on the same sockets and drain
the old one, which is why workers are tracked with their generation.
"""

from __future__ import annotations

import enum
import logging
import os
import select
import signal
import socket
import time
from dataclasses import dataclass, field

from nexus.config import Config
from nexus.health import HealthChecker
from nexus.listeners import Listener, bind_listeners
from nexus.redis_sync import RedisSync
from nexus.shm.state import SharedState
from nexus.shm.workers import WorkerState
from nexus.telemetry import build_layout
from nexus.workers import exitcodes
from nexus.workers.process import WorkerSpec, run_worker

__all__ = ["Master"]

log = logging.getLogger("nexus.master")

# A serving worker whose heartbeat is older than this is killed, in seconds.
HEARTBEAT_TIMEOUT = 10.0
# A worker that is not serving this long after its fork is killed, in seconds.
BOOT_TIMEOUT = 30.0
# A worker that exits sooner than this after its start counts as a crash
# loop, and its restart is delayed exponentially up to MAX_RESTART_DELAY.
STABLE_AFTER = 5.0
MAX_RESTART_DELAY = 10.0
# How long the loop sleeps when nothing happens, in seconds.
LOOP_INTERVAL = 0.25


class MasterState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


@dataclass(slots=True)
class _Worker:
    """The master's record of one forked worker process."""

    pid: int
    slot: int
    generation: int
    cpu: int | None
    started: float
    kill_sent: bool = False


@dataclass(slots=True)
class _Slot:
    """Restart bookkeeping for one worker slot, across the processes that fill it."""

    crashes: int = 0
    restart_at: float = 0.0


@dataclass(slots=True)
class _Signals:
    """Signals received but not handled yet, and the pipe that wakes the loop."""

    read_fd: int
    write_fd: int
    pending: list[int] = field(default_factory=list)


class Master:
    """Runs the gateway: call `run()` and it returns the process exit status."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.generation = 1
        self.state = MasterState.STARTING
        self.workers: dict[int, _Worker] = {}
        self.listeners: list[Listener] = []
        self._slots = [_Slot() for _ in range(config.worker_count())]
        self._cpus = sorted(os.sched_getaffinity(0))
        self._signals: _Signals | None = None
        self.health_checker: HealthChecker | None = None
        self.redis_sync: RedisSync | None = None
        self._exit_status = 0

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; return the exit status for the process."""
        self._install_signals()
        try:
            self.listeners = bind_listeners(self.config.listen)
        except OSError as exc:
            log.error("%s", exc.strerror)
            return 1
        for listener in self.listeners:
            log.info("listening address=%s", listener.address)

        self._create_shared_memory()
        self.health_checker = HealthChecker(self.config, self.health)
        self.health_checker.start()
        if self.config.redis is not None:
            self.redis_sync = RedisSync(self.config.redis, self.shared.gcra, self.shared.quotas, self._node_id())
            self.redis_sync.start()
        log.info(
            "master started pid=%d workers=%d generation=%d", os.getpid(), len(self._slots), self.generation
        )

        self.state = MasterState.RUNNING
        try:
            self._reconcile()
            self._loop()
        finally:
            self._stop()
        return self._exit_status

    def _create_shared_memory(self) -> None:
        self.metric_layout = build_layout(self.config)
        self.shared = SharedState.create(self.config, len(self._slots), self.metric_layout)
        self.health = self.shared.health
        self.worker_table = self.shared.workers
        log.info(
            "shared memory created %s",
            " ".join(f"{name}={size}" for name, size in self.shared.sizes().items()),
        )

    def _node_id(self) -> str:
        """Return the configured node id, else hostname:port of the first listener."""
        assert self.config.redis is not None
        if self.config.redis.node_id:
            return self.config.redis.node_id
        port = self.listeners[0].address.rsplit(":", 1)[1]
        return f"{socket.gethostname()}:{port}"

    def _install_signals(self) -> None:
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signals = _Signals(read_fd, write_fd)
        signal.set_wakeup_fd(write_fd)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, self._queue_signal)

    def _queue_signal(self, signum: int, frame: object) -> None:
        assert self._signals is not None
        self._signals.pending.append(signum)

    def _wait(self, timeout: float) -> None:
        """Sleep until a signal arrives or `timeout` seconds pass."""
        assert self._signals is not None
        try:
            ready, _, _ = select.select([self._signals.read_fd], [], [], timeout)
        except InterruptedError:
            return
        if ready:
            try:
                while os.read(self._signals.read_fd, 4096):
                    pass
            except BlockingIOError:
                pass

    def _loop(self) -> None:
        while self.state is MasterState.RUNNING:
            self._wait(LOOP_INTERVAL)
            self._handle_signals()
            self._reap()
            if self.state is not MasterState.RUNNING:
                break
            self._check_heartbeats()
            self._reconcile()

    def _handle_signals(self) -> None:
        assert self._signals is not None
        pending, self._signals.pending = self._signals.pending, []
        for signum in pending:
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("stopping signal=%s", signal.Signals(signum).name)
                self.state = MasterState.STOPPING
            elif signum == signal.SIGHUP:
                log.warning("reload requested but not supported yet: restart the service to apply a new config")

    def _reap(self) -> None:
        """Collect every exited worker without blocking."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self._find(pid)
            if worker is None:
                continue
            del self.workers[worker.slot]
            self.worker_table.set_state(worker.slot, WorkerState.EXITED)
            # Give back the upstream slots the worker held, before its
            # replacement starts (which may be seconds away in a crash loop).
            self.shared.concurrency.reclaim_worker(worker.slot)
            self._on_exit(worker, status)

    def _find(self, pid: int) -> _Worker | None:
        for worker in self.workers.values():
            if worker.pid == pid:
                return worker
        return None

    def _on_exit(self, worker: _Worker, status: int) -> None:
        """Log how a worker ended and schedule its slot's restart."""
        lived = time.monotonic() - worker.started
        description = _describe_status(status)
        if self.state is MasterState.RUNNING and os.WIFEXITED(status) and os.WEXITSTATUS(status) == exitcodes.BOOT_ERROR:
            log.error("worker failed to boot worker=%d pid=%d: stopping, see the worker's error above", worker.slot, worker.pid)
            self._exit_status = exitcodes.BOOT_ERROR
            self.state = MasterState.STOPPING
            return
        if self.state is not MasterState.RUNNING:
            log.info("worker exited worker=%d pid=%d status=%s", worker.slot, worker.pid, description)
            return

        slot = self._slots[worker.slot]
        slot.crashes = slot.crashes + 1 if lived < STABLE_AFTER else 0
        delay = 0.0 if slot.crashes == 0 else min(MAX_RESTART_DELAY, 0.1 * 2 ** (slot.crashes - 1))
        slot.restart_at = time.monotonic() + delay
        log.error(
            "worker exited unexpectedly worker=%d pid=%d status=%s lived_s=%.1f restart_in_s=%.1f",
            worker.slot,
            worker.pid,
            description,
            lived,
            delay,
        )

    def _check_heartbeats(self) -> None:
        """Kill workers that stopped beating or never finished booting."""
        now = time.monotonic()
        for worker in self.workers.values():
            if worker.kill_sent:
                continue
            state = self.worker_table.state(worker.slot)
            if state is WorkerState.BOOTING and now - worker.started > BOOT_TIMEOUT:
                reason = f"not serving {BOOT_TIMEOUT:g} s after start"
            elif state is WorkerState.SERVING and _age(self.worker_table.heartbeat_ns(worker.slot)) > HEARTBEAT_TIMEOUT:
                reason = f"no heartbeat for {HEARTBEAT_TIMEOUT:g} s"
            else:
                continue
            log.error("killing stuck worker worker=%d pid=%d reason=%s", worker.slot, worker.pid, reason)
            _kill(worker.pid, signal.SIGKILL)
            worker.kill_sent = True

    def _reconcile(self) -> None:
        """Start a worker in every empty slot whose restart time has come."""
        now = time.monotonic()
        for slot_id, slot in enumerate(self._slots):
            if slot_id not in self.workers and slot.restart_at <= now:
                self._spawn(slot_id)

    def _cpu_for(self, slot_id: int) -> int | None:
        """Return the CPU to pin a slot's worker to, or None with more workers than CPUs."""
        if len(self._slots) > len(self._cpus):
            return None
        return self._cpus[slot_id % len(self._cpus)]

    def _spawn(self, slot_id: int) -> None:
        cpu = self._cpu_for(slot_id)
        spec = WorkerSpec(
            slot=slot_id,
            generation=self.generation,
            cpu=cpu,
            config=self.config,
            listen_fds=[listener.fileno() for listener in self.listeners],
            shared=self.shared,
            metric_layout=self.metric_layout,
            master_fds=[self._signals.read_fd, self._signals.write_fd] if self._signals else [],
            master_pid=os.getpid(),
        )
        self.worker_table.reset(slot_id, 0, self.generation, cpu if cpu is not None else 0, time.time_ns())
        _flush_logs()
        pid = os.fork()
        if pid == 0:
            run_worker(spec)
        self.worker_table.reset(slot_id, pid, self.generation, cpu if cpu is not None else 0, time.time_ns())
        self.workers[slot_id] = _Worker(pid, slot_id, self.generation, cpu, time.monotonic())
        log.info("worker started worker=%d pid=%d cpu=%s generation=%d", slot_id, pid, cpu, self.generation)

    def _stop(self) -> None:
        """Drain workers up to the shutdown timeout, then kill the rest."""
        self.state = MasterState.STOPPING
        deadline = time.monotonic() + self.config.shutdown_timeout
        for worker in self.workers.values():
            _kill(worker.pid, signal.SIGTERM)
        while self.workers and time.monotonic() < deadline:
            self._wait(min(LOOP_INTERVAL, max(0.0, deadline - time.monotonic())))
            if self._signals is not None:
                # Signals during the drain change nothing: the stop is under way.
                self._signals.pending.clear()
            self._reap()
        for worker in list(self.workers.values()):
            log.warning("worker did not finish draining in time worker=%d pid=%d: killing", worker.slot, worker.pid)
            _kill(worker.pid, signal.SIGKILL)
        while self.workers:
            self._reap()
            if self.workers:
                time.sleep(0.01)
        if self.health_checker is not None:
            self.health_checker.stop()
        if self.redis_sync is not None:
            self.redis_sync.stop()
        for listener in self.listeners:
            listener.sock.close()
        log.info("master stopped pid=%d status=%d", os.getpid(), self._exit_status)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.WEXITSTATUS(status)}"


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _age(monotonic_ns: int) -> float:
    return (time.monotonic_ns() - monotonic_ns) / 1e9


def _flush_logs() -> None:
    """Flush log handlers so a forked child does not write the parent's buffer again."""
    for handler in logging.getLogger().handlers:
        handler.flush()
