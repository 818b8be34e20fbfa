"""An HTTP/1.1 upstream of known capacity, for load tests of the gateway in front of it.

    python loadtest/capacity_upstream.py --port 0 --concurrency 10 --service-ms 100

The server serves at most `--concurrency` requests at once and spends
`--service-ms` milliseconds on each, so its capacity is concurrency /
service time requests per second (10 / 0.1 s = 100 requests/s above). It is
a model of a server with a fixed pool of workers, such as a thread pool or
a pool of database connections.

Beyond that a request waits in a first-in, first-out queue inside the
server, as on a saturated server whose latency grows with its backlog.
With `--queue-limit N`, a request that finds N requests already waiting
gets a 503 response with `Retry-After: 1` instead, without taking any
service time.

Paths:

    /healthz (--health-path)   200 at once, outside the capacity limit
    /_stats (--stats-path)     200 at once with the counters as JSON (see Stats.snapshot)
    anything else              a request of the capacity limit: 200 with a small JSON body;
                               GETs under /catalog carry `Cache-Control: public, max-age=30`,
                               other responses `Cache-Control: no-store`

The first line on standard output is

    capacity upstream listening on HOST:PORT capacity=100.0/s concurrency=10 service_ms=100 queue_limit=none

and load scripts read the port from it. Only loopback addresses may be
bound, because the server exists to take load from local tests. SIGTERM or
SIGINT stops it, and with `--exit-with-parent` it also stops within a
second of its parent process ending, so a killed load script leaves
nothing behind.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from collections import deque

log = logging.getLogger("capacity_upstream")

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
# Seconds a connection may stay idle between requests before the server closes it.
IDLE_TIMEOUT = 60.0
# Paths whose GET responses shared caches may store (the gateway strips /api).
CACHEABLE_PREFIX = "/catalog"
# Per-second completion counts kept in the stats, oldest dropped first.
MAX_SECONDS_KEPT = 3600

_REASONS = {200: "OK", 400: "Bad Request", 413: "Content Too Large", 503: "Service Unavailable"}


class BadRequest(Exception):
    """A request the server cannot parse; the server responds 400 and closes the connection."""


class Stats:
    """Counters of the capacity-limited requests."""

    def __init__(self) -> None:
        self.received = 0
        self.completed = 0
        self.abandoned = 0
        self.rejected = 0
        self.in_service = 0
        self.queued = 0
        self.max_in_service = 0
        self.max_queued = 0
        # Unix second -> requests completed in that second.
        self.completed_per_second: dict[int, int] = {}

    def count_completed(self) -> None:
        self.completed += 1
        second = int(time.time())
        per_second = self.completed_per_second
        per_second[second] = per_second.get(second, 0) + 1
        if len(per_second) > MAX_SECONDS_KEPT:
            del per_second[min(per_second)]

    def snapshot(self, capacity: Capacity) -> dict:
        """Return the counters as a JSON-ready dict.

        `completed` counts responses written to a connection that was still
        open. `abandoned` counts requests whose client had closed the
        connection by the time their service ended, after their service
        time was spent all the same. `rejected` counts 503s from a full queue.
        """
        return {
            "concurrency": capacity.concurrency,
            "service_ms": capacity.service_seconds * 1000,
            "capacity_per_second": capacity.capacity_per_second,
            "queue_limit": capacity.queue_limit,
            "received": self.received,
            "completed": self.completed,
            "abandoned": self.abandoned,
            "rejected": self.rejected,
            "in_service": self.in_service,
            "queued": self.queued,
            "max_in_service": self.max_in_service,
            "max_queued": self.max_queued,
            "completed_per_second": {str(second): count for second, count in self.completed_per_second.items()},
        }


class Capacity:
    """At most `concurrency` requests in service at once, the others waiting first in, first out."""

    def __init__(self, concurrency: int, service_seconds: float, queue_limit: int | None) -> None:
        self.concurrency = concurrency
        self.service_seconds = service_seconds
        self.queue_limit = queue_limit
        self.stats = Stats()
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def capacity_per_second(self) -> float:
        return self.concurrency / self.service_seconds

    def queue_full(self) -> bool:
        return self.queue_limit is not None and self.stats.queued >= self.queue_limit

    async def serve(self) -> None:
        """Wait for a slot, hold it for the service time, then give it to the next waiter."""
        stats = self.stats
        if stats.in_service < self.concurrency and not self._waiters:
            stats.in_service += 1
        else:
            await self._wait_for_slot()
        stats.max_in_service = max(stats.max_in_service, stats.in_service)
        try:
            await asyncio.sleep(self.service_seconds)
        finally:
            self._release()

    async def _wait_for_slot(self) -> None:
        stats = self.stats
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        stats.queued += 1
        stats.max_queued = max(stats.max_queued, stats.queued)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over in the same loop iteration: pass it on.
                self._release()
            else:
                self._waiters.remove(waiter)
                stats.queued -= 1
            raise

    def _release(self) -> None:
        """Hand the slot to the oldest waiter, or free it."""
        if self._waiters:
            waiter = self._waiters.popleft()
            self.stats.queued -= 1
            # in_service stays the same: the slot changes hands.
            waiter.set_result(None)
        else:
            self.stats.in_service -= 1


class Request:
    __slots__ = ("body", "headers", "method", "target", "version")

    def __init__(self, method: str, target: str, version: str, headers: dict[str, str], body: bytes) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.body = body

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return connection == "keep-alive"
        return connection != "close"


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """Read one request; return None when the client closed the connection between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if not error.partial.strip():
            return None
        raise BadRequest("the connection closed in the middle of the request head") from None
    except asyncio.LimitOverrunError:
        raise BadRequest(f"the request head is longer than {MAX_HEAD_BYTES} bytes") from None

    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"invalid request line {lines[0][:100]!r}")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, separator, value = line.partition(":")
        if not separator:
            raise BadRequest(f"invalid header line {line[:100]!r}")
        headers[name.strip().lower()] = value.strip()

    body = await _read_body(reader, headers)
    return Request(method, target, version, headers, body)


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader)
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit():
        raise BadRequest(f"invalid Content-Length {length_text[:40]!r}")
    length = int(length_text)
    if length > MAX_BODY_BYTES:
        raise BadRequest(f"the body of {length} bytes is larger than {MAX_BODY_BYTES}")
    return await reader.readexactly(length)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    total = 0
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BadRequest(f"invalid chunk size line {size_line[:40]!r}") from None
        if size == 0:
            # Skip the trailer section up to the empty line.
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return b"".join(chunks)
        total += size
        if total > MAX_BODY_BYTES:
            raise BadRequest(f"the chunked body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)


def encode_response(
    status: int, body: bytes, keep_alive: bool, extra_headers: tuple[tuple[str, str], ...] = ()
) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
        "content-type: application/json",
        f"content-length: {len(body)}",
    ]
    lines.extend(f"{name}: {value}" for name, value in extra_headers)
    if not keep_alive:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Server:
    """Connection handling and routing to the health, stats and capacity-limited paths."""

    def __init__(self, capacity: Capacity, health_path: str, stats_path: str) -> None:
        self.capacity = capacity
        self.health_path = health_path
        self.stats_path = stats_path

    async def handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    request = await asyncio.wait_for(read_request(reader), IDLE_TIMEOUT)
                except BadRequest as error:
                    body = json.dumps({"error": str(error)}).encode()
                    writer.write(encode_response(400, body, keep_alive=False))
                    await writer.drain()
                    return
                if request is None:
                    return
                keep_alive = await self.respond(request, reader, writer)
                if not keep_alive:
                    return
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def respond(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Send the response to one request and return whether the connection stays open."""
        keep_alive = request.keep_alive()
        path = request.path
        if path == self.health_path:
            writer.write(encode_response(200, b'{"status": "ok"}', keep_alive))
            await writer.drain()
            return keep_alive
        if path == self.stats_path:
            body = json.dumps(self.capacity.stats.snapshot(self.capacity)).encode()
            writer.write(encode_response(200, body, keep_alive))
            await writer.drain()
            return keep_alive

        capacity = self.capacity
        stats = capacity.stats
        stats.received += 1
        if capacity.queue_full():
            stats.rejected += 1
            body = json.dumps({"error": "queue full", "queue_limit": capacity.queue_limit}).encode()
            writer.write(encode_response(503, body, keep_alive, (("retry-after", "1"),)))
            await writer.drain()
            return keep_alive

        await capacity.serve()
        # A client that closed its side while waiting has given up: asyncio
        # keeps a half-closed connection open, so the reader's EOF shows it.
        # NOTE: a client that half-closes after sending and still reads the
        # response is counted as abandoned too; HTTP/1.1 clients do not do that.
        if writer.transport.is_closing() or reader.at_eof():
            stats.abandoned += 1
            return False
        body = json.dumps({"path": path, "consumer": request.headers.get("x-consumer")}).encode()
        writer.write(encode_response(200, body, keep_alive, cache_headers(request)))
        stats.count_completed()
        await writer.drain()
        return keep_alive


def cache_headers(request: Request) -> tuple[tuple[str, str], ...]:
    """Catalog reads may be cached for 30 s by shared caches; every other response must not be stored."""
    if request.method in ("GET", "HEAD") and request.path.startswith(CACHEABLE_PREFIX):
        return (("cache-control", "public, max-age=30"),)
    return (("cache-control", "no-store"),)


def loopback_host(value: str) -> str:
    """Accept only loopback addresses (127.0.0.0/8, ::1, localhost) for --host."""
    if value == "localhost":
        return value
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid IP address {value!r}: use 127.0.0.1 or ::1") from None
    if not address.is_loopback:
        raise argparse.ArgumentTypeError(f"{value} is not a loopback address: use 127.0.0.1 or ::1")
    return value


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a number greater than 0, got {value}")
    return number


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", type=loopback_host, default="127.0.0.1", help="Loopback address to listen on.")
    parser.add_argument("--port", type=int, default=0, help="Port to listen on; 0 picks a free one (default).")
    parser.add_argument("--concurrency", type=positive_int, default=10, help="Requests served at once (default 10).")
    parser.add_argument(
        "--service-ms",
        type=positive_float,
        default=100.0,
        help="Service time of each request, in ms (default 100).",
    )
    parser.add_argument(
        "--queue-limit",
        type=int,
        default=None,
        help="Requests that may wait for a slot; more get a 503 response (default: no limit).",
    )
    parser.add_argument("--health-path", default="/healthz", help="Path that returns 200 at once (default /healthz).")
    parser.add_argument("--stats-path", default="/_stats", help="Path of the JSON counters (default /_stats).")
    parser.add_argument(
        "--exit-with-parent", action="store_true", help="Stop when the process that started this one ends."
    )
    args = parser.parse_args(argv)
    if args.queue_limit is not None and args.queue_limit < 0:
        parser.error(f"--queue-limit must be 0 or more, got {args.queue_limit}")
    return args


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    while os.getppid() == parent_pid:
        await asyncio.sleep(0.5)
    log.warning("parent process %d ended, stopping", parent_pid)
    stop.set()


async def run(args: argparse.Namespace) -> None:
    capacity = Capacity(args.concurrency, args.service_ms / 1000, args.queue_limit)
    server = Server(capacity, args.health_path, args.stats_path)
    listener = await asyncio.start_server(
        server.handle_connection, args.host, args.port, limit=MAX_HEAD_BYTES, backlog=4096
    )
    host, port = listener.sockets[0].getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    queue_limit = "none" if args.queue_limit is None else args.queue_limit
    print(
        f"capacity upstream listening on {shown_host}:{port} capacity={capacity.capacity_per_second:g}/s "
        f"concurrency={args.concurrency} service_ms={args.service_ms:g} queue_limit={queue_limit}",
        flush=True,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    watcher = asyncio.create_task(_watch_parent(os.getppid(), stop)) if args.exit_with_parent else None

    await stop.wait()
    # Not wait_closed(): on Python 3.12 and later it waits for every idle
    # keep-alive connection to close.
    listener.close()
    if watcher is not None:
        watcher.cancel()
    stats = capacity.stats
    log.info(
        "stopped completed=%d abandoned=%d rejected=%d max_in_service=%d max_queued=%d",
        stats.completed,
        stats.abandoned,
        stats.rejected,
        stats.max_in_service,
        stats.max_queued,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
