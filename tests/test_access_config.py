"""Config errors of the rate-limit, API key, tier, consumer and concurrency sections.

Each case is a config fragment and the exact message `parse_config` must
raise: the key path, the value found and the fix.
"""

from __future__ import annotations

import pytest

from nexus.auth import hash_key
from nexus.config import ConfigError, parse_config

HASH = hash_key("nx_test")
BASE = 'listen: ["127.0.0.1:0"]\nupstreams: {a: {targets: ["http://127.0.0.1:9"]}}\n'


def with_route(route: str, extra: str = "") -> str:
    return f"{BASE}{extra}routes: [{{name: r, upstream: a, {route}}}]\n"


def with_consumer(consumer: str, extra: str = "") -> str:
    return f"{BASE}{extra}consumers: {{acme: {{{consumer}}}}}\n"


CASES = [
    pytest.param(with_route("rate_limit: {dry_run: true}"), "routes[0].rate_limit: set rate (such as 100/s), "
                 "quota (such as 300/min), or both", id="limit-without-rate-or-quota"),
    pytest.param(with_route("rate_limit: {quota: 5/min, burst: 3}"), "routes[0].rate_limit.burst: a burst applies "
                 "to a rate: add rate (such as 100/s) or remove burst", id="burst-without-rate"),
    pytest.param(with_route("rate_limit: {rate: 2000000/s}"), "routes[0].rate_limit.rate: 2000000/s is above the "
                 "largest rate, 1000000/s", id="rate-too-high"),
    pytest.param(with_route("rate_limit: {rate: 0.0000001/s}"), "routes[0].rate_limit.rate: 0.0000001/s is below "
                 "the smallest rate, one request per 1048576 s (about 12 days): use a quota for long windows, such "
                 "as 10/day", id="rate-too-low"),
    pytest.param(with_route("rate_limit: {burst: 5}"), "routes[0].rate_limit.burst: a burst applies to a rate: "
                 "add rate (such as 100/s) or remove burst", id="burst-alone"),
    pytest.param(with_route("rate_limit: {rate: 5/sec}"), 'routes[0].rate_limit.rate: invalid rate "5/sec": '
                 'unknown period "sec": use one of s, min, h, day', id="rate-period-alias"),
    pytest.param(f"{BASE}shared_memory: {{rate_limit_keys: 0}}\n", "shared_memory.rate_limit_keys: invalid value 0: "
                 "expected an integer from 1 to 67108864", id="bounds-written-in-full"),
    pytest.param(with_route("rate_limit: {quota: 5000000000/day}"), "routes[0].rate_limit.quota: 5000000000 "
                 "requests is above the largest quota, 4294967295", id="quota-too-large"),
    pytest.param(with_route("rate_limit: {rate: 100/week}"), 'routes[0].rate_limit.rate: invalid rate "100/week": '
                 'unknown period "week": use one of s, min, h, day', id="rate-unknown-period"),
    pytest.param(with_route("rate_limit: {quota: 1.5/min}"), 'routes[0].rate_limit.quota: invalid quota "1.5/min": '
                 "the count must be a whole number of at least 1", id="quota-fraction"),
    pytest.param(with_route("rate_limit: {rate: 5/month}"), 'routes[0].rate_limit.rate: invalid rate "5/month": '
                 'unknown period "month": use one of s, min, h, day', id="rate-per-month"),
    pytest.param(with_route("policies: [{name: p, rate: 1/s, burst: 2, cost: 3}]"), "routes[0].policies[0].cost: "
                 "a cost of 3 is above the burst of 2, so no request could ever pass: raise burst to at least 3",
                 id="cost-above-burst"),
    pytest.param(with_route("policies: [{name: p, quota: 2/min, cost: 3}]"), "routes[0].policies[0].cost: a cost "
                 "of 3 is above the quota of 2, so no request could ever pass: lower cost or raise the quota",
                 id="cost-above-quota"),
    pytest.param(with_route("policies: [{name: p, rate: 1/s}, {name: p, quota: 1/s}]"),
                 'routes[0].policies[1].name: duplicate policy name "p" (also policies[0])', id="duplicate-policy"),
    pytest.param(with_route("policies: [{name: p, key: [user], rate: 1/s}]"), 'routes[0].policies[0].key[0]: '
                 'invalid key part "user": use route, consumer, client_ip or header:<name>, such as '
                 '"header:x-tenant"', id="bad-key-part"),
    pytest.param(with_route("policies: [{name: p, key: [], rate: 1/s}]"), 'routes[0].policies[0].key: at least '
                 'one part is required, such as ["consumer"]', id="empty-key"),
    pytest.param(with_route("policies: [{name: p, key: [consumer, consumer], rate: 1/s}]"),
                 "routes[0].policies[0].key: a key part appears twice: list each part once", id="repeated-key-part"),
    pytest.param(with_route("auth: api_key"), 'routes[0].auth: "api_key" needs consumers with API keys under '
                 "consumers, and none are defined", id="auth-without-consumers"),
    pytest.param(with_consumer("keys: [nx_rawsecretkey]"), 'consumers.acme.keys[0]: invalid API key hash '
                 '"nx_r...": expected "sha256:" and 64 lowercase hex digits, as `nexusctl key hash` prints; never '
                 "put the key itself in the config", id="raw-key-not-echoed"),
    pytest.param(with_consumer("keys: []"), "consumers.acme.keys: at least one API key hash is required; "
                 "`nexusctl key new` makes one", id="no-keys"),
    pytest.param(with_consumer(f'keys: ["{HASH}"], tier: gold'), 'consumers.acme.tier: unknown tier "gold" '
                 "(defined: critical, pro, free)", id="unknown-tier"),
    pytest.param(f'{BASE}consumers: {{a: {{keys: ["{HASH}"]}}, b: {{keys: ["{HASH}"]}}}}\n',
                 'consumers.b.keys[0]: this key hash also belongs to consumer "a"', id="shared-key-hash"),
    pytest.param(f"{BASE}api_keys: {{header: null}}\n", 'api_keys: set header (such as "x-api-key"), query '
                 '(such as "api_key"), or both', id="no-key-source"),
    pytest.param(f'{BASE}api_keys: {{query: "api key"}}\n', 'api_keys.query: invalid query parameter name '
                 '"api key": use only letters, digits, "-", ".", "_" and "~", such as "api_key"',
                 id="bad-query-name"),
    pytest.param(f"{BASE}tiers: {{gold: {{priority: 0}}}}\n", "tiers.gold.priority: invalid value 0: expected "
                 "an integer from 1 to 100", id="tier-priority-zero"),
    pytest.param('listen: ["127.0.0.1:0"]\nupstreams: {a: {targets: ["http://127.0.0.1:9"], '
                 "concurrency: {initial_limit: 2000}}}\n", "upstreams.a.concurrency.initial_limit: 2000 is "
                 "outside min_limit..max_limit (4..1000)", id="initial-limit-outside"),
    pytest.param('listen: ["127.0.0.1:0"]\nupstreams: {a: {targets: ["http://127.0.0.1:9"], '
                 "concurrency: {critical_reserve: 100%}}}\n", "upstreams.a.concurrency.critical_reserve: 100% "
                 "would leave nothing for other tiers: use less, such as 20%", id="reserve-everything"),
    pytest.param(f"{BASE}shared_memory: {{cache_size: 1KiB}}\n", "shared_memory.cache_size: 1024 bytes cannot "
                 "hold one object of cache_max_object (1048576 bytes): raise cache_size or lower cache_max_object",
                 id="cache-smaller-than-object"),
]


