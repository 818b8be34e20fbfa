"""The notify protocol client, against a datagram socket the test binds as NOTIFY_SOCKET."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from admin_support import short_socket_dir

from nexus.sd_notify import Notifier, Watchdog, watchdog_interval


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    directory = short_socket_dir()
    path = str(directory / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()
    shutil.rmtree(directory, ignore_errors=True)


def fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def test_ready_with_status(notify_socket) -> None:
    path, sock = notify_socket
    assert Notifier.from_environment({"NOTIFY_SOCKET": path}).ready("serving 2 workers")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving 2 workers"


def test_reloading_sends_monotonic_usec(notify_socket) -> None:
    path, sock = notify_socket
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier(path).reloading("reloading config")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    message = fields(sock.recv(4096))
    assert message["RELOADING"] == "1"
    assert before <= int(message["MONOTONIC_USEC"]) <= after
    assert message["STATUS"] == "reloading config"


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda notifier: notifier.stopping(), b"STOPPING=1"),
        (lambda notifier: notifier.status("draining generation 3"), b"STATUS=draining generation 3"),
        (lambda notifier: notifier.main_pid(4321), b"MAINPID=4321"),
        (lambda notifier: notifier.watchdog(), b"WATCHDOG=1"),
    ],
)
def test_messages(notify_socket, call, expected) -> None:
    path, sock = notify_socket
    assert call(Notifier(path))
    assert sock.recv(4096) == expected


def test_newline_in_status_cannot_add_a_field(notify_socket) -> None:
    path, sock = notify_socket
    Notifier(path).status("line one\nREADY=1")
    assert sock.recv(4096) == b"STATUS=line one READY=1"


def test_abstract_socket_address() -> None:
    name = f"nexus-test-notify-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    try:
        assert Notifier.from_environment({"NOTIFY_SOCKET": f"@{name}"}).ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_no_notify_socket_is_noop() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.stopping() is False


def test_missing_socket_logged_once(tmp_path: Path, caplog) -> None:
    notifier = Notifier(str(tmp_path / "gone.sock"))
    with caplog.at_level("DEBUG", logger="nexus.master"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
    failures = [record for record in caplog.records if "sd_notify failed" in record.message]
    assert [record.levelname for record in failures] == ["WARNING", "DEBUG"]


@pytest.mark.parametrize(
    ("env", "pid", "expected"),
    [
        ({}, 10, None),
        ({"WATCHDOG_USEC": "20000000"}, 10, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "10"}, 10, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "11"}, 10, None),
        ({"WATCHDOG_USEC": "0"}, 10, None),
        ({"WATCHDOG_USEC": "soon"}, 10, None),
    ],
)
def test_watchdog_interval(env, pid, expected) -> None:
    assert watchdog_interval(env, pid) == expected


def test_watchdog_pings_at_half_interval(notify_socket) -> None:
    path, sock = notify_socket
    watchdog = Watchdog.from_environment(Notifier(path), {"WATCHDOG_USEC": "4000000"}, pid=os.getpid())
    assert watchdog.interval == 2.0
    assert watchdog.ping_if_due(now=100.0)
    assert not watchdog.ping_if_due(now=101.9)
    assert watchdog.ping_if_due(now=102.0)
    assert [sock.recv(4096), sock.recv(4096)] == [b"WATCHDOG=1", b"WATCHDOG=1"]


def test_watchdog_off_without_notify_socket() -> None:
    watchdog = Watchdog.from_environment(Notifier(None), {"WATCHDOG_USEC": "4000000"}, pid=os.getpid())
    assert not watchdog.enabled
    assert watchdog.ping_if_due(now=100.0) is False
