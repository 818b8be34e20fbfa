"""A configurable upstream for the cache tests, counting the requests it receives.

`CacheUpstream` runs an HTTP/1.1 server in a thread of the test process.
A test sets, per path, the status, header fields and body to answer with
(`respond`); the server answers a GET whose If-None-Match matches the
configured ETag (or whose If-Modified-Since is not older than the configured
Last-Modified) with 304, as an origin would. Every request is recorded
with its method, path and header fields, so a test can count what reached
the upstream. The `origin` and `socket_dir` fixtures are shared by the
cache test modules, which import them.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


class _Server(ThreadingHTTPServer):
    # The default listen backlog of 5 drops connections when tests send tens
    # at once, and the gateway then gets connect timeouts.
    request_queue_size = 128


@dataclass
class Reply:
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b"hello"
    delay: float = 0.0


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


class CacheUpstream:
    def __init__(self) -> None:
        self.replies: dict[str, Reply] = {}
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                path_only = self.path.split("?", 1)[0]
                with upstream._lock:
                    upstream.requests.append(
                        Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
                    )
                    reply = upstream.replies.get(self.path) or upstream.replies.get(path_only) or Reply()
                if reply.delay:
                    time.sleep(reply.delay)
                status, body = reply.status, reply.body
                if self.command == "GET" and _not_modified(self.headers, reply.headers):
                    status, body = 304, b""
                self.send_response(status)
                names = {name.lower() for name, _ in reply.headers}
                if "date" not in names:
                    self.send_header("Date", formatdate(usegmt=True))
                for name, value in reply.headers:
                    self.send_header(name, value)
                if status != 304:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD" and status != 304:
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _answer

            def send_response(self, code, message=None):
                # Without the Server and default Date fields: the test controls them.
                self.log_request(code)
                self.send_response_only(code, message)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def respond(self, path: str, status: int = 200, headers=(), body: bytes = b"hello", delay: float = 0.0) -> None:
        with self._lock:
            self.replies[path] = Reply(status, list(headers), body, delay)

    def count(self, path: str | None = None, method: str | None = None) -> int:
        with self._lock:
            return sum(
                1
                for seen in self.requests
                if (path is None or seen.path == path) and (method is None or seen.method == method)
            )

    def last(self, path: str) -> Seen:
        with self._lock:
            return [seen for seen in self.requests if seen.path == path][-1]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _not_modified(request_headers, reply_headers: list[tuple[str, str]]) -> bool:
    configured = {name.lower(): value for name, value in reply_headers}
    etag = configured.get("etag")
    if_none_match = request_headers.get("if-none-match")
    if if_none_match is not None:
        return etag is not None and etag in [tag.strip() for tag in if_none_match.split(",")]
    since = request_headers.get("if-modified-since")
    modified = configured.get("last-modified")
    if since and modified:
        return parsedate_to_datetime(modified) <= parsedate_to_datetime(since)
    return False


def http_date(offset: float = 0.0) -> str:
    return formatdate(time.time() + offset, usegmt=True)


class TcpRelay:
    """A TCP relay on a fixed loopback port to a target port, which a test can cut and restore.

    `cut()` closes the listener and every relayed connection, as a network
    failure between a node and Redis would; `restore()` listens again on the
    same port.
    """

    def __init__(self, target_port: int) -> None:
        import socket

        self._socket_module = socket
        self.target_port = target_port
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._connections: list = []
        self._listener = None
        self.restore()

    def restore(self) -> None:
        socket = self._socket_module
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone
            # would leave the port bound until a connection arrives.
            try:
                listener.shutdown(self._socket_module.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        for connection in self._connections:
            try:
                connection.shutdown(self._socket_module.SHUT_RDWR)
            except OSError:
                pass
            connection.close()
        self._connections = []

    def _accept(self, listener) -> None:
        socket = self._socket_module
        while True:
            try:
                downstream, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._connections += [downstream, upstream]
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source, sink) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.close()
                except OSError:
                    pass


@pytest.fixture
def origin():
    """A running CacheUpstream, stopped when the test ends."""
    upstream = CacheUpstream()
    yield upstream
    upstream.stop()


@pytest.fixture
def socket_dir():
    """A short temporary directory for admin sockets, whose paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="nx-cache-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
