"""The queue between the admin API's threads and the master loop.

A thread that wants the master to act (status, reload, upgrade, drain,
resume) calls `RequestQueue.submit`, which queues the request, wakes the
master loop through its pipe, and waits for the outcome. The loop takes
the requests with `take`, runs those it may run now and puts the rest back
in order with `put_back`. Signals that ask for an action (SIGHUP, SIGUSR2)
queue a request that nobody waits for.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from nexus.services import AdminError

__all__ = ["GENERATION_ACTIONS", "QUICK_ACTIONS", "Request", "RequestQueue"]

# Requests answered at once, even while a reload or an upgrade is under way.
QUICK_ACTIONS = frozenset({"status"})
# Requests that must wait until no older generation or master is draining,
# because the generation they start needs the bank of worker slots the
# draining one still uses.
GENERATION_ACTIONS = frozenset({"reload", "upgrade", "resume"})


@dataclass(eq=False)
class Request:
    """One queued request and its outcome: a result, or an AdminError."""

    action: str
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: AdminError | None = None

    def finish(self, result: Any = None, error: AdminError | None = None) -> None:
        self.result = result
        self.error = error
        self.done.set()


class RequestQueue:
    """Requests for the master loop, from any thread; the loop is woken through `wake_fd`."""

    def __init__(self) -> None:
        self.wake_fd = -1
        self._lock = threading.Lock()
        self._queue: deque[Request] = deque()

    def submit(self, action: str, timeout: float) -> Any:
        """Queue `action`, wait up to `timeout` seconds for the loop to run it, and return its result."""
        request = self.add(action)
        self._wake()
        if not request.done.wait(timeout):
            raise AdminError(504, f"the master did not finish {action} within {timeout:g} s: see its log for what it waits for")
        if request.error is not None:
            raise request.error
        return request.result

    def add(self, action: str) -> Request:
        """Queue `action` without waking the loop (the loop itself, or a signal that wakes it anyway)."""
        request = Request(action)
        with self._lock:
            self._queue.append(request)
        return request

    def take(self) -> deque[Request]:
        """Remove and return every queued request, oldest first."""
        with self._lock:
            taken, self._queue = self._queue, deque()
        return taken

    def put_back(self, requests: deque[Request]) -> None:
        """Queue `requests` again ahead of any that came meanwhile, keeping their order."""
        with self._lock:
            self._queue.extendleft(reversed(requests))

    def _wake(self) -> None:
        try:
            os.write(self.wake_fd, b"\0")
        except OSError:
            pass  # A full pipe wakes the loop as well.
