"""L2: the cache's second tier in Redis (one server or a cluster), shared by every node.

An L1 miss reads L2 before going to the upstream, and an L2 hit is served
and put in L1, so a new node warms from the others. Stores go to L2 from a bounded queue
drained by one task per worker, so a response never waits for Redis; a
full queue drops the write and counts `l2_dropped`. A Redis failure or a
read slower than `redis.timeout` counts `l2_error`, turns L2 off in this
worker for `RETRY_AFTER_S` and the request goes upstream: Redis never fails
a request.

Keys: `<prefix>:cache:<L1 key>` holds the value of `nexus.cache.entry.encode_l2`
with a PX expiry of the entry's retention. Tag generations are counters
`<prefix>:{cachetags}:h:<tag>` (hard) and `:s:<tag>` (soft), one hash slot
for all of them so one MGET reads them in a cluster. An entry records the
generations of its tags when it is written, and a read that finds any of
them changed treats the entry as a miss, so a tag purge holds in L2 on
every node, also on nodes that missed the purge event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import urlsplit

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from nexus.cache.entry import VARY_INDEX, StoredResponse, decode_l2, decode_meta, encode_l2, encode_meta
from nexus.cache.key import secondary_key, vary_values
from nexus.config import Config

__all__ = ["L2", "l2_key_prefix", "tag_generation_keys"]

log = logging.getLogger("nexus.cache")

# After a failure, L2 is skipped for this long, in seconds, so a Redis
# outage costs each worker one timeout per interval, not one per request.
RETRY_AFTER_S = 1.0

_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)


def l2_key_prefix(key_prefix: str) -> bytes:
    return f"{key_prefix}:cache:".encode()


def tag_generation_keys(key_prefix: str, tag: str) -> tuple[str, str]:
    """Return the Redis keys of a tag's hard and soft generation counters."""
    base = f"{key_prefix}:{{cachetags}}"
    return f"{base}:h:{tag}", f"{base}:s:{tag}"


