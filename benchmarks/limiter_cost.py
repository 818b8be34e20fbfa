"""Measure what rate limiting costs on the request path: requests/s with and without limits.

One Nexus worker (pinned to CPU 0) proxies to an nginx upstream (CPU 1),
loaded by wrk (CPU 1), in three configurations measured in turn, run by
run, so that drift on the machine hits all of them alike:

- `none`: one route, no limit;
- `route`: the same route with a route-wide GCRA rate and a quota, set
  high enough that every request is admitted (the decision still runs);
- `consumer`: API key auth, a tier limit per consumer and a per-consumer
  policy with rate and quota (four decisions per request), every request
  admitted.

It prints requests/s per run, the medians, and each configuration's ratio
to `none`. The target is a ratio of at least 0.9 (at most 10% lower).
It needs nginx, wrk and taskset, like proxy_vs_nginx.py, whose process
helpers it uses.

    .venv/bin/python benchmarks/limiter_cost.py --runs 3 --duration 10
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_vs_nginx import (  # noqa: E402
    BenchmarkError,
    Services,
    check_tools,
    free_port,
    machine_facts,
    run_wrk,
    start_nexus,
    start_nginx,
    upstream_nginx_conf,
)

from nexus.auth import hash_key  # noqa: E402

API_KEY = "nx_benchmark_key_0123456789abcdefghij"
TARGET_RATIO = 0.9

# Limits far above what one worker can serve, so every request is admitted
# and the benchmark measures the decisions, not rejections.
_ROUTE_LIMIT = "rate_limit: {rate: 1000000/s, burst: 1000000, quota: 4000000000/day}"
_CONSUMER_PARTS = (
    "tiers:\n"
    "  pro: {priority: 2, rate_limit: {rate: 1000000/s, burst: 1000000}}\n"
    "consumers:\n"
    f'  bench: {{keys: ["{hash_key(API_KEY)}"], tier: pro}}\n'
)
_POLICY = "policies: [{name: per-consumer, key: [consumer], rate: 1000000/s, burst: 1000000, quota: 4000000000/day}]"


def config_text(kind: str, upstream_port: int) -> str:
    head = f'listen: ["127.0.0.1:0"]\nworkers: 1\nupstreams:\n  bench: {{targets: ["http://127.0.0.1:{upstream_port}"]}}\n'
    if kind == "none":
        return head + "routes:\n  - {name: all, upstream: bench}\n"
    if kind == "route":
        return head + f"routes:\n  - {{name: all, upstream: bench, {_ROUTE_LIMIT}}}\n"
    # The authenticated route sits under /api; "/" stays public, for the readiness check.
    return head + _CONSUMER_PARTS + (
        "routes:\n"
        f"  - {{name: api, upstream: bench, match: {{path_prefix: /api}}, auth: api_key, {_POLICY}}}\n"
        "  - {name: ready, upstream: bench, match: {path: /}}\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per configuration (default 3)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    args = parser.parse_args()

    check_tools()
    kinds = ("none", "route", "consumer")
    results: dict[str, list[float]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory(prefix="nexus-limiter-") as workdir, Services(Path(workdir)) as services:
        upstream_port = free_port()
        start_nginx(services, "upstream", upstream_nginx_conf(Path(workdir), upstream_port), upstream_port, "1")
        gateways = {}
        for kind in kinds:
            gateway = start_nexus(services, upstream_port, 1, config_text(kind, upstream_port), name=f"nexus-{kind}")
            gateways[kind] = gateway
        # Only one gateway serves at a time, but all are pinned to CPU 0 by
        # their master; idle ones cost nothing measurable.
        headers = {"consumer": (f"x-api-key: {API_KEY}",)}
        urls = {kind: gateways[kind].url + ("/api" if kind == "consumer" else "") for kind in kinds}
        for kind in kinds:
            run_wrk(urls[kind], args.connections, 2.0, headers.get(kind, ()))  # warm-up
        for run in range(args.runs):
            for kind in kinds:
                result = run_wrk(urls[kind], args.connections, args.duration, headers.get(kind, ()))
                if result.errors:
                    raise BenchmarkError(f"{kind}: {result.errors} failed requests in run {run + 1}:\n{result.output}")
                results[kind].append(result.requests_per_second)
                print(f"run {run + 1} {kind:9s} {result.requests_per_second:10.0f} req/s", flush=True)

    print(_report(results, args))
    return 0


def _report(results: dict[str, list[float]], args: argparse.Namespace) -> str:
    facts = machine_facts()
    baseline = statistics.median(results["none"])
    lines = [
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. CPU: {facts['CPU']}, "
        f"{facts['cores']} cores; Nexus {facts['Nexus commit']}.",
        f"Command: `.venv/bin/python benchmarks/limiter_cost.py --runs {args.runs} --duration {args.duration:g}`",
        "",
        "| limits on the route | decisions per request | median req/s | runs | ratio to none | target |",
        "|---|---:|---:|---|---:|---|",
    ]
    decisions = {"none": 0, "route": 2, "consumer": 4}
    for kind, values in results.items():
        median = statistics.median(values)
        ratio = median / baseline
        target = "-" if kind == "none" else ("met" if ratio >= TARGET_RATIO else "not met")
        runs = ", ".join(f"{value:.0f}" for value in values)
        lines.append(f"| {kind} | {decisions[kind]} | {median:,.0f} | {runs} | {ratio:.2f} | {target} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
