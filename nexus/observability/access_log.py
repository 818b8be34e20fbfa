"""Access records: packed by workers into their event ring, written as JSON lines by the master.

A worker never writes the access log itself, so no request waits on disk
I/O. After each request it pushes one access record (8 words) into its
ring (`nexus.shm.ring`), and, for a request id the client sent, one text
record per 56 bytes of id. An id the gateway made is the trace id
(`nexus.headers`), which the access record contains already, so the usual
request costs one record. A full ring drops the records and counts the drop, so
the worker never waits either. The master drains the rings every
`DRAIN_INTERVAL` (`nexus.observability.service`). One pass in C over each
drain (`drain_batch`) counts every record for the usage tables and formats
the sampled ones as log lines.

Strings that the config bounds (route, consumer, target URL, method) go
into the record as small ids, numbered in config order by `Names`; the
worker and the master build the same `Names` from the same config.

Access record, kind 1:
    0  bits 0-7 kind, 8-15 text records that follow, 16-31 status,
       32-47 route id (0: no route), 48-51 cache result id, 52-55 rate-limit
       result id, 56-63 method id
    1  time.time_ns() when the request arrived
    2  consumer id (bits 0-31, 0: anonymous) | target id (bits 32-63, 0: none)
    3  response body bytes sent
    4  total duration in microseconds (bits 0-31) | upstream duration in
       microseconds + 1 (bits 32-63, 0: no upstream response)
    5  trace id, high 64 bits
    6  trace id, low 64 bits
    7  flags: bit 0 set when the request id is the trace id in hex
Text record, kind 2:
    0  bits 0-7 kind, 8-23 byte length of this part
    1-7  up to 56 bytes of the request id, little-endian in each word

Cache invalidation record, kind 3 (`nexus.cache.invalidation`):
    0  bits 0-7 kind, 8-15 text records that follow (the URL)
    1-7  zero

Records of other kinds belong to other producers; the drain hands them,
with the text that followed them, to the handler registered for their kind.
"""

from __future__ import annotations

import logging
import random
import struct
import sys
import threading
from collections.abc import Iterable, Sequence
from functools import cached_property
from typing import IO, Any, NamedTuple

import msgspec

from nexus import telemetry
from nexus.config import Config
from nexus.observability import _lines
from nexus.shm.ring import RECORD_WORDS, Ring

__all__ = [
    "ACCESS_KIND",
    "CACHE_RESULTS",
    "INVALIDATE_KIND",
    "TEXT_KIND",
    "AccessLogWriter",
    "AccessRecord",
    "AccessRecorder",
    "Batch",
    "Names",
    "decode",
    "drain_batch",
    "push_with_text",
]

log = logging.getLogger("nexus.access_log")

ACCESS_KIND = 1
TEXT_KIND = 2
INVALIDATE_KIND = 3
_TEXT_BYTES = 56
_TEXT_WORDS = struct.Struct("<7Q")
# Word 7 of an access record.
_ID_IS_TRACE = 1

# Result names of the response cache and of the rate limits; id 0 is "none".
CACHE_RESULTS = ("", *telemetry.CACHE_RESULTS)
LIMIT_RESULTS = ("", "allowed", "denied", "dry_run_denied", "failed_open")
METHODS = ("OTHER", "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT")


class Names:
    """The ids of routes, consumers and targets of one config, both ways."""

    def __init__(self, config: Config) -> None:
        self.routes = ["", *(route.name for route in config.routes)]
        self.consumers = ["", *config.consumers]
        urls: list[str] = [""]
        for upstream in config.upstreams.values():
            for target in upstream.target_list():
                url = target.url.rstrip("/")
                if url not in urls:
                    urls.append(url)
        self.targets = urls
        self.route_ids = {name: index for index, name in enumerate(self.routes) if name}
        self.consumer_ids = {name: index for index, name in enumerate(self.consumers) if name}
        self.target_ids = {url: index for index, url in enumerate(urls) if url}

    @cached_property
    def tables(self) -> tuple[tuple[bytes, ...], ...]:
        """The JSON name tables the master's drain formats lines with (workers never build them)."""
        return _tables(self)


# Four bits each in the access record.
assert len(CACHE_RESULTS) <= 16 and len(LIMIT_RESULTS) <= 16
_CACHE_IDS: dict[str | None, int] = {name: index for index, name in enumerate(CACHE_RESULTS) if name}
_LIMIT_IDS: dict[str | None, int] = {name: index for index, name in enumerate(LIMIT_RESULTS) if name}
_METHOD_IDS = {name: index for index, name in enumerate(METHODS)}


