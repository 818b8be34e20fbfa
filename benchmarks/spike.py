"""Measure a 10x traffic spike through Nexus, with the upstream's adaptive concurrency limit on and off.

The upstream is loadtest/capacity_upstream.py, which serves at most
--concurrency requests at once for --service-ms each and queues the rest
(capacity = concurrency / service time; 100 requests/s by default). The
gateway runs loadtest/nexus.yaml in front of it, with its `concurrency`
section ("on") or without it ("off"). Each run starts a fresh upstream and
gateway and sends, with the open-loop client of loadtest/openloop.py and
the traffic mix of loadtest/traffic.py:

1. unloaded: 20% of capacity for --unloaded-seconds, for the reference
   latency (the same gateway, the limit far from reached);
2. the spike plan of loadtest/spike_plan.py, as scripts/loadtest sends it:
   baseline at half of capacity, 10x the baseline, baseline again (the
   LOADTEST_* variables and the options below set it).

Runs alternate between the modes (on, off, on, off, ...), so a slow spell
of the machine hits both, and the report gives the median of each mode's
runs. Measured for the requests sent during the spike:

- goodput: 2xx responses the client received during the spike, per
  second, against the upstream's capacity. The upstream's own count of
  completed responses is shown too. It can be higher, because the gateway
  does not cancel an upstream request when it responds 504, so the upstream
  still finishes requests whose response no client will receive.
- p50 and p99 latency of the admitted (2xx) requests, against the p99 of
  the unloaded phase. Latency counts from the time a request was due.
- every status, and the errors other than the deliberate ones. Deliberate
  are 429 (a rate limit) and 503 with problem type upstream_overloaded (the
  concurrency limit shedding). A request with no response within the drain
  time counts as an error.

The targets, for the runs with the limit on: goodput at least 90% of
capacity, p99 of admitted requests at most 3x the unloaded p99, and no
error other than the deliberate ones.

Run from the repository root (about 7 minutes with the defaults):

    .venv/bin/python benchmarks/spike.py --runs 3 --write docs/benchmarks.md

It prints the Markdown report. With --write it replaces the text between
`<!-- spike:start -->` and `<!-- spike:end -->` in that file, or appends a
`## Traffic spike with adaptive concurrency` section with those markers at
the end of the file when they are missing. The exit status is 0 when the
targets were met, 2 when they were not, 1 when the benchmark itself
failed and 130 when it was interrupted. Every process it starts is stopped
when it ends, also on Ctrl-C and SIGTERM, and dies with it if it is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import json
import os
import platform
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtest import openloop, processes, traffic
from loadtest.gateway_config import concurrency_settings, write_config
from loadtest.spike_plan import PlanError, SpikePlan, Stage

START_MARKER = "<!-- spike:start -->"
END_MARKER = "<!-- spike:end -->"
SECTION_TITLE = "## Traffic spike with adaptive concurrency"

UNLOADED_SHARE = 0.2
GOODPUT_TARGET = 0.9
P99_TARGET = 3.0
# Seconds to wait for the last responses after the last request was sent:
# the gateway's `timeouts.total` in loadtest/nexus.yaml (5 s) and a margin.
DRAIN_SECONDS = 7.0
MODES = ("on", "off")


class BenchmarkError(RuntimeError):
    pass


@dataclass
class RunResult:
    """The measurements of one run of one mode; latencies in seconds."""

    mode: str
    unloaded_p50: float
    unloaded_p99: float
    spike_sent: int
    goodput: float
    upstream_completed_rate: float
    admitted_p50: float
    admitted_p99: float
    # (status, problem type) -> responses, for the requests sent during the spike.
    spike_statuses: Counter
    # Errors other than 429 and 503 upstream_overloaded, in the whole run, unloaded phase included.
    unexpected: Counter
    # Client kind -> (2xx, sent) during the spike.
    by_client: dict[str, tuple[int, int]]
    upstream_max_queued: int
    dispatch_lag: float
    waited_for_connection: int
    retried_on_new_connection: int

    @property
    def p99_ratio(self) -> float:
        return self.admitted_p99 / self.unloaded_p99

    def count(self, status: int, problem: str | None = None) -> int:
        return sum(
            n
            for (code, kind), n in self.spike_statuses.items()
            if code == status and (problem is None or kind == problem)
        )


@dataclass
class Settings:
    concurrency: int
    service_ms: float
    workers: int
    plan: SpikePlan
    unloaded_seconds: float
    workdir: Path
    seed: int
    runs: int
    # Keys of the `concurrency` section that replace those of loadtest/nexus.yaml.
    limits: dict
    results: list[RunResult] = field(default_factory=list)

    @property
    def capacity(self) -> float:
        return self.concurrency / (self.service_ms / 1000)


def percentile(values: list[float], share: float) -> float:
    """Return the nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(share * len(ordered) + 0.5) - 1))]


