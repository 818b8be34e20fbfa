"""Tests of config decoding: bad files and their exact messages, good files and their values."""

from __future__ import annotations

import math
from pathlib import Path

import msgspec
import pytest

from nexus.config import (
    Config,
    ConfigError,
    HealthCheck,
    Limits,
    Match,
    PassiveHealth,
    Retries,
    Target,
    Timeouts,
    load_config,
    parse_config,
    parse_listen_address,
)

# The top-level keys in declaration order, as unknown-key errors list them.
TOP_LEVEL_KEYS = ", ".join(field.encode_name for field in msgspec.structs.fields(Config))

# Two upstreams for the route cases, so "defined: ..." lists more than one.
UPSTREAMS = (
    "upstreams:\n"
    "  catalog: {targets: ['http://10.0.0.5:8000']}\n"
    "  users: {targets: ['http://10.0.0.6:8000']}\n"
)


def upstream(settings: str) -> str:
    """Return a config with one upstream `a` that has one target and `settings`."""
    return "upstreams: {a: {targets: ['http://10.0.0.5:8000'], " + settings + "}}"


def targets(*items: str) -> str:
    """Return a config with one upstream `a` whose targets are `items`, as YAML."""
    return "upstreams: {a: {targets: [" + ", ".join(items) + "]}}"


def route(settings: str) -> str:
    """Return a config with the two upstreams and one route `r` to catalog with `settings`."""
    return UPSTREAMS + "routes: [{name: r, upstream: catalog, " + settings + "}]"


def match(conditions: str) -> str:
    return route("match: {" + conditions + "}")


