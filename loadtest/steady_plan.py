"""A steady load as a plan of one stage, for the steady mixed and the cache-heavy Zipf workloads.

It has the interface of `SpikePlan` (stages, stage_at, total_seconds,
describe), so the same locust shape runs either. Environment variables:

    LOADTEST_CAPACITY           the upstream's capacity, requests/s (default 100)
    LOADTEST_RATE_RPS           the rate, requests/s (default: capacity / 2 for
                                `steady`, 2 x capacity for `zipf`, whose cache
                                serves most requests without the upstream)
    LOADTEST_DURATION_SECONDS   length of the run (default 60)

The same bounds as the spike apply: at most MAX_TOTAL_SECONDS and MAX_RATE.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from loadtest.spike_plan import DEFAULT_CAPACITY, MAX_RATE, MAX_TOTAL_SECONDS, PlanError, Stage, _number

DEFAULT_DURATION_SECONDS = 60.0
# Default rate as a multiple of the upstream's capacity, by workload.
DEFAULT_LOAD = {"steady": 0.5, "zipf": 2.0}


@dataclass(frozen=True)
class SteadyPlan:
    workload: str
    capacity: float
    rate: float
    duration_seconds: float

    def __post_init__(self) -> None:
        if not self.rate > 0 or not self.duration_seconds > 0:
            raise PlanError(f"rate and duration must be greater than 0, got {self.rate:g}/s for {self.duration_seconds:g} s")
        if self.duration_seconds > MAX_TOTAL_SECONDS:
            raise PlanError(f"the run would take {self.duration_seconds:g} s; at most {MAX_TOTAL_SECONDS:g} s is allowed")
        if self.rate > MAX_RATE:
            raise PlanError(f"the rate would be {self.rate:g} requests/s; at most {MAX_RATE:g} is allowed")

    @property
    def total_seconds(self) -> float:
        return self.duration_seconds

    @property
    def stages(self) -> tuple[Stage, ...]:
        return (Stage(self.workload, 0.0, self.duration_seconds, self.rate),)

    def stage_at(self, elapsed: float) -> Stage | None:
        return self.stages[0] if 0 <= elapsed < self.duration_seconds else None

    def describe(self) -> str:
        return f"{self.workload} {self.rate:g}/s for {self.duration_seconds:g} s"

    @classmethod
    def from_env(cls, workload: str, environ: Mapping[str, str] | None = None, capacity: float | None = None) -> SteadyPlan:
        environ = os.environ if environ is None else environ
        if workload not in DEFAULT_LOAD:
            raise PlanError(f"unknown workload {workload!r}: expected one of {', '.join(DEFAULT_LOAD)}")
        if capacity is None:
            capacity = _number(environ, "LOADTEST_CAPACITY", DEFAULT_CAPACITY)
        try:
            return cls(
                workload=workload,
                capacity=capacity,
                rate=_number(environ, "LOADTEST_RATE_RPS", capacity * DEFAULT_LOAD[workload]),
                duration_seconds=_number(environ, "LOADTEST_DURATION_SECONDS", DEFAULT_DURATION_SECONDS),
            )
        except PlanError as error:
            raise PlanError(f"invalid LOADTEST_* settings: {error}") from None
