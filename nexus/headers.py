"""Header rewriting for proxied requests and their responses.

This module contains the pure functions (no I/O) that turn the downstream request
headers into the upstream request headers and the upstream response headers
into the downstream response headers. They remove hop-by-hop fields, set the
X-Forwarded-* fields, append Via and carry the request id. The trust rules for
forwarding fields (which peers may set them) live here too.

Header bytes are decoded and encoded as latin-1, so every byte value survives
the round trip. Names are lower-cased on the way in, because ASGI and the
upstream client (`nexus.http1_client`) use lower-case names and the rules
below compare names as strings.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from nexus.observability.trace import TRACEPARENT, trace_context

__all__ = [
    "HOP_BY_HOP_FIELDS",
    "REQUEST_REWRITTEN_FIELDS",
    "ForwardingContext",
    "TrustedProxies",
    "UpstreamRequestHeaders",
    "downstream_response_headers",
    "is_token",
    "is_valid_request_id",
    "new_request_id",
    "resolve_client_ip",
    "upstream_request_headers",
]

# Hop-by-hop fields (RFC 9110 section 7.6.1): they describe one connection, so
# a proxy removes them in both directions, together with every field that a
# Connection line names.
HOP_BY_HOP_FIELDS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Received fields that the request rules read and then rewrite, instead of
# copying them through unchanged. The request id field is added per call.
REQUEST_REWRITTEN_FIELDS = frozenset(
    {"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "via"}
)
# traceparent is replaced when invalid (`nexus.observability.trace`).
_REQUEST_SPLIT = REQUEST_REWRITTEN_FIELDS | {TRACEPARENT}

# A field name is a token (RFC 9110 section 5.1 and the tchar set of section
# 5.6.2). Anything else could split into a second field on the other side.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

# Field values must not contain control characters other than horizontal tab
# (RFC 9110 section 5.5). CR, LF and NUL could smuggle a header, and
# upstreams may reject the other control characters.
_INVALID_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

# Checked field names, lower-cased, by the name as received. An empty string
# marks an invalid name. Names repeat across requests, so this saves a regex
# match per field. Names come from downstream and upstream input, so the
# cache is cleared when it reaches the limit, to keep memory flat.
_FIELD_NAMES: dict[bytes | str, str] = {}
_FIELD_NAMES_LIMIT = 1024

# 1 to 200 visible ASCII characters other than the comma (0x2C). Excluding the
# comma keeps a repeated request id field from joining into one valid value.
_REQUEST_ID = re.compile(r"[\x21-\x2b\x2d-\x7e]{1,200}")

# Addresses come from downstream input (peer addresses, X-Forwarded-For), so
# the trust cache is bounded to keep memory flat under many distinct inputs.
_TRUST_CACHE_SIZE = 4096

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """The networks of proxies whose forwarding fields Nexus believes.

    Each entry is an IPv4 or IPv6 address or CIDR. Host bits set in a CIDR are
    ignored, as in the config check of `trusted_proxies`. An empty list trusts
    no address.
    """

    __slots__ = ("_inspect", "_networks")

    def __init__(self, networks: Sequence[str]) -> None:
        if isinstance(networks, str):
            raise TypeError(f"networks must be a list of addresses or CIDRs, not the string {networks!r}")
        self._networks: tuple[_Network, ...] = tuple(_parse_network(network) for network in networks)

        # A closure over the tuple, not a bound method, so the cache holds no
        # reference back to self.
        parsed = self._networks

        def inspect(address: str) -> tuple[str | None, bool]:
            return _inspect_address(address, parsed)

        self._inspect: Callable[[str], tuple[str | None, bool]] = lru_cache(maxsize=_TRUST_CACHE_SIZE)(inspect)

    def is_trusted(self, address: str) -> bool:
        """Return whether `address` lies in one of the trusted networks.

        A malformed address is not trusted. Results are cached per address string.
        """
        if not self._networks:
            return False
        return self._inspect(address)[1]


# Not frozen: one is built per request, and a frozen dataclass's __init__
# costs about three times as much.
@dataclass(slots=True)
class ForwardingContext:
    """The downstream connection details that the request rules read, and this hop's Via entry."""

    peer_ip: str
    scheme: str
    trusted: TrustedProxies
    request_id_header: str
    via: str = "1.1 nexus"
    # Whether to pass a valid traceparent on and create one where it is missing or invalid.
    trace_context: bool = False