def is_deliberate(status: int, problem: str | None) -> bool:
    return 200 <= status < 300 or status == 429 or (status == 503 and problem == "upstream_overloaded")


async def fetch_upstream_completed(upstream: processes.Upstream) -> int:
    """Read the upstream's completed count over a connection of its own."""
    reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
    try:
        writer.write(f"GET /_stats HTTP/1.1\r\nhost: {upstream.host}\r\nconnection: close\r\n\r\n".encode())
        status, _, body = await asyncio.wait_for(openloop.read_response(reader), 5)
    finally:
        writer.close()
    if status != 200:
        raise BenchmarkError(f"the upstream's stats path returned {status}")
    return int(json.loads(body)["completed"])


async def measure(
    settings: Settings, mode: str, gateway: processes.Gateway, upstream: processes.Upstream, seed: int
) -> RunResult:
    client = openloop.Client("127.0.0.1", gateway.port)
    rng = random.Random(seed)
    try:
        unloaded_stage = Stage("unloaded", 0.0, settings.unloaded_seconds, UNLOADED_SHARE * settings.capacity)
        unloaded = await openloop.send_stages(client, [unloaded_stage], rng, DRAIN_SECONDS)

        marks: dict[str, tuple[float, int]] = {}

        async def mark(name: str) -> None:
            marks[name] = (time.monotonic(), await fetch_upstream_completed(upstream))

        spike = await openloop.send_stages(client, settings.plan.stages, rng, DRAIN_SECONDS, on_stage_start=mark)
    finally:
        client.close()

    unloaded_latencies = [o.latency for o in unloaded.outcomes if 200 <= o.status < 300]
    spike_start, spike_end = spike.windows["spike"]
    spike_outcomes = [o for o in spike.outcomes if o.stage == "spike"]
    admitted = [o.latency for o in spike_outcomes if 200 <= o.status < 300]
    received_in_window = sum(1 for o in spike.outcomes if 200 <= o.status < 300 and spike_start <= o.done < spike_end)
    after_spike = "recovery" if "recovery" in marks else "end"
    (t0, completed0), (t1, completed1) = marks["spike"], marks[after_spike]

    unexpected: Counter = Counter()
    for outcome in unloaded.outcomes + spike.outcomes:
        if not is_deliberate(outcome.status, outcome.problem):
            unexpected[(outcome.status, outcome.problem)] += 1
    by_client: dict[str, tuple[int, int]] = {}
    for kind in traffic.CLIENT_WEIGHTS:
        sent = [o for o in spike_outcomes if o.client == kind]
        by_client[kind] = (sum(1 for o in sent if 200 <= o.status < 300), len(sent))

    stats = upstream.stats()
    return RunResult(
        mode=mode,
        unloaded_p50=percentile(unloaded_latencies, 0.5),
        unloaded_p99=percentile(unloaded_latencies, 0.99),
        spike_sent=len(spike_outcomes),
        goodput=received_in_window / (spike_end - spike_start),
        upstream_completed_rate=(completed1 - completed0) / (t1 - t0),
        admitted_p50=percentile(admitted, 0.5),
        admitted_p99=percentile(admitted, 0.99),
        spike_statuses=Counter((o.status, o.problem) for o in spike_outcomes),
        unexpected=unexpected,
        by_client=by_client,
        upstream_max_queued=int(stats["max_queued"]),
        dispatch_lag=max(unloaded.max_dispatch_lag, spike.max_dispatch_lag),
        waited_for_connection=max(unloaded.max_waiting_for_connection, spike.max_waiting_for_connection),
        # The client is the same in both phases, so the spike's count is the total.
        retried_on_new_connection=spike.retried_on_new_connection,
    )


