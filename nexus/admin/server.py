"""The master's admin API: HTTP/1.1 with JSON bodies on a Unix socket.

`AdminServer` runs in a thread of the master (one more thread per open
connection), so the master's loop never waits for it. Each route calls a
thread-safe Master method or a service's handler. A failure the handler
expects is an `AdminError` with its status; anything else is logged and
sent as a 500 response, and the server keeps running. Every error body is an
RFC 9457 problem document with type "about:blank" and the status phrase as
title, because the status alone names the kind of failure.

Forked workers must not keep the admin socket or its connections open: a
worker that outlived a dead master would make its socket look alive. An
at-fork hook closes them in every child the master forks.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import msgspec

from nexus.admin.paths import socket_path
from nexus.admin.unix_socket import AdminSocketError, BoundSocket, bind_admin_socket, peer_credentials, set_permissions
from nexus.master_fds import close_in_children, keep_in_children
from nexus.services import AdminError, AdminHandler, Service

if TYPE_CHECKING:
    from nexus.config import Config
    from nexus.master import Master

__all__ = ["AdminServer", "master_routes"]

log = logging.getLogger("nexus.admin")

# Largest request body the admin API reads, in bytes.
MAX_BODY = 1 << 20
# A connection that sends nothing for this long is closed, in seconds.
IDLE_TIMEOUT = 60.0
# How often the accept loop checks for stop(), in seconds.
POLL_INTERVAL = 0.2
# Connections served at once, each by its own thread. nexusctl opens one at
# a time, so more than this means a client that leaks connections.
MAX_CONNECTIONS = 32
# How long the accept loop may spend sending a 503 to a connection over the limit, in seconds.
REJECT_TIMEOUT = 1.0


def master_routes(master: Master) -> dict[tuple[str, str], AdminHandler]:
    """Return the routes served by the Master itself."""
    return {
        ("GET", "/status"): lambda query, body: master.status(),
        ("GET", "/workers"): lambda query, body: _workers(master.status()),
        ("POST", "/reload"): lambda query, body: _reload(master),
        ("POST", "/upgrade"): lambda query, body: master.request_upgrade(),
        ("POST", "/drain"): lambda query, body: master.drain(),
        ("POST", "/resume"): lambda query, body: master.resume(),
    }


def _reload(master: Master) -> dict[str, Any]:
    # The reply names the file reloaded: the one the master was started
    # with, whatever config file the client read the socket path from.
    return {**master.request_reload(), "config_path": master.config_path}


def _workers(status: dict[str, Any]) -> dict[str, Any]:
    return {"generation": status.get("generation"), "workers": status.get("workers", [])}


class AdminServer:
    """The admin API of one master: `start()` binds the socket and serves, `stop()` ends both."""

    def __init__(self, master: Master, services: Iterable[Service] = ()) -> None:
        self._master = master
        self._routes = _merge_routes(master_routes(master), services)
        self._serving: _Serving | None = None

    def set_services(self, services: Iterable[Service]) -> None:
        """Serve the routes of `services` in place of the current ones (the master restarted them)."""
        routes = _merge_routes(master_routes(self._master), services)
        # The server thread holds this dict: update it, do not replace it.
        self._routes.clear()
        self._routes.update(routes)

    def start(self, *, replace_live: bool = False) -> None:
        """Bind the socket and serve it from a thread; raise AdminSocketError if the socket cannot be made.

        `replace_live` takes the path over from a master that still serves
        on it: the new master of an upgrade passes it once its workers serve.
        """
        self._serving = self._serve(self._master.config, replace_live)

    def stop(self) -> None:
        """Stop accepting, close the socket and remove its path unless another master took it over.

        Requests already being handled finish in their own threads.
        """
        if self._serving is not None:
            self._serving.close()
            self._serving = None

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded admin section: move the socket, or change its mode and group in place.

        A failure is logged and leaves the socket as it was, because the
        reload it belongs to has already been accepted.
        """
        if self._serving is None:
            return
        bound = self._serving.bound
        admin = config.admin
        try:
            if socket_path(admin, self._config_path()) == bound.path:
                set_permissions(bound.path, admin.socket_mode, admin.socket_group)
                return
            # Bind the new path before closing the old one, so nexusctl can always connect.
            moved = self._serve(config, replace_live=False)
        except AdminSocketError as exc:
            log.error("admin socket unchanged path=%s: %s", bound.path, exc)
            return
        self._serving.close()
        self._serving = moved
        log.info("admin API moved old_path=%s path=%s", bound.path, moved.bound.path)

    def fileno(self) -> int | None:
        """Return the listening socket's file descriptor, or None when stopped."""
        return self._serving.bound.sock.fileno() if self._serving is not None else None

    @property
    def path(self) -> str | None:
        """The path of the socket being served, or None when stopped."""
        return self._serving.bound.path if self._serving is not None else None

    def _config_path(self) -> str | None:
        return getattr(self._master, "config_path", None)

    def _serve(self, config: Config, replace_live: bool) -> _Serving:
        admin = config.admin
        path = socket_path(admin, self._config_path())
        bound = bind_admin_socket(path, admin.socket_mode, admin.socket_group, replace_live=replace_live)
        server = _UnixHTTPServer(bound.sock, self._routes)
        thread = threading.Thread(target=server.serve_forever, args=(POLL_INTERVAL,), name="admin-server", daemon=True)
        thread.start()
        log.info("admin API listening path=%s mode=%s group=%s", path, admin.socket_mode, admin.socket_group or "-")
        return _Serving(bound, server, thread)


