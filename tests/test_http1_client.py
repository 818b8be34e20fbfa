"""The upstream HTTP/1.1 client (`nexus.http1_client`) against real sockets.

Each test starts a TCP server on 127.0.0.1 in the test's event loop. The
server reads requests and answers with bytes the test scripts, so framings
that a normal server never sends (bad heads, trailers, interim responses,
a close in the middle of a body) can be checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from nexus.http1_client import (
    READ_HIGH_WATER,
    ConnectFailed,
    ConnectionBroken,
    ProtocolViolation,
    ResponseTimedOut,
    TargetConnections,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

GET = b"GET / HTTP/1.1\r\nhost: test\r\n\r\n"


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[tuple[TargetConnections, list[int]]]:
    """Run a server with `handler` per connection; yield a client pool for it and the list of accepted connections."""
    accepted: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = TargetConnections("127.0.0.1", port, connect_timeout=2.0)
    async with server:
        try:
            yield pool, accepted
        finally:
            pool.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def answering(*responses: bytes) -> Handler:
    """Return a handler that responds to each request on a connection with the next response, then closes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for response in responses:
            await read_request(reader)
            writer.write(response)
            await writer.drain()
        await asyncio.sleep(0.05)

    return handler


def keep_answering(response: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            writer.write(response)
            await writer.drain()

    return handler


async def fetch(pool: TargetConnections, method: str = "GET", head: bytes = GET) -> tuple[int, list, bytes]:
    loop = asyncio.get_running_loop()
    response = await pool.request(method, head, None, loop.time() + 5)
    try:
        body = await response.read_all()
    finally:
        response.finish()
    return response.status, response.headers, body


def test_content_length_body_and_keep_alive_reuse() -> None:
    async def test() -> None:
        async with serving(keep_answering(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello")) as (pool, accepted):
            for _ in range(3):
                status, headers, body = await fetch(pool)
                assert (status, body) == (200, b"hello")
                assert headers == [("content-length", "5"), ("x-a", "1")]
            assert len(accepted) == 1

    run(test)


def test_chunked_body_with_extensions_and_trailers() -> None:
    response = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n"
    )

    async def test() -> None:
        async with serving(keep_answering(response)) as (pool, accepted):
            assert (await fetch(pool))[2] == b"hello world"
            assert (await fetch(pool))[2] == b"hello world"
            assert len(accepted) == 1

    run(test)


def test_chunked_body_split_across_reads() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        for part in (b"HTTP/1.1 200 OK\r\nTransfer-", b"Encoding: chunked\r\n\r\n3", b"\r\nabc", b"\r", b"\n0\r\n", b"\r\n"):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.01)

    async def test() -> None:
        async with serving(handler) as (pool, _):
            assert (await fetch(pool))[2] == b"abc"

    run(test)


def test_body_until_close_is_not_reused() -> None:
    async def test() -> None:
        async with serving(answering(b"HTTP/1.1 200 OK\r\n\r\nall of it")) as (pool, accepted):
            assert (await fetch(pool))[2] == b"all of it"
            assert (await fetch(pool))[2] == b"all of it"
            assert len(accepted) == 2

    run(test)


@pytest.mark.parametrize(
    "method, response",
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"),
    ],
)
def test_responses_without_body_keep_the_connection(method: str, response: bytes) -> None:
    async def test() -> None:
        async with serving(keep_answering(response)) as (pool, accepted):
            head = GET.replace(b"GET", method.encode())
            assert (await fetch(pool, method, head))[2] == b""
            assert (await fetch(pool, method, head))[2] == b""
            assert len(accepted) == 1

    run(test)


def test_interim_response_is_skipped() -> None:
    response = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"

    async def test() -> None:
        async with serving(keep_answering(response)) as (pool, _):
            status, _, body = await fetch(pool)
            assert (status, body) == (201, b"ok")

    run(test)


def test_close_responses_not_reused() -> None:
    async def test() -> None:
        for response in (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\na",
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\na",
        ):
            async with serving(keep_answering(response)) as (pool, accepted):
                await fetch(pool)
                await fetch(pool)
                assert len(accepted) == 2, response

    run(test)


def test_both_framings_use_chunked_and_are_not_reused() -> None:
    # Transfer-Encoding wins over Content-Length, and a connection whose
    # framing was ambiguous is not trusted with another request.
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"

    async def test() -> None:
        async with serving(keep_answering(response)) as (pool, accepted):
            assert (await fetch(pool))[2] == b"abc"
            await fetch(pool)
            assert len(accepted) == 2

    run(test)


def test_space_before_colon_removed() -> None:
    async def test() -> None:
        async with serving(keep_answering(b"HTTP/1.1 200 OK\r\nX-A \t: 1\r\nContent-Length: 0\r\n\r\n")) as (pool, _):
            _, headers, _ = await fetch(pool)
            assert ("x-a", "1") in headers

    run(test)


