"""Tests for nexus.routing: route matching, precedence and path rewriting."""

from __future__ import annotations

import random
from typing import Any
from urllib.parse import urlsplit

import pytest

from nexus.config import Match, Route, parse_config
from nexus.routing import RouteTable, rewrite_path


def route(name: str, *, strip_prefix: str | None = None, add_prefix: str | None = None, **match: Any) -> Route:
    """Build a Route with the given match conditions, to upstream "u"."""
    return Route(name=name, upstream="u", match=Match(**match), strip_prefix=strip_prefix, add_prefix=add_prefix)


def matched(
    routes: list[Route],
    host: str | None = "example.com",
    path: str = "/",
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> str | None:
    """Return the name of the route RouteTable picks for the request, or None."""
    found = RouteTable(routes).match(host, path, method, headers or {})
    return None if found is None else found.name


# --- Hosts -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("route_host", "request_host", "expected"),
    [
        # Exact host, in every form a client may send it.
        ("api.example.com", "api.example.com", True),
        ("api.example.com", "API.Example.COM", True),
        ("api.example.com", "api.example.com:8080", True),
        ("api.example.com", "api.example.com:443", True),
        ("api.example.com", "api.example.com.", True),
        ("api.example.com", "API.EXAMPLE.COM.:8443", True),
        ("api.example.com", "api.example.com..", False),  # only one trailing dot is ignored
        ("api.example.com", "api.example.org", False),
        ("api.example.com", "xapi.example.com", False),
        ("api.example.com", "a.api.example.com", False),
        ("api.example.com", "example.com", False),
        ("api.example.com", "api.example.com.evil.org", False),
        ("api.example.com", None, False),
        ("api.example.com", "", False),
        # The route's host is normalized too.
        ("API.Example.COM", "api.example.com", True),
        ("api.example.com.", "api.example.com", True),
        ("api.example.com.", "api.example.com.:80", True),
        # IP addresses: IPv6 in brackets with or without a port, or bare.
        ("127.0.0.1", "127.0.0.1:8080", True),
        ("127.0.0.1", "127.0.0.1", True),
        ("127.0.0.1", "127.0.0.2:8080", False),
        ("::1", "[::1]:8080", True),
        ("::1", "[::1]", True),
        ("::1", "::1", True),
        ("[::1]", "[::1]:8080", True),
        ("[::1]", "::1", True),
        ("::1", "[::2]:8080", False),
        ("2001:db8::a", "[2001:DB8::A]:443", True),
        ("2001:db8::a", "[2001:db8::b]:443", False),
    ],
)
def test_exact_host(route_host: str, request_host: str | None, expected: bool) -> None:
    routes = [route("r", host=route_host)]
    assert matched(routes, host=request_host) == ("r" if expected else None)


@pytest.mark.parametrize(
    ("route_host", "request_host", "expected"),
    [
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "A.Example.COM", True),
        ("*.example.com", "a.example.com:8080", True),
        ("*.example.com", "a.example.com.", True),
        ("*.example.com", "a.b.example.com.:443", True),
        ("*.example.com", "example.com", False),  # needs at least one more label
        ("*.example.com", "example.com:8080", False),
        ("*.example.com", ".example.com", False),  # an empty label is not a label
        ("*.example.com", "a..example.com", False),
        ("*.example.com", ".a.example.com", False),
        ("*.example.com", "aexample.com", False),  # the suffix starts at a dot
        ("*.example.com", "a.example.co", False),
        ("*.example.com", "a.example.com.evil.org", False),
        ("*.example.com", "a.example.org", False),
        ("*.example.com", None, False),
        ("*.example.com", "", False),
        ("*.Example.COM.", "a.example.com", True),  # the route's wildcard is normalized
        ("*.com", "example.com", True),
        ("*.com", "com", False),
    ],
)
def test_wildcard_host(route_host: str, request_host: str | None, expected: bool) -> None:
    routes = [route("r", host=route_host)]
    assert matched(routes, host=request_host) == ("r" if expected else None)


@pytest.mark.parametrize("request_host", ["example.com", "a.b.c", "[::1]:8080", "10.0.0.1", "", None])
def test_route_without_host_matches_any_host(request_host: str | None) -> None:
    assert matched([route("r")], host=request_host) == "r"


