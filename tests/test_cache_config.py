"""The cache config sections: defaults, and errors that name the key and the fix."""

from __future__ import annotations

import pytest

from nexus.config import ConfigError, parse_config

BASE = """
upstreams:
  app: {targets: ["http://127.0.0.1:9000"]}
routes:
  - {name: r, upstream: app, cache: CACHE}
"""


def _parse(cache: str, extra: str = ""):
    return parse_config(BASE.replace("CACHE", cache) + extra)


def test_defaults():
    route_cache = _parse("{}").routes[0].cache
    assert route_cache.enabled
    assert route_cache.key.query == "all"
    assert route_cache.coalesce_timeout == 5.0
    assert 200 in route_cache.statuses
    assert 302 not in route_cache.statuses


@pytest.mark.parametrize(
    ("cache", "extra", "message"),
    [
        ("{key: {headers: [authorization]}}", "", 'routes[0].cache.key.headers[0]: "authorization" cannot be part of a cache key'),
        ("{key: {headers: [connection]}}", "", 'routes[0].cache.key.headers[0]: "connection" is a hop-by-hop field'),
        ("{key: {query: ['a=b']}}", "", "routes[0].cache.key.query[0]: invalid parameter name"),
        ("{statuses: [99]}", "", "routes[0].cache.statuses[0]: invalid status 99"),
        ("{default_ttl: 2m, max_ttl: 1m}", "", "routes[0].cache.default_ttl: 120s is longer than max_ttl"),
        ("{max_object: 2MiB}", "", "routes[0].cache.max_object: 2097152 bytes is outside"),
        ("{coalesce_timeout: 0s}", "", "routes[0].cache.coalesce_timeout: invalid duration 0s"),
        ("{}", "cache: {l2: true}\n", "cache.l2: true needs a redis section"),
        ("{ttl: 1s}", "", "ttl"),
        ("{key: {consumer: true}}", "", "routes[0].cache.key.consumer: true on a route with auth: none"),
    ],
)
def test_errors_name_the_key(cache, extra, message):
    with pytest.raises(ConfigError) as error:
        _parse(cache, extra)
    assert message in str(error.value)
