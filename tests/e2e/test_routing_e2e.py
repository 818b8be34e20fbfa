"""Route matching and path rewriting, as seen by real upstreams behind a real gateway.

Each route sends to its own upstream server, and every upstream names itself
in `x-upstream`, so the upstream that responds shows which route won. The
upstream's echo shows the path and query string it received.
"""

from __future__ import annotations

from proxy_support import echo, parse_raw, send, send_raw


def _config(upstreams: dict[str, str], routes: str) -> str:
    pools = "\n".join(f'  {name}: {{targets: ["{url}"]}}' for name, url in upstreams.items())
    return f"""
listen: ["127.0.0.1:0"]
workers: 1
upstreams:
{pools}
routes:
{routes}
"""


def _start(upstream_factory, gateway_factory, names: list[str], routes: str):
    upstreams = {name: upstream_factory(name).url for name in names}
    return gateway_factory(_config(upstreams, routes), workers=1)


def test_host_exact_and_wildcard(upstream_factory, gateway_factory):
    gateway = _start(
        upstream_factory,
        gateway_factory,
        ["exact", "wildcard", "deep_wildcard", "any_host"],
        """
  - {name: any-host, upstream: any_host}
  - {name: wildcard, upstream: wildcard, match: {host: "*.example.com", path: /only-here}}
  - {name: wildcard-all, upstream: wildcard, match: {host: "*.example.com"}}
  - {name: deep-wildcard, upstream: deep_wildcard, match: {host: "*.eu.example.com"}}
  - {name: exact, upstream: exact, match: {host: api.example.com}}
""",
    )
    cases = [
        ("api.example.com", "/x", "exact"),
        ("API.Example.COM:8080", "/x", "exact"),
        ("api.example.com.", "/x", "exact"),
        ("shop.example.com", "/x", "wildcard"),
        ("a.b.example.com", "/x", "wildcard"),
        ("shop.eu.example.com", "/x", "deep_wildcard"),
        ("eu.example.com", "/x", "wildcard"),
        ("example.com", "/x", "any_host"),
        ("example.org", "/x", "any_host"),
        ("notexample.com", "/x", "any_host"),
        # The host key is compared before the path key: an exact host with no
        # path rule beats a wildcard host with an exact path.
        ("api.example.com", "/only-here", "exact"),
        ("shop.example.com", "/only-here", "wildcard"),
    ]
    for host, path, expected in cases:
        result = echo(gateway.url, path, headers=[("Host", host)])
        assert result["upstream"] == expected, f"Host {host} {path}"


def test_host_missing_uses_hostless_route(upstream_factory, gateway_factory):
    gateway = _start(
        upstream_factory,
        gateway_factory,
        ["exact", "any_host"],
        """
  - {name: exact, upstream: exact, match: {host: api.example.com}}
  - {name: any-host, upstream: any_host}
""",
    )
    # HTTP/1.0 allows a request without Host.
    reply = parse_raw(send_raw(gateway.url, b"GET /x HTTP/1.0\r\n\r\n"))

    assert reply.status == 200
    assert reply.header("x-upstream") == "any_host"


def test_path_exact_and_prefix(upstream_factory, gateway_factory):
    gateway = _start(
        upstream_factory,
        gateway_factory,
        ["exact", "prefix", "longer", "fallback"],
        """
  - {name: fallback, upstream: fallback}
  - {name: prefix, upstream: prefix, match: {path_prefix: /v1/catalog}}
  - {name: longer, upstream: longer, match: {path_prefix: /v1/catalog/items}}
  - {name: exact, upstream: exact, match: {path: /v1/catalog}}
""",
    )
    cases = [
        ("/v1/catalog", "exact"),
        ("/v1/catalog/", "prefix"),
        ("/v1/catalog/x", "prefix"),
        ("/v1/catalog/x/y", "prefix"),
        ("/v1/catalog/items", "longer"),
        ("/v1/catalog/items/42", "longer"),
        ("/v1/catalog/itemsX", "prefix"),
        ("/v1/catalogue", "fallback"),
        ("/v1/catalogue/x", "fallback"),
        ("/V1/catalog/x", "fallback"),
        ("/v1", "fallback"),
        ("/v1/catalog?x=1", "exact"),
    ]
    for path, expected in cases:
        result = echo(gateway.url, path)
        assert result["upstream"] == expected, path


def test_methods_condition(upstream_factory, gateway_factory):
    gateway = _start(
        upstream_factory,
        gateway_factory,
        ["writes", "reads", "other"],
        """
  - {name: other, upstream: other, match: {path_prefix: /items}}
  - {name: writes, upstream: writes, match: {path_prefix: /items, methods: [POST, PUT]}}
  - {name: reads, upstream: reads, match: {path_prefix: /items, methods: [GET, HEAD]}}
""",
    )
    cases = [("GET", "reads"), ("POST", "writes"), ("PUT", "writes"), ("DELETE", "other"), ("PATCH", "other")]
    for method, expected in cases:
        reply = send(gateway.url, "/items/1", method=method, body=b"" if method != "GET" else None)
        assert reply.status == 200, method
        assert reply.header("x-upstream") == expected, method

    head = send(gateway.url, "/items/1", method="HEAD")
    assert head.header("x-upstream") == "reads"


