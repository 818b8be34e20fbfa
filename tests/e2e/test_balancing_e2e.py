"""Load balancing over real upstream targets, counted by the `x-upstream` each response carries.

Most tests run one worker, so one balancer picks the target of every request and its
arithmetic is visible from outside. The last test runs two workers.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import wait_for
from proxy_support import count_by, send


def _config(targets: list[str], balance: str, workers: int = 1, extra: str = "") -> str:
    target_list = ", ".join(targets)
    return f"""
listen: ["127.0.0.1:0"]
workers: {workers}
upstreams:
  app:
    balance: {balance}
    targets: [{target_list}]
{extra}
routes:
  - {{name: all, upstream: app}}
"""


# A reply with an empty body: the test upstream sends it in one TCP segment,
# so no Nagle and delayed-ACK stall slows a reused upstream connection.
FAST_PATH = "/status/200"


def _target_name(url: str, path: str = FAST_PATH, headers=()) -> str | None:
    reply = send(url, path, headers=headers)
    assert reply.status == 200, f"{path}: {reply.status} {reply.body[:300]!r}"
    return reply.header("x-upstream")


def test_round_robin_follows_weights(upstream_factory, gateway_factory):
    light = upstream_factory("light")
    heavy = upstream_factory("heavy")
    gateway = gateway_factory(
        _config([f'{{url: "{light.url}", weight: 1}}', f'{{url: "{heavy.url}", weight: 3}}'], "round_robin"),
        workers=1,
    )

    counts = count_by(_target_name(gateway.url) for _ in range(200))

    assert set(counts) == {"light", "heavy"}
    # Weights 1 and 3 give 25% and 75%. Smooth round robin in one worker is
    # exact, and the tolerance leaves room for a retried or ejected request.
    assert 35 <= counts["light"] <= 65, counts
    assert 135 <= counts["heavy"] <= 165, counts


def test_round_robin_equal_weights_alternate(upstream_factory, gateway_factory):
    names = ["a", "b", "c"]
    upstreams = [upstream_factory(name) for name in names]
    gateway = gateway_factory(_config([f'"{u.url}"' for u in upstreams], "round_robin"), workers=1)

    order = [_target_name(gateway.url) for _ in range(30)]

    counts = count_by(order)
    assert counts == {"a": 10, "b": 10, "c": 10}
    # Each run of three requests visits every target once.
    for start in range(0, 30, 3):
        assert sorted(order[start : start + 3]) == names, order


def test_least_request_avoids_busy_targets(upstream_factory, gateway_factory):
    upstreams = [upstream_factory(name) for name in ("a", "b", "c")]
    gateway = gateway_factory(_config([f'"{u.url}"' for u in upstreams], "least_request"), workers=1)
    slow_answers: list[str | None] = []

    def slow_request() -> None:
        slow_answers.append(_target_name(gateway.url, "/slow?delay=2.5"))

    # Two slow requests in flight occupy two different targets.
    threads = [threading.Thread(target=slow_request) for _ in range(2)]
    threads[0].start()
    time.sleep(0.3)
    threads[1].start()
    time.sleep(0.3)
    started = time.monotonic()
    quick = [_target_name(gateway.url) for _ in range(20)]
    quick_took = time.monotonic() - started
    for thread in threads:
        thread.join(10)

    assert quick_took < 2.0, "the quick requests must finish while the slow ones are in flight"
    assert len(slow_answers) == 2
    assert slow_answers[0] != slow_answers[1], slow_answers
    assert len(set(quick)) == 1, quick
    assert quick[0] not in slow_answers, (quick[0], slow_answers)

    # With nothing in flight, ties rotate over all targets again.
    after = count_by(_target_name(gateway.url) for _ in range(30))
    assert set(after) == {"a", "b", "c"}, after


def test_maglev_same_key_same_target(upstream_factory, gateway_factory):
    upstreams = [upstream_factory(name) for name in ("a", "b", "c")]
    gateway = gateway_factory(
        _config([f'"{u.url}"' for u in upstreams], "maglev", extra="    hash_on: header:x-user-id"),
        workers=1,
    )

    chosen: dict[str, str | None] = {}
    for user in range(30):
        key = f"user-{user}"
        answers = {_target_name(gateway.url, headers=[("X-User-Id", key)]) for _ in range(5)}
        assert len(answers) == 1, (key, answers)
        chosen[key] = answers.pop()

    assert len(set(chosen.values())) > 1, chosen


def test_maglev_consistent_across_workers(upstream_factory, gateway_factory):
    upstreams = [upstream_factory(name) for name in ("a", "b", "c")]
    gateway = gateway_factory(
        _config([f'"{u.url}"' for u in upstreams], "maglev", workers=2, extra="    hash_on: header:x-user-id"),
        workers=2,
    )

    # Every request opens a new connection, so both workers take some of
    # them; each builds the same table from the target URLs.
    for user in range(10):
        key = f"user-{user}"
        answers = {_target_name(gateway.url, headers=[("X-User-Id", key)]) for _ in range(8)}
        assert len(answers) == 1, (key, answers)


def test_p2c_ewma_uses_only_healthy_targets(upstream_factory, gateway_factory, tmp_path):
    down_file = tmp_path / "down"
    down_file.write_text("")
    upstreams = [
        upstream_factory("a"),
        upstream_factory("b"),
        upstream_factory("down", unhealthy_file=str(down_file)),
    ]
    health = "    health: {path: /healthz, interval: 50ms, timeout: 50ms, unhealthy_after: 1, healthy_after: 1}"
    gateway = gateway_factory(_config([f'"{u.url}"' for u in upstreams], "p2c_ewma", extra=health), workers=1)
    wait_for(lambda: "nexus.health target down " in gateway.log(), 5, message="the target 'down' to be marked down")

    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda _: _target_name(gateway.url, "/slow?delay=0.01"), range(120)))

    counts = count_by(answers)
    assert "down" not in counts, counts
    assert counts.get("a", 0) >= 10, counts
    assert counts.get("b", 0) >= 10, counts


def test_p2c_ewma_spreads_concurrent_load(upstream_factory, gateway_factory):
    upstreams = [upstream_factory(name) for name in ("a", "b", "c")]
    gateway = gateway_factory(_config([f'"{u.url}"' for u in upstreams], "p2c_ewma"), workers=1)

    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda _: _target_name(gateway.url, "/slow?delay=0.02"), range(150)))

    counts = count_by(answers)
    assert set(counts) == {"a", "b", "c"}, counts
    assert max(counts.values()) <= 110, counts


def test_two_workers_reach_all_targets(upstream_factory, gateway_factory):
    upstreams = [upstream_factory(name) for name in ("a", "b", "c")]
    gateway = gateway_factory(_config([f'"{u.url}"' for u in upstreams], "round_robin", workers=2), workers=2)

    counts = count_by(_target_name(gateway.url) for _ in range(60))

    assert set(counts) == {"a", "b", "c"}, counts
    for name, count in counts.items():
        assert count >= 10, (name, counts)
