"""The master's process lifecycle: CPU pinning, worker restarts, draining and stopping.

Every test starts a real `nexus run` master with real upstream servers and
sends real signals to the master or its workers.
"""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import wait_for
from lifecycle_support import (
    CONNECTION_ERRORS,
    SteadyClient,
    child_pids,
    exited_lines,
    gateway_config,
    get,
    is_running,
    kill_quietly,
    proc_status,
    summarize,
    wait_gone,
)

_STOPPED_LINE = re.compile(r"worker stopped worker=(\d+) pid=(\d+) requests=(\d+)")


def _requests_by_pid(log: str) -> dict[int, int]:
    """Return {pid: requests} from the 'worker stopped' lines that workers log on a clean exit."""
    return {int(match[2]): int(match[3]) for match in _STOPPED_LINE.finditer(log)}


def test_workers_pinned_to_distinct_cpus(upstream_factory, gateway_factory):
    upstream = upstream_factory("a")
    gateway = gateway_factory(gateway_config([upstream.url], workers=2))

    assert sorted(gateway.worker_pids) == [0, 1], gateway.log()
    assert child_pids(gateway.process.pid) == sorted(gateway.worker_pids.values())
    cpus = {}
    for slot, pid in gateway.worker_pids.items():
        status = proc_status(pid)
        assert status, f"worker {slot} pid {pid} is not running"
        assert int(status["PPid"]) == gateway.process.pid, f"worker {slot} pid {pid} is not a child of the master"
        cpus[slot] = status["Cpus_allowed_list"]

    for slot, cpu_list in cpus.items():
        assert re.fullmatch(r"\d+", cpu_list), f"worker {slot} may run on CPUs {cpu_list!r}, expected exactly one"
    assert len(set(cpus.values())) == 2, f"both workers are pinned to the same CPU: {cpus}"
    assert gateway.stop() == 0


def test_killed_worker_replaced_without_failures(upstream_factory, gateway_factory, record_property):
    upstream = upstream_factory("a")
    gateway = gateway_factory(gateway_config([upstream.url], workers=2))
    slot, victim = 0, gateway.worker_pids[0]

    with SteadyClient(gateway.addresses[0], path="/status/200", rate=50) as client:
        time.sleep(0.5)
        killed_at = time.monotonic()
        kill_quietly(victim, signal.SIGKILL)
        wait_for(
            lambda: gateway.serving_pids().get(slot) not in (None, victim),
            timeout=5,
            message=f"a new worker in slot {slot} after SIGKILL of pid {victim}",
        )
        replaced_after = time.monotonic() - killed_at
        # Keep the load on long enough for the new worker to take requests.
        time.sleep(1.5)
    records = client.records

    # One request at a time finds both workers idle, and the kernel may hand
    # every connection to the older one. Concurrent requests keep it busy,
    # so the replacement accepts some of them.
    with ThreadPoolExecutor(max_workers=16) as pool:
        burst = list(pool.map(lambda _: get(gateway.addresses[0], "/status/200")[0], range(200)))
    assert burst == [200] * 200

    replacement = gateway.serving_pids()[slot]
    resets = sum(1 for record in records if record.first_error)
    record_property("requests", len(records))
    record_property("first_attempt_resets", resets)
    record_property("replaced_after_s", round(replaced_after, 3))

    log = gateway.log()
    exits = [line for line in exited_lines(log) if line["pid"] == str(victim)]
    assert exits, f"no 'worker exited unexpectedly' line for pid {victim}:\n{log}"
    assert exits[0]["worker"] == str(slot)
    assert exits[0]["status"] == "killed by SIGKILL"
    assert replacement != victim
    assert is_running(replacement), f"replacement worker pid {replacement} is not running"

    failed = [record for record in records if record.status is None]
    assert not failed, f"requests failed even after one retry ({summarize(records)}): {failed[:5]}"
    not_ok = [record for record in records if record.status != 200]
    assert not not_ok, f"requests got an error status ({summarize(records)}): {not_ok[:5]}"
    after_kill = [record for record in records if record.started > killed_at]
    assert len(after_kill) >= 50, f"the client sent too few requests after the kill to judge: {summarize(records)}"

    assert gateway.stop() == 0
    served = _requests_by_pid(gateway.log())
    assert served.get(replacement, 0) > 0, (
        f"replacement worker pid {replacement} served no requests: {served}; client saw {summarize(records)}, "
        f"{resets} first attempts reset"
    )


