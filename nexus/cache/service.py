"""The master's cache service: purges from the admin API, and purges from other nodes through Redis.

`POST /cache/purge` takes `{"url": ...}`, `{"prefix": ...}` or `{"tag": ...}`
with an optional `"soft": true`, applies it to this node's L1 at once and,
with a `redis` section, to every other node:

1. A tag purge increments the tag's generation counter in Redis (hard or
   soft), which invalidates the tag's L2 entries for every node at once.
   URL and prefix purges delete the matching L2 keys (SCAN, MATCH).
2. The purge is appended to the Redis Stream `<prefix>:cache:purges`
   (XADD, MAXLEN ~ `cache.purge_stream_length`), with this node's id.
3. Every node's listener thread reads the stream (XREAD BLOCK from the last
   id it applied, which it keeps across disconnects) and applies other
   nodes' purges to its L1.

After a disconnect the listener resumes from its last id. If the stream
was trimmed past that id (XINFO STREAM: entries were trimmed and the oldest
one left is newer than that id), or the
stream is gone (a Redis restart without persistence), the node cannot tell
what it missed and clears its L1. L2 needs no catch-up: its tag purges are
generations, its URL purges deletions.

Workers announce the URLs they invalidated after unsafe methods through
their rings (`nexus.cache.invalidation.InvalidationAnnouncer`). The ring
drain hands them to `on_invalidation`, and a thread appends them to the
same stream in pipelined batches, so other nodes drop them from their L1.
The workers have already deleted them from L2.

`GET /cache/stats` returns the store's counters.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from nexus.cache.invalidation import L1Purger, PurgeTarget, check_purge_value, is_same_url, parse_purge_url
from nexus.cache.key import KeyRules, parse_key, tag_hash
from nexus.cache.l2 import l2_key_prefix, scan_pattern, tag_generation_keys
from nexus.config import Config
from nexus.config import Redis as RedisConfig
from nexus.routing import RouteTable
from nexus.services import AdminError

__all__ = ["CacheService"]

log = logging.getLogger("nexus.cache")

# XREAD BLOCK time, in milliseconds: bounds how long stop() waits.
_BLOCK_MS = 500
# Wait after a failed Redis call before reconnecting, in seconds.
_RECONNECT_S = 0.2
_FAILURES = (redis.RedisError, RedisClusterException, OSError)
# Invalidations waiting to be sent; past this many the oldest are dropped
# (and logged), and other nodes keep those URLs until they expire.
_ANNOUNCE_QUEUE = 10_000


class CacheService:
    """Purges and cross-node invalidation for one master."""

    name = "cache"

    def __init__(self, master) -> None:
        self._store = master.shared.cache
        self._node_id = master.node_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The id of the last stream entry applied; None until the listener
        # has read the stream once. After an upgrade the previous master's
        # id carries on, so purges sent during the handover are not missed.
        self.last_id: str | None = master.inherited.get(self.name, {}).get("last_id")
        self.applied = 0
        self.clears = 0
        self._publisher = None
        self._publish_lock = threading.Lock()
        self._announced: deque[str] = deque()
        self._announce_lock = threading.Lock()
        self._announce_ready = threading.Event()
        self._announcer: threading.Thread | None = None
        self.announced = 0
        self.announce_drops = 0
        self._configure(master.config)

    def _configure(self, config: Config) -> None:
        self.config = config
        rules = {
            route.name: KeyRules(route.name, route.cache.key)
            for route in config.routes
            if route.cache is not None and route.cache.enabled
        }
        self.purger = L1Purger(self._store, rules)
        self._redis_config = config.redis
        if config.redis is not None:
            self._stream = f"{config.redis.key_prefix}:cache:purges"
            self._l2_prefix = l2_key_prefix(config.redis.key_prefix)

    # Service protocol.

    def start(self) -> None:
        if self._redis_config is None:
            return
        self._thread = threading.Thread(target=self._listen, name="nexus-cache-purges", daemon=True)
        self._thread.start()
        self._announcer = threading.Thread(target=self._announce_loop, name="nexus-cache-invalidations", daemon=True)
        self._announcer.start()

    def stop(self) -> None:
        self._stop.set()
        self._announce_ready.set()
        if self._thread is not None:
            self._thread.join(_BLOCK_MS / 1000 * 4)
        if self._announcer is not None:
            self._announcer.join(self._redis_config.timeout * 4 if self._redis_config else 1.0)
            self._announcer = None
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None

    def handoff(self) -> dict[str, Any]:
        """Return the state the next master's cache service continues from on an upgrade."""
        return {"last_id": self.last_id}

    def reconfigure(self, config: Config) -> None:
        if config.redis == self._redis_config:
            self._configure(config)
            return
        # Another Redis (or Redis added or removed): purges must go through
        # the new one at once, or a purge made here would miss the L2 that
        # the new workers use. The listener is restarted on it; a stream
        # there is another stream, so reading starts from its current end.
        self.stop()
        with self._publish_lock:
            self._publisher = None
        self._stop = threading.Event()
        self._thread = None
        if not _same_stream(self._redis_config, config.redis):
            self.last_id = None
        self._configure(config)
        self.start()
        log.info("cache purges now use redis=%s", "on" if config.redis is not None else "off")

    def admin_routes(self) -> dict[tuple[str, str], Any]:
        return {("POST", "/cache/purge"): self.handle_purge, ("GET", "/cache/stats"): self.handle_stats}

    # Admin routes.

    def handle_stats(self, query: dict[str, str], body: Any) -> dict[str, Any]:
        stats = self._store.stats()
        stats["epoch"] = self._store.state.epoch
        stats["stream_last_id"] = self.last_id
        stats["stream_purges_applied"] = self.applied
        stats["stream_gap_clears"] = self.clears
        stats["invalidations_announced"] = self.announced
        stats["invalidations_dropped"] = self.announce_drops
        return stats

    def handle_purge(self, query: dict[str, str], body: Any) -> dict[str, Any]:
        kind, value, soft = _parse_purge_body(body)
        purged = self.apply(kind, value, soft)
        # A tag purge records a time in the tag table and counts nothing,
        # so it reports null rather than a misleading 0.
        result: dict[str, Any] = {
            "kind": kind,
            "value": value,
            "soft": soft,
            "purged_local": None if kind == "tag" else purged,
            "nodes": "local",
        }
        result.update(_purge_explanation(self.config, kind, value, purged))
        if self._redis_config is not None:
            try:
                self._publish(kind, value, soft)
            except _FAILURES as exc:
                log.warning("cache purge not sent to other nodes kind=%s value=%s error=%r", kind, value, exc)
                local = "purged on this node" if kind == "tag" else f"purged on this node ({purged} entries)"
                raise AdminError(
                    503,
                    f"{local}, but Redis failed, so other nodes and L2 still "
                    f"hold the entries: {exc}; retry the purge when Redis is back",
                ) from None
            result["nodes"] = "all"
        return result

    def on_invalidation(self, worker: int, _row: tuple[int, ...], text: bytes) -> None:
        """Queue a URL that a worker invalidated after an unsafe method, for the other nodes; runs in the ring drain."""
        if self._redis_config is None:
            return
        url = text.decode("latin-1")
        try:
            check_purge_value("url", url)
        except ValueError as exc:
            log.warning("ignoring an invalid cache invalidation from worker=%d: %s", worker, exc)
            return
        with self._announce_lock:
            if len(self._announced) >= _ANNOUNCE_QUEUE:
                self._announced.popleft()
                self.announce_drops += 1
                if self.announce_drops % 1000 == 1:
                    log.warning("cache invalidations dropped=%d: Redis is too slow or away; other nodes keep those URLs until they expire", self.announce_drops)
            self._announced.append(url)
        self._announce_ready.set()

    def apply(self, kind: str, value: str, soft: bool) -> int:
        """Apply one purge to this node's L1; return how many entries a URL or prefix purge removed."""
        if kind == "tag":
            self.purger.tag(self._store.state.tag_bucket(tag_hash(value)), soft)
            return 0
        target = parse_purge_url(value)
        if kind == "url":
            return self.purger.url(target, soft)
        return self.purger.prefix(target, soft)

    # Redis.

    def _client(self, timeout: float):
        config = self._redis_config
        assert config is not None
        options = {"socket_timeout": timeout, "socket_connect_timeout": config.timeout, "retry": Retry(NoBackoff(), 0)}
        if config.url is not None:
            return redis.Redis.from_url(config.url, **options)
        nodes = [ClusterNode(urlsplit(url).hostname, urlsplit(url).port or 6379) for url in config.cluster]
        return RedisCluster(startup_nodes=nodes, **options)

    def _publisher_client(self):
        """Return the client that writes to the stream, creating it if needed.

        One client is kept across purges (its pool is thread-safe), so a
        purge costs no connection set-up. After a failure, `_drop_publisher`
        makes the next call create a fresh one.
        """
        assert self._redis_config is not None
        with self._publish_lock:
            if self._publisher is None:
                self._publisher = self._client(self._redis_config.timeout * 4)
            return self._publisher

    def _drop_publisher(self, client) -> None:
        with self._publish_lock:
            if self._publisher is client:
                self._publisher = None
        client.close()

    def _publish(self, kind: str, value: str, soft: bool) -> None:
        assert self._redis_config is not None
        client = self._publisher_client()
        try:
            if kind == "tag":
                hard_key, soft_key = tag_generation_keys(self._redis_config.key_prefix, value)
                client.incr(soft_key if soft else hard_key)
            elif self.config.cache.l2:
                self._delete_l2(client, kind, value)
            fields = {"kind": kind, "value": value, "soft": "1" if soft else "0", "node": self._node_id}
            client.xadd(self._stream, fields, maxlen=self.config.cache.purge_stream_length, approximate=True)
        except _FAILURES:
            self._drop_publisher(client)
            raise

    def _announce_loop(self) -> None:
        """Send queued invalidations to the stream in batches until stop(), then once more."""
        while True:
            self._announce_ready.wait()
            self._announce_ready.clear()
            stopping = self._stop.is_set()
            with self._announce_lock:
                batch = list(self._announced)
                self._announced.clear()
            if batch and not self._send_invalidations(batch) and not stopping:
                with self._announce_lock:
                    self._announced.extendleft(reversed(batch))
                self._stop.wait(_RECONNECT_S)
                self._announce_ready.set()
            if stopping:
                return

    def _send_invalidations(self, urls: list[str]) -> bool:
        """Append one url event per URL to the stream in one pipeline; False if Redis failed."""
        client = self._publisher_client()
        try:
            pipe = client.pipeline(transaction=False)
            for url in urls:
                fields = {"kind": "url", "value": url, "soft": "0", "node": self._node_id}
                pipe.xadd(self._stream, fields, maxlen=self.config.cache.purge_stream_length, approximate=True)
            pipe.execute()
        except _FAILURES as exc:
            log.warning("cache invalidations not sent to other nodes count=%d error=%r; retrying", len(urls), exc)
            self._drop_publisher(client)
            return False
        self.announced += len(urls)
        return True

    def _delete_l2(self, client, kind: str, value: str) -> None:
        target = parse_purge_url(value)
        pattern = scan_pattern(self._l2_prefix, target.path)
        batch = [key for key in client.scan_iter(match=pattern, count=1000)]
        if kind == "url":
            batch = [key for key in batch if self._is_url_key(key, target)]
        if batch:
            client.delete(*batch)

    def _is_url_key(self, l2_key: bytes, target: PurgeTarget) -> bool:
        parsed = parse_key(l2_key[len(self._l2_prefix) :])
        return parsed is not None and is_same_url(*parsed, target, self.purger.rules)

    def _listen(self) -> None:
        """Apply other nodes' purges from the stream until stop(); reconnect after failures."""
        assert self._redis_config is not None
        connected = False
        while not self._stop.is_set():
            client = self._client(self._redis_config.timeout + _BLOCK_MS / 1000)
            try:
                self._catch_up(client)
                if not connected:
                    log.info("cache purge stream connected stream=%s last_id=%s", self._stream, self.last_id)
                    connected = True
                while not self._stop.is_set():
                    self._read_once(client)
            except _FAILURES as exc:
                if connected:
                    log.warning("cache purge stream lost stream=%s last_id=%s error=%r", self._stream, self.last_id, exc)
                connected = False
                self._stop.wait(_RECONNECT_S)
            finally:
                client.close()

    def _catch_up(self, client) -> None:
        """Find the place to read from: the last id applied, or the stream's end at the first start."""
        try:
            info = client.xinfo_stream(self._stream)
        except redis.ResponseError:
            info = None
        if self.last_id is None:
            self.last_id = _decode(info["last-generated-id"]) if info else "0-0"
            return
        if info is None:
            if self.last_id != "0-0":
                self._clear("the purge stream is gone (Redis restarted without its data?)")
                self.last_id = "0-0"
            return
        applied = _stream_id(self.last_id)
        last_generated = _decode(info.get("last-generated-id") or "0-0")
        if self.last_id != "0-0" and _stream_id(last_generated) < applied:
            # Ids only grow, so this is another stream: Redis came back from
            # an older copy of its data. Everything may have been missed.
            self._clear(f"the purge stream ends at {last_generated}, before the last purge applied ({self.last_id})")
            self.last_id = last_generated
            return
        # The oldest entry left is newer than the last one applied: MAXLEN
        # trimming removed what lay between, or the stream was created again
        # (Redis restarted without its data, and a purge or a write's
        # invalidation re-created it). Either way purges may be lost. When
        # the trimmed entries all came before the last one applied this
        # clears needlessly, which costs only hits.
        # A node that has applied nothing yet ("0-0") reads a new stream
        # from its start, so only trimming can have hidden purges from it.
        first = _decode(info.get("recorded-first-entry-id") or "0-0")
        trimmed = int(info.get("entries-added") or 0) > int(info.get("length") or 0)
        if int(info.get("length") or 0) > 0 and _stream_id(first) > applied and (trimmed or self.last_id != "0-0"):
            cause = "were trimmed from the stream" if trimmed else "may be lost: the stream was created again"
            self._clear(f"purges after {self.last_id} {cause} (oldest left: {first})")

    def _read_once(self, client) -> None:
        reply = client.xread({self._stream: self.last_id}, count=256, block=_BLOCK_MS)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self._apply_event(fields)
                self.last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id

    def _apply_event(self, fields: dict) -> None:
        decoded = {_decode(key): _decode(value) for key, value in fields.items()}
        if decoded.get("node") == self._node_id:
            return
        kind, value = decoded.get("kind"), decoded.get("value")
        if kind not in ("url", "prefix", "tag") or not value:
            log.warning("ignoring an invalid cache purge event fields=%r", decoded)
            return
        try:
            self.apply(kind, value, decoded.get("soft") == "1")
        except ValueError as exc:
            log.warning("ignoring an invalid cache purge event fields=%r error=%s", decoded, exc)
            return
        self.applied += 1

    def _clear(self, reason: str) -> None:
        # Logged after the clear, so the log line means the clear is done.
        self.purger.clear()
        self.clears += 1
        log.warning("cleared the cache of this node: %s", reason)


