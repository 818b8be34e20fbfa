"""Binary upgrade under load: a new master takes the sockets and shared memory over, or rolls back.

`nexusctl upgrade` (POST /upgrade) and SIGUSR2 make the running master
start a new master from the installed code, hand it the listening sockets
and shared-memory segments, and exit once the new master's workers serve.
The rollback tests make the new master fail for real through the
NEXUS_TEST_FAULT hook that nexus.master documents for tests.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, wait_for
from obs_support import scrape, total, value
from lifecycle_support import LoadClient, assert_no_request_failed, child_pids, get, is_running, wait_gone, wait_log_count
from test_reload import _admin, _config

from nexus.admin import AdminClientError

pytestmark = pytest.mark.e2e

_TOOK_OVER = re.compile(r"master started pid=(\d+) workers=\d+ generation=(\d+) took_over_from=(\d+)")


def test_three_upgrades_lose_no_request(upstream_factory, gateway_factory, record_property):
    upstream = upstream_factory("a")
    gateway = gateway_factory(_config(upstream.url))
    admin = _admin(gateway)
    masters = [gateway.process.pid]

    with LoadClient(gateway.addresses[0], concurrency=4) as load:
        wait_for(lambda: len(load.records) > 20, 10, message="load to start")
        for number in range(3):
            old = masters[-1]
            if number == 1:
                # SIGUSR2 asks for the same upgrade as the admin API.
                os.kill(old, signal.SIGUSR2)
                log = wait_log_count(gateway.log, "took_over_from=", number + 1)
            else:
                result = admin.call("POST", "/upgrade")
                assert result["previous_pid"] == old, result
                log = wait_log_count(gateway.log, "took_over_from=", number + 1)
            new_pid, generation, took_over_from = map(int, _TOOK_OVER.findall(log)[-1])
            assert (took_over_from, generation) == (old, number + 2), log[-3000:]
            masters.append(new_pid)
            # The old master drains its workers and exits; the new one keeps serving.
            assert wait_gone([old], 15) == [], f"old master {old} still runs"
        time.sleep(0.5)
    records = load.records

    assert_no_request_failed(records, "3 upgrades under load", record_property)
    assert gateway.process.wait(5) == 0, "the first master did not exit 0 after the upgrade"

    status = admin.call("GET", "/status")
    assert status["pid"] == masters[-1]
    assert status["generation"] == 4
    assert len(child_pids(masters[-1])) == 2
    assert get(gateway.addresses[0], "/echo")[0] == 200


@pytest.mark.parametrize("fault", ["upgrade-exit", "upgrade-hang"])
def test_failed_upgrade_rolls_back(upstream_factory, gateway_factory, record_property, fault):
    upstream = upstream_factory("a")
    config = _config(upstream.url).replace("reload_timeout: 10s", "reload_timeout: 1s")
    gateway = gateway_factory(config, env={"NEXUS_TEST_FAULT": fault})
    admin = _admin(gateway)
    workers = child_pids(gateway.process.pid)

    with LoadClient(gateway.addresses[0], concurrency=2) as load:
        wait_for(lambda: len(load.records) > 10, 10, message="load to start")
        with pytest.raises(AdminClientError) as raised:
            admin.call("POST", "/upgrade")
        time.sleep(0.3)
    message = str(raised.value)
    assert raised.value.status == 503, message
    assert "upgrade failed: new master pid=" in message
    if fault == "upgrade-exit":
        # The reason is the new master's exit, not the socket it closed by exiting.
        assert "it exited (exit 1) before it was ready" in message, message
    assert f"this master (pid {gateway.process.pid}, generation 1) keeps serving" in message

    new_master = int(re.search(r"new master pid=(\d+)", message).group(1))
    assert not is_running(new_master)
    assert gateway.process.poll() is None
    assert child_pids(gateway.process.pid) == workers
    assert_no_request_failed(load.records, f"load during the failed upgrade ({fault})", record_property)
    status = admin.call("GET", "/status")
    assert (status["pid"], status["generation"]) == (gateway.process.pid, 1)
    assert gateway.stop() == 0


def test_upgrade_with_invalid_config_is_rejected(upstream_factory, gateway_factory):
    # The new master would read the same file and fail; the old one checks
    # it first and names the reason, as a reload does.
    upstream = upstream_factory("a")
    gateway = gateway_factory(_config(upstream.url))
    admin = _admin(gateway)
    workers = child_pids(gateway.process.pid)
    gateway.config_path.write_text(gateway.config_path.read_text() + "wrokers: 1\n")

    with pytest.raises(AdminClientError) as raised:
        admin.call("POST", "/upgrade")
    message = str(raised.value)
    assert raised.value.status == 422, message
    assert f"upgrade rejected: invalid config {gateway.config_path}: wrokers: unknown key" in message
    assert "generation 1 keeps serving; fix the file and upgrade again" in message
    assert "new master started" not in gateway.log()
    assert child_pids(gateway.process.pid) == workers
    status = admin.call("GET", "/status")
    assert (status["pid"], status["generation"], status["upgrades_failed"]) == (gateway.process.pid, 1, 1)
    assert get(gateway.addresses[0], "/echo")[0] == 200


# Runs `nexus run` as systemd would with a socket unit: the listening socket
# at descriptor 3 and LISTEN_FDS/LISTEN_PID naming this very process.
_ACTIVATED_START = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="http")
os.execv(sys.executable, [sys.executable, "-m", "nexus", "run", "--config", sys.argv[2]])
"""


