"""Rate limits on the request path: which limits apply, decided in shared memory.

A request can meet three kinds of limit, checked in this order:

1. its consumer's limit (`consumers.<name>.rate_limit`, or its tier's),
   counted per consumer across all routes, policy name `consumer`;
2. the route's own limit (`routes[].rate_limit`), one for the whole route,
   policy name `<route>`;
3. the route's policies (`routes[].policies`), each counted per value of
   its key (route, consumer, client IP, header values), policy name as
   configured. An anonymous request's `consumer` key part is its client IP.

Each limit is a GCRA rate with a burst (`<name>.rate`), a sliding-window
quota (`<name>.quota`), or both, decided in the node's shared tables
(`nexus.shm.ratelimit`), so it is enforced across every worker. Admitted responses
carry `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers);
a rejected request gets 429 with `Retry-After` and a problem body naming the
policy. A dry-run limit is decided and counted but never enforced or shown.

With `redis:` configured, the same decisions also spend allowance that the
master leases from Redis (`nexus.redis_sync`), so limits hold across nodes.
No decision waits for Redis.
"""

from __future__ import annotations

import calendar
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from nexus.auth import Identity
from nexus.config import Config, Policy, Quota, Route, RouteRateLimit
from nexus.errors import RateLimited
from nexus.shm.ratelimit import GcraTable, Outcome, QuotaTable, key_hash

__all__ = ["RequestFacts", "RouteLimiter", "Verdict", "route_limit_names"]

log = logging.getLogger("nexus.ratelimit")

# At most one "would have rejected" line per policy in this many seconds, so
# a dry run under load does not flood the log.
_DRY_RUN_LOG_INTERVAL = 10.0

# Outcome codes as plain ints, compared on every request.
_ALLOWED = int(Outcome.ALLOWED)
_FAILED_OPEN = int(Outcome.FAILED_OPEN)

# The largest wait a table reports, for a cost that can never fit.
_NEVER = (1 << 64) - 1


@dataclass(slots=True)
class RequestFacts:
    """The facts of one request that a limit key can be made of."""

    route: str
    identity: Identity
    client_ip: str
    headers: list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Verdict:
    """The decisions of the limits for an admitted request."""

    headers: list[tuple[bytes, bytes]]
    # One entry per limit: (policy name, "allowed" | "dry_run_denied" | "failed_open").
    outcomes: list[tuple[str, str]]


class _Limit:
    """One rate, one quota, or both, under one policy name, with its header field parts."""

    def __init__(self, name: str, spec: RouteRateLimit | Policy, dry_run: bool, cost: int = 1) -> None:
        self.name = name
        self.dry_run = dry_run
        self.cost = cost
        self.rate_name = f"{name}.rate"
        self.quota_name = f"{name}.quota"
        self.rate = spec.rate
        self.quota: Quota | None = spec.quota
        items = []
        if spec.rate is not None:
            self.interval_us = max(1, round(1_000_000 / spec.rate))
            self.limit_us = spec.burst * self.interval_us
            quota, window = _as_quota(spec.rate, spec.burst)
            items.append(f'"{self.rate_name}";q={quota};w={window}')
            self.rate_text = f"{spec.rate:g} requests per second with a burst of {spec.burst}"
        if spec.quota is not None:
            items.append(f'"{self.quota_name}";q={spec.quota.requests};w={spec.quota.window}')
            period = "calendar month" if spec.quota.calendar_month else f"{spec.quota.window} s"
            self.quota_text = f"{spec.quota.requests} requests per {period}"
        self.policy_items = items
        self._last_dry_run_log = 0.0

    def should_log_dry_run(self) -> bool:
        now = time.monotonic()
        if now - self._last_dry_run_log < _DRY_RUN_LOG_INTERVAL:
            return False
        self._last_dry_run_log = now
        return True


class _Check:
    """A limit and how to build the key its counts are kept under."""

    def __init__(self, limit: _Limit, key: Callable[[RequestFacts], int]) -> None:
        self.limit = limit
        self.key = key


class _Tally:
    """The decisions made so far for one request, and what to give back on a rejection."""

    __slots__ = ("items", "outcomes", "policies", "rejections", "taken")

    def __init__(self) -> None:
        self.policies: list[str] = []
        self.items: list[str] = []
        self.outcomes: list[tuple[str, str]] = []
        # Admissions to give back if a later limit rejects: (table, key, limit, window_us, now_us).
        self.taken: list[tuple[str, int, _Limit, int, int]] = []
        # Enforced rejections: (limit, policy name, description, retry after in seconds or None).
        self.rejections: list[tuple[_Limit, str, str, int | None]] = []


