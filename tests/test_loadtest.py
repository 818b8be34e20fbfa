"""The load test suite in loadtest/: the capacity upstream over real sockets, the spike plan, the locust shape.

locust patches the standard library with gevent when it is imported, so
the tests that need locust import it in a child process and read its
results as JSON. scripts/test installs locust with the loadtest extra.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtest import processes, traffic
from loadtest.capacity_upstream import loopback_host
from loadtest.gateway_config import render_config
from loadtest.spike_plan import PlanError, SpikePlan
from nexus.auth import hash_key
from nexus.config import load_config


@pytest.fixture
def start_upstream(tmp_path):
    started: list[processes.Upstream] = []

    def start(concurrency: int, service_ms: float, queue_limit: int | None = None) -> processes.Upstream:
        log = tmp_path / f"upstream-{len(started)}.log"
        upstream = processes.start_upstream(concurrency, service_ms, log, queue_limit=queue_limit)
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        upstream.stop()


async def _get(port: int, path: str, started: float) -> tuple[int, float, dict[str, str]]:
    """Send one GET on a new connection; return the status, seconds since `started` and the headers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        await reader.readexactly(int(headers["content-length"]))
        return int(lines[0].split(" ")[1]), time.monotonic() - started, headers
    finally:
        writer.close()


async def _get_many(port: int, path: str, count: int) -> list[tuple[int, float, dict[str, str]]]:
    started = time.monotonic()
    return list(await asyncio.gather(*(_get(port, path, started) for _ in range(count))))


def test_capacity_upstream_serves_in_waves(start_upstream):
    upstream = start_upstream(concurrency=4, service_ms=100)
    assert upstream.capacity == 40

    async def saturate_and_probe():
        load = asyncio.ensure_future(_get_many(upstream.port, "/work", 12))
        await asyncio.sleep(0.03)
        health = await _get(upstream.port, "/healthz", time.monotonic())
        return await load, health

    responses, health = asyncio.run(saturate_and_probe())

    assert [status for status, _, _ in responses] == [200] * 12
    finished = sorted(seconds for _, seconds, _ in responses)
    # Four at a time for 100 ms each: the k-th wave cannot end before k x 100 ms.
    for index, seconds in enumerate(finished):
        wave = index // 4 + 1
        assert seconds >= wave * 0.1 - 0.01, f"response {index} after {seconds:.3f} s: {finished}"
    assert finished[-1] < 2.0, finished
    # The health path bypasses the queue of eight waiting requests.
    assert health[0] == 200
    assert health[1] < 0.08, f"health check took {health[1]:.3f} s"

    stats = upstream.stats()
    assert stats["completed"] == 12
    assert stats["max_in_service"] == 4
    assert stats["max_queued"] == 8
    assert stats["in_service"] == 0
    assert stats["queued"] == 0
    assert sum(stats["completed_per_second"].values()) == 12


def test_capacity_upstream_queue_limit_rejects(start_upstream):
    upstream = start_upstream(concurrency=1, service_ms=300, queue_limit=2)

    async def send_five():
        started = time.monotonic()
        tasks = []
        for _ in range(5):
            tasks.append(asyncio.ensure_future(_get(upstream.port, "/work", started)))
            # In order: the first is served, the next two wait, the last two are rejected.
            await asyncio.sleep(0.02)
        return await asyncio.gather(*tasks)

    responses = asyncio.run(send_five())

    statuses = [status for status, _, _ in responses]
    assert statuses == [200, 200, 200, 503, 503]
    for status, seconds, headers in responses[3:]:
        assert headers["retry-after"] == "1"
        assert seconds < 0.25, "a rejected request must not wait for a slot"
    stats = upstream.stats()
    assert stats["rejected"] == 2
    assert stats["completed"] == 3
    assert stats["max_queued"] == 2


