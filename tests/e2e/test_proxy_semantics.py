"""Proxy semantics of RFC 9110 through a real gateway: header rules, bodies, HEAD and statuses.

The upstream's echo endpoint returns the request headers it received, in
order, so each test compares what the downstream sent with what arrived.
"""

from __future__ import annotations

import re

from proxy_support import echo, echoed_headers, send, send_raw


def _config(upstream_url: str, extra: str = "") -> str:
    return f"""
listen: ["127.0.0.1:0"]
workers: 1
{extra}
upstreams:
  app: {{targets: ["{upstream_url}"]}}
routes:
  - {{name: all, upstream: app}}
"""


def _gateway(upstream_factory, gateway_factory, extra: str = ""):
    upstream = upstream_factory("app")
    return gateway_factory(_config(upstream.url, extra), workers=1)


def _names(result: dict) -> list[str]:
    return [name for name, _ in result["headers"]]


def test_hop_by_hop_request_headers_removed(upstream_factory, gateway_factory):
    gateway = _gateway(upstream_factory, gateway_factory)
    headers = [
        ("Connection", "keep-alive, X-Conn-Option"),
        ("Connection", "X-Second-Option"),
        ("X-Conn-Option", "drop me"),
        ("X-Second-Option", "drop me too"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "example/1"),
        ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
        ("Proxy-Connection", "keep-alive"),
        ("X-End-To-End", "kept"),
        ("Authorization", "Bearer token"),
    ]

    result = echo(gateway.url, "/echo", headers=headers)

    names = _names(result)
    for hop in ["x-conn-option", "x-second-option", "keep-alive", "te", "trailer", "upgrade",
                "proxy-authorization", "proxy-connection"]:
        assert hop not in names, hop
    # The upstream connection may carry its own Connection field, but never
    # the options the downstream listed.
    for value in echoed_headers(result, "connection"):
        assert "x-conn-option" not in value.lower()
        assert "x-second-option" not in value.lower()
    assert echoed_headers(result, "x-end-to-end") == ["kept"]
    assert echoed_headers(result, "authorization") == ["Bearer token"]


def test_hop_by_hop_response_headers_removed(upstream_factory, gateway_factory):
    gateway = _gateway(upstream_factory, gateway_factory)

    reply = send(gateway.url, "/hop")

    assert reply.status == 200
    assert reply.body == b"hop"
    assert reply.header("x-end") == "kept"
    for hop in ["x-secret-hop", "keep-alive", "proxy-connection", "upgrade", "trailer"]:
        assert reply.header(hop) is None, hop
    for value in reply.header_values("connection"):
        assert "x-secret-hop" not in value.lower()


def test_repeated_request_headers_kept_in_order(upstream_factory, gateway_factory):
    gateway = _gateway(upstream_factory, gateway_factory)
    headers = [("X-Multi", "one"), ("X-Other", "between"), ("X-Multi", "two"), ("X-Multi", "three")]

    result = echo(gateway.url, "/echo", headers=headers)

    assert echoed_headers(result, "x-multi") == ["one", "two", "three"]
    assert echoed_headers(result, "x-other") == ["between"]


