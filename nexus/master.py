"""The master process: owns the sockets and shared memory, supervises worker generations.

The master binds the listening sockets (or takes them from systemd or from
the master it replaces), creates the shared-memory tables, starts its
services and forks one worker per slot, pinned to a CPU. Then it loops.
Each pass waits for a signal, an admin request or a timeout, reaps exited
workers, kills workers whose heartbeat stopped, moves draining generations
on, starts workers for empty slots and runs queued requests. Signal
handlers and admin threads only queue work and wake the loop through one
pipe, so all work and all logging happen in the loop.

Changes of the running set of workers:
- reload (SIGHUP, `request_reload`): read and check the config file, start
  generation N+1 on the same sockets, wait until each of its workers
  serves, then drain generation N (`nexus.generation`). A rejected or
  failed reload leaves generation N serving as it was.
- upgrade (SIGUSR2, `request_upgrade`): start a new master process from the
  installed code and hand it the sockets and shared memory
  (`nexus.handoff`); once its workers serve, drain ours and exit 0. If it
  fails, kill it and keep serving.
- drain and resume (`drain`, `resume`): stop serving for maintenance, and
  start a fresh generation again.

The upgrade's steps are in `nexus.upgrade`, and its fault injection hook
for tests (NEXUS_TEST_FAULT) is described there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import select
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from nexus import handoff
from nexus.admin import AdminServer, AdminSocketError
from nexus.config import Config, ConfigError, load_config, parse_listen_address
from nexus.generation import Counters, Generation, GenerationState, SlotRestarts, Worker
from nexus.health import HealthChecker
from nexus.listeners import Listener, bind_listeners
from nexus.master_requests import GENERATION_ACTIONS, QUICK_ACTIONS, Request, RequestQueue
from nexus.redis_sync import RedisSync
from nexus.sd_notify import Notifier, Watchdog
from nexus.services import AdminError, Service, master_services
from nexus.shm.metrics import MetricLayout, MetricSlots, SlotSums, fold_tables, sum_tables
from nexus.shm.ring import RingSet
from nexus.shm.state import SharedState, table_shape
from nexus.shm.workers import WorkerState
from nexus.socket_activation import SocketActivationError, activated_sockets
from nexus.telemetry import build_layout
from nexus.workers import exitcodes
from nexus.supervision import (
    MasterState,
    StartError,
    age_seconds,
    describe_wait_status,
    flush_logs,
    is_alive,
    node_id,
    send_signal,
)
from nexus.upgrade import NewMaster, UpgradeSteps
from nexus.workers.process import WorkerSpec, run_worker

__all__ = ["Master", "MasterState"]

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
# Seconds between asking a draining generation to close keep-alive
# connections (SIGUSR1: `Connection: close` on each response) and stopping
# it (SIGTERM). A downstream with a request in flight or sending a steady
# stream gets its response with `Connection: close` in this time and opens
# its next connection to the new generation, instead of having its idle
# connection closed under a request it is about to send.
KEEPALIVE_CLOSE_GRACE = 0.5
# Margin over the reload and drain deadlines that an admin caller waits, in seconds.
REQUEST_MARGIN = 15.0


# Signals that request an admin action. No caller waits for the result, which is logged.
_SIGNAL_ACTIONS = {signal.SIGHUP: "reload", signal.SIGUSR2: "upgrade"}


class Master(UpgradeSteps):
    """Runs the gateway: call `run()` and it returns the process exit status.

    `status`, `request_reload`, `request_upgrade`, `drain` and `resume` may
    be called from any thread but the one running `run()`: they queue the
    request for the master loop and wait for its result, and raise
    AdminError with a message that says what failed and what to do.
    """

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.config = config
        # The table sizes this master created or attached; reloads cannot change them.
        self._sizes_in_effect = config.shared_memory
        self.config_path = os.path.abspath(config_path) if config_path else None
        self.generation = 0
        self.state = MasterState.STARTING
        self.shared: SharedState | None = None
        self.metric_layout: MetricLayout | None = None
        self.node_id = node_id(config, [])
        self.services: list[Service] = []
        # What the previous master's services handed over on an upgrade, by
        # service name (see Service.handoff); empty on a fresh start.
        self.inherited: dict[str, Any] = {}
        self.redis_sync: RedisSync | None = None
        self.started_at = time.time()
        self._config_hash = _file_hash(self.config_path)
        self._active: Generation | None = None
        self._generations: list[Generation] = []
        self._workers: dict[int, Worker] = {}
        self._restarts: dict[int, SlotRestarts] = {}
        self._metric_tables: list[tuple[MetricLayout, MetricSlots]] = []
        # Held while a scrape sums the metric tables and while retired ones
        # are folded and unmapped, so a scrape never reads an unmapped one.
        self._metrics_lock = threading.Lock()
        self._shape: dict[str, list] = table_shape(config)
        self._bank_base = 0
        self._cpus = sorted(os.sched_getaffinity(0))
        self._counters = Counters(started_at=self.started_at)
        self._requests = RequestQueue()
        self._wake_read = self._wake_write = -1
        self._pending_signals: list[int] = []
        self._notifier = Notifier.from_environment()
        self._watchdog = Watchdog.from_environment(self._notifier)
        self._admin: AdminServer | None = None
        # Sockets passed by systemd: never closed, and served instead of `listen`.
        self._activated_fds: set[int] = set()
        self._activated: list[Listener] = []
        # Sockets taken over from the old master until a generation uses them.
        self._spare_listeners: list[Listener] = []
        # Whether systemd sees this process as the service's main process.
        self._is_main = handoff.UPGRADE_FD_ENV not in os.environ
        self._predecessor_pid: int | None = None
        self._new_master: NewMaster | None = None
        self._upgrade_sock: socket.socket | None = None
        self._handed_over = False
        self._ready_notified = False
        self._exit_status = 0

    # The API for the admin server's thread

    def metric_tables(self) -> list[tuple[MetricLayout, MetricSlots]]:
        """Return every metric table with counts of this node: retired generations' first, current one last.

        Summing a counter over all of them never goes backwards across
        reloads and upgrades: the counts of retired tables are kept, folded
        into one table (`_fold_retired_metrics`).
        """
        with self._metrics_lock:
            return list(self._metric_tables)

    def metric_sums(self) -> SlotSums:
        """Sum every counter and histogram over all metric tables, for a scrape."""
        with self._metrics_lock:
            return sum_tables(self._metric_tables)

    def ring_sources(self) -> list[tuple[Config, RingSet, range]]:
        """(config, rings, slots) of each live generation: whose records its rings hold, named by which config."""
        return [(generation.config, generation.shared.rings, generation.slots) for generation in list(self._generations)]

    def counters(self) -> dict[str, Any]:
        counters = self._counters
        return {
            "worker_restarts": counters.worker_restarts,
            "reloads": counters.reloads,
            "reloads_failed": counters.reloads_failed,
            "upgrades_failed": counters.upgrades_failed,
            "generation": self.generation,
            "started_at": self.started_at,
            "worker_slots": [slot for generation in list(self._generations) for slot in generation.slots],
        }

    def status(self) -> dict[str, Any]:
        return self._call("status", 10.0)

    def request_reload(self) -> dict[str, Any]:
        return self._call("reload", self._change_timeout())

    def request_upgrade(self) -> dict[str, Any]:
        return self._call("upgrade", self._change_timeout())

    def drain(self) -> dict[str, Any]:
        return self._call("drain", 10.0)

    def resume(self) -> dict[str, Any]:
        return self._call("resume", self._change_timeout())

    def _change_timeout(self) -> float:
        # A change may first wait for an older generation's drain, then boot a new one.
        return self.config.shutdown_timeout + KEEPALIVE_CLOSE_GRACE + self.config.reload_timeout + REQUEST_MARGIN

    def _call(self, action: str, timeout: float) -> Any:
        """Queue `action` for the master loop and wait for its result."""
        if threading.current_thread() is threading.main_thread():
            raise RuntimeError("Master requests are for other threads; the master loop runs in the main thread")
        if self._wake_write < 0 or self.state is MasterState.STOPPING:
            raise AdminError(503, f"the master is {self.state.value}, not serving requests: retry once it runs")
        return self._requests.submit(action, timeout)

    # Start and stop

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT, or until a new master took over; return the exit status."""
        self._install_signals()
        try:
            if handoff.UPGRADE_FD_ENV in os.environ:
                self._start_from_handoff()
            else:
                self._start_fresh()
        except StartError as exc:
            log.error("master cannot start pid=%d: %s", os.getpid(), exc)
            self._exit_status = exc.status
            self._stop()
            return exc.status

        self.state = MasterState.RUNNING
        try:
            self._loop()
        finally:
            self._stop()
        return self._exit_status

    def _start_fresh(self) -> None:
        listeners = self._first_listeners()
        for listener in listeners:
            log.info("listening address=%s", listener.address)
        self.node_id = node_id(self.config, listeners)

        layout = build_layout(self.config)
        shared = SharedState.create_for(self.config, layout)
        log.info("shared memory created %s", " ".join(f"{name}={size}" for name, size in shared.sizes().items()))
        _warn_memory(sum(shared.sizes().values()))
        generation = self._new_generation(self.config, self._config_hash, shared, layout, listeners, 1, 0)
        self._activate(generation)
        self._start_services(fresh=True)
        self._start_admin(replace_live=False)
        self._start_redis_sync()
        log.info(
            "master started pid=%d workers=%d generation=%d", os.getpid(), len(generation.slots), generation.number
        )
        self._reconcile()

    def _first_listeners(self) -> list[Listener]:
        """Take the sockets systemd passed, or bind the configured addresses."""
        try:
            activated = activated_sockets()
        except SocketActivationError as exc:
            # Exit status 2, as for an invalid config: the socket unit is
            # wrong, and systemd must not restart into the same error.
            raise StartError(str(exc), status=2) from None
        if activated:
            self._activated_fds = {passed.fd for passed in activated}
            self._activated = [passed.listener for passed in activated]
            log.info("serving the sockets systemd passed; `listen` in the config is not used")
            passed_addresses = self._listen_mismatch(self.config)
            if passed_addresses is not None:
                log.warning("listen %s differs from the sockets systemd passed (%s): serving those", ", ".join(self.config.listen), passed_addresses)
            return [passed.listener for passed in activated]
        try:
            return bind_listeners(self.config.listen)
        except OSError as exc:
            raise StartError(exc.strerror) from None

    def _start_services(self, fresh: bool = False) -> None:
        """Build and start the services; on a fresh start, first let each refuse what it cannot serve (StartError)."""
        self.services = master_services(self)
        if fresh:
            for service in self.services:
                startup_check = getattr(service, "startup_check", None)
                if startup_check is not None:
                    startup_check()
        for service in self.services:
            service.start()

    def _stop_services(self) -> dict[str, Any]:
        """Stop every service (once) and return what each hands to a successor, by name."""
        services, self.services = self.services, []
        for service in reversed(services):
            service.stop()
        return {service.name: service.handoff() for service in services if hasattr(service, "handoff")}

    def _start_admin(self, replace_live: bool) -> None:
        admin = AdminServer(self, self.services)
        try:
            admin.start(replace_live=replace_live)
        except AdminSocketError as exc:
            # The gateway serves without it; only nexusctl cannot reach this master.
            log.error("admin API not available: %s", exc)
            return
        self._admin = admin

    def _start_redis_sync(self) -> None:
        if self.config.redis is None or self.shared is None:
            return
        self.redis_sync = RedisSync(self.config.redis, self.shared.gcra, self.shared.quotas, self.node_id)
        self.redis_sync.start()

    def _stop_redis_sync(self) -> None:
        if self.redis_sync is not None:
            self.redis_sync.stop()
            self.redis_sync = None

    def _stop(self) -> None:
        """Drain every generation up to its deadline, kill the rest, stop services and close sockets."""
        self.state = MasterState.STOPPING
        if self._is_main and not self._handed_over:
            self._notifier.stopping("stopping")
        # After a handover the new master's workers take the keep-alive downstreams.
        grace = KEEPALIVE_CLOSE_GRACE if self._handed_over else 0.0
        for generation in list(self._generations):
            if generation.state is GenerationState.BOOTING:
                self._discard(generation)
            elif generation.state is GenerationState.ACTIVE:
                self._begin_drain(generation, grace)
        while self._workers:
            self._wait(LOOP_INTERVAL)
            # A drain may take up to shutdown_timeout, as long as WatchdogSec.
            if self._is_main:
                self._watchdog.ping_if_due()
            # The stop is under way: signals change nothing.
            for signum in self._pending_signals:
                if signum in _SIGNAL_ACTIONS:
                    log.warning("%s ignored signal=%s: this master is stopping", _SIGNAL_ACTIONS[signum], signal.Signals(signum).name)
            self._pending_signals.clear()
            self._reap()
            self._advance_drains()
            self._answer(stopping=True)
        self._answer(stopping=True)
        if self._new_master is not None:
            self._rollback(self._new_master, "the old master is stopping")
        self._stop_services()
        if self._admin is not None:
            self._admin.stop()
        self._stop_redis_sync()
        for generation in list(self._generations):
            self._retire(generation)
        log.info("master stopped pid=%d status=%d", os.getpid(), self._exit_status)

    # Signals and the loop

    def _install_signals(self) -> None:
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._requests.wake_fd = self._wake_write
        signal.set_wakeup_fd(self._wake_write)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2, signal.SIGCHLD):
            signal.signal(signum, self._queue_signal)

    def _queue_signal(self, signum: int, frame: object) -> None:
        self._pending_signals.append(signum)

    def _wait(self, timeout: float) -> None:
        """Sleep until a signal or request arrives or `timeout` seconds pass."""
        try:
            ready, _, _ = select.select([self._wake_read], [], [], timeout)
        except InterruptedError:
            return
        if ready:
            try:
                while os.read(self._wake_read, 4096):
                    pass
            except BlockingIOError:
                pass

    def _loop(self) -> None:
        while self.state is not MasterState.STOPPING:
            self._tick(LOOP_INTERVAL)
            if self.state is MasterState.STOPPING:
                break
            self._answer()

    def _tick(self, timeout: float) -> None:
        """One pass of supervision; the reload and upgrade waits run it too."""
        self._wait(timeout)
        self._handle_signals()
        self._reap()
        if self.state is MasterState.STOPPING:
            return
        self._check_heartbeats()
        self._advance_drains()
        self._reconcile()
        self._notify_first_ready()
        if self._is_main:
            self._watchdog.ping_if_due()
        self._answer(quick_only=True)

    def _handle_signals(self) -> None:
        pending, self._pending_signals = self._pending_signals, []
        for signum in pending:
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("stopping signal=%s", signal.Signals(signum).name)
                self.state = MasterState.STOPPING
            elif signum in _SIGNAL_ACTIONS:
                action = _SIGNAL_ACTIONS[signum]
                log.info("%s requested signal=%s", action, signal.Signals(signum).name)
                self._requests.add(action)

    def _answer(self, *, quick_only: bool = False, stopping: bool = False) -> None:
        """Run the queued requests that may run now; the others stay queued in order."""
        queued = self._requests.take()
        waiting: deque[Request] = deque()
        while queued:
            request = queued.popleft()
            if stopping and request.action not in QUICK_ACTIONS:
                # A request from a signal has no caller to return the error to, so it is logged.
                log.warning("%s not done: this master is stopping (after an upgrade, ask the new master)", request.action)
                request.finish(error=AdminError(503, f"the master is stopping, so {request.action} was not done: retry once a master runs"))
            elif request.action in QUICK_ACTIONS or not (quick_only or self._must_wait(request.action)):
                self._run_request(request)
            else:
                waiting.append(request)
        self._requests.put_back(waiting)

    def _must_wait(self, action: str) -> bool:
        if action not in GENERATION_ACTIONS:
            return False
        if any(generation.state is GenerationState.DRAINING for generation in self._generations):
            return True
        if self._predecessor_pid is not None and is_alive(self._predecessor_pid):
            return True
        self._predecessor_pid = None
        return False

    def _run_request(self, request: Request) -> None:
        handlers: dict[str, Callable[[], Any]] = {
            "status": self._status,
            "reload": self._reload,
            "upgrade": self._upgrade,
            "drain": self._drain,
            "resume": self._resume,
        }
        try:
            request.finish(result=handlers[request.action]())
        except AdminError as exc:
            # A rejection (409: drained, address in use) is logged nowhere else,
            # and a request from a signal has no caller to see it.
            if exc.status == 409:
                log.warning("%s rejected: %s", request.action, exc.message)
            request.finish(error=exc)
        except Exception as exc:
            log.exception("%s failed", request.action)
            request.finish(error=AdminError(500, f"{request.action} failed: {exc}: see the master log"))

    # Workers

    def _reap(self) -> None:
        """Collect every exited child without blocking."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self._new_master is not None and pid == self._new_master.pid:
                self._new_master.status = status
                continue
            worker = self._workers.pop(pid, None)
            if worker is None:
                continue
            shared = worker.generation.shared
            shared.workers.set_state(worker.slot, WorkerState.EXITED)
            # Give back the upstream slots the worker held, before its
            # replacement starts (which may be seconds away in a crash loop).
            shared.concurrency.reclaim_worker(worker.slot)
            self._on_exit(worker, status)

    def _on_exit(self, worker: Worker, status: int) -> None:
        """Log how a worker ended and schedule its slot's restart when it belongs to the active generation."""
        generation = worker.generation
        description = describe_wait_status(status)
        if generation.state is GenerationState.BOOTING:
            generation.failure = f"worker={worker.slot} pid={worker.pid} exited ({description}) before it served"
            log.error("worker exited before serving worker=%d pid=%d generation=%d status=%s", worker.slot, worker.pid, generation.number, description)
            return
        if generation is not self._active or self.state is MasterState.STOPPING:
            log.info("worker exited worker=%d pid=%d generation=%d status=%s", worker.slot, worker.pid, generation.number, description)
            return
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == exitcodes.BOOT_ERROR:
            log.error("worker failed to boot worker=%d pid=%d: stopping, see the worker's error above", worker.slot, worker.pid)
            self._exit_status = exitcodes.BOOT_ERROR
            self.state = MasterState.STOPPING
            return

        lived = time.monotonic() - worker.started
        slot = self._restarts[worker.slot]
        slot.crashes = slot.crashes + 1 if lived < STABLE_AFTER else 0
        slot.restarts += 1
        self._counters.worker_restarts += 1
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
        for worker in self._workers.values():
            if worker.kill_sent:
                continue
            table = worker.generation.shared.workers
            state = table.state(worker.slot)
            if state is WorkerState.BOOTING and now - worker.started > BOOT_TIMEOUT:
                reason = f"not serving {BOOT_TIMEOUT:g} s after start"
            elif state is WorkerState.SERVING and age_seconds(table.heartbeat_ns(worker.slot)) > HEARTBEAT_TIMEOUT:
                reason = f"no heartbeat for {HEARTBEAT_TIMEOUT:g} s"
            else:
                continue
            log.error("killing stuck worker worker=%d pid=%d reason=%s", worker.slot, worker.pid, reason)
            send_signal(worker.pid, signal.SIGKILL)
            worker.kill_sent = True

    def _reconcile(self) -> None:
        """Start a worker in every empty slot of the active generation whose restart time has come."""
        generation = self._active
        if generation is None or self.state is MasterState.STOPPING:
            return
        now = time.monotonic()
        occupied = {worker.slot for worker in self._workers.values() if worker.generation is generation}
        for slot_id in generation.slots:
            if slot_id not in occupied and self._restarts[slot_id].restart_at <= now:
                self._spawn(generation, slot_id)

    def _cpu_for(self, generation: Generation, slot_id: int) -> int | None:
        """Return the CPU to pin a worker to, or None with more workers than CPUs."""
        if len(generation.slots) > len(self._cpus):
            return None
        return self._cpus[(slot_id - generation.slots.start) % len(self._cpus)]

    def _spawn(self, generation: Generation, slot_id: int) -> None:
        cpu = self._cpu_for(generation, slot_id)
        spec = WorkerSpec(
            slot=slot_id,
            generation=generation.number,
            cpu=cpu,
            config=generation.config,
            listen_fds=[listener.fileno() for listener in generation.listeners],
            shared=generation.shared,
            metric_layout=generation.metric_layout,
            master_fds=self._private_fds() + self._other_listener_fds(generation),
            master_pid=os.getpid(),
        )
        table = generation.shared.workers
        table.reset(slot_id, 0, generation.number, cpu if cpu is not None else 0, time.time_ns())
        flush_logs()
        pid = os.fork()
        if pid == 0:
            run_worker(spec)
        # Only the pid: the worker may already have moved its state to SERVING.
        table.set_pid(slot_id, pid)
        self._workers[pid] = Worker(pid, slot_id, generation, cpu, time.monotonic())
        log.info("worker started worker=%d pid=%d cpu=%s generation=%d", slot_id, pid, cpu, generation.number)

    def _private_fds(self) -> list[int]:
        """Descriptors of the master alone, which a forked worker closes."""
        fds = [self._wake_read, self._wake_write]
        for sock in (self._upgrade_sock, self._new_master.sock if self._new_master else None):
            if sock is not None and sock.fileno() >= 0:
                fds.append(sock.fileno())
        return fds

    def _other_listener_fds(self, generation: Generation) -> list[int]:
        """Listening sockets of other generations: a worker that kept one would keep it open after a reload closes it."""
        own = {listener.fileno() for listener in generation.listeners}
        others = {listener.fileno() for other in self._generations for listener in other.listeners}
        return sorted(fd for fd in others - own if fd >= 0)

    def _workers_of(self, generation: Generation) -> list[Worker]:
        return [worker for worker in self._workers.values() if worker.generation is generation]

    def _notify_first_ready(self) -> None:
        """Send READY=1 once every worker of the first generation serves."""
        if self._ready_notified or self._active is None or not self._is_serving(self._active):
            return
        self._ready_notified = True
        self._notifier.ready(self._status_line())

    def _is_serving(self, generation: Generation) -> bool:
        workers = self._workers_of(generation)
        table = generation.shared.workers
        return len(workers) == len(generation.slots) and all(
            table.state(worker.slot) is WorkerState.SERVING for worker in workers
        )

    # Generations

    def _new_generation(
        self,
        config: Config,
        config_hash: str,
        shared: SharedState,
        layout: MetricLayout,
        listeners: list[Listener],
        number: int,
        slot_base: int,
    ) -> Generation:
        """Record a generation (its workers are not started yet) and its health checker."""
        checker = HealthChecker(config, shared.health)
        checker.start()
        slots = range(slot_base, slot_base + config.worker_count())
        generation = Generation(number, config, config_hash, shared, layout, slots, listeners, checker)
        self._generations.append(generation)
        if not any(table is shared.metrics for _, table in self._metric_tables):
            with self._metrics_lock:
                self._metric_tables.append((layout, shared.metrics))
        return generation

    def _next_generation(self, config: Config, config_hash: str, listeners: list[Listener]) -> Generation:
        """Plan generation N+1 for `config` on the tables of the current one, in the other bank of slots."""
        assert self.shared is not None
        layout = build_layout(config)
        shared = self.shared.renew(self._shape, config, layout)
        slot_base = 0
        if shared.workers is self.shared.workers:
            half = shared.workers.slots // 2
            slot_base = half if self._bank_base == 0 else 0
        return self._new_generation(config, config_hash, shared, layout, listeners, self.generation + 1, slot_base)

    def _boot(self, generation: Generation) -> None:
        """Start every worker of `generation` and wait until all serve; on failure discard it and raise AdminError."""
        for slot_id in generation.slots:
            self._spawn(generation, slot_id)
        deadline = time.monotonic() + generation.config.reload_timeout
        while not self._is_serving(generation):
            if generation.failure is None and time.monotonic() > deadline:
                generation.failure = f"not every worker served within reload_timeout ({generation.config.reload_timeout:g} s)"
            if generation.failure is None and self.state is MasterState.STOPPING:
                generation.failure = "the master is stopping"
            if generation.failure is not None:
                failure = generation.failure
                self._discard(generation)
                raise AdminError(503, f"generation {generation.number} failed to start: {failure}")
            self._tick(min(LOOP_INTERVAL, 0.05))
        log.info("generation serving generation=%d workers=%d", generation.number, len(generation.slots))

    def _activate(self, generation: Generation) -> None:
        """Make `generation` the one that serves and restarts crashed workers."""
        generation.move(GenerationState.ACTIVE)
        self._active = generation
        self.config = generation.config
        self._config_hash = generation.config_hash
        self.shared = generation.shared
        self.metric_layout = generation.metric_layout
        self.generation = generation.number
        self._shape = table_shape(generation.config)
        self._bank_base = generation.slots.start
        self._restarts = {slot_id: SlotRestarts() for slot_id in generation.slots}

    def _begin_drain(self, generation: Generation, grace: float = KEEPALIVE_CLOSE_GRACE) -> None:
        """Ask `generation` to close keep-alive connections now, to stop in `grace` s, and kill it after shutdown_timeout."""
        generation.move(GenerationState.DRAINING)
        now = time.monotonic()
        generation.term_at = now + grace
        generation.kill_at = generation.term_at + generation.config.shutdown_timeout
        for worker in self._workers_of(generation):
            send_signal(worker.pid, signal.SIGUSR1 if grace > 0 else signal.SIGTERM)
        generation.term_sent = grace <= 0
        log.info("generation draining generation=%d workers=%d", generation.number, len(self._workers_of(generation)))

    def _advance_drains(self) -> None:
        """Stop, then kill, draining generations on schedule; retire those whose workers are gone."""
        now = time.monotonic()
        for generation in [g for g in self._generations if g.state is GenerationState.DRAINING]:
            workers = self._workers_of(generation)
            if not generation.term_sent and now >= generation.term_at:
                generation.term_sent = True
                for worker in workers:
                    send_signal(worker.pid, signal.SIGTERM)
            if now >= generation.kill_at:
                for worker in workers:
                    if not worker.kill_sent:
                        log.warning("worker did not finish draining in time worker=%d pid=%d: killing", worker.slot, worker.pid)
                        send_signal(worker.pid, signal.SIGKILL)
                        worker.kill_sent = True
            if not workers:
                self._retire(generation)

    def _discard(self, generation: Generation) -> None:
        """Kill the workers of a generation that never became active and forget it."""
        for worker in self._workers_of(generation):
            send_signal(worker.pid, signal.SIGKILL)
            worker.kill_sent = True
        deadline = time.monotonic() + 5.0
        while self._workers_of(generation) and time.monotonic() < deadline:
            self._wait(0.02)
            self._reap()
        self._retire(generation)

    def _retire(self, generation: Generation) -> None:
        """Forget a generation whose workers are gone: stop its health checker, close sockets no one else uses."""
        if generation.state is not GenerationState.GONE:
            generation.move(GenerationState.GONE)
        self._generations.remove(generation)
        if generation.health_checker is not None:
            generation.health_checker.stop()
        self._close_listeners(generation)
        if generation is self._active:
            self._active = None
        self._fold_retired_metrics()
        log.info("generation gone generation=%d", generation.number)

    def _close_listeners(self, generation: Generation) -> None:
        """Close the master's copy of each listener of `generation` that no other generation serves.

        Sockets systemd passed stay open, so connections wait in their queue.
        """
        in_use = {id(listener) for other in self._generations if other is not generation for listener in other.listeners}
        for listener in generation.listeners:
            if id(listener) not in in_use and listener.fileno() >= 0 and listener.fileno() not in self._activated_fds:
                log.info("listener closed address=%s", listener.address)
                listener.sock.close()

    def _fold_retired_metrics(self) -> None:
        """Fold the metric tables that no live generation writes into one, and unmap the rest.

        A reload that changes routes or upstreams gets a new table. Without
        folding, a master reloaded every few minutes would keep every table
        mapped and sum them all at each scrape.
        """
        live = {id(generation.shared.metrics) for generation in self._generations}
        retired = [entry for entry in self._metric_tables if id(entry[1]) not in live]
        if len(retired) < 2:
            return
        folded = fold_tables(retired)
        with self._metrics_lock:
            self._metric_tables = [folded, *(entry for entry in self._metric_tables if id(entry[1]) in live)]
            for _, table in retired:
                table.close()
        log.info("metric tables of retired generations folded tables=%d words=%d", len(retired), folded[0].words)

    def _addresses(self, config: Config) -> list[str]:
        """The addresses to serve: the sockets systemd passed at start, else `config.listen`."""
        return [listener.requested for listener in self._activated] if self._activated else list(config.listen)

    def _listeners_for(self, addresses: list[str]) -> list[Listener]:
        """Return listeners for `addresses`: the open ones that were asked for, newly bound for the rest."""
        open_listeners: dict[str, Listener] = {}
        # Sockets systemd passed stay open while no generation uses them (drained).
        for listener in [*self._activated, *self._spare_listeners, *(l for g in self._generations for l in g.listeners)]:
            if listener.fileno() >= 0:
                open_listeners.setdefault(listener.requested, listener)
        missing = [address for address in addresses if address not in open_listeners]
        try:
            bound = {listener.requested: listener for listener in bind_listeners(missing)}
        except OSError as exc:
            raise AdminError(409, f"{exc.strerror}; nothing was changed") from None
        for listener in bound.values():
            log.info("listening address=%s", listener.address)
        return [open_listeners.get(address) or bound[address] for address in addresses]

    # Reload

    def _reload(self) -> dict[str, Any]:
        if self.config_path is None:
            raise AdminError(409, "this master was started without a config file path: restart it with `nexus run --config FILE`")
        if self.state is MasterState.DRAINED:
            raise AdminError(409, "the gateway is drained: resume it first (`nexusctl resume`), then reload")
        self._notifier.reloading("reloading the config")
        self.state = MasterState.RELOADING
        try:
            result = self._reload_config()
        except AdminError as exc:
            self._counters.reloads_failed += 1
            log.error("reload failed generation=%d: %s", self.generation, exc.message)
            raise
        finally:
            if self.state is MasterState.RELOADING:
                self.state = MasterState.RUNNING
            self._notifier.ready(self._status_line())
        self._counters.reloads += 1
        return result

    def _check_services(self, config: Config) -> None:
        """Let each service reject a config it cannot apply, before any worker of it starts."""
        for service in self.services:
            check = getattr(service, "check", None)
            if check is None:
                continue
            try:
                check(config)
            except AdminError as exc:
                raise AdminError(
                    exc.status, f"reload rejected: {exc.message} (generation {self.generation} keeps serving; nothing was changed)"
                ) from None

    def _reload_config(self) -> dict[str, Any]:
        """Start a generation on the config file as it is now, and drain the running one."""
        assert self.config_path is not None and self._active is not None
        config = self._read_config()
        warnings = self._reload_warnings(config)
        self._check_services(config)
        previous = self._active
        listeners = self._listeners_for(self._addresses(config))
        generation = self._next_generation(config, _file_hash(self.config_path), listeners)
        try:
            self._boot(generation)
        except AdminError as exc:
            raise AdminError(exc.status, f"reload failed: {exc.message}; generation {previous.number} keeps serving, see the log of the new workers") from None

        self._activate(generation)
        self._begin_drain(previous)
        if previous.config.redis != config.redis:
            self._stop_redis_sync()
            self._start_redis_sync()
        for service in self.services:
            # The new generation serves already: a service that fails to
            # follow it is logged, and the reload still counts as done.
            try:
                service.reconfigure(config)
            except Exception:
                log.exception("service did not apply the new config service=%s generation=%d", service.name, generation.number)
        if self._admin is not None:
            self._admin.reconfigure(config)
        log.info("reload done generation=%d previous=%d config_hash=%s", generation.number, previous.number, generation.config_hash)
        result: dict[str, Any] = {
            "generation": generation.number,
            "previous_generation": previous.number,
            "config_hash": generation.config_hash,
            "workers": len(generation.slots),
        }
        if warnings:
            result["warnings"] = warnings
        return result

    def _read_config(self, action: str = "reload") -> Config:
        """Load and check the config file for `action` (reload or upgrade), or raise AdminError with `nexus check`'s message."""
        assert self.config_path is not None
        try:
            return load_config(self.config_path)
        except ConfigError as exc:
            message = str(exc)
            # As in `nexus check`: messages about the file itself start with its path.
            prefix = "" if message.startswith(self.config_path) else f"{self.config_path}: "
            raise AdminError(
                422,
                f"{action} rejected: invalid config {prefix}{message} "
                f"(generation {self.generation} keeps serving; fix the file and {action} again)",
            ) from None

    def _config_warnings(self, config: Config, action: str) -> list[str]:
        """Return what of `config` `action` (reload, upgrade) cannot apply: other table sizes, other listen addresses.

        The action goes on without it.
        """
        warnings = []
        if config.shared_memory != self._sizes_in_effect:
            warnings.append(f"shared_memory sizes differ from those in effect: they apply at the next restart, not on {action}")
        passed = self._listen_mismatch(config)
        if passed is not None:
            warnings.append(
                f"listen {', '.join(config.listen)} differs from the sockets systemd passed ({passed}), which this "
                "master serves whatever listen says: change ListenStream= in nexus.socket and restart the socket "
                "unit, or make listen match"
            )
        return warnings

    def _listen_mismatch(self, config: Config) -> str | None:
        """Under socket activation, return the passed addresses if `config.listen` names others, else None."""
        if not self._activated:
            return None
        passed = {parse_listen_address(listener.requested) for listener in self._activated}
        if {parse_listen_address(address) for address in config.listen} == passed:
            return None
        return ", ".join(listener.requested for listener in self._activated)

    def _reload_warnings(self, config: Config) -> list[str]:
        """Log and return what of `config` a reload cannot apply; the reload goes on without it."""
        warnings = self._config_warnings(config, "reload")
        for warning in warnings:
            log.warning("reload: %s", warning)
        return warnings

    # Drain and resume

    def _drain(self) -> dict[str, Any]:
        if self.state is MasterState.DRAINED or self._active is None:
            return {"state": MasterState.DRAINED.value, "generation": self.generation}
        generation = self._active
        self._active = None
        self._begin_drain(generation)
        # The workers stop accepting at once (SIGUSR1) and let go of the
        # listening sockets, so closing the master's copy makes the kernel
        # refuse new connections now rather than queue them until the
        # workers have finished.
        self._close_listeners(generation)
        self.state = MasterState.DRAINED
        self._notifier.status("drained: not serving until nexusctl resume")
        log.warning("gateway drained generation=%d: new connections are refused", generation.number)
        return {"state": self.state.value, "generation": generation.number, "workers_draining": len(self._workers_of(generation))}

    def _resume(self) -> dict[str, Any]:
        if self.state is not MasterState.DRAINED:
            return {"state": self.state.value, "generation": self.generation}
        listeners = self._listeners_for(self._addresses(self.config))
        generation = self._next_generation(self.config, self._config_hash, listeners)
        self._boot(generation)
        self._activate(generation)
        self.state = MasterState.RUNNING
        self._notifier.ready(self._status_line())
        log.info("gateway resumed generation=%d", generation.number)
        return {"state": self.state.value, "generation": generation.number, "workers": len(generation.slots)}

    # Status

    def _status(self) -> dict[str, Any]:
        now = time.monotonic()
        workers = []
        for worker in sorted(self._workers.values(), key=lambda w: (w.generation.number, w.slot)):
            table = worker.generation.shared.workers
            restarts = self._restarts.get(worker.slot) if worker.generation is self._active else None
            workers.append(
                {
                    "slot": worker.slot,
                    "pid": worker.pid,
                    "cpu": worker.cpu,
                    "generation": worker.generation.number,
                    "state": table.state(worker.slot).name.lower(),
                    "started_at": table.started_ns(worker.slot) / 1e9,
                    "uptime_s": round(now - worker.started, 3),
                    "requests": table.requests(worker.slot),
                    "restarts": restarts.restarts if restarts else 0,
                }
            )
        return {
            "pid": os.getpid(),
            "node_id": self.node_id,
            "generation": self.generation,
            "state": self.state.value,
            "config_path": self.config_path,
            "config_hash": self._config_hash,
            "started_at": self.started_at,
            "uptime_s": round(time.time() - self.started_at, 3),
            "reloads": self._counters.reloads,
            "reloads_failed": self._counters.reloads_failed,
            "upgrades_failed": self._counters.upgrades_failed,
            "worker_restarts": self._counters.worker_restarts,
            "generations": [{"generation": g.number, "state": g.state.value, "workers": len(self._workers_of(g))} for g in self._generations],
            "workers": workers,
        }

    def _status_line(self) -> str:
        return f"serving: generation {self.generation}, {len(self._active.slots) if self._active else 0} workers"


def _warn_memory(shared_bytes: int) -> None:
    """Warn when the shared-memory tables could outgrow the machine's memory.

    The segments are sparse, so a size far above the memory starts fine and
    fails only as the cache fills. The warning names the setting to lower.
    """
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return
    if shared_bytes > physical:
        log.warning(
            "shared memory of %d bytes is larger than this machine's %d bytes of memory: lower "
            "shared_memory.cache_size, or the workers will be killed when the cache fills",
            shared_bytes,
            physical,
        )


def _file_hash(path: str | None) -> str:
    """Return the first 16 hex digits of the file's SHA-256, or "" when it cannot be read."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as file:
            return hashlib.sha256(file.read()).hexdigest()[:16]
    except OSError:
        return ""
