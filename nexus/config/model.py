"""ConfigError, the unit types and the msgspec Struct for each config section.

It also contains the constants that the structs and the checks share.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

import msgspec

from nexus.units import parse_duration, parse_quota, parse_rate, parse_ratio, parse_size


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
    """A number of requests per window, written in YAML as `300/min` or `10000/day`."""

    __slots__ = ("requests", "window")

    def __init__(self, requests: int, window: int) -> None:
        self.requests = requests
        self.window = window  # seconds

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Quota) and (self.requests, self.window) == (other.requests, other.window)

    def __hash__(self) -> int:
        return hash((self.requests, self.window))

    def __repr__(self) -> str:
        return f"Quota({self.requests}, {self.window})"


def _parse_quota(value: object) -> Quota:
    return Quota(*parse_quota(value))


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
    on: list[RetryCondition] = msgspec.field(default_factory=lambda: ["connect_failure"])
    budget: Ratio = Ratio(0.2)
    min_concurrent: Annotated[int, msgspec.Meta(ge=0)] = 3


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


class Route(_Section):
    """A rule that sends matching requests to one upstream."""

    name: str
    upstream: str
    match: Match = msgspec.field(default_factory=Match)
    strip_prefix: str | None = None
    add_prefix: str | None = None
    rate_limit: RouteRateLimit | None = None


class Limits(_Section):
    """Limits on downstream requests, enforced by every worker."""

    max_body: Size = Size(10 * 1024 * 1024)
    header_timeout: Duration = Duration(10.0)
    body_timeout: Duration = Duration(30.0)


class SharedMemory(_Section):
    """Sizes of the node's shared-memory tables, fixed when the master starts."""

    rate_limit_keys: Annotated[int, msgspec.Meta(ge=1, le=1 << 26)] = 65536
    event_ring_records: Annotated[int, msgspec.Meta(ge=64, le=1 << 22)] = 16384
    cache_size: Size = Size(64 * 1024 * 1024)
    cache_entries: Annotated[int, msgspec.Meta(ge=1, le=1 << 26)] = 65536
    cache_max_object: Size = Size(1024 * 1024)


class Config(_Section):
    """A whole Nexus config file."""

    listen: list[str] = msgspec.field(default_factory=lambda: ["0.0.0.0:8080", "[::]:8080"])
    workers: int | Literal["auto"] = "auto"
    shutdown_timeout: Duration = Duration(30.0)
    limits: Limits = msgspec.field(default_factory=Limits)
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    request_id_header: str = "x-request-id"
    upstreams: dict[str, Upstream] = msgspec.field(default_factory=dict)
    routes: list[Route] = msgspec.field(default_factory=list)
    shared_memory: SharedMemory = msgspec.field(default_factory=SharedMemory)

    def worker_count(self) -> int:
        """Return the number of workers: one per usable CPU for `auto`."""
        if self.workers == "auto":
            return len(os.sched_getaffinity(0))
        return self.workers
