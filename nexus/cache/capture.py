"""Watching one forwarded response: Cache-Status, storing it as it streams, swallowing a 304 being validated."""

from __future__ import annotations

import logging
import time

from nexus.cache.entry import StoredResponse
from nexus.cache.response import cache_status, stored_headers

log = logging.getLogger("nexus.cache")

# Upstream statuses after which stale-if-error may send the stale response (RFC 5861 section 4).
ERROR_STATUSES = frozenset({500, 502, 503, 504})


class ResponseCapture:
    """Watches one forwarded response: adds Cache-Status, stores it if storable, swallows a 304 being validated."""

    def __init__(self, layer, ctx, send, reason: bytes, validating: bool = False, fill=None) -> None:
        self._layer = layer
        # The coalescing fill this response leads, ended early when it will
        # not be stored, so its waiters go upstream now instead of waiting.
        self._fill = fill
        self._ctx = ctx
        self._send = send
        self._reason = reason
        self._validating = validating
        self._build = ctx.request.response_headers
        self.upstream_headers: list[tuple[str, str]] = []
        self.started = False
        self.not_modified = False
        self.stale_on_error = 0
        self._swallow = False
        self._meta: StoredResponse | None = None
        self._parts: list[bytes] = []
        self._size = 0
        self._limit = 0

    def build_headers(self, upstream_headers) -> list[tuple[bytes, bytes]]:
        self.upstream_headers = list(upstream_headers)
        return self._build(upstream_headers)

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            await self._start(message)
            return
        if self._swallow:
            return
        await self._body(message)

    async def _start(self, message: dict) -> None:
        status = message["status"]
        ctx = self._ctx
        if self._validating and status == 304:
            self.not_modified = True
            self._swallow = True
            return
        if self._validating and status in ERROR_STATUSES and ctx.stored is not None:
            if self._layer.may_serve_stale_on_error(ctx, ctx.stored, ctx.stored.lifetime - ctx.stored.age(time.time())):
                self.stale_on_error = status
                self._swallow = True
                return
        meta, detail = self._layer.plan_store(ctx, status, self.upstream_headers)
        self._limit = self._layer.body_limit(ctx, self.upstream_headers)
        if meta is not None:
            meta, detail = self._fits(meta, detail)
        self._meta = meta
        if meta is None:
            result = "uncacheable"
            if self._fill is not None:
                self._fill.finish()
        else:
            result = "expired" if self._validating else "miss"
        self._layer.count(ctx, result)
        params = [detail, b"fwd-status=%d" % status] if self._validating else [detail]
        message["headers"].append((b"cache-status", cache_status(self._reason, None, *params)))
        self.started = True
        await self._send(message)

    def _fits(self, meta, detail: bytes):
        """Check a storable response's declared length against the limits; return (meta, detail) or (None, reason).

        Without a Content-Length the size is known only at the end, so the
        Cache-Status header, sent first, claims nothing: `stored` is left out.
        """
        length = None
        for name, value in self.upstream_headers:
            if name.lower() == "content-length":
                length = int(value) if value.strip().isdigit() else None
        if length is None:
            return meta, b""
        if length > self._limit:
            return None, b"detail=too-large"
        return meta, detail

    async def _body(self, message: dict) -> None:
        chunk = message.get("body", b"")
        if self._meta is not None and chunk:
            self._size += len(chunk)
            if self._size > self._limit:
                self._meta = None
                self._parts = []
            else:
                self._parts.append(chunk)
        if not message.get("more_body", False) and self._meta is not None:
            # Stored before the last chunk leaves, so the downstream's next request finds it.
            self._store()
        await self._send(message)

    def _store(self) -> None:
        assert self._meta is not None
        ctx = self._ctx
        body = b"".join(self._parts)
        self._meta.headers = stored_headers(self.upstream_headers, self._layer.request_id_header, len(body))
        if self._validating:
            ctx.body = body
        try:
            self._layer.store_response(ctx, self._meta, body)
        except Exception:
            # The response goes downstream anyway; a failed store only costs the next hit.
            log.exception("cache store failed route=%s", ctx.policy.route)
        self._meta = None
