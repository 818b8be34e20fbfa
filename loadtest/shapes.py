"""Locust load shapes for the gateway load tests.

`SpikeShape` runs the plan of loadtest/spike_plan.py: baseline, a 10x
spike, baseline again, as the LOADTEST_* variables set it. `SteadyShape`
runs the one-stage plan of loadtest/steady_plan.py for the `steady` and
`zipf` workloads (LOADTEST_WORKLOAD). Each locust user
of loadtest/locustfile.py sends LOADTEST_USER_RPS requests per second
(default 1). A user waits for its response before its next request, so
when responses take longer than 1 / LOADTEST_USER_RPS seconds, locust
offers less than the plan's rate. benchmarks/spike.py sends the same plan
open-loop, at the planned rate whatever the latency.
"""

from __future__ import annotations

import math
import os
import time

from locust import LoadTestShape

from loadtest.spike_plan import SpikePlan, users_for
from loadtest.steady_plan import SteadyPlan

DEFAULT_USER_RATE = 1.0


def user_rate_from_env() -> float:
    """Return LOADTEST_USER_RPS, the requests per second of one locust user."""
    text = os.environ.get("LOADTEST_USER_RPS") or str(DEFAULT_USER_RATE)
    try:
        rate = float(text)
    except ValueError:
        raise ValueError(f"LOADTEST_USER_RPS must be a number, got {text!r}") from None
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"LOADTEST_USER_RPS must be greater than 0, got {text!r}")
    return rate


def workload_from_env() -> str:
    """Return LOADTEST_WORKLOAD: spike (the default), steady or zipf."""
    workload = os.environ.get("LOADTEST_WORKLOAD") or "spike"
    if workload not in ("spike", "steady", "zipf"):
        raise ValueError(f"LOADTEST_WORKLOAD must be spike, steady or zipf, got {workload!r}")
    return workload


class SpikeShape(LoadTestShape):
    """Load shape of the spike plan: baseline, a step to 10x the baseline, baseline again, then stop."""

    def __init__(self) -> None:
        super().__init__()
        self.plan = self.make_plan()
        self.user_rate = user_rate_from_env()
        # (stage name, Unix time) of each stage as tick() first returned it,
        # so reports can find the spike in the upstream's per-second counts.
        self.transitions: list[tuple[str, float]] = []
        self._users = 0
        self._spawn_rate = 1.0

    def tick(self) -> tuple[int, float] | None:
        stage = self.plan.stage_at(self.get_run_time())
        if stage is None:
            return None
        users = users_for(stage.rate, self.user_rate)
        if not self.transitions or self.transitions[-1][0] != stage.name:
            self.transitions.append((stage.name, time.time()))
            # locust 2.x starts floor(spawn_rate) users at once, once per
            # second, so this starts or stops the whole step in one batch.
            # GatewayUser.on_start spreads the new users' requests over
            # their pacing interval.
            self._spawn_rate = float(max(1, abs(users - self._users)))
            self._users = users
        return users, self._spawn_rate

    def make_plan(self):
        return SpikePlan.from_env()


class SteadyShape(SpikeShape):
    """Load shape of one steady stage (the steady and zipf workloads), then stop."""

    def make_plan(self):
        return SteadyPlan.from_env(workload_from_env())