def test_header_conditions(upstream_factory, gateway_factory):
    gateway = _start(
        upstream_factory,
        gateway_factory,
        ["blue", "blue_beta", "plain"],
        """
  - {name: plain, upstream: plain, match: {path_prefix: /h}}
  - {name: blue, upstream: blue, match: {path_prefix: /h, headers: {X-Tenant: blue}}}
  - {name: blue-beta, upstream: blue_beta, match: {path_prefix: /h, headers: {x-tenant: blue, x-beta: "1"}}}
""",
    )
    cases = [
        ([], "plain"),
        ([("X-Tenant", "blue")], "blue"),
        ([("x-tenant", "blue")], "blue"),
        ([("X-TENANT", "blue")], "blue"),
        ([("X-Tenant", "Blue")], "plain"),
        ([("X-Tenant", "green")], "plain"),
        ([("X-Beta", "1")], "plain"),
        ([("X-Tenant", "blue"), ("X-Beta", "1")], "blue_beta"),
        ([("X-Beta", "1"), ("X-Tenant", "blue")], "blue_beta"),
        ([("X-Tenant", "blue"), ("X-Beta", "2")], "blue"),
    ]
    for headers, expected in cases:
        result = echo(gateway.url, "/h/x", headers=headers)
        assert result["upstream"] == expected, headers


def test_strip_and_add_prefix(upstream_factory, gateway_factory):
    gateway = _start(
        upstream_factory,
        gateway_factory,
        ["app"],
        """
  - {name: both, upstream: app, match: {path_prefix: /api}, strip_prefix: /api, add_prefix: /internal}
  - {name: strip, upstream: app, match: {path_prefix: /s}, strip_prefix: /s}
  - {name: add, upstream: app, match: {path_prefix: /a}, add_prefix: /base}
  - {name: plain, upstream: app}
""",
    )
    cases = [
        ("/api/users", "/internal/users"),
        ("/api/users/", "/internal/users/"),
        ("/api", "/internal/"),
        ("/api/", "/internal/"),
        ("/s/x/y", "/x/y"),
        ("/s", "/"),
        ("/a/x", "/base/a/x"),
        ("/a", "/base/a"),
        ("/apiary", "/apiary"),
        ("/plain/x", "/plain/x"),
    ]
    for path, expected in cases:
        result = echo(gateway.url, path)
        assert result["path"] == expected, path

    rewritten = echo(gateway.url, "/api/users?page=2&sort=name")
    assert rewritten["path"] == "/internal/users"
    assert rewritten["query"] == "page=2&sort=name"


def test_query_string_unchanged(upstream_factory, gateway_factory):
    gateway = _start(upstream_factory, gateway_factory, ["app"], "  - {name: all, upstream: app}\n")
    queries = [
        "a=1",
        "a=1&a=2&a=3",
        "b=%20x%2Fy%3F%26",
        "c=&d",
        "e=caf%C3%A9&f=a+b",
        "g=%25%2B&h=%3D",
        "z=1&a=2",
        "x=1;y=2",
        "=&&",
    ]
    for query in queries:
        result = echo(gateway.url, f"/q?{query}")
        assert result["path"] == "/q", query
        assert result["query"] == query, query


def test_percent_encoded_path_forwarded_raw(upstream_factory, gateway_factory):
    gateway = _start(
        upstream_factory,
        gateway_factory,
        ["app"],
        """
  - {name: strip, upstream: app, match: {path_prefix: /api}, strip_prefix: /api}
  - {name: all, upstream: app}
""",
    )
    paths = [
        "/files/a%2Fb",
        "/files/c%20d",
        "/files/caf%C3%A9",
        "/files/%25",
        "/files/a%3Fb%23c",
        "/files/%7Euser",
    ]
    for path in paths:
        result = echo(gateway.url, path)
        assert result["path"] == path

    stripped = echo(gateway.url, "/api/a%2Fb")
    assert stripped["path"] == "/a%2Fb"


def test_route_match_uses_raw_path(upstream_factory, gateway_factory):
    gateway = _start(
        upstream_factory,
        gateway_factory,
        ["catalog", "fallback"],
        """
  - {name: catalog, upstream: catalog, match: {path_prefix: /v1/catalog}}
  - {name: fallback, upstream: fallback}
""",
    )
    # An encoded slash is data, not a separator: "/v1%2Fcatalog/x" is not
    # under the prefix /v1/catalog.
    result = echo(gateway.url, "/v1%2Fcatalog/x")

    assert result["upstream"] == "fallback"
    assert result["path"] == "/v1%2Fcatalog/x"


def test_dot_segments_rejected(upstream_factory, gateway_factory):
    gateway = _start(upstream_factory, gateway_factory, ["app"], "  - {name: all, upstream: app}\n")
    paths = ["/a/../b", "/a/./b", "/..", "/.", "/a/..", "/a/.", "/../etc/passwd", "/a/%2e%2e/b", "/a/%2E/b"]
    for path in paths:
        request = f"GET {path} HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n".encode()

        reply = parse_raw(send_raw(gateway.url, request))

        assert reply.status == 400, path
        assert reply.header("content-type") == "application/problem+json", path
        assert reply.header("x-upstream") is None, path
    assert send(gateway.url, "/after").status == 200


def test_dot_in_segment_name_allowed(upstream_factory, gateway_factory):
    gateway = _start(upstream_factory, gateway_factory, ["app"], "  - {name: all, upstream: app}\n")
    for path in ["/a/..b", "/a/b..", "/a/.hidden", "/a/...", "/file.tar.gz"]:
        result = echo(gateway.url, path)
        assert result["path"] == path
