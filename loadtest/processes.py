"""Start and stop the processes of a load test: the capacity upstream and a Nexus gateway.

Every process started here gets SIGTERM from the kernel when the thread
that started it ends (Linux PR_SET_PDEATHSIG), so a load script that is
killed leaves no server behind. `stop()` ends a process with SIGTERM, then
SIGKILL when it has not exited within its grace time.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_SCRIPT = ROOT / "loadtest" / "capacity_upstream.py"

_PR_SET_PDEATHSIG = 1
_UPSTREAM_LINE = re.compile(r"capacity upstream listening on (\S+):(\d+) capacity=([\d.]+)/s")
_LISTEN_LINE = re.compile(r"listening address=(\S+)")
_SERVING_LINE = re.compile(r"worker serving worker=(\d+) pid=(\d+)")


class StartError(RuntimeError):
    """A process did not start; the message contains the end of its log."""


def _die_with_parent() -> None:
    """Run in the child before exec: ask for SIGTERM when the parent thread ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def popen(args: list[str], log_path: Path | None, **kwargs) -> subprocess.Popen:
    """Start a process that dies with this one, its stderr (and stdout if not piped) to a new `log_path`."""
    log_file = open(log_path, "wb") if log_path else subprocess.DEVNULL
    stdout = kwargs.pop("stdout", log_file)
    try:
        return subprocess.Popen(args, stdout=stdout, stderr=log_file, preexec_fn=_die_with_parent, cwd=ROOT, **kwargs)
    finally:
        if log_path:
            log_file.close()


def stop(process: subprocess.Popen, grace: float = 10.0) -> int:
    """Send SIGTERM, wait up to `grace` seconds, then SIGKILL; return the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(5)


@dataclass
class Upstream:
    """A running loadtest/capacity_upstream.py."""

    process: subprocess.Popen
    host: str
    port: int
    capacity: float

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stats(self, timeout: float = 5.0) -> dict:
        """Fetch the upstream's counters from its stats path, directly and not through the gateway."""
        with urllib.request.urlopen(self.url + "/_stats", timeout=timeout) as response:
            return json.loads(response.read())

    def stop(self) -> int:
        return stop(self.process, grace=5.0)


def start_upstream(
    concurrency: int, service_ms: float, log_path: Path | None, queue_limit: int | None = None
) -> Upstream:
    args = [
        sys.executable,
        str(UPSTREAM_SCRIPT),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--concurrency",
        str(concurrency),
        "--service-ms",
        f"{service_ms:g}",
        "--exit-with-parent",
    ]
    if queue_limit is not None:
        args += ["--queue-limit", str(queue_limit)]
    process = popen(args, log_path, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    # Nothing else is printed on stdout; closing it does not stop the server.
    process.stdout.close()
    match = _UPSTREAM_LINE.match(line)
    if not match:
        stop(process)
        log = log_path.read_text(errors="replace")[-2000:] if log_path else ""
        raise StartError(f"the capacity upstream did not start: first line {line!r}\n{log}")
    return Upstream(process, match.group(1), int(match.group(2)), float(match.group(3)))


@dataclass
class Gateway:
    """A running `nexus run` master and the address it listens on."""

    process: subprocess.Popen
    log_path: Path
    address: str = ""
    worker_pids: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, grace: float = 15.0) -> int:
        """Stop the master with SIGTERM (it drains its workers), and kill any worker left after a SIGKILL."""
        status = stop(self.process, grace)
        for pid in self.worker_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return status


def start_gateway(config_path: Path, log_path: Path, workers: int, timeout: float = 30.0) -> Gateway:
    """Start `nexus run` and wait until all `workers` serve; raise StartError with its log otherwise."""
    args = [sys.executable, "-m", "nexus", "run", "--config", str(config_path), "--log-level", "info"]
    gateway = Gateway(popen(args, log_path), log_path)
    deadline = time.monotonic() + timeout
    while True:
        text = gateway.log()
        pids = {int(slot): int(pid) for slot, pid in _SERVING_LINE.findall(text)}
        if len(pids) >= workers:
            break
        if gateway.process.poll() is not None:
            raise StartError(f"nexus exited with status {gateway.process.returncode}:\n{text[-3000:]}")
        if time.monotonic() > deadline:
            gateway.stop()
            raise StartError(f"nexus did not serve with {workers} workers within {timeout:g} s:\n{text[-3000:]}")
        time.sleep(0.05)
    gateway.worker_pids = list(pids.values())
    addresses = _LISTEN_LINE.findall(text)
    if not addresses:
        gateway.stop()
        raise StartError(f"nexus logged no listening address:\n{text[-3000:]}")
    gateway.address = addresses[0]
    return gateway
