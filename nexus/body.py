"""Downstream request bodies: framing checks, size limit, per-chunk timeout.

granian hands the body to the ASGI app in chunks and enforces no size limit
and no read timeout, so Nexus does both here. A body whose declared length
fits in `BUFFER_LIMIT` is read whole before the first upstream try, which
makes it replayable for retries. A larger or chunked body is streamed to the
upstream as it arrives, with bounded memory, and cannot be retried.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from nexus.errors import BadRequest, BodyTimeout, PayloadTooLarge, UnsupportedTransferCoding

__all__ = ["BUFFER_LIMIT", "BodySource", "declared_length"]

# Bodies up to this size are buffered whole (bytes): large enough for typical
# JSON API calls, small enough that a worker serving 1024 of them at once
# uses at most 64 MiB for them.
BUFFER_LIMIT = 64 * 1024

Receive = Callable[[], Awaitable[dict]]


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """Return the body length the request declares: 0, a Content-Length, or None.

    None means a chunked body of unknown length. Raises BadRequest for the
    framings RFC 9112 section 6.3 calls invalid or ambiguous: both
    Transfer-Encoding and Content-Length, several different Content-Length
    values, or one that is not a non-negative integer.

    NOTE: granian 2.8.9 (hyper) rejects invalid or conflicting Content-Length
    with its own bare 400 before the app runs, and drops Content-Length when
    Transfer-Encoding is present (closing the connection after the response),
    so these checks only guard other servers and future granian versions.
    """
    lengths: list[bytes] = []
    chunked = False
    for name, value in headers:
        if name == b"content-length":
            lengths.extend(part.strip() for part in value.split(b","))
        elif name == b"transfer-encoding":
            if value.strip().lower() != b"chunked":
                # RFC 9112 section 6.1: a transfer coding the server does not
                # understand gets a 501 response. The HTTP server decodes
                # only chunked, so any other coding would reach the upstream
                # still encoded but no longer labelled.
                raise UnsupportedTransferCoding(
                    f"transfer coding {value.decode('latin-1')!r} is not supported; send the body chunked"
                )
            chunked = True

    if chunked and lengths:
        raise BadRequest("request has both Transfer-Encoding and Content-Length; send only one")
    if chunked:
        return None
    if not lengths:
        return 0
    if len(set(lengths)) > 1:
        raise BadRequest(f"request has conflicting Content-Length values: {b', '.join(lengths).decode('latin-1')}")
    if not lengths[0].isdigit():
        raise BadRequest(f"invalid Content-Length {lengths[0].decode('latin-1')!r}: expected a non-negative integer")
    return int(lengths[0])


class BodySource:
    """Reads one request body from ASGI `receive`, enforcing limits.

    `error` is the DownstreamError that stopped a streamed body, because
    the upstream client wraps exceptions raised inside the body stream.
    """

    def __init__(self, receive: Receive, length: int | None, max_body: int, chunk_timeout: float) -> None:
        self._receive = receive
        self.length = length
        self._max_body = max_body
        self._chunk_timeout = chunk_timeout
        self.received = 0
        self.error: Exception | None = None
        self.disconnected = False

    @property
    def is_empty(self) -> bool:
        return self.length == 0

    @property
    def is_bufferable(self) -> bool:
        return self.length is not None and self.length <= BUFFER_LIMIT

    def check_declared_size(self) -> None:
        """Reject a body whose declared length is over the limit before reading it."""
        if self.length is not None and self.length > self._max_body:
            raise PayloadTooLarge(
                f"request body of {self.length} bytes is larger than the limit of {self._max_body} bytes"
            )

    async def read_all(self) -> bytes:
        """Read the whole body into memory; only for bufferable bodies."""
        parts = [chunk async for chunk in self.chunks()]
        return b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Yield body chunks as they arrive; record and raise limit violations."""
        try:
            async for chunk in self._chunks():
                yield chunk
        except (BodyTimeout, PayloadTooLarge, BadRequest) as exc:
            self.error = exc
            raise

    async def _chunks(self) -> AsyncIterator[bytes]:
        more = True
        while more:
            message = await self._next_message()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                raise BadRequest("downstream closed the connection before the request body was complete")
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            self.received += len(chunk)
            if self.received > self._max_body:
                raise PayloadTooLarge(f"request body is larger than the limit of {self._max_body} bytes")
            if chunk:
                yield chunk

    async def _next_message(self) -> dict:
        try:
            async with asyncio.timeout(self._chunk_timeout):
                return await self._receive()
        except TimeoutError:
            raise BodyTimeout(
                f"no request body data for {self._chunk_timeout:g} s after {self.received} bytes"
            ) from None
