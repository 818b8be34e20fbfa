"""Forwarding one request to an upstream: tries, retries, timeouts, streaming.

`forward()` runs the tries of one request against an UpstreamPool and sends
the chosen response to the downstream. The rules:

- A retry goes to a target not tried yet, if the retry budget allows it.
- A connect failure may always be retried: nothing reached the upstream. A
  timeout, a reset or a retryable status is retried only for idempotent
  methods (RFC 9110 section 9.2.2) and only when the request body was
  buffered, because a streamed body cannot be sent twice.
- `timeouts.response_header` bounds each try until the response headers;
  `timeouts.total` bounds the whole exchange, body included.
- The response body is streamed with ASGI `send`, which waits while
  granian's buffer for the connection is full, so a slow downstream reader
  pauses the upstream read instead of growing the worker's memory.
- Requests go out on the worker's own keep-alive connections
  (`nexus.http1_client`), at most `max_connections` in flight per upstream.
- When the upstream has a concurrency limit (`nexus.concurrency`), every
  try, a retry too, takes a slot before its target is chosen and gives it
  back when its response body is finished or the try fails. The try's RTT sample is the time
  to the response headers (or to the header timeout), so a slow downstream
  reader does not lower the limit. A request that gets no slot ends with
  UpstreamOverloaded, except a retry after a connect failure, a timeout or
  a reset, which ends with that error, as when the retry budget is spent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nexus.balance import TargetState
from nexus.body import BUFFER_LIMIT, BodySource
from nexus.concurrency import Permit
from nexus.errors import (
    GatewayError,
    NoHealthyTarget,
    UpstreamConnectFailed,
    UpstreamError,
    UpstreamFailed,
    UpstreamOverloaded,
    UpstreamTimeout,
)
from nexus.http1_client import (
    IDEMPOTENT_METHODS,
    ConnectFailed,
    ConnectionBroken,
    ConnectTimedOut,
    Response,
    ResponseTimedOut,
    UpstreamHTTPError,
)
from nexus.upstream import UpstreamPool

__all__ = ["ForwardRequest", "forward"]

log = logging.getLogger("nexus.proxy")

Send = Callable[[dict], Awaitable[None]]


# Upstream statuses that count as a target failure for passive ejection.
_FAILURE_STATUSES = frozenset({502, 503, 504})


@dataclass(slots=True)
class ForwardRequest:
    """The request the proxy sends upstream for one downstream request."""

    method: str
    path_and_query: str
    headers: list[tuple[str, str]]
    host: str | None
    body: BodySource
    hash_key: bytes | None
    response_headers: Callable[[list[tuple[str, str]]], list[tuple[bytes, bytes]]]
    # The consumer's tier and its priority (0 for anonymous requests), for
    # shedding lower tiers first when the upstream's concurrency limit is reached.
    tier: str | None = None
    priority: int = 0
    # Called with the URL of the target whose response goes downstream, just
    # before its head is sent: the access log and the per-target metrics
    # need it on every path, cached routes included.
    on_target: Callable[[str], None] | None = None


class _RetryableFailure(Exception):
    """A try failed in a way a later try on another target may not."""

    def __init__(self, condition: str | int, error: GatewayError | None) -> None:
        self.condition = condition
        self.error = error


@dataclass(slots=True)
class ForwardResult:
    status: int
    target: str | None
    tries: int


async def forward(pool: UpstreamPool, request: ForwardRequest, send: Send) -> ForwardResult:
    """Send `request` to `pool` with retries and stream the response to `send`."""
    spec = pool.spec
    deadline = time.monotonic() + spec.timeouts.total
    # An empty body (most requests) needs no coroutine to prepare.
    payload = b"" if request.body.is_empty else await _prepare_body(request.body)
    replayable = payload is not None

    pool.in_flight += 1
    tried: set[int] = set()
    loop = asyncio.get_running_loop()
    total_timer = _TotalTimer(loop, loop.time() + spec.timeouts.total)
    try:
        try:
            last_failure: _RetryableFailure | None = None
            while True:
                permit = None if pool.limiter is None else await _acquire_slot(pool, request, last_failure)
                try:
                    target = _choose_next(pool, request, tried, last_failure)
                    tried.add(target.index)
                    outcome = await _try_counted(
                        pool, target, request, payload, send, deadline, tried, replayable, permit
                    )
                finally:
                    if permit is not None:
                        permit.release()
                if isinstance(outcome, ForwardResult):
                    return outcome
                failure = outcome
                if not _should_retry(pool, request, failure, tried, replayable):
                    raise failure.error or UpstreamFailed("upstream failed", upstream=pool.name)
                last_failure = failure
                log.info(
                    "retrying upstream=%s target=%s condition=%s try=%d",
                    pool.name,
                    target.url,
                    failure.condition,
                    len(tried),
                )
        except (asyncio.CancelledError, TimeoutError) as exc:
            if total_timer.stop(exc) or isinstance(exc, TimeoutError):
                raise UpstreamTimeout(
                    f"upstream {pool.name!r} did not complete within the total timeout of {spec.timeouts.total:g} s",
                    upstream=pool.name,
                ) from None
            raise
        finally:
            total_timer.stop(None)
    finally:
        pool.in_flight -= 1


class _TotalTimer:
    """The total timeout of one forward: cancels the task when it expires.

    It follows `asyncio.timeout_at` (the task is cancelled, and stop() returns
    whether the CancelledError came from this timer and no other cancel
    request), with one timer handle and no context manager, because it runs
    for every request: measured on the development VM, `asyncio.timeout`
    takes about 3.0 us to enter and leave, a timer handle about 0.7 us.
    """

    __slots__ = ("_cancelling", "_expired", "_handle", "_task")

    def __init__(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        task = asyncio.current_task(loop)
        assert task is not None, "the total timeout needs a real asyncio task"
        self._task = task
        self._cancelling = task.cancelling()
        self._expired = False
        self._handle: asyncio.TimerHandle | None = loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._expired = True
        self._handle = None
        self._task.cancel()

    def stop(self, error: BaseException | None) -> bool:
        """Stop the timer; return whether `error` is this timer's cancellation."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if not self._expired:
            return False
        self._expired = False
        return self._task.uncancel() <= self._cancelling and isinstance(error, asyncio.CancelledError)