def make_async_client(config: Config):
    redis_config = config.redis
    assert redis_config is not None
    options = {
        "socket_timeout": redis_config.timeout,
        "socket_connect_timeout": redis_config.timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if redis_config.url is not None:
        return aioredis.Redis.from_url(redis_config.url, **options)
    nodes = [ClusterNode(urlsplit(url).hostname, urlsplit(url).port or 6379) for url in redis_config.cluster]
    return RedisCluster(startup_nodes=nodes, **options)


class L2:
    """One worker's L2 client: reads on L1 misses, queued background writes."""

    def __init__(self, config: Config, metrics) -> None:
        assert config.redis is not None
        self._key_prefix = config.redis.key_prefix
        self._prefix = l2_key_prefix(config.redis.key_prefix)
        self._timeout = config.redis.timeout
        self._queue_size = config.cache.l2_write_queue
        self._metrics = metrics
        self._client = make_async_client(config)
        self._queue: asyncio.Queue | None = None
        self._writer: asyncio.Task | None = None
        self._off_until = 0.0

    # Reads.

    async def lookup(self, ctx) -> list[tuple[bytes, StoredResponse, bytes]] | None:
        """Return the records to serve and put in L1 (a Vary index record, then the response), or None."""
        if time.monotonic() < self._off_until:
            return None
        started = time.time()
        try:
            async with asyncio.timeout(self._timeout):
                records = await self._read(ctx)
                if records and not await self._generations_match(records[-1][1]):
                    return None
        except _FAILURES as exc:
            self._fail(ctx.policy.route, "read", exc)
            return None
        except (ValueError, msgspec.DecodeError) as exc:
            log.warning("invalid L2 entry route=%s error=%s", ctx.policy.route, exc)
            return None
        if not records:
            return None
        # Tag purges applied on this node after the read started must still
        # hit the entry, so it counts as requested when the read started.
        for _, meta, _ in records:
            meta.request_time = started
        return records

    async def _read(self, ctx) -> list[tuple[bytes, StoredResponse, bytes]]:
        value = await self._client.get(self._prefix + ctx.primary)
        if value is None:
            return []
        meta_bytes, body = decode_l2(value)
        meta = decode_meta(meta_bytes)
        if meta.status != VARY_INDEX:
            return [(ctx.primary, meta, body)]
        key = secondary_key(ctx.primary, vary_values(meta.vary, ctx.headers))
        value = await self._client.get(self._prefix + key)
        if value is None:
            return []
        variant_bytes, body = decode_l2(value)
        ctx.key = key
        return [(ctx.primary, meta, b""), (key, decode_meta(variant_bytes), body)]

    async def _generations_match(self, meta: StoredResponse) -> bool:
        if not meta.tags:
            return True
        current = await self._client.mget(self._generation_keys(meta.tags))
        return [int(value or 0) for value in current] == meta.tag_generations

    def _generation_keys(self, tags: list[str]) -> list[str]:
        return [key for tag in tags for key in tag_generation_keys(self._key_prefix, tag)]

    # Writes.

    def enqueue_store(self, route: str, primary: bytes, key: bytes, meta: StoredResponse, body: bytes, ttl: float) -> None:
        """Queue an entry for L2 without waiting; a full queue drops it and counts l2_dropped."""
        self._enqueue(route, ("store", primary, key, meta, body, ttl))

    def enqueue_delete(self, target) -> None:
        """Queue the removal of a URL's entries (after an unsafe method)."""
        self._enqueue(None, ("delete", target))

    def _enqueue(self, route: str | None, item: tuple) -> None:
        if self._queue is None:
            self._queue = asyncio.Queue(self._queue_size)
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        try:
            self._queue.put_nowait((route, item))
        except asyncio.QueueFull:
            if route is not None:
                self._metrics.cache(route, "l2_dropped")

    async def _write_loop(self) -> None:
        assert self._queue is not None
        while True:
            route, item = await self._queue.get()
            if time.monotonic() < self._off_until:
                if route is not None:
                    self._metrics.cache(route, "l2_dropped")
                continue
            try:
                async with asyncio.timeout(self._timeout * 4):
                    if item[0] == "store":
                        await self._write(*item[1:])
                    else:
                        await self._delete(item[1])
            except _FAILURES as exc:
                self._fail(route, "write", exc)
            except Exception:
                log.exception("L2 write failed route=%s", route)

    async def _write(self, primary: bytes, key: bytes, meta: StoredResponse, body: bytes, ttl: float) -> None:
        if meta.tags:
            current = await self._client.mget(self._generation_keys(meta.tags))
            meta.tag_generations = [int(value or 0) for value in current]
        ttl_ms = max(int(ttl * 1000), 1)
        if key != primary:
            index = StoredResponse(VARY_INDEX, [], meta.request_time, meta.response_time, 0.0, 0.0, vary=meta.vary)
            await self._client.set(self._prefix + primary, encode_l2(encode_meta(index), b""), px=ttl_ms)
        await self._client.set(self._prefix + key, encode_l2(encode_meta(meta), body), px=ttl_ms)

    async def _delete(self, target) -> None:
        keys = [key async for key in self._client.scan_iter(match=scan_pattern(self._prefix, target.path), count=1000)]
        if keys:
            await self._client.delete(*keys)

    def _fail(self, route: str | None, operation: str, exc: BaseException) -> None:
        if time.monotonic() >= self._off_until:
            log.warning("L2 %s failed, skipping Redis for %gs route=%s error=%r", operation, RETRY_AFTER_S, route, exc)
        self._off_until = time.monotonic() + RETRY_AFTER_S
        if route is not None:
            self._metrics.cache(route, "l2_error")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
        await self._client.aclose()


def scan_pattern(prefix: bytes, path: str) -> bytes:
    """Return a SCAN MATCH pattern for the L2 keys of a path prefix, with glob characters escaped."""
    escaped = path.encode("latin-1")
    for char in (b"\\", b"*", b"?", b"[", b"]"):
        escaped = escaped.replace(char, b"\\" + char)
    return prefix + escaped + b"*"
