"""ConfigError, the unit types and the msgspec Struct for each config section.

It also contains the constants that the structs and the checks share.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

import msgspec

from nexus.units import MONTH, parse_duration, parse_quota, parse_rate, parse_ratio, parse_size


class ConfigError(Exception):
    """A config file that cannot be used, with the path of the bad key."""


class Duration(float):
    """Seconds, written in YAML as `250ms`, `2s`, `1m`."""


class Size(int):
    """Bytes, written in YAML as `64KiB`, `10MiB`."""


class Ratio(float):
    """A fraction in 0..1, written in YAML as `20%`."""


class Rate(float):
    """Requests per second, written in YAML as `100/s` or `30/min`."""


class Quota:
    """A number of requests per window, written in YAML as `300/min` or `10000/day`.

    `window` is in seconds; a `/month` quota has calendar months as windows
    (`calendar_month` is true) and `window` is then 30 days, the length
    advertised in header fields.
    """

    __slots__ = ("calendar_month", "requests", "window")

    def __init__(self, requests: int, window: int, calendar_month: bool = False) -> None:
        self.requests = requests
        self.window = window
        self.calendar_month = calendar_month

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Quota) and (self.requests, self.window, self.calendar_month) == (
            other.requests,
            other.window,
            other.calendar_month,
        )

    def __hash__(self) -> int:
        return hash((self.requests, self.window, self.calendar_month))

    def __repr__(self) -> str:
        return f"Quota({self.requests}, {self.window}{', calendar_month=True' if self.calendar_month else ''})"


def _parse_quota(value: object) -> Quota:
    requests, window = parse_quota(value)
    if window == MONTH:
        return Quota(requests, window, calendar_month=True)
    return Quota(requests, window)


_UNIT_PARSERS = {
    Duration: parse_duration,
    Size: parse_size,
    Ratio: parse_ratio,
    Rate: parse_rate,
    Quota: _parse_quota,
}

_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")

# Conditions a retry can be taken on; status codes are given as integers.
RetryCondition = Literal["connect_failure", "timeout", "reset"] | int

Balance = Literal["round_robin", "least_request", "p2c_ewma", "maglev"]

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """Base of every config section: unknown keys are errors, not ignored."""


class Target(_Section):
    """One upstream server: an http:// URL with host and port, and a weight."""

    url: str
    weight: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1


class HealthCheck(_Section):
    """Active health check, run once per node by the master."""

    path: str = "/"
    interval: Duration = Duration(0.25)
    timeout: Duration = Duration(0.1)
    unhealthy_after: PositiveInt = 2
    healthy_after: PositiveInt = 2
    # With every target down, send requests to all of them anyway, as nginx
    # and Envoy's panic mode do, instead of returning 503 for everything.
    fail_open: bool = True


class PassiveHealth(_Section):
    """Ejection of a target after consecutive failed requests (per worker)."""

    consecutive_failures: PositiveInt = 3
    eject_for: Duration = Duration(5.0)


class Timeouts(_Section):
    """Per-try and total timeouts for requests to an upstream, in seconds."""

    connect: Duration = Duration(1.0)
    response_header: Duration = Duration(10.0)
    total: Duration = Duration(30.0)


class Retries(_Section):
    """Retry policy; `attempts` counts retries after the first try."""

    attempts: Annotated[int, msgspec.Meta(ge=0, le=10)] = 1
    # A reset is retried only for idempotent requests (see nexus.proxy), as
    # nginx's default proxy_next_upstream does for errors.
    on: list[RetryCondition] = msgspec.field(default_factory=lambda: ["connect_failure", "reset"])
    budget: Ratio = Ratio(0.2)
    min_concurrent: Annotated[int, msgspec.Meta(ge=0)] = 3


class Concurrency(_Section):
    """An adaptive limit on requests in flight to one upstream, shared by the node's workers."""

    min_limit: PositiveInt = 4
    max_limit: PositiveInt = 1000
    initial_limit: PositiveInt = 20
    max_queue_wait: Duration = Duration(0.1)
    overloaded_queue_wait: Duration = Duration(0.005)
    critical_reserve: Ratio = Ratio(0.2)


