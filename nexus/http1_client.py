"""An HTTP/1.1 client for upstream targets that runs on the worker's event loop.

Why not pyreqwest: its requests run on a Tokio thread, and every request
crosses between that thread and the event loop several times. Measured on
the 2-CPU development VM with one worker and a local nginx upstream
(docs/benchmarks.md), the bare pyreqwest proxy cost about 46 us of CPU per
request and a proxy on an asyncio protocol about 28 us, against 23 us for
responding without any upstream. This client keeps everything on the loop:
connections are uvloop transports, and a response is parsed in
`data_received`, usually from the single read that carries all of it.

What it does, per RFC 9112:

- Keep-alive connections per target, reused last-in first-out, dropped after
  `IDLE_TIMEOUT` or when the upstream closes them. A request that fails on a
  reused connection before any response byte arrives is sent once more on a
  new connection when its body can be replayed and its method is
  idempotent (or it was never written), because the upstream may have
  closed the idle connection while the request was on its way.
- Request bodies: bytes with Content-Length, or a stream, sent with the
  declared Content-Length when there is one and chunked otherwise. Writes
  wait while the socket's buffer is full.
- Response framing (RFC 9112 section 6.3): no body for HEAD, 1xx, 204 and
  304; chunked when Transfer-Encoding ends in chunked; Content-Length;
  otherwise until the upstream closes. Interim 1xx responses other than 101
  are skipped. Reading pauses while more than `READ_HIGH_WATER` bytes wait
  for the caller, so a slow downstream slows the upstream read.
- Errors are ConnectFailed, ConnectTimedOut, ConnectionBroken,
  ResponseTimedOut and ProtocolViolation (all UpstreamHTTPError), so the
  proxy can tell what may be retried. The deadline for the response head is
  a timer of the connection, not a cancelled task, which costs less per
  request than `asyncio.timeout`.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
from collections.abc import AsyncIterator

__all__ = [
    "ConnectFailed",
    "ConnectTimedOut",
    "ConnectionBroken",
    "IDEMPOTENT_METHODS",
    "ProtocolViolation",
    "Response",
    "ResponseTimedOut",
    "TargetConnections",
    "UpstreamHTTPError",
]

# Idle keep-alive connections older than this are closed rather than reused,
# in seconds. Shorter than nginx's default keepalive_timeout (75 s).
IDLE_TIMEOUT = 60.0

# A response head larger than this is rejected, in bytes.
MAX_HEAD = 64 * 1024

# Response bytes buffered for the caller before reading from the upstream
# pauses, and the level at which it resumes, in bytes.
READ_HIGH_WATER = 256 * 1024
READ_LOW_WATER = 64 * 1024

_NO_BODY_STATUSES = frozenset({204, 304})
# Methods a client may send again after a failure (RFC 9110 section 9.2.2).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_HEX_DIGITS = b"0123456789abcdefABCDEF"
# Response fields that decide the framing and the connection's reuse.
_FRAMING_FIELDS = frozenset({"content-length", "transfer-encoding", "connection"})



class UpstreamHTTPError(Exception):
    """A request to an upstream target failed; `received` is whether any response byte came back."""

    received = False


class ConnectFailed(UpstreamHTTPError):
    """The TCP connection to the target could not be made: nothing was sent."""


class ConnectTimedOut(ConnectFailed):
    """The TCP connection to the target was not made within the connect timeout."""


class ConnectionBroken(UpstreamHTTPError):
    """The connection failed or closed before the response was complete; `sent` is whether the request went out."""

    sent = True


class ResponseTimedOut(UpstreamHTTPError):
    """No complete response head arrived before the deadline."""


class ProtocolViolation(UpstreamHTTPError):
    """The upstream's response is not valid HTTP/1.1 framing."""