@dataclass(slots=True)
class _Serving:
    """One bound admin socket and the thread accepting on it."""

    bound: BoundSocket
    server: _UnixHTTPServer
    thread: threading.Thread

    def close(self) -> None:
        # shutdown() waits for serve_forever to notice, so it would wait
        # forever on a thread that already ended.
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join()
        keep_in_children(self.bound.sock.fileno())
        self.bound.close(unlink=True)
        log.info("admin API stopped path=%s", self.bound.path)


def _merge_routes(
    routes: dict[tuple[str, str], AdminHandler], services: Iterable[Service]
) -> dict[tuple[str, str], AdminHandler]:
    """Add every service's routes to `routes`; raise ValueError when two claim the same one."""
    merged = dict(routes)
    owners = {key: "master" for key in routes}
    for service in services:
        for key, handler in service.admin_routes().items():
            if key in merged:
                raise ValueError(
                    f"admin route {key[0]} {key[1]} of service {service.name} is already served by {owners[key]}"
                )
            merged[key] = handler
            owners[key] = service.name
    return merged


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.BaseServer):
    """socketserver's accept loop and a thread per connection, on a socket bound elsewhere."""

    daemon_threads = True

    def __init__(self, sock: socket.socket, routes: dict[tuple[str, str], AdminHandler]) -> None:
        super().__init__(sock.getsockname(), _Handler)
        self.socket = sock
        self.routes = routes
        self._connection_slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._rejected = 0
        # The accept loop must not block when a connection is gone before accept().
        sock.setblocking(False)
        close_in_children(sock.fileno())

    def fileno(self) -> int:
        return self.socket.fileno()

    def get_request(self) -> tuple[socket.socket, str]:
        connection, _ = self.socket.accept()
        close_in_children(connection.fileno())
        return connection, ""

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        keep_in_children(request.fileno())
        try:
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        request.close()

    def process_request(self, request: socket.socket, client_address: str) -> None:  # type: ignore[override]
        """Serve the connection in a new thread, or reject it with 503 when all connection slots are taken."""
        if not self._connection_slots.acquire(blocking=False):
            self._reject_busy(request)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address: str) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_slots.release()

    def _reject_busy(self, request: socket.socket) -> None:
        # Logged once at warning, then at debug, so a flood does not fill the log.
        level = logging.DEBUG if self._rejected else logging.WARNING
        self._rejected += 1
        log.log(level, "admin connection rejected: %d connections open, the maximum", MAX_CONNECTIONS)
        detail = f"the admin API has {MAX_CONNECTIONS} connections open, the maximum: close idle ones or retry"
        body = msgspec.json.encode(
            {"type": "about:blank", "title": "Service Unavailable", "status": 503, "detail": detail}
        )
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        try:
            # The accept loop sends this itself, so it must not wait on a slow reader.
            request.settimeout(REJECT_TIMEOUT)
            request.sendall(head.encode() + body)
            # Read what the client sent: closing a Unix socket with unread
            # data resets the connection, and the client may then see the
            # reset instead of the 503.
            request.setblocking(False)
            while request.recv(65536):
                pass
        except OSError:
            pass

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            log.warning("admin connection closed by the client: %s", sys.exc_info()[1])
            return
        log.exception("admin connection failed")


