"""The steps of an upgrade, on the old master's side and on the new master's side.

`Master` (`nexus.master`) takes these methods from `UpgradeSteps`. The old
master starts the new one, hands over its sockets and shared memory, and
rolls back when the new master fails. The new master maps what it received,
starts its workers, and takes over once the old master commits. The
protocol between the two is in `nexus.handoff`. The methods use the
master's loop (`_tick`), generations and records, so they only work on a
Master.

Fault injection for tests only: NEXUS_TEST_FAULT=upgrade-exit makes a
master started by an upgrade exit with status 1 after it received the
handoff, and NEXUS_TEST_FAULT=upgrade-hang makes it stop there without
ever reporting ready. A master started normally ignores the variable.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from nexus import handoff
from nexus.config.decode import convert_section
from nexus.config.model import SharedMemory
from nexus.generation import Generation
from nexus.listeners import Listener
from nexus.sd_notify import Watchdog
from nexus.services import AdminError
from nexus.shm.metrics import MetricSlots
from nexus.shm.state import SharedState
from nexus.shm.workers import WorkerState
from nexus.supervision import MasterState, StartError, describe_wait_status, flush_logs, is_alive, node_id, send_signal

__all__ = ["FAULT_ENV", "HANDOFF_TIMEOUT", "NewMaster", "UpgradeSteps"]

log = logging.getLogger("nexus.master")

# How long one handoff message may take, and what a new master may take
# beyond reload_timeout to start the interpreter and map the handoff, in seconds.
HANDOFF_TIMEOUT = 5.0

FAULT_ENV = "NEXUS_TEST_FAULT"


@dataclass(eq=False)
class NewMaster:
    """A master process this one started for an upgrade, until it is ready or rolled back."""

    pid: int
    sock: socket.socket
    status: int | None = None  # wait status once reaped


class UpgradeSteps:
    """The upgrade methods of Master, described in the module docstring."""

    # Upgrade: the old master's side

    def _upgrade(self) -> dict[str, Any]:
        if self.state is MasterState.DRAINED or self._active is None:
            raise AdminError(409, "the gateway is drained: resume it first (`nexusctl resume`), then upgrade")
        self.state = MasterState.UPGRADING
        self._notifier.status("upgrading: starting a new master")
        try:
            # The new master reads the same file: a config it would reject is
            # rejected here, with the reason, instead of as a failed start.
            warnings: list[str] = []
            if self.config_path is not None:
                warnings = self._config_warnings(self._read_config("upgrade"), "upgrade")
            new_master = self._start_new_master()
            reply = self._hand_over(new_master)
        except AdminError as exc:
            self._counters.upgrades_failed += 1
            log.error("upgrade failed pid=%d generation=%d: %s", os.getpid(), self.generation, exc.message)
            if self.state is MasterState.UPGRADING:
                self.state = MasterState.RUNNING
            self._notifier.status(self._status_line())
            raise
        self._handed_over = True
        self.state = MasterState.STOPPING
        self._exit_status = 0
        log.info("upgrade done: new master pid=%d generation=%d serves, this master drains and exits", new_master.pid, reply["generation"])
        result: dict[str, Any] = {"pid": new_master.pid, "previous_pid": os.getpid(), "generation": reply["generation"]}
        if warnings:
            result["warnings"] = warnings
        return result

    def _start_new_master(self) -> NewMaster:
        """Fork and exec this program again with the upgrade socket at descriptor 3."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [sys.executable, *sys.orig_argv[1:]]
        env = dict(os.environ, **{handoff.UPGRADE_FD_ENV: str(handoff.UPGRADE_FD)})
        # The watchdog watches this pid; the new master pings once it is the main process.
        env.pop("WATCHDOG_PID", None)
        flush_logs()
        pid = os.fork()
        if pid == 0:
            try:
                os.dup2(theirs.fileno(), handoff.UPGRADE_FD)
                os.set_inheritable(handoff.UPGRADE_FD, True)
                os.closerange(handoff.UPGRADE_FD + 1, os.sysconf("SC_OPEN_MAX"))
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        theirs.close()
        new_master = NewMaster(pid, ours)
        self._new_master = new_master
        log.info("new master started pid=%d argv=%s", pid, " ".join(argv))
        return new_master

    def _hand_over(self, new_master: NewMaster) -> dict[str, Any]:
        """Send the state, wait for ready, commit; roll back and raise AdminError on any failure."""
        assert self._active is not None
        try:
            self._send_state(new_master.sock)
            reply = self._wait_ready(new_master)
            # One master at a time may sync Redis, drain the rings (they have
            # one consumer each), read the purge stream and hold the metrics
            # port: ours stop here and theirs start on the commit, which
            # carries what our services hand over (such as the last purge
            # stream id applied to the shared cache).
            self._stop_redis_sync()
            inherited = self._stop_services()
            handoff.send(new_master.sock, {"type": "commit", "services": inherited})
        except (handoff.HandoffError, OSError) as exc:
            reason = str(exc) if isinstance(exc, handoff.HandoffError) else f"upgrade socket: {exc.strerror or exc}"
            exited = _exit_status(new_master)
            if exited is not None:
                # The socket failed because the new master died, so name that.
                reason = f"it exited ({describe_wait_status(exited)}) before it was ready"
            self._rollback(new_master, reason)
            self._restart_own_services()
            raise AdminError(
                503,
                f"upgrade failed: new master pid={new_master.pid}: {reason}; it was stopped and this master "
                f"(pid {os.getpid()}, generation {self.generation}) keeps serving. See the new master's log lines.",
            ) from None
        new_master.sock.close()
        self._new_master = None
        self._predecessor_pid = None
        return reply

    def _restart_own_services(self) -> None:
        """Start again what a failed handover stopped, after the new master is gone."""
        if self.config.redis is not None and self.redis_sync is None:
            self._start_redis_sync()
        if not self.services:
            self._start_services()
            if self._admin is not None:
                self._admin.set_services(self.services)

    def _send_state(self, sock: socket.socket) -> None:
        assert self._active is not None and self.shared is not None
        active = self._active
        retired = [(layout, table.segment.fd) for layout, table in self._metric_tables if table is not self.shared.metrics]
        header = {
            "pid": os.getpid(),
            "generation": self.generation,
            "slot_base": active.slots.start,
            "workers": len(active.slots),
            "shape": self._shape,
            "metric_layout": handoff.layout_to_json(active.metric_layout),
            "counters": {
                "worker_restarts": self._counters.worker_restarts,
                "reloads": self._counters.reloads,
                "reloads_failed": self._counters.reloads_failed,
                "upgrades_failed": self._counters.upgrades_failed,
            },
            "activated": [listener.requested for listener in active.listeners if listener.fileno() in self._activated_fds],
            # The segments keep their sizes: the new master must know them, not its config's.
            "shared_memory": msgspec.to_builtins(self._sizes_in_effect),
        }
        listeners = {listener.requested: listener.fileno() for listener in active.listeners}
        handoff.send_state(sock, header, listeners, self.shared.fds(), retired)

    def _wait_ready(self, new_master: NewMaster) -> dict[str, Any]:
        deadline = time.monotonic() + self.config.reload_timeout + HANDOFF_TIMEOUT
        while True:
            readable, _, _ = select.select([new_master.sock], [], [], 0)
            if readable:
                message, _ = handoff.receive(new_master.sock, HANDOFF_TIMEOUT)
                if message.get("type") != "ready":
                    raise handoff.HandoffError(f"expected ready from the new master, got {message.get('type')!r}")
                return message
            if new_master.status is not None:
                raise handoff.HandoffError(f"it exited ({describe_wait_status(new_master.status)}) before it was ready")
            if time.monotonic() > deadline:
                raise handoff.HandoffError(f"it was not ready within {self.config.reload_timeout + HANDOFF_TIMEOUT:g} s")
            if self.state is MasterState.STOPPING:
                raise handoff.HandoffError("this master is stopping")
            self._tick(0.05)

    def _rollback(self, new_master: NewMaster, reason: str) -> None:
        """Kill a new master that failed, and the workers it started in our tables."""
        log.error("rolling back upgrade: killing new master pid=%d: %s", new_master.pid, reason)
        send_signal(new_master.pid, signal.SIGKILL)
        if new_master.status is None:
            try:
                os.waitpid(new_master.pid, 0)
            except ChildProcessError:
                pass
        new_master.sock.close()
        self._new_master = None
        self._kill_foreign_workers()

    def _kill_foreign_workers(self) -> None:
        """SIGKILL workers of a newer generation in our worker table (they belong to a rolled-back master)."""
        if self.shared is None:
            return
        table = self.shared.workers
        ours = set(self._workers)
        for slot_id in range(table.slots):
            pid = table.pid(slot_id)
            if pid and pid not in ours and table.generation(slot_id) > self.generation and is_alive(pid):
                log.warning("killing worker of the rolled-back master worker=%d pid=%d", slot_id, pid)
                send_signal(pid, signal.SIGKILL)
                table.set_state(slot_id, WorkerState.EXITED)

    # Upgrade: the new master's side

    def _start_from_handoff(self) -> None:
        """Take over from the master that started this one; raise StartError to give up (it rolls back)."""
        fd = int(os.environ.pop(handoff.UPGRADE_FD_ENV))
        self._upgrade_sock = socket.socket(fileno=fd)
        try:
            state = handoff.receive_state(self._upgrade_sock, HANDOFF_TIMEOUT)
        except (handoff.HandoffError, OSError) as exc:
            raise StartError(f"no handoff from the old master: {exc}") from None
        header = state.header
        self._predecessor_pid = header["pid"]
        log.info("taking over from master pid=%d generation=%d", header["pid"], header["generation"])
        self._inject_upgrade_fault()

        generation = self._adopt(state)
        try:
            self._boot(generation)
        except AdminError as exc:
            raise StartError(exc.message) from None
        self._activate(generation)
        self._commit_takeover(header["pid"])

    def _adopt(self, state: handoff.Handoff) -> Generation:
        """Map the old master's tables and sockets and plan our first generation on them."""
        header = state.header
        counters = header["counters"]
        self._counters.worker_restarts = counters["worker_restarts"]
        self._counters.reloads = counters["reloads"]
        self._counters.reloads_failed = counters["reloads_failed"]
        self._counters.upgrades_failed = counters["upgrades_failed"]
        for requested, fd in state.listener_fds.items():
            listener = Listener(requested, socket.socket(fileno=fd))
            self._spare_listeners.append(listener)
            if requested in header["activated"]:
                self._activated_fds.add(fd)
                self._activated.append(listener)
        layouts = [handoff.layout_from_json(data) for data in header["metric_layouts"]]
        self._metric_tables = [(layout, MetricSlots.attach(fd, layout)) for layout, fd in zip(layouts, state.metric_fds, strict=True)]
        current_layout = handoff.layout_from_json(header["metric_layout"])
        try:
            self.shared = SharedState.attach(state.table_fds, current_layout)
        except (ValueError, OSError) as exc:
            raise StartError(f"cannot map the old master's shared memory: {exc}") from None
        self._metric_tables.append((current_layout, self.shared.metrics))
        self._shape = header["shape"]
        if "shared_memory" in header:
            self._sizes_in_effect = convert_section(header["shared_memory"], SharedMemory, "shared_memory")
            for warning in self._config_warnings(self.config, "upgrade"):
                log.warning("upgrade: %s", warning)
        self._bank_base = header["slot_base"]
        self.generation = header["generation"]
        self.node_id = node_id(self.config, self._spare_listeners)

        listeners = self._listeners_for(self._addresses(self.config))
        # The old master keeps serving on the sockets the config no longer
        # lists until it exits; this master has no use for its copies.
        for listener in self._spare_listeners:
            if listener not in listeners and listener.fileno() not in self._activated_fds:
                log.info("listener closed address=%s", listener.address)
                listener.sock.close()
        self._spare_listeners = []
        # Services start once the old master commits and has stopped its own.
        return self._next_generation(self.config, self._config_hash, listeners)

    def _inject_upgrade_fault(self) -> None:
        """Fail on purpose when a test asks for it (see the module docstring)."""
        fault = os.environ.get(FAULT_ENV)
        if fault == "upgrade-exit":
            raise StartError(f"{FAULT_ENV}=upgrade-exit: exiting before any worker starts, as the test asked")
        if fault == "upgrade-hang":
            log.warning("%s=upgrade-hang: never reporting ready, as the test asked", FAULT_ENV)
            while True:
                signal.pause()

    def _commit_takeover(self, old_pid: int) -> None:
        """Tell the old master we serve, wait for its commit, then become the service's main process."""
        assert self._upgrade_sock is not None
        try:
            handoff.send(self._upgrade_sock, {"type": "ready", "pid": os.getpid(), "generation": self.generation})
            message, _ = handoff.receive(self._upgrade_sock, self.config.reload_timeout + HANDOFF_TIMEOUT)
        except (handoff.HandoffError, OSError) as exc:
            raise StartError(f"the old master pid={old_pid} did not commit the upgrade: {exc}") from None
        if message.get("type") != "commit":
            raise StartError(f"expected commit from the old master pid={old_pid}, got {message.get('type')!r}")
        self._upgrade_sock.close()
        self._upgrade_sock = None
        self.inherited = message.get("services") or {}
        self._start_services()
        self._start_admin(replace_live=True)
        self._start_redis_sync()
        self._is_main = True
        self._watchdog = Watchdog.from_environment(self._notifier)
        self._notifier.main_pid(os.getpid())
        self._ready_notified = True
        self._notifier.ready(self._status_line())
        log.info("master started pid=%d workers=%d generation=%d took_over_from=%d", os.getpid(), len(self._active.slots), self.generation, old_pid)


def _exit_status(new_master: NewMaster, wait: float = 0.5) -> int | None:
    """Return the wait status of `new_master` if it exits within `wait` seconds (and reap it), else None."""
    if new_master.status is not None:
        return new_master.status
    deadline = time.monotonic() + wait
    while True:
        try:
            pid, status = os.waitpid(new_master.pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if pid:
            new_master.status = status
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)
