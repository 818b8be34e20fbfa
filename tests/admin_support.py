"""A small master stand-in for the admin server tests, and helpers to run nexusctl.

`StandInMaster` has the attributes and thread-safe methods the admin server
calls on a real Master (`config`, `config_path`, `status()`,
`request_reload()` and the other verbs). It records each call so tests can
check what reached it, and a test can make a verb fail or block.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nexus.config import parse_config
from nexus.services import AdminError

VENV_BIN = Path(sys.executable).parent
NEXUSCTL = str(VENV_BIN / "nexusctl")


class StandInMaster:
    def __init__(self, socket_path: str, admin_settings: str = "") -> None:
        extra = f", {admin_settings}" if admin_settings else ""
        self.config_path = None
        self.config = parse_config(f'admin: {{socket: "{socket_path}"{extra}, metrics: null}}\n')
        self.generation = 1
        self.calls: list[str] = []
        self.reload_error: AdminError | None = None
        self.reload_started = threading.Event()
        self.release_reload = threading.Event()
        self.release_reload.set()
        self.crash_status = False

    def status(self) -> dict[str, Any]:
        self.calls.append("status")
        if self.crash_status:
            raise RuntimeError("status broke")
        return {
            "pid": os.getpid(),
            "generation": self.generation,
            "state": "running",
            "config_path": "/etc/nexus/nexus.yaml",
            "config_hash": "ab" * 32,
            "started_at": time.time() - 75,
            "uptime_s": 75.0,
            "reloads": self.generation - 1,
            "workers": [
                {
                    "slot": 0,
                    "pid": 101,
                    "cpu": 0,
                    "generation": self.generation,
                    "state": "serving",
                    "started_at": time.time() - 70,
                    "uptime_s": 70.0,
                    "requests": 12,
                    "restarts": 0,
                },
                {
                    "slot": 1,
                    "pid": 102,
                    "cpu": 1,
                    "generation": self.generation,
                    "state": "serving",
                    "started_at": time.time() - 3700,
                    "uptime_s": 3700.0,
                    "requests": 7,
                    "restarts": 2,
                },
            ],
        }

    def request_reload(self) -> dict[str, Any]:
        self.calls.append("reload")
        self.reload_started.set()
        self.release_reload.wait(30)
        if self.reload_error is not None:
            raise self.reload_error
        self.generation += 1
        return {"generation": self.generation, "config_hash": "cd" * 32}

    def request_upgrade(self) -> dict[str, Any]:
        self.calls.append("upgrade")
        return {"pid": 4242, "generation": self.generation}

    def drain(self) -> dict[str, Any]:
        self.calls.append("drain")
        return {"state": "draining"}

    def resume(self) -> dict[str, Any]:
        self.calls.append("resume")
        return {"state": "running"}


def fd_moves(sockets: list[socket.socket]) -> str:
    """Return bash redirections that put each socket at its systemd number (3, 4, ...) and close the original.

    bash, unlike dash, accepts descriptor numbers above 9 in redirections.
    A following `exec` keeps the shell's pid, so `LISTEN_PID=$$` names the
    process that gets the sockets, as systemd sets it.
    """
    return " ".join(f"{3 + i}<&{sock.fileno()} {sock.fileno()}<&-" for i, sock in enumerate(sockets))


@contextlib.contextmanager
def temporary_socket_dir() -> Iterator[Path]:
    """Yield a short directory under /tmp for Unix sockets, and remove it afterwards."""
    directory = short_socket_dir()
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def short_socket_dir() -> Path:
    """Return a new directory under /tmp that every user may enter (mode 0755), for socket paths.

    pytest's tmp_path can be too long for a Unix socket path and is closed
    to other users; the caller removes the directory.
    """
    directory = Path(tempfile.mkdtemp(prefix="nexus-adm-"))
    directory.chmod(0o755)
    return directory


def run_nexusctl(*args: str, timeout: float = 30.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the installed nexusctl script, with `env` added to the environment."""
    # Without RUNTIME_DIRECTORY, as in an operator's shell, the default path is /run/nexus/admin.sock.
    environment = {name: value for name, value in os.environ.items() if name != "RUNTIME_DIRECTORY"}
    environment.update(env or {})
    return subprocess.run([NEXUSCTL, *args], capture_output=True, text=True, timeout=timeout, env=environment)


def run_nexusctl_as(uid: int, *args: str, timeout: float = 30.0) -> tuple[int, str, str]:
    """Run nexusctl's main in a forked child that switched to `uid`; return (exit status, stdout, stderr).

    The installed script cannot be executed as another user here, because
    the interpreter lives in root's home. A forked child already has the
    code loaded and only drops its privileges.
    """
    from nexus.cli import nexusctl

    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 70
        try:
            # pytest replaced sys.stdout and sys.stderr; write to the pipes instead.
            sys.stdout = open(out_write, "w", closefd=False)
            sys.stderr = open(err_write, "w", closefd=False)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            nexusctl.main(list(args), prog_name="nexusctl")
            status = 0
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    os.close(out_write)
    os.close(err_write)
    deadline = time.monotonic() + timeout
    stdout, stderr = _read_all(out_read), _read_all(err_read)
    while True:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(wait_status), stdout, stderr
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError(f"nexusctl {' '.join(args)} as uid {uid} did not finish in {timeout} s")
        time.sleep(0.01)


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode()