def _parse_purge_body(body: Any) -> tuple[str, str, bool]:
    """Return (kind, value, soft) from a purge request body, or raise AdminError 400."""
    if not isinstance(body, dict):
        raise AdminError(400, 'invalid purge request: expected a JSON object such as {"url": "/path"}')
    kinds = [kind for kind in ("url", "prefix", "tag") if kind in body]
    if len(kinds) != 1:
        raise AdminError(400, 'invalid purge request: give exactly one of "url", "prefix" or "tag"')
    kind = kinds[0]
    value = body[kind]
    if not isinstance(value, str):
        raise AdminError(400, f'invalid purge request: "{kind}" must be a string')
    soft = body.get("soft", False)
    if not isinstance(soft, bool):
        raise AdminError(400, 'invalid purge request: "soft" must be true or false')
    unknown = sorted(set(body) - {kind, "soft"})
    if unknown:
        raise AdminError(400, f"invalid purge request: unknown fields {', '.join(unknown)}")
    try:
        check_purge_value(kind, value)
    except ValueError as exc:
        raise AdminError(400, str(exc)) from None
    return kind, value, soft


def _purge_explanation(config: Config, kind: str, value: str, purged: int) -> dict[str, Any]:
    """Return the route a URL or prefix purge matched and notes on why it may have purged nothing."""
    if kind == "tag":
        return {
            "route": None,
            "notes": [
                "a tag purge has no count: it records the purge time for the tag, and each entry with the tag "
                "is treated as purged (dropped, or stale for a soft purge) when it is next requested"
            ],
        }
    target = parse_purge_url(value)
    # Routes are matched as for a GET without headers, so a route that
    # needs a method or header condition is not found here.
    route = RouteTable(config.routes).match(target.host, target.path, "GET", {})
    notes = []
    if purged > 0:
        # Entries were found, so route matching has nothing to explain.
        return {"route": route.name if route is not None else None, "notes": notes}
    if route is None and target.host is None:
        notes.append(
            f"no route without match.host matches GET {target.path}, so nothing is cached under it; "
            "give a full URL to purge on a route with match.host"
        )
    elif route is None:
        notes.append(f"no route matches GET {target.path} on host {target.host}, so nothing is cached under it")
    elif route.cache is None or not route.cache.enabled:
        reason = "has no cache section" if route.cache is None else "has cache.enabled: false"
        notes.append(f"route {route.name} matches {target.path} but {reason}, so it caches nothing")
    else:
        notes.append(_nothing_matched(kind, target))
    return {"route": route.name if route is not None else None, "notes": notes}


def _nothing_matched(kind: str, target: PurgeTarget) -> str:
    target_kind = "URL" if kind == "url" else "prefix"
    if target.host is None:
        return f"no entry on this node matched the {target_kind}: it is not cached here (other nodes purge their own)"
    return (
        f"no entry on this node matched the {target_kind} on host {target.host}: the host must equal the Host "
        "header of the cached requests, port included (requests to 127.0.0.1:18080 are purged with "
        "http://127.0.0.1:18080/...); a path without a host matches every host"
    )


def _decode(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _stream_id(value: str) -> tuple[int, int]:
    milliseconds, _, sequence = value.partition("-")
    return int(milliseconds or 0), int(sequence or 0)


def _same_stream(old: RedisConfig | None, new: RedisConfig | None) -> bool:
    """Return whether two redis sections name the same purge stream (other settings may differ)."""
    if old is None or new is None:
        return False
    return (old.url, old.cluster, old.key_prefix) == (new.url, new.cluster, new.key_prefix)