@dataclass(slots=True)
class UpstreamRequestHeaders:
    """The upstream request headers, plus the request id, client address, Host and trace id resolved while building them."""

    headers: list[tuple[str, str]]
    request_id: str
    client_ip: str
    host: str | None
    trace_id: int = 0
    # True when no valid request id arrived and the trace id became the request id.
    request_id_is_trace: bool = False


# A Host value: uri-host and an optional port (RFC 3986 section 3.2.2), that
# is an IP literal in brackets, or registered-name characters.
_HOST_VALUE = re.compile(r"(\[[0-9A-Fa-f:.vV]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(:[0-9]*)?")


def host_problem(downstream: list[tuple[bytes, bytes]], http_version: str) -> str | None:
    """Return why the request's Host fields are invalid (RFC 9112 section 3.2), or None if they are valid.

    An HTTP/1.1 request needs exactly one Host field with a valid value;
    HTTP/1.0 may leave it out, and HTTP/2 names its target in :authority.
    """
    values = [value for name, value in downstream if name == b"host"]
    # granian gives a request without Host an empty one, and an http URI
    # always has a host, so an empty value counts as missing.
    if not values or values == [b""]:
        if http_version == "1.1":
            return "HTTP/1.1 request without a Host header: send Host, such as Host: api.example.com"
        return None
    if len(values) > 1:
        return f"request has {len(values)} Host header fields: send exactly one"
    text = values[0].decode("latin-1")
    if _HOST_VALUE.fullmatch(text) is None:
        return f"invalid Host header {text!r}: expected host[:port], such as api.example.com:8080"
    return None


def upstream_request_headers(downstream: list[tuple[bytes, bytes]], ctx: ForwardingContext) -> UpstreamRequestHeaders:
    """Build the upstream request headers from the downstream ASGI headers.

    End-to-end fields keep their arrival order. Host is left out, because the
    proxy sets the upstream Host itself. The first Host value is returned in
    `host`. The rewritten fields follow at the end: X-Forwarded-For,
    X-Forwarded-Proto, X-Forwarded-Host, Forwarded (only from a trusted peer),
    Via, the request id (kept if valid, else the trace id in hex, or a
    random id without trace context) and, with `ctx.trace_context`,
    traceparent (kept if valid, else a new one).
    """
    fields, connection_values = _decode_request_fields(downstream)
    kept, rewritten = _split_fields(fields, _REQUEST_SPLIT, ctx.request_id_header)
    if connection_values:
        # Host stays: the downstream cannot make the request lose its target.
        kept = _drop_connection_options(kept, rewritten, connection_values, keep="host")

    host_values = rewritten.get("host")
    host = host_values[0] if host_values else None
    trace_id = 0
    if ctx.trace_context:
        traceparent, trace_id = trace_context(rewritten.get(TRACEPARENT))
    request_id, request_id_is_trace = _choose_request_id(rewritten.get(ctx.request_id_header), trace_id)
    peer_trusted = ctx.trusted.is_trusted(ctx.peer_ip)

    added: list[tuple[str, str]] = []
    _append_forwarding_fields(added, rewritten, ctx, peer_trusted, host)
    via_values = rewritten.get("via")
    if ctx.via:
        added.append(("via", _join_list(via_values, ctx.via)))
    elif via_values:
        added.extend(("via", value) for value in via_values)
    added.append((ctx.request_id_header, request_id))
    if ctx.trace_context:
        added.append((TRACEPARENT, traceparent))
    elif TRACEPARENT in rewritten:
        added.extend((TRACEPARENT, value) for value in rewritten[TRACEPARENT])
    # The context values were not checked on the way in, so the added fields
    # pass the same checks as received ones.
    kept.extend(_check_str_fields(added)[0])

    # An untrusted peer's X-Forwarded-For was discarded, so only the peer counts.
    forwarded_for = rewritten.get("x-forwarded-for", []) if peer_trusted else []
    client_ip = resolve_client_ip(ctx.peer_ip, forwarded_for, ctx.trusted)
    return UpstreamRequestHeaders(kept, request_id, client_ip, host, trace_id, request_id_is_trace)