def test_latin1_bytes_in_values_survive() -> None:
    async def test() -> None:
        async with serving(keep_answering(b"HTTP/1.1 200 OK\r\nX-Name: caf\xe9\r\nContent-Length: 0\r\n\r\n")) as (pool, _):
            _, headers, _ = await fetch(pool)
            assert ("x-name", "caf\xe9") in headers

    run(test)


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(b"HTTP/1.1 2x0 OK\r\n\r\n", id="bad-status"),
        pytest.param(b"ICY 200 OK\r\n\r\n", id="not-http"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n", id="obs-fold"),
        pytest.param(b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", id="no-colon"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", id="two-lengths"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", id="negative-length"),
    ],
)
def test_invalid_head_is_a_protocol_violation(response: bytes) -> None:
    async def test() -> None:
        async with serving(answering(response)) as (pool, _):
            with pytest.raises(ProtocolViolation):
                await fetch(pool)

    run(test)


def test_invalid_chunk_size_fails_the_body() -> None:
    async def test() -> None:
        async with serving(answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n")) as (pool, _):
            with pytest.raises(ProtocolViolation):
                await fetch(pool)

    run(test)


def test_truncated_body_is_broken() -> None:
    async def test() -> None:
        async with serving(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")) as (pool, _):
            with pytest.raises(ConnectionBroken):
                await fetch(pool)

    run(test)


def test_refused_connection_is_connect_failed() -> None:
    async def test() -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        pool = TargetConnections("127.0.0.1", port, connect_timeout=2.0)
        with pytest.raises(ConnectFailed):
            await fetch(pool)

    run(test)


def test_no_head_before_the_deadline_times_out() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(2)

    async def test() -> None:
        async with serving(handler) as (pool, _):
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(ResponseTimedOut):
                await pool.request("GET", GET, None, loop.time() + 0.2)
            assert loop.time() - started < 1.0

    run(test)


def test_idle_connection_closed_by_upstream_is_retried_on_a_new_one() -> None:
    # The first connection answers once and then closes without a word, as
    # an upstream whose keep-alive timeout ran out does.
    async def test() -> None:
        async with serving(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")) as (pool, accepted):
            assert (await fetch(pool))[2] == b"ok"
            await asyncio.sleep(0.2)
            assert (await fetch(pool))[2] == b"ok"
            assert len(accepted) == 2

    run(test)


def test_streamed_request_body_is_sent_chunked() -> None:
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await read_request(reader))
        received.append(await reader.readuntil(b"0\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async def body():
        yield b"abc"
        yield b"0123456789abcdef"

    async def test() -> None:
        async with serving(handler) as (pool, _):
            loop = asyncio.get_running_loop()
            head = b"POST / HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\n\r\n"
            response = await pool.request("POST", head, None, loop.time() + 5, body(), chunked=True)
            assert response.status == 200
            response.finish()
            assert received[1] == b"3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n"

    run(test)


def test_slow_reader_pauses_the_upstream_read() -> None:
    size = 8 * READ_HIGH_WATER

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        writer.write(b"x" * size)
        await writer.drain()

    async def test() -> None:
        async with serving(handler) as (pool, _):
            loop = asyncio.get_running_loop()
            response = await pool.request("GET", GET, None, loop.time() + 5)
            await asyncio.sleep(0.3)
            # Reading paused near the high-water mark instead of taking in all 2 MiB.
            connection = response._connection
            assert connection._buffered <= READ_HIGH_WATER + 256 * 1024
            total = 0
            while (chunk := await response.read_chunk()) is not None:
                total += len(chunk)
            assert total == size
            response.finish()

    run(test)


def closing_after_first() -> Handler:
    """Return a handler whose first connection responds once, then reads the next request and closes unanswered."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        first = connections == 1
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        if first:
            await read_request(reader)
            return
        await keep_answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")(reader, writer)

    return handler


def test_reused_connection_closed_retries_get() -> None:
    async def test() -> None:
        async with serving(closing_after_first()) as (pool, accepted):
            assert (await fetch(pool))[2] == b"ok"
            assert (await fetch(pool))[2] == b"ok"
            assert len(accepted) == 2

    run(test)


def test_reused_connection_closed_fails_post() -> None:
    async def test() -> None:
        async with serving(closing_after_first()) as (pool, accepted):
            assert (await fetch(pool))[2] == b"ok"
            head = b"POST / HTTP/1.1\r\nhost: test\r\ncontent-length: 0\r\n\r\n"
            with pytest.raises(ConnectionBroken):
                await fetch(pool, "POST", head)
            assert len(accepted) == 1

    run(test)
