"""Serve an ASGI app with granian on a listening socket that another process bound.

granian 2.8.9 has no public option to serve on an inherited file descriptor,
so this module drives its private worker classes (`granian._granian.ASGIWorker`
with a `SocketHolder`). It is the only module that imports granian's private
API: the version is pinned exactly in pyproject.toml, and
tests/test_granian_server.py exercises every call made here, so an upgrade
that changes them fails there first.

Why ASGI rather than RSGI: granian's RSGI `response_stream` has an unbounded
channel, so one slow downstream reader can grow a worker's memory without
limit; ASGI's `send` waits when granian's channel is full. Proxying through
pyreqwest, ASGI measured about 3% fewer requests per second than RSGI on the
same machine (docs/architecture.md), a fair price for bounded memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from granian._futures import _future_watcher_wrapper, _new_cbscheduler
from granian._granian import ASGIWorker, RSGIWorker, SocketHolder, WorkerSignal
from granian.http import HTTP1Settings

__all__ = ["ServerSettings", "serve", "stop_accepting"]

log = logging.getLogger("nexus.worker")

AsgiApp = Callable[[dict[str, Any], Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Settings granian needs for the socket and the HTTP/1 connections."""

    worker_id: int
    backlog: int = 1024
    header_read_timeout_ms: int = 10_000
    # Requests handled concurrently by one worker; granian queues the rest.
    max_concurrency: int = 1024
    keep_alive: bool = True
    # "asgi" or "rsgi": which interface granian calls the app with.
    interface: str = "asgi"


def serve(
    app: AsgiApp,
    listen_fds: list[int],
    settings: ServerSettings,
    loop: asyncio.AbstractEventLoop,
    on_drain: Callable[[], None],
) -> None:
    """Serve `app` on every socket in `listen_fds` until SIGTERM or SIGINT.

    SIGUSR1 starts the drain: this worker stops accepting connections
    (`stop_accepting`) while it goes on serving the ones it has, and
    `on_drain` is called in the loop. `on_drain` is called again when the
    stop signal arrives (so it must do its work once). On the stop signal
    granian closes idle connections, finishes the requests in flight, and
    this function returns when all of them are done. granian sets no deadline
    on that drain, so the master kills a worker that takes longer than its own.
    """
    # NOTE: each granian worker takes the receiving end of its WorkerSignal,
    # so one signal per socket; sharing one makes the second worker panic.
    stop_signals = [WorkerSignal() for _ in listen_fds]
    remaining = len(listen_fds)
    all_stopped = asyncio.Event()

    stopping = False

    def on_stop_signal() -> None:
        # Runs in the loop through add_signal_handler, so it may touch loop objects.
        nonlocal stopping
        if stopping:
            return
        stopping = True
        on_drain()
        for stop_signal in stop_signals:
            stop_signal.set()

    def on_worker_stopped() -> None:
        nonlocal remaining
        remaining -= 1
        if remaining == 0:
            all_stopped.set()

    def on_drain_signal() -> None:
        stop_accepting(listen_fds)
        on_drain()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop_signal)
    loop.add_signal_handler(signal.SIGUSR1, on_drain_signal)

    callback = _future_watcher_wrapper(_asgi_runner(app) if settings.interface == "asgi" else app)
    for fd, stop_signal in zip(listen_fds, stop_signals):
        stop_signal.add_cb(lambda: loop.call_soon_threadsafe(on_worker_stopped))
        worker = _build_worker(settings, fd)
        # NOTE: granian's default scheduler runs handlers in a stand-in task
        # whose cancel() does nothing, which silently disables
        # asyncio.timeout(); real asyncio tasks make timeouts work.
        scheduler = _new_cbscheduler(loop, callback, impl_asyncio=True)
        worker.serve_str(scheduler, loop, stop_signal)

    loop.run_until_complete(all_stopped.wait())


def stop_accepting(listen_fds: list[int]) -> None:
    """Make granian accept no more connections on `listen_fds` in this process, and keep serving the others.

    granian stops accepting only when it stops, and at that moment it also
    closes every connection whose first request it has not read yet. A
    connection accepted just before the stop is closed under a request the
    client has sent, which the client cannot tell from a lost request. So a
    draining worker first stops taking connections: each listening
    descriptor number is pointed (dup2) at a placeholder socket that never
    has a connection, and granian's accept calls, made on that number, find
    nothing. The listening socket itself stays open in the master and the
    new generation, whose workers accept what arrives from now on. Calling
    this again does nothing.

    This relies on granian 2.8.9's SocketHolder serving the descriptor
    number it was given rather than a duplicate (tests/test_granian_server.py
    checks it).
    """
    for fd in listen_fds:
        if _is_placeholder(fd):
            continue
        placeholder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The kernel picks an abstract address (autobind), so no file is left
        # behind. It listens, so accept() finds nothing instead of failing. It is
        # non-blocking, as granian's event loop expects.
        placeholder.bind("")
        placeholder.listen(1)
        placeholder.setblocking(False)
        os.dup2(placeholder.fileno(), fd, inheritable=False)
        placeholder.close()
    log.debug("stopped accepting fds=%s", listen_fds)


def _is_placeholder(fd: int) -> bool:
    with socket.socket(fileno=os.dup(fd)) as sock:
        return sock.family == socket.AF_UNIX


def _asgi_runner(app: AsgiApp) -> Callable[[dict[str, Any], Any], Awaitable[None]]:
    def run(scope: dict[str, Any], proto: Any) -> Awaitable[None]:
        return app(scope, proto.receive, proto.send)

    return run


def _build_worker(settings: ServerSettings, fd: int) -> Any:
    """Create one granian ASGI worker bound to the listening socket `fd`."""
    http1 = HTTP1Settings(
        header_read_timeout=settings.header_read_timeout_ms,
        keep_alive=settings.keep_alive,
    )
    holder = SocketHolder(fd, False, settings.backlog)
    # Positional arguments as granian 2.8.9's ASGIWorker takes them: worker id,
    # (spec, holder) socket pair, IPC handle, runtime threads, blocking threads,
    # Python threads, idle timeout, backpressure, HTTP mode, HTTP/1 and HTTP/2
    # settings, websockets, static files, seven TLS settings, metrics.
    worker_class = ASGIWorker if settings.interface == "asgi" else RSGIWorker
    return worker_class(
        settings.worker_id,
        (None, holder),
        None,
        1,
        512,
        1,
        30,
        settings.max_concurrency,
        "1",
        http1,
        None,
        False,
        None,
        False,
        None,
        None,
        None,
        "1.3",
        None,
        [],
        False,
        (None, None),
    )
