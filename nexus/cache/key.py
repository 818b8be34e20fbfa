"""Cache keys: which parts of a request select a stored response.

A primary key is

    path [? normalised query] NUL host NUL route NUL [extra parts]

with the path as the downstream sent it, the query parameters the route's
`cache.key.query` keeps, sorted (so `?b=2&a=1` and `?a=1&b=2` share an
entry), the lowercased host, the route name, and the values of
`cache.key.headers` and the consumer name when the route asks for them.
The path comes first so that a purge by path prefix is one prefix scan of
the store. A response with Vary is stored under a secondary key: the
primary key, SOH, and a digest of the request's values of the Vary fields.
"""

from __future__ import annotations

from hashlib import blake2b

from nexus.config.model import CacheKey

__all__ = ["KeyRules", "normalise_query", "parse_key", "secondary_key", "tag_hash", "vary_values"]

SEPARATOR = b"\x00"
VARIANT = b"\x01"


class KeyRules:
    """A route's `cache.key`, prepared for building keys fast."""

    __slots__ = ("route", "query", "names", "headers", "consumer", "_route_part")

    def __init__(self, route: str, key: CacheKey) -> None:
        self.route = route
        self.query = key.query if isinstance(key.query, str) else "list"
        self.names = frozenset(key.query) if isinstance(key.query, list) else frozenset()
        self.headers = tuple(name.lower().encode("latin-1") for name in key.headers)
        self.consumer = key.consumer
        self._route_part = SEPARATOR + route.encode()

    def primary(self, path: str, query: bytes, host: str | None, headers, consumer: str | None) -> bytes:
        """Build the primary key for a request to this route."""
        normalised = self.normalised_query(query)
        parts = [path.encode("latin-1")]
        if normalised:
            parts.append(b"?" + normalised)
        parts.append(SEPARATOR + (host or "").lower().encode("latin-1") + self._route_part + SEPARATOR)
        for name in self.headers:
            parts.append(b",".join(value for field, value in headers if field == name) + SEPARATOR)
        if self.consumer:
            parts.append((consumer or "").encode())
        return b"".join(parts)

    def normalised_query(self, query: bytes) -> bytes:
        if self.query == "none" or not query:
            return b""
        return normalise_query(query, self.names if self.query == "list" else None)


def normalise_query(query: bytes, keep: frozenset[str] | None) -> bytes:
    """Sort the query's parameters by name; keep only `keep` names when given.

    The sort is stable, so values of a repeated name keep their order:
    `a=2&a=1` and `a=1&a=2` are different requests to an upstream that reads
    the first or the last value. Parameters are compared as sent
    (percent-encoded), and empty ones (`a&&b`) are dropped.
    """
    pairs = [pair for pair in query.split(b"&") if pair]
    if keep is not None:
        pairs = [pair for pair in pairs if pair.partition(b"=")[0].decode("latin-1") in keep]
    pairs.sort(key=_parameter_name)
    return b"&".join(pairs)


def _parameter_name(pair: bytes) -> bytes:
    return pair.partition(b"=")[0]


def parse_key(key: bytes) -> tuple[str, bytes, str, str] | None:
    """Split a stored key into (path, normalised query, host, route), or None for a foreign key."""
    parts = key.split(SEPARATOR, 3)
    if len(parts) < 3:
        return None
    path, _, query = parts[0].partition(b"?")
    return path.decode("latin-1"), query, parts[1].decode("latin-1"), parts[2].decode("latin-1", "replace")


def vary_values(names: list[str], headers: list[tuple[bytes, bytes]]) -> bytes:
    """Return the request's values of the Vary fields `names`, normalised (RFC 9111 section 4.1).

    Values of one field are joined with commas, and white space around
    list members is removed, so `a, b` and `a,b` select the same response.
    """
    parts = []
    for name in names:
        raw = name.encode("latin-1")
        values = [value for field, value in headers if field == raw]
        joined = b",".join(member.strip() for value in values for member in value.split(b","))
        parts.append(raw + b":" + joined)
    return b"\n".join(parts)


def tag_hash(tag: str) -> int:
    """Return the 64-bit hash of a tag, the same in every process and on every node."""
    return int.from_bytes(blake2b(tag.encode(), digest_size=8).digest(), "little")


def secondary_key(primary: bytes, values: bytes) -> bytes:
    return primary + VARIANT + blake2b(values, digest_size=12).digest()
