"""API keys, consumers, tiers and per-key policies through a real gateway."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from email.message import Message

import pytest

from nexus.auth import hash_key

pytestmark = pytest.mark.e2e

ACME_KEY = "nx_acme_test_key_0123456789abcdef"
GLOBEX_KEY = "nx_globex_test_key_0123456789abcdef"


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Message, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def _config(upstream_url: str, routes: str, extra: str = "") -> str:
    return f"""
listen: ["127.0.0.1:0"]
workers: 2
upstreams:
  app: {{targets: ["{upstream_url}"]}}
consumers:
  acme: {{keys: ["{hash_key(ACME_KEY)}"], tier: pro}}
  globex: {{keys: ["{hash_key(GLOBEX_KEY)}"], tier: free}}
{extra}
routes:
{routes}
"""


@pytest.fixture
def gateway(upstream_factory, gateway_factory):
    upstream = upstream_factory("a")
    return gateway_factory(
        _config(
            upstream.url,
            "  - {name: private, upstream: app, match: {path_prefix: /private}, auth: api_key}\n"
            "  - {name: mixed, upstream: app, match: {path_prefix: /mixed}, auth: optional}\n"
            "  - {name: public, upstream: app}",
            extra="api_keys: {header: x-api-key, query: api_key}",
        )
    )


def test_missing_key_gets_401_with_challenge(gateway):
    status, headers, body = _get(gateway.url + "/private/echo")

    assert status == 401
    assert headers["WWW-Authenticate"] == 'ApiKey header="x-api-key", query="api_key"'
    assert headers["Content-Type"] == "application/problem+json"
    problem = json.loads(body)
    assert problem["type"] == "urn:nexus:problem:unauthorized"
    assert problem["detail"] == "missing API key: send it in the x-api-key header field or the api_key query parameter"


def test_unknown_keys_get_one_message(gateway):
    first = _get(gateway.url + "/private/echo", {"x-api-key": "nx_wrong"})
    second = _get(gateway.url + "/private/echo", {"x-api-key": ACME_KEY + "x"})

    assert first[0] == second[0] == 401
    assert json.loads(first[2])["detail"] == json.loads(second[2])["detail"] == "invalid API key"


def test_valid_key_reaches_upstream_as_consumer_without_credential(gateway):
    status, _, body = _get(gateway.url + "/private/echo", {"x-api-key": ACME_KEY, "x-consumer": "forged"})

    assert status == 200
    seen = {name.lower(): value for name, value in json.loads(body)["headers"]}
    assert seen["x-consumer"] == "acme"
    assert "x-api-key" not in seen


def test_key_in_query_is_accepted_and_removed(gateway):
    status, _, body = _get(gateway.url + f"/private/echo?a=1&api_key={GLOBEX_KEY}&b=2")

    assert status == 200
    echoed = json.loads(body)
    assert echoed["query"] == "a=1&b=2"
    seen = {name.lower(): value for name, value in echoed["headers"]}
    assert seen["x-consumer"] == "globex"


def test_optional_auth_serves_anonymous_but_rejects_wrong_key(gateway):
    anonymous = _get(gateway.url + "/mixed/echo")
    wrong = _get(gateway.url + "/mixed/echo", {"x-api-key": "nx_wrong"})
    known = _get(gateway.url + "/mixed/echo", {"x-api-key": ACME_KEY})

    assert anonymous[0] == 200
    assert "x-consumer" not in {name.lower() for name, _ in json.loads(anonymous[2])["headers"]}
    assert wrong[0] == 401
    assert known[0] == 200


def test_public_route_forwards_headers_untouched(gateway):
    status, _, body = _get(gateway.url + "/echo", {"x-api-key": "anything"})

    assert status == 200
    seen = {name.lower(): value for name, value in json.loads(body)["headers"]}
    assert seen["x-api-key"] == "anything"


def test_tier_limit_applies_per_consumer(upstream_factory, gateway_factory):
    upstream = upstream_factory("a")
    gateway = gateway_factory(
        _config(
            upstream.url,
            "  - {name: api, upstream: app, auth: api_key}",
            extra="tiers:\n  pro: {priority: 2}\n  free: {priority: 1, rate_limit: {rate: 1/min, burst: 2}}",
        )
    )

    globex = [_get(gateway.url + "/echo", {"x-api-key": GLOBEX_KEY}) for _ in range(3)]
    acme = [_get(gateway.url + "/echo", {"x-api-key": ACME_KEY}) for _ in range(3)]

    assert [status for status, _, _ in globex] == [200, 200, 429]
    assert globex[0][1]["RateLimit-Policy"] == '"consumer.rate";q=2;w=120'
    assert json.loads(globex[2][2])["policy"] == "consumer.rate"
    # The pro tier has no limit, so acme is not limited and gets no fields.
    assert [status for status, _, _ in acme] == [200, 200, 200]
    assert "RateLimit" not in acme[0][1]


def test_policy_counts_per_consumer_and_per_ip_for_anonymous(upstream_factory, gateway_factory):
    upstream = upstream_factory("a")
    gateway = gateway_factory(
        _config(
            upstream.url,
            "  - name: api\n"
            "    upstream: app\n"
            "    auth: optional\n"
            "    policies: [{name: per-client, key: [consumer], rate: 1/min, burst: 2}]",
        )
    )

    acme = [_get(gateway.url + "/echo", {"x-api-key": ACME_KEY})[0] for _ in range(3)]
    globex = [_get(gateway.url + "/echo", {"x-api-key": GLOBEX_KEY})[0] for _ in range(3)]
    anonymous = [_get(gateway.url + "/echo")[0] for _ in range(3)]

    assert acme == [200, 200, 429]
    assert globex == [200, 200, 429]
    assert anonymous == [200, 200, 429]


def test_policy_by_header_value_with_cost(upstream_factory, gateway_factory):
    upstream = upstream_factory("a")
    gateway = gateway_factory(
        _config(
            upstream.url,
            "  - name: api\n"
            "    upstream: app\n"
            '    policies: [{name: per-tenant, key: ["header:x-tenant"], quota: 10/day, cost: 4}]',
        )
    )

    red = [_get(gateway.url + "/echo", {"x-tenant": "red"}) for _ in range(3)]
    blue = _get(gateway.url + "/echo", {"x-tenant": "blue"})

    # A cost of 4 against 10 per day: two requests fit, the third does not.
    assert [status for status, _, _ in red] == [200, 200, 429]
    assert red[0][1]["RateLimit"].startswith('"per-tenant.quota";r=6;')
    assert red[1][1]["RateLimit"].startswith('"per-tenant.quota";r=2;')
    assert blue[0] == 200