@pytest.mark.parametrize(
    ("request_host", "expected"),
    [
        ("a.example.com", "r"),
        ("x.b.example.com", "r"),
        ("b.example.com", None),
        ("c.example.com", None),
    ],
)
def test_host_list_matches_any_listed_host(request_host: str, expected: str | None) -> None:
    routes = [route("r", host=["a.example.com", "*.b.example.com"])]
    assert matched(routes, host=request_host) == expected


def test_empty_host_list_matches_any() -> None:
    assert matched([route("r", host=[])], host="anything.example") == "r"
    assert matched([route("r", host=[])], host=None) == "r"


@pytest.mark.parametrize("bad_host", ["*.", "*..", "*"])
def test_wildcard_without_domain_is_rejected(bad_host: str) -> None:
    with pytest.raises(ValueError, match="wildcard needs a domain"):
        RouteTable([route("r", host=bad_host)])


# --- Paths -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_path", "expected"),
    [
        ("/v1/users", True),
        ("/v1/users/", False),
        ("/v1/users/1", False),
        ("/v1/user", False),
        ("/V1/users", False),  # paths are case-sensitive
        ("/v1", False),
        ("/", False),
    ],
)
def test_exact_path(request_path: str, expected: bool) -> None:
    assert matched([route("r", path="/v1/users")], path=request_path) == ("r" if expected else None)


@pytest.mark.parametrize(
    ("prefix", "request_path", "expected"),
    [
        ("/v1/catalog", "/v1/catalog", True),
        ("/v1/catalog", "/v1/catalog/", True),
        ("/v1/catalog", "/v1/catalog/x", True),
        ("/v1/catalog", "/v1/catalog/x/y/", True),
        ("/v1/catalog", "/v1/catalog//x", True),
        ("/v1/catalog", "/v1/catalogue", False),  # not a segment boundary
        ("/v1/catalog", "/v1/catalog-x/y", False),
        ("/v1/catalog", "/v1/catalo", False),
        ("/v1/catalog", "/v1", False),
        ("/v1/catalog", "/v1/", False),
        ("/v1/catalog", "/", False),
        ("/v1/catalog", "/v2/catalog", False),
        ("/v1/catalog", "/x/v1/catalog", False),
        ("/v1/catalog", "/V1/catalog", False),
        ("/v1", "/v1", True),
        ("/v1", "/v1/catalog", True),
        ("/v1", "/v10", False),
        # A trailing slash names the same subtree as the prefix without it.
        ("/products/", "/products/1", True),
        ("/products/", "/products/", True),
        ("/products/", "/products", True),
        ("/products/", "/productsx", False),
        ("//", "/x", True),
        ("/", "/", True),
        ("/", "/x", True),
        ("/", "/x/y/", True),
        ("/", "*", True),  # "/" matches every path, even `OPTIONS *`
    ],
)
def test_path_prefix(prefix: str, request_path: str, expected: bool) -> None:
    assert matched([route("r", path_prefix=prefix)], path=request_path) == ("r" if expected else None)


@pytest.mark.parametrize(
    ("request_path", "expected"),
    [
        ("/a/b/c/d", "deep"),
        ("/a/b/c/d/", "deep"),
        ("/a/b/c/d/e/f/g/h", "deep"),
        ("/a/b/c/de", "short"),
        ("/a/b/c/x/y/z/w/v", "short"),
        ("/a/bb/c/d/e/f/g/h", "short"),
        ("/a", "short"),
        ("/ab/c/d/e/f/g/h/i", "mid"),
        ("/ab", "mid"),
        ("/abc/d/e/f/g/h/i/j", None),
        ("/", None),
    ],
)
def test_longest_prefix_wins_whatever_the_path_depth(request_path: str, expected: str | None) -> None:
    routes = [route("short", path_prefix="/a"), route("mid", path_prefix="/ab"), route("deep", path_prefix="/a/b/c/d")]
    assert matched(routes, path=request_path) == expected


@pytest.mark.parametrize("request_path", ["/", "/x", "/a/b/c", "*"])
def test_route_without_path_rule_matches_any_path(request_path: str) -> None:
    assert matched([route("r")], path=request_path) == "r"


# --- Methods and headers ---------------------------------------------------


