"""Building the downstream response from a stored one, and the stored form of an upstream response.

Cache-Status values follow RFC 9211: the cache's name, then `hit` or
`fwd=<reason>`, and parameters such as `ttl`, `stored`, `fwd-status`,
`collapsed` and `detail`.
"""

from __future__ import annotations

import math

from nexus.cache.policy import parse_http_date
from nexus.headers import downstream_response_headers

__all__ = ["cache_status", "is_not_modified", "stored_headers", "not_modified_headers"]

CACHE_NAME = b"Nexus"

# Fields a 304 response carries (RFC 9110 section 15.4.5), besides those Nexus adds.
_NOT_MODIFIED_FIELDS = frozenset(
    {b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary", b"last-modified"}
)

# Fields of an upstream response that are not stored: Nexus sets them per
# response (Age, Cache-Status, Via, Content-Length) or they belong to one
# exchange only (RFC 9111 section 3.1: hop-by-hop fields are dropped by
# downstream_response_headers already).
_NOT_STORED = frozenset({b"age", b"cache-status", b"via", b"content-length", b"transfer-encoding"})

# Fields of a 304 that do not replace stored ones (RFC 9111 section 3.2).
_NOT_UPDATED = frozenset({b"content-length", b"content-encoding", b"content-type", b"content-range"})


def cache_status(result: bytes, ttl: float | None = None, *params: bytes) -> bytes:
    """Return a Cache-Status member such as `Nexus; hit; ttl=42` or `Nexus; fwd=miss; stored`."""
    parts = [CACHE_NAME, result]
    if ttl is not None:
        # Whole seconds, rounded down, so a response stale by 0.3 s shows ttl=-1.
        parts.append(b"ttl=%d" % math.floor(ttl))
    parts.extend(param for param in params if param)
    return b"; ".join(parts)


def stored_headers(
    upstream: list[tuple[str, str]], request_id_header: str, body_length: int | None
) -> list[tuple[bytes, bytes]]:
    """Return the downstream-ready header fields to store for an upstream response.

    Hop-by-hop fields go as on any proxied response. The request id, Via,
    Age and the framing fields go too, because each response gets its own;
    Content-Length is set to the stored body's length.
    """
    fields = downstream_response_headers(upstream, request_id_header, "", via="")
    rid = request_id_header.encode("latin-1")
    kept = [(name, value) for name, value in fields if name not in _NOT_STORED and name != rid]
    if body_length is not None:
        kept.append((b"content-length", b"%d" % body_length))
    return kept


def updated_headers(
    stored: list[tuple[bytes, bytes]], fresh: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """Merge the fields of a 304 into a stored response's fields (RFC 9111 section 3.2)."""
    replaced = {name for name, _ in fresh if name not in _NOT_UPDATED and name not in _NOT_STORED}
    merged = [(name, value) for name, value in stored if name not in replaced]
    merged.extend((name, value) for name, value in fresh if name in replaced)
    return merged


def not_modified_headers(stored: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in stored if name in _NOT_MODIFIED_FIELDS]


def is_not_modified(
    if_none_match: list[bytes], if_modified_since: bytes | None, etag: str | None, last_modified: str | None
) -> bool:
    """Evaluate a GET's conditions against a stored response (RFC 9110 sections 13.1.2, 13.1.3, 13.2.2).

    If-None-Match uses the weak comparison and takes precedence; then
    If-Modified-Since compares with Last-Modified.
    """
    if if_none_match:
        if etag is None:
            return False
        ours = _opaque(etag.encode("latin-1"))
        for value in if_none_match:
            for candidate in value.split(b","):
                candidate = candidate.strip()
                if candidate == b"*" or _opaque(candidate) == ours:
                    return True
        return False
    if if_modified_since is None or last_modified is None:
        return False
    since = parse_http_date(if_modified_since.decode("latin-1"))
    modified = parse_http_date(last_modified)
    return since is not None and modified is not None and modified <= since


def _opaque(tag: bytes) -> bytes:
    return tag[2:] if tag.startswith(b"W/") else tag