def _slow_request_in_thread(address: str, path: str, timeout: float) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        started = time.monotonic()
        try:
            outcome["status"], _ = get(address, path, timeout)
        except CONNECTION_ERRORS as exc:
            outcome["error"] = repr(exc)
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run, name="slow-request", daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_drains_slow_request(upstream_factory, gateway_factory, signum):
    upstream = upstream_factory("a")
    gateway = gateway_factory(gateway_config([upstream.url], workers=2, shutdown_timeout="10s"))
    worker_pids = list(gateway.worker_pids.values())

    thread, outcome = _slow_request_in_thread(gateway.addresses[0], "/slow?delay=2", timeout=10)
    # Let the request reach the upstream before the signal.
    time.sleep(0.5)
    signalled_at = time.monotonic()
    gateway.process.send_signal(signum)
    status = gateway.process.wait(10)
    stopped_after = time.monotonic() - signalled_at
    thread.join(10)

    log = gateway.log()
    assert outcome.get("status") == 200, f"in-flight request did not complete: {outcome}\n{log}"
    assert status == 0, f"master exited with {status}\n{log}"
    assert stopped_after >= 1.0, f"master exited {stopped_after:.2f} s after the signal, before the request finished"
    assert f"stopping signal={signum.name}" in log
    still_running = wait_gone(worker_pids, timeout=1)
    assert not still_running, f"worker pids {still_running} still run after the master exited"


def test_shutdown_timeout_cuts_long_request(upstream_factory, gateway_factory):
    upstream = upstream_factory("a")
    gateway = gateway_factory(gateway_config([upstream.url], workers=2, shutdown_timeout="1s"))
    worker_pids = list(gateway.worker_pids.values())

    thread, outcome = _slow_request_in_thread(gateway.addresses[0], "/slow?delay=5", timeout=10)
    time.sleep(0.5)
    signalled_at = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)
    status = gateway.process.wait(10)
    stopped_after = time.monotonic() - signalled_at
    thread.join(10)

    log = gateway.log()
    assert status == 0, f"master exited with {status}\n{log}"
    assert stopped_after < 3.0, f"master took {stopped_after:.2f} s to exit with shutdown_timeout 1s"
    assert "error" in outcome, f"the 5 s request was not cut by the 1 s shutdown timeout: {outcome}"
    assert outcome["seconds"] < 4.0, f"the request ended only after {outcome['seconds']:.2f} s: {outcome}"
    assert "worker did not finish draining in time" in log
    still_running = wait_gone(worker_pids, timeout=1)
    assert not still_running, f"worker pids {still_running} still run after the master exited"


def test_crash_loop_restart_delay_grows(upstream_factory, gateway_factory):
    upstream = upstream_factory("a")
    gateway = gateway_factory(gateway_config([upstream.url], workers=2))
    slot = 1
    killed = []

    for _ in range(4):
        pid = gateway.serving_pids()[slot]
        killed.append(pid)
        kill_quietly(pid, signal.SIGKILL)
        wait_for(
            lambda: gateway.serving_pids().get(slot) not in killed,
            timeout=10,
            message=f"a new worker in slot {slot} after SIGKILL of pid {pid}",
        )

    log = gateway.log()
    exits = [line for line in exited_lines(log) if line["worker"] == str(slot)]
    assert [int(line["pid"]) for line in exits] == killed, log
    delays = [float(line["restart_in_s"]) for line in exits]
    for earlier, later in zip(delays, delays[1:]):
        assert later > earlier, f"restart delays did not grow: {delays}"
    assert len(set(killed)) == len(killed), f"a pid was reused for a new worker: {killed}"
    assert gateway.worker_pids[0] == gateway.serving_pids()[0], "the other worker was restarted too"
    assert get(gateway.addresses[0], "/echo")[0] == 200
    assert gateway.stop() == 0


def test_master_sigkill_stops_workers(upstream_factory, gateway_factory):
    upstream = upstream_factory("a")
    gateway = gateway_factory(gateway_config([upstream.url], workers=2))
    worker_pids = list(gateway.worker_pids.values())

    gateway.process.kill()
    gateway.process.wait(5)

    # Orphaned workers would keep the port bound and serve with a health
    # table that nothing updates any more, so a restarted master could not listen.
    still_running = wait_gone(worker_pids, timeout=3)
    assert not still_running, f"worker pids {still_running} still run 3 s after the master was SIGKILLed"


def test_listen_address_in_use(gateway_factory):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        config = f"""
listen: ["{address}"]
workers: 2
upstreams:
  app: {{targets: ["http://127.0.0.1:9"]}}
routes:
  - {{name: all, upstream: app}}
"""
        gateway = gateway_factory(config, expect_ready=False)
        status = gateway.process.wait(10)

    log = gateway.log()
    assert status != 0, f"master exited 0 although {address} is in use\n{log}"
    assert f"cannot listen on {address}" in log, log
    assert "Address already in use" in log, log
    assert "worker started" not in log, f"the master forked workers although it could not listen\n{log}"