class _RequestError(Exception):
    """A request the admin API rejects before any handler runs."""

    def __init__(self, status: HTTPStatus, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Respond to a malformed request line with a status line and header
    # fields too, which BaseHTTPRequestHandler leaves out for HTTP/0.9.
    default_request_version = "HTTP/1.0"
    server_version = "nexus-admin"
    timeout = IDLE_TIMEOUT
    server: _UnixHTTPServer

    def setup(self) -> None:
        super().setup()
        try:
            self.peer_pid, self.peer_uid, _ = peer_credentials(self.connection)
        except OSError:
            self.peer_pid = self.peer_uid = -1

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base class signature
        # _dispatch logs each request with its status and the caller.
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Send a problem document for a malformed request (called by BaseHTTPRequestHandler)."""
        status = HTTPStatus(code)
        self._send_problem(status, explain or message or status.description)

    def _dispatch(self) -> None:
        started = time.monotonic()
        status = HTTPStatus.INTERNAL_SERVER_ERROR
        try:
            try:
                url = urlsplit(self.path)
                handler = self._find_route(url.path)
                query = _parse_query(url.query)
                body = self._read_body()
                result = msgspec.json.encode(handler(query, body))
                status = HTTPStatus.OK
                self._send(status, "application/json", result)
            except AdminError as exc:
                status = HTTPStatus(exc.status)
                self._send_problem(status, exc.message)
            except _RequestError as exc:
                status = exc.status
                self._send_problem(status, exc.detail, exc.headers)
        except (BrokenPipeError, ConnectionResetError):
            # nexusctl gave up waiting (--timeout) before the master finished.
            self.close_connection = True
            log.warning(
                "admin client left before the response method=%s path=%s status=%d peer_pid=%d",
                self.command,
                self.path,
                status.value,
                self.peer_pid,
            )
            return
        except Exception:
            log.exception("admin request failed method=%s path=%s", self.command, self.path)
            self._send_problem(status, "the admin request failed inside the master: see the master's log")
        self._log_request(status, time.monotonic() - started)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    def _find_route(self, path: str) -> AdminHandler:
        routes = self.server.routes
        handler = routes.get((self.command, path))
        if handler is not None:
            return handler
        allowed = sorted(method for method, route_path in routes if route_path == path)
        if allowed:
            raise _RequestError(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"{path} does not accept {self.command}: use {' or '.join(allowed)}",
                {"Allow": ", ".join(allowed)},
            )
        known = ", ".join(f"{method} {route_path}" for method, route_path in sorted(routes, key=lambda key: key[1]))
        raise _RequestError(HTTPStatus.NOT_FOUND, f"no admin route {self.command} {path}; routes: {known}")

    def _read_body(self) -> Any:
        """Return the decoded JSON body, or None when the request has none."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise _RequestError(HTTPStatus.LENGTH_REQUIRED, "send the body with Content-Length, not chunked")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise _RequestError(
                HTTPStatus.BAD_REQUEST, f"invalid Content-Length {self.headers['Content-Length']!r}"
            ) from None
        if length < 0:
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"invalid Content-Length {length}")
        if length > MAX_BODY:
            raise _RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body of {length} bytes is larger than the {MAX_BODY} bytes allowed",
            )
        if length == 0:
            return None
        data = self.rfile.read(length)
        content_type = self.headers.get_content_type()
        if self.headers.get("Content-Type") is not None and content_type != "application/json":
            raise _RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"body must be application/json, not {content_type}")
        try:
            return msgspec.json.decode(data)
        except msgspec.DecodeError as exc:
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"invalid JSON body: {exc}") from None

    def _send_problem(self, status: HTTPStatus, detail: str, headers: dict[str, str] | None = None) -> None:
        problem = {"type": "about:blank", "title": status.phrase, "status": status.value, "detail": detail}
        # After an error the rest of the request may be unread: close the connection.
        self.close_connection = True
        self._send(status, "application/problem+json", msgspec.json.encode(problem), headers)

    def _send(self, status: HTTPStatus, content_type: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status.value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _log_request(self, status: HTTPStatus, duration: float) -> None:
        # Status polling is frequent; operator actions are logged at info.
        level = logging.DEBUG if self.command == "GET" and status < 400 else logging.INFO
        log.log(
            level,
            "admin request method=%s path=%s status=%d duration_ms=%.1f peer_pid=%d peer_uid=%d",
            self.command,
            self.path,
            status.value,
            duration * 1000,
            self.peer_pid,
            self.peer_uid,
        )


def _parse_query(query: str) -> dict[str, str]:
    """Decode the query string into a dict; a parameter given twice is a 400."""
    params: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in params:
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"query parameter {name!r} given more than once")
        params[name] = value
    return params