@pytest.mark.parametrize(
    ("methods", "method", "expected"),
    [
        (["GET", "HEAD"], "GET", True),
        (["GET", "HEAD"], "HEAD", True),
        (["GET", "HEAD"], "POST", False),
        (["GET", "HEAD"], "get", False),  # methods are case-sensitive
        (["DELETE"], "DELETE", True),
        (None, "PATCH", True),
        (None, "OPTIONS", True),
        ([], "PUT", True),  # an empty list is the same as no methods
    ],
)
def test_methods(methods: list[str] | None, method: str, expected: bool) -> None:
    assert matched([route("r", methods=methods)], method=method) == ("r" if expected else None)


@pytest.mark.parametrize(
    ("conditions", "request_headers", "expected"),
    [
        ({"x-tenant": "acme"}, {"x-tenant": "acme"}, True),
        ({"X-Tenant": "acme"}, {"x-tenant": "acme"}, True),  # names are case-insensitive
        ({"X-TENANT": "acme"}, {"x-tenant": "acme", "accept": "*/*"}, True),
        ({"x-tenant": "acme"}, {"x-tenant": "Acme"}, False),  # values are exact
        ({"x-tenant": "acme"}, {"x-tenant": "acme "}, False),
        ({"x-tenant": "acme"}, {"x-tenant": ""}, False),
        ({"x-tenant": "acme"}, {}, False),
        ({"x-tenant": "acme"}, {"x-other": "acme"}, False),
        ({"x-tenant": ""}, {"x-tenant": ""}, True),
        ({"x-tenant": ""}, {}, False),  # an empty value still needs the header
        ({"x-tenant": "acme", "X-Env": "prod"}, {"x-tenant": "acme", "x-env": "prod"}, True),
        ({"x-tenant": "acme", "X-Env": "prod"}, {"x-tenant": "acme"}, False),  # all are required
        ({"x-tenant": "acme", "X-Env": "prod"}, {"x-tenant": "acme", "x-env": "dev"}, False),
        ({}, {}, True),
    ],
)
def test_headers(conditions: dict[str, str], request_headers: dict[str, str], expected: bool) -> None:
    assert matched([route("r", headers=conditions)], headers=request_headers) == ("r" if expected else None)


# --- Precedence ------------------------------------------------------------

# Each case: two routes that both match the request, and the one that must
# win. Every case is run with the routes in both config orders, so config
# order (key 5) cannot be what decides, except in the cases marked ORDER.
#
# Within one key.
WITHIN_KEY = [
    pytest.param(
        {"host": "a.example.com"},
        {"host": "*.example.com"},
        {"host": "a.example.com"},
        id="host-exact-beats-wildcard",
    ),
    pytest.param(
        {"host": "a.b.example.com"},
        {"host": "*.b.example.com"},
        {"host": "a.b.example.com"},
        id="host-exact-beats-longer-wildcard",
    ),
    pytest.param(
        {"host": "*.b.example.com"},
        {"host": "*.example.com"},
        {"host": "a.b.example.com"},
        id="host-longer-wildcard-beats-shorter",
    ),
    pytest.param({"host": "*.com"}, {}, {"host": "a.example.com"}, id="host-any-wildcard-beats-none"),
    pytest.param({"host": "a.example.com"}, {}, {"host": "a.example.com"}, id="host-exact-beats-none"),
    pytest.param({"path": "/v1/x"}, {"path_prefix": "/v1/x"}, {"path": "/v1/x"}, id="path-exact-beats-prefix"),
    pytest.param({"path": "/v1/x"}, {"path_prefix": "/"}, {"path": "/v1/x"}, id="path-exact-beats-root-prefix"),
    pytest.param({"path_prefix": "/v1/x"}, {"path_prefix": "/v1"}, {"path": "/v1/x/y"}, id="path-longer-prefix"),
    pytest.param({"path_prefix": "/v1"}, {"path_prefix": "/"}, {"path": "/v1/x"}, id="path-prefix-beats-root"),
    pytest.param({"path_prefix": "/"}, {}, {"path": "/v1/x"}, id="path-root-prefix-beats-none"),
    pytest.param({"path": "/v1/x"}, {}, {"path": "/v1/x"}, id="path-exact-beats-none"),
    pytest.param({"methods": ["GET"]}, {}, {"method": "GET"}, id="methods-beat-none"),
    pytest.param(
        {"headers": {"a": "1", "b": "2"}},
        {"headers": {"a": "1"}},
        {"headers": {"a": "1", "b": "2"}},
        id="more-headers-beat-fewer",
    ),
    pytest.param({"headers": {"a": "1"}}, {}, {"headers": {"a": "1"}}, id="headers-beat-none"),
]