def one_run(settings: Settings, mode: str, index: int) -> RunResult:
    name = f"{mode}-{index}"
    upstream = processes.start_upstream(
        settings.concurrency, settings.service_ms, settings.workdir / f"upstream-{name}.log"
    )
    gateway = None
    try:
        config = write_config(
            settings.workdir / f"nexus-{name}.yaml",
            upstream.url,
            concurrency=mode == "on",
            workers=settings.workers,
            limits=settings.limits,
        )
        gateway = processes.start_gateway(config, settings.workdir / f"nexus-{name}.log", settings.workers)
        return asyncio.run(measure(settings, mode, gateway, upstream, settings.seed + index))
    finally:
        if gateway is not None:
            gateway.stop()
        upstream.stop()


# The report.


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _median(results: list[RunResult], attribute: str) -> float:
    return statistics.median(getattr(result, attribute) for result in results)


def _median_count(results: list[RunResult], status: int, problem: str | None = None) -> int:
    return round(statistics.median(result.count(status, problem) for result in results))


def _each(results: list[RunResult], attribute: str, fmt) -> str:
    return ", ".join(fmt(getattr(result, attribute)) for result in results)


def machine_lines() -> list[str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True
    )
    changed = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "nexus"], check=False, capture_output=True, text=True
    )
    commit_text = commit.stdout.strip() or "unknown"
    if changed.stdout.strip():
        commit_text += ", with uncommitted changes under nexus/"
    return [
        f"- Nexus commit: {commit_text}",
        f"- CPU: {cpu}, {os.cpu_count()} cores",
        f"- kernel: {platform.release()}",
        (
            f"- Python: {platform.python_version()}, granian {importlib.metadata.version('granian')}, "
            f"uvloop {importlib.metadata.version('uvloop')}"
        ),
    ]


def format_report(settings: Settings, command: str, load_before: str, load_after: str) -> tuple[str, bool]:
    """Return the Markdown report and whether every target was met."""
    by_mode = {mode: [r for r in settings.results if r.mode == mode] for mode in MODES}
    lines = _setup_lines(settings, command, load_before, load_after)
    lines += _median_table(settings, by_mode)
    lines += _run_lines(by_mode)
    lines += _admitted_by_client(by_mode["on"])
    lines += _client_lines(settings.results)
    target_lines, met = _target_lines(settings, by_mode["on"])
    return "\n".join(lines + target_lines), met


def _setup_lines(settings: Settings, command: str, load_before: str, load_after: str) -> list[str]:
    limits = concurrency_settings(settings.limits)
    limit_text = ", ".join(f"{key} {value}" for key, value in limits.items())
    return [
        f"Run on {datetime.date.today().isoformat()} with:",
        "",
        "```",
        command,
        "```",
        "",
        "Machine:",
        "",
        *machine_lines(),
        f"- load average (1 min) before and after: {load_before}, {load_after}",
        "",
        (
            f"Upstream: loadtest/capacity_upstream.py, {settings.concurrency} requests at once, "
            f"{settings.service_ms:g} ms each, so a capacity of {settings.capacity:g} requests/s; it queues the "
            f"rest. Gateway: loadtest/nexus.yaml, {settings.workers} workers, `concurrency` on ({limit_text}) or "
            "off. The client, the gateway and the upstream share the machine's CPUs; Nexus pins its workers."
        ),
        "",
        (
            f"Load, open loop: {UNLOADED_SHARE * settings.capacity:g} requests/s for "
            f"{settings.unloaded_seconds:g} s (unloaded reference), then {settings.plan.describe()}. "
            f"{settings.runs} runs per mode, alternating; medians, for the requests sent during the spike:"
        ),
        "",
    ]


