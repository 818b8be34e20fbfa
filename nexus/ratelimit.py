"""Route-level rate limits: decisions in shared memory, IETF RateLimit header fields.

A route's `rate_limit` holds one limit for the whole route, shared by every
client and every worker of the node: a GCRA rate with a burst, a
sliding-window quota, or both. Each is a policy named after the route
(`<route>.rate`, `<route>.quota`) and advertised in the `RateLimit-Policy`
and `RateLimit` response header fields of draft-ietf-httpapi-ratelimit-headers.
A refused request gets 429 with `Retry-After` and a problem body naming the
policy. In dry-run mode decisions are made and counted but never enforced.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from nexus.config import Route, RouteRateLimit
from nexus.errors import RateLimited
from nexus.shm.ratelimit import Decision, GcraTable, Outcome, QuotaTable, key_hash

__all__ = ["RouteLimiter", "Verdict"]

log = logging.getLogger("nexus.ratelimit")

# At most one "would have refused" line per policy in this many seconds, so
# a dry run under load does not flood the log.
_DRY_RUN_LOG_INTERVAL = 10.0


@dataclass(slots=True)
class Verdict:
    """What the limiter decided for an admitted request."""

    headers: list[tuple[bytes, bytes]]
    # One entry per policy: "allowed", "dry_run_denied", "failed_open".
    outcomes: list[tuple[str, str]]


class _Policy:
    """One limit of a route and the constant parts of its header fields."""

    def __init__(self, name: str, quota: int, window: int) -> None:
        self.name = name
        self.policy_item = f'"{name}";q={quota};w={window}'
        self._last_dry_run_log = 0.0

    def remaining_item(self, decision: Decision) -> str:
        # Seconds until the quota is whole again, rounded up (the field is an integer).
        reset = math.ceil(decision.wait_us / 1_000_000)
        return f'"{self.name}";r={decision.remaining};t={reset}'

    def should_log_dry_run(self) -> bool:
        now = time.monotonic()
        if now - self._last_dry_run_log < _DRY_RUN_LOG_INTERVAL:
            return False
        self._last_dry_run_log = now
        return True


class RouteLimiter:
    """The limits of one route, decided against the node's shared tables."""

    def __init__(self, route: Route, gcra: GcraTable, quotas: QuotaTable) -> None:
        spec: RouteRateLimit = route.rate_limit
        self.route = route.name
        self.dry_run = spec.dry_run
        self._gcra = gcra
        self._quotas = quotas
        self._key = key_hash("route", route.name)

        self._rate: _Policy | None = None
        if spec.rate is not None:
            self._interval_us = max(1, round(1_000_000 / spec.rate))
            self._limit_us = spec.burst * self._interval_us
            self._rate = _Policy(f"{route.name}.rate", *_as_quota(spec.rate))
            self._rate_text = f"{spec.rate:g} requests per second with a burst of {spec.burst}"

        self._quota: _Policy | None = None
        if spec.quota is not None:
            self._window_us = spec.quota.window * 1_000_000
            self._quota_limit = spec.quota.requests
            self._quota = _Policy(f"{route.name}.quota", spec.quota.requests, spec.quota.window)
            self._quota_text = f"{spec.quota.requests} requests per {spec.quota.window} s"

        policies = [policy.policy_item for policy in (self._rate, self._quota) if policy is not None]
        self._policy_header = (b"ratelimit-policy", ", ".join(policies).encode())

    def check(self) -> Verdict:
        """Decide one request; raise RateLimited if a policy refuses it and is enforced."""
        items: list[str] = []
        outcomes: list[tuple[str, str]] = []
        if self._rate is not None:
            decision = self._gcra.acquire(self._key, self._interval_us, self._limit_us)
            self._apply(self._rate, decision, self._rate_text, items, outcomes)
        if self._quota is not None:
            decision = self._quotas.acquire(self._key, self._window_us, self._quota_limit)
            self._apply(self._quota, decision, self._quota_text, items, outcomes)

        if self.dry_run or not items:
            return Verdict([], outcomes)
        return Verdict([self._policy_header, (b"ratelimit", ", ".join(items).encode())], outcomes)

    def _apply(self, policy: _Policy, decision: Decision, text: str, items: list[str], outcomes: list) -> None:
        if decision.outcome == Outcome.ALLOWED:
            outcomes.append((policy.name, "allowed"))
            items.append(policy.remaining_item(decision))
            return
        if decision.outcome == Outcome.FAILED_OPEN:
            # The table had no room: admit, and let the counter tell the operator.
            outcomes.append((policy.name, "failed_open"))
            return

        retry_after = max(1, math.ceil(decision.wait_us / 1_000_000))
        if self.dry_run:
            outcomes.append((policy.name, "dry_run_denied"))
            if policy.should_log_dry_run():
                log.info("dry run: would refuse route=%s policy=%s retry_after=%d", self.route, policy.name, retry_after)
            return
        headers = (
            (b"retry-after", str(retry_after).encode()),
            self._policy_header,
            (b"ratelimit", f'"{policy.name}";r=0;t={retry_after}'.encode()),
        )
        raise RateLimited(
            f'rate limit policy "{policy.name}" refused the request ({text}): retry after {retry_after} s',
            policy=policy.name,
            headers=headers,
        )


def _as_quota(rate: float) -> tuple[int, int]:
    """Express a rate as (quota, window seconds) with a whole-second window, as the header needs."""
    if rate >= 1:
        return round(rate), 1
    window = math.ceil(1 / rate)
    return max(1, round(rate * window)), window
