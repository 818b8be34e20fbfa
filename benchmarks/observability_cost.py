"""Measure what metrics and access logging cost on the request path: requests/s with them on and off.

One Nexus worker (pinned to CPU 0) proxies to an nginx upstream (CPU 1),
loaded by wrk (CPU 1), in two configurations measured in turn, run by run,
so that drift on the machine hits both alike:

- `off`: no /metrics listener, no access log, `usage: false` (workers push
  no access records; the metric slots still count, as they always do);
- `on`: /metrics on a free port, scraped every second during the runs,
  the access log written to a file for every request (`sample: 100%`), and
  usage aggregated by the master.

It prints requests/s per run, the medians, the ratio of `on` to `off`, the
median of the per-round ratios, and the CPU time per request of the
worker and of the master (all its threads) in each configuration, read
from /proc around each run. The target is a ratio of at least 0.95 (at
most 5% lower). It needs nginx, wrk and taskset, like proxy_vs_nginx.py,
whose process helpers it uses.

The masters are not pinned, as in a deployment. `--master-cpu 1` pins
both to CPU 1 (beside wrk and the upstream), and `--log-dir DIR` writes
the access log there (a tmpfs, to take the disk out), to see where the
cost lands.

    .venv/bin/python benchmarks/observability_cost.py --runs 15 --duration 10
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_vs_nginx import (  # noqa: E402
    BenchmarkError,
    Services,
    check_tools,
    cpu_seconds,
    free_port,
    machine_facts,
    nexus_worker_pids,
    run_wrk,
    start_nexus,
    start_nginx,
    upstream_nginx_conf,
)

TARGET_RATIO = 0.95
KINDS = ("off", "on")


def config_text(kind: str, upstream_port: int, workdir: Path, log_dir: Path) -> str:
    socket = json.dumps(str(workdir / f"admin-{kind}.sock"))
    head = (
        'listen: ["127.0.0.1:0"]\nworkers: 1\n'
        f'upstreams:\n  bench: {{targets: ["http://127.0.0.1:{upstream_port}"]}}\n'
        "routes:\n  - {name: all, upstream: bench}\n"
    )
    if kind == "off":
        return head + f"admin: {{socket: {socket}, metrics: null}}\nusage: false\n"
    access_log = json.dumps(str(log_dir / "access.log"))
    return head + (
        f'admin: {{socket: {socket}, metrics: "127.0.0.1:{free_port()}"}}\n'
        f"access_log: {{path: {access_log}, sample: 100%}}\nusage: true\n"
    )


class Scraper:
    """Scrapes a /metrics URL every second in a thread, as Prometheus would, until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            with urllib.request.urlopen(self.url, timeout=5) as response:
                response.read()
            self.scrapes += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per configuration (default 3)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument(
        "--log-dir", type=Path, help="directory for the access log (default: the run's temporary directory)"
    )
    parser.add_argument("--master-cpu", type=int, help="pin both masters, all threads, to this CPU (default: not pinned)")
    args = parser.parse_args()

    check_tools()
    results: dict[str, list[float]] = {kind: [] for kind in KINDS}
    # Microseconds of CPU per request, per run: (worker, master).
    cpu: dict[str, list[tuple[float, float]]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory(prefix="nexus-obs-") as name, Services(Path(name)) as services:
        workdir = Path(name)
        log_dir = args.log_dir or workdir
        (log_dir / "access.log").unlink(missing_ok=True)
        upstream_port = free_port()
        start_nginx(services, "upstream", upstream_nginx_conf(workdir, upstream_port), upstream_port, "1")
        gateways = {
            kind: start_nexus(services, upstream_port, 1, config_text(kind, upstream_port, workdir, log_dir), name=f"nexus-{kind}")
            for kind in KINDS
        }
        if args.master_cpu is not None:
            for gateway in gateways.values():
                subprocess.run(["taskset", "-a", "-p", "-c", str(args.master_cpu), str(gateway.process.pid)], check=True, capture_output=True)
        metrics = re.search(r"metrics listening address=(\S+)", gateways["on"].log())
        if metrics is None:
            raise BenchmarkError(f"the `on` gateway logged no metrics address:\n{gateways['on'].log()}")
        with Scraper(f"http://{metrics.group(1)}/metrics") as scraper:
            for kind in KINDS:
                run_wrk(gateways[kind].url, args.connections, 2.0)  # warm-up
            for run in range(args.runs):
                for kind in KINDS:
                    processes = (nexus_worker_pids(gateways[kind]), [gateways[kind].process.pid])
                    before = [cpu_seconds(pids) for pids in processes]
                    result = run_wrk(gateways[kind].url, args.connections, args.duration)
                    used = [cpu_seconds(pids) - start for pids, start in zip(processes, before)]
                    cpu[kind].append(tuple(seconds / max(result.requests, 1) * 1e6 for seconds in used))
                    if result.errors:
                        raise BenchmarkError(f"{kind}: {result.errors} failed requests in run {run + 1}:\n{result.output}")
                    results[kind].append(result.requests_per_second)
                    print(f"run {run + 1} {kind:3s} {result.requests_per_second:10.0f} req/s", flush=True)
        lines = sum(1 for _ in (log_dir / "access.log").open())
        dropped = re.search(r"^nexus_ring_dropped_records_total (\S+)$", _scrape(metrics.group(1)), re.MULTILINE)
    print(_report(results, cpu, args, lines, scraper.scrapes, str(int(float(dropped.group(1)))) if dropped else "?"))
    return 0


def _scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        return response.read().decode()


def _report(
    results: dict[str, list[float]],
    cpu: dict[str, list[tuple[float, float]]],
    args: argparse.Namespace,
    lines: int,
    scrapes: int,
    dropped: str,
) -> str:
    facts = machine_facts()
    baseline = statistics.median(results["off"])
    ratio = statistics.median(results["on"]) / baseline
    rows = [
        f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. CPU: {facts['CPU']}, "
        f"{facts['cores']} cores; Nexus {facts['Nexus commit']}.",
        f"Command: `.venv/bin/python benchmarks/observability_cost.py --runs {args.runs} --duration {args.duration:g}"
        + (f" --master-cpu {args.master_cpu}`" if args.master_cpu is not None else "`"),
        "",
        "| metrics and access log | median req/s | runs | ratio to off | target | worker CPU us/request | master CPU us/request |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for kind, values in results.items():
        runs = ", ".join(f"{value:.0f}" for value in values)
        target = "-" if kind == "off" else ("met" if ratio >= TARGET_RATIO else "not met")
        worker_us = statistics.median(row[0] for row in cpu[kind])
        master_us = statistics.median(row[1] for row in cpu[kind])
        rows.append(
            f"| {kind} | {statistics.median(values):,.0f} | {runs} | {statistics.median(values) / baseline:.2f} | {target} "
            f"| {worker_us:.1f} | {master_us:.1f} |"
        )
    # Each round measures off and on back to back, so drift on the machine
    # hits both: the median of the per-round ratios is steadier than the
    # ratio of the medians when the machine's speed drifts between rounds.
    paired = sorted(on / off for off, on in zip(results["off"], results["on"], strict=True))
    rows.append("")
    rows.append(
        f"Paired ratio (each round's on / off): median {statistics.median(paired):.3f}, "
        f"from {paired[0]:.3f} to {paired[-1]:.3f} over {len(paired)} rounds."
    )
    rows.append(f"The `on` gateway wrote {lines:,} access log lines, was scraped {scrapes} times, and dropped {dropped} records.")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