def _median_table(settings: Settings, by_mode: dict[str, list[RunResult]]) -> list[str]:
    lines = [
        "| Concurrency limit | Unloaded p99 | Spike sent | Goodput (2xx/s) | Upstream completed/s | 2xx p50 "
        "| 2xx p99 | p99 / unloaded p99 | 503 overloaded | 429 | Other errors (whole run) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, results in by_mode.items():
        if not results:
            continue
        goodput = _median(results, "goodput")
        errors = round(statistics.median(sum(r.unexpected.values()) for r in results))
        lines.append(
            f"| {mode} | {_ms(_median(results, 'unloaded_p99'))} | {round(_median(results, 'spike_sent')):,} "
            f"| {goodput:.1f} ({goodput / settings.capacity:.0%}) | {_median(results, 'upstream_completed_rate'):.1f} "
            f"| {_ms(_median(results, 'admitted_p50'))} | {_ms(_median(results, 'admitted_p99'))} "
            f"| {_median(results, 'p99_ratio'):.2f}x | {_median_count(results, 503, 'upstream_overloaded'):,} "
            f"| {_median_count(results, 429):,} | {errors:,} |"
        )
    return lines


def _run_lines(by_mode: dict[str, list[RunResult]]) -> list[str]:
    lines = ["", "Each run:", ""]
    for mode, results in by_mode.items():
        if not results:
            continue
        lines.append(
            f"- {mode}: goodput {_each(results, 'goodput', lambda v: f'{v:.1f}')}; "
            f"2xx p99 {_each(results, 'admitted_p99', _ms)}; unloaded p99 {_each(results, 'unloaded_p99', _ms)}; "
            f"most requests queued in the upstream {_each(results, 'upstream_max_queued', str)}"
        )
        errors: Counter = Counter()
        for result in results:
            errors.update(result.unexpected)
        if errors:
            described = ", ".join(
                f"{_status_text(status, problem)}: {count:,}" for (status, problem), count in errors.most_common()
            )
            lines.append(f"  - other errors, all runs together: {described}")
    return lines


def _admitted_by_client(on: list[RunResult]) -> list[str]:
    if not on:
        return []
    lines = ["", "Admitted share by client during the spike, limit on (2xx / sent, all runs together):", ""]
    for kind in traffic.CLIENT_WEIGHTS:
        ok = sum(result.by_client[kind][0] for result in on)
        sent = sum(result.by_client[kind][1] for result in on)
        share = f"{ok / sent:.0%}" if sent else "-"
        lines.append(f"- {kind}: {share} ({ok:,} / {sent:,})")
    return lines


def _client_lines(results: list[RunResult]) -> list[str]:
    lag = max(result.dispatch_lag for result in results)
    waited = max(result.waited_for_connection for result in results)
    retried = sum(result.retried_on_new_connection for result in results)
    return [
        "",
        (
            f"Client: the maximum delay between a request's due time and its start was {_ms(lag)}. At most "
            f"{waited:,} requests waited at once for one of the 4,000 connections allowed. {retried:,} requests "
            "were sent again on a new connection because the gateway had closed the idle one."
        ),
    ]


def _target_lines(settings: Settings, on: list[RunResult]) -> tuple[list[str], bool]:
    """Return the targets as Markdown list items, for the runs with the limit on, and whether all were met."""
    lines = ["", "Targets, limit on (medians):", ""]
    if not on:
        return lines + ["- no run with the limit on"], False
    goodput = _median(on, "goodput")
    ratio = _median(on, "p99_ratio")
    errors = round(statistics.median(sum(r.unexpected.values()) for r in on))
    goodput_floor = GOODPUT_TARGET * settings.capacity
    checks = [
        (
            goodput >= goodput_floor,
            f"goodput at least {GOODPUT_TARGET:.0%} of capacity ({goodput_floor:g}/s): "
            f"{goodput:.1f}/s, {goodput / settings.capacity:.0%}",
        ),
        (
            ratio <= P99_TARGET,
            f"p99 of admitted requests at most {P99_TARGET:g}x the unloaded p99: "
            f"{_ms(_median(on, 'admitted_p99'))} against {_ms(_median(on, 'unloaded_p99'))}, {ratio:.2f}x",
        ),
        (errors == 0, f"no error other than 429 and 503 upstream_overloaded: {errors:,}"),
    ]
    for ok, text in checks:
        lines.append(f"- {text}, **{'met' if ok else 'not met'}**.")
    return lines, all(ok for ok, _ in checks)


def _status_text(status: int, problem: str | None) -> str:
    if status == openloop.CONNECTION_ERROR:
        return f"connection error ({problem})" if problem else "connection error"
    if status == openloop.UNFINISHED:
        return f"no response within {DRAIN_SECONDS:g} s of the end"
    return f"{status} {problem}" if problem else str(status)


def write_section(path: Path, report: str) -> None:
    """Replace the text between the markers in `path`, or append the section with them at the end."""
    text = path.read_text()
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    block = f"{START_MARKER}\n{report}\n{END_MARKER}"
    if start >= 0 and end > start:
        text = text[:start] + block + text[end + len(END_MARKER) :]
    else:
        text = text.rstrip("\n") + f"\n\n{SECTION_TITLE}\n\n{block}\n"
    path.write_text(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure a 10x spike through Nexus with adaptive concurrency on and off."
    )
    parser.add_argument("--runs", type=int, default=3, help="Runs per mode (default 3).")
    parser.add_argument("--modes", default="on,off", help="Modes to run, comma-separated: on, off (default on,off).")

    parser.add_argument(
        "--concurrency", type=int, default=10, help="Requests the upstream serves at once (default 10)."
    )
    parser.add_argument(
        "--service-ms", type=float, default=100.0, help="Upstream service time per request, in ms (default 100)."
    )
    parser.add_argument("--workers", type=int, default=2, help="Gateway workers (default 2).")

    parser.add_argument("--unloaded-seconds", type=float, default=5.0, help="Length of the unloaded phase (default 5).")
    parser.add_argument("--baseline-seconds", type=float, help="Overrides LOADTEST_BASELINE_SECONDS (default 15).")
    parser.add_argument("--spike-seconds", type=float, help="Overrides LOADTEST_SPIKE_SECONDS (default 20).")
    parser.add_argument("--recovery-seconds", type=float, help="Overrides LOADTEST_RECOVERY_SECONDS (default 15).")

    parser.add_argument(
        "--max-limit",
        type=int,
        help="Replaces concurrency.max_limit of loadtest/nexus.yaml in the runs with the limit on.",
    )
    parser.add_argument("--seed", type=int, default=1, help="Seed of the traffic mix (default 1).")
    parser.add_argument("--write", type=Path, help="Markdown file to put the report in (see above).")

    args = parser.parse_args(argv)
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if not modes or any(mode not in MODES for mode in modes):
        parser.error(f"--modes takes on, off or both, got {args.modes!r}")
    args.modes = modes
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    return args


def _plan(args: argparse.Namespace, capacity: float) -> SpikePlan:
    environ = dict(os.environ)
    for option, variable in (
        ("baseline_seconds", "LOADTEST_BASELINE_SECONDS"),
        ("spike_seconds", "LOADTEST_SPIKE_SECONDS"),
        ("recovery_seconds", "LOADTEST_RECOVERY_SECONDS"),
    ):
        value = getattr(args, option)
        if value is not None:
            environ[variable] = str(value)
    return SpikePlan.from_env(environ, capacity=capacity)


def _raise_interrupt(signum: int, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _raise_interrupt)
    args = parse_args(argv)
    command = shlex.join([".venv/bin/python", "benchmarks/spike.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        plan = _plan(args, args.concurrency / (args.service_ms / 1000))
    except PlanError as error:
        print(f"spike: {error}", file=sys.stderr)
        return 1
    try:
        import uvloop
    except ImportError:
        pass
    else:
        uvloop.install()

    load_before = Path("/proc/loadavg").read_text().split()[0]
    with tempfile.TemporaryDirectory(prefix="nexus-spike-") as workdir:
        limits = {} if args.max_limit is None else {"max_limit": args.max_limit}
        settings = Settings(
            args.concurrency,
            args.service_ms,
            args.workers,
            plan,
            args.unloaded_seconds,
            Path(workdir),
            args.seed,
            args.runs,
            limits,
        )
        try:
            for index in range(args.runs):
                for mode in args.modes:
                    print(f"spike: run {index + 1}/{args.runs}, limit {mode}", file=sys.stderr, flush=True)
                    result = one_run(settings, mode, index)
                    settings.results.append(result)
                    print(
                        f"spike:   goodput {result.goodput:.1f}/s, 2xx p99 {_ms(result.admitted_p99)} "
                        f"(unloaded p99 {_ms(result.unloaded_p99)}), other errors {sum(result.unexpected.values())}",
                        file=sys.stderr,
                        flush=True,
                    )
        except KeyboardInterrupt:
            print("spike: interrupted", file=sys.stderr)
            return 130
        except (processes.StartError, BenchmarkError, OSError) as error:
            print(f"spike: {error}", file=sys.stderr)
            return 1
    load_after = Path("/proc/loadavg").read_text().split()[0]

    report, met = format_report(settings, command, load_before, load_after)
    print(report)
    if args.write:
        write_section(args.write, report)
    return 0 if met else 2


if __name__ == "__main__":
    sys.exit(main())
