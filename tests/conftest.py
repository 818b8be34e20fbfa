"""Shared fixtures: real upstream servers and real gateway processes on loopback.

`upstream_factory` starts `tests/upstream_server.py` processes on free ports;
`gateway_factory` writes a config file and starts `nexus run` as a real
master process, waiting until every worker serves. Both stop what they
started when the test ends, with SIGKILL if SIGTERM is not enough.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_SCRIPT = Path(__file__).resolve().parent / "upstream_server.py"
NEXUS = [sys.executable, "-m", "nexus"]

_LISTEN_LINE = re.compile(r"listening address=(\S+)")
_SERVING_LINE = re.compile(r"worker serving worker=(\d+) pid=(\d+)")
_MASTER_LINE = re.compile(r"(?:master started|new master started|taking over from master) pid=(\d+)")


@dataclass
class Upstream:
    """One running test upstream server."""

    name: str
    port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


@pytest.fixture
def upstream_factory() -> Iterator:
    started: list[Upstream] = []

    def start(name: str = "upstream", port: int = 0, unhealthy_file: str | None = None) -> Upstream:
        args = [sys.executable, str(UPSTREAM_SCRIPT), str(port), name]
        if unhealthy_file:
            args.append(unhealthy_file)
        process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        line = process.stdout.readline()
        match = re.match(r"serving \S+ on (\d+)", line)
        assert match, f"upstream {name} did not start: {line!r}"
        upstream = Upstream(name, int(match.group(1)), process)
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        upstream.kill()


@dataclass
class Gateway:
    """One running `nexus run` master process and what it logged."""

    process: subprocess.Popen
    log_path: Path
    config_path: Path | None = None
    addresses: list[str] = field(default_factory=list)
    worker_pids: dict[int, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.addresses[0]}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def serving_pids(self) -> dict[int, int]:
        """Return {worker slot: pid} from the latest 'worker serving' line per slot."""
        pids: dict[int, int] = {}
        for match in _SERVING_LINE.finditer(self.log()):
            pids[int(match.group(1))] = int(match.group(2))
        return pids

    def master_pids(self) -> list[int]:
        """Every master pid the log names: the first one and each that an upgrade started."""
        return [int(pid) for pid in _MASTER_LINE.findall(self.log())]

    def all_pids(self) -> set[int]:
        """Every master and worker pid the log names, whether running or not."""
        workers = {int(match.group(2)) for match in _SERVING_LINE.finditer(self.log())}
        return workers | set(self.master_pids())

    def stop(self, timeout: float = 15.0) -> int:
        """Send SIGTERM and return the master's exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise AssertionError(f"master did not exit within {timeout} s after SIGTERM\n{self.log()}") from None


def wait_for(predicate, timeout: float, interval: float = 0.02, message: str = "condition") -> None:
    """Poll `predicate` until it is true or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")


# A top-level `admin:` key in a test's config; the test then chose its own.
_ADMIN_SECTION = re.compile(r"^admin\s*:", re.MULTILINE)
# sun_path holds 108 bytes with its terminating NUL on Linux.
_MAX_UNIX_PATH = 107


def admin_socket_dir(tmp_path: Path) -> Path:
    """Return the directory for a test's admin sockets: `tmp_path`, or a short one.

    A long test name can make a path under `tmp_path` too long for a Unix
    socket; then the sockets go in a new short directory under the system
    temp dir, which the caller removes.
    """
    if len(str(tmp_path / "admin-99.sock").encode()) <= _MAX_UNIX_PATH:
        return tmp_path
    return Path(tempfile.mkdtemp(prefix="nexus-admin-"))


def with_test_admin(config_yaml: str, socket_path: str) -> str:
    """Give a test gateway its own admin socket and no metrics listener.

    Tests run in parallel, so none may share the default admin socket
    (/run/nexus/admin.sock) or the default metrics port 9901. A config that
    has its own `admin:` section is left as it is.
    """
    if _ADMIN_SECTION.search(config_yaml):
        return config_yaml
    separator = "" if not config_yaml or config_yaml.endswith("\n") else "\n"
    return f"{config_yaml}{separator}admin: {{socket: {json.dumps(socket_path)}, metrics: null}}\n"


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator:
    started: list[Gateway] = []
    socket_dir = admin_socket_dir(tmp_path)

    def start(config_yaml: str, workers: int = 2, expect_ready: bool = True, env: dict[str, str] | None = None) -> Gateway:
        config_path = tmp_path / f"nexus-{len(started)}.yaml"
        config_path.write_text(with_test_admin(config_yaml, str(socket_dir / f"admin-{len(started)}.sock")))
        log_path = tmp_path / f"nexus-{len(started)}.log"
        log_file = open(log_path, "wb")
        process = subprocess.Popen(
            [*NEXUS, "run", "--config", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **env} if env else None,
        )
        gateway = Gateway(process, log_path, config_path=config_path)
        started.append(gateway)
        if expect_ready:
            _wait_ready(gateway, workers)
        return gateway

    yield start
    for gateway in started:
        if gateway.process.poll() is None:
            gateway.process.kill()
            gateway.process.wait(5)
        # Workers of a SIGKILLed master, and masters that an upgrade
        # started, must not outlive the test.
        for pid in gateway.all_pids():
            if _is_nexus(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    if socket_dir != tmp_path:
        shutil.rmtree(socket_dir, ignore_errors=True)


def _is_nexus(pid: int) -> bool:
    """Whether `pid` runs Nexus (a pid from an old log line may have been reused by now)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return b"nexus" in file.read()
    except OSError:
        return False


def _wait_ready(gateway: Gateway, workers: int, timeout: float = 20.0) -> None:
    def ready() -> bool:
        if gateway.process.poll() is not None:
            raise AssertionError(f"gateway exited with {gateway.process.returncode}:\n{gateway.log()}")
        return len(gateway.serving_pids()) >= workers

    wait_for(ready, timeout, message=f"{workers} workers serving")
    gateway.addresses = _LISTEN_LINE.findall(gateway.log())
    gateway.worker_pids = gateway.serving_pids()
