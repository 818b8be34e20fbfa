"""RFC 9111 shared-cache rules through a real gateway, against an upstream that sets the fields under test."""

from __future__ import annotations

import time

import pytest

from tests.e2e.cache_support import http_date, origin  # noqa: F401 - fixtures
from tests.e2e.proxy_support import send

pytestmark = pytest.mark.e2e



def _config(upstream_url: str, cache: str = "{}", extra_routes: str = "") -> str:
    return f"""
listen: ["127.0.0.1:0"]
workers: 2
upstreams:
  app: {{targets: ["{upstream_url}"]}}
routes:
{extra_routes}  - {{name: cached, upstream: app, cache: {cache}}}
"""


@pytest.fixture
def cached(origin, gateway_factory):
    """A gateway with one cached route to `origin`, with route cache settings given as YAML flow text."""

    def start(cache: str = "{}", extra_routes: str = ""):
        return gateway_factory(_config(origin.url, cache, extra_routes)).url

    return start


def _status(reply) -> str:
    return reply.header("cache-status") or ""


def test_max_age_hit_then_age(origin, cached):
    url = cached()
    origin.respond("/a", headers=[("Cache-Control", "max-age=60")], body=b"one")
    first = send(url, "/a")
    assert first.status == 200
    assert "fwd=uri-miss" in _status(first)
    assert "stored" in _status(first)
    time.sleep(1.1)
    second = send(url, "/a")
    assert second.body == b"one"
    assert _status(second).startswith("Nexus; hit; ttl=")
    assert int(second.header("age")) >= 1
    # The stored Date is sent as stored, and the HTTP server adds no second one.
    assert len(second.header_values("date")) == 1
    assert origin.count("/a") == 1


def test_s_maxage_wins_over_max_age(origin, cached):
    url = cached()
    origin.respond("/s", headers=[("Cache-Control", "max-age=0, s-maxage=60")])
    send(url, "/s")
    assert "hit" in _status(send(url, "/s"))
    assert origin.count("/s") == 1


def test_expires_gives_freshness(origin, cached):
    url = cached()
    origin.respond("/e", headers=[("Expires", http_date(60))])
    send(url, "/e")
    assert "hit" in _status(send(url, "/e"))
    origin.respond("/e0", headers=[("Expires", "0")])
    send(url, "/e0")
    send(url, "/e0")
    assert origin.count("/e0") == 2


def test_heuristic_from_last_modified(origin, cached):
    url = cached()
    # Modified 1000 s ago: 10% gives 100 s of freshness.
    origin.respond("/h", headers=[("Last-Modified", http_date(-1000))])
    send(url, "/h")
    hit = send(url, "/h")
    assert "hit" in _status(hit)
    ttl = int(_status(hit).split("ttl=")[1].split(";")[0])
    assert 90 <= ttl <= 100
    assert origin.count("/h") == 1


def test_heuristic_only_for_heuristic_statuses(origin, cached):
    url = cached("{statuses: [200, 302]}")
    origin.respond("/r", status=302, headers=[("Last-Modified", http_date(-1000)), ("Location", "/x")])
    send(url, "/r")
    send(url, "/r")
    assert origin.count("/r") == 2


def test_default_ttl_replaces_heuristic(origin, cached):
    url = cached("{default_ttl: 30s}")
    origin.respond("/d", headers=[("Last-Modified", http_date(-100000))])
    send(url, "/d")
    hit = send(url, "/d")
    assert "hit" in _status(hit), hit.headers
    ttl = int(_status(hit).split("ttl=")[1].split(";")[0])
    assert 28 <= ttl <= 30


def test_max_ttl_caps_lifetime(origin, cached):
    url = cached("{max_ttl: 1s}")
    origin.respond("/m", headers=[("Cache-Control", "max-age=600")])
    send(url, "/m")
    time.sleep(1.2)
    send(url, "/m")
    assert origin.count("/m") == 2


@pytest.mark.parametrize("directive", ["no-store", "private"])
def test_response_directive_prevents_storing(origin, cached, directive):
    url = cached()
    origin.respond("/p", headers=[("Cache-Control", f"max-age=60, {directive}")])
    first = send(url, "/p")
    assert f"detail={directive}" in _status(first)
    send(url, "/p")
    assert origin.count("/p") == 2


def test_no_cache_response_revalidates_each_time(origin, cached):
    url = cached()
    origin.respond("/nc", headers=[("Cache-Control", "no-cache"), ("ETag", '"v1"')], body=b"body")
    send(url, "/nc")
    second = send(url, "/nc")
    assert second.status == 200
    assert second.body == b"body"
    assert "fwd-status=304" in _status(second)
    assert origin.last("/nc").headers.get("if-none-match") == '"v1"'
    assert origin.count("/nc") == 2


