"""Checks of the access-control sections: API keys, tiers, consumers, route auth and policies.

They run after the rest of the config is checked (`checks._validate`) and
raise ConfigError with the path of the offending key, as the other checks do.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from nexus.config.model import Config, ConfigError, Consumer, Policy, Route, RouteRateLimit
from nexus.units import show_value

__all__ = ["check_access", "check_limit_values", "check_redis"]

# An API key hash as `nexusctl key hash` prints it.
_KEY_HASH = re.compile(r"sha256:[0-9a-f]{64}")

# The parts a policy key may combine.
_KEY_PARTS = ("route", "consumer", "client_ip")
_HEADER_PART = re.compile(r"header:([!#$%&'*+.^_`|~0-9A-Za-z-]+)")

# A query parameter name: unreserved URI characters only.
_QUERY_NAME = re.compile(r"[A-Za-z0-9._~-]+")

# GCRA keeps times in microseconds: the emission interval must be at least 1 us,
# and burst x interval must fit the 48-bit time field with room to spare.
_MAX_RATE = 1_000_000.0
_MAX_BURST_SECONDS = 1 << 20  # about 12 days of burst
_MAX_QUOTA = (1 << 32) - 1


def check_access(config: Config, check_name, check_header_name) -> None:
    """Check api_keys, tiers, consumers, and every route's auth and policies.

    `check_name` and `check_header_name` are the shared name checks of
    nexus.config.checks, passed in to keep one definition of each.
    """
    _check_api_keys(config, check_header_name)
    for name, tier in config.tiers.items():
        check_name(f"tiers.{name}", "tier", name)
        if tier.rate_limit is not None:
            check_limit_values(f"tiers.{name}.rate_limit", tier.rate_limit)
    _check_consumers(config, check_name)
    for i, route in enumerate(config.routes):
        _check_route_access(f"routes[{i}]", route, config, check_name)


def check_limit_values(where: str, limit: RouteRateLimit | Policy, cost: int = 1) -> None:
    """Check a rate and burst, a quota, or both, as a route limit, tier, consumer or policy gives them."""
    if limit.rate is None and limit.burst != 1:
        raise ConfigError(f"{where}.burst: a burst applies to a rate: add rate (such as 100/s) or remove burst")
    if limit.rate is None and limit.quota is None:
        raise ConfigError(f"{where}: set rate (such as 100/s), quota (such as 300/min), or both")
    if limit.rate is not None and limit.rate > _MAX_RATE:
        raise ConfigError(f"{where}.rate: {_show_rate(limit.rate)} is above the largest rate, 1000000/s")
    if limit.rate is not None and limit.rate < 1 / _MAX_BURST_SECONDS:
        raise ConfigError(
            f"{where}.rate: {_show_rate(limit.rate)} is below the smallest rate, one request per "
            f"{_MAX_BURST_SECONDS} s (about 12 days): use a quota for long windows, such as 10/day"
        )
    if limit.rate is not None and limit.burst / limit.rate > _MAX_BURST_SECONDS:
        raise ConfigError(
            f"{where}.burst: a burst of {limit.burst} at {_show_rate(limit.rate)} takes more than "
            f"{_MAX_BURST_SECONDS} s (about 12 days) to earn back: lower the burst or use a quota"
        )
    if limit.quota is not None and limit.quota.requests > _MAX_QUOTA:
        raise ConfigError(f"{where}.quota: {limit.quota.requests} requests is above the largest quota, {_MAX_QUOTA}")
    if limit.rate is not None and cost > limit.burst:
        raise ConfigError(
            f"{where}.cost: a cost of {cost} is above the burst of {limit.burst}, so no request could ever pass: "
            f"raise burst to at least {cost}"
        )
    if limit.quota is not None and cost > limit.quota.requests:
        raise ConfigError(
            f"{where}.cost: a cost of {cost} is above the quota of {limit.quota.requests}, so no request could "
            "ever pass: lower cost or raise the quota"
        )


def check_redis(config: Config) -> None:
    """Check the redis section: exactly one of url and cluster, with redis:// URLs."""
    redis = config.redis
    if redis is None:
        return
    if (redis.url is None) == (not redis.cluster):
        raise ConfigError(
            'redis: set url (one server, such as "redis://127.0.0.1:6379/0") or cluster (a list of seed nodes), '
            "not both and not neither"
        )
    urls = [("redis.url", redis.url)] if redis.url is not None else [(f"redis.cluster[{i}]", url) for i, url in enumerate(redis.cluster)]
    for where, url in urls:
        _check_redis_url(where, url, cluster=bool(redis.cluster))
    if redis.sync_interval <= 0 or redis.timeout <= 0:
        name = "sync_interval" if redis.sync_interval <= 0 else "timeout"
        raise ConfigError(f"redis.{name}: invalid duration 0s: must be greater than 0, such as 100ms")
    if not _KEY_PREFIX.fullmatch(redis.key_prefix):
        raise ConfigError(
            f'redis.key_prefix: invalid prefix {show_value(redis.key_prefix)}: use letters, digits, "_", "-", '
            '"." and ":" only, such as "nexus"'
        )