def test_forwarded_for_untrusted_peer(upstream_factory, gateway_factory):
    gateway = _gateway(upstream_factory, gateway_factory)

    plain = echo(gateway.url, "/echo")
    spoofed = echo(
        gateway.url,
        "/echo",
        headers=[
            ("X-Forwarded-For", "203.0.113.7"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil.example"),
            ("Forwarded", "for=203.0.113.7"),
        ],
    )

    assert echoed_headers(plain, "x-forwarded-for") == ["127.0.0.1"]
    # 127.0.0.1 is not a trusted proxy by default, so what it claims is replaced.
    assert echoed_headers(spoofed, "x-forwarded-for") == ["127.0.0.1"]
    assert echoed_headers(spoofed, "x-forwarded-proto") == ["http"]
    assert echoed_headers(spoofed, "x-forwarded-host") == [f"{gateway.addresses[0]}"]
    assert echoed_headers(spoofed, "forwarded") == []


def test_forwarded_for_trusted_peer_appends(upstream_factory, gateway_factory):
    gateway = _gateway(upstream_factory, gateway_factory, 'trusted_proxies: ["127.0.0.1/32"]')

    plain = echo(gateway.url, "/echo")
    chained = echo(
        gateway.url,
        "/echo",
        headers=[("X-Forwarded-For", "203.0.113.7, 198.51.100.2"), ("X-Forwarded-Proto", "https")],
    )

    assert echoed_headers(plain, "x-forwarded-for") == ["127.0.0.1"]
    assert echoed_headers(chained, "x-forwarded-for") == ["203.0.113.7, 198.51.100.2, 127.0.0.1"]
    assert echoed_headers(chained, "x-forwarded-proto") == ["https"]


def test_forwarded_proto_and_host(upstream_factory, gateway_factory):
    gateway = _gateway(upstream_factory, gateway_factory)

    result = echo(gateway.url, "/echo", headers=[("Host", "shop.example.com:8443")])

    assert echoed_headers(result, "x-forwarded-proto") == ["http"]
    assert echoed_headers(result, "x-forwarded-host") == ["shop.example.com:8443"]
    # The upstream gets the downstream's Host, so virtual hosts keep working.
    assert echoed_headers(result, "host") == ["shop.example.com:8443"]


def test_via_added_both_ways(upstream_factory, gateway_factory):
    gateway = _gateway(upstream_factory, gateway_factory)

    reply = send(gateway.url, "/echo")
    chained = echo(gateway.url, "/echo", headers=[("Via", "1.0 fred")])

    assert reply.status == 200
    assert echoed_headers(reply.json(), "via") == ["1.1 nexus"]
    assert reply.header_values("via") == ["1.1 nexus"]
    assert echoed_headers(chained, "via") == ["1.0 fred, 1.1 nexus"]


def test_request_id_propagated(upstream_factory, gateway_factory):
    gateway = _gateway(upstream_factory, gateway_factory)

    reply = send(gateway.url, "/echo", headers=[("X-Request-Id", "order-4711-abc")])

    assert reply.status == 200
    assert echoed_headers(reply.json(), "x-request-id") == ["order-4711-abc"]
    assert reply.header_values("x-request-id") == ["order-4711-abc"]


def test_request_id_created_when_missing(upstream_factory, gateway_factory):
    gateway = _gateway(upstream_factory, gateway_factory)

    first = send(gateway.url, "/echo")
    second = send(gateway.url, "/echo")

    sent_upstream = echoed_headers(first.json(), "x-request-id")
    assert len(sent_upstream) == 1
    assert re.fullmatch(r"[0-9a-f]{32}", sent_upstream[0]), sent_upstream
    assert first.header_values("x-request-id") == sent_upstream
    assert second.header("x-request-id") != first.header("x-request-id")


def test_request_bodies_arrive_whole(upstream_factory, gateway_factory):
    gateway = _gateway(upstream_factory, gateway_factory)

    for size in [0, 1024, 100 * 1024, 5 * 1024 * 1024]:
        reply = send(gateway.url, "/upload", method="POST", body=b"b" * size)
        assert reply.status == 200, size
        assert reply.body == str(size).encode(), size

    chunks = [b"c" * 1000, b"d" * 70_000, b"e" * 1, b"f" * 200_000]
    reply = send(gateway.url, "/upload", method="POST", body=iter(chunks))
    assert reply.status == 200
    assert reply.body == str(sum(map(len, chunks))).encode()


def test_chunked_upload_reaches_echo(upstream_factory, gateway_factory):
    gateway = _gateway(upstream_factory, gateway_factory)

    result = echo(gateway.url, "/echo", method="PUT", body=iter([b"x" * 100, b"y" * 23]))

    assert result["method"] == "PUT"
    assert result["body_length"] == 123


def test_head_gets_headers_without_body(upstream_factory, gateway_factory):
    gateway = _gateway(upstream_factory, gateway_factory)

    get = send(gateway.url, "/echo")
    head = send(gateway.url, "/echo", method="HEAD")

    assert head.status == 200
    assert head.body == b""
    assert head.header("x-upstream") == "app"
    assert head.header("content-type") == "application/json"
    # The upstream's Content-Length passes through: its echo for HEAD is the
    # GET echo with a method name one character longer.
    assert head.header("content-length") == str(len(get.body) + 1)


def test_head_sends_no_body_bytes(upstream_factory, gateway_factory):
    gateway = _gateway(upstream_factory, gateway_factory)
    request = b"HEAD /echo HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"

    # Read to the end of the connection, so body bytes after the head would show.
    raw = send_raw(gateway.url, request, wait=5)

    head, separator, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw[:300]
    assert separator
    assert rest == b""


def test_upstream_statuses_pass_through(upstream_factory, gateway_factory):
    gateway = _gateway(upstream_factory, gateway_factory)

    for status in [200, 201, 204, 304, 404, 500]:
        reply = send(gateway.url, f"/status/{status}")
        assert reply.status == status
        assert reply.header("x-upstream") == "app", status
        assert reply.header("content-type") != "application/problem+json", status
        assert reply.body == b"", status

    created = send(gateway.url, "/status/201", method="POST", body=b"{}")
    assert created.status == 201
