"""The cache on the request path: look up, serve or forward, store (RFC 9111, shared cache).

`CacheLayer.handle` replaces the plain `forward` for a route with `cache`.
In order:

1. Unsafe methods are forwarded, and a non-error response invalidates the
   target URI and the same-origin Location and Content-Location URIs
   (section 4.4). Other methods than GET and HEAD are forwarded untouched.
2. The key is built (`nexus.cache.key`) and looked up in L1, following a
   Vary index record to the secondary key (section 4.1).
3. A stored response that is fresh and that the request directives accept
   is a hit: it is sent with Age (section 5.1), and a conditional request
   gets 304. A stale one is served while it is within stale-while-
   revalidate, and revalidated in the background once per key.
4. Otherwise the request goes forward: conditionally (If-None-Match,
   If-Modified-Since) when the stored response has validators, where a 304
   refreshes the stored headers (section 4.3.4), and after an upstream
   error the stale response may be sent instead (stale-if-error). A miss tries L2 and
   then coalesces with concurrent misses (`nexus.cache.coalesce`).
5. A storable response (section 3) is stored as it streams downstream.

Everything here runs in one worker's event loop; the shared state is the
store and its fill and tag tables.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from nexus.body import BodySource
from nexus.cache import policy
from nexus.cache.coalesce import Coalescer, Fill
from nexus.cache.entry import VARY_INDEX, StoredResponse, decode_meta, encode_meta
from nexus.cache.invalidation import SOFT_PURGED, InvalidationAnnouncer, L1Purger, invalidate_unsafe
from nexus.cache.capture import ResponseCapture
from nexus.cache.fields import (
    adding_status,
    conditional_headers,
    conditions,
    discard,
    no_body,
    replace_headers,
    request_fields,
    response_fields,
    without_conditions,
)
from nexus.cache.key import KeyRules, secondary_key, tag_hash, vary_values
from nexus.cache.response import (
    cache_status,
    is_not_modified,
    not_modified_headers,
    stored_headers,
    updated_headers,
)
from nexus.config import Config, Route
from nexus.config.model import RouteCache
from nexus.errors import GatewayError, UpstreamTimeout
from nexus.proxy import ForwardRequest, forward
from nexus.shm.cache import CacheStore, Entry

__all__ = ["CacheLayer", "RoutePolicy"]

log = logging.getLogger("nexus.cache")

# How long a response is kept after it turns stale, in seconds, unless
# stale-while-revalidate or stale-if-error is longer. It is kept so that a
# conditional request can validate it or a request's max-stale can accept it.
STALE_KEEP = 60.0

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


@dataclass(slots=True)
class RoutePolicy:
    """A route's `cache` section, prepared for the request path."""

    route: str
    rules: KeyRules
    statuses: frozenset[int]
    default_ttl: float | None
    max_ttl: float | None
    max_object: int
    stale_while_revalidate: float
    stale_if_error: float
    coalesce: bool
    coalesce_timeout: float

    @classmethod
    def build(cls, route: Route, cache: RouteCache, store_max_object: int) -> RoutePolicy:
        return cls(
            route=route.name,
            rules=KeyRules(route.name, cache.key),
            statuses=frozenset(cache.statuses),
            # Plain floats and ints: the config's unit types are not msgpack-encodable.
            default_ttl=None if cache.default_ttl is None else float(cache.default_ttl),
            max_ttl=None if cache.max_ttl is None else float(cache.max_ttl),
            max_object=int(cache.max_object or store_max_object),
            stale_while_revalidate=float(cache.stale_while_revalidate),
            stale_if_error=float(cache.stale_if_error),
            coalesce=cache.coalesce,
            coalesce_timeout=float(cache.coalesce_timeout),
        )


@dataclass(slots=True)
class _Context:
    """One request's cache facts."""

    policy: RoutePolicy
    method: str
    headers: list[tuple[bytes, bytes]]
    directives: policy.RequestDirectives
    primary: bytes
    key: bytes
    request_time: float
    request: ForwardRequest
    has_authorization: bool
    # The stored response found for this request, if any, and its body.
    stored: StoredResponse | None = None
    body: bytes = b""
    detail: list[bytes] = field(default_factory=list)
    # The CACHE_RESULTS name counted for this request.
    result: str | None = None