@pytest.mark.parametrize("directive", ["must-revalidate", "proxy-revalidate", "s-maxage=1"])
def test_revalidate_directives_never_stale(origin, cached, directive):
    url = cached("{stale_while_revalidate: 60s, stale_if_error: 60s}")
    origin.respond("/mr", headers=[("Cache-Control", f"max-age=1, {directive}"), ("ETag", '"m"')])
    send(url, "/mr")
    time.sleep(1.2)
    reply = send(url, "/mr")
    assert "hit" not in _status(reply)
    assert "fwd-status=304" in _status(reply)
    assert origin.count("/mr") == 2
    # With the upstream failing, stale-if-error does not apply either.
    origin.respond("/mr", status=503, headers=[("Cache-Control", "no-store")])
    time.sleep(1.2)
    assert send(url, "/mr").status == 503


def test_authorization_needs_permission(origin, cached):
    url = cached()
    auth = [("Authorization", "Bearer x")]
    origin.respond("/auth", headers=[("Cache-Control", "max-age=60")])
    assert "detail=authorization" in _status(send(url, "/auth", headers=auth))
    send(url, "/auth", headers=auth)
    assert origin.count("/auth") == 2
    origin.respond("/auth-public", headers=[("Cache-Control", "public, max-age=60")])
    send(url, "/auth-public", headers=auth)
    assert "hit" in _status(send(url, "/auth-public", headers=auth))
    assert origin.count("/auth-public") == 1


def test_vary_secondary_keys(origin, cached):
    url = cached()
    origin.respond("/v", headers=[("Cache-Control", "max-age=60"), ("Vary", "Accept-Language")])
    send(url, "/v", headers=[("Accept-Language", "en")])
    other = send(url, "/v", headers=[("Accept-Language", "de")])
    assert "fwd=vary-miss" in _status(other)
    assert "hit" in _status(send(url, "/v", headers=[("Accept-Language", "en")]))
    assert "hit" in _status(send(url, "/v", headers=[("Accept-Language", "de")]))
    assert origin.count("/v") == 2


def test_vary_star_never_matches(origin, cached):
    url = cached()
    origin.respond("/vs", headers=[("Cache-Control", "max-age=60"), ("Vary", "*")])
    send(url, "/vs")
    send(url, "/vs")
    assert origin.count("/vs") == 2


def test_revalidation_304_updates_headers(origin, cached):
    url = cached()
    origin.respond("/rv", headers=[("Cache-Control", "max-age=1"), ("ETag", '"e1"'), ("X-Version", "1")], body=b"B")
    send(url, "/rv")
    time.sleep(1.2)
    origin.respond("/rv", headers=[("Cache-Control", "max-age=60"), ("ETag", '"e1"'), ("X-Version", "2")], body=b"B")
    revalidated = send(url, "/rv")
    assert revalidated.status == 200
    assert revalidated.body == b"B"
    assert "fwd=stale" in _status(revalidated)
    assert "fwd-status=304" in _status(revalidated)
    assert revalidated.header("x-version") == "2"
    hit = send(url, "/rv")
    assert "hit" in _status(hit)
    assert hit.header("x-version") == "2"
    assert origin.count("/rv") == 2


def test_last_modified_validation(origin, cached):
    url = cached()
    modified = http_date(-3600)
    origin.respond("/lm", headers=[("Cache-Control", "max-age=1"), ("Last-Modified", modified)], body=b"L")
    send(url, "/lm")
    time.sleep(1.2)
    reply = send(url, "/lm")
    assert reply.body == b"L"
    assert "fwd-status=304" in _status(reply)
    assert origin.last("/lm").headers.get("if-modified-since") == modified


def test_head_from_stored_get(origin, cached):
    url = cached()
    origin.respond("/head", headers=[("Cache-Control", "max-age=60")], body=b"12345")
    send(url, "/head")
    head = send(url, "/head", method="HEAD")
    assert head.status == 200
    assert head.body == b""
    assert "hit" in _status(head)
    assert head.header("content-length") == "5"
    assert origin.count("/head") == 1


def test_stale_while_revalidate_background(origin, cached):
    url = cached()
    origin.respond("/swr", headers=[("Cache-Control", "max-age=1, stale-while-revalidate=30"), ("ETag", '"s"')], body=b"old")
    send(url, "/swr")
    time.sleep(1.2)
    origin.respond("/swr", headers=[("Cache-Control", "max-age=60"), ("ETag", '"t"')], body=b"new")
    stale = send(url, "/swr")
    assert stale.body == b"old"
    assert "detail=stale" in _status(stale)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and origin.count("/swr") < 2:
        time.sleep(0.02)
    time.sleep(0.2)
    fresh = send(url, "/swr")
    assert fresh.body == b"new"
    assert "hit" in _status(fresh)
    assert origin.count("/swr") == 2


def test_stale_if_error(origin, cached):
    url = cached()
    origin.respond("/sie", headers=[("Cache-Control", "max-age=1, stale-if-error=60")], body=b"good")
    send(url, "/sie")
    time.sleep(1.2)
    origin.respond("/sie", status=503, body=b"down")
    reply = send(url, "/sie")
    assert reply.status == 200
    assert reply.body == b"good"
    assert "fwd-status=503" in _status(reply)
    assert "stale-if-error" in _status(reply)


