"""Parsing LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES, in a child process that got real sockets as fd 3 and up.

The end-to-end test of a `nexus run` started this way is in
tests/e2e/test_systemd_units.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from admin_support import fd_moves

from nexus.socket_activation import activated_sockets

# Runs in the child: report what activated_sockets() returned and what is left of the variables.
CHILD = """
import json, os
from nexus.socket_activation import SocketActivationError, activated_sockets
try:
    found = [
        {"fd": s.fd, "name": s.name, "address": s.address, "blocking": s.listener.sock.getblocking()}
        for s in activated_sockets()
    ]
    error = None
except SocketActivationError as exc:
    found, error = [], str(exc)
left = {name: os.environ.get(name) for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")}
print(json.dumps({"found": found, "error": error, "left": left}))
"""


def run_child(sockets: list[socket.socket], env: dict[str, str], pid: str = "$$") -> dict:
    """Start a Python child with `sockets` as fd 3, 4, ... and LISTEN_PID set to `pid` (its own pid by default)."""
    script = f'LISTEN_PID={pid} exec "$0" -c "$1" {fd_moves(sockets)}'
    result = subprocess.run(
        ["bash", "-c", script, sys.executable, CHILD],
        env={**os.environ, **env},
        pass_fds=[sock.fileno() for sock in sockets],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def listening(family: int = socket.AF_INET, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(8)
    return sock


def test_two_named_sockets() -> None:
    first, second = listening(), listening(socket.AF_INET6, "::1")
    ports = first.getsockname()[1], second.getsockname()[1]
    with first, second:
        report = run_child([first, second], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "http:http6"})
    assert report["error"] is None
    assert report["found"] == [
        {"fd": 3, "name": "http", "address": f"127.0.0.1:{ports[0]}", "blocking": False},
        {"fd": 4, "name": "http6", "address": f"[::1]:{ports[1]}", "blocking": False},
    ]
    assert report["left"] == {"LISTEN_FDS": None, "LISTEN_PID": None, "LISTEN_FDNAMES": None}


def test_name_count_mismatch_gives_unknown() -> None:
    with listening() as sock:
        report = run_child([sock], {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"})
    assert [found["name"] for found in report["found"]] == ["unknown"]


def test_other_pid_ignored() -> None:
    with listening() as sock:
        report = run_child([sock], {"LISTEN_FDS": "1"}, pid="1")
    assert report["found"] == []
    assert report["error"] is None
    assert report["left"]["LISTEN_FDS"] is None


def test_not_listening_socket_rejected() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        report = run_child([sock], {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"})
    assert (
        report["error"]
        == "passed socket fd 3 (web) is not a listening stream socket: use ListenStream= with Accept=no in nexus.socket"
    )


def test_unix_socket_rejected(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(tmp_path / "s"))
        sock.listen(1)
        report = run_child([sock], {"LISTEN_FDS": "1"})
    assert "is not a TCP socket: Nexus serves TCP only" in report["error"]


def test_invalid_count_rejected() -> None:
    with listening() as sock:
        report = run_child([sock], {"LISTEN_FDS": "two"})
    assert report["error"] == "invalid LISTEN_FDS='two': expected the number of passed sockets"


def test_without_variables_nothing() -> None:
    env: dict[str, str] = {}
    assert activated_sockets(env) == []


def test_unset_false_keeps_variables() -> None:
    env = {"LISTEN_FDS": "1", "LISTEN_PID": "1"}
    assert activated_sockets(env, unset=False) == []
    assert env == {"LISTEN_FDS": "1", "LISTEN_PID": "1"}