BAD_CONFIGS = [
    # msgspec's type errors, rewritten: path, value found, what is expected.
    pytest.param(
        "workers: lots",
        'workers: invalid value "lots": expected a positive integer or "auto"',
        id="workers-word",
    ),
    pytest.param("workers: 0", 'workers: invalid value 0: expected a positive integer or "auto"', id="workers-zero"),
    pytest.param(
        "workers: true",
        'workers: invalid value true: expected a positive integer or "auto"',
        id="workers-bool",
    ),
    pytest.param(
        "workers: 1.5",
        'workers: invalid value 1.5: expected a positive integer or "auto"',
        id="workers-float",
    ),
    pytest.param(
        targets("1"),
        'upstreams.a.targets[0]: invalid value 1: expected a URL string such as "http://10.0.0.5:8000" '
        "or a mapping {url: ..., weight: ...}",
        id="target-int",
    ),
    pytest.param(
        upstream("balance: fastest"),
        'upstreams.a.balance: invalid value "fastest": expected one of round_robin, least_request, p2c_ewma, maglev',
        id="balance-unknown",
    ),
    pytest.param(
        upstream("retries: {on: [bogus]}"),
        'upstreams.a.retries.on[0]: invalid value "bogus": expected connect_failure, timeout, reset '
        "or a 5xx status code such as 503",
        id="retry-condition-unknown",
    ),
    pytest.param(
        upstream("retries: {on: [true]}"),
        "upstreams.a.retries.on[0]: invalid value true: expected connect_failure, timeout, reset "
        "or a 5xx status code such as 503",
        id="retry-condition-bool",
    ),
    pytest.param(
        upstream("retries: {on: 503}"),
        "upstreams.a.retries.on: invalid value 503: expected a list of retry conditions such as [connect_failure, 503]",
        id="retry-on-not-list",
    ),
    pytest.param(
        upstream("retries: {attempts: 11}"),
        "upstreams.a.retries.attempts: invalid value 11: expected an integer from 0 to 10",
        id="attempts-too-many",
    ),
    pytest.param(
        upstream("retries: {min_concurrent: -1}"),
        "upstreams.a.retries.min_concurrent: invalid value -1: expected an integer of at least 0",
        id="min-concurrent-negative",
    ),
    pytest.param(
        targets("{url: 'http://10.0.0.5:8000', weight: 0}"),
        "upstreams.a.targets[0].weight: invalid value 0: expected an integer from 1 to 1000",
        id="weight-zero",
    ),
    pytest.param(
        targets("{url: 'http://10.0.0.5:8000', weight: 1001}"),
        "upstreams.a.targets[0].weight: invalid value 1001: expected an integer from 1 to 1000",
        id="weight-too-big",
    ),
    pytest.param(
        upstream("max_connections: 0"),
        "upstreams.a.max_connections: invalid value 0: expected a positive integer",
        id="max-connections-zero",
    ),
    pytest.param(
        "upstreams: {'a.b': {targets: ['http://10.0.0.5:8000'], max_connections: x}}",
        'upstreams["a.b"].max_connections: invalid value "x": expected a positive integer',
        id="dotted-name-quoted-in-path",
    ),
    pytest.param(
        upstream("balance: maglev, hash_on: path, hash_balance_factor: 0.5"),
        "upstreams.a.hash_balance_factor: invalid value 0.5: expected a number of at least 1",
        id="hash-factor-below-one",
    ),
    pytest.param(
        upstream("balance: maglev, hash_on: path, hash_balance_factor: .inf"),
        "upstreams.a.hash_balance_factor: invalid value inf: expected a finite number of at least 1",
        id="hash-factor-infinite",
    ),
    pytest.param(upstream("health: 5"), "upstreams.a.health: invalid value 5: expected a mapping", id="health-int"),
    pytest.param(
        match("headers: {x-tenant: 1}"),
        "routes[0].match.headers.x-tenant: invalid value 1: expected a string",
        id="header-value-int",
    ),
    pytest.param(
        match("methods: GET"),
        'routes[0].match.methods: invalid value "GET": expected a list of methods such as [GET, HEAD]',
        id="methods-not-list",
    ),
    pytest.param(
        match("host: 5"),
        'routes[0].match.host: invalid value 5: expected a host name such as "api.example.com" or a list of host names',
        id="host-int",
    ),
    # Wrong types at the top level and for whole sections.
    pytest.param(
        "listen: 8080",
        'listen: invalid value 8080: expected a list of addresses such as ["0.0.0.0:8080"]',
        id="listen-int",
    ),
    pytest.param(
        "listen: [8080]",
        'listen[0]: invalid value 8080: expected an address such as "0.0.0.0:8080" or "[::]:8080"',
        id="listen-item-int",
    ),
    pytest.param(
        "routes: {}",
        "routes: expected a list of routes, each a mapping with name, upstream and match, found a mapping",
        id="routes-mapping",
    ),
    pytest.param(
        "routes: [3]",
        "routes[0]: invalid value 3: expected a mapping with name, upstream and match",
        id="route-int",
    ),
    pytest.param(
        "upstreams: [1]",
        "upstreams: expected a mapping from upstream name to its settings, such as {catalog: {targets: [...]}}, "
        "found a list",
        id="upstreams-list",
    ),
    pytest.param(
        "upstreams: {a: }",
        "upstreams.a: missing value: expected a mapping of upstream settings, such as {targets: [...]}",
        id="upstream-empty",
    ),
    pytest.param("limits: []", "limits: expected a mapping, found a list", id="limits-list"),
    pytest.param(
        "limits:",
        "limits: missing value: expected a mapping (or remove the key to use the default)",
        id="limits-empty",
    ),
    pytest.param(
        "trusted_proxies: 10.0.0.0/8",
        'trusted_proxies: invalid value "10.0.0.0/8": expected a list of networks such as ["10.0.0.0/8"]',
        id="trusted-proxies-string",
    ),
    pytest.param(
        "trusted_proxies: [1]",
        'trusted_proxies[0]: invalid value 1: expected an address or network such as "10.0.0.0/8"',
        id="trusted-proxy-int",
    ),
    pytest.param("request_id_header: 5", "request_id_header: invalid value 5: expected a string", id="header-int"),
    pytest.param(
        "- listen",
        "<config>: expected a mapping of config keys such as listen and upstreams at the top level, found a list",
        id="top-level-list",
    ),
    pytest.param(
        "just a string",
        "<config>: expected a mapping of config keys such as listen and upstreams at the top level, found a string",
        id="top-level-string",
    ),
    # Missing required keys.
    pytest.param("upstreams: {a: {}}", 'upstreams.a: missing required key "targets"', id="missing-targets"),
    pytest.param(targets("{weight: 2}"), 'upstreams.a.targets[0]: missing required key "url"', id="missing-url"),
    pytest.param(
        UPSTREAMS + "routes: [{name: x}]",
        'routes[0]: missing required key "upstream"',
        id="missing-upstream",
    ),
    pytest.param(
        UPSTREAMS + "routes: [{upstream: catalog}]",
        'routes[0]: missing required key "name"',
        id="missing-name",
    ),
    pytest.param(
        "reload_timeout: 10ms",
        "reload_timeout: 0.01s is too short for workers to start: use at least 1s",
        id="reload-timeout-too-short",
    ),
    pytest.param(
        'listen: ["127.0.0.1:8080"]\nadmin: {metrics: "127.0.0.1:8080"}',
        'admin.metrics: "127.0.0.1:8080" is also listen[0]: serve metrics on another port, such as 127.0.0.1:9901',
        id="metrics-on-a-listen-address",
    ),
    pytest.param(
        "admin: {socket: /tmp/" + "s" * 110 + "}",
        "admin.socket: path of 115 bytes is longer than the 107 bytes a Unix socket path may have: choose a shorter path",
        id="admin-socket-too-long",
    ),
    # Unknown keys, with a suggestion when one is close.
    pytest.param(
        "bogus: 1",
        "bogus: unknown key, expected one of " + TOP_LEVEL_KEYS,
        id="unknown-top-level-key",
    ),
    pytest.param(
        "upstream: {}",
        "upstream: unknown key, expected one of " + TOP_LEVEL_KEYS
        + ' (did you mean "upstreams"?)',
        id="unknown-key-close-match",
    ),
    pytest.param(
        targets("{url: 'http://10.0.0.5:8000', wieght: 2}"),
        'upstreams.a.targets[0].wieght: unknown key, expected one of url, weight (did you mean "weight"?)',
        id="unknown-nested-key",
    ),
    pytest.param(
        "1: 2",
        "1: unknown key, expected one of " + TOP_LEVEL_KEYS,
        id="top-level-int-key",
    ),
    pytest.param(
        "upstreams: {1: {targets: ['http://10.0.0.5:8000']}}",
        "upstreams: invalid key 1: expected a string, so put it in quotes",
        id="upstream-name-int",
    ),
    # Names.
    pytest.param(
        "upstreams: {'a b': {targets: ['http://10.0.0.5:8000']}}",
        'upstreams["a b"]: invalid upstream name "a b": use only letters, digits, "_", "." and "-", '
        "because names become metric labels and log ids",
        id="upstream-name-space",
    ),
    pytest.param(
        "upstreams: {'a/b': {targets: ['http://10.0.0.5:8000']}}",
        'upstreams["a/b"]: invalid upstream name "a/b": use only letters, digits, "_", "." and "-", '
        "because names become metric labels and log ids",
        id="upstream-name-slash",
    ),
    pytest.param(
        UPSTREAMS + "routes: [{name: 'r r', upstream: catalog}]",
        'routes[0].name: invalid route name "r r": use only letters, digits, "_", "." and "-", '
        "because names become metric labels and log ids",
        id="route-name-space",
    ),
    # Checks across sections.
    pytest.param(
        UPSTREAMS + "routes: [{name: r, upstream: billing}]",
        'routes[0].upstream: unknown upstream "billing" (defined: catalog, users)',
        id="unknown-upstream",
    ),
    pytest.param(
        "routes: [{name: r, upstream: billing}]",
        'routes[0].upstream: unknown upstream "billing" (defined: none)',
        id="unknown-upstream-none-defined",
    ),
    pytest.param(
        UPSTREAMS + "routes: [{name: r, upstream: catalog}, {name: r, upstream: users, match: {path: /x}}]",
        'routes[1].name: duplicate route name "r" (also routes[0]): route names must be unique',
        id="duplicate-route-name",
    ),
    pytest.param(
        UPSTREAMS + "routes: [{name: a, upstream: catalog, match: {host: API.example.com}}, "
        "{name: b, upstream: users, match: {host: [api.example.com.]}}]",
        'routes[1].match: same conditions as routes[0] ("a"), which comes first and always wins: '
        "change the conditions or remove one route",
        id="unreachable-route",
    ),
    # listen.
    pytest.param("listen: []", 'listen: at least one address is required, such as ["0.0.0.0:8080"]', id="listen-empty"),
    pytest.param(
        "listen: ['0.0.0.0:80', '0.0.0.0:80']",
        'listen[1]: duplicate address "0.0.0.0:80" (same as listen[0]): remove one',
        id="listen-duplicate",
    ),
    pytest.param(
        "listen: ['[::]:80', '[::0]:80']",
        'listen[1]: duplicate address "[::0]:80" (same as listen[0]): remove one',
        id="listen-duplicate-spelled-differently",
    ),
    pytest.param(
        "listen: ['api.local:80']",
        'listen[0]: invalid address "api.local:80": "api.local" is not an IP address '
        "(use 0.0.0.0 or [::] for all addresses)",
        id="listen-host-name",
    ),
    pytest.param(
        "listen: ['0.0.0.0:70000']",
        'listen[0]: invalid address "0.0.0.0:70000": port 70000 is outside 0-65535',
        id="listen-port-too-big",
    ),
    pytest.param(
        "listen: ['8080']",
        'listen[0]: invalid address "8080": expected "host:port" or "[ipv6]:port", such as "0.0.0.0:8080"',
        id="listen-port-only",
    ),
    # Durations, sizes and percentages.
    pytest.param(
        upstream("health: {interval: fast}"),
        'upstreams.a.health.interval: invalid duration "fast": expected a number with a unit, such as 250ms, 2s or 1m',
        id="duration-word",
    ),
    pytest.param(
        upstream("health: {interval: 5}"),
        'upstreams.a.health.interval: invalid duration 5: a unit is required, such as "5s" or "5ms"',
        id="duration-no-unit",
    ),
    pytest.param(
        upstream("health: {interval: 0s}"),
        "upstreams.a.health.interval: invalid duration 0s: must be greater than 0, such as 1s",
        id="health-interval-zero",
    ),
    pytest.param(
        "limits: {header_timeout: 0s}",
        "limits.header_timeout: invalid duration 0s: must be greater than 0, such as 1s",
        id="header-timeout-zero",
    ),
    pytest.param(
        "limits: {body_timeout: 30}",
        'limits.body_timeout: invalid duration 30: a unit is required, such as "30s" or "30ms"',
        id="body-timeout-no-unit",
    ),
    pytest.param(
        "shutdown_timeout: -1s",
        'shutdown_timeout: invalid duration "-1s": must not be negative',
        id="duration-negative",
    ),
    pytest.param(
        upstream("passive: {eject_for: 0s}"),
        "upstreams.a.passive.eject_for: invalid duration 0s: must be greater than 0, such as 1s",
        id="eject-for-zero",
    ),
    pytest.param(
        upstream("timeouts: {connect: 0ms}"),
        "upstreams.a.timeouts.connect: invalid duration 0s: must be greater than 0, such as 1s",
        id="connect-timeout-zero",
    ),
    pytest.param(
        upstream("timeouts: {total: 500ms}"),
        "upstreams.a.timeouts.total: 500ms is shorter than timeouts.connect (1s): "
        "make total at least as long as connect",
        id="total-shorter-than-connect",
    ),
    pytest.param(
        "limits: {max_body: 10XB}",
        'limits.max_body: invalid size "10XB": unknown unit "XB": use one of B, KiB, MiB, GiB, TiB, kB, KB, MB, GB, TB',
        id="size-unit-unknown",
    ),
    pytest.param(
        "limits: {max_body: 1.5B}",
        'limits.max_body: invalid size "1.5B": 1.5 is not a whole number of bytes',
        id="size-fraction-of-byte",
    ),
    pytest.param(
        upstream("retries: {budget: 120%}"),
        'upstreams.a.retries.budget: invalid percentage "120%": must be between 0% and 100%',
        id="percentage-too-big",
    ),
    pytest.param(
        upstream("retries: {budget: 20}"),
        "upstreams.a.retries.budget: invalid percentage 20: a number without % is a fraction from 0 to 1, "
        'so write "20%" for a percentage',
        id="percentage-without-sign",
    ),
    # Hashing.
    pytest.param(
        upstream("balance: maglev"),
        'upstreams.a.hash_on: missing, but required when balance is "maglev": '
        'set it to a hashing key such as "header:x-user-id" or "client_ip"',
        id="maglev-without-hash-on",
    ),
    pytest.param(
        upstream("balance: maglev, hash_on: ip"),
        'upstreams.a.hash_on: invalid value "ip": expected "header:NAME", "cookie:NAME", "client_ip" or "path", '
        'such as "header:x-user-id"',
        id="hash-on-unknown",
    ),
    pytest.param(
        upstream("balance: maglev, hash_on: 'header:'"),
        'upstreams.a.hash_on: invalid value "header:": expected "header:NAME", "cookie:NAME", "client_ip" or "path", '
        'such as "header:x-user-id"',
        id="hash-on-header-without-name",
    ),
    pytest.param(
        upstream("balance: maglev, hash_on: 'header:x user'"),
        'upstreams.a.hash_on: invalid value "header:x user": expected "header:NAME", "cookie:NAME", "client_ip" '
        'or "path", such as "header:x-user-id"',
        id="hash-on-header-name-invalid",
    ),
    pytest.param(
        upstream("hash_on: client_ip"),
        'upstreams.a.hash_on: only used when balance is "maglev" (balance is "round_robin"): '
        "set balance: maglev or remove hash_on",
        id="hash-on-without-maglev",
    ),
    # Targets.
    pytest.param(
        "upstreams: {a: {targets: []}}",
        'upstreams.a.targets: at least one target is required, such as ["http://10.0.0.5:8000"]',
        id="targets-empty",
    ),
    pytest.param(
        targets("'https://10.0.0.5:8443'"),
        'upstreams.a.targets[0]: invalid target "https://10.0.0.5:8443": only http:// targets are supported, '
        'such as "http://10.0.0.5:8000"',
        id="target-https",
    ),
    pytest.param(
        targets("'10.0.0.5:8000'"),
        'upstreams.a.targets[0]: invalid target "10.0.0.5:8000": expected an http:// URL, '
        'such as "http://10.0.0.5:8000"',
        id="target-without-scheme",
    ),
    pytest.param(
        targets("'http://10.0.0.5'"),
        'upstreams.a.targets[0]: invalid target "http://10.0.0.5": a host and a port from 1 to 65535 are required, '
        'such as "http://10.0.0.5:8000"',
        id="target-without-port",
    ),
    pytest.param(
        targets("'http://10.0.0.5:0'"),
        'upstreams.a.targets[0]: invalid target "http://10.0.0.5:0": a host and a port from 1 to 65535 are required, '
        'such as "http://10.0.0.5:8000"',
        id="target-port-zero",
    ),
    pytest.param(
        targets("'http://10.0.0.5:99999'"),
        'upstreams.a.targets[0]: invalid target "http://10.0.0.5:99999": the port must be a number from 1 to 65535, '
        'such as "http://10.0.0.5:8000"',
        id="target-port-too-big",
    ),
    pytest.param(
        targets("'http://10.0.0.5:8000/api'"),
        'upstreams.a.targets[0]: invalid target "http://10.0.0.5:8000/api": a target has no path or query '
        "(use the route's add_prefix for a path)",
        id="target-with-path",
    ),
    pytest.param(
        targets("'http://10.0.0.5:8000?x=1'"),
        'upstreams.a.targets[0]: invalid target "http://10.0.0.5:8000?x=1": a target has no path or query '
        "(use the route's add_prefix for a path)",
        id="target-with-query",
    ),
    pytest.param(
        targets("'http://user:pw@10.0.0.5:8000'"),
        'upstreams.a.targets[0]: invalid target "http://user:pw@10.0.0.5:8000": '
        "credentials in a target URL are not supported",
        id="target-with-credentials",
    ),
    pytest.param(
        targets("'http://[::1:8000'"),
        'upstreams.a.targets[0]: invalid target "http://[::1:8000": expected an http:// URL such as '
        '"http://10.0.0.5:8000"',
        id="target-unbalanced-bracket",
    ),
    pytest.param(
        targets("'http://10.0.0.5:8000'", "'http://10.0.0.5:8000/'"),
        'upstreams.a.targets[1]: duplicate target "http://10.0.0.5:8000/" (same as targets[0]): '
        "remove one, or raise its weight",
        id="target-duplicate",
    ),
    # Retries and health checks.
    pytest.param(
        upstream("retries: {on: [404]}"),
        "upstreams.a.retries.on[0]: invalid status 404: only 5xx statuses can be retried, such as 503",
        id="retry-status-4xx",
    ),
    pytest.param(
        upstream("retries: {on: [connect_failure, 600]}"),
        "upstreams.a.retries.on[1]: invalid status 600: only 5xx statuses can be retried, such as 503",
        id="retry-status-600",
    ),
    pytest.param(
        upstream("health: {timeout: 2s, interval: 1s}"),
        "upstreams.a.health.timeout: 2s is longer than the interval (1s): use a timeout of at most the interval",
        id="health-timeout-over-interval",
    ),
    pytest.param(
        upstream("health: {path: healthz}"),
        'upstreams.a.health.path: invalid path "healthz": must start with "/" and contain no spaces, '
        'such as "/healthz"',
        id="health-path-relative",
    ),
    pytest.param(
        upstream("health: {path: '/a b'}"),
        'upstreams.a.health.path: invalid path "/a b": must start with "/" and contain no spaces, such as "/healthz"',
        id="health-path-space",
    ),
    # Route matches.
    pytest.param(
        match("host: '*'"),
        'routes[0].match.host: invalid host "*": a wildcard is only allowed as a leading "*.", '
        'such as "*.example.com" (leave host unset to match any host)',
        id="host-star-alone",
    ),
    pytest.param(
        match("host: ['api.example.com', 'a.*.example.com']"),
        'routes[0].match.host[1]: invalid host "a.*.example.com": a wildcard is only allowed as a leading "*.", '
        'such as "*.example.com" (leave host unset to match any host)',
        id="host-star-inside",
    ),
    pytest.param(
        match("host: '*.*.example.com'"),
        'routes[0].match.host: invalid host "*.*.example.com": a wildcard is only allowed as a leading "*.", '
        'such as "*.example.com" (leave host unset to match any host)',
        id="host-two-stars",
    ),
    pytest.param(
        match("host: 'api.example.com:8080'"),
        'routes[0].match.host: invalid host "api.example.com:8080": a route host has no port, '
        'such as "api.example.com"',
        id="host-with-port",
    ),
    pytest.param(
        match("host: 'api example.com'"),
        'routes[0].match.host: invalid host "api example.com": expected a host name such as "api.example.com" '
        'or "*.example.com"',
        id="host-with-space",
    ),
    pytest.param(
        match("methods: [get]"),
        'routes[0].match.methods[0]: unknown method "get": write it in upper case: "GET"',
        id="method-lower-case",
    ),
    pytest.param(
        match("methods: [GET, FETCH]"),
        'routes[0].match.methods[1]: unknown method "FETCH": '
        "use one of GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE, CONNECT",
        id="method-unknown",
    ),
    pytest.param(
        match("path: /x, path_prefix: /y"),
        "routes[0].match: path and path_prefix are both set: use path for one exact path or path_prefix for a subtree",
        id="path-and-prefix",
    ),
    pytest.param(
        match("path: x"),
        'routes[0].match.path: invalid path "x": must start with "/", such as "/v1"',
        id="path-relative",
    ),
    pytest.param(
        match("path_prefix: v1"),
        'routes[0].match.path_prefix: invalid path "v1": must start with "/", such as "/v1"',
        id="path-prefix-relative",
    ),
    pytest.param(
        match("headers: {'x tenant': a}"),
        'routes[0].match.headers["x tenant"]: invalid header name "x tenant": '
        "use only letters, digits and !#$%&'*+-.^_`|~, such as \"x-request-id\"",
        id="header-name-space",
    ),
    pytest.param(
        match("headers: {X-Tenant: a, x-tenant: b}"),
        'routes[0].match.headers.x-tenant: duplicate header "x-tenant" (same as "X-Tenant"): '
        "header names are case-insensitive, keep one",
        id="header-name-twice",
    ),
    pytest.param(
        route("strip_prefix: v1"),
        'routes[0].strip_prefix: invalid prefix "v1": must start with "/" and not end with "/", such as "/v1"',
        id="strip-prefix-relative",
    ),
    pytest.param(
        route("add_prefix: /v1/"),
        'routes[0].add_prefix: invalid prefix "/v1/": must start with "/" and not end with "/", such as "/v1"',
        id="add-prefix-trailing-slash",
    ),
    # Other top-level keys.
    pytest.param(
        "trusted_proxies: ['10.0.0.0/33']",
        'trusted_proxies[0]: invalid network "10.0.0.0/33": expected an IP address or a CIDR network '
        'such as "10.0.0.0/8"',
        id="trusted-proxy-prefix-too-long",
    ),
    pytest.param(
        "request_id_header: 'x id'",
        'request_id_header: invalid header name "x id": use only letters, digits and !#$%&\'*+-.^_`|~, '
        'such as "x-request-id"',
        id="request-id-header-space",
    ),
    pytest.param(
        "request_id_header: Via",
        'request_id_header: invalid header name "Via": the gateway sets or removes this header itself, '
        'so choose another, such as "x-request-id"',
        id="request-id-header-reserved",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS)
def test_bad_config_message(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert str(caught.value) == message


BAD_YAML = [
    pytest.param(
        "listen: ['0.0.0.0:8080'\nworkers: 2\n",
        r"^nexus\.yaml: invalid YAML at line 2, column 1: expected ',' or '\]', but got '<scalar>' "
        r"\(while parsing a flow sequence at line 1, column 9\)$",
        id="unclosed-bracket",
    ),
    pytest.param(
        "limits:\n\tmax_body: 1MiB\n",
        r"^nexus\.yaml: invalid YAML at line 2, column 1: .*'\\t'",
        id="tab-indent",
    ),
    pytest.param(
        "upstreams:\n  a: {targets: ['http://10.0.0.5:8000']}\n  a: {targets: ['http://10.0.0.6:8000']}\n",
        r'^nexus\.yaml: invalid YAML at line 3, column 3: duplicate key "a" \(first defined at line 2\)$',
        id="duplicate-key",
    ),
    pytest.param(
        b"workers: 2\nlisten: ['\xff']\n",
        r"^nexus\.yaml: invalid YAML at byte 21: the file is not valid utf-8 \(invalid start byte\): save it as UTF-8$",
        id="not-utf8",
    ),
    pytest.param(
        "workers: 2\nrequest_id_header: x\x07\n",
        r"^nexus\.yaml: invalid YAML at line 2, column 21: control character U\+0007 is not allowed: remove it$",
        id="control-character",
    ),
]


@pytest.mark.parametrize(("text", "pattern"), BAD_YAML)
def test_bad_yaml_message(text: str | bytes, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse_config(text, source="nexus.yaml")


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: cannot read the config file: No such file or directory"


def test_load_config_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert str(caught.value) == f"{tmp_path}: cannot read the config file: Is a directory"


def test_load_config_path_through_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "nexus.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: cannot read the config file: Not a directory"


def test_load_config_names_file_in_yaml_errors(tmp_path: Path) -> None:
    path = tmp_path / "nexus.yaml"
    path.write_text("workers: [\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: invalid YAML at line 2, column 1: ")


def test_load_config_reads_file(tmp_path: Path) -> None:
    path = tmp_path / "nexus.yaml"
    path.write_text("workers: 3\nlisten: ['127.0.0.1:9000']\n")
    config = load_config(path)
    assert config.workers == 3
    assert config.listen == ["127.0.0.1:9000"]


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "null\n", "---\n", "~"])
def test_empty_config_is_rejected(text: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(text, source="nexus.yaml")
    assert str(raised.value).startswith("nexus.yaml: the config is empty")
    assert "routes" in str(raised.value)


def test_defaults() -> None:
    config = parse_config(upstream("health: {}") + "\nroutes: [{name: r, upstream: a}]")
    assert config.listen == ["0.0.0.0:8080", "[::]:8080"]
    assert config.workers == "auto"
    assert config.shutdown_timeout == 30.0
    assert config.limits == Limits(max_body=10 * 1024 * 1024, header_timeout=10.0, body_timeout=30.0)
    assert config.trusted_proxies == []
    assert config.request_id_header == "x-request-id"

    spec = config.upstreams["a"]
    assert spec.balance == "round_robin"
    assert spec.hash_on is None
    assert spec.hash_balance_factor == 1.25
    assert spec.health == HealthCheck(path="/", interval=0.25, timeout=0.1, unhealthy_after=2, healthy_after=2)
    assert spec.passive == PassiveHealth(consecutive_failures=3, eject_for=5.0)
    assert spec.timeouts == Timeouts(connect=1.0, response_header=10.0, total=30.0)
    assert spec.retries == Retries(attempts=1, on=["connect_failure", "reset"], budget=0.2, min_concurrent=3)
    assert spec.max_connections == 1024

    only = config.routes[0]
    assert only.match == Match(host=None, path=None, path_prefix=None, methods=None, headers={})
    assert only.strip_prefix is None
    assert only.add_prefix is None


def test_health_unset_by_default() -> None:
    assert parse_config(upstream("balance: round_robin")).upstreams["a"].health is None


# (YAML, attribute path in the Config, value): units end up in base units.
UNIT_VALUES = [
    ("shutdown_timeout: 1.5m", "shutdown_timeout", 90.0),
    ("shutdown_timeout: 0s", "shutdown_timeout", 0.0),
    ("limits: {max_body: 1MiB}", "limits.max_body", 1048576),
    ("limits: {max_body: 2MB}", "limits.max_body", 2_000_000),
    ("limits: {max_body: 4096}", "limits.max_body", 4096),
    ("limits: {max_body: 0}", "limits.max_body", 0),
    ("limits: {header_timeout: 250ms}", "limits.header_timeout", 0.25),
    ("limits: {body_timeout: 1h}", "limits.body_timeout", 3600.0),
    (upstream("health: {interval: 2s, timeout: 500ms}"), "upstreams.a.health.timeout", 0.5),
    (upstream("health: {interval: 2s, timeout: 2s}"), "upstreams.a.health.interval", 2.0),
    (upstream("passive: {eject_for: 30s}"), "upstreams.a.passive.eject_for", 30.0),
    (upstream("timeouts: {connect: 100ms, total: 100ms}"), "upstreams.a.timeouts.total", 0.1),
    (upstream("retries: {budget: 10%}"), "upstreams.a.retries.budget", 0.1),
    (upstream("retries: {budget: 0.5}"), "upstreams.a.retries.budget", 0.5),
    (upstream("retries: {budget: 0%}"), "upstreams.a.retries.budget", 0.0),
]


def attribute(config: Config, path: str) -> object:
    """Follow a dotted path through struct attributes and mapping keys.

    A mapping key may contain dots: the longest key that matches is taken.
    """
    value: object = config
    names = path.split(".")
    while names:
        if isinstance(value, dict):
            size = max(n for n in range(1, len(names) + 1) if ".".join(names[:n]) in value)
            value, names = value[".".join(names[:size])], names[size:]
        else:
            value, names = getattr(value, names[0]), names[1:]
    return value


@pytest.mark.parametrize(("text", "path", "expected"), UNIT_VALUES)
def test_units_converted(text: str, path: str, expected: float) -> None:
    value = attribute(parse_config(text), path)
    assert isinstance(value, (int, float))
    assert math.isclose(value, expected, rel_tol=1e-12)


def test_sizes_are_integers() -> None:
    max_body = parse_config("limits: {max_body: 1.5KiB}").limits.max_body
    assert isinstance(max_body, int)
    assert max_body == 1536


def test_target_list_expands_strings() -> None:
    config = parse_config(targets("'http://10.0.0.5:8000'", "{url: 'http://10.0.0.6:8000', weight: 5}"))
    spec = config.upstreams["a"]
    assert spec.targets == ["http://10.0.0.5:8000", Target(url="http://10.0.0.6:8000", weight=5)]
    assert spec.target_list() == [
        Target(url="http://10.0.0.5:8000", weight=1),
        Target(url="http://10.0.0.6:8000", weight=5),
    ]


GOOD_TARGETS = [
    "'http://10.0.0.5:8000'",
    "'http://10.0.0.5:8000/'",
    "'http://backend.internal:80'",
    "'http://[fd00::5]:8000'",
    "'http://localhost:65535'",
]


@pytest.mark.parametrize("target", GOOD_TARGETS)
def test_target_accepted(target: str) -> None:
    assert len(parse_config(targets(target)).upstreams["a"].target_list()) == 1


def test_yaml_on_is_a_key() -> None:
    # Under YAML 1.1, `on` would be the boolean True and the key would be lost.
    spec = parse_config(upstream("retries: {on: [connect_failure, 502, 503]}")).upstreams["a"]
    assert spec.retries.on == ["connect_failure", 502, 503]


YAML_12_STRINGS = ["on", "off", "yes", "no", "y", "n", "On", "YES"]


@pytest.mark.parametrize("word", YAML_12_STRINGS)
def test_yaml_11_booleans_are_strings(word: str) -> None:
    config = parse_config(match(f"headers: {{{word}: {word}}}"))
    assert config.routes[0].match.headers == {word: word}


def test_yaml_true_is_boolean() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(match("headers: {x-debug: true}"))
    assert str(caught.value) == "routes[0].match.headers.x-debug: invalid value true: expected a string"


def test_yaml_merge_key_may_be_overridden() -> None:
    text = (
        "upstreams:\n"
        "  a: &base {targets: ['http://10.0.0.5:8000'], max_connections: 10}\n"
        "  b:\n"
        "    <<: *base\n"
        "    max_connections: 20\n"
    )
    config = parse_config(text)
    assert config.upstreams["a"].max_connections == 10
    assert config.upstreams["b"].max_connections == 20
    assert config.upstreams["b"].targets == ["http://10.0.0.5:8000"]


GOOD_VALUES = [
    ("workers: 4", "workers", 4),
    ("workers: auto", "workers", "auto"),
    (
        "listen: ['127.0.0.1:8080', '[::1]:8080', 'localhost:9000']",
        "listen",
        ["127.0.0.1:8080", "[::1]:8080", "localhost:9000"],
    ),
    (
        "trusted_proxies: ['10.0.0.0/8', 'fd00::/8', '192.0.2.1', '10.1.2.3/8']",
        "trusted_proxies",
        ["10.0.0.0/8", "fd00::/8", "192.0.2.1", "10.1.2.3/8"],
    ),
    ("request_id_header: X-Correlation-Id", "request_id_header", "X-Correlation-Id"),
    (upstream("balance: maglev, hash_on: 'cookie:session'"), "upstreams.a.hash_on", "cookie:session"),
    (upstream("balance: maglev, hash_on: 'header:X-User-Id'"), "upstreams.a.hash_on", "header:X-User-Id"),
    (upstream("balance: maglev, hash_on: client_ip"), "upstreams.a.hash_on", "client_ip"),
    (upstream("balance: maglev, hash_on: path, hash_balance_factor: 2"), "upstreams.a.hash_balance_factor", 2.0),
    (upstream("balance: p2c_ewma"), "upstreams.a.balance", "p2c_ewma"),
    (upstream("retries: {attempts: 0, on: []}"), "upstreams.a.retries.on", []),
    ("upstreams: {api.v1_x-2: {targets: ['http://10.0.0.5:8000']}}", "upstreams.api.v1_x-2.max_connections", 1024),
]


@pytest.mark.parametrize(("text", "path", "expected"), GOOD_VALUES)
def test_good_value(text: str, path: str, expected: object) -> None:
    assert attribute(parse_config(text), path) == expected


ROUTES_ACCEPTED = [
    pytest.param("match: {host: '*.example.com'}", id="wildcard-host"),
    pytest.param("match: {host: ['api.example.com', 'API.example.org.']}", id="host-list"),
    pytest.param("match: {host: '[::1]'}", id="ipv6-host"),
    pytest.param("match: {host: '10.0.0.1'}", id="ipv4-host"),
    pytest.param("match: {host: []}", id="empty-host-list"),
    pytest.param("match: {methods: []}", id="empty-methods"),
    pytest.param("match: {methods: [GET, HEAD, OPTIONS]}", id="methods"),
    pytest.param("match: {path: /healthz}", id="exact-path"),
    pytest.param("match: {path_prefix: /}", id="root-prefix"),
    pytest.param("match: {headers: {x-tenant: acme, X-Version: '2'}}", id="headers"),
    pytest.param("strip_prefix: /, add_prefix: /", id="slash-prefixes"),
    pytest.param("strip_prefix: /v1, add_prefix: /api/v2", id="prefixes"),
]


@pytest.mark.parametrize("settings", ROUTES_ACCEPTED)
def test_route_accepted(settings: str) -> None:
    assert len(parse_config(route(settings)).routes) == 1


def test_routes_with_different_conditions_accepted() -> None:
    text = UPSTREAMS + (
        "routes:\n"
        "  - {name: a, upstream: catalog, match: {path_prefix: /v1}}\n"
        "  - {name: b, upstream: users, match: {path_prefix: /v1, methods: [POST]}}\n"
        "  - {name: c, upstream: users, match: {path_prefix: /v1, headers: {x-beta: '1'}}}\n"
        "  - {name: d, upstream: catalog}\n"
    )
    assert [route.name for route in parse_config(text).routes] == ["a", "b", "c", "d"]


LISTEN_ADDRESSES = [
    ("0.0.0.0:8080", ("0.0.0.0", 8080)),
    ("127.0.0.1:0", ("127.0.0.1", 0)),
    ("[::]:443", ("::", 443)),
    ("[fd00::1]:65535", ("fd00::1", 65535)),
    ("localhost:9000", ("localhost", 9000)),
]


@pytest.mark.parametrize(("address", "parsed"), LISTEN_ADDRESSES)
def test_parse_listen_address(address: str, parsed: tuple[str, int]) -> None:
    assert parse_listen_address(address) == parsed


BAD_LISTEN_ADDRESSES = [
    ("0.0.0.0", 'invalid address "0.0.0.0": expected "host:port" or "[ipv6]:port", such as "0.0.0.0:8080"'),
    ("::1:80", 'invalid address "::1:80": expected "host:port" or "[ipv6]:port", such as "0.0.0.0:8080"'),
    ("[::1]:99999", 'invalid address "[::1]:99999": port 99999 is outside 0-65535'),
    ("[127.0.0.1]:80", 'invalid address "[127.0.0.1]:80": brackets are for IPv6 only, write "127.0.0.1:80"'),
    ("[localhost]:80", 'invalid address "[localhost]:80": brackets are for IPv6 only, write "localhost:80"'),
    (
        "example.com:80",
        'invalid address "example.com:80": "example.com" is not an IP address (use 0.0.0.0 or [::] for all addresses)',
    ),
]


@pytest.mark.parametrize(("address", "message"), BAD_LISTEN_ADDRESSES)
def test_parse_listen_address_rejects(address: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_listen_address(address)
    assert str(caught.value) == message


@pytest.mark.parametrize("path", ["sockdir/", "/run/nexus/", ".", "..", "run/."])
def test_admin_socket_naming_a_directory_is_rejected(path: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(f"admin: {{socket: {path!r}}}\n")
    assert "names a directory: give a socket file in it, such as" in str(raised.value)