_KEY_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def _check_redis_url(where: str, url: str, cluster: bool) -> None:
    expected = 'expected redis://host:port/db or rediss://host:port/db, such as "redis://127.0.0.1:6379/0"'
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(f"{where}: invalid Redis URL {show_value(url)}: {expected}")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when it is read
    except ValueError:
        raise ConfigError(f"{where}: invalid Redis URL {show_value(url)}: the port must be from 1 to 65535") from None
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ConfigError(f"{where}: invalid Redis URL {show_value(url)}: the database must be a number: {expected}")
    if cluster and database not in ("", "0"):
        raise ConfigError(f"{where}: Redis Cluster has only database 0: remove {show_value(parts.path)} from the URL")


def _show_rate(rate: float) -> str:
    """Write a rate in requests per second without exponents: 1000001/s, 0.5/s."""
    text = f"{rate:.9f}".rstrip("0").rstrip(".")
    return f"{text}/s"


def _check_api_keys(config: Config, check_header_name) -> None:
    source = config.api_keys
    if source.header is None and source.query is None:
        raise ConfigError('api_keys: set header (such as "x-api-key"), query (such as "api_key"), or both')
    if source.header is not None:
        check_header_name("api_keys.header", source.header)
    if source.query is not None and not _QUERY_NAME.fullmatch(source.query):
        raise ConfigError(
            f'api_keys.query: invalid query parameter name {show_value(source.query)}: use only letters, digits, '
            '"-", ".", "_" and "~", such as "api_key"'
        )


def _check_consumers(config: Config, check_name) -> None:
    owners: dict[str, str] = {}
    tiers = ", ".join(config.tiers) or "none"
    for name, consumer in config.consumers.items():
        where = f"consumers.{name}"
        check_name(where, "consumer", name)
        if consumer.tier not in config.tiers:
            raise ConfigError(f'{where}.tier: unknown tier "{consumer.tier}" (defined: {tiers})')
        _check_keys(where, consumer, owners, name)
        if consumer.rate_limit is not None:
            check_limit_values(f"{where}.rate_limit", consumer.rate_limit)


def _check_keys(where: str, consumer: Consumer, owners: dict[str, str], name: str) -> None:
    if not consumer.keys:
        raise ConfigError(f"{where}.keys: at least one API key hash is required; `nexusctl key new` makes one")
    for i, key in enumerate(consumer.keys):
        if not _KEY_HASH.fullmatch(key):
            raise ConfigError(
                f"{where}.keys[{i}]: invalid API key hash {show_value(_shorten(key))}: expected \"sha256:\" and "
                "64 lowercase hex digits, as `nexusctl key hash` prints; never put the key itself in the config"
            )
        if key in owners:
            raise ConfigError(f'{where}.keys[{i}]: this key hash also belongs to consumer "{owners[key]}"')
        owners[key] = name


def _shorten(key: str) -> str:
    # An invalid value may be a raw key put here by mistake (with or without
    # the "sha256:" prefix), so only its start is shown in messages and logs.
    prefix = "sha256:" if key.startswith("sha256:") else ""
    rest = key[len(prefix) :]
    return key if len(rest) <= 4 else f"{prefix}{rest[:4]}..."


def _check_route_access(where: str, route: Route, config: Config, check_name) -> None:
    if route.auth != "none" and not config.consumers:
        raise ConfigError(
            f'{where}.auth: "{route.auth}" needs consumers with API keys under consumers, and none are defined'
        )
    if route.rate_limit is not None:
        check_limit_values(f"{where}.rate_limit", route.rate_limit)
    names: dict[str, int] = {}
    for j, policy in enumerate(route.policies):
        policy_where = f"{where}.policies[{j}]"
        check_name(f"{policy_where}.name", "policy", policy.name)
        if policy.name in names:
            raise ConfigError(
                f'{policy_where}.name: duplicate policy name "{policy.name}" (also policies[{names[policy.name]}])'
            )
        names[policy.name] = j
        _check_policy_key(f"{policy_where}.key", policy.key)
        check_limit_values(policy_where, policy, policy.cost)


def _check_policy_key(where: str, parts: list[str]) -> None:
    if not parts:
        raise ConfigError(f'{where}: at least one part is required, such as ["consumer"]')
    for i, part in enumerate(parts):
        if part not in _KEY_PARTS and not _HEADER_PART.fullmatch(part):
            raise ConfigError(
                f"{where}[{i}]: invalid key part {show_value(part)}: use route, consumer, client_ip "
                'or header:<name>, such as "header:x-tenant"'
            )
    if len(set(parts)) != len(parts):
        raise ConfigError(f"{where}: a key part appears twice: list each part once")
