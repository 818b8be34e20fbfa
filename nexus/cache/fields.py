"""Header fields the cache reads from requests and responses, and the request variants it forwards."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from nexus.cache.entry import StoredResponse
from nexus.proxy import ForwardRequest

_CONDITIONAL_FIELDS = frozenset({"if-none-match", "if-modified-since", "if-match", "if-unmodified-since", "if-range"})


@dataclass(slots=True)
class ResponseFields:
    cache_control: list[str]
    date: str | None = None
    expires: str | None = None
    last_modified: str | None = None
    etag: str | None = None
    age: str | None = None
    vary: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    set_cookie: bool = False


def response_fields(upstream: list[tuple[str, str]], tag_headers: tuple[str, ...]) -> ResponseFields:
    fields = ResponseFields([])
    for name, value in upstream:
        name = name.lower()
        if name == "cache-control":
            fields.cache_control.append(value)
        elif name == "date":
            fields.date = value
        elif name == "expires":
            fields.expires = value
        elif name == "last-modified":
            fields.last_modified = value
        elif name == "etag":
            fields.etag = value
        elif name == "age":
            fields.age = value
        elif name == "vary":
            fields.vary.extend(part.strip().lower() for part in value.split(",") if part.strip())
        elif name == "set-cookie":
            fields.set_cookie = True
        elif name in tag_headers:
            # Surrogate-Key separates with spaces, Cache-Tag with commas.
            fields.tags.extend(tag for tag in value.replace(",", " ").split() if tag not in fields.tags)
    return fields


def request_fields(headers: list[tuple[bytes, bytes]]) -> tuple[list[str], list[str], bool]:
    cache_control: list[str] = []
    pragma: list[str] = []
    authorization = False
    for name, value in headers:
        if name == b"cache-control":
            cache_control.append(value.decode("latin-1"))
        elif name == b"pragma":
            pragma.append(value.decode("latin-1"))
        elif name == b"authorization":
            authorization = True
    return cache_control, pragma, authorization


def conditions(headers: list[tuple[bytes, bytes]]) -> tuple[list[bytes], bytes | None]:
    if_none_match: list[bytes] = []
    if_modified_since = None
    for name, value in headers:
        if name == b"if-none-match":
            if_none_match.append(value)
        elif name == b"if-modified-since":
            if_modified_since = value
    return if_none_match, if_modified_since


def without_conditions(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop the downstream's conditional fields, so the upstream sends a full response; the cache evaluates them itself."""
    return [(name, value) for name, value in headers if name.lower() not in _CONDITIONAL_FIELDS]


def conditional_headers(headers: list[tuple[str, str]], meta: StoredResponse) -> list[tuple[str, str]]:
    """Build the request fields of a validation request for `meta` (RFC 9111 section 4.3.1)."""
    result = without_conditions(headers)
    if meta.etag is not None:
        result.append(("if-none-match", meta.etag))
    if meta.last_modified is not None:
        result.append(("if-modified-since", meta.last_modified))
    return result


def replace_headers(request: ForwardRequest, headers, response_headers) -> ForwardRequest:
    return dataclasses.replace(request, headers=headers, response_headers=response_headers)


def adding_status(build, status: bytes):
    def build_with_status(upstream_headers):
        headers = build(upstream_headers)
        headers.append((b"cache-status", status))
        return headers

    return build_with_status


async def discard(message: dict) -> None:
    return None


async def no_body() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}