class _Decider:
    """Runs limits against the shared tables and collects header items and outcomes.

    Every limit is decided, even after one rejects, so a 429 names the
    longest wait. If any enforced limit rejects, the admissions the others
    made are given back, so a rejected request uses up none of them.
    """

    def __init__(self, gcra: GcraTable, quotas: QuotaTable, route: str) -> None:
        self._gcra = gcra
        self._quotas = quotas
        self._route = route
        # Bound C calls that return plain tuples: this runs on every request.
        self._decide_rate = gcra.acquire_raw()
        self._decide_quota = quotas.acquire_raw()

    def run(self, checks: Sequence[tuple[_Limit, int]]) -> Verdict:
        tally = _Tally()
        for limit, key in checks:
            if limit.rate is not None:
                decision = self._decide_rate(key, limit.interval_us, limit.limit_us, limit.cost, 0)
                if self._apply(limit, limit.rate_name, decision, limit.rate_text, tally):
                    tally.taken.append(("rate", key, limit, 0, 0))
            if limit.quota is not None:
                window_us, now_us = _quota_clock(limit.quota)
                decision = self._decide_quota(key, window_us, limit.quota.requests, limit.cost, now_us)
                if self._apply(limit, limit.quota_name, decision, limit.quota_text, tally):
                    tally.taken.append(("quota", key, limit, window_us, now_us))
            if not limit.dry_run:
                tally.policies.extend(limit.policy_items)

        if tally.rejections:
            self._give_back(tally.taken)
            raise _rejection(tally)
        if not tally.items:
            return Verdict([], tally.outcomes)
        policy_field = ", ".join(tally.policies).encode()
        return Verdict([(b"ratelimit-policy", policy_field), (b"ratelimit", ", ".join(tally.items).encode())], tally.outcomes)

    def _apply(self, limit: _Limit, name: str, decision: tuple[int, int, int], text: str, tally: _Tally) -> bool:
        """Record one (outcome, remaining, wait_us) decision; return whether it took from the limit."""
        outcome, remaining, wait_us = decision
        if outcome == _ALLOWED:
            tally.outcomes.append((name, "allowed"))
            if not limit.dry_run:
                # Seconds until the limit is whole again, rounded up (the field is an integer).
                tally.items.append(f'"{name}";r={remaining};t={-(-wait_us // 1_000_000)}')
            return True
        if outcome == _FAILED_OPEN:
            # The table had no room: admit, and let the counter tell the operator.
            tally.outcomes.append((name, "failed_open"))
            return False

        retry_after = _retry_after(wait_us)
        if limit.dry_run:
            tally.outcomes.append((name, "dry_run_denied"))
            if limit.should_log_dry_run():
                log.info("dry run: would reject route=%s policy=%s retry_after=%s", self._route, name, retry_after)
            return False
        tally.rejections.append((limit, name, text, retry_after))
        return False

    def _give_back(self, taken: list[tuple[str, int, _Limit, int, int]]) -> None:
        for table, key, limit, window_us, now_us in taken:
            if table == "rate":
                self._gcra.release(key, limit.interval_us, limit.cost)
            else:
                self._quotas.release(key, window_us, limit.cost, now_us)


def _rejection(tally: _Tally) -> RateLimited:
    """Build the 429 for the rejection with the longest wait (one that never fits wins)."""
    limit, name, text, retry_after = max(
        tally.rejections, key=lambda rejection: float("inf") if rejection[3] is None else rejection[3]
    )
    headers = [(b"ratelimit-policy", ", ".join(tally.policies).encode())]
    items = [
        f'"{other}";r=0' if wait is None else f'"{other}";r=0;t={wait}' for _, other, _, wait in tally.rejections
    ]
    headers.append((b"ratelimit", ", ".join(items).encode()))
    if retry_after is None:
        detail = f'rate limit policy "{name}" rejected the request ({text}): its cost of {limit.cost} never fits'
    else:
        detail = f'rate limit policy "{name}" rejected the request ({text}): retry after {retry_after} s'
        headers.append((b"retry-after", str(retry_after).encode()))
    return RateLimited(detail, policy=name, headers=tuple(headers))


def _retry_after(wait_us: int) -> int | None:
    """Whole seconds to wait, at least 1; None when no wait helps."""
    if wait_us >= _NEVER:
        return None
    return max(1, math.ceil(wait_us / 1_000_000))