async def _acquire_slot(pool: UpstreamPool, request: ForwardRequest, last_failure: _RetryableFailure | None) -> Permit:
    """Take a slot of the upstream's concurrency limit for the next try."""
    assert pool.limiter is not None
    try:
        return await pool.limiter.acquire(request.priority, request.tier)
    except UpstreamOverloaded:
        # A retry after a retryable status has no error of its own to end
        # with, because that response was dropped: it ends overloaded.
        if last_failure is None or last_failure.error is None:
            raise
        log.info("not retrying upstream=%s: no concurrency slot free for the retry", pool.name)
        raise last_failure.error from None


def _choose_next(
    pool: UpstreamPool, request: ForwardRequest, tried: set[int], last_failure: _RetryableFailure | None
) -> TargetState:
    """Pick the next target, or raise the last failure when no untried target is left for a retry."""
    try:
        return pool.choose(request.hash_key, tried)
    except NoHealthyTarget:
        if last_failure is not None and last_failure.error is not None:
            raise last_failure.error from None
        raise


async def _try_counted(
    pool: UpstreamPool,
    target: TargetState,
    request: ForwardRequest,
    payload: bytes | None,
    send: Send,
    deadline: float,
    tried: set[int],
    replayable: bool,
    permit: Permit | None,
) -> ForwardResult | _RetryableFailure:
    """Run one try, counting it against the retry budget if it is a retry."""
    is_retry = len(tried) > 1
    if is_retry:
        pool.retries_in_flight += 1
        pool.record_retry()
    try:
        may_retry_status = _may_retry_status(pool, request, tried, replayable)
        status = await _try_once(pool, target, request, payload, send, deadline, may_retry_status, permit)
        return ForwardResult(status, target.url, len(tried))
    except _RetryableFailure as failure:
        return failure
    finally:
        if is_retry:
            pool.retries_in_flight -= 1


async def _prepare_body(body: BodySource) -> bytes | None:
    """Buffer a small body so tries can replay it; None means stream it once."""
    body.check_declared_size()
    if body.is_empty:
        return b""
    if body.is_bufferable:
        return await body.read_all()
    return None


