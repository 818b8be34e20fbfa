"""Print the summary of a load test run from its results directory.

    python -m loadtest.summary RESULTS_DIR

It reads what scripts/loadtest leaves there: `locust_stats.csv` (locust's
`--csv` output), `traffic.json` (written by loadtest/locustfile.py) and
`upstream_stats.json` (the capacity upstream's counters at the end).
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

# Responses the gateway sends on purpose when it limits load: rate limits
# and the concurrency limit's shedding. Anything else that is not 2xx is an
# unexpected error.
DELIBERATE_503 = "upstream_overloaded"


@dataclass
class StageWindow:
    name: str
    start: float
    end: float


def read_locust_totals(results_dir: Path) -> dict[str, str] | None:
    """Return the "Aggregated" row of locust_stats.csv, or None if there is none."""
    path = results_dir / "locust_stats.csv"
    if not path.exists():
        return None
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            if row.get("Name") == "Aggregated":
                return row
    return None


def stage_windows(traffic: dict) -> list[StageWindow]:
    """Return each stage's Unix time window, from the transitions the shape recorded."""
    transitions = traffic.get("transitions") or []
    plan = traffic.get("plan") or {}
    windows = []
    for index, (name, start) in enumerate(transitions):
        if index + 1 < len(transitions):
            end = transitions[index + 1][1]
        else:
            # A spike plan has a length per stage; a steady plan has one stage.
            end = start + float(plan.get(f"{name}_seconds", plan.get("duration_seconds", 0.0)))
        windows.append(StageWindow(name, start, end))
    return windows


def upstream_completed_rate(upstream: dict, window: StageWindow) -> float | None:
    """Return the upstream's completed requests per second over the whole seconds inside `window`."""
    per_second = {int(second): count for second, count in upstream.get("completed_per_second", {}).items()}
    seconds = range(math.ceil(window.start), math.floor(window.end))
    if not seconds:
        return None
    return sum(per_second.get(second, 0) for second in seconds) / len(seconds)


def count_unexpected(statuses: dict[str, int], problems_503: dict[str, int]) -> int:
    """Return the responses that are neither 2xx, 429, nor a 503 of the concurrency limit."""
    unexpected = 0
    for status_text, count in statuses.items():
        status = int(status_text)
        if 200 <= status < 300 or status in (429, 503):
            continue
        unexpected += count
    unexpected += sum(count for kind, count in problems_503.items() if kind != DELIBERATE_503)
    return unexpected


def sum_statuses(groups: dict[str, dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for counts in groups.values():
        for status, count in counts.items():
            total[status] = total.get(status, 0) + count
    return dict(sorted(total.items(), key=lambda item: int(item[0])))


def _status_label(status: str) -> str:
    return "connection error" if status == "0" else status


def format_summary(results_dir: Path) -> tuple[str, int]:
    """Return the summary text and the number of unexpected error responses."""
    traffic = json.loads((results_dir / "traffic.json").read_text())
    upstream = json.loads((results_dir / "upstream_stats.json").read_text())
    locust_totals = read_locust_totals(results_dir)
    capacity = float(upstream["capacity_per_second"])
    lines = [f"Results: {results_dir}"]

    plan = traffic.get("plan")
    if plan and "rate" in plan:
        lines.append(
            f"Plan: {plan['workload']} {plan['rate']:g}/s for {plan['duration_seconds']:g} s "
            f"(locust users at {traffic['user_rate']:g} request/s each)"
        )
    elif plan:
        rate = plan["baseline_rate"]
        lines.append(
            f"Plan: baseline {rate:g}/s for {plan['baseline_seconds']:g} s, spike {rate * plan['spike_factor']:g}/s "
            f"for {plan['spike_seconds']:g} s, recovery {rate:g}/s for {plan['recovery_seconds']:g} s "
            f"(locust users at {traffic['user_rate']:g} request/s each)"
        )
    lines.append(
        f"Upstream capacity: {capacity:g} requests/s ({upstream['concurrency']} at once, "
        f"{upstream['service_ms']:g} ms each)"
    )
    lines.append("")

    statuses = sum_statuses(traffic["statuses_by_client"])
    problems = traffic.get("problems_503", {})
    total = sum(statuses.values())
    if locust_totals:
        lines.append(
            f"Requests: {int(locust_totals['Request Count']):,}, failed (not 2xx): {int(locust_totals['Failure Count']):,}"
        )
        lines.append(f"Latency of all responses (locust): p50 {locust_totals['50%']} ms, p99 {locust_totals['99%']} ms")
    else:
        lines.append(f"Requests: {total:,} (locust_stats.csv not found)")
    by_status = ", ".join(f"{_status_label(status)}: {count:,}" for status, count in statuses.items())
    lines.append(f"By status: {by_status}")
    if problems:
        lines.append("503 by problem type: " + ", ".join(f"{kind}: {count:,}" for kind, count in problems.items()))
    cache = traffic.get("cache_status") or {}
    if set(cache) - {"none"}:
        lines.append("By Cache-Status: " + ", ".join(f"{kind}: {count:,}" for kind, count in sorted(cache.items())))
    lines.append("")

    lines += [
        "Per stage, by the stage a request was sent in. 2xx/s is the goodput: successful responses",
        "per second of the stage. Upstream completed/s counts every response the upstream finished",
        "in the stage's whole seconds, also those whose client (the gateway) had already given up.",
    ]
    header = (
        f"{'stage':<10} {'sent':>7} {'2xx':>7} {'429':>6} {'503':>7} {'other':>6} {'2xx p50':>9} {'2xx p99':>9} "
        f"{'2xx/s':>8}  upstream completed/s"
    )
    lines.append(header)
    latencies = traffic.get("latency_2xx_ms_by_stage", {})
    for window in stage_windows(traffic) or [StageWindow(name, 0, 0) for name in traffic["statuses_by_stage"]]:
        counts = traffic["statuses_by_stage"].get(window.name, {})
        sent = sum(counts.values())
        ok = sum(count for status, count in counts.items() if 200 <= int(status) < 300)
        limited = counts.get("429", 0)
        shed = counts.get("503", 0)
        other = sent - ok - limited - shed
        latency = latencies.get(window.name, {})
        p50 = f"{latency['p50']:.0f} ms" if latency.get("count") else "-"
        p99 = f"{latency['p99']:.0f} ms" if latency.get("count") else "-"
        seconds = window.end - window.start
        goodput = f"{ok / seconds:.1f}" if seconds > 0 else "-"
        completed = upstream_completed_rate(upstream, window)
        completed_text = f"{completed:.1f} ({completed / capacity:.0%} of capacity)" if completed is not None else "-"
        lines.append(
            f"{window.name:<10} {sent:>7,} {ok:>7,} {limited:>6,} {shed:>7,} {other:>6,} {p50:>9} {p99:>9} "
            f"{goodput:>8}  {completed_text}"
        )
    lines.append("")
    lines.append(
        f"Upstream: {upstream['completed']:,} completed, {upstream['abandoned']:,} abandoned by the client, "
        f"at most {upstream['max_in_service']} in service and {upstream['max_queued']} queued at once"
    )

    unexpected = count_unexpected(statuses, problems)
    if unexpected:
        lines.append(f"Unexpected errors (not 2xx, 429 or 503 {DELIBERATE_503}): {unexpected:,}")
    else:
        lines.append(f"Unexpected errors: none (every response was 2xx, 429 or 503 {DELIBERATE_503})")
    return "\n".join(lines), unexpected


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m loadtest.summary RESULTS_DIR", file=sys.stderr)
        return 2
    text, _ = format_summary(Path(argv[1]))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
