"""An open-loop HTTP/1.1 client: requests start at fixed times whatever the responses' latency.

A closed-loop client (such as a locust user) waits for each response before
its next request, so a slow server lowers the load it is offered and its
latency looks better than it is. Here request k of a stage at rate r is due
at stage start + k / r. A 1 ms ticker starts every request that is due, on
an idle keep-alive connection or a new one. Each latency counts from the
time the request was due, so the client's own delays count against the
server, never in its favour.

Only loopback addresses are accepted as targets.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from loadtest import traffic
from loadtest.spike_plan import Stage

PROBLEM_PREFIX = "urn:nexus:problem:"
TICK_SECONDS = 0.001
# Status of a request that got no response: a connection error, or no
# response by the end of the drain time.
CONNECTION_ERROR = 0
UNFINISHED = -1


@dataclass(slots=True)
class Outcome:
    """One request: who sent it in which stage, when it was due and done (monotonic seconds), and its result."""

    client: str
    stage: str
    due: float
    done: float
    status: int
    problem: str | None = None

    @property
    def latency(self) -> float:
        return self.done - self.due


@dataclass
class LoadResult:
    outcomes: list[Outcome] = field(default_factory=list)
    # Stage name -> monotonic start and end of the stage.
    windows: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Maximum number of requests waiting at once for a connection, because max_connections were open.
    max_waiting_for_connection: int = 0
    # Maximum delay between a request's due time and its start, in seconds.
    max_dispatch_lag: float = 0.0
    # Requests sent again on a new connection because the server had closed the idle one.
    retried_on_new_connection: int = 0


def require_loopback(host: str) -> None:
    """Raise ValueError unless `host` is a loopback address."""
    if host == "localhost":
        return
    if not ipaddress.ip_address(host.strip("[]")).is_loopback:
        raise ValueError(f"{host} is not a loopback address; load is sent only to 127.0.0.1 or ::1")


class ResponseError(Exception):
    """A response the client cannot parse."""


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ResponseError(f"invalid status line {lines[0][:100]!r}")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader)
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(parts[1]), headers, body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)


def problem_type(body: bytes) -> str | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    kind = document.get("type")
    return kind.removeprefix(PROBLEM_PREFIX) if isinstance(kind, str) else None


class Client:
    """Keep-alive connections to one loopback server, at most `max_connections` open."""

    def __init__(self, host: str, port: int, max_connections: int = 4000, timeout: float = 30.0) -> None:
        require_loopback(host)
        self.host = host
        self.port = port
        self.timeout = timeout
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(max_connections)
        self.waiting_for_connection = 0
        self.max_waiting_for_connection = 0
        self.retried_on_new_connection = 0

    async def send(self, planned: traffic.PlannedRequest, stage: str, due: float) -> Outcome:
        if self._slots.locked():
            self.waiting_for_connection += 1
            self.max_waiting_for_connection = max(self.max_waiting_for_connection, self.waiting_for_connection)
            try:
                await self._slots.acquire()
            finally:
                self.waiting_for_connection -= 1
        else:
            await self._slots.acquire()
        try:
            return await self._exchange(planned, stage, due)
        finally:
            self._slots.release()

    async def _exchange(self, planned: traffic.PlannedRequest, stage: str, due: float) -> Outcome:
        connection = self._take_idle()
        reused = connection is not None
        try:
            if connection is None:
                connection = await asyncio.open_connection(self.host, self.port)
            try:
                status, headers, body = await self._round_trip(connection, planned)
            except asyncio.IncompleteReadError as error:
                if not (reused and not error.partial):
                    raise
                # The server closed an idle keep-alive connection as the
                # request went out, before any byte of a response: send it
                # again on a new connection, as HTTP clients do (RFC 9112
                # section 9.3.1), and count it.
                connection[1].close()
                self.retried_on_new_connection += 1
                connection = await asyncio.open_connection(self.host, self.port)
                status, headers, body = await self._round_trip(connection, planned)
        except asyncio.CancelledError:
            # Given up at the end of the drain time: the connection is mid-exchange.
            if connection is not None:
                connection[1].close()
            raise
        except (
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ResponseError,
            ValueError,
        ) as error:
            if connection is not None:
                connection[1].close()
            # The problem of a connection error is the exception's class name.
            return Outcome(planned.client, stage, due, time.monotonic(), CONNECTION_ERROR, type(error).__name__)
        done = time.monotonic()
        if headers.get("connection", "").lower() == "close":
            connection[1].close()
        else:
            self._idle.append(connection)
        problem = problem_type(body) if status >= 400 else None
        return Outcome(planned.client, stage, due, done, status, problem)

    def _take_idle(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Return the most recently used idle connection that the server has not closed."""
        while self._idle:
            reader, writer = self._idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return None

    async def _round_trip(
        self, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], planned: traffic.PlannedRequest
    ) -> tuple[int, dict[str, str], bytes]:
        reader, writer = connection
        writer.write(_encode_request(planned, self.host, self.port))
        return await asyncio.wait_for(read_response(reader), self.timeout)

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


def _encode_request(planned: traffic.PlannedRequest, host: str, port: int) -> bytes:
    lines = [f"{planned.method} {planned.path} HTTP/1.1", f"host: {host}:{port}"]
    lines.extend(f"{name}: {value}" for name, value in planned.headers.items())
    body = planned.body or b""
    if planned.body is not None:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def send_stages(
    client: Client,
    stages: Sequence[Stage],
    rng: random.Random,
    drain_seconds: float,
    on_stage_start: Callable[[str], Awaitable[None]] | None = None,
    pick: Callable[[random.Random], traffic.PlannedRequest] = traffic.pick_request,
) -> LoadResult:
    """Send the traffic mix at each stage's rate, then wait up to `drain_seconds` for the last responses.

    `on_stage_start(name)` runs as its own task at the start of each stage
    and once more as "end" after the last one, for example to read the
    upstream's counters.
    """
    result = LoadResult()
    tasks: list[asyncio.Task] = []
    # (client, stage, due) of each task, to count the requests that never finish.
    sent: list[tuple[str, str, float]] = []
    hooks: list[asyncio.Task] = []
    start = time.monotonic()
    for stage in stages:
        stage_start = start + stage.start
        stage_end = start + stage.end
        result.windows[stage.name] = (stage_start, stage_end)
        await _sleep_until(stage_start)
        if on_stage_start is not None:
            hooks.append(asyncio.create_task(on_stage_start(stage.name)))
        count = round(stage.rate * stage.seconds)
        number = 0
        while number < count:
            now = time.monotonic()
            while number < count:
                due = stage_start + number / stage.rate
                if due > now:
                    break
                result.max_dispatch_lag = max(result.max_dispatch_lag, now - due)
                planned = pick(rng)
                tasks.append(asyncio.create_task(client.send(planned, stage.name, due)))
                sent.append((planned.client, stage.name, due))
                number += 1
            await asyncio.sleep(TICK_SECONDS)
    await _sleep_until(start + stages[-1].end)
    if on_stage_start is not None:
        hooks.append(asyncio.create_task(on_stage_start("end")))

    finished, pending = await asyncio.wait(tasks, timeout=drain_seconds) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await asyncio.gather(*hooks)
    gave_up_at = time.monotonic()
    for task, (client_kind, stage_name, due) in zip(tasks, sent):
        if task in finished:
            result.outcomes.append(task.result())
        else:
            result.outcomes.append(Outcome(client_kind, stage_name, due, gave_up_at, UNFINISHED))
    result.max_waiting_for_connection = client.max_waiting_for_connection
    result.retried_on_new_connection = client.retried_on_new_connection
    return result


async def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
