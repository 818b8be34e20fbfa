"""Locust users for realistic traffic through Nexus, and the shape of the chosen workload.

    locust -f loadtest/locustfile.py --headless --only-summary --host http://127.0.0.1:PORT

scripts/loadtest runs this against a gateway on loadtest/nexus.yaml in front
of loadtest/capacity_upstream.py. The users send the mix of
loadtest/traffic.py: anonymous clients and consumers of the free, pro and
critical tiers (their API key in `x-api-key`), GET-heavy, over the routes
of loadtest/nexus.yaml. Each user sends LOADTEST_USER_RPS requests per
second (default 1). LOADTEST_WORKLOAD picks the workload: `spike` (the
default: the mixed traffic with a 10x spike, `SpikeShape`), `steady` (the
mixed traffic at one rate, `SteadyShape`) or `zipf` (the cache-heavy mix
of `traffic.pick_zipf_request` at one rate). The shape sets how many users
run; only the chosen shape is a name of this module, for locust to find.

Responses other than 2xx count as locust failures, named by status, and
503s also by their problem type (`upstream_overloaded` is the concurrency
limit shedding). With LOADTEST_RESULTS_DIR set, the end of the run writes
`traffic.json` there. It contains status counts per kind of client and per
stage, latency percentiles of 2xx responses per stage, the problem types of
the 503s, the plan, the Unix time at which each stage began, and the
responses by their Cache-Status (RFC 9211) result.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

# locust imports this file by its path; the repository root makes `loadtest` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gevent
from locust import FastHttpUser, events, task

from loadtest import traffic
from loadtest import shapes
from loadtest.shapes import user_rate_from_env

WORKLOAD = shapes.workload_from_env()
# locust finds the shape class among this module's names: only the chosen one is here.
Shape = shapes.SpikeShape if WORKLOAD == "spike" else shapes.SteadyShape

__all__ = ["AnonymousUser", "CriticalUser", "FreeUser", "ProUser", "Shape"]

PROBLEM_PREFIX = "urn:nexus:problem:"


class TrafficRecord:
    """What this locust process saw, per kind of client and per stage of the shape.

    Status 0 is a connection error. Latencies are kept only for 2xx
    responses, in milliseconds, to show how long admitted requests took.
    locust's own percentiles mix in the fast 429s and 503s.
    """

    def __init__(self) -> None:
        self.by_client: defaultdict[str, Counter] = defaultdict(Counter)
        self.by_stage: defaultdict[str, Counter] = defaultdict(Counter)
        self.latencies_2xx: defaultdict[str, list[float]] = defaultdict(list)
        # Problem type of a 503 (the part after urn:nexus:problem:) -> responses.
        self.problems_503: Counter = Counter()
        # Responses by cache result: hit, stale, a fwd= reason, or none without Cache-Status.
        self.cache_status: Counter = Counter()

    def add(self, client: str, stage: str, status: int, milliseconds: float) -> None:
        self.by_client[client][status] += 1
        self.by_stage[stage][status] += 1
        if 200 <= status < 300:
            self.latencies_2xx[stage].append(milliseconds)

    def report(self) -> dict:
        return {
            "statuses_by_client": _counts_as_json(self.by_client),
            "statuses_by_stage": _counts_as_json(self.by_stage),
            "latency_2xx_ms_by_stage": {stage: latency_summary(values) for stage, values in self.latencies_2xx.items()},
            "problems_503": dict(self.problems_503),
            "cache_status": dict(self.cache_status),
        }


RECORD = TrafficRecord()


def latency_summary(milliseconds: list[float]) -> dict:
    ordered = sorted(milliseconds)
    if not ordered:
        return {"count": 0}

    def percentile(share: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))], 2)

    return {
        "count": len(ordered),
        "p50": percentile(0.5),
        "p90": percentile(0.9),
        "p99": percentile(0.99),
        "max": round(ordered[-1], 2),
    }


def _counts_as_json(counts: dict[str, Counter]) -> dict:
    return {name: {str(status): count for status, count in sorted(counter.items())} for name, counter in counts.items()}


def problem_type(body: bytes | None) -> str:
    """Return the short problem type of an RFC 9457 body, or "none" when there is none."""
    try:
        document = json.loads(body or b"")
    except ValueError:
        return "none"
    kind = document.get("type", "") if isinstance(document, dict) else ""
    return kind.removeprefix(PROBLEM_PREFIX) or "none"


class GatewayUser(FastHttpUser):
    """One client of the gateway, sending requests of `client_kind` at a fixed pace."""

    abstract = True
    client_kind = traffic.ANONYMOUS
    connection_timeout = 5.0
    network_timeout = 10.0
    interval = 1.0 / user_rate_from_env()

    def on_start(self) -> None:
        self.rng = random.Random()
        # locust starts the users of a step together. Without a random
        # start their requests stay in step and reach the gateway in one
        # burst per interval. locust's constant_throughput() cannot be used
        # for this: it counts time spent in on_start as task time and so
        # keeps the users in step.
        gevent.sleep(self.rng.uniform(0.0, self.interval))
        self.next_due = time.monotonic()

    def wait_time(self) -> float:
        """Return the seconds until the next request: one every `interval` seconds, on a fixed schedule.

        A response slower than the interval delays the schedule instead of
        being followed by a burst to catch up, so the user sends less.
        """
        now = time.monotonic()
        self.next_due = max(self.next_due + self.interval, now)
        return self.next_due - now

    @task
    def send_request(self) -> None:
        kind = self.client_kind
        if WORKLOAD == "zipf":
            planned = traffic.pick_zipf_request(kind, self.rng)
        else:
            planned = traffic.build_request(kind, traffic.pick_operation(kind, self.rng), self.rng)
        stage = current_stage(self.environment)
        started = time.perf_counter()
        with self.client.request(
            planned.method,
            planned.path,
            name=planned.name,
            headers=planned.headers,
            data=planned.body,
            catch_response=True,
        ) as response:
            # request() returns after the whole response was read.
            milliseconds = (time.perf_counter() - started) * 1000
            status = response.status_code or 0
            RECORD.add(kind, stage, status, milliseconds)
            RECORD.cache_status[cache_result(response.headers.get("cache-status"))] += 1
            if 200 <= status < 300:
                response.success()
            elif status == 503:
                kind_503 = problem_type(response.content)
                RECORD.problems_503[kind_503] += 1
                response.failure(f"HTTP 503 {kind_503}")
            elif status == 0:
                response.failure(f"connection error: {response.error!r}")
            else:
                response.failure(f"HTTP {status}")


def cache_result(value: str | None) -> str:
    """Return the cache result of a Cache-Status field (RFC 9211): hit, fwd=REASON, other, or none."""
    if not value:
        return "none"
    # The last member is the cache nearest the client: the gateway's.
    params = [param.strip() for param in value.split(",")[-1].split(";")[1:]]
    for param in params:
        if param == "hit":
            return "hit"
        if param.startswith("fwd="):
            return param
    return "other"


def current_stage(environment) -> str:
    """Return the name of the shape's current stage, or "run" without SpikeShape."""
    shape = environment.shape_class
    transitions = getattr(shape, "transitions", None)
    return transitions[-1][0] if transitions else "run"


class AnonymousUser(GatewayUser):
    weight = traffic.CLIENT_WEIGHTS[traffic.ANONYMOUS]
    client_kind = traffic.ANONYMOUS


class FreeUser(GatewayUser):
    weight = traffic.CLIENT_WEIGHTS["free"]
    client_kind = "free"


class ProUser(GatewayUser):
    weight = traffic.CLIENT_WEIGHTS["pro"]
    client_kind = "pro"


class CriticalUser(GatewayUser):
    weight = traffic.CLIENT_WEIGHTS["critical"]
    client_kind = "critical"


@events.test_stop.add_listener
def write_traffic_report(environment, **_kwargs) -> None:
    """Write traffic.json to LOADTEST_RESULTS_DIR, if set."""
    directory = os.environ.get("LOADTEST_RESULTS_DIR")
    if not directory:
        return
    shape = environment.shape_class
    report = RECORD.report()
    report["workload"] = WORKLOAD
    if isinstance(shape, shapes.SpikeShape):
        report["plan"] = dataclasses.asdict(shape.plan)
        report["user_rate"] = shape.user_rate
        report["transitions"] = [list(item) for item in shape.transitions]
    path = Path(directory) / "traffic.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