@pytest.mark.parametrize(("text", "message"), CASES)
def test_access_config_error(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert str(caught.value) == message


def test_full_access_config_is_accepted() -> None:
    config = parse_config(
        f"{BASE}"
        "api_keys: {header: x-key, query: key}\n"
        "tiers: {gold: {priority: 5, rate_limit: {rate: 10/s, burst: 5, quota: 1000/month}}}\n"
        f'consumers: {{acme: {{keys: ["{HASH}"], tier: gold}}}}\n'
        "routes:\n"
        "  - name: r\n"
        "    upstream: a\n"
        "    auth: optional\n"
        "    policies:\n"
        '      - {name: p, key: [consumer, "header:x-tenant", client_ip, route], rate: 5/s, burst: 4, cost: 2}\n'
    )

    assert config.consumers["acme"].tier == "gold"
    assert config.tiers["gold"].rate_limit.quota.calendar_month is True
    assert config.routes[0].policies[0].cost == 2


REDIS_CASES = [
    pytest.param('{url: "redis://127.0.0.1:99999/0"}', 'redis.url: invalid Redis URL "redis://127.0.0.1:99999/0": '
                 "the port must be from 1 to 65535", id="port-out-of-range"),
    pytest.param('{url: ""}', 'redis.url: invalid Redis URL "": expected redis://host:port/db or '
                 'rediss://host:port/db, such as "redis://127.0.0.1:6379/0"', id="empty-url"),
    pytest.param('{url: "redis://127.0.0.1:6379/abc"}', 'redis.url: invalid Redis URL "redis://127.0.0.1:6379/abc": '
                 'the database must be a number: expected redis://host:port/db or rediss://host:port/db, such as '
                 '"redis://127.0.0.1:6379/0"', id="database-not-a-number"),
    pytest.param('{cluster: ["redis://127.0.0.1:7000/2"]}', 'redis.cluster[0]: Redis Cluster has only database 0: '
                 'remove "/2" from the URL', id="cluster-database"),
    pytest.param('{url: "redis://127.0.0.1:6379/0", cluster: ["redis://127.0.0.1:7000"]}', 'redis: set url (one '
                 'server, such as "redis://127.0.0.1:6379/0") or cluster (a list of seed nodes), not both and not '
                 "neither", id="url-and-cluster"),
]


@pytest.mark.parametrize(("redis", "message"), REDIS_CASES)
def test_redis_config_error(redis: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f"{BASE}redis: {redis}\n")
    assert str(caught.value) == message


def test_raw_key_with_hash_prefix_is_not_echoed() -> None:
    raw = "nx_BxUCK0oUbGyU_PUiH50xBBjmjgcSeHWhHwPGo"
    with pytest.raises(ConfigError) as caught:
        parse_config(with_consumer(f'keys: ["sha256:{raw}"]'))
    assert raw not in str(caught.value)
    assert '"sha256:nx_B..."' in str(caught.value)
