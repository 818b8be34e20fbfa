"""Route-level rate limits through a real gateway: the bound, the header fields, the 429."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections import Counter
from email.message import Message

import pytest

pytestmark = pytest.mark.e2e


def _config(upstream_url: str, routes: str) -> str:
    return f"""
listen: ["127.0.0.1:0"]
workers: 2
upstreams:
  app: {{targets: ["{upstream_url}"]}}
routes:
{routes}
"""


def _get(url: str) -> tuple[int, Message, bytes]:
    """GET `url`; return the status, the header fields (names compared without case) and the body."""
    try:
        with urllib.request.urlopen(url) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


async def _hammer(port: int, path: str, connections: int, seconds: float) -> Counter:
    """Send requests on `connections` keep-alive connections until `seconds` pass; count statuses."""
    deadline = time.monotonic() + seconds
    statuses: Counter = Counter()
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()

    async def one_connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < deadline:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                statuses[status] += 1
        finally:
            writer.close()

    await asyncio.gather(*(one_connection() for _ in range(connections)))
    return statuses


def test_route_rate_holds_across_workers_under_64_connections(upstream_factory, gateway_factory):
    upstream = upstream_factory("a")
    gateway = gateway_factory(
        _config(upstream.url, "  - {name: limited, upstream: app, rate_limit: {rate: 100/s, burst: 10}}")
    )
    port = int(gateway.url.rsplit(":", 1)[1])

    # Stop sending 50 ms before the 5 s mark, so every admission happens
    # inside the 5 s window that the bound is computed for.
    statuses = asyncio.run(_hammer(port, "/echo", connections=64, seconds=4.95))

    bound = 10 + 100 * 5
    assert statuses[200] <= bound, statuses
    assert statuses[200] >= 0.95 * bound, statuses
    assert set(statuses) == {200, 429}, statuses
    assert statuses[429] > statuses[200], "64 connections must have been refused far more often than admitted"


def test_admitted_response_carries_ratelimit_fields(upstream_factory, gateway_factory):
    upstream = upstream_factory("a")
    gateway = gateway_factory(
        _config(upstream.url, "  - {name: limited, upstream: app, rate_limit: {rate: 1/min, burst: 3}}")
    )

    first = _get(gateway.url + "/echo")
    second = _get(gateway.url + "/echo")

    assert first[0] == 200 and second[0] == 200
    # A burst of 3 at 1/min is earned back in 180 s, so the policy reads 3 per 180 s.
    assert first[1]["RateLimit-Policy"] == '"limited.rate";q=3;w=180'
    assert first[1]["RateLimit"].startswith('"limited.rate";r=2;t=')
    assert second[1]["RateLimit"].startswith('"limited.rate";r=1;t=')


def test_refused_request_gets_429_problem_naming_the_policy(upstream_factory, gateway_factory):
    upstream = upstream_factory("a")
    gateway = gateway_factory(
        _config(upstream.url, "  - {name: limited, upstream: app, rate_limit: {rate: 1/min, burst: 2}}")
    )

    results = [_get(gateway.url + "/echo") for _ in range(3)]

    assert [status for status, _, _ in results] == [200, 200, 429]
    _, headers, body = results[2]
    assert headers["Content-Type"] == "application/problem+json"
    # One request per 60 s, so the next is allowed within 60 s; at least 1 s.
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert headers["RateLimit-Policy"] == '"limited.rate";q=2;w=120'
    assert headers["RateLimit"].startswith('"limited.rate";r=0;t=')
    problem = json.loads(body)
    assert problem["status"] == 429
    assert problem["type"] == "urn:nexus:problem:rate_limited"
    assert problem["policy"] == "limited.rate"
    assert "limited.rate" in problem["detail"]


def test_quota_refuses_past_its_count(upstream_factory, gateway_factory):
    upstream = upstream_factory("a")
    gateway = gateway_factory(_config(upstream.url, "  - {name: quota, upstream: app, rate_limit: {quota: 5/day}}"))

    results = [_get(gateway.url + "/echo") for _ in range(6)]

    assert [status for status, _, _ in results] == [200] * 5 + [429]
    assert results[0][1]["RateLimit-Policy"] == '"quota.quota";q=5;w=86400'
    assert results[4][1]["RateLimit"].startswith('"quota.quota";r=0;t=')
    assert json.loads(results[5][2])["policy"] == "quota.quota"


def test_dry_run_admits_everything_without_fields(upstream_factory, gateway_factory):
    upstream = upstream_factory("a")
    gateway = gateway_factory(
        _config(
            upstream.url,
            "  - {name: trial, upstream: app, rate_limit: {rate: 1/min, burst: 1, dry_run: true}}",
        )
    )

    results = [_get(gateway.url + "/echo") for _ in range(4)]

    assert [status for status, _, _ in results] == [200] * 4
    assert all("RateLimit" not in headers and "RateLimit-Policy" not in headers for _, headers, _ in results)


def test_unlimited_route_has_no_fields_and_limits_are_per_route(upstream_factory, gateway_factory):
    upstream = upstream_factory("a")
    gateway = gateway_factory(
        _config(
            upstream.url,
            "  - {name: limited, upstream: app, match: {path_prefix: /limited}, rate_limit: {rate: 1/min}}\n"
            "  - {name: open, upstream: app}",
        )
    )

    assert _get(gateway.url + "/limited")[0] == 200
    assert _get(gateway.url + "/limited")[0] == 429
    for _ in range(3):
        status, headers, _ = _get(gateway.url + "/other")
        assert status == 200
        assert "RateLimit" not in headers