class TargetConnections:
    """The keep-alive connections of one worker to one target (`host:port`)."""

    def __init__(self, host: str, port: int, connect_timeout: float) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self._idle: collections.deque[_Connection] = collections.deque()
        self._closed = False

    async def request(
        self,
        method: str,
        head: bytes,
        payload: bytes | None,
        deadline: float,
        stream: AsyncIterator[bytes] | None = None,
        chunked: bool = False,
    ) -> Response:
        """Send one request and return its response once the head has arrived.

        `head` is the request line and header fields, ending with the empty
        line. `payload` is a whole body that `head` declares the length of,
        or None. `deadline` is the event loop's time by which the response
        head must be in (ResponseTimedOut otherwise). `stream` is a body to
        send as it comes: in chunked coding when `chunked` is true (`head`
        then contains Transfer-Encoding: chunked), else as it is, with the
        Content-Length that `head` declares.
        """
        connection = self._take_idle()
        if connection is not None:
            try:
                return await connection.exchange(method, head, payload, deadline, stream, chunked)
            except ConnectionBroken as exc:
                # The upstream may have closed this idle connection while the
                # request was on its way. A body that can be replayed is sent
                # once more, on a new connection, but a request that may have
                # reached the upstream only if its method is idempotent.
                if exc.received or stream is not None or (exc.sent and method not in IDEMPOTENT_METHODS):
                    raise
        connection = await self._connect(deadline)
        return await connection.exchange(method, head, payload, deadline, stream, chunked)

    def release(self, connection: _Connection) -> None:
        """Keep a connection whose exchange ended cleanly for the next request."""
        if self._closed:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        self._idle.append(connection)

    def forget(self, connection: _Connection) -> None:
        """Drop a connection that closed while idle."""
        try:
            self._idle.remove(connection)
        except ValueError:
            pass

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()

    def _take_idle(self) -> _Connection | None:
        idle = self._idle
        while idle:
            connection = idle.pop()
            if connection.usable and time.monotonic() - connection.idle_since < IDLE_TIMEOUT:
                return connection
            connection.close()
        return None

    async def _connect(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        connect_deadline = loop.time() + self.connect_timeout
        try:
            async with asyncio.timeout_at(min(deadline, connect_deadline)):
                _, connection = await loop.create_connection(lambda: _Connection(self, loop), self.host, self.port)
        except TimeoutError:
            if deadline < connect_deadline:
                raise ResponseTimedOut(f"no connection to {self.host}:{self.port} before the response deadline") from None
            raise ConnectTimedOut(
                f"no connection to {self.host}:{self.port} within {self.connect_timeout:g} s"
            ) from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        return connection


class Response:
    """The response to one request: status, header fields and the body to read.

    `headers` contains (name, value) pairs decoded as latin-1, names lower-cased,
    in arrival order. Read the body with `read_all()` or `read_chunk()`, then
    call `finish()`: it returns the connection to its pool when the exchange
    ended cleanly, and closes it otherwise.
    """

    __slots__ = ("_connection", "content_length", "headers", "status")

    def __init__(self, connection: _Connection, status: int, headers: list[tuple[str, str]], length: int | None):
        self._connection = connection
        self.status = status
        self.headers = headers
        self.content_length = length

    def body_if_complete(self) -> bytes | None:
        """Return the body when all of it has arrived in one part, else None; read_all() then reads it."""
        connection = self._connection
        if connection.complete_in_one_part():
            # The usual small response: all of it came with the head.
            return connection.take_only_part()
        return None

    async def read_all(self) -> bytes:
        """Return the whole remaining body."""
        body = self.body_if_complete()
        if body is not None:
            return body
        parts = []
        while (chunk := await self._connection.read_chunk()) is not None:
            parts.append(chunk)
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    async def read_chunk(self) -> bytes | None:
        """Return the next part of the body, or None at its end."""
        return await self._connection.read_chunk()

    def finish(self) -> None:
        self._connection.finish()


# States of a connection in its current exchange.
_IDLE, _HEAD, _BODY, _DONE = range(4)
# Framings of the response body.
_LENGTH, _CHUNKED, _UNTIL_CLOSE, _NONE = range(4)


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the parser of the response on it."""

    def __init__(self, pool: TargetConnections, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._state = _IDLE
        self._method = "GET"
        self._head_waiter: asyncio.Future | None = None
        self._body_waiter: asyncio.Future | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._reading_paused = False
        self._framing = _NONE
        self._remaining = 0
        self._chunk_phase = 0  # 0: size line, 1: data, 2: CRLF after data, 3: trailers
        self._keep_alive = True
        self._received = False
        self._error: UpstreamHTTPError | None = None
        self._drain_waiter: asyncio.Future | None = None
        self._writing_paused = False
        self._writer: asyncio.Task | None = None
        self.closed = False
        self.idle_since = 0.0

    @property
    def usable(self) -> bool:
        return not self.closed and self._state == _IDLE

    # asyncio.Protocol

    def connection_made(self, transport) -> None:
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        was_idle = self._state == _IDLE
        self.closed = True
        if self._state == _BODY and self._framing == _UNTIL_CLOSE:
            self._state = _DONE
            self._keep_alive = False
            self._wake_body()
        elif self._state in (_HEAD, _BODY):
            reason = f": {exc}" if exc else ""
            self._fail(ConnectionBroken(f"upstream {self._pool.host}:{self._pool.port} closed the connection{reason}"))
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        if was_idle:
            self._pool.forget(self)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._received = True
        if self._state == _HEAD:
            self._buffer += data
            self._parse_head()
        elif self._state == _BODY:
            self._feed_body(data)
        else:
            # Bytes outside an exchange: the connection is out of step.
            self._keep_alive = False
            if self._state == _IDLE:
                self.close()

    def eof_received(self) -> bool:
        return False

    # The exchange, called by TargetConnections and Response.

    async def exchange(
        self,
        method: str,
        head: bytes,
        payload: bytes | None,
        deadline: float,
        stream: AsyncIterator[bytes] | None,
        chunked: bool,
    ) -> Response:
        if self.closed:
            error = ConnectionBroken(f"upstream {self._pool.host}:{self._pool.port} closed the connection")
            error.sent = False
            raise error
        loop = self._loop
        self._reset(method)
        waiter = self._head_waiter = loop.create_future()
        timer = loop.call_at(deadline, self._head_timed_out, waiter)
        transport = self._transport
        assert transport is not None
        if payload:
            transport.write(head + payload)
        else:
            transport.write(head)
        if stream is not None:
            self._writer = loop.create_task(self._write_stream(stream, chunked))
        try:
            return await waiter
        except BaseException:
            # Cancelled, timed out or failed: the connection's state is unknown.
            self.close()
            raise
        finally:
            timer.cancel()

    def _head_timed_out(self, waiter: asyncio.Future) -> None:
        if not waiter.done():
            self._head_waiter = None
            waiter.set_exception(ResponseTimedOut(f"no response head from {self._pool.host}:{self._pool.port} in time"))

    async def read_chunk(self) -> bytes | None:
        while not self._chunks:
            if self._state == _DONE:
                return None
            if self._error is not None:
                raise self._error
            self._body_waiter = self._loop.create_future()
            try:
                await self._body_waiter
            finally:
                self._body_waiter = None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._reading_paused and self._buffered <= READ_LOW_WATER:
            self._reading_paused = False
            if not self.closed:
                self._transport.resume_reading()
        return chunk

    def complete_in_one_part(self) -> bool:
        return self._state == _DONE and len(self._chunks) == 1

    def take_only_part(self) -> bytes:
        self._buffered = 0
        if self._reading_paused:
            self._reading_paused = False
            if not self.closed:
                self._transport.resume_reading()
        return self._chunks.popleft()

    def finish(self) -> None:
        """End the exchange: back to the pool if the response was read whole, else close."""
        writer, self._writer = self._writer, None
        if writer is not None and not writer.done():
            writer.cancel()
            self._keep_alive = False
        if self._state == _DONE and self._keep_alive and not self.closed and not self._chunks:
            self._state = _IDLE
            self._pool.release(self)
        else:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                self._transport.abort()
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()

    # Request body streaming.

    async def _write_stream(self, stream: AsyncIterator[bytes], chunked: bool) -> None:
        transport = self._transport
        assert transport is not None
        try:
            async for chunk in stream:
                if self.closed:
                    return
                if chunked:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    transport.write(chunk)
                if self._writing_paused:
                    await self._drain()
            if chunked and not self.closed:
                transport.write(b"0\r\n\r\n")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The downstream body broke (a limit, a timeout, a disconnect):
            # the upstream must not take a truncated body as complete.
            self._fail(ConnectionBroken(f"request body stream failed: {exc}"))
            self.close()

    async def _drain(self) -> None:
        self._drain_waiter = self._loop.create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None

    # Response parsing.

    def _reset(self, method: str) -> None:
        self._state = _HEAD
        self._method = method
        self._buffer.clear()
        self._chunks.clear()
        self._buffered = 0
        self._keep_alive = True
        self._received = False
        self._error = None
        self._chunk_phase = 0

    def _parse_head(self) -> None:
        buffer = self._buffer
        while self._state == _HEAD:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    self._violation(f"response head larger than {MAX_HEAD} bytes")
                return
            try:
                status, headers, framing, length, keep_alive = self._read_head(bytes(buffer[:end]))
            except ProtocolViolation as exc:
                self._violation(str(exc))
                return
            del buffer[: end + 4]
            if 100 <= status < 200 and status != 101:
                continue  # an interim response; the final one follows
            self._keep_alive = keep_alive
            self._framing = framing
            self._remaining = length or 0
            self._state = _BODY
            waiter = self._head_waiter
            self._head_waiter = None
            if waiter is not None and not waiter.done():
                waiter.set_result(Response(self, status, headers, length if framing == _LENGTH else None))
            if framing == _NONE or (framing == _LENGTH and length == 0):
                self._state = _DONE
            if buffer:
                rest = bytes(buffer)
                buffer.clear()
                self._feed_body(rest)
            elif self._state == _DONE:
                self._wake_body()

    def _read_head(self, head: bytes) -> tuple[int, list[tuple[str, str]], int, int | None, bool]:
        """Parse a response head (without its final empty line); return status, fields and framing.

        The head is decoded as latin-1 once, so every byte survives into the
        field values, and names are lower-cased.
        """
        lines = head.decode("latin-1").split("\r\n")
        status_line = lines[0]
        if (
            not status_line.startswith("HTTP/1.")
            or status_line[8:9] != " "
            or not status_line[9:12].isdigit()
            or status_line[12:13] not in (" ", "")
        ):
            raise ProtocolViolation(f"invalid status line {status_line[:80]!r}")
        status = int(status_line[9:12])
        keep_alive = status_line[7] == "1"
        headers: list[tuple[str, str]] = []
        append = headers.append
        lengths: list[str] = []
        codings: list[str] = []
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            # An obs-fold (a line starting with whitespace) makes the response
            # a 502, and whitespace before the colon is removed (RFC 9112
            # sections 5.2 and 5.1).
            if not colon or line[0] in " \t" or "\r" in value:
                raise ProtocolViolation(f"invalid header line {line[:80]!r}")
            if name[-1:] in (" ", "\t"):
                name = name.rstrip(" \t")
            if not name:
                raise ProtocolViolation(f"invalid header line {line[:80]!r}")
            name = name.lower()
            value = value.strip(" \t")
            if name in _FRAMING_FIELDS:
                if name == "content-length":
                    lengths.append(value)
                elif name == "transfer-encoding":
                    codings.append(value)
                else:
                    options = {option.strip() for option in value.lower().split(",")}
                    if "close" in options:
                        keep_alive = False
                    elif "keep-alive" in options:
                        keep_alive = True
            append((name, value))

        if self._method == "HEAD" or status in _NO_BODY_STATUSES or 100 <= status < 200:
            return status, headers, _NONE, None, keep_alive
        if codings:
            # With both fields, Transfer-Encoding wins and the connection
            # is not reused: the two framings disagree about where the next
            # response starts (RFC 9112 section 6.3).
            if lengths:
                keep_alive = False
            last = ",".join(codings).rsplit(",", 1)[-1].strip().lower()
            if last == "chunked":
                return status, headers, _CHUNKED, None, keep_alive
            return status, headers, _UNTIL_CLOSE, None, False
        if lengths:
            values = {part.strip() for value in lengths for part in value.split(",")}
            if len(values) != 1:
                raise ProtocolViolation(f"conflicting Content-Length values {sorted(values)!r}")
            (text,) = values
            if not (text.isascii() and text.isdigit()):
                raise ProtocolViolation(f"invalid Content-Length {text[:40]!r}")
            return status, headers, _LENGTH, int(text), keep_alive
        return status, headers, _UNTIL_CLOSE, None, False

    def _feed_body(self, data: bytes) -> None:
        if self._framing == _LENGTH:
            if len(data) > self._remaining:
                # More than the response: the connection is out of step.
                data = data[: self._remaining]
                self._keep_alive = False
            self._remaining -= len(data)
            if data:
                self._push(data)
            if self._remaining == 0:
                self._state = _DONE
                self._wake_body()
        elif self._framing == _CHUNKED:
            self._buffer += data
            self._decode_chunks()
        elif self._framing == _UNTIL_CLOSE:
            if data:
                self._push(data)
        else:
            self._keep_alive = False

    def _decode_chunks(self) -> None:
        buffer = self._buffer
        while buffer and self._state == _BODY:
            phase = self._chunk_phase
            if phase == 1:
                take = min(self._remaining, len(buffer))
                self._push(bytes(buffer[:take]))
                del buffer[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._chunk_phase = 2
                continue
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    self._violation("chunk size line or trailer too long")
                return
            line = bytes(buffer[:end])
            del buffer[: end + 2]
            if phase == 0:
                size_text = line.split(b";", 1)[0].strip(b" \t")
                if not size_text or len(size_text) > 15 or size_text.strip(_HEX_DIGITS):
                    self._violation(f"invalid chunk size {line[:40]!r}")
                    return
                size = int(size_text, 16)
                if size == 0:
                    self._chunk_phase = 3
                else:
                    self._remaining = size
                    self._chunk_phase = 1
            elif phase == 2:
                if line:
                    self._violation("chunk data not followed by CRLF")
                    return
                self._chunk_phase = 0
            elif not line:
                # The empty line after the (dropped) trailer fields ends the body.
                self._state = _DONE
                if buffer:
                    self._keep_alive = False
                self._wake_body()

    def _push(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > READ_HIGH_WATER and not self._reading_paused and not self.closed:
            self._reading_paused = True
            self._transport.pause_reading()
        self._wake_body()

    def _wake_body(self) -> None:
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _violation(self, detail: str) -> None:
        self._fail(ProtocolViolation(f"upstream {self._pool.host}:{self._pool.port} sent an invalid response: {detail}"))
        self.close()

    def _fail(self, error: UpstreamHTTPError) -> None:
        error.received = self._received
        self._keep_alive = False
        if self._error is None:
            self._error = error
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            self._head_waiter = None
            waiter.set_exception(error)
        self._wake_body()