def test_capacity_upstream_counts_abandoned(start_upstream):
    upstream = start_upstream(concurrency=1, service_ms=200)

    async def abandon_one():
        served = asyncio.ensure_future(_get(upstream.port, "/work", time.monotonic()))
        await asyncio.sleep(0.02)
        _, writer = await asyncio.open_connection("127.0.0.1", upstream.port)
        writer.write(b"GET /work HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()
        return await served

    status, _, _ = asyncio.run(abandon_one())
    time.sleep(0.4)

    assert status == 200
    stats = upstream.stats()
    assert stats["completed"] == 1
    assert stats["abandoned"] == 1


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_upstream_host_accepts_loopback(host):
    assert loopback_host(host) == host


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.1", "::", "example.com"])
def test_upstream_host_rejects_others(host):
    with pytest.raises(Exception, match="loopback|invalid IP address"):
        loopback_host(host)


def test_spike_plan_defaults():
    plan = SpikePlan.from_env({})

    assert [(stage.name, stage.start, stage.end, stage.rate) for stage in plan.stages] == [
        ("baseline", 0.0, 15.0, 50.0),
        ("spike", 15.0, 35.0, 500.0),
        ("recovery", 35.0, 50.0, 50.0),
    ]
    assert plan.total_seconds < 60
    assert plan.stage_at(0).name == "baseline"
    assert plan.stage_at(14.99).name == "baseline"
    assert plan.stage_at(15.0).name == "spike"
    assert plan.stage_at(49.99).name == "recovery"
    assert plan.stage_at(50.0) is None


def test_spike_plan_from_env():
    environ = {
        "LOADTEST_CAPACITY": "200",
        "LOADTEST_SPIKE_FACTOR": "5",
        "LOADTEST_BASELINE_SECONDS": "2",
        "LOADTEST_SPIKE_SECONDS": "3",
        "LOADTEST_RECOVERY_SECONDS": "0",
    }
    plan = SpikePlan.from_env(environ)

    assert [(stage.name, stage.rate, stage.seconds) for stage in plan.stages] == [
        ("baseline", 100.0, 2.0),
        ("spike", 500.0, 3.0),
    ]
    # The capacity an upstream reports wins over LOADTEST_CAPACITY.
    assert SpikePlan.from_env(environ, capacity=40).baseline_rate == 20


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("LOADTEST_SPIKE_SECONDS", "900", "at most 600 s"),
        ("LOADTEST_SPIKE_SECONDS", "0", "spike_seconds must be greater than 0"),
        ("LOADTEST_BASELINE_RPS", "5000", "at most 20000"),
        ("LOADTEST_SPIKE_FACTOR", "ten", "must be a number"),
        ("LOADTEST_RECOVERY_SECONDS", "-1", "recovery_seconds must be 0 or more"),
    ],
)
def test_spike_plan_rejects_invalid(variable, value, message):
    with pytest.raises(PlanError, match=message):
        SpikePlan.from_env({variable: value})


def test_gateway_config_valid(tmp_path):
    path = tmp_path / "nexus.yaml"
    path.write_text(render_config("http://127.0.0.1:9100", workers=1))
    config = load_config(str(path))

    upstream = config.upstreams["app"]
    assert upstream.concurrency is not None
    assert config.worker_count() == 1
    tiers_by_hash = {key_hash: consumer.tier for consumer in config.consumers.values() for key_hash in consumer.keys}
    for tier, key in traffic.API_KEYS.items():
        assert tiers_by_hash[hash_key(key)] == tier

    path.write_text(render_config("http://127.0.0.1:9100", concurrency=False))
    assert load_config(str(path)).upstreams["app"].concurrency is None


def test_traffic_mix_keys():
    rng = random.Random(7)
    requests = [traffic.pick_request(rng) for _ in range(2000)]

    anonymous = [request for request in requests if request.client == traffic.ANONYMOUS]
    assert anonymous
    assert all(traffic.KEY_HEADER not in request.headers for request in anonymous)
    assert all(not request.path.startswith(("/api/orders", "/api/reports")) for request in anonymous)
    keyed = [request for request in requests if request.client != traffic.ANONYMOUS]
    assert all(request.headers[traffic.KEY_HEADER] == traffic.API_KEYS[request.client] for request in keyed)
    reads = sum(request.method == "GET" for request in requests)
    assert reads / len(requests) > 0.85


# Runs in a child process: locust's own loader finds the user classes and
# the shape, and a subclass of the shape reads a fake clock.
_SHAPE_SCRIPT = """
import json, sys
from locust.util.load_locustfile import load_locustfile

users, shapes = load_locustfile(sys.argv[1])
shape_class = type(shapes[0])

class FakeClockShape(shape_class):
    now = 0.0

    def get_run_time(self):
        return self.now

shape = FakeClockShape()
ticks = []
for tenth in range(0, 520, 5):
    shape.now = tenth / 10
    ticks.append([shape.now, shape.tick()])
print(json.dumps({
    "users": {name: user.weight for name, user in users.items()},
    "shapes": [type(item).__name__ for item in shapes],
    "ticks": ticks,
    "transitions": [name for name, _ in shape.transitions],
}))
"""