# Between two keys: the winner is better on the earlier key and worse on the
# later one. Key names: host, path, methods, headers, order.
BETWEEN_KEYS = [
    pytest.param(
        {"host": "a.example.com"},
        {"host": "*.example.com", "path": "/x"},
        {"host": "a.example.com", "path": "/x"},
        id="host-over-path",
    ),
    pytest.param(
        {"host": "*.b.example.com", "path_prefix": "/"},
        {"host": "*.example.com", "path": "/x"},
        {"host": "a.b.example.com", "path": "/x"},
        id="host-wildcard-length-over-path",
    ),
    pytest.param(
        {"host": "*.example.com"},
        {"path": "/x"},
        {"host": "a.example.com", "path": "/x"},
        id="host-wildcard-over-path",
    ),
    pytest.param(
        {"host": "a.example.com"},
        {"host": "*.example.com", "methods": ["GET"]},
        {"host": "a.example.com"},
        id="host-over-methods",
    ),
    pytest.param(
        {"host": "a.example.com"},
        {"host": "*.example.com", "headers": {"a": "1", "b": "2"}},
        {"host": "a.example.com", "headers": {"a": "1", "b": "2"}},
        id="host-over-headers",
    ),
    pytest.param(
        {"path": "/x"},
        {"path_prefix": "/x", "methods": ["GET"]},
        {"path": "/x"},
        id="path-over-methods",
    ),
    pytest.param(
        {"path_prefix": "/x/y"},
        {"path_prefix": "/x", "methods": ["GET"], "headers": {"a": "1"}},
        {"path": "/x/y/z", "headers": {"a": "1"}},
        id="path-prefix-length-over-methods-and-headers",
    ),
    pytest.param(
        {"path_prefix": "/"},
        {"headers": {"a": "1", "b": "2"}},
        {"path": "/x", "headers": {"a": "1", "b": "2"}},
        id="path-over-headers",
    ),
    pytest.param(
        {"methods": ["GET"]},
        {"headers": {"a": "1", "b": "2"}},
        {"headers": {"a": "1", "b": "2"}},
        id="methods-over-headers",
    ),
]


def _request(request: dict[str, Any]) -> dict[str, Any]:
    return {"host": "example.com", "path": "/", "method": "GET", "headers": {}, **request}


@pytest.mark.parametrize("reverse", [False, True], ids=["winner-first", "winner-last"])
@pytest.mark.parametrize(("winner", "loser", "request_"), WITHIN_KEY + BETWEEN_KEYS)
def test_precedence(winner: dict[str, Any], loser: dict[str, Any], request_: dict[str, Any], reverse: bool) -> None:
    routes = [route("winner", **winner), route("loser", **loser)]
    if reverse:
        routes.reverse()
    request = _request(request_)
    # Each route must match the request alone, or the case tests nothing.
    for r in routes:
        assert RouteTable([r]).match(**request) is r
    assert matched(routes, **request) == "winner"


# Key 5, config order, against each other key. The later route is better on
# one key, so it wins although it comes second. With all keys tied, the
# earlier route wins.
ORDER = [
    pytest.param({}, {"host": "*.example.com"}, {"host": "a.example.com"}, id="host-over-order"),
    pytest.param({}, {"path_prefix": "/"}, {"path": "/x"}, id="path-over-order"),
    pytest.param({}, {"methods": ["GET"]}, {}, id="methods-over-order"),
    pytest.param({}, {"headers": {"a": "1"}}, {"headers": {"a": "1"}}, id="headers-over-order"),
]


@pytest.mark.parametrize(("first", "second", "request_"), ORDER)
def test_other_keys_beat_config_order(first: dict[str, Any], second: dict[str, Any], request_: dict[str, Any]) -> None:
    routes = [route("first", **first), route("second", **second)]
    assert matched(routes, **_request(request_)) == "second"


@pytest.mark.parametrize(
    "match",
    [
        {},
        {"host": "a.example.com"},
        {"host": "*.example.com"},
        {"path": "/x"},
        {"path_prefix": "/x"},
        {"methods": ["GET"]},
        {"headers": {"a": "1"}},
        {"host": "*.example.com", "path_prefix": "/", "methods": ["GET", "POST"], "headers": {"a": "1"}},
    ],
)
def test_earlier_route_wins_a_tie(match: dict[str, Any]) -> None:
    routes = [route("first", **match), route("second", **match), route("third", **match)]
    request = _request({"host": "a.example.com", "path": "/x", "headers": {"a": "1"}})
    assert matched(routes, **request) == "first"