class Upstream(_Section):
    """A named pool of targets with its balancer, health checks and timeouts."""

    targets: list[str | Target]
    balance: Balance = "round_robin"
    hash_on: str | None = None
    hash_balance_factor: Annotated[float, msgspec.Meta(ge=1.0)] = 1.25
    health: HealthCheck | None = None
    passive: PassiveHealth = msgspec.field(default_factory=PassiveHealth)
    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)
    retries: Retries = msgspec.field(default_factory=Retries)
    max_connections: PositiveInt = 1024
    concurrency: Concurrency | None = None

    def target_list(self) -> list[Target]:
        """Return the targets with the short string form expanded."""
        return [Target(url=t) if isinstance(t, str) else t for t in self.targets]


class Match(_Section):
    """Conditions a request must meet for a route to apply; all must hold."""

    host: str | list[str] | None = None
    path: str | None = None
    path_prefix: str | None = None
    methods: list[str] | None = None
    headers: dict[str, str] = msgspec.field(default_factory=dict)


class RouteRateLimit(_Section):
    """One limit for a whole route, shared by all its clients and all workers."""

    rate: Rate | None = None
    burst: PositiveInt = 1
    quota: Quota | None = None
    dry_run: bool = False


class Policy(_Section):
    """A rate limit of a route, counted separately per value of its key."""

    name: str
    key: list[str] = msgspec.field(default_factory=lambda: ["consumer"])
    rate: Rate | None = None
    burst: PositiveInt = 1
    quota: Quota | None = None
    cost: PositiveInt = 1
    dry_run: bool = False


# Statuses a route stores by default: the heuristically cacheable ones of
# RFC 9110 section 15.1 except 206, because Nexus does not combine ranges.
CACHEABLE_STATUSES = (200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501)


class CacheKey(_Section):
    """What the cache key of a route's responses is made of, besides host and path."""

    # "all", "none", or the list of query parameter names that are part of the key.
    query: Literal["all", "none"] | list[str] = "all"
    headers: list[str] = msgspec.field(default_factory=list)
    consumer: bool = False


class RouteCache(_Section):
    """The response cache of one route (RFC 9111, shared cache)."""

    enabled: bool = True
    key: CacheKey = msgspec.field(default_factory=CacheKey)
    default_ttl: Duration | None = None
    max_ttl: Duration | None = None
    max_object: Size | None = None
    statuses: list[int] = msgspec.field(default_factory=lambda: list(CACHEABLE_STATUSES))
    stale_while_revalidate: Duration = Duration(0.0)
    stale_if_error: Duration = Duration(0.0)
    coalesce: bool = True
    coalesce_timeout: Duration = Duration(5.0)


Auth = Literal["none", "api_key", "optional"]


class Route(_Section):
    """A rule that sends matching requests to one upstream."""

    name: str
    upstream: str
    match: Match = msgspec.field(default_factory=Match)
    strip_prefix: str | None = None
    add_prefix: str | None = None
    auth: Auth = "none"
    rate_limit: RouteRateLimit | None = None
    policies: list[Policy] = msgspec.field(default_factory=list)
    cache: RouteCache | None = None


class Limits(_Section):
    """Limits on downstream requests, enforced by every worker."""

    max_body: Size = Size(10 * 1024 * 1024)
    header_timeout: Duration = Duration(10.0)
    body_timeout: Duration = Duration(30.0)


class ApiKeys(_Section):
    """Where requests carry their API key."""

    header: str | None = "x-api-key"
    query: str | None = None


class Tier(_Section):
    """A class of consumers: its priority when upstreams shed load, and its default limit."""

    priority: Annotated[int, msgspec.Meta(ge=1, le=100)] = 1
    rate_limit: RouteRateLimit | None = None


def _default_tiers() -> dict[str, Tier]:
    return {"critical": Tier(priority=3), "pro": Tier(priority=2), "free": Tier(priority=1)}


class Consumer(_Section):
    """A client of the API, known by its API keys (stored as SHA-256 hashes)."""

    keys: list[str]
    tier: str = "free"
    rate_limit: RouteRateLimit | None = None