def run_shape(**settings: str) -> dict:
    """Load loadtest/locustfile.py with locust's loader in a child, with only `settings` as LOADTEST_* variables."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("LOADTEST_")}
    environment.update(settings)
    completed = subprocess.run(
        [sys.executable, "-c", _SHAPE_SCRIPT, str(ROOT / "loadtest" / "locustfile.py")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run_loadtest(tmp_path: Path, arguments: list[str], settings: dict[str, str]) -> tuple[subprocess.CompletedProcess, Path]:
    """Run `python -m loadtest.run` with short LOADTEST_* `settings`; return the process and its results directory."""
    results = tmp_path / "results"
    completed = subprocess.run(
        [sys.executable, "-m", "loadtest.run", "--results-dir", str(results), "--concurrency", "5", *arguments],
        check=False,
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, **settings},
        cwd=ROOT,
    )
    assert completed.returncode in (0, 2), completed.stdout + completed.stderr
    return completed, results


def test_locust_shape_stage_sequence():
    result = run_shape()

    assert result["users"] == {"AnonymousUser": 35, "FreeUser": 35, "ProUser": 20, "CriticalUser": 10}
    assert result["shapes"] == ["SpikeShape"]
    assert result["transitions"] == ["baseline", "spike", "recovery"]
    for now, tick in result["ticks"]:
        if now < 15:
            expected = [50, 50.0]
        elif now < 35:
            expected = [500, 450.0]
        elif now < 50:
            expected = [50, 450.0]
        else:
            expected = None
        assert tick == expected, f"tick at {now} s"


@pytest.mark.slow
@pytest.mark.e2e
def test_loadtest_run_short_spike(tmp_path):
    settings = {"LOADTEST_BASELINE_SECONDS": "2", "LOADTEST_SPIKE_SECONDS": "3", "LOADTEST_RECOVERY_SECONDS": "2"}
    completed, results = run_loadtest(tmp_path, [], settings)
    for name in ("locust_stats.csv", "locust.html", "traffic.json", "upstream_stats.json", "nexus.log", "access.log"):
        assert (results / name).exists(), name
    report = json.loads((results / "traffic.json").read_text())
    assert [name for name, _ in report["transitions"]] == ["baseline", "spike", "recovery"]
    spike = report["statuses_by_stage"]["spike"]
    assert int(spike.get("200", 0)) > 0
    assert int(spike.get("503", 0)) > 0, "a 10x spike above capacity should be shed"
    assert "upstream completed/s" in completed.stdout


def test_zipf_mix_is_cache_heavy():
    rng = random.Random(11)
    requests = [traffic.pick_zipf_request(client, rng) for client in ("free", "anonymous") for _ in range(3000)]
    items = [int(request.path.rsplit("/", 1)[1]) for request in requests if request.path.startswith("/api/catalog/items/")]
    assert all(0 <= item < traffic.ITEM_IDS for item in items)
    # Zipf with exponent 1.1: the 100 most popular of 10,000 items take more than half the item reads.
    assert sum(item < 100 for item in items) / len(items) > 0.5
    cacheable = sum(request.method == "GET" and request.path.startswith("/api/catalog") for request in requests)
    assert cacheable / len(requests) > 0.85
    anonymous = requests[3000:]
    assert all(not request.path.startswith("/api/orders") for request in anonymous)


def test_capacity_upstream_marks_catalog_reads_cacheable(start_upstream):
    upstream = start_upstream(concurrency=2, service_ms=1)

    async def both():
        started = time.monotonic()
        return await _get(upstream.port, "/catalog/items/1", started), await _get(upstream.port, "/orders/1", started)

    (status, _, catalog), (_, _, orders) = asyncio.run(both())
    assert status == 200
    assert catalog["cache-control"] == "public, max-age=30"
    assert orders["cache-control"] == "no-store"


def test_gateway_config_caches_only_for_zipf(tmp_path):
    plain = yaml_routes(render_config("http://127.0.0.1:9100"))
    cached = yaml_routes(render_config("http://127.0.0.1:9100", cache=True))
    assert all("cache" not in route for route in plain)
    assert [route["name"] for route in cached if "cache" in route] == ["catalog"]
    path = tmp_path / "nexus.yaml"
    path.write_text(render_config("http://127.0.0.1:9100", cache=True, observability={"access_log": {"path": "-"}}))
    assert load_config(path).access_log.path == "-"


def yaml_routes(text: str) -> list[dict]:
    import yaml

    return yaml.safe_load(text)["routes"]


@pytest.mark.parametrize("workload", ["steady", "zipf"])
def test_locust_steady_shape(workload):
    result = run_shape(LOADTEST_WORKLOAD=workload, LOADTEST_DURATION_SECONDS="30", LOADTEST_RATE_RPS="40")
    assert result["shapes"] == ["SteadyShape"]
    assert result["transitions"] == [workload]
    for now, tick in result["ticks"]:
        assert tick == ([40, 40.0] if now < 30 else None), f"tick at {now} s"


@pytest.mark.slow
@pytest.mark.e2e
def test_loadtest_run_short_zipf(tmp_path):
    settings = {"LOADTEST_DURATION_SECONDS": "4", "LOADTEST_RATE_RPS": "60"}
    _completed, results = run_loadtest(tmp_path, ["--workload", "zipf"], settings)
    for name in ("locust_stats.csv", "locust.html", "traffic.json", "metrics.txt", "usage.json", "access.log"):
        assert (results / name).exists(), name
    report = json.loads((results / "traffic.json").read_text())
    assert report["workload"] == "zipf"
    assert report["cache_status"].get("hit", 0) > 0, "popular items should be answered from the cache"
    usage = json.loads((results / "usage.json").read_text())
    assert {row["name"] for row in usage["consumers"]} >= {"load-free", "load-pro", "load-critical", "(anonymous)"}
    assert "nexus_cache_requests_total" in (results / "metrics.txt").read_text()
