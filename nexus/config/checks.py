"""Checks that msgspec's types cannot express, and those that span sections."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from typing import Any
from urllib.parse import urlsplit

from nexus.cache.config_checks import check_cache
from nexus.config.access_checks import check_access, check_redis
from nexus.config.decode import _key_path
from nexus.config.model import (
    _METHODS,
    Admin,
    Concurrency,
    Config,
    ConfigError,
    HealthCheck,
    Limits,
    Match,
    Route,
    SharedMemory,
    Target,
    Timeouts,
    Upstream,
)
from nexus.headers import HOP_BY_HOP_FIELDS, REQUEST_REWRITTEN_FIELDS, is_token
from nexus.units import show_value


def _validate(config: Config) -> None:
    """Run the checks on single values that types cannot express, and those that span sections."""
    _check_listen(config.listen)
    _check_workers(config.workers)
    _check_positive("reload_timeout", config.reload_timeout)
    if config.reload_timeout < 1.0:
        raise ConfigError(
            f"reload_timeout: {config.reload_timeout:g}s is too short for workers to start: use at least 1s"
        )
    _check_admin(config.admin, config.listen)
    _check_access_log(config.access_log.path)
    _check_limits(config.limits)
    _check_shared_memory(config.shared_memory)
    _check_trusted_proxies(config.trusted_proxies)
    _check_request_id_header(config.request_id_header)
    for name, upstream in config.upstreams.items():
        where = _key_path("upstreams", name)
        _check_name(where, "upstream", name)
        _check_upstream(where, upstream)
    _check_routes(config)
    check_access(config, _check_name, _check_header_name)
    check_cache(config, _check_header_name)
    check_redis(config)


def _check_listen(listen: list[str]) -> None:
    if not listen:
        raise ConfigError('listen: at least one address is required, such as ["0.0.0.0:8080"]')
    seen: dict[tuple[str, int], int] = {}
    for i, address in enumerate(listen):
        try:
            host, port = parse_listen_address(address)
        except ValueError as exc:
            raise ConfigError(f"listen[{i}]: {exc}") from None
        # Compare parsed addresses, so "[::0]:80" is seen to equal "[::]:80".
        key = (host if host == "localhost" else ipaddress.ip_address(host).compressed, port)
        if key in seen:
            raise ConfigError(
                f"listen[{i}]: duplicate address {show_value(address)} (same as listen[{seen[key]}]): remove one"
            )
        seen[key] = i


def _check_access_log(path: str | None) -> None:
    if path is not None and not path.strip():
        raise ConfigError('access_log.path: empty path: give a file path, "-" for stderr, or null for no access log')


def _check_admin(admin: Admin, listen: list[str]) -> None:
    if admin.socket is not None and not admin.socket.strip():
        raise ConfigError('admin.socket: empty path: give a Unix socket path, such as "/run/nexus/admin.sock", or null')
    if admin.socket is not None and (admin.socket.endswith("/") or os.path.basename(admin.socket) in (".", "..")):
        raise ConfigError(
            f"admin.socket: {show_value(admin.socket)} names a directory: give a socket file in it, "
            f"such as {show_value(os.path.join(admin.socket, 'admin.sock'))}"
        )
    # sun_path holds 108 bytes with the terminating NUL; a relative path is
    # resolved against the config file's directory, so it can only grow.
    if admin.socket is not None and len(admin.socket.encode()) > 107:
        raise ConfigError(
            f"admin.socket: path of {len(admin.socket.encode())} bytes is longer than the 107 bytes a Unix socket "
            "path may have: choose a shorter path"
        )
    if isinstance(admin.socket_mode, int):
        raise ConfigError(
            f"admin.socket_mode: invalid value {admin.socket_mode}: YAML reads an unquoted mode as a number "
            '(0660 as 432); write the octal bits as a quoted string, such as "0660"'
        )
    if not re.fullmatch(r"0?[0-7]{3}", admin.socket_mode):
        raise ConfigError(
            f"admin.socket_mode: invalid mode {show_value(admin.socket_mode)}: "
            'expected octal permission bits as a string, such as "0600" or "0660"'
        )
    if admin.metrics is not None:
        try:
            metrics = parse_listen_address(admin.metrics)
        except ValueError as exc:
            raise ConfigError(f"admin.metrics: {exc}") from None
        for i, address in enumerate(listen):
            if metrics[1] != 0 and parse_listen_address(address) == metrics:
                raise ConfigError(
                    f"admin.metrics: {show_value(admin.metrics)} is also listen[{i}]: "
                    "serve metrics on another port, such as 127.0.0.1:9901"
                )


def parse_listen_address(address: str) -> tuple[str, int]:
    """Split `host:port` or `[v6]:port` into (host, port), or raise ValueError if it is invalid.

    The host is an IP address or `localhost`, because a listener binds to a
    local address and never resolves other names.
    """
    match = re.fullmatch(r"\[(?P<v6>[^\]]+)\]:(?P<port>[0-9]+)|(?P<v4>[^:\[\]]+):(?P<port4>[0-9]+)", address)
    if match is None:
        raise ValueError(
            f'invalid address {show_value(address)}: expected "host:port" or "[ipv6]:port", such as "0.0.0.0:8080"'
        )
    host = match.group("v6") or match.group("v4")
    port = int(match.group("port") or match.group("port4"))
    if not 0 <= port <= 65535:
        raise ValueError(f"invalid address {show_value(address)}: port {port} is outside 0-65535")
    if host != "localhost" and not _is_ip_address(host):
        raise ValueError(
            f"invalid address {show_value(address)}: {show_value(host)} is not an IP address "
            "(use 0.0.0.0 or [::] for all addresses)"
        )
    if match.group("v6") and ":" not in host:
        raise ValueError(f'invalid address {show_value(address)}: brackets are for IPv6 only, write "{host}:{port}"')
    return host, port


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _check_workers(workers: int | str) -> None:
    if isinstance(workers, int) and workers < 1:
        raise ConfigError(f'workers: invalid value {workers}: expected a positive integer or "auto"')


def _check_limits(limits: Limits) -> None:
    # A zero max_body is allowed: it rejects every request that has a body.
    _check_positive("limits.header_timeout", limits.header_timeout)
    _check_positive("limits.body_timeout", limits.body_timeout)


def _check_shared_memory(sizes: SharedMemory) -> None:
    # The limit of the store's record format (lengths are 32-bit fields).
    largest_object = 1 << 30
    if not 1 <= sizes.cache_max_object <= largest_object:
        raise ConfigError(
            f"shared_memory.cache_max_object: {sizes.cache_max_object} bytes is outside 1 byte to 1GiB"
        )
    # A record carries a header of under 64 bytes; the store must fit one largest object.
    if sizes.cache_size < sizes.cache_max_object + 64:
        raise ConfigError(
            f"shared_memory.cache_size: {sizes.cache_size} bytes cannot hold one object of cache_max_object "
            f"({sizes.cache_max_object} bytes): raise cache_size or lower cache_max_object"
        )


def _check_positive(where: str, seconds: float) -> None:
    if seconds <= 0:
        raise ConfigError(f"{where}: invalid duration 0s: must be greater than 0, such as 1s")


def _check_trusted_proxies(networks: list[str]) -> None:
    for i, network in enumerate(networks):
        # Host bits are ignored (10.0.0.1/8 is 10.0.0.0/8), as nexus.headers does.
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(
                f"trusted_proxies[{i}]: invalid network {show_value(network)}: "
                'expected an IP address or a CIDR network such as "10.0.0.0/8"'
            ) from None


def _check_header_name(where: str, name: str) -> None:
    if not is_token(name):
        raise ConfigError(
            f"{where}: invalid header name {show_value(name)}: use only letters, digits and "
            "!#$%&'*+-.^_`|~, such as \"x-request-id\""
        )


# Fields that the gateway removes, sets or rewrites itself, so a request id
# stored in one of them would be lost or would break the message.
_RESERVED_HEADERS = HOP_BY_HOP_FIELDS | REQUEST_REWRITTEN_FIELDS | {"content-length"}


def _check_request_id_header(name: str) -> None:
    _check_header_name("request_id_header", name)
    if name.lower() in _RESERVED_HEADERS:
        raise ConfigError(
            f'request_id_header: invalid header name {show_value(name)}: the gateway sets or removes this header '
            'itself, so choose another, such as "x-request-id"'
        )


# Upstream and route names become metric labels and log ids.
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _check_name(where: str, kind: str, name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f'{where}: invalid {kind} name {show_value(name)}: use only letters, digits, "_", "." and "-", '
            "because names become metric labels and log ids"
        )


def _check_upstream(where: str, upstream: Upstream) -> None:
    _check_targets(f"{where}.targets", upstream.target_list())
    _check_hashing(where, upstream)
    if upstream.health is not None:
        _check_health(f"{where}.health", upstream.health)
    _check_positive(f"{where}.passive.eject_for", upstream.passive.eject_for)
    _check_timeouts(f"{where}.timeouts", upstream.timeouts)
    if upstream.concurrency is not None:
        _check_concurrency(f"{where}.concurrency", upstream.concurrency)
    for i, condition in enumerate(upstream.retries.on):
        if isinstance(condition, int) and not 500 <= condition <= 599:
            raise ConfigError(
                f"{where}.retries.on[{i}]: invalid status {condition}: only 5xx statuses can be retried, such as 503"
            )


def _check_concurrency(where: str, limits: Concurrency) -> None:
    if limits.min_limit > limits.max_limit:
        raise ConfigError(
            f"{where}.min_limit: {limits.min_limit} is above max_limit ({limits.max_limit}): lower it or raise max_limit"
        )
    if not limits.min_limit <= limits.initial_limit <= limits.max_limit:
        raise ConfigError(
            f"{where}.initial_limit: {limits.initial_limit} is outside min_limit..max_limit "
            f"({limits.min_limit}..{limits.max_limit})"
        )
    _check_positive(f"{where}.max_queue_wait", limits.max_queue_wait)
    _check_positive(f"{where}.overloaded_queue_wait", limits.overloaded_queue_wait)
    if limits.overloaded_queue_wait > limits.max_queue_wait:
        raise ConfigError(
            f"{where}.overloaded_queue_wait: {_show_seconds(limits.overloaded_queue_wait)} is longer than "
            f"max_queue_wait ({_show_seconds(limits.max_queue_wait)}): under overload requests must wait less, not more"
        )
    if limits.critical_reserve >= 1.0:
        raise ConfigError(f"{where}.critical_reserve: 100% would leave nothing for other tiers: use less, such as 20%")


def _check_targets(where: str, targets: list[Target]) -> None:
    if not targets:
        raise ConfigError(f'{where}: at least one target is required, such as ["http://10.0.0.5:8000"]')
    seen: dict[tuple[str, int], int] = {}
    for i, target in enumerate(targets):
        problem = _target_url_problem(target.url)
        if problem:
            raise ConfigError(f"{where}[{i}]: {problem}")
        parts = urlsplit(target.url)
        key = (parts.hostname or "", parts.port or 0)
        if key in seen:
            raise ConfigError(
                f"{where}[{i}]: duplicate target {show_value(target.url)} (same as targets[{seen[key]}]): "
                "remove one, or raise its weight"
            )
        seen[key] = i


def _target_url_problem(url: str) -> str | None:
    """Return why `url` is not a usable target (http://host:port), or None if it is."""
    example = 'such as "http://10.0.0.5:8000"'
    try:
        parts = urlsplit(url)
    except ValueError:
        # urlsplit raises for a malformed network location, such as an unbalanced IPv6 bracket.
        return f"invalid target {show_value(url)}: expected an http:// URL {example}"
    try:
        port = parts.port
    except ValueError:
        return f"invalid target {show_value(url)}: the port must be a number from 1 to 65535, {example}"

    if "://" not in url:
        return f'invalid target {show_value(url)}: expected an http:// URL, such as "http://{url}"'
    if parts.scheme != "http":
        return f"invalid target {show_value(url)}: only http:// targets are supported, {example}"
    if not parts.hostname or port is None or port == 0:
        return f"invalid target {show_value(url)}: a host and a port from 1 to 65535 are required, {example}"
    if parts.username is not None:
        return f"invalid target {show_value(url)}: credentials in a target URL are not supported"
    if parts.path not in ("", "/") or parts.query or parts.fragment or url.endswith(("?", "#")):
        return (
            f"invalid target {show_value(url)}: a target has no path or query "
            "(use the route's add_prefix for a path)"
        )
    return None


_HASH_KEYS = ("client_ip", "path")
_HASH_SOURCES = ("header", "cookie")


def _check_hashing(where: str, upstream: Upstream) -> None:
    if upstream.balance == "maglev" and upstream.hash_on is None:
        raise ConfigError(
            f'{where}.hash_on: missing, but required when balance is "maglev": '
            'set it to a hashing key such as "header:x-user-id" or "client_ip"'
        )
    if upstream.hash_on is not None and upstream.balance != "maglev":
        # Only maglev hashes, so a hash_on on another balancer would be ignored.
        raise ConfigError(
            f'{where}.hash_on: only used when balance is "maglev" (balance is "{upstream.balance}"): '
            "set balance: maglev or remove hash_on"
        )
    if upstream.hash_on is not None:
        problem = _hash_on_problem(upstream.hash_on)
        if problem:
            raise ConfigError(f"{where}.hash_on: {problem}")
    if not math.isfinite(upstream.hash_balance_factor):
        raise ConfigError(
            f"{where}.hash_balance_factor: invalid value {upstream.hash_balance_factor}: "
            "expected a finite number of at least 1"
        )


def _hash_on_problem(hash_on: str) -> str | None:
    """Return why `hash_on` is not a valid hashing key, or None if it is."""
    if hash_on in _HASH_KEYS:
        return None
    kind, _, name = hash_on.partition(":")
    if kind in _HASH_SOURCES and is_token(name):
        return None
    return (
        f'invalid value {show_value(hash_on)}: expected "header:NAME", "cookie:NAME", "client_ip" or "path", '
        'such as "header:x-user-id"'
    )


def _check_health(where: str, health: HealthCheck) -> None:
    # The path goes into the probe's request line as written.
    if not health.path.startswith("/") or any(char.isspace() or not char.isprintable() for char in health.path):
        raise ConfigError(
            f'{where}.path: invalid path {show_value(health.path)}: must start with "/" and contain no spaces, '
            'such as "/healthz"'
        )
    _check_positive(f"{where}.interval", health.interval)
    _check_positive(f"{where}.timeout", health.timeout)
    if health.timeout > health.interval:
        raise ConfigError(
            f"{where}.timeout: {_show_seconds(health.timeout)} is longer than the interval "
            f"({_show_seconds(health.interval)}): use a timeout of at most the interval"
        )


def _check_timeouts(where: str, timeouts: Timeouts) -> None:
    _check_positive(f"{where}.connect", timeouts.connect)
    _check_positive(f"{where}.response_header", timeouts.response_header)
    _check_positive(f"{where}.total", timeouts.total)
    if timeouts.total < timeouts.connect:
        raise ConfigError(
            f"{where}.total: {_show_seconds(timeouts.total)} is shorter than timeouts.connect "
            f"({_show_seconds(timeouts.connect)}): make total at least as long as connect"
        )


def _show_seconds(seconds: float) -> str:
    """Format a duration as the config file would write it: 250ms, 2s."""
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def _check_routes(config: Config) -> None:
    names: dict[str, int] = {}
    conditions: dict[tuple[Any, ...], int] = {}
    defined = ", ".join(sorted(config.upstreams)) or "none"
    for i, route in enumerate(config.routes):
        where = f"routes[{i}]"
        _check_name(f"{where}.name", "route", route.name)
        if route.name in names:
            raise ConfigError(
                f'{where}.name: duplicate route name "{route.name}" (also routes[{names[route.name]}]): '
                "route names must be unique"
            )
        names[route.name] = i
        if route.upstream not in config.upstreams:
            raise ConfigError(f'{where}.upstream: unknown upstream "{route.upstream}" (defined: {defined})')

        _check_match(f"{where}.match", route.match)
        _check_rewrites(where, route)

        # With equal conditions the earlier route always wins, so the later one never matches.
        key = _match_key(route.match)
        if key in conditions:
            first = conditions[key]
            raise ConfigError(
                f'{where}.match: same conditions as routes[{first}] ("{config.routes[first].name}"), '
                "which comes first and always wins: change the conditions or remove one route"
            )
        conditions[key] = i


def _check_match(where: str, match: Match) -> None:
    if match.path is not None and match.path_prefix is not None:
        raise ConfigError(
            f"{where}: path and path_prefix are both set: use path for one exact path or path_prefix for a subtree"
        )
    for key in ("path", "path_prefix"):
        value = getattr(match, key)
        if value is not None and not value.startswith("/"):
            raise ConfigError(f'{where}.{key}: invalid path {show_value(value)}: must start with "/", such as "/v1"')
    hosts = [match.host] if isinstance(match.host, str) else match.host or []
    for i, host in enumerate(hosts):
        problem = _host_problem(host)
        if problem:
            raise ConfigError(f"{where}.host{'' if isinstance(match.host, str) else f'[{i}]'}: {problem}")
    for i, method in enumerate(match.methods or []):
        if method not in _METHODS:
            if method.upper() in _METHODS:
                fix = f'write it in upper case: "{method.upper()}"'
            else:
                fix = f"use one of {', '.join(_METHODS)}"
            raise ConfigError(f"{where}.methods[{i}]: unknown method {show_value(method)}: {fix}")
    _check_match_headers(f"{where}.headers", match.headers)


# A host name: labels of letters, digits, "-" and "_", with one optional
# trailing dot.
_HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")


def _host_problem(host: str) -> str | None:
    """Return why `host` is not a valid route host, or None if it is."""
    name = host.removeprefix("*.")
    if "*" in name:
        return (
            f'invalid host {show_value(host)}: a wildcard is only allowed as a leading "*.", '
            'such as "*.example.com" (leave host unset to match any host)'
        )
    if _HOST_NAME.fullmatch(name):
        return None
    try:
        # The router also accepts an IPv6 address, with or without brackets.
        ipaddress.IPv6Address(name[1:-1] if name.startswith("[") and name.endswith("]") else name)
        return None
    except ValueError:
        pass
    if ":" in name:
        return f"invalid host {show_value(host)}: a route host has no port, such as \"api.example.com\""
    return f'invalid host {show_value(host)}: expected a host name such as "api.example.com" or "*.example.com"'


def _check_match_headers(where: str, headers: dict[str, str]) -> None:
    seen: dict[str, str] = {}
    for name in headers:
        _check_header_name(_key_path(where, name), name)
        # Header names are case-insensitive: two spellings are two conditions
        # on one header.
        if name.lower() in seen:
            raise ConfigError(
                f'{_key_path(where, name)}: duplicate header "{name}" (same as "{seen[name.lower()]}"): '
                "header names are case-insensitive, keep one"
            )
        seen[name.lower()] = name


def _check_rewrites(where: str, route: Route) -> None:
    for key in ("strip_prefix", "add_prefix"):
        value = getattr(route, key)
        if value is not None and (not value.startswith("/") or value.endswith("/") and value != "/"):
            raise ConfigError(
                f'{where}.{key}: invalid prefix {show_value(value)}: must start with "/" and not end with "/", '
                'such as "/v1"'
            )


def _match_key(match: Match) -> tuple[Any, ...]:
    """Return what the router compares of a route's conditions, for spotting duplicates."""
    hosts = [match.host] if isinstance(match.host, str) else match.host or []
    return (
        frozenset(host.lower().removesuffix(".") for host in hosts),
        match.path,
        match.path_prefix,
        frozenset(match.methods or ()),
        frozenset((name.lower(), value) for name, value in match.headers.items()),
    )
