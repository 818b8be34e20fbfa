"""The pure RFC 9111 rules of nexus.cache.policy, key building and Cache-Status, without I/O."""

from __future__ import annotations

import pytest

from nexus.cache import policy
from nexus.cache.key import KeyRules, normalise_query, parse_key, secondary_key, vary_values
from nexus.cache.response import cache_status, is_not_modified, updated_headers
from nexus.config.model import CacheKey

ALL = frozenset(range(200, 600))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["max-age=60"], {"max-age": "60"}),
        (["Max-Age=60, No-Cache"], {"max-age": "60", "no-cache": None}),
        (['private="set-cookie, x", max-age=1'], {"private": "set-cookie, x", "max-age": "1"}),
        (["max-age=1", "max-age=2"], {"max-age": "1"}),
        ([" , ,public"], {"public": None}),
    ],
)
def test_parse_cache_control(values, expected):
    assert policy.parse_cache_control(values) == expected


def _lifetime(status=200, cc="", date=1000.0, expires=None, last_modified=None, default_ttl=None, max_ttl=None):
    directives = policy.parse_cache_control([cc] if cc else [])
    return policy.freshness_lifetime(status, directives, date, expires, last_modified, 1000.0, default_ttl, max_ttl)


def test_lifetime_order():
    assert _lifetime(cc="max-age=10, s-maxage=20").lifetime == 20
    assert _lifetime(cc="max-age=10", expires="Thu, 01 Jan 2099 00:00:00 GMT").lifetime == 10
    assert _lifetime(expires="Thu, 01 Jan 1970 00:20:00 GMT").lifetime == 200
    assert _lifetime(expires="0").lifetime == 0
    assert _lifetime(cc="max-age=abc").lifetime == 0


def test_lifetime_heuristic_and_default():
    heuristic = _lifetime(last_modified=0.0)
    assert heuristic.lifetime == pytest.approx(100.0)
    assert heuristic.heuristic
    assert _lifetime(status=302, last_modified=0.0).lifetime == 0
    assert _lifetime(last_modified=0.0, default_ttl=5.0).lifetime == 5.0
    assert _lifetime(cc="max-age=100", max_ttl=3.0).lifetime == 3.0


def _reason(status=200, cc="", request=policy.PLAIN_REQUEST, authorization=False, expires=False, default_ttl=False):
    directives = policy.parse_cache_control([cc] if cc else [])
    return policy.storable_reason(status, directives, request, authorization, expires, ALL, default_ttl)


def test_storable_reasons():
    assert _reason(cc="max-age=1") is None
    assert _reason(cc="no-store, max-age=1") == "no-store"
    assert _reason(cc="private, max-age=1") == "private"
    assert _reason(cc="max-age=1", authorization=True) == "authorization"
    assert _reason(cc="s-maxage=1", authorization=True) is None
    assert _reason(cc="must-revalidate, max-age=1", authorization=True) is None
    assert _reason(status=302) == "no-freshness"
    assert _reason(status=302, default_ttl=True) is None
    assert _reason(cc="max-age=1", request=policy.RequestDirectives(no_store=True)) == "no-store"
    assert policy.storable_reason(500, {}, policy.PLAIN_REQUEST, False, False, frozenset({200}), False) == "status"


def test_request_directives():
    parsed = policy.request_directives(["max-age=5, min-fresh=2, max-stale, only-if-cached"], [])
    assert parsed.max_age == 5
    assert parsed.min_fresh == 2
    assert parsed.max_stale == -1
    assert parsed.only_if_cached
    assert policy.request_directives([], ["no-cache"]).no_cache
    assert not policy.request_directives(["max-age=1"], ["no-cache"]).no_cache


def test_initial_age():
    assert policy.initial_age("10", 100.0, 100.0, 101.0) == 11.0
    assert policy.initial_age(None, 90.0, 100.0, 100.5) == 10.5


def test_may_serve_stale():
    flags = policy.response_flags(policy.parse_cache_control(["max-age=1, must-revalidate"]))
    assert not policy.may_serve_stale(flags, 1.0, policy.RequestDirectives(max_stale=-1), 60)
    assert policy.may_serve_stale(0, 1.0, policy.PLAIN_REQUEST, 60)
    assert not policy.may_serve_stale(0, 61.0, policy.PLAIN_REQUEST, 60)
    assert policy.may_serve_stale(0, 61.0, policy.RequestDirectives(max_stale=100), 0)


def test_query_normalised_and_filtered():
    assert normalise_query(b"b=2&a=1&&a=0", None) == b"a=1&a=0&b=2"
    # A repeated name keeps the order of its values: these are two requests.
    assert normalise_query(b"a=2&a=1", None) != normalise_query(b"a=1&a=2", None)
    assert normalise_query(b"b=2&a=1&utm=x", frozenset({"a", "b"})) == b"a=1&b=2"


def test_key_layout_and_parse():
    rules = KeyRules("r", CacheKey(query="all", headers=["x-t"], consumer=True))
    key = rules.primary("/p", b"b=1&a=2", "Example.COM", [(b"x-t", b"7")], "alice")
    assert key.startswith(b"/p?a=2&b=1\x00example.com\x00r\x00")
    assert parse_key(key) == ("/p", b"a=2&b=1", "example.com", "r")
    assert parse_key(secondary_key(key, b"v"))[:3] == ("/p", b"a=2&b=1", "example.com")
    assert KeyRules("r", CacheKey(query="none")).primary("/p", b"a=1", None, [], None) == b"/p\x00\x00r\x00"


def test_vary_values_normalised():
    assert vary_values(["accept"], [(b"accept", b"a, b")]) == vary_values(["accept"], [(b"accept", b"a,b")])
    assert vary_values(["accept"], [(b"accept", b"a")]) != vary_values(["accept"], [(b"accept", b"b")])


def test_conditions():
    assert is_not_modified([b'W/"x"'], None, '"x"', None)
    assert is_not_modified([b'"a", "x"'], None, '"x"', None)
    assert not is_not_modified([b'"y"'], b"Thu, 01 Jan 2099 00:00:00 GMT", '"x"', "Thu, 01 Jan 2000 00:00:00 GMT")
    assert is_not_modified([], b"Thu, 01 Jan 2099 00:00:00 GMT", None, "Thu, 01 Jan 2000 00:00:00 GMT")
    assert not is_not_modified([], b"Thu, 01 Jan 1999 00:00:00 GMT", None, "Thu, 01 Jan 2000 00:00:00 GMT")


def test_304_updates_headers_but_not_framing():
    stored = [(b"etag", b'"1"'), (b"content-type", b"text/plain"), (b"x-v", b"1"), (b"content-length", b"3")]
    fresh = [(b"x-v", b"2"), (b"content-type", b"text/html"), (b"content-length", b"0")]
    merged = dict(updated_headers(stored, fresh))
    assert merged[b"x-v"] == b"2"
    assert merged[b"content-type"] == b"text/plain"
    assert merged[b"content-length"] == b"3"


def test_cache_status_values():
    assert cache_status(b"hit", 42.7) == b"Nexus; hit; ttl=42"
    assert cache_status(b"hit", -0.3, b"detail=stale") == b"Nexus; hit; ttl=-1; detail=stale"
    assert cache_status(b"fwd=miss", None, b"stored") == b"Nexus; fwd=miss; stored"
