"""Listening sockets, bound by the master and inherited by every worker.

The master owns the sockets so their accept queues outlive any one worker:
a worker that dies or is replaced leaves pending connections queued for
the others. IPv6 sockets are bound with IPV6_V6ONLY so that `0.0.0.0:8080`
and `[::]:8080` can both be listed.
"""

from __future__ import annotations

import errno
import logging
import socket
from dataclasses import dataclass

from nexus.config import parse_listen_address

__all__ = ["Listener", "bind_listeners"]

log = logging.getLogger("nexus.master")

BACKLOG = 1024


@dataclass(slots=True)
class Listener:
    """One bound listening socket and the address it was asked for."""

    requested: str
    sock: socket.socket

    @property
    def address(self) -> str:
        """The bound address as host:port, with the real port when 0 was asked."""
        host, port = self.sock.getsockname()[:2]
        return f"[{host}]:{port}" if self.sock.family == socket.AF_INET6 else f"{host}:{port}"

    def fileno(self) -> int:
        return self.sock.fileno()


def bind_listeners(addresses: list[str]) -> list[Listener]:
    """Bind and listen on every address, or close all and raise OSError."""
    listeners: list[Listener] = []
    try:
        for address in addresses:
            listeners.append(Listener(address, _bind(address)))
    except OSError:
        for listener in listeners:
            listener.sock.close()
        raise
    return listeners


def _bind(address: str) -> socket.socket:
    host, port = parse_listen_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit TCP_NODELAY on Linux. Without it a response
        # written in two parts waits for the downstream's delayed ACK (about
        # 40 ms), because granian does not set it on an inherited listener.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}; {_bind_advice(exc.errno)}") from exc
    return sock


def _bind_advice(errno_value: int | None) -> str:
    """Return what an operator can do about a failed bind, by its errno."""
    if errno_value == errno.EADDRINUSE:
        return "stop the process that uses it, or choose another address in `listen`"
    if errno_value == errno.EADDRNOTAVAIL:
        return "no interface of this host has that address: choose one that does, or 0.0.0.0 or [::] for all"
    if errno_value == errno.EACCES:
        return "a port below 1024 needs CAP_NET_BIND_SERVICE or socket activation (systemd/nexus.socket)"
    return "fix the address in `listen`"
