"""Helpers for the observability end-to-end tests: configs with metrics on, scrapes, client threads.

Everything runs on 127.0.0.1. `scrape` reads a real gateway's /metrics and
indexes the samples by name and labels. `Traffic` sends requests from
threads, one connection per request so the kernel spreads them over the
workers, and counts the responses.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.lifecycle_support import CONNECTION_ERRORS, host_port

_METRICS_LINE = re.compile(r"metrics listening address=(\S+)")

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def obs_config(
    upstream_url: str,
    socket_path: Path,
    *,
    workers: int = 2,
    metrics: bool = True,
    access_log: str | None = None,
    extra: str = "",
) -> str:
    """A config with routes `echo` and `status` on one upstream, its own admin socket and metrics on a free port."""
    admin = {"socket": str(socket_path), "metrics": "127.0.0.1:0" if metrics else None}
    lines = [
        'listen: ["127.0.0.1:0"]',
        f"workers: {workers}",
        f"admin: {json.dumps(admin)}",
        f"upstreams: {{app: {{targets: [{json.dumps(upstream_url)}]}}}}",
        "routes:",
        "  - {name: echo, upstream: app, match: {path_prefix: /echo}}",
        "  - {name: status, upstream: app, match: {path_prefix: /status}}",
    ]
    if access_log is not None:
        lines.append(f"access_log: {access_log}")
    return "\n".join(lines) + "\n" + extra


def metrics_address(log: str) -> str:
    match = _METRICS_LINE.search(log)
    assert match, f"the master logged no metrics address:\n{log}"
    return match.group(1)


def scrape_text(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/plain")
        return response.read().decode()


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def scrape(address: str) -> Samples:
    return parse(scrape_text(address))


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(samples.get(name, {}).values())


def request(url: str, method: str = "GET", path: str = "/echo", headers: dict[str, str] | None = None) -> int:
    """Send one request on a new connection and return its status (the body is read and dropped)."""
    host, port = host_port(url.removeprefix("http://"))
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request(method, path, body=b"x" if method == "POST" else None, headers=headers or {})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


class Traffic:
    """Client threads sending GET /echo in a loop until stopped; counts statuses and connection errors."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url = url
        self.statuses: Counter[int] = Counter()
        self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def answered(self) -> int:
        with self._lock:
            return sum(self.statuses.values())

    def _run(self) -> None:
        deadline = time.monotonic() + 60  # bounded even if stop() is never called
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                status = request(self.url)
            except CONNECTION_ERRORS:
                with self._lock:
                    self.errors += 1
                continue
            with self._lock:
                self.statuses[status] += 1
