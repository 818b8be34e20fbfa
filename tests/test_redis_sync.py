"""Rate-limit sync across nodes against real Redis: leases, batches, fallback, cluster.

Each simulated node is a pair of real shared tables with its own
`RedisSync`, as one master has. Tests drive rounds with `run_round()`
between bursts of decisions, so every count is deterministic given Redis's
replies. Tests that kill Redis or count commands use a private redis-server
(`tests/redis_support.py`); the rest use the machine's Redis at
127.0.0.1:6379 with a unique key prefix and delete their keys afterwards.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid

import pytest
import redis

from nexus.config import Redis as RedisConfig
from nexus.redis_sync import SHARDS, RedisSync, read_status
from nexus.shm.ratelimit import GcraTable, Outcome, QuotaTable, SyncMode, key_hash
from tests.redis_support import redis_cluster, redis_server_factory  # noqa: F401 (fixtures)

MINUTE_US = 60_000_000


class Node:
    """One simulated gateway node: its shared tables and its master's sync."""

    def __init__(self, config: RedisConfig, name: str) -> None:
        self.gcra = GcraTable.create(256)
        self.quotas = QuotaTable.create(256)
        self.sync = RedisSync(config, self.gcra, self.quotas, name)

    def quota(self, key: int, limit: int, attempts: int, window_us: int = MINUTE_US) -> int:
        """Try `attempts` requests of cost 1 against the quota; return how many were admitted."""
        return sum(self.quotas.acquire(key, window_us, limit).outcome == Outcome.ALLOWED for _ in range(attempts))

    def rate(self, key: int, interval_us: int, limit_us: int, attempts: int) -> int:
        return sum(self.gcra.acquire(key, interval_us, limit_us).outcome == Outcome.ALLOWED for _ in range(attempts))


@pytest.fixture
def local_redis():
    """A config for the machine's Redis with a unique key prefix; its keys are deleted afterwards."""
    client = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=2)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"the machine's Redis at 127.0.0.1:6379 is not reachable: {exc}")
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield RedisConfig(url="redis://127.0.0.1:6379/0", key_prefix=prefix, sync_interval=0.05)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.close()


def run_rounds(nodes: list[Node]) -> None:
    for node in nodes:
        assert node.sync.run_round()


def start_nodes(config: RedisConfig, count: int) -> list[Node]:
    nodes = [Node(config, f"node-{index}") for index in range(count)]
    run_rounds(nodes)  # every heartbeat is in before anyone counts live nodes
    run_rounds(nodes)
    return nodes


def test_two_nodes_share_one_quota(local_redis):
    nodes = start_nodes(local_redis, 2)
    key = key_hash("route", "shared")
    admitted = 0

    for _ in range(30):
        for node in nodes:
            admitted += node.quota(key, 100, 20)
        run_rounds(nodes)

    assert admitted == 100
    assert all(node.quotas.sync() == (SyncMode.CONNECTED, 2) for node in nodes)


