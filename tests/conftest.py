"""Shared fixtures: real upstream servers and real gateway processes on loopback.

`upstream_factory` starts `tests/upstream_server.py` processes on free ports;
`gateway_factory` writes a config file and starts `nexus run` as a real
master process, waiting until every worker serves. Both stop what they
started when the test ends, with SIGKILL if SIGTERM is not enough.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
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


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator:
    started: list[Gateway] = []

    def start(config_yaml: str, workers: int = 2, expect_ready: bool = True) -> Gateway:
        config_path = tmp_path / f"nexus-{len(started)}.yaml"
        config_path.write_text(config_yaml)
        log_path = tmp_path / f"nexus-{len(started)}.log"
        log_file = open(log_path, "wb")
        process = subprocess.Popen(
            [*NEXUS, "run", "--config", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        gateway = Gateway(process, log_path)
        started.append(gateway)
        if expect_ready:
            _wait_ready(gateway, workers)
        return gateway

    yield start
    for gateway in started:
        if gateway.process.poll() is None:
            gateway.process.kill()
            gateway.process.wait(5)
        # Workers of a SIGKILLed master must not outlive the test.
        for pid in gateway.serving_pids().values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _wait_ready(gateway: Gateway, workers: int, timeout: float = 20.0) -> None:
    def ready() -> bool:
        if gateway.process.poll() is not None:
            raise AssertionError(f"gateway exited with {gateway.process.returncode}:\n{gateway.log()}")
        return len(gateway.serving_pids()) >= workers

    wait_for(ready, timeout, message=f"{workers} workers serving")
    gateway.addresses = _LISTEN_LINE.findall(gateway.log())
    gateway.worker_pids = gateway.serving_pids()
