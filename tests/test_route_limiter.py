"""RouteLimiter against real shared tables: calendar months, dry runs, header fields."""

from __future__ import annotations

import calendar
from datetime import datetime, timezone

import pytest

from nexus.auth import ANONYMOUS, Identity, hash_key
from nexus.config import parse_config
from nexus.errors import RateLimited
from nexus.ratelimit import RequestFacts, RouteLimiter
from nexus.shm.ratelimit import GcraTable, QuotaTable

BASE = 'listen: ["127.0.0.1:0"]\nupstreams: {a: {targets: ["http://127.0.0.1:9"]}}\n'


def limiter_for(route_yaml: str, extra: str = "") -> RouteLimiter:
    config = parse_config(f"{BASE}{extra}routes: [{route_yaml}]\n")
    return RouteLimiter(config.routes[0], config, GcraTable.create(64), QuotaTable.create(64))


def facts(identity: Identity = ANONYMOUS, ip: str = "192.0.2.1") -> RequestFacts:
    return RequestFacts("r", identity, ip, [])


def test_month_quota_counts_calendar_month():
    limiter = limiter_for("{name: r, upstream: a, rate_limit: {quota: 2/month}}")

    first = limiter.check(facts())
    limiter.check(facts())
    with pytest.raises(RateLimited) as caught:
        limiter.check(facts())

    now = datetime.now(timezone.utc)
    days = calendar.monthrange(now.year, now.month)[1]
    seconds_left = (now.replace(day=1, hour=0, minute=0, second=0, microsecond=0) - now).total_seconds() + days * 86400
    assert dict(first.headers)[b"ratelimit-policy"] == b'"r.quota";q=2;w=2592000'
    retry_after = int(dict(caught.value.headers)[b"retry-after"])
    # The next request fits once enough of this month's count has slid out
    # of the window, which is within this month and the next.
    assert 1 <= retry_after <= seconds_left + 31 * 86400


def test_dry_run_limit_counts_but_never_rejects():
    limiter = limiter_for("{name: r, upstream: a, policies: [{name: p, key: [client_ip], rate: 1/min, dry_run: true}]}")

    verdicts = [limiter.check(facts()) for _ in range(3)]

    assert [verdict.outcomes for verdict in verdicts] == [
        [("p.rate", "allowed")],
        [("p.rate", "dry_run_denied")],
        [("p.rate", "dry_run_denied")],
    ]
    assert all(verdict.headers == [] for verdict in verdicts)


def test_rejection_lists_every_policy_met():
    key = hash_key("k")
    limiter = limiter_for(
        "{name: r, upstream: a, auth: api_key, rate_limit: {rate: 10/s, burst: 10}, "
        "policies: [{name: p, key: [consumer], quota: 1/day}]}",
        extra=f'consumers: {{acme: {{keys: ["{key}"], rate_limit: {{rate: 5/s, burst: 5}}}}}}\n',
    )
    acme = Identity("acme", "free", 1)

    admitted = limiter.check(facts(acme))
    with pytest.raises(RateLimited) as caught:
        limiter.check(facts(acme))

    fields = dict(admitted.headers)
    assert fields[b"ratelimit-policy"] == b'"consumer.rate";q=5;w=1, "r.rate";q=10;w=1, "p.quota";q=1;w=86400'
    assert fields[b"ratelimit"].startswith(b'"consumer.rate";r=4;t=1, "r.rate";r=9;t=1, "p.quota";r=0;t=')
    assert caught.value.policy == "p.quota"
    assert dict(caught.value.headers)[b"ratelimit-policy"] == fields[b"ratelimit-policy"]


def test_anonymous_consumer_key_falls_back_to_client_ip():
    limiter = limiter_for("{name: r, upstream: a, policies: [{name: p, key: [consumer], rate: 1/min}]}")

    limiter.check(facts(ip="192.0.2.1"))
    limiter.check(facts(ip="192.0.2.2"))
    with pytest.raises(RateLimited):
        limiter.check(facts(ip="192.0.2.1"))