def test_systemd_notify_and_socket_activation(upstream_factory, tmp_path):
    upstream = upstream_factory("a")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = str(tmp_path / "notify.sock")
    notify.bind(notify_path)
    notify.settimeout(20)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    address = "%s:%d" % listener.getsockname()
    config = tmp_path / "nexus.yaml"
    # `listen` names another port: under socket activation the passed socket is served instead.
    config.write_text(
        _config(upstream.url, listen='"127.0.0.1:1"') + f'admin: {{socket: "{tmp_path}/admin.sock", metrics: null}}\n'
    )
    log_path = tmp_path / "nexus.log"
    with open(log_path, "wb") as log_file:
        master = subprocess.Popen(
            [sys.executable, "-c", _ACTIVATED_START, str(listener.fileno()), str(config)],
            pass_fds=[listener.fileno()],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "NOTIFY_SOCKET": notify_path},
        )
    listener.close()  # the gateway holds the socket now, as systemd would
    read_log = log_path.read_text
    try:
        assert _next_message(notify, "READY")["READY"] == "1"
        assert get(address, "/echo")[0] == 200
        assert "using passed socket fd=3 name=http" in read_log()

        os.kill(master.pid, signal.SIGHUP)
        reloading = _next_message(notify, "RELOADING")
        assert int(reloading["MONOTONIC_USEC"]) > 0, reloading
        assert _next_message(notify, "READY")["READY"] == "1"
        assert get(address, "/echo")[0] == 200

        os.kill(master.pid, signal.SIGUSR2)
        main_pid = _next_message(notify, "MAINPID")
        new_pid = int(_TOOK_OVER.findall(wait_log_count(read_log, "took_over_from=", 1))[-1][0])
        assert main_pid["MAINPID"] == str(new_pid), main_pid
        assert _next_message(notify, "READY")["READY"] == "1"
        assert master.wait(15) == 0
        assert get(address, "/echo")[0] == 200

        os.kill(new_pid, signal.SIGTERM)
        # The old master sent no STOPPING=1 when it handed over, so the next one is the new master's.
        assert wait_gone([new_pid], 15) == []
        stopping = _next_message(notify, "STOPPING")
        assert stopping["STOPPING"] == "1"
        notify.settimeout(0.5)
        with pytest.raises(TimeoutError):
            _next_message(notify, "STOPPING")
    finally:
        notify.close()
        for pid in {int(pid) for pid in re.findall(r"master started pid=(\d+)", read_log())}:
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
        if master.poll() is None:
            master.kill()
            master.wait(5)


def _next_message(notify: socket.socket, key: str) -> dict[str, str]:
    """Receive notify datagrams until one has `key`; return its KEY=value lines as a dict."""
    while True:
        data = notify.recv(4096).decode()
        message = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
        if key in message:
            return message


def test_upgrade_hands_over_metrics_and_access_log(upstream_factory, gateway_factory, tmp_path):
    # One master at a time holds the metrics port and drains the workers'
    # rings: the new master serves /metrics on the same fixed address, with
    # counts that carry on from the old master's, and writes the access log.
    upstream = upstream_factory("a")
    port = _free_port()
    access_log = tmp_path / "access.log"
    socket_path = tmp_path / "admin.sock"
    config = _config(upstream.url) + (
        f'admin: {{socket: "{socket_path}", metrics: "127.0.0.1:{port}"}}\n'
        f'access_log: {{path: "{access_log}"}}\n'
    )
    gateway = gateway_factory(config)
    for _ in range(20):
        assert get(gateway.addresses[0], "/echo")[0] == 200
    before = total(scrape(f"127.0.0.1:{port}"), "nexus_http_requests_total")
    assert before >= 20

    admin = _admin(gateway)
    result = admin.call("POST", "/upgrade")
    assert wait_gone([result["previous_pid"]], 15) == []
    for _ in range(10):
        assert get(gateway.addresses[0], "/echo")[0] == 200

    after = scrape(f"127.0.0.1:{port}")
    assert value(after, "nexus_generation") == 2
    assert total(after, "nexus_http_requests_total") >= before + 10
    wait_for(lambda: access_log.read_text().count("\n") >= 30, 5, message="30 access log lines")
    # Both masters served the one address, the new one after the old one let go.
    assert gateway.log().count(f"metrics listening address=127.0.0.1:{port}") == 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
