"""Measure how long a /metrics scrape takes at about 1000 series.

Builds a config of `--routes` rate-limited routes over `--upstreams`
upstreams of two targets each, creates the real shared-memory tables for
it with two banks of worker slots (as the master does), fills every
counter and histogram, and serves `NexusCollector` with prometheus_client's
HTTP server on a free loopback port. It then times `--scrapes` HTTP
scrapes (request to last byte) and the same number of in-process
renderings, and prints the series count and the medians and p99s.

    .venv/bin/python benchmarks/scrape.py --routes 23 --scrapes 200

The target is a scrape under 50 ms at 1000 series.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry, generate_latest, start_http_server  # noqa: E402

from nexus.config import parse_config  # noqa: E402
from nexus.observability.exposition import NexusCollector  # noqa: E402
from nexus.shm.state import SharedState  # noqa: E402
from nexus.telemetry import RequestMetrics, build_layout  # noqa: E402

TARGET_MS = 50.0
WORKERS = 2


def config_text(routes: int, upstreams: int) -> str:
    lines = ['listen: ["127.0.0.1:0"]', f"workers: {WORKERS}", "upstreams:"]
    for index in range(upstreams):
        targets = f'["http://127.0.0.1:{20000 + 2 * index}", "http://127.0.0.1:{20001 + 2 * index}"]'
        lines.append(f"  u{index}: {{targets: {targets}, concurrency: {{initial_limit: 10}}}}")
    lines.append("routes:")
    for index in range(routes):
        lines.append(
            f"  - {{name: r{index}, upstream: u{index % upstreams}, match: {{path_prefix: /r{index}/}}, "
            "rate_limit: {rate: 100/s}}"
        )
    return "\n".join(lines) + "\n"


def fill(config, layout, shared) -> None:
    """Count some requests of every route in every worker slot, so no series is zero."""
    for worker in range(shared.metrics.workers):
        metrics = RequestMetrics(shared.metrics.for_worker(worker), layout, config)
        for route in config.routes:
            for status in (200, 201, 404, 503):
                metrics.request(route.name, "GET", status, 3_000_000 + worker)
            metrics.request(route.name, "POST", 200, 80_000_000)
            upstream = config.upstreams[route.upstream]
            metrics.upstream_response(route.name, upstream.target_list()[worker % 2].url, 2_000_000)


def scrape_once(port: int) -> tuple[float, bytes]:
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/metrics")
    body = connection.getresponse().read()
    connection.close()
    return time.perf_counter() - started, body


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, default=23, help="rate-limited routes (default 23: about 1000 series)")
    parser.add_argument("--upstreams", type=int, default=4, help="upstreams of two targets each (default 4)")
    parser.add_argument("--scrapes", type=int, default=200, help="scrapes to time (default 200)")
    args = parser.parse_args()

    config = parse_config(config_text(args.routes, args.upstreams))
    layout = build_layout(config)
    shared = SharedState.create_for(config, layout)
    try:
        fill(config, layout, shared)
        collector = NexusCollector(config, shared, lambda: [(layout, shared.metrics)])
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        server, _thread = start_http_server(0, "127.0.0.1", registry)
        port = server.server_address[1]
        try:
            _, body = scrape_once(port)
            series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
            http_times = [scrape_once(port)[0] for _ in range(args.scrapes)]
        finally:
            server.shutdown()
            server.server_close()
        render_times = []
        for _ in range(args.scrapes):
            started = time.perf_counter()
            generate_latest(registry)
            render_times.append(time.perf_counter() - started)
    finally:
        shared.close()

    http_median = statistics.median(http_times) * 1000
    lines = [
        f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. "
        f"Command: `.venv/bin/python benchmarks/scrape.py --routes {args.routes} --upstreams {args.upstreams} "
        f"--scrapes {args.scrapes}`",
        f"Series: {series} (metric words summed over {shared.metrics.workers} worker slots), "
        f"response {len(body):,} bytes.",
        "",
        "| scrape | median ms | p99 ms | target |",
        "|---|---:|---:|---|",
        f"| HTTP GET /metrics | {http_median:.1f} | {percentile(http_times, 0.99) * 1000:.1f} | "
        f"{'met' if http_median < TARGET_MS else 'not met'} (< {TARGET_MS:g} ms) |",
        f"| rendering only (generate_latest) | {statistics.median(render_times) * 1000:.1f} | "
        f"{percentile(render_times, 0.99) * 1000:.1f} | - |",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
