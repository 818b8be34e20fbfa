"""File descriptors of the master that forked workers must not keep.

A worker forked while the master serves the admin socket or the metrics
listener would otherwise hold a copy of it for its whole life. Then a
listener the master closes stays bound (an upgraded master cannot bind the
metrics port while the old workers drain), and a dead master's admin
socket still looks alive. Every such descriptor is registered here and
closed in the child right after each fork.
"""

from __future__ import annotations

import os

__all__ = ["close_in_children", "keep_in_children"]

_FDS: set[int] = set()


def close_in_children(fd: int) -> None:
    """Have every process forked from now on close `fd` at once."""
    _FDS.add(fd)


def keep_in_children(fd: int) -> None:
    """Stop closing `fd` in children: call it before closing `fd`, whose number may be reused."""
    _FDS.discard(fd)


def _close_after_fork() -> None:
    for fd in list(_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _FDS.clear()


os.register_at_fork(after_in_child=_close_after_fork)
