"""The 10x traffic spike as a plan of stages, without locust.

A run is three stages: a baseline at about half the upstream's capacity, a
step to ten times the baseline for a fixed time, and the baseline again.
loadtest/shapes.py turns the plan into locust users; benchmarks/spike.py
sends it with an open-loop client. Both read it from the same environment
variables:

    LOADTEST_CAPACITY           the upstream's capacity, requests/s (default 100)
    LOADTEST_BASELINE_RPS       baseline rate, requests/s (default capacity / 2)
    LOADTEST_SPIKE_FACTOR       spike rate / baseline rate (default 10)
    LOADTEST_BASELINE_SECONDS   length of the first stage (default 15)
    LOADTEST_SPIKE_SECONDS      length of the spike (default 20)
    LOADTEST_RECOVERY_SECONDS   length of the last stage (default 15)

The defaults make a run of 50 s. A plan longer than MAX_TOTAL_SECONDS or
faster than MAX_RATE is rejected, so a typo cannot start an unbounded load.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

MAX_TOTAL_SECONDS = 600.0
MAX_RATE = 20_000.0

DEFAULT_CAPACITY = 100.0
DEFAULT_SPIKE_FACTOR = 10.0
DEFAULT_BASELINE_SECONDS = 15.0
DEFAULT_SPIKE_SECONDS = 20.0
DEFAULT_RECOVERY_SECONDS = 15.0


class PlanError(ValueError):
    """An invalid spike setting, named with its environment variable."""


@dataclass(frozen=True)
class Stage:
    """One stage of the plan: from `start` to `end` seconds into the run, at `rate` requests/s."""

    name: str
    start: float
    end: float
    rate: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class SpikePlan:
    capacity: float
    baseline_rate: float
    spike_factor: float
    baseline_seconds: float
    spike_seconds: float
    recovery_seconds: float

    def __post_init__(self) -> None:
        for name in ("capacity", "baseline_rate", "spike_factor", "spike_seconds"):
            if not getattr(self, name) > 0:
                raise PlanError(f"{name} must be greater than 0, got {getattr(self, name)}")
        for name in ("baseline_seconds", "recovery_seconds"):
            if getattr(self, name) < 0:
                raise PlanError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.total_seconds > MAX_TOTAL_SECONDS:
            raise PlanError(f"the run would take {self.total_seconds:g} s; at most {MAX_TOTAL_SECONDS:g} s is allowed")
        if self.spike_rate > MAX_RATE:
            raise PlanError(f"the spike rate would be {self.spike_rate:g} requests/s; at most {MAX_RATE:g} is allowed")

    @property
    def spike_rate(self) -> float:
        return self.baseline_rate * self.spike_factor

    @property
    def total_seconds(self) -> float:
        return self.baseline_seconds + self.spike_seconds + self.recovery_seconds

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The stages in order; a stage of 0 s is left out."""
        spike_start = self.baseline_seconds
        spike_end = spike_start + self.spike_seconds
        stages = (
            Stage("baseline", 0.0, spike_start, self.baseline_rate),
            Stage("spike", spike_start, spike_end, self.spike_rate),
            Stage("recovery", spike_end, self.total_seconds, self.baseline_rate),
        )
        return tuple(stage for stage in stages if stage.seconds > 0)

    def stage_at(self, elapsed: float) -> Stage | None:
        """Return the stage `elapsed` seconds into the run, or None once the run is over."""
        for stage in self.stages:
            if stage.start <= elapsed < stage.end:
                return stage
        return None

    def describe(self) -> str:
        parts = [f"{stage.name} {stage.rate:g}/s for {stage.seconds:g} s" for stage in self.stages]
        return ", then ".join(parts)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, capacity: float | None = None) -> SpikePlan:
        """Build the plan from the LOADTEST_* variables; `capacity` overrides LOADTEST_CAPACITY."""
        environ = os.environ if environ is None else environ
        if capacity is None:
            capacity = _number(environ, "LOADTEST_CAPACITY", DEFAULT_CAPACITY)
        baseline_rate = _number(environ, "LOADTEST_BASELINE_RPS", capacity / 2)
        try:
            return cls(
                capacity=capacity,
                baseline_rate=baseline_rate,
                spike_factor=_number(environ, "LOADTEST_SPIKE_FACTOR", DEFAULT_SPIKE_FACTOR),
                baseline_seconds=_number(environ, "LOADTEST_BASELINE_SECONDS", DEFAULT_BASELINE_SECONDS),
                spike_seconds=_number(environ, "LOADTEST_SPIKE_SECONDS", DEFAULT_SPIKE_SECONDS),
                recovery_seconds=_number(environ, "LOADTEST_RECOVERY_SECONDS", DEFAULT_RECOVERY_SECONDS),
            )
        except PlanError as error:
            raise PlanError(f"invalid LOADTEST_* settings: {error}") from None


def users_for(rate: float, user_rate: float) -> int:
    """Return how many locust users, each sending `user_rate` requests/s, make `rate` requests/s."""
    return max(1, math.ceil(rate / user_rate - 1e-9))


def _number(environ: Mapping[str, str], name: str, default: float) -> float:
    text = environ.get(name)
    if text is None or text == "":
        return float(default)
    try:
        value = float(text)
    except ValueError:
        raise PlanError(f"{name} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise PlanError(f"{name} must be a finite number, got {text!r}")
    return value