def test_tie_goes_to_config_order() -> None:
    # Different methods and headers, same count: a tie on keys 3 and 4.
    routes = [
        route("first", methods=["GET"], headers={"a": "1"}),
        route("second", methods=["GET", "POST"], headers={"b": "2"}),
    ]
    assert matched(routes, headers={"a": "1", "b": "2"}) == "first"
    assert matched(list(reversed(routes)), headers={"a": "1", "b": "2"}) == "second"


def test_several_hosts_rank_by_match() -> None:
    routes = [
        route("wild-path", host="*.example.com", path="/x"),
        route("multi", host=["*.example.com", "a.example.com"]),
    ]
    # For a.example.com, "multi" matched by its exact host: it wins on key 1.
    assert matched(routes, host="a.example.com", path="/x") == "multi"
    # For b.example.com both matched by the same wildcard: the exact path decides.
    assert matched(routes, host="b.example.com", path="/x") == "wild-path"


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        # The best route by host does not match the method: fall back to a wildcard.
        ({"host": "a.example.com", "method": "GET"}, "wildcard"),
        ({"host": "a.example.com", "method": "POST"}, "exact-post"),
        # The best wildcard does not match the path: fall back to a shorter one.
        ({"host": "x.b.example.com", "path": "/other"}, "wildcard"),
        ({"host": "x.b.example.com", "path": "/b"}, "wildcard-b"),
        # No host route matches the header: fall back to the host-less routes.
        ({"host": "c.org", "path": "/v1/x"}, "v1"),
        ({"host": "c.org", "path": "/v1/x", "headers": {"x-beta": "1"}}, "v1-beta"),
        ({"host": "c.org", "path": "/v1/x/y"}, "v1"),
        # A longer prefix that does not match the method: fall back to a shorter one.
        ({"host": "c.org", "path": "/v1/admin/x", "method": "GET"}, "v1"),
        ({"host": "c.org", "path": "/v1/admin/x", "method": "DELETE"}, "v1-admin-delete"),
        # An exact path that does not match: fall back to a prefix.
        ({"host": "c.org", "path": "/v1/login", "method": "GET"}, "v1"),
        ({"host": "c.org", "path": "/v1/login", "method": "POST"}, "login"),
        ({"host": "c.org", "path": "/v2"}, "default"),
        ({"host": None, "path": "/v2"}, "default"),
    ],
)
def test_falls_back_to_less_specific_routes(request_: dict[str, Any], expected: str) -> None:
    routes = [
        route("default"),
        route("v1", path_prefix="/v1"),
        route("v1-beta", path_prefix="/v1", headers={"x-beta": "1"}),
        route("v1-admin-delete", path_prefix="/v1/admin", methods=["DELETE"]),
        route("login", path="/v1/login", methods=["POST"]),
        route("exact-post", host="a.example.com", methods=["POST"]),
        route("wildcard", host="*.example.com"),
        route("wildcard-b", host="*.b.example.com", path="/b"),
    ]
    assert matched(routes, **_request(request_)) == expected


# --- No match --------------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        {"host": "other.org"},
        {"host": None},
        {"host": "api.example.com", "path": "/v2"},
        {"host": "api.example.com", "path": "/v1", "method": "DELETE"},
        {"host": "api.example.com", "path": "/v1", "method": "PUT", "headers": {"x-tenant": "other"}},
        {"host": "a.example.com"},
    ],
)
def test_no_match_returns_none(request_: dict[str, Any]) -> None:
    routes = [route("r", host="api.example.com", path_prefix="/v1", methods=["GET"])]
    routes.append(route("t", host="api.example.com", path_prefix="/v1", headers={"x-tenant": "acme"}, methods=["PUT"]))
    assert matched(routes, **_request(request_)) is None


def test_empty_table_matches_nothing() -> None:
    assert RouteTable([]).match("example.com", "/", "GET", {}) is None
    assert RouteTable([]).match(None, "/", "GET", {}) is None


# --- Config integration and scale -----------------------------------------

