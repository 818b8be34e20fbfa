"""granian's private worker API, driven the way nexus/workers/granian_server.py does.

These tests are the first to fail if a granian upgrade changes the private
classes Nexus depends on: serving on a socket bound by another process, on
two sockets at once, and draining in-flight requests on SIGTERM.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import select
import signal
import socket
import threading
import time

import uvloop

from nexus.workers.granian_server import ServerSettings, serve


async def _app(scope, receive, send):
    if scope["type"] != "http":
        return
    delay = float(scope["query_string"] or b"0")
    await asyncio.sleep(delay)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": f"pid={os.getpid()}".encode()})


def _bind(family: int, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, 0))
    sock.listen(64)
    sock.setblocking(False)
    return sock


def _fork_server(socks: list[socket.socket]) -> int:
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            loop = uvloop.new_event_loop()
            asyncio.set_event_loop(loop)
            serve(_app, [s.fileno() for s in socks], ServerSettings(worker_id=0), loop, lambda: None)
            status = 0
        finally:
            os._exit(status)
    return pid


def _get(host: str, port: int, query: str = "") -> tuple[int, str]:
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        for _ in range(100):
            try:
                connection.request("GET", f"/?{query}" if query else "/")
                break
            except ConnectionRefusedError:
                time.sleep(0.05)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def _wait_exit(pid: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"server process {pid} did not exit within {timeout} s")


def test_serves_on_inherited_sockets():
    v4 = _bind(socket.AF_INET, "127.0.0.1")
    v6 = _bind(socket.AF_INET6, "::1")
    pid = _fork_server([v4, v6])
    try:
        assert _get("127.0.0.1", v4.getsockname()[1]) == (200, f"pid={pid}")
        assert _get("::1", v6.getsockname()[1]) == (200, f"pid={pid}")
    finally:
        os.kill(pid, signal.SIGTERM)
        assert os.waitstatus_to_exitcode(_wait_exit(pid)) == 0
        v4.close()
        v6.close()


def test_sigterm_drains_in_flight_request():
    sock = _bind(socket.AF_INET, "127.0.0.1")
    port = sock.getsockname()[1]
    pid = _fork_server([sock])
    result: dict[str, object] = {}

    def slow_request() -> None:
        result["response"] = _get("127.0.0.1", port, "1.0")

    try:
        assert _get("127.0.0.1", port)[0] == 200
        client = threading.Thread(target=slow_request)
        client.start()
        time.sleep(0.3)
        os.kill(pid, signal.SIGTERM)
        client.join(10)
        assert result["response"] == (200, f"pid={pid}")
        assert os.waitstatus_to_exitcode(_wait_exit(pid)) == 0
    finally:
        sock.close()


def test_sigusr1_stops_accepting():
    sock = _bind(socket.AF_INET, "127.0.0.1")
    port = sock.getsockname()[1]
    pid = _fork_server([sock])
    open_connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        assert _get("127.0.0.1", port)[0] == 200
        open_connection.request("GET", "/")
        assert open_connection.getresponse().read() == f"pid={pid}".encode()

        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.3)
        # A new connection waits in the socket's queue: the worker no longer accepts.
        late = socket.create_connection(("127.0.0.1", port), timeout=5)
        late.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        late.settimeout(1.0)
        try:
            answer = late.recv(100)
        except TimeoutError:
            answer = None
        assert answer is None, f"the draining worker answered a new connection: {answer!r}"
        # The connection it had keeps being served.
        open_connection.request("GET", "/")
        assert open_connection.getresponse().read() == f"pid={pid}".encode()
        # The socket stayed open for the other processes that hold it: this one takes the queued connection.
        ready, _, _ = select.select([sock], [], [], 5)
        assert ready == [sock]
        accepted, _ = sock.accept()
        accepted.close()
        late.close()
    finally:
        open_connection.close()
        os.kill(pid, signal.SIGTERM)
        assert os.waitstatus_to_exitcode(_wait_exit(pid)) == 0
        sock.close()
