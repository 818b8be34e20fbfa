"""Three real gateway masters sharing one private redis-server: a shared quota, Redis dying and returning."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from tests.conftest import wait_for
from tests.redis_support import redis_server_factory  # noqa: F401 (fixture)

pytestmark = pytest.mark.e2e

LIMIT = 300


def _config(upstream_url: str, redis_url: str) -> str:
    return f"""
listen: ["127.0.0.1:0"]
workers: 1
upstreams:
  app: {{targets: ["{upstream_url}"]}}
routes:
  - {{name: shared, upstream: app, rate_limit: {{quota: {LIMIT}/h}}}}
redis:
  url: "{redis_url}"
  sync_interval: 100ms
  timeout: 250ms
"""


async def _hammer(port: int, connections: int, seconds: float) -> Counter:
    """Send GETs on `connections` keep-alive connections for `seconds`; count the statuses."""
    deadline = time.monotonic() + seconds
    statuses: Counter = Counter()
    request = b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

    async def one_connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < deadline:
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
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


def _hammer_all(ports: list[int], connections: int, seconds: float) -> list[Counter]:
    async def run() -> list[Counter]:
        return list(await asyncio.gather(*(_hammer(port, connections, seconds) for port in ports)))

    return asyncio.run(run())


def _wait_for_window_room() -> None:
    """Sleep past the end of the hour if fewer than 30 s of it are left, so one window holds the test."""
    left = 3600 - time.time() % 3600
    if left < 30:
        time.sleep(left + 0.5)


def _start_three(upstream_factory, gateway_factory, redis_url: str) -> tuple[list, list[int]]:
    upstream = upstream_factory("app")
    gateways = [gateway_factory(_config(upstream.url, redis_url), workers=1) for _ in range(3)]
    ports = [int(gateway.url.rsplit(":", 1)[1]) for gateway in gateways]
    wait_for(lambda: all("redis sync connected" in gateway.log() for gateway in gateways), 5, message="sync connected")
    time.sleep(0.5)  # a few rounds, so every master has seen all three heartbeats
    return gateways, ports


def test_three_nodes_hold_shared_quota(upstream_factory, gateway_factory, redis_server_factory):  # noqa: F811
    server = redis_server_factory()
    _wait_for_window_room()
    gateways, ports = _start_three(upstream_factory, gateway_factory, server.url)

    results = _hammer_all(ports, connections=4, seconds=4.0)
    admitted = sum(result[200] for result in results)
    statuses = set().union(*results)

    assert statuses == {200, 429}, results
    assert admitted <= 1.05 * LIMIT, results
    assert admitted >= 0.95 * LIMIT, results
    assert all(result[429] > 0 for result in results), "every node must have rejected once the quota ran out"
    for gateway in gateways:
        assert "redis sync failed" not in gateway.log()


def test_redis_killed_then_restarted(upstream_factory, gateway_factory, redis_server_factory):  # noqa: F811
    server = redis_server_factory()
    _wait_for_window_room()
    gateways, ports = _start_three(upstream_factory, gateway_factory, server.url)

    server.kill()
    wait_for(lambda: all("redis sync failed" in gateway.log() for gateway in gateways), 5, message="failure logged")
    results = _hammer_all(ports, connections=4, seconds=3.0)

    for result in results:
        assert set(result) == {200, 429}, results
        assert result[200] == LIMIT // 3, "a disconnected node admits limit / 3 live nodes"
    for gateway in gateways:
        assert gateway.process.poll() is None
        assert gateway.log().count("redis sync failed") == 1, "the failure is logged once"

    server.start()
    wait_for(lambda: all("redis sync resumed" in gateway.log() for gateway in gateways), 5, message="sync resumed")
    time.sleep(0.5)  # a few rounds report the usage of the outage to the fresh server
    after = _hammer_all(ports, connections=2, seconds=1.5)

    assert sum(result[200] for result in after) <= 0.05 * LIMIT, after
    assert all(set(result) <= {200, 429} for result in after), after