def downstream_response_headers(
    upstream: Iterable[tuple[str, str]],
    request_id_header: str,
    request_id: str,
    via: str = "1.1 nexus",
) -> list[tuple[bytes, bytes]]:
    """Build the downstream ASGI response headers from the upstream response headers.

    Hop-by-hop fields and invalid fields are dropped, and Server is kept. Via
    gets `via` appended unless `via` is empty. The request id field is
    replaced by `request_id`. No Date is added, because the HTTP server adds it.
    """
    # One pass that filters and sorts the fields (this runs for every
    # proxied response): kept ones, Via lines, Connection lines. The old
    # request id lines are dropped, since `request_id` replaces them.
    kept: list[tuple[str, str]] = []
    via_lines: list[str] = []
    connection_values: list[str] = []
    known_names = _FIELD_NAMES
    for raw_name, value in upstream:
        name = known_names.get(raw_name)
        if name is None:
            name = _check_field_name(raw_name, raw_name)
        if not name or not (value.isprintable() or _INVALID_VALUE.search(value) is None):
            continue
        if name in HOP_BY_HOP_FIELDS:
            if name == "connection":
                connection_values.append(value)
        elif name == "via":
            via_lines.append(value)
        elif name != request_id_header:
            kept.append((name, value))
    rewritten = {"via": via_lines} if via_lines else {}
    if connection_values:
        kept = _drop_connection_options(kept, rewritten, connection_values)

    added: list[tuple[str, str]] = []
    via_values = rewritten.get("via")
    if via:
        added.append(("via", _join_list(via_values, via)))
    elif via_values:
        added.extend(("via", value) for value in via_values)
    added.append((request_id_header, request_id))
    # The arguments were not checked on the way in, so the added fields pass
    # the same checks as received ones.
    kept.extend(_check_str_fields(added)[0])
    return _encode_fields(kept)


def resolve_client_ip(peer_ip: str, forwarded_for: list[str], trusted: TrustedProxies) -> str:
    """Return the address of the original downstream client.

    `forwarded_for` contains the X-Forwarded-For values in arrival order, each
    possibly a comma-separated list. Walking X-Forwarded-For + [peer] from the
    right, the first address that is not trusted is the client. If all are
    trusted, the left-most is. A malformed entry ends the walk and is ignored,
    so the result is then the trusted address to its right. Valid addresses
    come back in canonical form, with IPv4-mapped IPv6 addresses unmapped. A
    malformed peer address comes back unchanged.
    """
    peer_address, peer_trusted = trusted._inspect(peer_ip)
    if peer_address is None:
        return peer_ip
    if not peer_trusted:
        return peer_address

    client = peer_address
    for entry in reversed(_split_list(forwarded_for)):
        address, address_trusted = trusted._inspect(entry)
        if address is None:
            break
        client = address
        if not address_trusted:
            break
    return client


def is_valid_request_id(value: str) -> bool:
    """Return whether `value` is 1-200 visible ASCII characters with no comma."""
    return _REQUEST_ID.fullmatch(value) is not None


def new_request_id() -> str:
    """Create a request id: 32 lower-case hex characters from os.urandom."""
    return os.urandom(16).hex()


def _parse_network(network: str) -> _Network:
    try:
        return ipaddress.ip_network(network.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"invalid trusted proxy network {network!r}: expected an address or CIDR such as 10.0.0.0/8 or fd00::/8"
        ) from None


