"""nexusctl against a real `nexus run` master: every verb, its text and JSON output, and its errors.

Each test starts a real master with its own admin socket and runs the
installed nexusctl script (or, to act as another user, nexusctl's main in
a forked child that dropped to that uid).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from admin_support import run_nexusctl, run_nexusctl_as, temporary_socket_dir
from conftest import wait_for
from lifecycle_support import get, wait_gone


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    with temporary_socket_dir() as directory:
        yield directory


NOBODY = 65534
NEXUS = [sys.executable, "-m", "nexus"]


def config_text(upstream_url: str, socket_path: Path, route: str = "all") -> str:
    return (
        'listen: ["127.0.0.1:0"]\n'
        "workers: 2\n"
        "shutdown_timeout: 5s\n"
        f'admin: {{socket: "{socket_path}", metrics: null}}\n'
        "upstreams:\n"
        f'  app: {{targets: ["{upstream_url}"]}}\n'
        "routes:\n"
        f"  - {{name: {route}, upstream: app}}\n"
    )


@pytest.fixture
def running(gateway_factory, upstream_factory, socket_dir: Path):
    """A real master with 2 workers; yields (gateway, socket path, config path)."""
    upstream = upstream_factory("app")
    socket_path = socket_dir / "admin.sock"
    gateway = gateway_factory(config_text(upstream.url, socket_path))
    config_path = next(Path(arg) for arg in gateway.process.args if arg.endswith(".yaml"))
    yield gateway, socket_path, config_path, upstream


def nexusctl_json(*args: str) -> dict:
    result = run_nexusctl(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_status_of_real_master(running) -> None:
    gateway, socket_path, _, _ = running
    status = nexusctl_json("status", "--socket", str(socket_path))
    assert status["pid"] == gateway.process.pid
    assert status["generation"] == 1
    assert status["state"] == "running"
    assert sorted(worker["pid"] for worker in status["workers"]) == sorted(gateway.worker_pids.values())
    assert all(worker["state"] == "serving" for worker in status["workers"])

    text = run_nexusctl("status", "--socket", str(socket_path))
    assert text.returncode == 0, text.stderr
    assert re.match(rf"master +pid {gateway.process.pid}, running, generation 1, up ", text.stdout)
    assert "SLOT  PID" in text.stdout


def test_workers_of_real_master(running) -> None:
    gateway, socket_path, config_path, _ = running
    # --config finds the socket through admin.socket in the config file.
    result = run_nexusctl("workers", "--config", str(config_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["SLOT", "PID", "CPU", "GEN", "STATE", "UPTIME", "REQUESTS", "RESTARTS"]
    assert sorted(int(line.split()[1]) for line in lines[1:]) == sorted(gateway.worker_pids.values())


def test_requests_counted_in_status(running) -> None:
    gateway, socket_path, _, _ = running
    for _ in range(6):
        assert get(gateway.addresses[0], "/status/200")[0] == 200

    def counted() -> bool:
        status = nexusctl_json("status", "--socket", str(socket_path))
        return sum(worker["requests"] for worker in status["workers"]) >= 6

    wait_for(counted, 10, interval=0.2, message="6 requests in nexusctl status")


def test_reload_starts_next_generation(running) -> None:
    gateway, socket_path, config_path, upstream = running
    config_path.write_text(config_text(upstream.url, socket_path, route="renamed"))
    result = run_nexusctl("reload", "--config", str(config_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "reloaded"
    status = nexusctl_json("status", "--socket", str(socket_path))
    assert status["generation"] == 2
    assert {worker["generation"] for worker in status["workers"] if worker["state"] == "serving"} == {2}
    assert get(gateway.addresses[0], "/status/200")[0] == 200


def test_reload_with_other_config_notes_real_file(running) -> None:
    gateway, socket_path, config_path, upstream = running
    other = config_path.with_name("other.yaml")
    other.write_text(config_text(upstream.url, socket_path, route="other"))
    result = run_nexusctl("--config", str(other), "reload", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["config_path"] == str(config_path.resolve())
    assert f"the master reloaded {config_path.resolve()}, not {other}" in result.stderr
    assert "always reloads the file it was started with" in result.stderr

    result = run_nexusctl("--config", str(config_path), "reload")
    assert result.returncode == 0, result.stderr
    assert re.search(rf"^config_path +{re.escape(str(config_path.resolve()))}$", result.stdout, re.MULTILINE)
    assert result.stderr == ""


def test_reload_rejected_like_check(running) -> None:
    gateway, socket_path, config_path, upstream = running
    config_path.write_text(config_text(upstream.url, socket_path).replace("upstream: app}", "upstream: billing}"))
    check = subprocess.run([*NEXUS, "check", "--config", str(config_path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 2
    check_message = check.stderr.strip().removeprefix("nexus: invalid config ")

    result = run_nexusctl("reload", "--socket", str(socket_path))
    assert result.returncode == 1
    assert check_message in result.stderr
    assert result.stderr.startswith("nexusctl: reload rejected")
    status = nexusctl_json("status", "--socket", str(socket_path))
    assert status["generation"] == 1
    assert get(gateway.addresses[0], "/status/200")[0] == 200


def test_drain_and_resume(running) -> None:
    gateway, socket_path, _, _ = running
    drained = nexusctl_json("drain", "--socket", str(socket_path))
    assert drained["state"] == "drained"
    wait_gone(list(gateway.worker_pids.values()), 10)
    status = nexusctl_json("status", "--socket", str(socket_path))
    assert status["state"] == "drained"
    assert [worker for worker in status["workers"] if worker["state"] == "serving"] == []

    resumed = run_nexusctl("resume", "--socket", str(socket_path))
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.splitlines()[0] == "resumed"
    status = nexusctl_json("status", "--socket", str(socket_path))
    assert status["state"] == "running"
    assert status["generation"] == 2
    # The drain closed the listener; with port 0 in the config, resume binds a new port.
    address = re.findall(r"listening address=(\S+)", gateway.log())[-1]
    assert get(address, "/status/200")[0] == 200


def test_upgrade_keeps_socket_path(running) -> None:
    gateway, socket_path, _, _ = running
    old_pid = gateway.process.pid
    upgraded = nexusctl_json("upgrade", "--socket", str(socket_path))
    new_pid = upgraded["pid"]
    assert new_pid != old_pid
    try:
        # The old master drains and exits, and the new one serves on the same path.
        assert gateway.process.wait(30) == 0
        status = nexusctl_json("status", "--socket", str(socket_path))
        assert status["pid"] == new_pid
        assert get(gateway.addresses[0], "/status/200")[0] == 200
        assert socket_path.is_socket()
    finally:
        os.kill(new_pid, 15)
    assert wait_gone([new_pid], 30) == []
    assert not socket_path.exists()


def test_permission_denied_on_real_socket(running) -> None:
    _, socket_path, _, _ = running
    status, _, stderr = run_nexusctl_as(NOBODY, "status", "--socket", str(socket_path))
    assert status == 4, stderr
    assert f"permission denied on the admin socket {socket_path} (mode 0600, owner root:root)" in stderr


def test_stopped_master_is_not_running(running) -> None:
    gateway, socket_path, _, _ = running
    assert gateway.stop() == 0
    assert not socket_path.exists()
    result = run_nexusctl("status", "--socket", str(socket_path))
    assert result.returncode == 3
    assert f"master not running: no admin socket at {socket_path}" in result.stderr


def test_second_master_does_not_steal_socket(running, gateway_factory) -> None:
    gateway, socket_path, config_path, _ = running
    second = gateway_factory(config_path.read_text(), expect_ready=False)
    message = f"another process (pid {gateway.process.pid}) serves on the admin socket {socket_path}"
    wait_for(
        lambda: message in second.log() or second.process.poll() is not None,
        20,
        message="the second master's admin error",
    )
    assert message in second.log()
    # The first master still owns the path.
    assert nexusctl_json("status", "--socket", str(socket_path))["pid"] == gateway.process.pid
    second.stop()
    assert nexusctl_json("status", "--socket", str(socket_path))["pid"] == gateway.process.pid


def test_failed_upgrade_exits_1(gateway_factory, upstream_factory, socket_dir: Path, monkeypatch) -> None:
    """A new master exits during the upgrade: nexusctl reports it and exits 1, and the old master keeps serving."""
    upstream = upstream_factory("app")
    socket_path = socket_dir / "admin.sock"
    # Only a master started by an upgrade acts on this variable.
    monkeypatch.setenv("NEXUS_TEST_FAULT", "upgrade-exit")
    gateway = gateway_factory(config_text(upstream.url, socket_path))
    result = run_nexusctl("upgrade", "--socket", str(socket_path))
    assert result.returncode == 1
    assert result.stderr.startswith("nexusctl: upgrade failed: new master pid=")
    assert f"(pid {gateway.process.pid}, generation 1) keeps serving" in result.stderr
    status = nexusctl_json("status", "--socket", str(socket_path))
    assert status["pid"] == gateway.process.pid
    assert status["state"] == "running"
    assert get(gateway.addresses[0], "/status/200")[0] == 200


def test_reload_moves_admin_socket(running, socket_dir: Path) -> None:
    gateway, socket_path, config_path, upstream = running
    moved = socket_dir / "moved.sock"
    config_path.write_text(
        config_text(upstream.url, moved).replace("metrics: null", 'socket_mode: "0660", metrics: null')
    )
    result = run_nexusctl("reload", "--socket", str(socket_path))
    assert result.returncode == 0, result.stderr
    assert not socket_path.exists()
    assert oct(moved.stat().st_mode & 0o777) == "0o660"
    assert nexusctl_json("status", "--config", str(config_path))["generation"] == 2


def test_two_upgrades_in_a_row(running) -> None:
    gateway, socket_path, _, _ = running
    pids = [gateway.process.pid]
    try:
        for _ in range(2):
            upgraded = nexusctl_json("upgrade", "--socket", str(socket_path))
            assert upgraded["previous_pid"] == pids[-1]
            pids.append(upgraded["pid"])
            assert wait_gone([pids[-2]], 30) == [], f"master pid {pids[-2]} did not exit after the upgrade"
            assert nexusctl_json("status", "--socket", str(socket_path))["pid"] == pids[-1]
            assert get(gateway.addresses[0], "/status/200")[0] == 200
    finally:
        os.kill(pids[-1], 15)
    assert wait_gone([pids[-1]], 30) == []
    assert not socket_path.exists()
