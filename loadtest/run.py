"""Run a locust workload against a local gateway and capacity upstream, then print a summary.

    python -m loadtest.run [--workload spike|steady|zipf] [--concurrency 10] [--service-ms 100] [--workers 2] [--no-limit]

scripts/loadtest installs what this needs and runs it. The steps:

1. start loadtest/capacity_upstream.py on a free loopback port;
2. write the gateway config from loadtest/nexus.yaml and start `nexus run`
   on another free loopback port;
3. run locust headless with the workload's shape (the 10x spike, a
   steady mixed load, or the cache-heavy Zipf load with the catalog route
   cached), then fetch the upstream's counters;
4. stop the gateway and the upstream, and print the summary of
   loadtest/summary.py.

Logs, locust's CSV files and HTML report, and the JSON results go to the
results directory.

Exit status: 0 when every response was 2xx, 429 or a 503 of the
concurrency limit; 2 when there were other errors; 1 when a process did
not start or locust failed; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from loadtest import processes
from loadtest.gateway_config import write_config
from loadtest.spike_plan import PlanError, SpikePlan
from loadtest.steady_plan import SteadyPlan
from loadtest.summary import format_summary

ROOT = processes.ROOT
DEFAULT_RESULTS = ROOT / "benchmarks" / "results"
# Seconds locust may run past the plan (start-up, the last responses) before it is stopped.
LOCUST_GRACE_SECONDS = 30.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run a locust workload against a local Nexus gateway.")
    parser.add_argument(
        "--workload",
        choices=("spike", "steady", "zipf"),
        default="spike",
        help="spike: mixed traffic with a 10x spike (default); steady: mixed traffic at one rate; "
        "zipf: cache-heavy reads of Zipf-distributed items with the catalog route cached.",
    )
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


def observability_settings(results: Path, admin_dir: Path) -> dict:
    """Return the config sections of a run: its own admin socket, /metrics on a free port, an access log in `results`."""
    return {
        "admin": {"socket": str(admin_dir / "admin.sock"), "metrics": "127.0.0.1:0"},
        "access_log": {"path": str(results / "access.log"), "sample": "100%"},
    }


def save_observability(gateway: processes.Gateway, results: Path, admin_dir: Path) -> None:
    """Save the gateway's last /metrics scrape and its per-consumer usage in `results`."""
    from nexus.admin.client import AdminClient, AdminClientError

    address = re.search(r"metrics listening address=(\S+)", gateway.log())
    if address is not None:
        with urllib.request.urlopen(f"http://{address.group(1)}/metrics", timeout=10) as response:
            (results / "metrics.txt").write_bytes(response.read())
    try:
        usage = AdminClient(str(admin_dir / "admin.sock"), timeout=10).call("GET", "/usage")
    except AdminClientError as error:
        print(f"loadtest: no usage from the gateway: {error.message}", file=sys.stderr)
        return
    (results / "usage.json").write_text(json.dumps(usage, indent=2) + "\n")


def _raise_interrupt(signum: int, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    capacity = args.concurrency / (args.service_ms / 1000)
    try:
        if args.workload == "spike":
            plan = SpikePlan.from_env(capacity=capacity)
        else:
            plan = SteadyPlan.from_env(args.workload, capacity=capacity)
    except PlanError as error:
        print(f"loadtest: {error}", file=sys.stderr)
        return 1

    results = args.results_dir or DEFAULT_RESULTS / time.strftime("loadtest-%Y%m%d-%H%M%S")
    results.mkdir(parents=True, exist_ok=True)
    mode = "off" if args.no_limit else "on"
    print(f"loadtest: results in {results}")
    print(f"loadtest: {args.workload}: {plan.describe()}; adaptive concurrency {mode}")

    upstream = gateway = locust = None
    # The admin socket goes to a short directory, because a Unix socket path has at most 107 bytes.
    admin_dir = Path(tempfile.mkdtemp(prefix="nexus-loadtest-"))
    try:
        upstream = processes.start_upstream(args.concurrency, args.service_ms, results / "upstream.log")
        print(f"loadtest: capacity upstream on {upstream.url}, {upstream.capacity:g} requests/s")
        config = write_config(
            results / "nexus.yaml",
            upstream.url,
            concurrency=not args.no_limit,
            workers=args.workers,
            cache=args.workload == "zipf",
            observability=observability_settings(results, admin_dir),
        )
        gateway = processes.start_gateway(config, results / "nexus.log", args.workers)
        print(
            f"loadtest: gateway on {gateway.url} with {args.workers} workers; locust runs for about {plan.total_seconds:g} s"
        )

        environment = {
            **os.environ,
            "LOADTEST_CAPACITY": f"{upstream.capacity:g}",
            "LOADTEST_RESULTS_DIR": str(results),
            "LOADTEST_WORKLOAD": args.workload,
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
            "--html",
            str(results / "locust.html"),
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
        save_observability(gateway, results, admin_dir)
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
        shutil.rmtree(admin_dir, ignore_errors=True)

    text, unexpected = format_summary(results)
    print()
    print(text)
    return 2 if unexpected else 0


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _raise_interrupt)
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
