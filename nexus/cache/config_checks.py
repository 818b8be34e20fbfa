"""Checks of the cache config sections that msgspec's types cannot express."""

from __future__ import annotations

from collections.abc import Callable

from nexus.config.model import Config, ConfigError, RouteCache
from nexus.units import show_value

__all__ = ["check_cache"]

# Request fields that a cache key must not name: they are per hop, or they
# would make every request its own key while leaking credentials into keys.
# Credentials: keying on them would make one entry per user, and the
# consumer is the better key for that.
_KEY_HEADERS_CREDENTIALS = frozenset({"authorization", "cookie", "proxy-authorization"})
# Hop-by-hop fields describe the connection, not the request.
_KEY_HEADERS_HOP_BY_HOP = frozenset({"connection", "te", "upgrade"})


def check_cache(config: Config, check_header_name: Callable[[str, str], None]) -> None:
    """Check the node-level `cache` section and every route's `cache` mapping."""
    if config.cache.l2 and config.redis is None:
        raise ConfigError("cache.l2: true needs a redis section: add redis.url (or redis.cluster), or set l2: false")
    for i, name in enumerate(config.cache.tag_headers):
        check_header_name(f"cache.tag_headers[{i}]", name)
    for i, route in enumerate(config.routes):
        if route.cache is not None:
            _check_route_cache(f"routes[{i}].cache", route.cache, config.shared_memory.cache_max_object, check_header_name)
            if route.cache.key.consumer and route.auth == "none":
                raise ConfigError(
                    f"routes[{i}].cache.key.consumer: true on a route with auth: none, where no request has a "
                    "consumer: set auth: api_key or optional on the route, or key.consumer: false"
                )


def _check_route_cache(where: str, cache: RouteCache, store_max_object: int, check_header_name) -> None:
    for i, name in enumerate(cache.key.headers):
        check_header_name(f"{where}.key.headers[{i}]", name)
        if name.lower() in _KEY_HEADERS_HOP_BY_HOP:
            raise ConfigError(
                f"{where}.key.headers[{i}]: {show_value(name)} is a hop-by-hop field, which describes the "
                "connection rather than the request: remove it from key.headers"
            )
        if name.lower() in _KEY_HEADERS_CREDENTIALS:
            raise ConfigError(
                f"{where}.key.headers[{i}]: {show_value(name)} cannot be part of a cache key: "
                "use key.consumer: true to key by API key holder"
            )
    if isinstance(cache.key.query, list):
        for i, name in enumerate(cache.key.query):
            if not name or "&" in name or "=" in name:
                raise ConfigError(
                    f"{where}.key.query[{i}]: invalid parameter name {show_value(name)}: "
                    'expected a name without "&" or "=", or use "all" or "none"'
                )
    for i, status in enumerate(cache.statuses):
        if not 200 <= status <= 599:
            raise ConfigError(f"{where}.statuses[{i}]: invalid status {status}: expected a final status, 200 to 599")
    if cache.default_ttl is not None and cache.default_ttl <= 0:
        raise ConfigError(f"{where}.default_ttl: invalid duration 0s: must be greater than 0, or leave it out")
    if cache.max_ttl is not None and cache.max_ttl <= 0:
        raise ConfigError(f"{where}.max_ttl: invalid duration 0s: must be greater than 0, or leave it out")
    if cache.max_ttl is not None and cache.default_ttl is not None and cache.default_ttl > cache.max_ttl:
        raise ConfigError(
            f"{where}.default_ttl: {cache.default_ttl:g}s is longer than max_ttl ({cache.max_ttl:g}s): "
            "lower default_ttl or raise max_ttl"
        )
    if cache.max_object is not None and not 1 <= cache.max_object <= store_max_object:
        raise ConfigError(
            f"{where}.max_object: {cache.max_object} bytes is outside 1 byte to shared_memory.cache_max_object "
            f"({store_max_object} bytes): lower it or raise shared_memory.cache_max_object"
        )
    if cache.coalesce_timeout <= 0:
        raise ConfigError(f"{where}.coalesce_timeout: invalid duration 0s: must be greater than 0, such as 5s")
