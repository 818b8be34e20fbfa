"""Tests for nexus.headers: hop-by-hop removal, forwarding fields, Via and request ids."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexus.headers import (
    host_problem,
    ForwardingContext,
    TrustedProxies,
    UpstreamRequestHeaders,
    downstream_response_headers,
    is_valid_request_id,
    new_request_id,
    resolve_client_ip,
    upstream_request_headers,
)

HOP_BY_HOP = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-connection",
]

TRUSTED_NETWORKS = ["10.0.0.0/8", "192.168.1.7", "fd00::/8"]
TRUSTED_PEER = "10.1.2.3"
UNTRUSTED_PEER = "198.51.100.7"
REQUEST_ID = "req-0001"


def forward(
    headers: list[tuple[bytes, bytes]],
    peer: str = UNTRUSTED_PEER,
    networks: list[str] | None = None,
    scheme: str = "https",
    via: str = "1.1 nexus",
) -> UpstreamRequestHeaders:
    """Run upstream_request_headers with a context for `peer`."""
    trusted = TrustedProxies(TRUSTED_NETWORKS if networks is None else networks)
    ctx = ForwardingContext(peer_ip=peer, scheme=scheme, trusted=trusted, request_id_header="x-request-id", via=via)
    return upstream_request_headers(headers, ctx)


def respond(
    headers: list[tuple[str, str]], request_id: str = REQUEST_ID, via: str = "1.1 nexus"
) -> list[tuple[bytes, bytes]]:
    """Run downstream_response_headers with the "x-request-id" field."""
    return downstream_response_headers(headers, "x-request-id", request_id, via)


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [value for field, value in headers if field == name]


def response_values(headers: list[tuple[bytes, bytes]], name: str) -> list[bytes]:
    return [value for field, value in headers if field == name.encode()]


def request_names(headers: list[tuple[str, str]]) -> set[str]:
    return {name for name, _ in headers}


def response_names(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    return {name for name, _ in headers}


# --- Hop-by-hop fields ---------------------------------------------------------


@pytest.mark.parametrize("name", HOP_BY_HOP)
def test_request_hop_by_hop_removed(name: str) -> None:
    result = forward([(name.encode(), b"x-keep"), (b"x-keep", b"1")])
    assert name not in request_names(result.headers)
    assert values(result.headers, "x-keep") == (["1"] if name != "connection" else [])


@pytest.mark.parametrize("name", HOP_BY_HOP)
def test_response_hop_by_hop_removed(name: str) -> None:
    result = respond([(name, "close"), ("x-keep", "1")])
    assert name.encode() not in response_names(result)
    assert response_values(result, "x-keep") == [b"1"]


@pytest.mark.parametrize("name", ["Transfer-Encoding", "TE", "Keep-Alive", "Proxy-Authorization"])
def test_request_hop_by_hop_any_case_removed(name: str) -> None:
    result = forward([(name.encode(), b"chunked")])
    assert name.lower() not in request_names(result.headers)


@pytest.mark.parametrize("name", ["Transfer-Encoding", "UPGRADE", "Connection"])
def test_response_hop_by_hop_any_case_removed(name: str) -> None:
    result = respond([(name, "chunked")])
    assert name.lower().encode() not in response_names(result)


# Each case: the Connection lines, the other fields, and the names expected to remain.
CONNECTION_CASES = [
    pytest.param(["x-a"], ["x-a", "x-b"], {"x-b"}, id="one option"),
    pytest.param(["x-a, x-b"], ["x-a", "x-b", "x-c"], {"x-c"}, id="two options one line"),
    pytest.param(["x-a", "x-b"], ["x-a", "x-b", "x-c"], {"x-c"}, id="two lines"),
    pytest.param(["X-A ,  X-B"], ["x-a", "x-b", "x-c"], {"x-c"}, id="upper case and spaces"),
    pytest.param(["keep-alive, X-Trace"], ["x-trace", "x-c"], {"x-c"}, id="option with keep-alive"),
    pytest.param(["close"], ["x-a", "x-b"], {"x-a", "x-b"}, id="close names no field"),
    pytest.param([",, x-a ,"], ["x-a", "x-b"], {"x-b"}, id="empty list elements"),
    pytest.param(["cookie"], ["cookie", "cookie", "x-b"], {"x-b"}, id="repeated named field"),
]


@pytest.mark.parametrize(("connection", "names", "remaining"), CONNECTION_CASES)
def test_request_connection_options_removed(connection: list[str], names: list[str], remaining: set[str]) -> None:
    # Connection lines both before and after the fields they name.
    headers = [(b"connection", connection[0].encode())]
    headers += [(name.encode(), b"v") for name in names]
    headers += [(b"connection", line.encode()) for line in connection[1:]]
    result = forward(headers)
    end_to_end = request_names(result.headers) - {"x-forwarded-for", "x-forwarded-proto", "via", "x-request-id"}
    assert end_to_end == remaining


@pytest.mark.parametrize(("connection", "names", "remaining"), CONNECTION_CASES)
def test_response_connection_options_removed(connection: list[str], names: list[str], remaining: set[str]) -> None:
    headers = [(name, "v") for name in names] + [("connection", line) for line in connection]
    result = respond(headers)
    assert response_names(result) - {b"via", b"x-request-id"} == {name.encode() for name in remaining}


@pytest.mark.parametrize(
    ("peer", "expected_xff"),
    [
        (TRUSTED_PEER, TRUSTED_PEER),
        (UNTRUSTED_PEER, UNTRUSTED_PEER),
    ],
)
def test_connection_cannot_drop_added_xff(peer: str, expected_xff: str) -> None:
    # Naming X-Forwarded-For removes the received field, never the one Nexus adds.
    headers = [(b"connection", b"x-forwarded-for"), (b"x-forwarded-for", b"203.0.113.1")]
    result = forward(headers, peer=peer)
    assert values(result.headers, "x-forwarded-for") == [expected_xff]
    assert result.client_ip == peer


def test_connection_naming_host_keeps_host() -> None:
    result = forward([(b"host", b"api.example.com"), (b"connection", b"host")])
    assert result.host == "api.example.com"
    assert values(result.headers, "x-forwarded-host") == ["api.example.com"]


def test_connection_naming_request_id_replaces_it() -> None:
    result = forward([(b"x-request-id", b"abc"), (b"connection", b"x-request-id")])
    assert result.request_id != "abc"
    assert values(result.headers, "x-request-id") == [result.request_id]


def test_response_connection_naming_via_keeps_own_entry() -> None:
    result = respond([("via", "1.1 upstream-cache"), ("connection", "via")])
    assert response_values(result, "via") == [b"1.1 nexus"]


# --- End-to-end fields ---------------------------------------------------------


def test_request_repeated_fields_keep_order() -> None:
    headers = [
        (b"accept", b"text/html"),
        (b"x-tag", b"one"),
        (b"connection", b"keep-alive"),
        (b"accept", b"application/json"),
        (b"x-tag", b"two"),
        (b"accept", b"*/*"),
    ]
    result = forward(headers)
    assert values(result.headers, "accept") == ["text/html", "application/json", "*/*"]
    assert values(result.headers, "x-tag") == ["one", "two"]
    assert result.headers[:5] == [
        ("accept", "text/html"),
        ("x-tag", "one"),
        ("accept", "application/json"),
        ("x-tag", "two"),
        ("accept", "*/*"),
    ]


def test_response_repeated_fields_keep_order() -> None:
    headers = [
        ("set-cookie", "a=1"),
        ("vary", "accept"),
        ("set-cookie", "b=2"),
        ("transfer-encoding", "chunked"),
        ("set-cookie", "c=3"),
    ]
    result = respond(headers)
    assert result[:4] == [
        (b"set-cookie", b"a=1"),
        (b"vary", b"accept"),
        (b"set-cookie", b"b=2"),
        (b"set-cookie", b"c=3"),
    ]


def test_request_names_lower_cased() -> None:
    result = forward([(b"X-Custom", b"1")])
    assert values(result.headers, "x-custom") == ["1"]


def test_request_bytes_decoded_as_latin1() -> None:
    result = forward([(b"x-name", b"caf\xe9 \xc3\xa9")])
    assert values(result.headers, "x-name") == ["caf\xe9 \xc3\xa9"]


def test_response_str_encoded_as_latin1() -> None:
    result = respond([("x-name", "caf\xe9")])
    assert response_values(result, "x-name") == [b"caf\xe9"]


def test_response_value_above_latin1_dropped() -> None:
    result = respond([("x-name", "euro \u20ac"), ("x-keep", "1")])
    assert response_values(result, "x-name") == []
    assert response_values(result, "x-keep") == [b"1"]


def test_response_server_kept_and_no_date_added() -> None:
    result = respond([("server", "gunicorn"), ("content-type", "text/plain")])
    assert response_values(result, "server") == [b"gunicorn"]
    assert response_values(result, "date") == []


def test_response_accepts_any_iterable() -> None:
    result = downstream_response_headers(iter([("x-a", "1")]), "x-request-id", REQUEST_ID)
    assert result == [(b"x-a", b"1"), (b"via", b"1.1 nexus"), (b"x-request-id", REQUEST_ID.encode())]


# --- Host ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected_host"),
    [
        ([(b"host", b"api.example.com")], "api.example.com"),
        ([(b"host", b"[2001:db8::1]:8443")], "[2001:db8::1]:8443"),
        ([], None),
    ],
)
def test_host_returned_not_forwarded(headers: list[tuple[bytes, bytes]], expected_host: str | None) -> None:
    result = forward(headers)
    assert result.host == expected_host
    assert "host" not in request_names(result.headers)


# --- X-Forwarded-For -----------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "networks", "xff_lines", "expected"),
    [
        pytest.param(TRUSTED_PEER, TRUSTED_NETWORKS, [], TRUSTED_PEER, id="trusted v4 no xff"),
        pytest.param(TRUSTED_PEER, TRUSTED_NETWORKS, ["203.0.113.1"], "203.0.113.1, 10.1.2.3", id="trusted v4"),
        pytest.param(
            TRUSTED_PEER,
            TRUSTED_NETWORKS,
            ["203.0.113.1, 10.9.9.9", "10.8.8.8"],
            "203.0.113.1, 10.9.9.9, 10.8.8.8, 10.1.2.3",
            id="trusted lines joined",
        ),
        pytest.param("192.168.1.7", TRUSTED_NETWORKS, ["203.0.113.1"], "203.0.113.1, 192.168.1.7", id="trusted exact"),
        pytest.param("192.168.1.8", TRUSTED_NETWORKS, ["203.0.113.1"], "192.168.1.8", id="beside exact address"),
        pytest.param("fd00::5", TRUSTED_NETWORKS, ["2001:db8::9"], "2001:db8::9, fd00::5", id="trusted v6 cidr"),
        pytest.param("2001:db8::7", TRUSTED_NETWORKS, ["fd00::1"], "2001:db8::7", id="untrusted v6"),
        pytest.param(UNTRUSTED_PEER, TRUSTED_NETWORKS, ["1.1.1.1"], UNTRUSTED_PEER, id="untrusted spoof dropped"),
        pytest.param(TRUSTED_PEER, [], ["1.1.1.1"], TRUSTED_PEER, id="empty list trusts nobody"),
        pytest.param(TRUSTED_PEER, ["10.1.2.0/24"], ["1.1.1.1"], "1.1.1.1, 10.1.2.3", id="narrow cidr"),
        pytest.param(TRUSTED_PEER, ["10.1.3.0/24"], ["1.1.1.1"], TRUSTED_PEER, id="outside narrow cidr"),
        pytest.param("::ffff:10.1.2.3", TRUSTED_NETWORKS, ["1.1.1.1"], "1.1.1.1, ::ffff:10.1.2.3", id="mapped v4"),
        pytest.param(TRUSTED_PEER, TRUSTED_NETWORKS, ["", " 1.1.1.1 ,"], "1.1.1.1, 10.1.2.3", id="empty lines"),
        pytest.param("", TRUSTED_NETWORKS, ["1.1.1.1"], None, id="no peer address"),
    ],
)
def test_x_forwarded_for(peer: str, networks: list[str], xff_lines: list[str], expected: str | None) -> None:
    headers = [(b"x-forwarded-for", line.encode()) for line in xff_lines]
    result = forward(headers, peer=peer, networks=networks)
    assert values(result.headers, "x-forwarded-for") == ([] if expected is None else [expected])


# --- Client address resolution ---------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "expected"),
    [
        pytest.param(UNTRUSTED_PEER, ["203.0.113.1"], UNTRUSTED_PEER, id="untrusted peer is client"),
        pytest.param(TRUSTED_PEER, [], TRUSTED_PEER, id="trusted peer without xff"),
        pytest.param(TRUSTED_PEER, ["203.0.113.1"], "203.0.113.1", id="one hop"),
        pytest.param(TRUSTED_PEER, ["6.6.6.6, 203.0.113.1, 10.0.0.2"], "203.0.113.1", id="skip trusted hops"),
        pytest.param(TRUSTED_PEER, ["6.6.6.6", "203.0.113.1", "10.0.0.2"], "203.0.113.1", id="several lines"),
        pytest.param(TRUSTED_PEER, ["10.0.0.9, 10.0.0.2"], "10.0.0.9", id="all trusted gives left-most"),
        pytest.param(TRUSTED_PEER, ["garbage, 10.0.0.2"], "10.0.0.2", id="malformed stops walk"),
        pytest.param(TRUSTED_PEER, ["203.0.113.1, unknown"], TRUSTED_PEER, id="malformed next to peer"),
        pytest.param(TRUSTED_PEER, ["203.0.113.1, 999.1.1.1"], TRUSTED_PEER, id="out of range octet"),
        pytest.param(TRUSTED_PEER, ["203.0.113.1, 10.0.0.0/8"], TRUSTED_PEER, id="cidr is malformed"),
        pytest.param(TRUSTED_PEER, ["203.0.113.1,,  ,"], "203.0.113.1", id="empty elements skipped"),
        pytest.param(TRUSTED_PEER, [" 203.0.113.1 "], "203.0.113.1", id="spaces stripped"),
        pytest.param(TRUSTED_PEER, ["203.0.113.1:4711"], "203.0.113.1", id="v4 with port"),
        pytest.param(TRUSTED_PEER, ["[2001:db8::1]:4711"], "2001:db8::1", id="bracketed v6 with port"),
        pytest.param(TRUSTED_PEER, ["[2001:db8::1]"], "2001:db8::1", id="bracketed v6"),
        pytest.param(TRUSTED_PEER, ["[2001:db8::1"], TRUSTED_PEER, id="unclosed bracket"),
        pytest.param(TRUSTED_PEER, ["203.0.113.1:port"], TRUSTED_PEER, id="bad port"),
        pytest.param(TRUSTED_PEER, ["203.0.113.1:123456"], TRUSTED_PEER, id="port over five digits"),
        pytest.param(TRUSTED_PEER, ["203.0.113.1:"], TRUSTED_PEER, id="empty port"),
        pytest.param(TRUSTED_PEER, ["2001:DB8:0::1"], "2001:db8::1", id="v6 canonical form"),
        pytest.param("fd00::5", ["2001:db8::1, fd00::6"], "2001:db8::1", id="v6 trusted chain"),
        pytest.param("::ffff:10.1.2.3", ["203.0.113.1"], "203.0.113.1", id="mapped v4 peer trusted"),
        pytest.param("::ffff:198.51.100.7", [], UNTRUSTED_PEER, id="mapped v4 peer unmapped"),
        pytest.param("not-an-address", ["203.0.113.1"], "not-an-address", id="malformed peer"),
        pytest.param("", ["203.0.113.1"], "", id="empty peer"),
    ],
)
def test_resolve_client_ip(peer: str, forwarded_for: list[str], expected: str) -> None:
    assert resolve_client_ip(peer, forwarded_for, TrustedProxies(TRUSTED_NETWORKS)) == expected


@pytest.mark.parametrize(
    ("peer", "xff_lines", "expected"),
    [
        (TRUSTED_PEER, [b"203.0.113.1, 10.0.0.2"], "203.0.113.1"),
        (UNTRUSTED_PEER, [b"203.0.113.1"], UNTRUSTED_PEER),
        (TRUSTED_PEER, [], TRUSTED_PEER),
    ],
)
def test_request_client_ip(peer: str, xff_lines: list[bytes], expected: str) -> None:
    result = forward([(b"x-forwarded-for", line) for line in xff_lines], peer=peer)
    assert result.client_ip == expected


# --- X-Forwarded-Proto, X-Forwarded-Host, Forwarded ------------------------------


@pytest.mark.parametrize(
    ("peer", "headers", "expected_proto", "expected_host"),
    [
        pytest.param(
            TRUSTED_PEER,
            [(b"host", b"internal:8080"), (b"x-forwarded-proto", b"http"), (b"x-forwarded-host", b"www.example")],
            ["http"],
            ["www.example"],
            id="trusted kept",
        ),
        pytest.param(
            TRUSTED_PEER, [(b"host", b"internal:8080")], ["https"], ["internal:8080"], id="trusted absent set"
        ),
        pytest.param(
            UNTRUSTED_PEER,
            [(b"host", b"internal:8080"), (b"x-forwarded-proto", b"http"), (b"x-forwarded-host", b"evil.example")],
            ["https"],
            ["internal:8080"],
            id="untrusted replaced",
        ),
        pytest.param(UNTRUSTED_PEER, [(b"x-forwarded-host", b"evil.example")], ["https"], [], id="untrusted no host"),
        pytest.param(TRUSTED_PEER, [], ["https"], [], id="trusted no host"),
    ],
)
def test_x_forwarded_proto_and_host(
    peer: str, headers: list[tuple[bytes, bytes]], expected_proto: list[str], expected_host: list[str]
) -> None:
    result = forward(headers, peer=peer, scheme="https")
    assert values(result.headers, "x-forwarded-proto") == expected_proto
    assert values(result.headers, "x-forwarded-host") == expected_host


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        (TRUSTED_PEER, ["for=203.0.113.1;proto=https", 'for="[2001:db8::1]"']),
        (UNTRUSTED_PEER, []),
    ],
)
def test_forwarded_kept_only_from_trusted(peer: str, expected: list[str]) -> None:
    headers = [(b"forwarded", b"for=203.0.113.1;proto=https"), (b"forwarded", b'for="[2001:db8::1]"')]
    result = forward(headers, peer=peer)
    assert values(result.headers, "forwarded") == expected


def test_no_forwarded_added() -> None:
    result = forward([(b"host", b"api.example.com")], peer=TRUSTED_PEER)
    assert values(result.headers, "forwarded") == []


# --- Via -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("via_lines", "own_via", "expected"),
    [
        ([], "1.1 nexus", ["1.1 nexus"]),
        (["1.0 fred"], "1.1 nexus", ["1.0 fred, 1.1 nexus"]),
        (
            ["1.0 fred, 1.1 p.example (Apache/1.1)", "2 cdn"],
            "1.1 nexus",
            ["1.0 fred, 1.1 p.example (Apache/1.1), 2 cdn, 1.1 nexus"],
        ),
        (["1.1 a (comment, with comma)"], "1.1 gw", ["1.1 a (comment, with comma), 1.1 gw"]),
        (["1.0 fred"], "", ["1.0 fred"]),
        ([], "", []),
    ],
)
def test_request_via_appended(via_lines: list[str], own_via: str, expected: list[str]) -> None:
    result = forward([(b"via", line.encode()) for line in via_lines], via=own_via)
    assert values(result.headers, "via") == expected


@pytest.mark.parametrize(
    ("via_lines", "own_via", "expected"),
    [
        ([], "1.1 nexus", [b"1.1 nexus"]),
        (["1.1 backend"], "1.1 nexus", [b"1.1 backend, 1.1 nexus"]),
        (["1.1 a", "1.1 b"], "1.1 edge", [b"1.1 a, 1.1 b, 1.1 edge"]),
        (["1.1 a", "1.1 b"], "", [b"1.1 a", b"1.1 b"]),
        ([], "", []),
    ],
)
def test_response_via_appended(via_lines: list[str], own_via: str, expected: list[bytes]) -> None:
    result = respond([("via", line) for line in via_lines], via=own_via)
    assert response_values(result, "via") == expected


# --- Request id --------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["a", "abc-123", "0123456789abcdef0123456789abcdef", "x" * 200, "!#$%&'*+-./:;<=>?@[\\]^_`{|}~", '"quoted"'],
)
def test_valid_request_id_propagated(value: str) -> None:
    assert is_valid_request_id(value)
    result = forward([(b"x-request-id", value.encode())])
    assert result.request_id == value
    assert values(result.headers, "x-request-id") == [value]


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"x" * 201, id="too long"),
        pytest.param(b"has space", id="space"),
        pytest.param(b"a,b", id="comma"),
        pytest.param(b"tab\there", id="tab"),
        pytest.param(b"caf\xc3\xa9", id="non-ascii"),
        pytest.param(b"del\x7f", id="delete char"),
    ],
)
def test_invalid_request_id_replaced(raw: bytes) -> None:
    result = forward([(b"x-request-id", raw)])
    assert result.request_id != raw.decode("latin-1")
    assert re.fullmatch(r"[0-9a-f]{32}", result.request_id)
    assert values(result.headers, "x-request-id") == [result.request_id]


def test_repeated_request_id_replaced() -> None:
    result = forward([(b"x-request-id", b"one"), (b"x-request-id", b"two")])
    assert result.request_id not in ("one", "two")
    assert values(result.headers, "x-request-id") == [result.request_id]


def test_missing_request_id_created() -> None:
    result = forward([])
    assert re.fullmatch(r"[0-9a-f]{32}", result.request_id)
    assert values(result.headers, "x-request-id") == [result.request_id]


def test_missing_request_id_is_the_trace_id() -> None:
    ctx = ForwardingContext(UNTRUSTED_PEER, "http", TrustedProxies([]), request_id_header="x-request-id", trace_context=True)
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    result = upstream_request_headers([(b"traceparent", traceparent.encode())], ctx)
    assert result.request_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert result.request_id_is_trace
    assert values(result.headers, "traceparent") == [traceparent]

    created = upstream_request_headers([], ctx)
    assert created.request_id == f"{created.trace_id:032x}"
    assert created.request_id_is_trace
    assert values(created.headers, "traceparent")[0].split("-")[1] == created.request_id


def test_received_request_id_is_kept_beside_the_trace() -> None:
    ctx = ForwardingContext(UNTRUSTED_PEER, "http", TrustedProxies([]), request_id_header="x-request-id", trace_context=True)
    result = upstream_request_headers([(b"x-request-id", REQUEST_ID.encode())], ctx)
    assert result.request_id == REQUEST_ID
    assert not result.request_id_is_trace
    assert result.trace_id != 0


def test_request_id_header_name_from_context() -> None:
    ctx = ForwardingContext(UNTRUSTED_PEER, "http", TrustedProxies([]), request_id_header="x-correlation-id")
    result = upstream_request_headers([(b"x-correlation-id", b"corr-7"), (b"x-request-id", b"other")], ctx)
    assert result.request_id == "corr-7"
    assert values(result.headers, "x-correlation-id") == ["corr-7"]
    assert values(result.headers, "x-request-id") == ["other"]


@pytest.mark.parametrize(
    "upstream_ids",
    [[], ["upstream-id"], ["a", "b"], ["X-Request-Id-Case"]],
)
def test_response_carries_request_id(upstream_ids: list[str]) -> None:
    result = respond([("x-request-id", value) for value in upstream_ids] + [("X-Request-ID", "mixed")])
    assert response_values(result, "x-request-id") == [REQUEST_ID.encode()]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a", True),
        ("x" * 200, True),
        ("", False),
        ("x" * 201, False),
        (" lead", False),
        ("a,b", False),
        ("\u00e9", False),
        ("line\nbreak", False),
        ("nul\x00", False),
        ("x" * 199 + "\n", False),
    ],
)
def test_is_valid_request_id(value: str, expected: bool) -> None:
    assert is_valid_request_id(value) is expected


def test_new_request_id_format() -> None:
    first = new_request_id()
    second = new_request_id()
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert re.fullmatch(r"[0-9a-f]{32}", second)
    assert first != second


# --- Fields that could smuggle a header ----------------------------------------------

UNSAFE_BYTES = [b"\r", b"\n", b"\x00", b"\r\n", b"\x01", b"\x1f", b"\x7f"]


@pytest.mark.parametrize("unsafe", UNSAFE_BYTES)
def test_request_unsafe_value_dropped(unsafe: bytes) -> None:
    headers = [(b"x-a", b"one" + unsafe + b"x-injected: 1"), (b"x-keep", b"1")]
    result = forward(headers)
    assert values(result.headers, "x-a") == []
    assert values(result.headers, "x-keep") == ["1"]


UNSAFE_NAMES = [b"x-a" + char + b"b" for char in UNSAFE_BYTES + [b" ", b":", b"(", b"\xe9"]] + [b""]


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_request_unsafe_name_dropped(name: bytes) -> None:
    result = forward([(name, b"1"), (b"x-keep", b"1")])
    assert [name for name, _ in result.headers if name.startswith("x-a") or not name] == []
    assert values(result.headers, "x-keep") == ["1"]


@pytest.mark.parametrize("unsafe", [char.decode() for char in UNSAFE_BYTES])
def test_response_unsafe_value_dropped(unsafe: str) -> None:
    result = respond([("x-a", "one" + unsafe + "set-cookie: a=1"), ("x-keep", "1")])
    assert response_values(result, "x-a") == []
    assert response_values(result, "x-keep") == [b"1"]


@pytest.mark.parametrize("name", [name.decode("latin-1") for name in UNSAFE_NAMES])
def test_response_unsafe_name_dropped(name: str) -> None:
    result = respond([(name, "1"), ("x-keep", "1")])
    assert [name for name, _ in result if name.startswith(b"x-a") or not name] == []
    assert response_values(result, "x-keep") == [b"1"]


@pytest.mark.parametrize(
    "value",
    [b"tab\tinside", b"caf\xe9", b"\x80\xff", b"", b"  spaced  "],
)
def test_request_allowed_bytes_kept(value: bytes) -> None:
    result = forward([(b"x-a", value)])
    assert values(result.headers, "x-a") == [value.decode("latin-1")]


@pytest.mark.parametrize(
    "header",
    [b"host", b"x-forwarded-for", b"x-forwarded-host", b"via", b"x-request-id", b"forwarded"],
)
def test_unsafe_rewritten_field_dropped(header: bytes) -> None:
    result = forward([(header, b"a\r\nx-injected: 1")], peer=TRUSTED_PEER)
    assert all("\r" not in value and "\n" not in value for _, value in result.headers)
    assert "x-injected" not in request_names(result.headers)
    assert result.host is None


@pytest.mark.parametrize("request_id", ["id\r\nset-cookie: a=1", "id\x00"])
def test_response_unsafe_request_id_dropped(request_id: str) -> None:
    result = respond([("x-keep", "1")], request_id=request_id)
    assert response_values(result, "x-request-id") == []
    assert response_values(result, "x-keep") == [b"1"]


@pytest.mark.parametrize("via", ["1.1 nexus\r\nx-injected: 1", "1.1\x00nexus"])
def test_unsafe_own_via_dropped(via: str) -> None:
    request = forward([], via=via)
    response = respond([], via=via)
    assert values(request.headers, "via") == []
    assert response_values(response, "via") == []


# Arbitrary names and values, mixed with names that the rules treat specially.
_request_names = st.sampled_from(
    [b"x-a", b"Connection", b"via", b"host", b"x-forwarded-for", b"x-request-id", b"te", b"bad name"]
) | st.binary(max_size=12)
_response_names = st.sampled_from(["x-a", "Connection", "via", "x-request-id", "te", "bad name"]) | st.text(
    max_size=12
)


@pytest.mark.parametrize(
    ("headers", "http_version", "problem"),
    [
        ([(b"host", b"api.example.com:8080")], "1.1", None),
        ([(b"host", b"[2001:db8::1]:8443")], "1.1", None),
        ([], "1.0", None),
        ([], "2", None),
        ([], "1.1", "without a Host header"),
        ([(b"host", b"")], "1.1", "without a Host header"),
        ([(b"host", b"first.example"), (b"host", b"second.example")], "1.1", "2 Host header fields"),
        ([(b"host", b"a b")], "1.1", "invalid Host header 'a b'"),
        ([(b"host", b"api.example/x")], "1.1", "invalid Host header"),
        ([(b"host", b"user@api.example")], "1.1", "invalid Host header"),
        ([(b"host", b"[::1")], "1.1", "invalid Host header"),
    ],
)
def test_host_problem(headers: list[tuple[bytes, bytes]], http_version: str, problem: str | None) -> None:
    # RFC 9112 section 3.2: HTTP/1.1 needs exactly one valid Host field.
    found = host_problem(headers, http_version)
    if problem is None:
        assert found is None
    else:
        assert problem in found


@given(st.lists(st.tuples(_request_names, st.binary(max_size=12)), max_size=8))
def test_request_output_never_unsafe(headers: list[tuple[bytes, bytes]]) -> None:
    result = forward(headers, peer=TRUSTED_PEER)
    for name, value in result.headers:
        assert re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9a-z]+", name), name
        assert not re.search(r"[\x00-\x08\x0a-\x1f\x7f]", value), value
        assert name not in HOP_BY_HOP


@given(st.lists(st.tuples(_response_names, st.text(max_size=12)), max_size=8))
def test_response_output_never_unsafe(headers: list[tuple[str, str]]) -> None:
    result = respond(headers)
    for name, value in result:
        assert re.fullmatch(rb"[!#$%&'*+\-.^_`|~0-9a-z]+", name), name
        assert not re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", value), value
        assert name.decode() not in HOP_BY_HOP


# --- Empty header lists ----------------------------------------------------------------


def test_request_empty_headers_untrusted_peer() -> None:
    result = forward([], peer=UNTRUSTED_PEER, scheme="http")
    assert result.host is None
    assert result.client_ip == UNTRUSTED_PEER
    assert result.headers == [
        ("x-forwarded-for", UNTRUSTED_PEER),
        ("x-forwarded-proto", "http"),
        ("via", "1.1 nexus"),
        ("x-request-id", result.request_id),
    ]


def test_request_empty_headers_trusted_peer() -> None:
    result = forward([], peer=TRUSTED_PEER, scheme="https")
    assert result.client_ip == TRUSTED_PEER
    assert result.headers == [
        ("x-forwarded-for", TRUSTED_PEER),
        ("x-forwarded-proto", "https"),
        ("via", "1.1 nexus"),
        ("x-request-id", result.request_id),
    ]


def test_response_empty_headers() -> None:
    assert respond([]) == [(b"via", b"1.1 nexus"), (b"x-request-id", REQUEST_ID.encode())]


# --- Trusted proxies -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("networks", "address", "expected"),
    [
        (["10.0.0.0/8"], "10.255.0.1", True),
        (["10.0.0.0/8"], "11.0.0.1", False),
        (["10.1.2.3/8"], "10.200.0.1", True),
        (["192.0.2.1"], "192.0.2.1", True),
        (["192.0.2.1"], "192.0.2.2", False),
        (["2001:db8::/32"], "2001:db8:ffff::1", True),
        (["2001:db8::/32"], "2001:db9::1", False),
        (["2001:db8::/32"], "10.0.0.1", False),
        (["10.0.0.0/8"], "::ffff:10.0.0.1", True),
        (["fe80::/10"], "fe80::1%eth0", True),
        (["10.0.0.0/8"], "not-an-ip", False),
        (["10.0.0.0/8"], "", False),
        ([], "10.0.0.1", False),
        ([" 10.0.0.0/8 "], "10.0.0.1", True),
    ],
)
def test_trusted_proxies_is_trusted(networks: list[str], address: str, expected: bool) -> None:
    trusted = TrustedProxies(networks)
    assert trusted.is_trusted(address) is expected
    # The second call comes from the cache and must agree.
    assert trusted.is_trusted(address) is expected


@pytest.mark.parametrize("network", ["10.0.0.0/33", "not-a-network", "", "10.0.0.0/8/8", "2001:db8::/129"])
def test_trusted_proxies_invalid_network_raises(network: str) -> None:
    with pytest.raises(ValueError, match="invalid trusted proxy network"):
        TrustedProxies(["10.0.0.0/8", network])


def test_trusted_proxies_string_raises() -> None:
    with pytest.raises(TypeError, match="list of addresses"):
        TrustedProxies("10.0.0.0/8")


def test_trusted_proxies_many_addresses() -> None:
    # More distinct addresses than the cache size must still be classified correctly.
    trusted = TrustedProxies(["10.0.0.0/16"])
    for i in range(6000):
        address = f"10.{i % 2}.{(i // 256) % 256}.{i % 256}"
        assert trusted.is_trusted(address) is (i % 2 == 0)