class Redis(_Section):
    """The Redis server or cluster that nodes share limits through."""

    url: str | None = None
    cluster: list[str] = msgspec.field(default_factory=list)
    sync_interval: Duration = Duration(0.1)
    timeout: Duration = Duration(0.25)
    key_prefix: str = "nexus"
    node_id: str | None = None


class Cache(_Section):
    """Node-wide settings of the response cache; routes turn it on with their own `cache` section."""

    # Keep responses in Redis too (the `redis` section): an L1 miss that hits there skips the upstream.
    l2: bool = False
    l2_write_queue: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)] = 1024
    # Entries the Redis Stream of purges keeps (MAXLEN ~); a node away for more purges clears its cache.
    purge_stream_length: Annotated[int, msgspec.Meta(ge=100, le=1 << 24)] = 10000
    tag_headers: list[str] = msgspec.field(default_factory=lambda: ["surrogate-key", "cache-tag"])


class SharedMemory(_Section):
    """Sizes of the node's shared-memory tables, fixed when the master starts."""

    rate_limit_keys: Annotated[int, msgspec.Meta(ge=1, le=1 << 26)] = 65536
    event_ring_records: Annotated[int, msgspec.Meta(ge=64, le=1 << 22)] = 16384
    cache_size: Size = Size(64 * 1024 * 1024)
    cache_entries: Annotated[int, msgspec.Meta(ge=1, le=1 << 26)] = 65536
    cache_max_object: Size = Size(1024 * 1024)


class Admin(_Section):
    """Where the master serves its admin API (for nexusctl) and its Prometheus metrics."""

    # A Unix socket path; null means $RUNTIME_DIRECTORY/admin.sock under
    # systemd, else /run/nexus/admin.sock.
    socket: str | None = None
    # Octal permission bits of the socket, as a string such as "0660". An
    # int is decoded only so that checks.py can reject a bare YAML number
    # with a message about quoting it.
    socket_mode: str | int = "0600"
    # The group that owns the socket, for operators outside the service user.
    socket_group: str | None = None
    # host:port of the /metrics HTTP listener; null turns it off.
    metrics: str | None = "127.0.0.1:9901"


class AccessLog(_Section):
    """The access log: one JSON line per request, written by the master from the workers' rings."""

    # A file path, "-" for stderr, or null for no access log.
    path: str | None = None
    # Share of the requests logged; responses of status 500 and above are
    # all logged while always_log_errors is true.
    sample: Ratio = Ratio(1.0)
    always_log_errors: bool = True


class Config(_Section):
    """A whole Nexus config file."""

    listen: list[str] = msgspec.field(default_factory=lambda: ["0.0.0.0:8080", "[::]:8080"])
    workers: int | Literal["auto"] = "auto"
    shutdown_timeout: Duration = Duration(30.0)
    reload_timeout: Duration = Duration(30.0)
    admin: Admin = msgspec.field(default_factory=Admin)
    limits: Limits = msgspec.field(default_factory=Limits)
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    request_id_header: str = "x-request-id"
    upstreams: dict[str, Upstream] = msgspec.field(default_factory=dict)
    routes: list[Route] = msgspec.field(default_factory=list)
    api_keys: ApiKeys = msgspec.field(default_factory=ApiKeys)
    tiers: dict[str, Tier] = msgspec.field(default_factory=_default_tiers)
    consumers: dict[str, Consumer] = msgspec.field(default_factory=dict)
    redis: Redis | None = None
    shared_memory: SharedMemory = msgspec.field(default_factory=SharedMemory)
    access_log: AccessLog = msgspec.field(default_factory=AccessLog)
    # Whether workers send a record of every request to the master, for
    # per-consumer usage (GET /usage, nexusctl top); the access log needs them too.
    usage: bool = True
    cache: Cache = msgspec.field(default_factory=Cache)

    def worker_count(self) -> int:
        """Return the number of workers: one per usable CPU for `auto`."""
        if self.workers == "auto":
            return len(os.sched_getaffinity(0))
        return self.workers
