"""Removing entries from L1: purges by URL, prefix and tag, and invalidation after unsafe methods.

A purge names a URL (`http://host/path?query` or `/path?query` for every
host), a prefix of paths (`/img/`, optionally with a host) or a tag. A hard
purge deletes the entries; a soft purge marks them stale (store flag
SOFT_PURGED, or the tag's soft purge time), so stale-while-revalidate still
serves them while they are revalidated. A URL purge removes every stored
variant of the URL: all Vary variants, all consumers, all key headers.

The master's cache service runs purges (`nexus.cache.service`); workers run
`invalidate_unsafe` after a non-error response to an unsafe method
(RFC 9111 section 4.4). With Redis, a worker also announces each URL it
invalidated through its ring (`InvalidationAnnouncer`), and the master
appends it to the purge stream, so other nodes drop the URL from their L1.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from nexus.cache.key import KeyRules, parse_key
from nexus.observability.access_log import INVALIDATE_KIND, push_with_text
from nexus.shm import _native
from nexus.shm.cache import CacheStore

__all__ = [
    "InvalidationAnnouncer",
    "L1Purger",
    "PurgeTarget",
    "check_purge_value",
    "invalidate_unsafe",
    "is_same_url",
    "parse_purge_url",
    "purge_url",
]

log = logging.getLogger("nexus.cache")

SOFT_PURGED = 1


@dataclass(frozen=True, slots=True)
class PurgeTarget:
    """A URL or a path prefix to purge; `host` None means every host."""

    path: str
    query: bytes
    host: str | None


def parse_purge_url(url: str) -> PurgeTarget:
    """Parse a purge URL or prefix: absolute (`http://host/path?q`) or a path (`/path?q`).

    Raises ValueError with the value and the expected forms.
    """
    if url.startswith("/"):
        path, _, query = url.partition("?")
        return PurgeTarget(path, query.encode("latin-1"), None)
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        # urlsplit rejects a broken bracketed IPv6 host, for one.
        raise ValueError(f"invalid purge URL {url!r}: {exc}; expected http://host/path or a path starting with /") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"invalid purge URL {url!r}: expected http://host/path or a path starting with /")
    return PurgeTarget(parts.path or "/", parts.query.encode("latin-1"), parts.netloc.lower())


def check_purge_value(kind: str, value: str) -> None:
    """Check a purge's URL, prefix or tag before it is applied anywhere.

    Raises ValueError naming the value (control characters escaped) and the
    expected form. Stored keys contain the request target as clients send
    it, which HTTP limits to visible ASCII (RFC 9112 section 3.2), so a URL
    with other characters could never match. The tag headers separate tags
    with spaces and commas.
    """
    label = "URL" if kind == "url" else kind
    if not value:
        expected = "a tag" if kind == "tag" else "a path starting with / or an http:// URL"
        raise ValueError(f"invalid purge {label}: it is empty; give {expected}")
    rejected = next((char for char in value if char.isspace() or not char.isprintable()), None)
    if kind != "tag" and rejected is None:
        rejected = next((char for char in value if not char.isascii()), None)
    if rejected is not None:
        if rejected.isspace():
            character_kind = "white space"
        elif rejected.isprintable():
            character_kind = "a non-ASCII character"
        else:
            character_kind = "a non-printable character"
        fix = (
            "a tag is one word of Surrogate-Key or Cache-Tag"
            if kind == "tag"
            else "percent-encode it as clients send it (%20 for a space)"
        )
        raise ValueError(f"invalid purge {label} {value!r}: it contains {character_kind} ({rejected!r}): {fix}")
    if kind == "tag" and "," in value:
        raise ValueError(f"invalid purge tag {value!r}: Surrogate-Key and Cache-Tag separate tags with commas")
    if kind != "tag":
        parse_purge_url(value)


class L1Purger:
    """Purges in one node's store; `rules` gives each cached route's key rules, by route name."""

    def __init__(self, store: CacheStore, rules: dict[str, KeyRules]) -> None:
        self.store = store
        self.rules = rules

    def url(self, target: PurgeTarget, soft: bool) -> int:
        """Purge every entry for this URL; return how many keys were purged."""

        def matches(path: str, query: bytes, host: str, route: str) -> bool:
            return is_same_url(path, query, host, route, target, self.rules)

        return self._purge(target.path.encode("latin-1"), matches, soft)

    def prefix(self, target: PurgeTarget, soft: bool) -> int:
        """Purge every entry whose path starts with the target's path (and on its host, if given)."""

        def matches(path: str, query: bytes, host: str, route: str) -> bool:
            return target.host is None or host == target.host

        return self._purge(target.path.encode("latin-1"), matches, soft)

    def tag(self, bucket: int, soft: bool, at_us: int | None = None) -> None:
        """Record a tag purge in the tag table: entries with the tag requested before now are purged."""
        self.store.state.purge_tag(bucket, soft, at_us or _native.realtime_us())

    def clear(self) -> None:
        """Remove every entry, for a node that cannot tell which entries were purged while it was away."""
        self.store.clear()
        self.store.state.bump_epoch()

    def _purge(self, prefix: bytes, matches: Callable[[str, bytes, str, str], bool], soft: bool) -> int:
        count = 0
        for key in self.store.keys(prefix):
            parsed = parse_key(key)
            if parsed is None or not matches(*parsed):
                continue
            try:
                done = self.store.set_flags(key, SOFT_PURGED) if soft else self.store.delete(key)
            except TimeoutError:
                log.warning("cache purge skipped a key: the store lock was busy for 2 ms")
                continue
            count += int(done)
        return count


