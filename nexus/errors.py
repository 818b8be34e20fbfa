"""Errors the gateway returns to a downstream request, as RFC 9457 problems.

Each class fixes the HTTP status, the problem type and the short title, so a
handler raises the error and one place (`problem_body`) turns it into an
`application/problem+json` body. Errors are grouped by who is at fault:
DownstreamError for a bad request (4xx), UpstreamError for a failure reaching
or hearing from the upstream (5xx). The `kind` is a stable label for logs
and metrics.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "BadRequest",
    "BodyTimeout",
    "DownstreamError",
    "GatewayError",
    "NoHealthyTarget",
    "NoRoute",
    "PayloadTooLarge",
    "RateLimited",
    "Unauthorized",
    "UnsupportedTransferCoding",
    "UpstreamConnectFailed",
    "UpstreamError",
    "UpstreamFailed",
    "UpstreamOverloaded",
    "UpstreamTimeout",
    "problem_body",
]


class GatewayError(Exception):
    """An error returned to the downstream with `status` and a problem body."""

    status = 500
    kind = "internal_error"
    title = "Internal gateway error"

    # Extra response header fields, such as Retry-After on a 429.
    headers: tuple[tuple[bytes, bytes], ...] = ()
    # The rate-limit policy that rejected the request, named in the problem body.
    policy: str | None = None

    def __init__(self, detail: str, *, upstream: str | None = None, target: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.upstream = upstream
        self.target = target


class DownstreamError(GatewayError):
    """The downstream request cannot be served as sent."""

    status = 400
    kind = "bad_request"
    title = "Bad request"


class BadRequest(DownstreamError):
    pass


class NoRoute(DownstreamError):
    status = 404
    kind = "no_route"
    title = "No route matches the request"


class PayloadTooLarge(DownstreamError):
    status = 413
    kind = "payload_too_large"
    title = "Request body too large"


class BodyTimeout(DownstreamError):
    status = 408
    kind = "request_timeout"
    title = "Request body not received in time"


class Unauthorized(DownstreamError):
    status = 401
    kind = "unauthorized"
    title = "Missing or invalid API key"

    def __init__(self, detail: str, *, challenge: bytes) -> None:
        super().__init__(detail)
        # RFC 9110 section 11.6.1: a 401 carries WWW-Authenticate.
        self.headers = ((b"www-authenticate", challenge),)


class RateLimited(DownstreamError):
    status = 429
    kind = "rate_limited"
    title = "Too many requests"

    def __init__(self, detail: str, *, policy: str, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        super().__init__(detail)
        self.policy = policy
        self.headers = headers


class UnsupportedTransferCoding(DownstreamError):
    status = 501
    kind = "unsupported_transfer_coding"
    title = "Transfer coding not supported"


class UpstreamError(GatewayError):
    """The upstream could not be reached or sent no usable response."""

    status = 502
    kind = "upstream_failed"
    title = "Upstream request failed"


class UpstreamFailed(UpstreamError):
    pass


class UpstreamConnectFailed(UpstreamError):
    kind = "upstream_connect_failed"
    title = "Could not connect to the upstream"


class NoHealthyTarget(UpstreamError):
    status = 503
    kind = "no_healthy_target"
    title = "No healthy upstream target"


class UpstreamOverloaded(UpstreamError):
    """The upstream's concurrency limit is reached and the request waited its longest."""

    status = 503
    kind = "upstream_overloaded"
    title = "Upstream overloaded"

    def __init__(self, detail: str, *, upstream: str, retry_after: int) -> None:
        super().__init__(detail, upstream=upstream)
        self.headers = ((b"retry-after", str(retry_after).encode()),)


class UpstreamTimeout(UpstreamError):
    status = 504
    kind = "upstream_timeout"
    title = "Upstream did not respond in time"


class _Problem(msgspec.Struct, omit_defaults=True):
    type: str
    title: str
    status: int
    detail: str
    request_id: str | None = None
    upstream: str | None = None
    policy: str | None = None


_encoder = msgspec.json.Encoder()


def problem_body(error: GatewayError, request_id: str | None) -> bytes:
    """Encode `error` as an RFC 9457 problem document.

    The type is a URN that never changes between versions (RFC 9457 section
    3.1.1 allows any URI), so clients can switch on it without fetching it.
    """
    problem = _Problem(
        type=f"urn:nexus:problem:{error.kind}",
        title=error.title,
        status=error.status,
        detail=error.detail,
        request_id=request_id,
        upstream=error.upstream,
        policy=error.policy,
    )
    return _encoder.encode(problem)