def test_ten_x_burst_stays_within_limit(local_redis):
    """Three nodes, each offered 10x its share per round, admit 95-100% of the limit."""
    nodes = start_nodes(local_redis, 3)
    key = key_hash("route", "burst")
    limit = 600
    admitted = 0

    for _ in range(40):
        for node in nodes:
            admitted += node.quota(key, limit, 10 * limit // (3 * 20))
        run_rounds(nodes)

    assert admitted <= limit
    assert admitted >= 0.95 * limit


def test_remote_count_applied_to_estimate(local_redis):
    """Node B's estimate includes what node A admitted, so B's header remaining drops."""
    node_a, node_b = start_nodes(local_redis, 2)
    key = key_hash("route", "remote")

    node_a.quota(key, 1000, 3)
    node_b.quota(key, 1000, 1)
    run_rounds([node_a, node_b])
    run_rounds([node_a, node_b])
    decision = node_b.quotas.acquire(key, MINUTE_US, 1000)

    assert decision.outcome == Outcome.ALLOWED
    # 1000 - (3 from A + 1 earlier from B + this one)
    assert decision.remaining == 995


def test_sudden_load_far_from_limit_admitted(local_redis):
    """A jump from 5 to 200 requests per round, far from a limit of 10000, is admitted in full."""
    nodes = start_nodes(local_redis, 2)
    key = key_hash("route", "jump")

    for _ in range(5):
        assert nodes[0].quota(key, 10_000, 5) == 5
        run_rounds(nodes)
    admitted = nodes[0].quota(key, 10_000, 200)

    assert admitted == 200


def test_rate_shared_by_three_nodes(local_redis):
    """Three nodes offered 5x a rate of 200/s (burst 20) admit 90-105% of the GCRA bound."""
    nodes = start_nodes(local_redis, 3)
    key = key_hash("route", "rate")
    interval_us, limit_us = 5_000, 100_000
    admitted = 0
    started = time.monotonic()

    while time.monotonic() - started < 2.0:
        for node in nodes:
            admitted += node.rate(key, interval_us, limit_us, 17)
        run_rounds(nodes)
        time.sleep(0.03)
    elapsed = time.monotonic() - started
    bound = 20 + 200 * elapsed

    assert admitted <= 1.05 * bound
    assert admitted >= 0.9 * bound


def test_one_script_call_per_shard(redis_server_factory):  # noqa: F811
    server = redis_server_factory()
    config = RedisConfig(url=server.url, key_prefix="calls")
    node = start_nodes(config, 1)[0]
    keys = [key_hash("policy", "calls", str(index)) for index in range(200)]
    shards = {key % SHARDS for key in keys}
    client = server.client()
    client.config_resetstat()

    for key in keys:
        node.quota(key, 1000, 2)
    assert node.sync.run_round()
    stats = client.info("commandstats")

    assert stats["cmdstat_evalsha"]["calls"] == len(shards) + 1  # one per shard, plus the heartbeat
    assert "cmdstat_hincrby" in stats  # run by the script, not by the client
    assert "cmdstat_get" not in stats
    assert read_status(node.quotas).script_calls == len(shards)
    assert read_status(node.quotas).keys_synced == len(keys)


def test_redis_down_falls_back_and_resumes(redis_server_factory, caplog):  # noqa: F811
    server = redis_server_factory()
    config = RedisConfig(url=server.url, key_prefix="down", timeout=0.2)
    nodes = start_nodes(config, 3)
    key = key_hash("route", "down")
    caplog.set_level(logging.INFO, logger="nexus.redis_sync")

    server.kill()
    started = time.monotonic()
    for _ in range(3):
        assert not nodes[0].sync.run_round()
    took = time.monotonic() - started
    admitted = nodes[0].quota(key, 300, 500)
    status = read_status(nodes[0].quotas)

    assert took < 3.0, "rounds against a dead Redis must fail within the timeout"
    assert status.mode is SyncMode.DISCONNECTED
    assert status.live_nodes == 3
    assert status.errors == 3
    assert admitted == 100, "a disconnected node admits limit / live nodes"
    failures = [record for record in caplog.records if "redis sync failed" in record.getMessage()]
    assert len(failures) == 1, "the failure is logged once, not per round"

    server.start()
    assert nodes[0].sync.run_round()
    assert read_status(nodes[0].quotas).mode is SyncMode.CONNECTED
    assert any("redis sync resumed" in record.getMessage() for record in caplog.records)


def test_disconnected_flag_splits_rate():
    """With the disconnected flag set and 4 live nodes, a table admits a quarter of the rate."""
    table = GcraTable.create(8)
    table.set_sync(SyncMode.DISCONNECTED, 4)
    key = key_hash("split")
    now_us = 10_000_000
    admitted = 0

    # 100/s with a burst of 8, for one second in 1 ms steps.
    for step in range(1000):
        admitted += table.acquire(key, 10_000, 80_000, 1, now_us + step * 1000).outcome == Outcome.ALLOWED

    assert 24 <= admitted <= 27  # 25/s plus a burst of 2


def test_allowance_never_overspent_by_forked_workers():
    """Four forked processes spend one leased allowance of 500; exactly 500 are admitted."""
    table = QuotaTable.create(64)
    table.set_sync(SyncMode.CONNECTED, 1)
    key = key_hash("contended")
    window_us = 3600 * 1_000_000
    assert table.acquire(key, window_us, 1_000_000).outcome == Outcome.ALLOWED  # spends the bootstrap share
    row = next(row for row in table.collect() if row[1] == key)
    window = (row[2] >> 32) & 0xFFFFF
    spent_bootstrap = 1_000_000 // 32 - 1
    assert table.grant(row[0], key, window, 0, 0, 500)

    read_fd, write_fd = os.pipe()
    pids = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            count = sum(table.acquire(key, window_us, 1_000_000).outcome == Outcome.ALLOWED for _ in range(50_000))
            os.write(write_fd, f"{count}\n".encode())
            os._exit(0)
        pids.append(pid)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd) as results:
            counts = [int(results.readline()) for _ in pids]
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)

    assert sum(counts) == spent_bootstrap + 500


def test_cluster_batches_without_crossslot(redis_cluster):  # noqa: F811
    config = RedisConfig(cluster=redis_cluster.urls, key_prefix="cluster", sync_interval=0.05)
    nodes = start_nodes(config, 2)
    keys = [key_hash("policy", "cluster", str(index)) for index in range(100)]
    admitted = {key: 0 for key in keys}

    for _ in range(20):
        for node in nodes:
            for key in keys:
                admitted[key] += node.quota(key, 10, 2)
        run_rounds(nodes)

    assert all(node.quotas.sync()[0] is SyncMode.CONNECTED for node in nodes)
    assert read_status(nodes[0].quotas).errors == 0
    assert max(admitted.values()) <= 10
    assert min(admitted.values()) >= 9
