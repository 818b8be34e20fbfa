"""The ASGI application each worker serves: the request pipeline.

For each downstream request, in order: read the forwarding headers, check
the body framing and the path, match a route, identify the consumer by its
API key where the route asks for one (`nexus.auth`), apply the rate limits
(`nexus.ratelimit`), check the declared body size, then forward to the
route's upstream (`nexus.proxy`). Every finished request is counted in the
worker's metric slots (`nexus.telemetry`). Any GatewayError
raised on the way becomes an `application/problem+json` response. An
unexpected exception becomes a 500 problem and is logged with its
traceback, so a bad request never takes the worker down.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from nexus.auth import ANONYMOUS, Authenticator, Identity
from nexus.body import BodySource, declared_length
from nexus.cache.layer import CacheLayer
from nexus.config import Config, Route
from nexus.errors import BadRequest, GatewayError, NoRoute, UpstreamOverloaded, problem_body
from nexus.headers import (
    ForwardingContext,
    TrustedProxies,
    downstream_response_headers,
    host_problem,
    upstream_request_headers,
)
from nexus.observability.access_log import AccessRecorder, Names
from nexus.observability.logs import tag_worker_logs
from nexus.proxy import ForwardRequest, forward
from nexus.ratelimit import RequestFacts, RouteLimiter
from nexus.routing import RouteTable, rewrite_path
from nexus.shm.metrics import MetricLayout
from nexus.shm.state import SharedState
from nexus.telemetry import NO_ROUTE, SERVED_FROM_CACHE, RequestMetrics
from nexus.upstream import UpstreamPool, target_slots

__all__ = ["Gateway"]

log = logging.getLogger("nexus.worker")

_PROBLEM_TYPE = (b"content-type", b"application/problem+json")


class Gateway:
    """The request pipeline of one worker, as an ASGI 3 application."""

    def __init__(self, config: Config, shared: SharedState, layout: MetricLayout, worker_id: int) -> None:
        self.config = config
        self.worker_id = worker_id
        self.routes = RouteTable(config.routes)
        slots = target_slots(config)
        self.pools = {
            name: UpstreamPool(name, spec, shared.health, slots[name], worker_id, shared.concurrency)
            for name, spec in config.upstreams.items()
        }
        self.auth = Authenticator(config)
        limiters = (RouteLimiter(route, config, shared.gcra, shared.quotas) for route in config.routes)
        self.limiters = {limiter.route: limiter for limiter in limiters if limiter.active}
        self.metrics = RequestMetrics(shared.metrics.for_worker(worker_id), layout, config)
        for pool in self.pools.values():
            pool.tries = self.metrics.tries(pool.name, [target.url for target in pool.targets])
        # Every finished request goes to the master through this worker's
        # ring, for usage and the access log (`nexus.observability`).
        self.access = None
        if config.usage or config.access_log.path is not None:
            self.access = AccessRecorder(shared.rings[worker_id], Names(config))
        # The response cache, for routes with a `cache` section (`nexus.cache`).
        self.cache = CacheLayer.for_gateway(config, shared.cache, self.metrics, shared.rings[worker_id])
        self.trusted = TrustedProxies(config.trusted_proxies)
        self.request_id_header = config.request_id_header.lower()
        self.request_id_header_bytes = self.request_id_header.encode("latin-1")
        self.draining = False
        self.requests_done = 0
        self._route_needs_headers = any(route.match.headers for route in config.routes)

    async def startup(self) -> None:
        tag_worker_logs(self.worker_id)
        for pool in self.pools.values():
            await pool.start()

    async def shutdown(self) -> None:
        for pool in self.pools.values():
            await pool.close()

    def begin_drain(self) -> None:
        """Ask downstreams to close keep-alive connections from now on."""
        self.draining = True

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        if scope["type"] != "http":
            return
        started_ns = time.monotonic_ns()
        exchange = _Exchange(send, started_ns)
        try:
            await self._handle(scope, receive, exchange)
        except GatewayError as error:
            await self._send_error(scope, exchange, error)
        except Exception:
            log.exception(
                "unhandled error worker=%d request_id=%s method=%s path=%s",
                self.worker_id,
                exchange.request_id,
                scope.get("method"),
                scope.get("path"),
            )
            error = GatewayError("the gateway failed while handling this request; see its error log")
            await self._send_error(scope, exchange, error)
        finally:
            self.requests_done += 1
            self._count(scope["method"], exchange, time.monotonic_ns() - started_ns)

    def _count(self, method: str, exchange: _Exchange, duration_ns: int) -> None:
        """Count a finished request in the metric slots and send its access record to the master."""
        self.metrics.request(exchange.route, method, exchange.status, duration_ns)
        # A response from the cache builds its headers as an upstream's
        # would, but no upstream was waited for.
        upstream_ns = None if exchange.cache in SERVED_FROM_CACHE else exchange.upstream_ns
        if upstream_ns is not None and exchange.target is not None:
            self.metrics.upstream_response(exchange.route, exchange.target, upstream_ns)
        if self.access is not None:
            self.access.record(
                time.time_ns() - duration_ns,
                duration_ns,
                method,
                exchange.status,
                exchange.route,
                exchange.consumer,
                exchange.target,
                exchange.bytes_sent,
                upstream_ns,
                exchange.cache,
                exchange.rate_limit,
                exchange.request_id,
                exchange.trace_id,
                exchange.request_id_is_trace,
            )

    async def _handle(self, scope: dict[str, Any], receive, exchange: _Exchange) -> None:
        """Run the pipeline for one request, recording its request id in `exchange`."""
        # Forwarding headers first, so every later error carries the request id.
        client = scope.get("client") or ("", 0)
        context = ForwardingContext(
            peer_ip=client[0],
            scheme=scope.get("scheme", "http"),
            trusted=self.trusted,
            request_id_header=self.request_id_header,
            trace_context=True,
        )
        forwarded = upstream_request_headers(scope["headers"], context)
        exchange.request_id = forwarded.request_id
        exchange.trace_id = forwarded.trace_id
        exchange.request_id_is_trace = forwarded.request_id_is_trace
        problem = host_problem(scope["headers"], scope.get("http_version", "1.1"))
        if problem is not None:
            raise BadRequest(problem)

        # Framing and path checks, before any routing decision depends on them.
        length = declared_length(scope["headers"])
        raw_path = _raw_path(scope)
        _check_path(raw_path)
        _check_path(scope["path"])

        # Routes match the path as sent, which is also what the upstream
        # receives, so a percent-encoded "/" cannot reach a route it does not
        # match on the wire.
        route = self._match(scope, forwarded.host, raw_path)
        exchange.route = route.name
        identity = ANONYMOUS
        headers = forwarded.headers
        query = scope.get("query_string", b"")
        if route.auth != "none":
            identity = self.auth.identify(scope["headers"], query, route.auth)
            exchange.consumer = identity.consumer
            headers = self.auth.upstream_headers(headers, identity)
        limit_headers = self._check_rate_limit(route, identity, forwarded.client_ip, scope["headers"], exchange)
        pool = self.pools[route.upstream]

        body = BodySource(receive, length, self.config.limits.max_body, self.config.limits.body_timeout)
        request = ForwardRequest(
            method=scope["method"],
            path_and_query=self._upstream_path(route, scope, raw_path),
            headers=headers,
            host=forwarded.host,
            body=body,
            hash_key=_hash_key(pool, scope, forwarded.client_ip),
            response_headers=exchange.response_headers_builder(self, forwarded.request_id, limit_headers),
            tier=identity.tier,
            priority=identity.priority,
            on_target=exchange.answered_by,
        )
        route_cache = self.cache.policy(route.name) if self.cache is not None else None
        if route_cache is not None:
            exchange.cache = await self.cache.handle(route_cache, scope, identity.consumer, pool, request, exchange.send)
            return
        await forward(pool, request, exchange.send)

    def _check_rate_limit(
        self,
        route: Route,
        identity: Identity,
        client_ip: str,
        headers: list[tuple[bytes, bytes]],
        exchange: _Exchange,
    ) -> list[tuple[bytes, bytes]]:
        """Apply the limits on this route; return the header fields to add, or raise RateLimited.

        The access record gets "denied" when a policy rejected the request,
        else the last result other than "allowed" (dry_run_denied,
        failed_open), else "allowed".
        """
        limiter = self.limiters.get(route.name)
        if limiter is None:
            return []
        try:
            verdict = limiter.check(RequestFacts(route.name, identity, client_ip, headers))
        except GatewayError as rejected:
            self.metrics.rate_limit(route.name, rejected.policy, "denied")
            exchange.rate_limit = "denied"
            raise
        summary = "allowed"
        for policy, result in verdict.outcomes:
            self.metrics.rate_limit(route.name, policy, result)
            if result != "allowed":
                summary = result
        exchange.rate_limit = summary
        return verdict.headers

    def _upstream_path(self, route: Route, scope: dict[str, Any], raw_path: str) -> str:
        path = rewrite_path(route, raw_path)
        query = scope.get("query_string", b"").decode("latin-1")
        if route.auth != "none":
            query = self.auth.upstream_query(query)
        return f"{path}?{query}" if query else path

    def _match(self, scope: dict[str, Any], host: str | None, path: str) -> Route:
        headers = _header_dict(scope["headers"]) if self._route_needs_headers else {}
        route = self.routes.match(host, path, scope["method"], headers)
        if route is None:
            raise NoRoute(f"no route matches {scope['method']} {host or '(no host)'}{path}")
        return route

    async def _send_error(self, scope: dict[str, Any], exchange: _Exchange, error: GatewayError) -> None:
        """Log a failed request and send its problem response, or cut the connection if too late."""
        request_id = exchange.request_id
        if error.target is not None:
            exchange.target = error.target
        # A shed request is the limiter doing its job, and a spike sheds
        # thousands; the limiter logs a summary itself.
        level = logging.WARNING if error.status >= 500 and not isinstance(error, UpstreamOverloaded) else logging.DEBUG
        log.log(
            level,
            "request failed worker=%d request_id=%s method=%s path=%s status=%d kind=%s upstream=%s target=%s detail=%s",
            self.worker_id,
            request_id,
            scope.get("method"),
            scope.get("path"),
            error.status,
            error.kind,
            error.upstream,
            error.target,
            error.detail,
        )
        if exchange.started:
            # The head is already out; cutting the connection is the only
            # honest way to tell the downstream the body is incomplete.
            raise ConnectionAbortedError(error.detail)
        body = problem_body(error, request_id)
        headers = [_PROBLEM_TYPE, (b"content-length", str(len(body)).encode()), *error.headers]
        if request_id:
            headers.append((self.request_id_header.encode(), request_id.encode()))
        if self.draining or error.status in (400, 408, 413):
            # After a framing error or an unread body the connection state is unknown.
            headers.append((b"connection", b"close"))
        await exchange.send({"type": "http.response.start", "status": error.status, "headers": headers})
        await exchange.send({"type": "http.response.body", "body": body if scope["method"] != "HEAD" else b""})


class _Exchange:
    """One request's progress: whether the response head was sent, and what its access record needs."""

    __slots__ = (
        "_send",
        "bytes_sent",
        "cache",
        "consumer",
        "rate_limit",
        "request_id",
        "request_id_is_trace",
        "route",
        "started",
        "started_ns",
        "status",
        "target",
        "trace_id",
        "upstream_ns",
    )

    def __init__(self, send, started_ns: int) -> None:
        self._send = send
        self.started = False
        self.started_ns = started_ns
        self.request_id: str | None = None
        self.route = NO_ROUTE
        # 500 until a response head is sent: a request that ends without one failed.
        self.status = 500
        self.bytes_sent = 0
        self.consumer: str | None = None
        self.target: str | None = None
        # Nanoseconds from the request's arrival to the upstream's response head.
        self.upstream_ns: int | None = None
        # A result of nexus.observability.access_log.CACHE_RESULTS, set by the cache.
        self.cache: str | None = None
        self.rate_limit: str | None = None
        self.trace_id = 0
        self.request_id_is_trace = False

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.status = message["status"]
        else:
            self.bytes_sent += len(message.get("body", b""))
        await self._send(message)

    def answered_by(self, target: str) -> None:
        self.target = target

    def response_headers_builder(self, gateway: Gateway, request_id: str, extra: list[tuple[bytes, bytes]]):
        def build(upstream_headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
            self.upstream_ns = time.monotonic_ns() - self.started_ns
            if upstream_headers:
                headers = downstream_response_headers(upstream_headers, gateway.request_id_header, request_id)
            else:
                # A stored response brings its own fields; only this hop's
                # are added. The request id is valid by construction
                # (nexus.headers), so it needs no check here.
                headers = [(b"via", b"1.1 nexus"), (gateway.request_id_header_bytes, request_id.encode("latin-1"))]
            headers.extend(extra)
            if gateway.draining:
                headers.append((b"connection", b"close"))
            return headers

        return build


def _check_path(path: str) -> None:
    """Reject paths with dot segments, which upstreams resolve differently (RFC 3986 section 5.2.4)."""
    if not path.startswith("/"):
        raise BadRequest(f"invalid request path {path!r}: must start with /")
    if "/." in path:
        for segment in path.split("/"):
            if segment in (".", ".."):
                raise BadRequest(f"invalid request path {path!r}: dot segments are not allowed")


def _raw_path(scope: dict[str, Any]) -> str:
    raw_path = scope.get("raw_path")
    return raw_path.decode("latin-1") if raw_path else scope["path"]


def _header_dict(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    result: dict[str, str] = {}
    for name, value in headers:
        result.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return result


def _hash_key(pool: UpstreamPool, scope: dict[str, Any], client_ip: str) -> bytes | None:
    """Return the consistent-hashing key the upstream's `hash_on` names, if any."""
    hash_on = pool.spec.hash_on
    if hash_on is None:
        return None
    if hash_on == "client_ip":
        return client_ip.encode()
    if hash_on == "path":
        return scope["path"].encode()
    kind, _, name = hash_on.partition(":")
    if kind == "header":
        header_name = name.lower().encode("latin-1")
        for header, value in scope["headers"]:
            if header == header_name:
                return value
        return None
    # Cookie names are case-sensitive (RFC 6265 section 4.1.1).
    return _cookie(scope["headers"], name.encode("latin-1"))


def _cookie(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for header, value in headers:
        if header != b"cookie":
            continue
        for pair in value.split(b";"):
            key, _, cookie_value = pair.strip().partition(b"=")
            if key == name:
                return cookie_value
    return None
