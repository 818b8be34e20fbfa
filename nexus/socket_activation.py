"""Listening sockets passed by systemd (sd_listen_fds(3)), for nexus.socket.

systemd passes the sockets of a .socket unit as file descriptors 3, 4, ...
and sets LISTEN_FDS (how many), LISTEN_PID (the process they are for) and
LISTEN_FDNAMES (their FileDescriptorName=, colon-separated). Sockets meant
for another pid are ignored, as sd_listen_fds does. The variables are
removed from the environment, so that no child process (such as a new
master after an upgrade) takes the sockets for its own. A new master
gets them from the old one instead.

Nexus serves TCP only, so every passed socket must be a listening TCP
stream socket (a nexus.socket with ListenStream=host:port and Accept=no).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass

from nexus.listeners import Listener

__all__ = ["LISTEN_FDS_START", "ActivatedSocket", "SocketActivationError", "activated_sockets"]

log = logging.getLogger("nexus.master")

# The first passed file descriptor (SD_LISTEN_FDS_START in sd-daemon.h).
LISTEN_FDS_START = 3

_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


class SocketActivationError(Exception):
    """The passed sockets cannot be used; the message names the descriptor and the fix."""


@dataclass(frozen=True, slots=True)
class ActivatedSocket:
    """One socket passed by systemd, ready to serve as a listener."""

    fd: int
    name: str
    listener: Listener

    @property
    def address(self) -> str:
        return self.listener.address


def activated_sockets(env: MutableMapping[str, str] = os.environ, *, unset: bool = True) -> list[ActivatedSocket]:
    """Return the sockets systemd passed to this process, or [] when none were passed.

    Raise SocketActivationError when the variables are invalid or a socket
    is not a listening TCP socket. With `unset`, remove the variables from
    `env` (the process environment by default) whatever the outcome.
    """
    try:
        count = _passed_count(env)
        names = _names(env, count)
    finally:
        if unset:
            for name in _VARIABLES:
                env.pop(name, None)
    return [_adopt(LISTEN_FDS_START + i, names[i]) for i in range(count)]


def _passed_count(env: MutableMapping[str, str]) -> int:
    """Return LISTEN_FDS, or 0 when it is absent or meant for another process."""
    count_text = env.get("LISTEN_FDS")
    if not count_text:
        return 0
    pid_text = env.get("LISTEN_PID", "")
    if pid_text != str(os.getpid()):
        # Inherited from a parent that was activated: not ours.
        log.info("ignoring LISTEN_FDS=%s for pid %s (this is pid %d)", count_text, pid_text or "-", os.getpid())
        return 0
    try:
        count = int(count_text)
    except ValueError:
        raise SocketActivationError(
            f"invalid LISTEN_FDS={count_text!r}: expected the number of passed sockets"
        ) from None
    if count < 0:
        raise SocketActivationError(f"invalid LISTEN_FDS={count}: expected a number of sockets, 0 or more")
    return count


def _names(env: MutableMapping[str, str], count: int) -> list[str]:
    """Return the FileDescriptorName= of each socket; "unknown" for all when the count does not match."""
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    if len(names) != count:
        return ["unknown"] * count
    return names


def _adopt(fd: int, name: str) -> ActivatedSocket:
    """Wrap a passed descriptor as a non-blocking listener after checking its type."""
    try:
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise SocketActivationError(
            f"passed file descriptor {fd} ({name}) is not a usable socket: {exc.strerror or exc}"
        ) from exc

    where = f"passed socket fd {fd} ({name})"
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise SocketActivationError(
            f"{where} is not a TCP socket: Nexus serves TCP only, use ListenStream=HOST:PORT in nexus.socket"
        )
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise SocketActivationError(
            f"{where} is not a listening stream socket: use ListenStream= with Accept=no in nexus.socket"
        )

    # Set what the master sets on the sockets it binds itself (nexus.listeners).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    # A passed socket was asked for by the .socket unit, so its bound
    # address is what was requested.
    listener = Listener(Listener("", sock).address, sock)
    log.info("using passed socket fd=%d name=%s address=%s", fd, name, listener.address)
    return ActivatedSocket(fd, name, listener)