def _quota_clock(quota: Quota) -> tuple[int, int]:
    """Return (window_us, now_us) for a quota decision; now_us 0 means "read the clock in C".

    A calendar month is a window of that month's length. The table numbers
    windows as now // window, so it gets a time whose quotient is the month
    number and whose remainder is the time into the month.
    """
    if not quota.calendar_month:
        return quota.window * 1_000_000, 0
    now = datetime.now(UTC)
    days = calendar.monthrange(now.year, now.month)[1]
    month_us = days * 86_400_000_000
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    into_month_us = (now - start) // _MICROSECOND
    month_number = now.year * 12 + now.month
    return month_us, month_number * month_us + into_month_us


_MICROSECOND = datetime.resolution


def _as_quota(rate: float, burst: int) -> tuple[int, int]:
    """Express a rate and burst as (quota, window seconds) for RateLimit-Policy.

    The window is whole seconds, long enough to earn the burst back; the
    quota is what the rate earns in it, and never less than the burst, so the
    `r` that a RateLimit field reports (remaining burst) never exceeds `q`.
    """
    window = max(1, math.ceil(burst / rate))
    return max(burst, math.floor(rate * window)), window


class RouteLimiter:
    """Every limit that applies on one route: consumer, route and policies."""

    def __init__(self, route: Route, config: Config, gcra: GcraTable, quotas: QuotaTable) -> None:
        self.route = route.name
        self._decider = _Decider(gcra, quotas, route.name)
        self._consumer_limits = _consumer_limits(config) if route.auth != "none" else {}
        self._consumer_keys = {name: key_hash("consumer", name) for name in self._consumer_limits}

        self._checks: list[_Check] = []
        if route.rate_limit is not None:
            whole_route = key_hash("route", route.name)
            limit = _Limit(route.name, route.rate_limit, route.rate_limit.dry_run)
            self._checks.append(_Check(limit, lambda facts, key=whole_route: key))
        for policy in route.policies:
            limit = _Limit(policy.name, policy, policy.dry_run, policy.cost)
            self._checks.append(_Check(limit, _policy_key(route.name, policy)))

    @property
    def active(self) -> bool:
        return bool(self._checks or self._consumer_limits)

    def check(self, facts: RequestFacts) -> Verdict:
        """Decide one request; raise RateLimited if an enforced limit rejects it."""
        checks: list[tuple[_Limit, int]] = []
        consumer = facts.identity.consumer
        consumer_limit = self._consumer_limits.get(consumer) if consumer is not None else None
        if consumer_limit is not None:
            checks.append((consumer_limit, self._consumer_keys[consumer]))
        for check in self._checks:
            checks.append((check.limit, check.key(facts)))
        return self._decider.run(checks)


def _consumer_limits(config: Config) -> dict[str, _Limit]:
    """Return the limit of each consumer: its own, else its tier's. Consumers with neither are left out."""
    limits = {}
    for name, consumer in config.consumers.items():
        spec = consumer.rate_limit or config.tiers[consumer.tier].rate_limit
        if spec is not None:
            limits[name] = _Limit("consumer", spec, spec.dry_run)
    return limits


def _policy_key(route: str, policy: Policy) -> Callable[[RequestFacts], int]:
    """Build the function that makes a request's key for `policy` from its key parts."""
    parts = policy.key
    headers = [part.removeprefix("header:").lower().encode("latin-1") for part in parts if part.startswith("header:")]

    def key(facts: RequestFacts) -> int:
        values: list[str | bytes] = ["policy", route, policy.name]
        header_values = _header_values(facts.headers, headers) if headers else {}
        for part in parts:
            if part == "route":
                values.append(route)
            elif part == "consumer":
                consumer = facts.identity.consumer
                values.append(f"consumer:{consumer}" if consumer is not None else f"ip:{facts.client_ip}")
            elif part == "client_ip":
                values.append(facts.client_ip)
            else:
                values.append(header_values.get(part[7:].lower().encode("latin-1"), b""))
        return key_hash(*values)

    return key


def _header_values(headers: list[tuple[bytes, bytes]], names: list[bytes]) -> dict[bytes, bytes]:
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        if name in names and name not in found:
            found[name] = value
    return found


def route_limit_names(route: Route, config: Config) -> list[str]:
    """List every policy name (with .rate / .quota) that the route's limiter can report, for the metric layout."""
    names: list[str] = []

    def add(name: str, spec: RouteRateLimit | Policy) -> None:
        for suffix, present in ((".rate", spec.rate is not None), (".quota", spec.quota is not None)):
            if present and name + suffix not in names:
                names.append(name + suffix)

    if route.auth != "none":
        for consumer in config.consumers.values():
            spec = consumer.rate_limit or config.tiers[consumer.tier].rate_limit
            if spec is not None:
                add("consumer", spec)
    if route.rate_limit is not None:
        add(route.name, route.rate_limit)
    for policy in route.policies:
        add(policy.name, policy)
    return names
