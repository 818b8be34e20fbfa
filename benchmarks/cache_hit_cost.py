"""CPU cost of one cache hit in the request path, in one process, without sockets.

Times `CacheLayer.handle` answering a stored response (a 100-byte body
with 6 header fields) against a send function that does nothing, and the
bare store read of the same entry, so the difference is what the cache
layer adds to a hit: key building, meta decoding, freshness, headers.

Run from the repository root:

    .venv/bin/python benchmarks/cache_hit_cost.py
"""

from __future__ import annotations

import asyncio
import time

from nexus.cache.layer import CacheLayer
from nexus.config.loader import parse_config
from nexus.proxy import ForwardRequest
from nexus.shm.cache import CacheStore

CONFIG = """
upstreams:
  app: {targets: ["http://127.0.0.1:9"]}
routes:
  - {name: cached, upstream: app, cache: {}}
"""
ROUNDS = 200_000


class _Metrics:
    def cache(self, route: str, result: str) -> None:
        pass


async def _send(message: dict) -> None:
    pass


def _extra(upstream_headers):
    return [(b"via", b"1.1 nexus"), (b"x-request-id", b"0123456789abcdef")]


async def main() -> None:
    config = parse_config(CONFIG)
    store = CacheStore.create(16 << 20, 1024, 1 << 20)
    layer = CacheLayer(config, store, _Metrics())
    route_policy = layer.policy("cached")
    scope = {"path": "/item/1", "raw_path": b"/item/1", "query_string": b"", "headers": [(b"host", b"api"), (b"accept", b"*/*")]}
    request = ForwardRequest("GET", "/item/1", [], "api", None, None, _extra)

    # Store one response the way a miss would.
    ctx = layer._context(route_policy, scope, None, request, scope["headers"])
    upstream = [("content-type", "text/plain"), ("cache-control", "max-age=3600"), ("etag", '"abc"'),
                ("date", "Sat, 05 Dec 2026 00:00:00 GMT"), ("server", "origin"), ("x-app", "1")]  # fmt: skip
    meta, _ = layer.plan_store(ctx, 200, upstream)
    from nexus.cache.response import stored_headers

    meta.headers = stored_headers(upstream, "x-request-id", 100)
    layer.store_response(ctx, meta, b"x" * 100)

    started = time.perf_counter()
    for _ in range(ROUNDS):
        await layer.handle(route_policy, scope, None, None, request, _send)
    handle_us = (time.perf_counter() - started) / ROUNDS * 1e6

    key = ctx.primary
    started = time.perf_counter()
    for _ in range(ROUNDS):
        store.get(key)
    get_us = (time.perf_counter() - started) / ROUNDS * 1e6
    print(f"hit through CacheLayer.handle: {handle_us:.2f} us; store.get alone: {get_us:.2f} us; "
          f"layer cost: {handle_us - get_us:.2f} us")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
