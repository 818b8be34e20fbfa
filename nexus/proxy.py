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

from pyreqwest.exceptions import ConnectError, ConnectTimeoutError, ReadError, RequestError, WriteError

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
from nexus.upstream import UpstreamPool

__all__ = ["ForwardRequest", "forward"]

log = logging.getLogger("nexus.proxy")

Send = Callable[[dict], Awaitable[None]]

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

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
    payload = await _prepare_body(request.body)
    replayable = payload is not None

    pool.in_flight += 1
    tried: set[int] = set()
    try:
        async with asyncio.timeout_at(asyncio.get_running_loop().time() + spec.timeouts.total):
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
    except TimeoutError:
        raise UpstreamTimeout(
            f"upstream {pool.name!r} did not complete within the total timeout of {spec.timeouts.total:g} s",
            upstream=pool.name,
        ) from None
    finally:
        pool.in_flight -= 1


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
    assert pool.client is not None
    builder = pool.client.request(request.method, target.url + request.path_and_query)
    builder = builder.headers(_with_host(request.headers, target, request.host))
    if payload is not None:
        if payload or request.method not in ("GET", "HEAD"):
            builder = builder.body_bytes(payload)
    else:
        builder = builder.body_stream(request.body.chunks())
    builder = builder.streamed_read_buffer_limit(BUFFER_LIMIT)

    target.in_flight += 1
    started = time.monotonic()
    try:
        header_timeout = min(pool.spec.timeouts.response_header, max(deadline - started, 0.0))
        async with _open_response(pool, target, builder, request, header_timeout, permit) as response:
            now = time.monotonic()
            target.record_latency(now - started, now)
            if permit is not None:
                permit.sample(now - started)
            status = response.status
            if may_retry_status and status in pool.spec.retries.on:
                pool.record_failure(target, f"status {status}")
                raise _RetryableFailure(status, None)
            _record_status(pool, target, status)
            await _send_response(response, request, send)
            return status
    finally:
        target.in_flight -= 1


def _with_host(headers: list[tuple[str, str]], target: TargetState, host: str | None) -> list[tuple[str, str]]:
    """Add the Host header: the downstream's, so virtual hosts upstream keep working."""
    if host is None:
        host = target.url.partition("://")[2]
    return [("host", host), *headers]


def _record_status(pool: UpstreamPool, target: TargetState, status: int) -> None:
    if status in _FAILURE_STATUSES:
        pool.record_failure(target, f"status {status}")
    else:
        pool.record_success(target)


class _open_response:
    """Async context: the upstream response, with errors mapped to tries' outcomes."""

    def __init__(
        self,
        pool: UpstreamPool,
        target: TargetState,
        builder,
        request: ForwardRequest,
        timeout: float,
        permit: Permit | None,
    ) -> None:
        self._pool = pool
        self._target = target
        self._stream = builder.build_streamed()
        self._request = request
        self._timeout = timeout
        self._permit = permit

    async def __aenter__(self):
        try:
            async with asyncio.timeout(self._timeout):
                return await self._stream.__aenter__()
        except TimeoutError:
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
        except RequestError as exc:
            raise self._map_error(exc) from None

    async def __aexit__(self, *exc_info) -> None:
        try:
            await self._stream.__aexit__(*exc_info)
        except RequestError:
            # Closing an upstream response that failed mid-body; the original
            # error is already on its way up.
            log.debug("error closing upstream response upstream=%s target=%s", self._pool.name, self._target.url)

    def _fail(self, reason: str) -> None:
        self._pool.record_failure(self._target, reason)

    def _map_error(self, exc: RequestError) -> Exception:
        if self._request.body.error is not None:
            # The downstream body broke a limit while streaming; that is the error.
            return self._request.body.error
        where = dict(upstream=self._pool.name, target=self._target.url)
        if isinstance(exc, ConnectTimeoutError):
            self._fail("connect timeout")
            error = UpstreamTimeout(f"connecting to target {self._target.url} timed out", **where)
            return _RetryableFailure("connect_failure", error)
        if isinstance(exc, ConnectError):
            self._fail("connect failure")
            error = UpstreamConnectFailed(f"cannot connect to target {self._target.url}: {_cause(exc)}", **where)
            return _RetryableFailure("connect_failure", error)
        if isinstance(exc, (ReadError, WriteError)):
            self._fail("reset")
            error = UpstreamFailed(f"target {self._target.url} closed the connection: {_cause(exc)}", **where)
            return _RetryableFailure("reset", error)
        self._fail("error")
        return UpstreamFailed(f"request to target {self._target.url} failed: {_cause(exc)}", **where)


def _cause(exc: RequestError) -> str:
    details = getattr(exc, "details", None) or {}
    causes = details.get("causes") or []
    if causes:
        return str(causes[-1].get("message", exc))
    return str(exc)


async def _send_response(response, request: ForwardRequest, send: Send) -> None:
    """Send the upstream response's head and stream its body downstream."""
    try:
        upstream_headers = list(response.headers.items())
    except ValueError as exc:
        # NOTE: pyreqwest 0.15 cannot read header values with non-ASCII
        # bytes, so such a response cannot be forwarded field by field.
        raise UpstreamFailed(f"upstream response has a header that is not ASCII: {exc}") from None
    headers = request.response_headers(upstream_headers)
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    if request.method == "HEAD":
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return

    length = response.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) <= BUFFER_LIMIT:
        # A small body goes out in one message: one write downstream.
        try:
            body = bytes(await response.bytes())
        except RequestError as exc:
            raise _BodyAborted(f"upstream response body failed: {_cause(exc)}") from None
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return

    reader = response.body_reader
    try:
        while True:
            chunk = await reader.read_chunk()
            if chunk is None:
                break
            await send({"type": "http.response.body", "body": bytes(chunk), "more_body": True})
    except RequestError as exc:
        raise _BodyAborted(f"upstream response body failed: {_cause(exc)}") from None
    await send({"type": "http.response.body", "body": b"", "more_body": False})


class _BodyAborted(UpstreamError):
    """The upstream body broke after the response head was sent; the connection must be cut."""

    status = 502
    kind = "upstream_body_aborted"
    title = "Upstream response body failed"
