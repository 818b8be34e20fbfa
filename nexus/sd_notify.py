"""The systemd notify protocol (sd_notify(3)): tell the service manager what the master is doing.

systemd passes a datagram socket in $NOTIFY_SOCKET, a path or an abstract
name written with a leading "@". Each message is one datagram of
newline-separated `KEY=value` lines. Without NOTIFY_SOCKET every call does
nothing, so the master calls these the same way inside and outside systemd.

The master sends READY=1 once its workers serve, RELOADING=1 with
MONOTONIC_USEC when a reload starts (systemd 253 and later wait for the
next READY=1), STOPPING=1 on shutdown, STATUS= lines for `systemctl
status`, MAINPID= from a new master after an upgrade (the unit needs
NotifyAccess=all for that), and WATCHDOG=1 at half the WatchdogSec interval.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier", "Watchdog"]

log = logging.getLogger("nexus.master")

# Seconds after which a blocked send is dropped, so that the master loop
# waits at most this long on a busy service manager.
SEND_TIMEOUT = 1.0


class Notifier:
    """Sends notify messages to the socket named at construction, or does nothing without one."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self._failed_once = False

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> Notifier:
        """Build a Notifier for $NOTIFY_SOCKET; without it, one that does nothing.

        NOTIFY_SOCKET stays in the environment so that a new master started
        by an upgrade can notify too.
        """
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send one message with `fields` as KEY=value lines; return whether it was sent."""
        if self.address is None:
            return False
        # A newline would start a new KEY=value line, so values must not contain one.
        message = "\n".join(f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items())
        try:
            self._socket().sendto(message.encode(), _socket_address(self.address))
        except OSError as exc:
            self._log_failure(exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Report that the service is up (after start, and at the end of a reload)."""
        return self.send(READY=1, **_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """Report that a reload started; systemd waits for the next READY=1."""
        return self.send(
            RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000, **_status(status)
        )

    def stopping(self, status: str | None = None) -> bool:
        """Report that the service is shutting down."""
        return self.send(STOPPING=1, **_status(status))

    def status(self, text: str) -> bool:
        """Set the one-line status that `systemctl status` shows."""
        return self.send(STATUS=text)

    def main_pid(self, pid: int, status: str | None = None) -> bool:
        """Tell systemd that `pid` is now the service's main process (a new master after an upgrade)."""
        return self.send(MAINPID=pid, **_status(status))

    def watchdog(self) -> bool:
        """Tell systemd's watchdog that the master loop is alive."""
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.settimeout(SEND_TIMEOUT)
        return self._sock

    def _log_failure(self, exc: OSError) -> None:
        # Logged once at warning, then at debug: a missing service manager
        # must not fill the log at every loop pass.
        level = logging.DEBUG if self._failed_once else logging.WARNING
        self._failed_once = True
        log.log(level, "sd_notify failed address=%s: %s", self.address, exc.strerror or exc)


def _status(status: str | None) -> dict[str, str]:
    return {"STATUS": status} if status else {}


def _socket_address(address: str) -> str | bytes:
    """Return the address for sendto: a path, or an abstract name as bytes starting with NUL."""
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    return address


class Watchdog:
    """Pings systemd's watchdog from the master loop at half the configured interval.

    systemd sets WATCHDOG_USEC (the WatchdogSec= interval) and WATCHDOG_PID
    (the process it watches). A process whose pid differs from WATCHDOG_PID
    must not ping (sd_watchdog_enabled(3)). A new master after an upgrade
    must therefore be started without WATCHDOG_PID, and it pings once it
    is the main process.
    """

    def __init__(self, notifier: Notifier, interval: float | None) -> None:
        self.notifier = notifier
        self.interval = interval
        self._next_at = 0.0

    @classmethod
    def from_environment(
        cls, notifier: Notifier, env: Mapping[str, str] = os.environ, pid: int | None = None
    ) -> Watchdog:
        """Read WATCHDOG_USEC and WATCHDOG_PID; the interval is None when no watchdog applies to `pid`."""
        return cls(notifier, watchdog_interval(env, os.getpid() if pid is None else pid))

    @property
    def enabled(self) -> bool:
        return self.interval is not None and self.notifier.enabled

    def ping_if_due(self, now: float | None = None) -> bool:
        """Send WATCHDOG=1 if half the interval passed since the last ping; cheap enough for every loop pass."""
        if not self.enabled:
            return False
        now = time.monotonic() if now is None else now
        if now < self._next_at:
            return False
        assert self.interval is not None
        self._next_at = now + self.interval
        return self.notifier.watchdog()


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Return half of WATCHDOG_USEC in seconds, or None when there is no watchdog for `pid`."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    watched = env.get("WATCHDOG_PID")
    if watched and watched != str(pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring invalid WATCHDOG_USEC=%r: expected microseconds as an integer", usec)
        return None
    if value <= 0:
        return None
    return value / 2 / 1e6