class AccessRecorder:
    """A worker's producer: packs one finished request into its ring. Never blocks."""

    def __init__(self, ring: Ring, names: Names) -> None:
        self._push = ring.pusher()
        self._push_access = ring.access_pusher()
        # Bound once: record() runs on every request. None and unknown names get id 0.
        self._route_ids = names.route_ids
        self._consumer_ids = {None: 0, **names.consumer_ids}
        self._target_ids = {None: 0, **names.target_ids}

    def record(
        self,
        started_ns: int,
        duration_ns: int,
        method: str,
        status: int,
        route: str,
        consumer: str | None,
        target: str | None,
        bytes_sent: int,
        upstream_ns: int | None,
        cache: str | None,
        rate_limit: str | None,
        request_id: str | None,
        trace_id: int,
        request_id_is_trace: bool = False,
    ) -> bool:
        """Push the records of one request; return False if the ring was full and they were dropped.

        With `request_id_is_trace` the id is not sent: the master writes the
        trace id in its place.
        """
        head = (
            ACCESS_KIND
            | (status & 0xFFFF) << 16
            | self._route_ids.get(route, 0) << 32
            | _CACHE_IDS.get(cache, 0) << 48
            | _LIMIT_IDS.get(rate_limit, 0) << 52
            | _METHOD_IDS.get(method, 0) << 56
        )
        parties = self._consumer_ids.get(consumer, 0) | self._target_ids.get(target, 0) << 32
        if request_id_is_trace or not request_id:
            # The usual request: its id is the trace id, so no text follows the record.
            flags = _ID_IS_TRACE if request_id_is_trace and trace_id else 0
            return self._push_access(head, started_ns, parties, bytes_sent, duration_ns, upstream_ns, trace_id, flags)
        text = request_id.encode("ascii", "replace")
        head |= text_parts(text) << 8
        if not self._push_access(head, started_ns, parties, bytes_sent, duration_ns, upstream_ns, trace_id, 0):
            return False
        return push_text(self._push, text)


def push_with_text(push, head: int, words: tuple[int, ...], text: bytes) -> bool:
    """Push a record (its head word, then up to seven words) and `text` after it in text records.

    The number of text records goes into bits 8-15 of the head. Returns
    False if the ring was full: a record whose text was cut is read with
    the part that arrived.
    """
    if not push(head | text_parts(text) << 8, *words):
        return False
    return push_text(push, text)


def text_parts(text: bytes) -> int:
    """Return how many text records `text` takes; at most 255 fit behind one record."""
    parts = (len(text) + _TEXT_BYTES - 1) // _TEXT_BYTES
    if parts > 0xFF:
        raise ValueError(f"text of {len(text)} bytes does not fit in one ring record's {0xFF * _TEXT_BYTES} bytes")
    return parts


def push_text(push, text: bytes) -> bool:
    """Push `text` in text records, after the record whose head counted them; False if the ring filled up."""
    for start in range(0, len(text), _TEXT_BYTES):
        chunk = text[start : start + _TEXT_BYTES]
        if not push(TEXT_KIND | len(chunk) << 8, *_TEXT_WORDS.unpack(chunk.ljust(_TEXT_BYTES, b"\0"))):
            return False
    return True


# One request decoded into the access log line's fields, in the order they
# are written, with None for "none":
#   time (RFC 3339 UTC, microseconds), request_id, trace_id (32 hex digits),
#   worker, method, route, consumer, target, status, bytes, duration_s,
#   upstream_s, cache, rate_limit.
AccessRecord = dict[str, Any]

_ENCODER = msgspec.json.Encoder()
_RECORD = struct.Struct(f"={RECORD_WORDS}Q")


class Batch(NamedTuple):
    """One drain of one worker's ring, as `drain_batch` returns it."""

    # Access records read.
    records: int
    # JSON lines of the sampled access records, and how many.
    lines: bytes
    written: int
    # Access records by (consumer id, route id, status, latency bucket),
    # and response bytes by (consumer id, route id), for the usage table.
    counts: dict[tuple[int, int, int, int], int]
    sent: dict[tuple[int, int], int]
    # Records of other kinds with the text that followed them: (row, text).
    others: list[tuple[tuple[int, ...], bytes]]


def drain_batch(
    raw: bytes, worker: int, names: Names, bounds_us: tuple[int, ...], sample: float = 1.0, always_log_errors: bool = True
) -> Batch:
    """Read a worker's drained ring records (`Ring.drain_raw`) in one pass.

    The pass runs in C (nexus/observability/native/lines.c): in Python,
    splitting, counting and formatting cost the master about 3 us a record.
    A record whose text records were dropped keeps what arrived of its
    text; text records whose head was dropped are skipped. Lines are
    written for every access record when `sample` is 1, else for server
    errors (with `always_log_errors`) and a random share `sample`. An id
    past the config's names (a record of a newer config than `names`) is
    written as the string "#id".
    """
    result = _lines.drain_records(
        raw, worker, names.tables, bounds_us, float(sample), always_log_errors, random.getrandbits(64)
    )
    return Batch(*result)