CONFIG = """
upstreams:
  catalog: {targets: ["http://10.0.0.1:8000"]}
  users: {targets: ["http://10.0.0.2:8000"]}
routes:
  - name: catalog
    upstream: catalog
    match: {host: [api.example.com, "*.api.example.com"], path_prefix: /v1/catalog}
    strip_prefix: /v1
  - name: users-write
    upstream: users
    match: {path_prefix: /v1/users, methods: [POST, PUT], headers: {X-Tenant: acme}}
    add_prefix: /internal
  - name: users
    upstream: users
    match: {path_prefix: /v1/users}
"""


@pytest.mark.parametrize(
    ("host", "path", "method", "headers", "expected", "upstream_path"),
    [
        ("API.example.com:443", "/v1/catalog/items", "GET", {}, "catalog", "/catalog/items"),
        ("eu.api.example.com", "/v1/catalog", "GET", {}, "catalog", "/catalog"),
        ("api.example.com", "/v1/catalogue", "GET", {}, None, None),
        ("api.example.com", "/v1/users/7", "PUT", {"x-tenant": "acme"}, "users-write", "/internal/v1/users/7"),
        (None, "/v1/users", "POST", {"x-tenant": "acme"}, "users-write", "/internal/v1/users"),
        (None, "/v1/users", "POST", {"x-tenant": "other"}, "users", "/v1/users"),
        (None, "/v1/users", "GET", {"x-tenant": "acme"}, "users", "/v1/users"),
    ],
)
def test_routes_from_parsed_config(
    host: str | None,
    path: str,
    method: str,
    headers: dict[str, str],
    expected: str | None,
    upstream_path: str | None,
) -> None:
    table = RouteTable(parse_config(CONFIG).routes)
    found = table.match(host, path, method, headers)
    if expected is None:
        assert found is None
    else:
        assert found is not None and found.name == expected
        assert rewrite_path(found, path) == upstream_path


def test_thousand_exact_hosts() -> None:
    routes = [route(f"svc{i}", host=f"svc{i}.example.com") for i in range(1000)]
    routes.append(route("svc-wild", host="*.example.com", path_prefix="/wild"))
    table = RouteTable(routes)
    for i in (0, 1, 2, 99, 100, 500, 998, 999):
        found = table.match(f"svc{i}.example.com", "/", "GET", {})
        assert found is routes[i]
        assert table.match(f"SVC{i}.Example.com:8080", "/x", "POST", {}) is routes[i]
    assert table.match("svc1000.example.com", "/", "GET", {}) is None
    assert table.match("svc1000.example.com", "/wild/x", "GET", {}) is routes[-1]
    assert table.match("svc10.example.org", "/", "GET", {}) is None
    assert table.match(None, "/", "GET", {}) is None


# --- Cross-check against a plain reference implementation -----------------


def _reference_match(
    routes: list[Route], host: str | None, path: str, method: str, headers: dict[str, str]
) -> Route | None:
    """Score every route by the documented keys and return the smallest; slow but plain."""
    name = None
    if host:
        parsed = urlsplit("//" + host).hostname or ""
        name = parsed.removesuffix(".")
    best = None
    for index, r in enumerate(routes):
        m = r.match
        hosts = [m.host] if isinstance(m.host, str) else (m.host or [])
        if not hosts:
            host_key: tuple[int, int] | None = (2, 0)
        else:
            host_key = None
            for pattern in hosts:
                pattern = pattern.lower().rstrip(".")
                if name is None:
                    continue
                if pattern.startswith("*."):
                    labels = name.split(".")
                    suffix_labels = pattern[2:].split(".")
                    n = len(suffix_labels)
                    ok = len(labels) > n and labels[-n:] == suffix_labels and all(labels[:-n])
                    key = (1, -len(pattern))
                else:
                    ok = name == pattern
                    key = (0, 0)
                if ok and (host_key is None or key < host_key):
                    host_key = key
            if host_key is None:
                continue
        if m.path is not None:
            if path != m.path:
                continue
            path_key = (0, 0)
        elif m.path_prefix is not None:
            p = m.path_prefix
            if not (p == "/" or path == p or path.startswith(p + "/")):
                continue
            path_key = (1, -len(p))
        else:
            path_key = (2, 0)
        if m.methods and method not in m.methods:
            continue
        lowered = {k.lower(): v for k, v in headers.items()}
        if any(lowered.get(k.lower()) != v for k, v in m.headers.items()):
            continue
        key = (host_key, path_key, 0 if m.methods else 1, -len(m.headers), index)
        if best is None or key < best[0]:
            best = (key, r)
    return None if best is None else best[1]