def _inspect_address(entry: str, networks: tuple[_Network, ...]) -> tuple[str | None, bool]:
    """Return the canonical form of an address entry (None if malformed) and whether it is trusted."""
    address = _parse_node(entry)
    if address is None:
        return None, False

    # A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d, which must
    # match IPv4 networks.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped

    trusted = any(address in network for network in networks)
    return str(address), trusted


def _parse_node(entry: str) -> _Address | None:
    """Parse an address as proxies write it: bare, `[IPv6]`, `[IPv6]:port` or `IPv4:port`.

    The bracket and port forms follow the node syntax of RFC 7239 section 6,
    and some proxies write them into X-Forwarded-For too.
    """
    text = entry.strip()
    if text.startswith("["):
        text, bracket, port = text[1:].partition("]")
        if not bracket or (port and not _is_port_suffix(port)):
            return None
    elif text.count(":") == 1:
        text, _, port = text.partition(":")
        if not _is_port_suffix(":" + port):
            return None

    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_port_suffix(text: str) -> bool:
    # node-port is 1 to 5 digits (RFC 7239 section 6).
    return 2 <= len(text) <= 6 and text[0] == ":" and text[1:].isascii() and text[1:].isdigit()


def _decode_request_fields(downstream: list[tuple[bytes, bytes]]) -> tuple[list[tuple[str, str]], list[str]]:
    """Decode the valid fields except hop-by-hop ones, and collect the Connection values."""
    # The proxy encodes the request head as latin-1 again, so a value with
    # bytes above 0x7F reaches the upstream byte for byte.
    return _filter_fields(downstream, decode=True)


