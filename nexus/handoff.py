"""The upgrade handoff: what an old master passes to the new master it starts.

`nexusctl upgrade` (or SIGUSR2) makes the running master start a new master
process from the installed code, with the same command line and the
environment variable NEXUS_UPGRADE_FD naming file descriptor 3, one end of
a Unix stream socket pair. Over it the two masters talk in messages, each an
8-byte little-endian length and a JSON object:

    old -> new  state      the listening sockets and shared-memory segments
                           (as SCM_RIGHTS file descriptors, in the order the
                           message lists them), the generation, counters and
                           what the config-shaped tables were made for
    new -> old  ready      every worker of the new master serves
    old -> new  commit     the old master stopped its Redis sync and drains
                           its workers now; the new master takes over

The old master rolls back (kills the new master and its workers, keeps
serving) when the new master exits, closes the socket or does not report
ready within `reload_timeout`. This module contains the message format and the
transfer of descriptors. The master (`nexus.master`) makes the decisions.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

from nexus.shm.metrics import MetricLayout

__all__ = ["Handoff", "HandoffError", "UPGRADE_FD_ENV", "layout_from_json", "layout_to_json", "receive", "send"]

UPGRADE_FD_ENV = "NEXUS_UPGRADE_FD"
# The descriptor number the new master finds the socket at.
UPGRADE_FD = 3
# Upper bound of one message, in bytes: layouts of large configs fit.
_MAX_MESSAGE = 64 * 2**20
# Upper bound of descriptors in the state message (listeners and segments).
_MAX_FDS = 512


class HandoffError(Exception):
    """The other master broke the protocol, closed the socket, or sent nothing in time."""


@dataclass
class Handoff:
    """The state message as the new master receives it: a JSON header and the descriptors by name."""

    header: dict[str, Any]
    listener_fds: dict[str, int]
    table_fds: dict[str, int]
    metric_fds: list[int]


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] = ()) -> None:
    """Send one message, with `fds` attached to its first byte."""
    body = json.dumps(message).encode()
    data = struct.pack("<Q", len(body)) + body
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        data = data[sent:]
    sock.sendall(data)


def receive(sock: socket.socket, timeout: float | None) -> tuple[dict[str, Any], list[int]]:
    """Receive one message and the descriptors sent with it."""
    sock.settimeout(timeout)
    try:
        data, fds, _, _ = socket.recv_fds(sock, 65536, _MAX_FDS)
        if not data:
            raise HandoffError("the other master closed the upgrade socket")
        while len(data) < 8:
            data += _recv_more(sock)
        (length,) = struct.unpack_from("<Q", data)
        if length > _MAX_MESSAGE:
            raise HandoffError(f"upgrade message of {length} bytes is over the {_MAX_MESSAGE}-byte limit")
        while len(data) < 8 + length:
            data += _recv_more(sock)
    except TimeoutError:
        raise HandoffError(f"no message from the other master within {timeout:g} s") from None
    return json.loads(data[8 : 8 + length]), fds


def _recv_more(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise HandoffError("the other master closed the upgrade socket in the middle of a message")
    return chunk


def send_state(
    sock: socket.socket,
    header: dict[str, Any],
    listeners: dict[str, int],
    tables: dict[str, int],
    metric_tables: list[tuple[MetricLayout, int]],
) -> None:
    """Send the state message: `header` plus the descriptors of listeners, tables and metric tables."""
    message = dict(header)
    message["listeners"] = list(listeners)
    message["tables"] = list(tables)
    message["metric_layouts"] = [layout_to_json(layout) for layout, _ in metric_tables]
    send(sock, {"type": "state", **message}, [*listeners.values(), *tables.values(), *(fd for _, fd in metric_tables)])


def receive_state(sock: socket.socket, timeout: float) -> Handoff:
    """Receive the state message and sort its descriptors by what they are."""
    message, fds = receive(sock, timeout)
    if message.get("type") != "state":
        raise HandoffError(f"expected the state message from the old master, got {message.get('type')!r}")
    names = message["listeners"] + message["tables"]
    expected = len(names) + len(message["metric_layouts"])
    if len(fds) != expected:
        for fd in fds:
            os.close(fd)
        raise HandoffError(f"the old master sent {len(fds)} file descriptors, its message lists {expected}")
    listener_fds = dict(zip(message["listeners"], fds, strict=False))
    table_fds = dict(zip(message["tables"], fds[len(message["listeners"]) :], strict=False))
    return Handoff(message, listener_fds, table_fds, fds[len(names) :])


def layout_to_json(layout: MetricLayout) -> dict[str, Any]:
    """Describe a metric layout as JSON: keys with their word index, histogram bounds."""
    return {
        "counters": [[list(key), index] for key, index in layout.counters.items()],
        "histograms": [[list(key), histogram.index, list(histogram.bounds)] for key, histogram in layout.histograms.items()],
        "words": layout.words,
    }


def layout_from_json(data: dict[str, Any]) -> MetricLayout:
    """Rebuild a layout that `layout_to_json` described, with the same word indexes."""
    entries = [(index, tuple(key), None) for key, index in data["counters"]]
    entries += [(index, tuple(key), tuple(bounds)) for key, index, bounds in data["histograms"]]
    layout = MetricLayout()
    # Adding the entries in index order gives each the index it had.
    for index, key, bounds in sorted(entries, key=lambda entry: entry[0]):
        placed = layout.counter(key) if bounds is None else layout.histogram(key, bounds)
        if placed != index:
            raise HandoffError(f"metric layout from the old master has a gap before word {index}")
    return layout