def _may_retry_status(pool: UpstreamPool, request: ForwardRequest, tried: set[int], replayable: bool) -> bool:
    """Return whether a retryable status on the coming try may be retried.

    Decided before the try, because a response that will not be retried must
    be forwarded as it is rather than dropped.
    """
    return (
        replayable
        and request.method in IDEMPOTENT_METHODS
        and len(tried) <= pool.spec.retries.attempts
        and len(tried) < len(pool.targets)
        and pool.can_retry()
    )


def _should_retry(
    pool: UpstreamPool, request: ForwardRequest, failure: _RetryableFailure, tried: set[int], replayable: bool
) -> bool:
    policy = pool.spec.retries
    if len(tried) > policy.attempts or failure.condition not in policy.on:
        return False
    if failure.condition != "connect_failure" and not (replayable and request.method in IDEMPOTENT_METHODS):
        return False
    if not replayable and failure.condition == "connect_failure" and request.body.received > 0:
        # Part of a streamed body was consumed; it cannot be sent again.
        return False
    return pool.can_retry()


async def _try_once(
    pool: UpstreamPool,
    target: TargetState,
    request: ForwardRequest,
    payload: bytes | None,
    send: Send,
    deadline: float,
    may_retry_status: bool,
    permit: Permit | None,
) -> int:
    """Make one try against `target`; send the response unless it is to be retried."""
    head, chunked = _request_head(request, target, payload)
    target.in_flight += 1
    started = time.monotonic()
    try:
        header_timeout = min(pool.spec.timeouts.response_header, max(deadline - started, 0.0))
        outgoing = _Outgoing(head, payload, chunked)
        async with _open_response(pool, target, outgoing, request, header_timeout, permit) as response:
            now = time.monotonic()
            target.record_latency(now - started, now)
            if permit is not None:
                permit.sample(now - started)
            status = response.status
            if may_retry_status and status in pool.spec.retries.on:
                pool.record_failure(target, f"status {status}")
                raise _RetryableFailure(status, None)
            _record_status(pool, target, status)
            if request.on_target is not None:
                request.on_target(target.url)
            await _send_response(response, request, send)
            return status
    finally:
        target.in_flight -= 1


def _request_head(request: ForwardRequest, target: TargetState, payload: bytes | None) -> tuple[bytes, bool]:
    """Return the request line and header block for one try, and whether the body goes chunked.

    Host is the downstream's, so virtual hosts upstream keep working. The
    body's framing is the proxy's own (RFC 9112 section 6): Content-Length
    for a buffered body (for GET and HEAD only when the body is not empty)
    and for a streamed body whose length was declared, chunked for the rest.
    """
    host = request.host
    if host is None:
        host = target.url.partition("://")[2]
    fields = "".join([f"{name}: {value}\r\n" for name, value in request.headers if name != "content-length"])
    chunked = False
    if payload is not None:
        if payload or request.method not in ("GET", "HEAD"):
            fields += f"content-length: {len(payload)}\r\n"
    elif request.body.length is not None:
        fields += f"content-length: {request.body.length}\r\n"
    else:
        fields += "transfer-encoding: chunked\r\n"
        chunked = True
    text = f"{request.method} {request.path_and_query} HTTP/1.1\r\nhost: {host}\r\n{fields}\r\n"
    try:
        return text.encode("latin-1"), chunked
    except UnicodeEncodeError:
        # A value added from the config with characters above U+00FF.
        return text.encode(), chunked


def _record_status(pool: UpstreamPool, target: TargetState, status: int) -> None:
    if status in _FAILURE_STATUSES:
        pool.record_failure(target, f"status {status}")
    else:
        pool.record_success(target)


@dataclass(slots=True)
class _Outgoing:
    """The bytes of one try: the head, and a buffered body or (None) the downstream body streamed."""

    head: bytes
    payload: bytes | None
    chunked: bool