def _check_str_fields(pairs: Iterable[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[str]]:
    """Keep the valid fields except hop-by-hop ones, and collect the Connection values."""
    return _filter_fields(pairs, decode=False)


def _filter_fields(pairs: Iterable[tuple[Any, Any]], decode: bool) -> tuple[list[tuple[str, str]], list[str]]:
    """Drop invalid and hop-by-hop fields; `decode` turns latin-1 bytes into str first."""
    fields: list[tuple[str, str]] = []
    connection_values: list[str] = []
    known_names = _FIELD_NAMES
    for raw_name, raw_value in pairs:
        name = known_names.get(raw_name)
        if name is None:
            name = _check_field_name(raw_name, raw_name.decode("latin-1") if decode else raw_name)
        value = raw_value.decode("latin-1") if decode else raw_value
        # isprintable() is a fast pass for the common case. It is also false
        # for tab and for latin-1 characters from U+0080 up, which the regex
        # then allows. Inlined, because this loop runs for every field.
        if not name or not (value.isprintable() or _INVALID_VALUE.search(value) is None):
            continue

        if name in HOP_BY_HOP_FIELDS:
            if name == "connection":
                connection_values.append(value)
            continue
        fields.append((name, value))
    return fields, connection_values


def is_token(text: str) -> bool:
    """Return whether `text` is an HTTP token, as field names must be (RFC 9110 section 5.6.2)."""
    return _TOKEN.fullmatch(text) is not None


def _check_field_name(raw_name: bytes | str, name: str) -> str:
    """Return the lower-cased name, or "" if it is not a token, and cache the result."""
    checked = name.lower() if is_token(name) else ""
    if len(_FIELD_NAMES) >= _FIELD_NAMES_LIMIT:
        _FIELD_NAMES.clear()
    _FIELD_NAMES[raw_name] = checked
    return checked


def _split_fields(
    fields: list[tuple[str, str]], rewritten_names: frozenset[str], request_id_header: str
) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    """Separate the fields that pass through from those the rules rewrite, which are grouped by name."""
    kept: list[tuple[str, str]] = []
    rewritten: dict[str, list[str]] = {}
    for name, value in fields:
        if name in rewritten_names or name == request_id_header:
            values = rewritten.get(name)
            if values is None:
                rewritten[name] = [value]
            else:
                values.append(value)
        else:
            kept.append((name, value))
    return kept, rewritten


def _drop_connection_options(
    kept: list[tuple[str, str]],
    rewritten: dict[str, list[str]],
    connection_values: list[str],
    keep: str | None = None,
) -> list[tuple[str, str]]:
    """Remove the fields that the Connection lines name (RFC 9110 section 7.6.1).

    Options are comma-separated and case-insensitive, and several Connection
    lines form one list. Fields added later by the proxy are not affected.
    """
    options = {option.strip().lower() for option in _split_list(connection_values)}
    options.discard(keep)

    # The usual options (close, keep-alive) name no field that is still here.
    options.difference_update(HOP_BY_HOP_FIELDS)
    options.discard("close")
    if not options:
        return kept

    for option in options:
        rewritten.pop(option, None)
    return [field for field in kept if field[0] not in options]


def _append_forwarding_fields(
    fields: list[tuple[str, str]],
    rewritten: dict[str, list[str]],
    ctx: ForwardingContext,
    peer_trusted: bool,
    host: str | None,
) -> None:
    """Append X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host and Forwarded to `fields`.

    Only a trusted peer's forwarding fields are believed. From an untrusted
    peer they are discarded and X-Forwarded-* describe this hop alone.
    """
    if not peer_trusted:
        # An ASGI scope without a client (a Unix socket) gives an empty peer,
        # which would make an empty X-Forwarded-For.
        if ctx.peer_ip:
            fields.append(("x-forwarded-for", ctx.peer_ip))
        fields.append(("x-forwarded-proto", ctx.scheme))
        if host is not None:
            fields.append(("x-forwarded-host", host))
        return

    fields.append(("x-forwarded-for", _join_list(rewritten.get("x-forwarded-for"), ctx.peer_ip)))
    for value in rewritten.get("x-forwarded-proto") or (ctx.scheme,):
        fields.append(("x-forwarded-proto", value))

    host_values = rewritten.get("x-forwarded-host") or ((host,) if host is not None else ())
    for value in host_values:
        fields.append(("x-forwarded-host", value))

    # Nexus adds no Forwarded entry of its own, so a trusted one passes as is.
    for value in rewritten.get("forwarded", ()):
        fields.append(("forwarded", value))


def _choose_request_id(values: list[str] | None, trace_id: int) -> tuple[str, bool]:
    """Return a valid downstream request id or a new one, and whether it is the trace id.

    Several lines join into one comma-separated value (RFC 9110 section
    5.3), which is never valid, so a repeated field gets a new id. A new id
    is the trace id in hex when there is one, so that logs and traces share
    one key and the access record needs no room for a second id.
    """
    if values is not None:
        value = ", ".join(values)
        if is_valid_request_id(value):
            return value, False
    if trace_id:
        return f"{trace_id:032x}", True
    return new_request_id(), False


def _split_list(values: Iterable[str]) -> list[str]:
    """Split comma-separated field values, skipping empty elements as RFC 9110 section 5.6.1 allows."""
    return [element for value in values for element in value.split(",") if element.strip()]


def _join_list(values: list[str] | None, entry: str) -> str:
    """Append `entry` to the lines of a comma-separated list field, as one line.

    Lines are joined whole, not split, so commas inside a Via comment stay as
    they are. Empty lines and stray commas at the ends of a line are dropped.
    """
    if not values:
        return entry
    lines = [stripped for line in values if (stripped := line.strip(" \t,"))]
    lines.append(entry)
    return ", ".join(lines)


def _encode_fields(fields: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    try:
        return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in fields]
    except UnicodeEncodeError:
        pass
    encoded: list[tuple[bytes, bytes]] = []
    for name, value in fields:
        try:
            encoded.append((name.encode("latin-1"), value.encode("latin-1")))
        except UnicodeEncodeError:
            # Characters above U+00FF have no single byte, so the field cannot
            # be sent as it was received and is dropped.
            continue
    return encoded
