"""Small pieces of process supervision that the master and its upgrade steps share.

The master's states, the error that stops a master during its start, and
helpers for signalling, describing and checking processes. Nothing here
keeps state.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import socket
import time

from nexus.config import Config
from nexus.listeners import Listener

__all__ = [
    "MasterState",
    "StartError",
    "age_seconds",
    "describe_wait_status",
    "flush_logs",
    "is_alive",
    "node_id",
    "send_signal",
]


class MasterState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RELOADING = "reloading"
    UPGRADING = "upgrading"
    DRAINED = "drained"
    STOPPING = "stopping"


class StartError(Exception):
    """The master cannot start; the message is logged and `status` is the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def node_id(config: Config, listeners: list[Listener]) -> str:
    """Return the configured node id, else hostname:port of the first listener (hostname alone without one)."""
    if config.redis is not None and config.redis.node_id:
        return config.redis.node_id
    if not listeners:
        return socket.gethostname()
    return f"{socket.gethostname()}:{listeners[0].address.rsplit(':', 1)[1]}"


def describe_wait_status(status: int) -> str:
    """Describe a wait status from os.waitpid, such as "exit 3" or "killed by SIGKILL"."""
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.WEXITSTATUS(status)}"


def send_signal(pid: int, signum: int) -> None:
    """Send `signum` to `pid`, ignoring a process that is already gone."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def is_alive(pid: int) -> bool:
    """Return whether `pid` runs and is not a zombie waiting for its parent."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            # The state follows the command name, which is in parentheses.
            return file.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def age_seconds(monotonic_ns: int) -> float:
    """Seconds since a time.monotonic_ns() reading."""
    return (time.monotonic_ns() - monotonic_ns) / 1e9


def flush_logs() -> None:
    """Flush log handlers so a forked child does not write the parent's buffer again."""
    for handler in logging.getLogger().handlers:
        handler.flush()