def test_unsafe_method_invalidates(origin, cached):
    url = cached()
    origin.respond("/u", headers=[("Cache-Control", "max-age=60")])
    origin.respond("/u2", headers=[("Cache-Control", "max-age=60")])
    send(url, "/u")
    send(url, "/u2")
    origin.respond("/u", status=200, headers=[("Location", "/u2")], body=b"posted")
    posted = send(url, "/u", method="POST", body=b"x")
    assert posted.status == 200
    assert posted.header("cache-status") == "Nexus; fwd=method"
    origin.respond("/u", headers=[("Cache-Control", "max-age=60")])
    assert "uri-miss" in _status(send(url, "/u"))
    assert "uri-miss" in _status(send(url, "/u2"))


def test_unsafe_error_keeps_entry(origin, cached):
    url = cached()
    origin.respond("/ue", headers=[("Cache-Control", "max-age=60")])
    send(url, "/ue")
    origin.respond("/ue", status=500)
    send(url, "/ue", method="DELETE")
    origin.respond("/ue", headers=[("Cache-Control", "max-age=60")])
    assert "hit" in _status(send(url, "/ue"))


def test_request_no_cache_forwards(origin, cached):
    url = cached()
    origin.respond("/rnc", headers=[("Cache-Control", "max-age=60")])
    send(url, "/rnc")
    reply = send(url, "/rnc", headers=[("Cache-Control", "no-cache")])
    assert "fwd=request" in _status(reply)
    assert origin.count("/rnc") == 2


def test_request_no_store_not_stored(origin, cached):
    url = cached()
    origin.respond("/rns", headers=[("Cache-Control", "max-age=60")])
    send(url, "/rns", headers=[("Cache-Control", "no-store")])
    assert "uri-miss" in _status(send(url, "/rns"))


def test_request_max_age_and_min_fresh(origin, cached):
    url = cached()
    origin.respond("/ma", headers=[("Cache-Control", "max-age=60")])
    send(url, "/ma")
    time.sleep(1.1)
    assert "fwd=request" in _status(send(url, "/ma", headers=[("Cache-Control", "max-age=0")]))
    assert "fwd=request" in _status(send(url, "/ma", headers=[("Cache-Control", "min-fresh=120")]))
    assert "hit" in _status(send(url, "/ma", headers=[("Cache-Control", "min-fresh=10")]))


def test_request_max_stale(origin, cached):
    url = cached()
    origin.respond("/ms", headers=[("Cache-Control", "max-age=1")])
    send(url, "/ms")
    time.sleep(1.3)
    reply = send(url, "/ms", headers=[("Cache-Control", "max-stale=60")])
    assert "hit" in _status(reply)
    assert "ttl=-" in _status(reply)
    assert origin.count("/ms") == 1


def test_only_if_cached_504(origin, cached):
    url = cached()
    reply = send(url, "/oic", headers=[("Cache-Control", "only-if-cached")])
    assert reply.status == 504
    assert origin.count("/oic") == 0


def test_conditional_downstream_gets_304(origin, cached):
    url = cached()
    origin.respond("/cond", headers=[("Cache-Control", "max-age=60"), ("ETag", '"c1"')], body=b"abc")
    send(url, "/cond")
    reply = send(url, "/cond", headers=[("If-None-Match", '"c1"')])
    assert reply.status == 304
    assert reply.body == b""
    assert reply.header("etag") == '"c1"'
    assert send(url, "/cond", headers=[("If-None-Match", '"other"')]).status == 200
    assert origin.count("/cond") == 1


def test_query_order_normalised(origin, cached):
    url = cached()
    origin.respond("/q?a=1&b=2", headers=[("Cache-Control", "max-age=60")])
    origin.respond("/q?b=2&a=1", headers=[("Cache-Control", "max-age=60")])
    send(url, "/q?a=1&b=2")
    assert "hit" in _status(send(url, "/q?b=2&a=1"))
    assert origin.count() == 1


def test_key_query_list_and_headers(origin, cached):
    url = cached("{key: {query: [page], headers: [x-tenant]}}")
    origin.respond("/k", headers=[("Cache-Control", "max-age=60")])
    send(url, "/k?page=1&utm=a", headers=[("X-Tenant", "t1")])
    assert "hit" in _status(send(url, "/k?utm=b&page=1", headers=[("X-Tenant", "t1")]))
    assert "uri-miss" in _status(send(url, "/k?page=1", headers=[("X-Tenant", "t2")]))
    assert "uri-miss" in _status(send(url, "/k?page=2", headers=[("X-Tenant", "t1")]))


def test_age_from_upstream_counts(origin, cached):
    url = cached()
    origin.respond("/age", headers=[("Cache-Control", "max-age=60"), ("Age", "50")])
    send(url, "/age")
    hit = send(url, "/age")
    assert int(hit.header("age")) >= 50
    ttl = int(_status(hit).split("ttl=")[1].split(";")[0])
    assert ttl <= 10