def decode(rows: Iterable[tuple[int, ...]], worker: int, names: Names, others=None) -> list[AccessRecord]:
    """Decode drained ring rows of one worker into access records, as the access log writes them.

    Records of other kinds go to `others[kind](worker, row, text)` when a
    handler is registered, and are skipped otherwise.
    """
    batch = drain_batch(b"".join(_RECORD.pack(*row) for row in rows), worker, names, (), 1.0)
    for row, text in batch.others:
        handler = (others or {}).get(row[0] & 0xFF)
        if handler is not None:
            handler(worker, row, text)
    return [msgspec.json.decode(line) for line in batch.lines.splitlines()]


def _json_names(names: Sequence[str], size: int = 0) -> tuple[bytes, ...]:
    """Return the JSON of each name (b"null" for ""), then "#index" strings up to `size` entries."""
    encoded = [_ENCODER.encode(name) if name else b"null" for name in names]
    encoded.extend(_ENCODER.encode(f"#{index}") for index in range(len(names), size))
    return tuple(encoded)


def _tables(names: Names) -> tuple[tuple[bytes, ...], ...]:
    """Return the six name tables that `drain_batch` indexes, in its order.

    The result and method tables cover every id their bits can hold. Route,
    consumer and target tables stop at the config's names; the C code writes
    "#id" past them.
    """
    return (
        _json_names(METHODS, 1 << 8),
        _json_names(CACHE_RESULTS, 1 << 4),
        _json_names(LIMIT_RESULTS, 1 << 4),
        _json_names(names.routes),
        _json_names(names.consumers),
        _json_names(names.targets),
    )


class AccessLogWriter:
    """The master's access log: a file or stderr that JSON lines are appended to.

    `sample` and `always_log_errors` are the settings `drain_batch` samples
    lines with. `reopen()` closes and reopens the file, for logrotate.
    """

    def __init__(self, path: str, sample: float, always_log_errors: bool) -> None:
        self.path = path
        self.sample = sample
        self.always_log_errors = always_log_errors
        self.lines = 0
        self.write_errors = 0
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None
        self._open()

    def _open(self) -> None:
        if self.path == "-":
            self._file = sys.stderr.buffer
            return
        # Not line-buffered: the drain writes and flushes once per batch.
        self._file = open(self.path, "ab")  # noqa: SIM115 - kept open until close()

    def write(self, lines: bytes, count: int) -> int:
        """Write `count` access log lines (`Batch.lines`); return how many were written."""
        if not count:
            return 0
        with self._lock:
            if self._file is None:
                # The file could not be opened again after a failed write;
                # `nexusctl access-log reopen` tries once more.
                self.write_errors += 1
                return 0
            try:
                self._file.write(lines)
                self._file.flush()
            except OSError as exc:
                self.write_errors += 1
                if self.write_errors % 100 == 1:
                    log.error("cannot write the access log path=%s: %s (failed batches: %d)", self.path, exc, self.write_errors)
                self._drop_buffer()
                return 0
        self.lines += count
        return count

    def _drop_buffer(self) -> None:
        """After a failed write, open the file afresh: what stayed in the buffer is lost, and it does not grow."""
        if self._file is None or self._file is sys.stderr.buffer:
            return
        _close_quietly(self._file, self.path)
        try:
            self._open()
        except OSError:
            self._file = None

    def reopen(self) -> None:
        """Close and reopen the log file, so that a file renamed by logrotate is let go.

        Raises OSError if the file cannot be opened; the old one is kept then.
        """
        if self.path == "-":
            return
        with self._lock:
            old = self._file
            try:
                self._open()
            except OSError as exc:
                self._file = old
                log.error("cannot reopen the access log path=%s: %s; still writing to the old file", self.path, exc)
                raise
            if old is not None:
                _close_quietly(old, self.path)
        log.info("access log reopened path=%s", self.path)

    def close(self) -> None:
        with self._lock:
            if self._file is not None and self._file is not sys.stderr.buffer:
                _close_quietly(self._file, self.path)
            self._file = None


def _close_quietly(file: IO[bytes], path: str) -> None:
    """Close `file`; a failure to flush its last lines (a full disk) is logged, not raised."""
    try:
        file.close()
    except OSError as exc:
        log.error("closing the access log lost its last buffered lines path=%s: %s", path, exc)