class _open_response:
    """Async context: the upstream response, with errors mapped to tries' outcomes.

    Holds one of the upstream's `max_connections` slots from before sending
    until the response is finished, and on leaving returns the connection
    to its pool or closes it.
    """

    def __init__(
        self,
        pool: UpstreamPool,
        target: TargetState,
        outgoing: _Outgoing,
        request: ForwardRequest,
        timeout: float,
        permit: Permit | None,
    ) -> None:
        self._pool = pool
        self._target = target
        self._outgoing = outgoing
        self._request = request
        self._timeout = timeout
        self._permit = permit
        self._response: Response | None = None
        self._holds_slot = False

    async def __aenter__(self) -> Response:
        outgoing = self._outgoing
        stream = self._request.body.chunks() if outgoing.payload is None else None
        connections = self._pool.connections[self._target.index]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        try:
            await self._take_slot(deadline)
            self._response = await connections.request(
                self._request.method, outgoing.head, outgoing.payload, deadline, stream, outgoing.chunked
            )
            return self._response
        except (TimeoutError, ResponseTimedOut):
            self._give_back_slot()
            if self._permit is not None and self._timeout >= self._pool.spec.timeouts.response_header:
                # No headers within the full header timeout: the RTT was at
                # least that long. A timeout cut short by the total deadline
                # is no measure of the upstream, so it is not a sample.
                self._permit.sample(self._timeout)
            self._fail("timeout")
            raise _RetryableFailure(
                "timeout",
                UpstreamTimeout(
                    f"target {self._target.url} sent no response headers within {self._timeout:g} s",
                    upstream=self._pool.name,
                    target=self._target.url,
                ),
            ) from None
        except UpstreamHTTPError as exc:
            self._give_back_slot()
            raise self._map_error(exc) from None
        except BaseException:
            self._give_back_slot()
            raise

    async def __aexit__(self, *exc_info) -> None:
        # Back to the pool if the response was read whole, else closed.
        if self._response is not None:
            self._response.finish()
        self._give_back_slot()

    async def _take_slot(self, deadline: float) -> None:
        slots = self._pool.slots
        assert slots is not None, "UpstreamPool.start() was not called"
        if slots.locked():
            # All max_connections slots are taken: waiting counts against the header timeout.
            async with asyncio.timeout_at(deadline):
                await slots.acquire()
        else:
            await slots.acquire()
        self._holds_slot = True

    def _give_back_slot(self) -> None:
        if self._holds_slot:
            self._holds_slot = False
            assert self._pool.slots is not None
            self._pool.slots.release()

    def _fail(self, reason: str) -> None:
        self._pool.record_failure(self._target, reason)

    def _map_error(self, exc: UpstreamHTTPError) -> Exception:
        if self._request.body.error is not None:
            # The downstream body broke a limit while streaming; that is the error.
            return self._request.body.error
        where = dict(upstream=self._pool.name, target=self._target.url)
        if isinstance(exc, ConnectTimedOut):
            self._fail("connect timeout")
            error = UpstreamTimeout(f"connecting to target {self._target.url} timed out", **where)
            return _RetryableFailure("connect_failure", error)
        if isinstance(exc, ConnectFailed):
            self._fail("connect failure")
            error = UpstreamConnectFailed(f"cannot connect to target {self._target.url}: {exc}", **where)
            return _RetryableFailure("connect_failure", error)
        if isinstance(exc, ConnectionBroken):
            self._fail("reset")
            error = UpstreamFailed(f"target {self._target.url} closed the connection: {exc}", **where)
            return _RetryableFailure("reset", error)
        self._fail("error")
        return UpstreamFailed(f"request to target {self._target.url} failed: {exc}", **where)


async def _send_response(response: Response, request: ForwardRequest, send: Send) -> None:
    """Send the upstream response's head and stream its body downstream."""
    headers = request.response_headers(response.headers)
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    if request.method == "HEAD":
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return

    length = response.content_length
    if length is not None and length <= BUFFER_LIMIT:
        # A small body goes out in one message: one write downstream.
        try:
            body = response.body_if_complete()
            if body is None:
                body = await response.read_all()
        except UpstreamHTTPError as exc:
            raise _BodyAborted(f"upstream response body failed: {exc}") from None
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return

    try:
        while True:
            chunk = await response.read_chunk()
            if chunk is None:
                break
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except UpstreamHTTPError as exc:
        raise _BodyAborted(f"upstream response body failed: {exc}") from None
    await send({"type": "http.response.body", "body": b"", "more_body": False})


class _BodyAborted(UpstreamError):
    """The upstream body broke after the response head was sent; the connection must be cut."""

    status = 502
    kind = "upstream_body_aborted"
    title = "Upstream response body failed"