# Cache-Status of a response to a method the cache does not serve (RFC 9211 section 2.2.1).
_FWD_METHOD = cache_status(b"fwd=method")


class CacheLayer:
    """The cache of one worker's gateway."""

    def __init__(self, config: Config, store: CacheStore, metrics, l2=None, announcer=None) -> None:
        self.store = store
        self.state = store.state
        self.metrics = metrics
        self.l2 = l2
        # Sends URLs invalidated by unsafe methods to the other nodes (with Redis).
        self.announcer = announcer
        self.coalescer = Coalescer(store)
        self.request_id_header = config.request_id_header.lower()
        self.tag_headers = tuple(name.lower() for name in config.cache.tag_headers)
        self.policies = {
            route.name: RoutePolicy.build(route, route.cache, store.max_object_bytes)
            for route in config.routes
            if route.cache is not None and route.cache.enabled
        }
        self.purger = L1Purger(store, {name: route_policy.rules for name, route_policy in self.policies.items()})
        self._background: set[asyncio.Task] = set()

    @classmethod
    def for_gateway(cls, config: Config, store: CacheStore, metrics, ring=None) -> CacheLayer | None:
        """Return the layer for a worker's gateway, or None when no route has an enabled cache.

        `ring` is the worker's event ring, which carries invalidations to the
        master when there is Redis to send them on.
        """
        if not any(route.cache is not None and route.cache.enabled for route in config.routes):
            return None
        l2 = None
        if config.cache.l2 and config.redis is not None:
            from nexus.cache.l2 import L2

            l2 = L2(config, metrics)
        announcer = None
        if config.redis is not None and ring is not None:
            announcer = InvalidationAnnouncer(ring)
        return cls(config, store, metrics, l2, announcer)

    def policy(self, route: str) -> RoutePolicy | None:
        return self.policies.get(route)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()

    # The request path.

    async def handle(
        self, route_policy: RoutePolicy, scope: dict[str, Any], consumer: str | None, pool, request, send
    ) -> str | None:
        """Serve one request on a cached route from the cache or through `forward`; return its cache result."""
        method = request.method
        if method not in ("GET", "HEAD"):
            await self._forward_other(route_policy, scope, consumer, pool, request, send)
            return "bypass"

        headers = scope["headers"]
        ctx = self._context(route_policy, scope, consumer, request, headers)
        entry = self._lookup(ctx)
        if entry is not None:
            await self._answer_stored(ctx, entry, pool, send)
        elif ctx.directives.only_if_cached:
            self.count(ctx, "miss")
            raise _OnlyIfCached("only-if-cached was requested and no stored response can be used")
        elif method == "HEAD" or ctx.directives.no_store:
            await self._forward_uncached(ctx, pool, send)
        else:
            await self._miss(ctx, pool, send)
        return ctx.result

    def _context(self, route_policy, scope, consumer, request: ForwardRequest, headers) -> _Context:
        cache_control, pragma, authorization = request_fields(headers)
        directives = policy.request_directives(cache_control, pragma) if cache_control or pragma else policy.PLAIN_REQUEST
        raw_path = scope.get("raw_path")
        path = raw_path.decode("latin-1") if raw_path else scope["path"]
        primary = route_policy.rules.primary(path, scope.get("query_string", b""), request.host, headers, consumer)
        return _Context(
            policy=route_policy,
            method=request.method,
            headers=headers,
            directives=directives,
            primary=primary,
            key=primary,
            request_time=time.time(),
            request=request,
            has_authorization=authorization,
        )

    def _lookup(self, ctx: _Context) -> Entry | None:
        """Find the stored response for the request in L1, following Vary; record why not in ctx.detail."""
        entry = self.store.get(ctx.primary)
        if entry is None:
            ctx.detail.append(b"fwd=uri-miss")
            return None
        meta = decode_meta(entry.meta)
        if meta.status == VARY_INDEX:
            ctx.key = secondary_key(ctx.primary, vary_values(meta.vary, ctx.headers))
            entry = self.store.get(ctx.key)
            if entry is None:
                ctx.detail.append(b"fwd=vary-miss")
                return None
            meta = decode_meta(entry.meta)
        if self._tag_purged(meta):
            ctx.detail.append(b"fwd=miss")
            return None
        ctx.stored = meta
        ctx.body = entry.body
        return entry

    def _tag_purged(self, meta: StoredResponse) -> bool:
        """Return whether a hard purge of one of the entry's tags came after its request."""
        fetched_us = meta.request_time * 1e6
        for bucket in meta.tag_buckets:
            if self.state.tag_purged_at(bucket)[0] >= fetched_us:
                return True
        return False

    def _soft_purged(self, entry: Entry, meta: StoredResponse) -> bool:
        if entry.flags & SOFT_PURGED:
            return True
        fetched_us = meta.request_time * 1e6
        return any(self.state.tag_purged_at(bucket)[1] >= fetched_us for bucket in meta.tag_buckets)

    async def _answer_stored(self, ctx: _Context, entry: Entry, pool, send, from_l2: bool = False) -> None:
        """Serve, revalidate or replace the stored response found for the request (in L1, or just copied from L2)."""
        meta = ctx.stored
        assert meta is not None
        now = time.time()
        age = meta.age(now)
        remaining = meta.lifetime - age
        stale = remaining <= 0 or self._soft_purged(entry, meta)
        if stale and remaining > 0:
            remaining = 0.0
        directives = ctx.directives

        # Fresh, and the request accepts it (section 5.2.1).
        usable = not stale and not meta.flags & policy.MUST_VALIDATE
        if usable and not directives.is_plain:
            usable = not directives.no_cache and (directives.max_age is None or age <= directives.max_age)
            usable = usable and remaining >= directives.min_fresh
        if usable:
            if from_l2:
                self.count(ctx, "l2_hit")
                await self._send_stored(ctx, meta, ctx.body, send, cache_status(b"hit", remaining, b"detail=l2"))
                return
            self.count(ctx, "hit")
            await self._send_stored(ctx, meta, ctx.body, send, cache_status(b"hit", remaining))
            return

        # Stale but within stale-while-revalidate or the request's max-stale.
        if stale and not directives.no_cache:
            swr = meta.stale_while_revalidate or ctx.policy.stale_while_revalidate
            if policy.may_serve_stale(meta.flags, -remaining, directives, swr):
                self.count(ctx, "stale")
                if policy.may_serve_stale(meta.flags, -remaining, policy.PLAIN_REQUEST, swr):
                    # Within stale-while-revalidate, not only the request's max-stale.
                    self._revalidate_in_background(ctx, pool)
                await self._send_stored(ctx, meta, ctx.body, send, cache_status(b"hit", remaining, b"detail=stale"))
                return
        if directives.only_if_cached:
            self.count(ctx, "miss")
            raise _OnlyIfCached("only-if-cached was requested and the stored response is stale")

        reason = b"fwd=request" if not stale else b"fwd=stale"
        if ctx.method == "HEAD":
            ctx.detail = [reason]
            await self._forward_uncached(ctx, pool, send)
            return
        if not stale or directives.no_cache or not ctx.policy.coalesce:
            # The request's own directives require validation, which is not shared.
            await self._validate(ctx, pool, send, reason, remaining)
            return
        await self._validate_coalesced(ctx, pool, send, reason, remaining)

    async def _validate_coalesced(self, ctx: _Context, pool, send, reason: bytes, remaining: float) -> None:
        """Revalidate a stale entry once per key across the node; the others wait and serve the result."""
        fill = self.coalescer.try_lead(ctx.key)
        if fill is not None:
            try:
                await self._validate(ctx, pool, send, reason, remaining)
            finally:
                fill.finish()
            return
        if await self.coalescer.wait_done(ctx.key, ctx.policy.coalesce_timeout) and await self._serve_coalesced(ctx, send):
            return
        # The revalidation failed, stored nothing fresh, or took too long.
        await self._validate(ctx, pool, send, reason, remaining)

    async def _serve_coalesced(self, ctx: _Context, send) -> bool:
        """Serve the entry another request just stored or refreshed; return whether it was served.

        It is served when fresh, or when its response arrived after this
        request did. Such a response is as current as one this request would
        have fetched itself, even if a slow upstream made it stale on arrival.
        """
        ctx.detail = []
        entry = self._lookup(ctx)
        if entry is None or ctx.stored is None:
            return False
        meta = ctx.stored
        left = meta.lifetime - meta.age(time.time())
        answered_meanwhile = meta.response_time >= ctx.request_time
        if (left <= 0 and not answered_meanwhile) or meta.flags & policy.MUST_VALIDATE or self._soft_purged(entry, meta):
            return False
        self.count(ctx, "coalesced")
        await self._send_stored(ctx, meta, ctx.body, send, cache_status(b"hit", left, b"collapsed"))
        return True

    async def _send_stored(self, ctx: _Context, meta: StoredResponse, body: bytes, send, status: bytes) -> None:
        """Send a stored response with Age and Cache-Status, or a 304 when the request's conditions match it."""
        headers = list(meta.headers)
        headers.append((b"age", b"%d" % int(meta.age(time.time()))))
        headers.append((b"cache-status", status))
        extra = ctx.request.response_headers(())
        if_none_match, if_modified_since = conditions(ctx.headers)
        if (if_none_match or if_modified_since) and is_not_modified(
            if_none_match, if_modified_since, meta.etag, meta.last_modified
        ):
            headers = not_modified_headers(meta.headers)
            headers.append((b"age", b"%d" % int(meta.age(time.time()))))
            headers.append((b"cache-status", status))
            headers.extend(extra)
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        headers.extend(extra)
        await send({"type": "http.response.start", "status": meta.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if ctx.method == "HEAD" else body, "more_body": False})

    # Forwarding.

    async def _miss(self, ctx: _Context, pool, send) -> None:
        """Fetch a missing response: from L2, from a coalesced fill, or from the upstream."""
        if self.l2 is not None:
            records = await self.l2.lookup(ctx)
            if records and not self._tag_purged(records[-1][1]):
                # Into L1 first, then served by the same rules as an L1 entry:
                # an L2 copy may be stale, or the request may not accept it.
                self.fill_from_l2(ctx, records)
                entry = self._lookup(ctx)
                if entry is not None:
                    await self._answer_stored(ctx, entry, pool, send, from_l2=True)
                    return

        if not ctx.policy.coalesce:
            await self._fetch(ctx, pool, send)
            return
        fill = self.coalescer.try_lead(ctx.key)
        if fill is not None:
            try:
                await self._fetch(ctx, pool, send, fill)
            finally:
                fill.finish()
            return

        entry = await self.coalescer.wait(ctx.key, ctx.policy.coalesce_timeout)
        if entry is not None and await self._serve_coalesced(ctx, send):
            return
        # The fill stored nothing usable, or the wait timed out.
        ctx.detail = [b"fwd=miss"]
        await self._fetch(ctx, pool, send)

    async def _fetch(self, ctx: _Context, pool, send, fill: Fill | None = None) -> None:
        """Forward the request without conditions and store the response if it may be stored."""
        capture = ResponseCapture(self, ctx, send, ctx.detail[0] if ctx.detail else b"fwd=miss", fill=fill)
        request = replace_headers(ctx.request, without_conditions(ctx.request.headers), capture.build_headers)
        await forward(pool, request, capture.send)

    async def _forward_uncached(self, ctx: _Context, pool, send) -> None:
        """Forward a request whose response is not stored (HEAD on a miss, request no-store)."""
        self.count(ctx, "bypass" if ctx.directives.no_store else "miss")
        reason = ctx.detail[0] if ctx.detail else b"fwd=miss"
        detail = b"detail=no-store" if ctx.directives.no_store else b"detail=head"
        request = replace_headers(ctx.request, ctx.request.headers, adding_status(ctx.request.response_headers, cache_status(reason, None, detail)))
        await forward(pool, request, send)

    async def _validate(self, ctx: _Context, pool, send, reason: bytes, remaining: float) -> None:
        """Forward a conditional request for a stored response (section 4.3.1); serve it on 304."""
        meta = ctx.stored
        assert meta is not None
        capture = ResponseCapture(self, ctx, send, reason, validating=True)
        conditional = conditional_headers(ctx.request.headers, meta)
        request = replace_headers(ctx.request, conditional, capture.build_headers)
        try:
            await forward(pool, request, capture.send)
        except GatewayError as error:
            if capture.started or not self.may_serve_stale_on_error(ctx, meta, remaining):
                raise
            log.info("serving stale after upstream error route=%s kind=%s", ctx.policy.route, error.kind)
            capture.stale_on_error = error.status
        if capture.not_modified:
            refreshed = self._refresh(ctx, meta, capture)
            self.count(ctx, "revalidated")
            left = refreshed.lifetime - refreshed.age(time.time())
            await self._send_stored(ctx, refreshed, ctx.body, send, cache_status(reason, left, b"fwd-status=304"))
            return
        if capture.stale_on_error:
            self.count(ctx, "stale")
            status = cache_status(reason, remaining, b"fwd-status=%d" % capture.stale_on_error, b"detail=stale-if-error")
            await self._send_stored(ctx, meta, ctx.body, send, status)

    def may_serve_stale_on_error(self, ctx: _Context, meta: StoredResponse, remaining: float) -> bool:
        if ctx.directives.no_cache and remaining > 0:
            return False
        sie = meta.stale_if_error or ctx.policy.stale_if_error
        return policy.may_serve_stale(meta.flags, -remaining, ctx.directives, sie)

    def _revalidate_in_background(self, ctx: _Context, pool) -> None:
        """Start one background revalidation per key across the node (stale-while-revalidate)."""
        fill = self.coalescer.try_lead(ctx.key)
        if fill is None:
            return
        task = asyncio.get_running_loop().create_task(self._background_revalidation(ctx, pool, fill))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _background_revalidation(self, ctx: _Context, pool, fill: Fill) -> None:
        meta = ctx.stored
        assert meta is not None
        capture = ResponseCapture(self, ctx, discard, b"fwd=stale", validating=True)
        body = BodySource(no_body, 0, 0, 1.0)
        request = replace_headers(ctx.request, conditional_headers(ctx.request.headers, meta), capture.build_headers)
        request.body = body
        request.method = "GET"
        ctx.request_time = time.time()
        try:
            await forward(pool, request, capture.send)
            if capture.not_modified:
                self._refresh(ctx, meta, capture)
            self.count(ctx, "revalidated")
        except GatewayError as error:
            log.info("background revalidation failed route=%s kind=%s detail=%s", ctx.policy.route, error.kind, error.detail)
        except Exception:
            log.exception("background revalidation failed route=%s", ctx.policy.route)
        finally:
            fill.finish()

    async def _forward_other(self, route_policy: RoutePolicy, scope, consumer, pool, request, send) -> None:
        """Forward a method the cache does not serve; invalidate after a non-error unsafe response (section 4.4)."""
        if request.method in _SAFE_METHODS:
            self.metrics.cache(route_policy.route, "bypass")
            await forward(pool, replace_headers(request, request.headers, adding_status(request.response_headers, _FWD_METHOD)), send)
            return
        seen: dict[str, Any] = {}

        def build(upstream_headers):
            seen["headers"] = upstream_headers
            headers = request.response_headers(upstream_headers)
            headers.append((b"cache-status", _FWD_METHOD))
            return headers

        async def watch(message):
            # Invalidate before the response leaves, so the downstream's next request cannot see the old entry.
            if message["type"] == "http.response.start" and 200 <= message["status"] < 400:
                invalidate_unsafe(self, route_policy, scope, consumer, request.host, seen.get("headers") or [])
            await send(message)

        self.metrics.cache(route_policy.route, "bypass")
        await forward(pool, replace_headers(request, request.headers, build), watch)

    # Storing.

    def plan_store(self, ctx: _Context, status: int, upstream: list[tuple[str, str]]) -> tuple[StoredResponse | None, bytes]:
        """Decide whether a response may be stored; return its metadata (None if not) and the Cache-Status detail."""
        fields = response_fields(upstream, self.tag_headers)
        directives = policy.parse_cache_control(fields.cache_control)
        reason = policy.storable_reason(
            status,
            directives,
            ctx.directives,
            ctx.has_authorization,
            fields.expires is not None,
            ctx.policy.statuses,
            ctx.policy.default_ttl is not None,
        )
        if reason is None and "*" in fields.vary:
            reason = "vary-star"
        if reason is None and fields.set_cookie:
            reason = "set-cookie"
        if reason is not None:
            return None, b"detail=" + reason.encode()

        response_time = time.time()
        date = policy.parse_http_date(fields.date)
        freshness = policy.freshness_lifetime(
            status,
            directives,
            date,
            fields.expires,
            policy.parse_http_date(fields.last_modified),
            response_time,
            ctx.policy.default_ttl,
            ctx.policy.max_ttl,
        )
        meta = StoredResponse(
            status=status,
            headers=[],
            request_time=ctx.request_time,
            response_time=response_time,
            initial_age=policy.initial_age(fields.age, date, ctx.request_time, response_time),
            lifetime=freshness.lifetime,
            flags=policy.response_flags(directives),
            stale_while_revalidate=float(policy.delta_seconds(directives, "stale-while-revalidate") or 0),
            stale_if_error=float(policy.delta_seconds(directives, "stale-if-error") or 0),
            etag=fields.etag,
            last_modified=fields.last_modified,
            tags=fields.tags,
            tag_buckets=[self.state.tag_bucket(tag_hash(tag)) for tag in fields.tags],
            vary=fields.vary,
        )
        if self.retention(ctx.policy, meta) <= 0:
            return None, b"detail=stale-on-arrival"
        return meta, b"stored"

    def body_limit(self, ctx: _Context, upstream_headers: list[tuple[str, str]]) -> int:
        """Return the largest body of this response that L1 can store.

        The route's `max_object`, and the store's limit on key, metadata and
        body together, less the key and a generous estimate of the metadata
        (the header fields and about 512 bytes of fixed fields and Vary key).
        """
        meta_estimate = 512 + sum(len(name) + len(value) + 16 for name, value in upstream_headers)
        room = self.store.max_object_bytes - 2 * len(ctx.primary) - meta_estimate
        return max(0, min(ctx.policy.max_object, room))

    def retention(self, route_policy: RoutePolicy, meta: StoredResponse) -> float:
        """Return how long to keep an entry from now, in seconds: fresh time plus the stale windows."""
        keep = max(
            meta.stale_while_revalidate or route_policy.stale_while_revalidate,
            meta.stale_if_error or route_policy.stale_if_error,
            STALE_KEEP,
        )
        if meta.flags & policy.NO_STALE and meta.etag is None and meta.last_modified is None:
            # Never served stale and cannot be validated: useless once stale.
            keep = 0.0
        return meta.lifetime - meta.age(time.time()) + keep

    def store_response(self, ctx: _Context, meta: StoredResponse, body: bytes) -> bool:
        """Put a response in L1 (under its Vary secondary key when it has one) and queue it for L2."""
        key = ctx.primary
        ttl = self.retention(ctx.policy, meta)
        if meta.vary:
            index = StoredResponse(VARY_INDEX, [], meta.request_time, meta.response_time, 0.0, 0.0, vary=meta.vary)
            if not self.store.put(key, encode_meta(index), b"", int(ttl * 1e6)):
                return False
            key = secondary_key(ctx.primary, vary_values(meta.vary, ctx.headers))
            ctx.key = key
        encoded = encode_meta(meta)
        stored = self.store.put(key, encoded, body, int(ttl * 1e6))
        if stored and self.l2 is not None:
            self.l2.enqueue_store(ctx.policy.route, ctx.primary, key, meta, body, ttl)
        return stored

    def fill_from_l2(self, ctx: _Context, records: list[tuple[bytes, StoredResponse, bytes]]) -> None:
        """Put what L2 returned (a Vary index record, then the response) in L1."""
        for key, meta, body in records:
            ttl = self.retention(ctx.policy, meta) if meta.status != VARY_INDEX else self.retention(ctx.policy, records[-1][1])
            if ttl > 0:
                self.store.put(key, encode_meta(meta), body, int(ttl * 1e6))

    def _refresh(self, ctx: _Context, meta: StoredResponse, capture: ResponseCapture) -> StoredResponse:
        """Update a stored response with the fields of a 304 (section 4.3.4) and store it again."""
        fresh = stored_headers(capture.upstream_headers, self.request_id_header, None)
        merged_upstream = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in updated_headers(meta.headers, fresh)]
        planned, _ = self.plan_store(ctx, meta.status, merged_upstream)
        if planned is None:
            return meta
        planned.headers = stored_headers(merged_upstream, self.request_id_header, len(ctx.body))
        if planned.vary != meta.vary:
            planned.vary = meta.vary
        self.store_response(ctx, planned, ctx.body)
        return planned

    def count(self, ctx: _Context, result: str) -> None:
        if ctx.result is None:
            ctx.result = result
        self.metrics.cache(ctx.policy.route, result)


class _OnlyIfCached(UpstreamTimeout):
    """only-if-cached with nothing usable stored: 504 (RFC 9111 section 5.2.1.7)."""

    kind = "cache_only_if_cached"
    title = "No stored response for only-if-cached"