def is_same_url(path: str, query: bytes, host: str, route: str, target: PurgeTarget, rules: dict[str, KeyRules]) -> bool:
    """Return whether a stored key's parts (`parse_key`) name the URL `target`, under its route's query rules."""
    if path != target.path or (target.host is not None and host != target.host):
        return False
    route_rules = rules.get(route)
    expected = route_rules.normalised_query(target.query) if route_rules is not None else target.query
    return query == expected


def invalidate_unsafe(layer, route_policy, scope, consumer, host: str | None, upstream_headers) -> None:
    """Invalidate the target URI and same-origin Location and Content-Location URIs (RFC 9111 section 4.4)."""
    raw_path = scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else scope["path"]
    targets = [PurgeTarget(path, scope.get("query_string", b""), (host or "").lower())]
    for name, value in upstream_headers:
        if name.lower() not in ("location", "content-location"):
            continue
        target = _same_origin(value, host)
        if target is not None:
            targets.append(target)
    purger = layer.purger
    for target in targets:
        purger.url(target, soft=False)
        if layer.l2 is not None:
            layer.l2.enqueue_delete(target)
        if layer.announcer is not None:
            layer.announcer.announce(target)


def purge_url(target: PurgeTarget) -> str:
    """Return the purge URL of `target`: `http://host/path?query`, or `/path?query` without a host."""
    query = "?" + target.query.decode("latin-1") if target.query else ""
    if target.host:
        return f"http://{target.host}{target.path}{query}"
    return f"{target.path}{query}"


class InvalidationAnnouncer:
    """A worker's producer of invalidation records: URLs it dropped after unsafe methods, for other nodes."""

    def __init__(self, ring) -> None:
        self._push = ring.push
        self.dropped = 0

    def announce(self, target: PurgeTarget) -> None:
        """Push `target`'s URL to the master; a full ring drops it (counted), and other nodes keep the entry until it expires."""
        url = purge_url(target).encode("latin-1", "replace")
        try:
            pushed = push_with_text(self._push, INVALIDATE_KIND, (), url)
        except ValueError:
            # A URL longer than a record can carry (14 KiB): too long for a
            # request line anyway, and the local purge has been done.
            pushed = False
        if not pushed:
            self.dropped += 1
            # Logged once per 1000 drops, because a full ring stays full for a while.
            if self.dropped % 1000 == 1:
                log.warning(
                    "cache invalidation not announced to other nodes url=%.200s dropped=%d: the ring is full or "
                    "the URL too long; other nodes keep the URL until it expires",
                    url,
                    self.dropped,
                )


def _same_origin(reference: str, host: str | None) -> PurgeTarget | None:
    """Resolve a Location or Content-Location value; return it if it is on the request's host."""
    reference = reference.strip()
    if reference.startswith("/") and not reference.startswith("//"):
        path, _, query = reference.partition("?")
        return PurgeTarget(path, query.encode("latin-1"), (host or "").lower())
    parts = urlsplit(reference)
    if parts.scheme in ("http", "https") and host is not None and parts.netloc.lower() == host.lower():
        return PurgeTarget(parts.path or "/", parts.query.encode("latin-1"), host.lower())
    return None
