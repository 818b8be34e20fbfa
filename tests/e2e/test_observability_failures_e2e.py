"""The access log and /metrics when their file or port fails: at start, on reload, on reopen, on a full disk."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import admin_socket_dir, wait_for
from tests.e2e.obs_support import metrics_address, obs_config, request, scrape, value

pytestmark = pytest.mark.e2e

NEXUSCTL = [sys.executable, "-c", "from nexus.cli import nexusctl; nexusctl()"]


def nexusctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*NEXUSCTL, *args], capture_output=True, text=True, timeout=60)


def config_with(upstream_url: str, socket_path: Path, metrics: str | None, access_log: dict | None) -> str:
    config = obs_config(upstream_url, socket_path, metrics=False, access_log=json.dumps(access_log) if access_log else None)
    return config.replace('"metrics": null', f'"metrics": {json.dumps(metrics)}')


@pytest.fixture
def busy_port():
    """A port on 127.0.0.1 that another socket listens on."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    yield holder.getsockname()[1]
    holder.close()


def test_start_refused_for_unwritable_log(tmp_path, upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    missing = tmp_path / "no-such-dir" / "access.log"
    gateway = gateway_factory(config_with(upstream.url, admin_socket_dir(tmp_path) / "a.sock", None, {"path": str(missing)}), expect_ready=False)

    assert gateway.process.wait(30) != 0
    assert "access_log.path" in gateway.log()
    assert str(missing) in gateway.log()
    assert "worker started" not in gateway.log()


def test_start_refused_for_busy_metrics_port(tmp_path, upstream_factory, gateway_factory, busy_port):
    upstream = upstream_factory("app")
    address = f"127.0.0.1:{busy_port}"
    gateway = gateway_factory(config_with(upstream.url, admin_socket_dir(tmp_path) / "a.sock", address, None), expect_ready=False)

    assert gateway.process.wait(30) != 0
    assert f"admin.metrics: cannot listen on {address}" in gateway.log()


def test_reload_to_busy_metrics_port_rejected(tmp_path, upstream_factory, gateway_factory, busy_port):
    upstream = upstream_factory("app")
    sock = admin_socket_dir(tmp_path) / "a.sock"
    gateway = gateway_factory(config_with(upstream.url, sock, "127.0.0.1:0", None))
    address = metrics_address(gateway.log())

    gateway.config_path.write_text(config_with(upstream.url, sock, f"127.0.0.1:{busy_port}", None))
    reload = nexusctl("reload", "--socket", str(sock))

    assert reload.returncode == 1
    assert f"cannot listen on 127.0.0.1:{busy_port}" in reload.stderr
    # The old listener still serves.
    assert value(scrape(address), "nexus_generation") == 1


def test_reopen_failure_is_reported(tmp_path, upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    sock = admin_socket_dir(tmp_path) / "a.sock"
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    gateway = gateway_factory(config_with(upstream.url, sock, "127.0.0.1:0", {"path": str(log_dir / "access.log")}))
    request(gateway.url, path="/status/200")

    log_dir.rename(tmp_path / "logs.old")
    reopen = nexusctl("access-log", "reopen", "--socket", str(sock))
    assert reopen.returncode == 1
    assert "cannot reopen the access log" in reopen.stderr
    assert "still writing to the old file" in reopen.stderr

    # Once the directory is back, a reopen succeeds and the lines go there.
    log_dir.mkdir()
    assert nexusctl("access-log", "reopen", "--socket", str(sock)).returncode == 0
    request(gateway.url, path="/status/201")
    wait_for(lambda: (log_dir / "access.log").exists() and (log_dir / "access.log").read_text().count("\n") == 1, 5)


def test_log_counters_survive_reload(tmp_path, upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    sock = admin_socket_dir(tmp_path) / "a.sock"
    log_path = tmp_path / "access.log"
    gateway = gateway_factory(config_with(upstream.url, sock, "127.0.0.1:0", {"path": str(log_path)}))
    address = metrics_address(gateway.log())
    for _ in range(5):
        request(gateway.url, path="/status/200")
    wait_for(lambda: value(scrape(address), "nexus_access_log_lines_total") == 5, 5, message="5 lines counted")

    gateway.config_path.write_text(config_with(upstream.url, sock, "127.0.0.1:0", {"path": str(log_path), "sample": "50%"}))
    assert nexusctl("reload", "--socket", str(sock)).returncode == 0
    assert value(scrape(address), "nexus_access_log_lines_total") >= 5


def test_full_disk_log_keeps_reload_and_stop_clean(tmp_path, upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    sock = admin_socket_dir(tmp_path) / "a.sock"
    gateway = gateway_factory(config_with(upstream.url, sock, "127.0.0.1:0", {"path": "/dev/full"}))
    address = metrics_address(gateway.log())
    for _ in range(5):
        assert request(gateway.url, path="/status/200") == 200
    wait_for(lambda: value(scrape(address), "nexus_access_log_write_errors_total") >= 1, 5, message="a write error counted")

    gateway.config_path.write_text(config_with(upstream.url, sock, "127.0.0.1:0", {"path": "/dev/full", "sample": "50%"}))
    reload = nexusctl("reload", "--socket", str(sock))
    assert reload.returncode == 0, reload.stderr
    assert value(scrape(address), "nexus_reloads_total") == 1
    for _ in range(5):
        assert request(gateway.url, path="/status/200") == 200
    wait_for(lambda: value(scrape(address), "nexus_access_records_total") == 10, 5, message="every record drained")

    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.process.wait(30) == 0
    assert "Traceback" not in gateway.log()
    assert "master stopped" in gateway.log()
