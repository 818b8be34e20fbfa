"""Run the locust spike test against a local gateway and capacity upstream, then print a summary.

    python -m loadtest.run [--concurrency 10] [--service-ms 100] [--workers 2] [--no-limit]

scripts/loadtest installs what this needs and runs it. The steps:

1. start loadtest/capacity_upstream.py on a free loopback port;
2. write the gateway config from loadtest/nexus.yaml and start `nexus run`
   on another free loopback port;
3. run locust headless with `SpikeShape`, then fetch the upstream's counters;
4. stop the gateway and the upstream, and print the summary of
   loadtest/summary.py.

Logs, locust's CSV files and the JSON results go to the results directory.

Exit status: 0 when every response was 2xx, 429 or a 503 of the
concurrency limit; 2 when there were other errors; 1 when a process did
not start or locust failed; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from loadtest import processes
from loadtest.gateway_config import write_config
from loadtest.spike_plan import PlanError, SpikePlan
from loadtest.summary import format_summary

ROOT = processes.ROOT
DEFAULT_RESULTS = ROOT / "benchmarks" / "results"
# Seconds locust may run past the plan (start-up, the last responses) before it is stopped.
LOCUST_GRACE_SECONDS = 30.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the locust spike test against a local Nexus gateway.")
    parser.add_argument(
        "--concurrency", type=int, default=10, help="Requests the upstream serves at once (default 10)."
    )
    parser.add_argument(
        "--service-ms", type=float, default=100.0, help="Time the upstream spends on each request, in ms (default 100)."
    )
    parser.add_argument("--workers", type=int, default=2, help="Gateway worker processes (default 2).")
    parser.add_argument(
        "--no-limit", action="store_true", help="Run the gateway without the upstream's adaptive concurrency limit."
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="Directory for logs, CSV and JSON results (default: benchmarks/results/loadtest-DATE-TIME).",
    )
    return parser.parse_args(argv)


def _raise_interrupt(signum: int, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    capacity = args.concurrency / (args.service_ms / 1000)
    try:
        plan = SpikePlan.from_env(capacity=capacity)
    except PlanError as error:
        print(f"loadtest: {error}", file=sys.stderr)
        return 1

    results = args.results_dir or DEFAULT_RESULTS / time.strftime("loadtest-%Y%m%d-%H%M%S")
    results.mkdir(parents=True, exist_ok=True)
    mode = "off" if args.no_limit else "on"
    print(f"loadtest: results in {results}")
    print(f"loadtest: {plan.describe()}; adaptive concurrency {mode}")

    upstream = gateway = locust = None
    try:
        upstream = processes.start_upstream(args.concurrency, args.service_ms, results / "upstream.log")
        print(f"loadtest: capacity upstream on {upstream.url}, {upstream.capacity:g} requests/s")
        config = write_config(results / "nexus.yaml", upstream.url, concurrency=not args.no_limit, workers=args.workers)
        gateway = processes.start_gateway(config, results / "nexus.log", args.workers)
        print(
            f"loadtest: gateway on {gateway.url} with {args.workers} workers; locust runs for about {plan.total_seconds:g} s"
        )

        environment = {
            **os.environ,
            "LOADTEST_CAPACITY": f"{upstream.capacity:g}",
            "LOADTEST_RESULTS_DIR": str(results),
            "PYTHONPATH": str(ROOT),
        }
        command = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(ROOT / "loadtest" / "locustfile.py"),
            "--headless",
            "--only-summary",
            "--host",
            gateway.url,
            "--csv",
            str(results / "locust"),
            "--loglevel",
            "WARNING",
        ]
        locust = processes.popen(command, results / "locust.log", env=environment)
        try:
            status = locust.wait(plan.total_seconds + LOCUST_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            print(
                f"loadtest: locust still ran {LOCUST_GRACE_SECONDS:g} s after the plan's end; stopping it",
                file=sys.stderr,
            )
            status = processes.stop(locust)
        # locust exits 1 when any request failed, which the 503s of the
        # concurrency limit always make happen.
        if status not in (0, 1) or not (results / "traffic.json").exists():
            print(f"loadtest: locust failed with status {status}; see {results / 'locust.log'}", file=sys.stderr)
            return 1
        (results / "upstream_stats.json").write_text(json.dumps(upstream.stats(), indent=2) + "\n")
    except processes.StartError as error:
        print(f"loadtest: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("loadtest: interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        for process in (locust,):
            if process is not None:
                processes.stop(process)
        if gateway is not None:
            gateway.stop()
        if upstream is not None:
            upstream.stop()

    text, unexpected = format_summary(results)
    print()
    print(text)
    return 2 if unexpected else 0


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _raise_interrupt)
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
