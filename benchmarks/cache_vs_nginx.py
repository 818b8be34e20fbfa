"""Benchmark cache hits through Nexus against nginx `proxy_cache`, side by side in one run.

One nginx instance is the upstream of both: it returns the same ~100-byte
body for every path with `Cache-Control: max-age=3600`. In front of it run
an nginx with `proxy_cache` (a cache zone, `proxy_cache_valid 200 1h`) and
a Nexus gateway whose route has `cache: {}`, each with --workers workers.
After one request warms each cache, every measured request is a hit:

1. Maximum hit throughput: `wrk -t1 -c{connections}` alternating Nexus and
   nginx for --runs runs; median requests/s per proxy and their ratio.
2. Hit latency at half load: the open-loop client of
   benchmarks/proxy_vs_nginx.py sends at half of Nexus's median maximum to
   each proxy for 10 s, alternating for --runs runs; median p50 and p99.

The processes, the CPU pinning and the machine facts are those of
benchmarks/proxy_vs_nginx.py, whose helpers this script uses. Nexus is
checked to have served hits only: its upstream must see one request.

Run from the repository root:

    .venv/bin/python benchmarks/cache_vs_nginx.py --runs 3 --duration 10
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import proxy_vs_nginx as base  # noqa: E402 - after the path insert

TARGET_RATIO = 0.5
TARGET_P99_MS = 2.0
CONNECTIONS = 64


def upstream_conf(workdir: Path, port: int) -> str:
    """The upstream nginx: UPSTREAM_BODY for every path, cacheable for an hour, and an access log to count requests."""
    return (
        base._nginx_main_block(workdir, "upstream", 1, False)
        + "http {\n"
        f"    access_log {workdir / 'upstream-access.log'};\n"
        + base._nginx_temp_paths(workdir, "upstream")
        + "    keepalive_requests 1000000;\n"
        f"    server {{\n"
        f"        listen 127.0.0.1:{port};\n"
        "        location / {\n"
        "            default_type text/plain;\n"
        '            add_header Cache-Control "max-age=3600";\n'
        f'            return 200 "{base.UPSTREAM_BODY.rstrip()}\\n";\n'
        "        }\n"
        "    }\n"
        "}\n"
    )


def nginx_cache_conf(workdir: Path, port: int, upstream_port: int, workers: int) -> str:
    # nginx workers run as an unprivileged user when the benchmark runs as root.
    cache_dir = workdir / "nginx-cache"
    cache_dir.mkdir()
    cache_dir.chmod(0o777)
    workdir.chmod(0o755)
    return (
        base._nginx_main_block(workdir, "nginx-cache", workers, workers > 1)
        + "http {\n"
        "    access_log off;\n"
        + base._nginx_temp_paths(workdir, "nginx-cache")
        + "    keepalive_requests 1000000;\n"
        f"    proxy_cache_path {cache_dir} levels=1:2 keys_zone=bench:16m max_size=256m inactive=1h use_temp_path=off;\n"
        "    upstream backend {\n"
        f"        server 127.0.0.1:{upstream_port};\n"
        "        keepalive 64;\n"
        "    }\n"
        "    server {\n"
        f"        listen 127.0.0.1:{port};\n"
        "        location / {\n"
        "            proxy_pass http://backend;\n"
        "            proxy_http_version 1.1;\n"
        '            proxy_set_header Connection "";\n'
        "            proxy_cache bench;\n"
        "            proxy_cache_valid 200 1h;\n"
        "            proxy_cache_lock on;\n"
        "        }\n"
        "    }\n"
        "}\n"
    )


def nexus_cache_config(workdir: Path, upstream_port: int, workers: int) -> str:
    return (
        'listen: ["127.0.0.1:0"]\n'
        f"workers: {workers}\n"
        f'admin: {{socket: "{workdir / "admin.sock"}", metrics: null}}\n'
        "usage: false\n"
        "upstreams:\n"
        "  bench:\n"
        f'    targets: ["http://127.0.0.1:{upstream_port}"]\n'
        "routes:\n"
        "  - name: all\n"
        "    upstream: bench\n"
        "    match: {path_prefix: /}\n"
        "    cache: {}\n"
    )


def benchmark(args: argparse.Namespace, workdir: Path) -> dict:
    with base.Services(workdir) as services:
        upstream_port = base.free_port()
        base.start_nginx(services, "upstream", upstream_conf(workdir, upstream_port), upstream_port, "1")
        nginx_port = base.free_port()
        nginx = base.start_nginx(
            services, "nginx-cache", nginx_cache_conf(workdir, nginx_port, upstream_port, args.workers), nginx_port,
            "0" if args.workers == 1 else None,
        )  # fmt: skip
        nexus = base.start_nexus(
            services, upstream_port, args.workers, nexus_cache_config(workdir, upstream_port, args.workers)
        )
        proxies = [("Nexus", nexus), ("nginx proxy_cache", nginx)]

        # Warm both caches; wait_for_http already sent one GET / to each.
        for _, service in proxies:
            base.run_wrk(service.url, 4, 1)
        upstream_requests_before = _upstream_requests(workdir)

        throughput: dict[str, list[float]] = {name: [] for name, _ in proxies}
        for _ in range(args.runs):
            for name, service in proxies:
                base.run_wrk(service.url, CONNECTIONS, base.WARMUP_SECONDS)
                throughput[name].append(base.run_wrk(service.url, CONNECTIONS, args.duration).requests_per_second)

        rate = statistics.median(throughput["Nexus"]) / 2
        latency: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in proxies}
        for _ in range(args.runs):
            for name, service in proxies:
                result = base.run_open_loop(service.url, rate, base.OPEN_LOOP_SECONDS, CONNECTIONS)
                latency[name].append((result.percentile(0.5), result.percentile(0.99)))

        failures = base.nexus_failures(nexus)
        upstream_during_runs = _upstream_requests(workdir) - upstream_requests_before
    return {
        "throughput": throughput,
        "latency": latency,
        "rate": rate,
        "failures": failures,
        "upstream_during_runs": upstream_during_runs,
    }


def _upstream_requests(workdir: Path) -> int:
    log = workdir / "upstream-access.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def report(result: dict, args: argparse.Namespace) -> str:
    nexus = statistics.median(result["throughput"]["Nexus"])
    nginx = statistics.median(result["throughput"]["nginx proxy_cache"])
    lines = [
        f"Date: {datetime.date.today().isoformat()}; workers: {args.workers}; runs: {args.runs}; "
        f"wrk -t1 -c{CONNECTIONS} -d{args.duration:g}s; half load: {result['rate']:.0f} requests/s.",
        "",
        "| proxy | hits/s (median) | runs | p50 at half load | p99 at half load |",
        "|---|---|---|---|---|",
    ]
    for name, runs in result["throughput"].items():
        p50 = statistics.median(p for p, _ in result["latency"][name])
        p99 = statistics.median(p for _, p in result["latency"][name])
        lines.append(
            f"| {name} | {statistics.median(runs):.0f} | {', '.join(f'{r:.0f}' for r in runs)} | {p50:.2f} ms | {p99:.2f} ms |"
        )
    lines += [
        "",
        f"Nexus / nginx hit throughput: {nexus / nginx:.2f} (target at least {TARGET_RATIO}); "
        f"upstream requests during the measured runs: {result['upstream_during_runs']}; "
        f"Nexus failures logged: {len(result['failures'])}.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    print(base.probe_cpus())
    with tempfile.TemporaryDirectory(prefix="cache-bench-") as directory:
        result = benchmark(args, Path(directory))
    print(report(result, args))
    for key, value in base.machine_facts().items():
        print(f"- {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
