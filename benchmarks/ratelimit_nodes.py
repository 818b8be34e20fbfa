"""Admitted / limit for a limit shared through Redis by 1 and 3 simulated nodes.

Each node is a forked process with its own shared tables and a real
`RedisSync` thread, as one gateway master has. Its main thread makes the
decisions a worker would, paced at its share of the offered load. Four
loads per node count, each over one 5 s run:

- quota 500 per 5 s window, offered 500 requests and 10x that, over 4.6 s
  starting 0.2 s into a window, so one window holds the run;
- rate 200/s with a burst of 20, offered at 200/s and at 2000/s for 5 s.

The ratio is admitted / min(offered, limit), where the limit of a rate run
is burst + rate x duration.

Load is split evenly over the nodes, and in the last column sent to one of
three nodes while the other two only sync. The target is 0.95-1.05. It uses the
Redis at 127.0.0.1:6379 (or --redis) with a unique key prefix and deletes
its keys at the end.

    .venv/bin/python benchmarks/ratelimit_nodes.py
    .venv/bin/python benchmarks/ratelimit_nodes.py --redis redis://127.0.0.1:6380/0

It prints the machine, the date and a markdown table, in about two minutes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from nexus.config import Redis as RedisConfig
from nexus.redis_sync import RedisSync
from nexus.shm.ratelimit import GcraTable, Outcome, QuotaTable, key_hash

WINDOW_S = 5
QUOTA = 500
RATE = 200
BURST = 20
RUN_S = {"quota": 4.6, "rate": 5.0}
SETTLE_S = 0.5  # nodes heartbeat for this long before the load starts


def run_node(config: RedisConfig, name: str, kind: str, offered_per_s: float, start_at: float, write_fd: int) -> None:
    """Body of one node process: sync in a thread, decide at a paced rate, report the admitted count."""
    gcra, quotas = GcraTable.create(64), QuotaTable.create(64)
    sync = RedisSync(config, gcra, quotas, name)
    sync.start()
    key = key_hash("benchmark", kind)
    interval_us = 1_000_000 // RATE
    admitted = 0
    time.sleep(max(0.0, start_at - time.time()))
    count = int(offered_per_s * RUN_S[kind])
    if count == 0:
        time.sleep(RUN_S[kind])
    for index in range(count):
        due = start_at + index / offered_per_s
        delay = due - time.time()
        if delay > 0:
            time.sleep(delay)
        if kind == "quota":
            decision = quotas.acquire(key, WINDOW_S * 1_000_000, QUOTA)
        else:
            decision = gcra.acquire(key, interval_us, BURST * interval_us)
        admitted += decision.outcome == Outcome.ALLOWED
    sync.stop()
    os.write(write_fd, f"{admitted}\n".encode())


def measure(redis_url: str, nodes: int, kind: str, factor: int, one_busy: bool = False) -> float:
    prefix = f"bench-{uuid.uuid4().hex[:10]}"
    config = RedisConfig(url=redis_url, key_prefix=prefix)
    limit = QUOTA if kind == "quota" else BURST + RATE * RUN_S[kind]
    limit_rate = QUOTA / RUN_S[kind] if kind == "quota" else RATE
    offered = factor * limit_rate / (1 if one_busy else nodes)
    # Start 0.2 s into a window, after the nodes settled.
    now = time.time()
    start_at = (int((now + SETTLE_S) // WINDOW_S) + 1) * WINDOW_S + 0.2
    read_fd, write_fd = os.pipe()
    pids = []
    for index in range(nodes):
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_fd)
                share = 0.0 if one_busy and index > 0 else offered
                run_node(config, f"bench-node-{index}", kind, share, start_at, write_fd)
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd) as results:
            admitted = sum(int(results.readline() or 0) for _ in pids)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
        client = redis.Redis.from_url(redis_url)
        for stored in client.scan_iter(f"{prefix}:*"):
            client.delete(stored)
        client.close()
    offered_total = int(offered * RUN_S[kind]) * (1 if one_busy else nodes)
    return admitted / min(offered_total, limit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis URL to sync through")
    options = parser.parse_args()

    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, redis: {options.redis}")
    print()
    print("| limit | load | 1 node | 3 nodes | 3 nodes, load on one |")
    print("|---|---|---|---|---|")
    for kind, label in (("quota", f"quota {QUOTA}/{WINDOW_S}s"), ("rate", f"rate {RATE}/s burst {BURST}")):
        for factor in (1, 10):
            ratios = [measure(options.redis, nodes, kind, factor) for nodes in (1, 3)]
            ratios.append(measure(options.redis, 3, kind, factor, one_busy=True))
            load = "at the limit" if factor == 1 else f"{factor}x burst"
            print(f"| {label} | {load} | {ratios[0]:.3f} | {ratios[1]:.3f} | {ratios[2]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