def test_matches_reference_implementation_on_random_tables() -> None:
    rng = random.Random(20240607)
    hosts = ["a.example.com", "b.example.com", "a.b.example.com", "example.com", "x.org"]
    wildcards = ["*.example.com", "*.b.example.com", "*.com", "*.org"]
    paths = ["/", "/v1", "/v1/x", "/v1/x/y", "/v2", "/v1x", "/v1/", "/v1/x/"]
    prefixes = ["/", "/v1", "/v1/x", "/v2", "/v1/x/y"]
    methods = ["GET", "POST", "PUT"]
    header_pool = [("x-a", "1"), ("X-B", "2"), ("x-c", "3")]
    request_hosts = [*hosts, "A.Example.COM:8080", "a.b.example.com.", "c.a.b.example.com", "other.net", None]
    for _table in range(200):
        routes = []
        for i in range(rng.randint(1, 25)):
            match: dict[str, Any] = {}
            roll = rng.random()
            if roll < 0.3:
                match["host"] = rng.choice(hosts + wildcards)
            elif roll < 0.45:
                match["host"] = rng.sample(hosts + wildcards, rng.randint(1, 3))
            roll = rng.random()
            if roll < 0.3:
                match["path"] = rng.choice(paths[:5])
            elif roll < 0.7:
                match["path_prefix"] = rng.choice(prefixes)
            if rng.random() < 0.4:
                match["methods"] = rng.sample(methods, rng.randint(1, 2))
            match["headers"] = dict(rng.sample(header_pool, rng.choice([0, 0, 1, 2])))
            routes.append(route(f"r{i}", **match))
        table = RouteTable(routes)
        for _request in range(50):
            host = rng.choice(request_hosts)
            path = rng.choice(paths)
            method = rng.choice(methods)
            headers = {k.lower(): v for k, v in rng.sample(header_pool, rng.randint(0, 3))}
            expected = _reference_match(routes, host, path, method, headers)
            assert table.match(host, path, method, headers) is expected, (routes, host, path, method, headers)


# --- rewrite_path ----------------------------------------------------------


@pytest.mark.parametrize(
    ("strip_prefix", "add_prefix", "path", "expected"),
    [
        # Neither: unchanged.
        (None, None, "/v1/x", "/v1/x"),
        (None, None, "/", "/"),
        # strip_prefix only, on a segment boundary.
        ("/v1", None, "/v1", "/"),
        ("/v1", None, "/v1/", "/"),
        ("/v1", None, "/v1/x", "/x"),
        ("/v1", None, "/v1/x/", "/x/"),
        ("/v1", None, "/v1/x/y", "/x/y"),
        ("/v1", None, "/v1//x", "//x"),
        ("/v1", None, "/v1x", "/v1x"),  # not a boundary: unchanged
        ("/v1", None, "/v1x/y", "/v1x/y"),
        ("/v1", None, "/v2/x", "/v2/x"),  # does not start with it: unchanged
        ("/v1", None, "/", "/"),
        ("/v1", None, "/x/v1", "/x/v1"),
        ("/v1/catalog", None, "/v1/catalog/items", "/items"),
        ("/v1/catalog", None, "/v1/catalogue", "/v1/catalogue"),
        ("/", None, "/x", "/x"),  # stripping "/" changes nothing
        ("/", None, "/", "/"),
        # add_prefix only: add_prefix + path.
        (None, "/api", "/x", "/api/x"),
        (None, "/api", "/x/", "/api/x/"),
        (None, "/api", "/", "/api/"),
        (None, "/api/v2", "/x/y", "/api/v2/x/y"),
        (None, "/", "/x", "/x"),  # adding "/" changes nothing
        # Both: strip first, then add.
        ("/v1", "/api", "/v1/x", "/api/x"),
        ("/v1", "/api", "/v1", "/api/"),
        ("/v1", "/api", "/v1/", "/api/"),
        ("/v1", "/api", "/v1x", "/api/v1x"),
        ("/v1", "/api", "/other", "/api/other"),
        ("/v1", "/v2", "/v1/x", "/v2/x"),
        # A path that does not start with "/" is never rewritten.
        ("/v1", "/api", "*", "*"),
    ],
)
def test_rewrite_path(strip_prefix: str | None, add_prefix: str | None, path: str, expected: str) -> None:
    assert rewrite_path(route("r", strip_prefix=strip_prefix, add_prefix=add_prefix), path) == expected
