"""/metrics of a real gateway with 2 workers: counts match the requests sent, and survive a SIGKILLed worker."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.conftest import admin_socket_dir, wait_for
from tests.e2e.lifecycle_support import CONNECTION_ERRORS, is_running
from tests.redis_support import free_port
from tests.e2e.obs_support import Traffic, metrics_address, obs_config, request, scrape, scrape_text, total, value

pytestmark = pytest.mark.e2e


def test_counts_match_requests_sent(tmp_path, upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    access_log = tmp_path / "access.log"
    config = obs_config(upstream.url, admin_socket_dir(tmp_path) / "a.sock", access_log=json.dumps({"path": str(access_log)}))
    gateway = gateway_factory(config, workers=2)
    address = metrics_address(gateway.log())

    sent = {("GET", "/echo/a"): 120, ("POST", "/echo/b"): 30, ("GET", "/status/404"): 25, ("GET", "/nowhere"): 5}
    for (method, path), count in sent.items():
        for _ in range(count):
            request(gateway.url, method, path)

    # A worker counts a request just after sending its response, so the
    # last counts may land a moment after the client has its answer.
    requests = "nexus_http_requests_total"
    wait_for(lambda: total(scrape(address), requests) == 180, 5, message="180 requests counted")
    samples = scrape(address)
    assert value(samples, requests, route="echo", method_class="safe", status_class="2xx") == 120
    assert value(samples, requests, route="echo", method_class="unsafe", status_class="2xx") == 30
    assert value(samples, requests, route="status", method_class="safe", status_class="4xx") == 25
    assert value(samples, requests, route="(none)", method_class="safe", status_class="4xx") == 5
    assert total(samples, requests) == 180
    assert value(samples, "nexus_http_request_duration_seconds_count", route="echo") == 150
    assert value(samples, "nexus_http_request_duration_seconds_bucket", route="echo", le="+Inf") == 150
    assert value(samples, "nexus_upstream_request_duration_seconds_count", upstream="app", target=upstream.url) == 175
    assert value(samples, "nexus_upstream_tries_total", upstream="app", target=upstream.url, outcome="ok") == 175
    assert value(samples, "nexus_upstream_target_up", upstream="app", target=upstream.url) == 1
    assert value(samples, "nexus_workers", state="serving") == 2
    assert value(samples, "nexus_generation") == 1
    assert total(samples, "nexus_build_info") == 1
    assert value(samples, "nexus_ring_dropped_records_total") == 0

    # The requests were spread over both workers, whose counts the scrape added up.
    wait_for(lambda: len(access_log.read_text().splitlines()) == 180, 5, message="180 access log lines")
    workers = {json.loads(line)["worker"] for line in access_log.read_text().splitlines()}
    assert len(workers) == 2


def test_killed_worker_keeps_its_counts(tmp_path, upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    gateway = gateway_factory(obs_config(upstream.url, admin_socket_dir(tmp_path) / "a.sock"), workers=2)
    address = metrics_address(gateway.log())
    victim = gateway.worker_pids[0]
    seen: list[float] = []

    def count() -> float:
        seen.append(total(scrape(address), "nexus_http_requests_total"))
        return seen[-1]

    threads = 4
    with Traffic(gateway.url, threads=threads) as traffic:
        wait_for(lambda: count() >= 300, 20, interval=0.05, message="300 requests counted")
        os.kill(victim, signal.SIGKILL)
        counted_at_kill = count()
        wait_for(lambda: not is_running(victim), 5, message="the killed worker to exit")
        wait_for(
            lambda: len(gateway.serving_pids()) == 2 and victim not in gateway.serving_pids().values(),
            20,
            message="a new worker in the killed one's place",
        )
        resumed = count()
        wait_for(lambda: count() >= resumed + 300, 20, interval=0.05, message="300 more requests counted")
        traffic.stop()
    time.sleep(0.2)
    final = count()

    assert seen == sorted(seen), "a counter went backwards"
    assert resumed >= counted_at_kill
    # Every response the clients received was counted. Only requests that
    # the killed worker held (at most one per client thread) may differ.
    answered = traffic.answered()
    assert answered - threads <= final <= answered + threads
    assert traffic.statuses.keys() == {200}
    assert "nexus_worker_restarts_total 1.0" in scrape_text(address)


def test_reload_keeps_counts_and_adds_routes(tmp_path, upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    access_log = tmp_path / "access.log"
    config = obs_config(upstream.url, admin_socket_dir(tmp_path) / "a.sock", access_log=json.dumps({"path": str(access_log)}))
    gateway = gateway_factory(config, workers=2)
    address = metrics_address(gateway.log())
    for _ in range(50):
        assert request(gateway.url, path="/echo/before") == 200
    wait_for(lambda: total(scrape(address), "nexus_http_requests_total") == 50, 5, message="50 requests counted")
    before = scrape(address)

    # The new config adds a route; SIGHUP makes the master start a new generation with it.
    extra = "  - {name: extra, upstream: app, match: {path_prefix: /extra}}\n"
    config_path = next(tmp_path.glob("nexus-*.yaml"))
    config_path.write_text(config_path.read_text().replace("routes:\n", "routes:\n" + extra))
    os.kill(gateway.process.pid, signal.SIGHUP)
    wait_for(lambda: value(scrape(address), "nexus_generation") == 2, 30, interval=0.1, message="generation 2")
    # Until the old generation has drained, some requests still reach its
    # workers, which answer 404. A connection cut during the handover (status
    # 0) reached no counter.
    statuses: list[int] = []

    def send_extra() -> bool:
        try:
            statuses.append(request(gateway.url, path="/extra/after"))
        except CONNECTION_ERRORS:
            statuses.append(0)
        return statuses.count(200) == 20

    wait_for(send_extra, 30, interval=0.01, message="20 responses from the new route")
    wait_for(lambda: total(scrape(address), "nexus_http_requests_total") == 50 + len(statuses) - statuses.count(0), 5)
    after = scrape(address)

    safe_2xx = {"method_class": "safe", "status_class": "2xx"}
    assert value(before, "nexus_http_requests_total", route="echo", **safe_2xx) == 50
    assert value(after, "nexus_http_requests_total", route="echo", **safe_2xx) == 50
    assert value(after, "nexus_http_requests_total", route="extra", **safe_2xx) == 20
    assert value(after, "nexus_http_requests_total", route="(none)", method_class="safe", status_class="4xx") == statuses.count(404)
    assert value(after, "nexus_reloads_total") == 1
    total_lines = 50 + len(statuses) - statuses.count(0)
    wait_for(lambda: len(access_log.read_text().splitlines()) == total_lines, 5, message=f"{total_lines} access log lines")
    routes = [json.loads(line)["route"] for line in access_log.read_text().splitlines()]
    assert routes.count("echo") == 50
    assert routes.count("extra") == 20


def _metric_segments(pid: int) -> int:
    """Count the distinct metric segments mapped by process `pid`."""
    with open(f"/proc/{pid}/maps") as maps:
        return len({line.split()[4] for line in maps if "memfd:nexus-metrics" in line})


def test_reloads_fold_retired_tables(tmp_path, upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    port = free_port()
    config = obs_config(upstream.url, admin_socket_dir(tmp_path) / "a.sock").replace(
        '"metrics": "127.0.0.1:0"', f'"metrics": "127.0.0.1:{port}"'
    )
    gateway = gateway_factory(config, workers=2)
    address = f"127.0.0.1:{port}"
    master = gateway.process.pid
    for _ in range(30):
        assert request(gateway.url, path="/echo/a") == 200
    config_path = next(tmp_path.glob("nexus-*.yaml"))

    # Each reload adds a route, so each generation gets a metric table of its own.
    for number in range(2, 6):
        route = f"  - {{name: extra{number}, upstream: app, match: {{path_prefix: /extra{number}}}}}\n"
        config_path.write_text(config_path.read_text().replace("routes:\n", "routes:\n" + route))
        os.kill(master, signal.SIGHUP)
        wait_for(lambda n=number: f"generation gone generation={n - 1}" in gateway.log(), 30, message=f"generation {number - 1} gone")
        for _ in range(5):
            assert request(gateway.url, path=f"/extra{number}/b") == 200

    # The four retired tables were folded into one: two stay mapped, not five.
    assert _metric_segments(master) == 2
    safe_2xx = {"method_class": "safe", "status_class": "2xx"}
    wait_for(lambda: total(scrape(address), "nexus_http_requests_total") == 50, 5, message="50 requests counted")
    samples = scrape(address)
    assert value(samples, "nexus_http_requests_total", route="echo", **safe_2xx) == 30
    for number in range(2, 6):
        assert value(samples, "nexus_http_requests_total", route=f"extra{number}", **safe_2xx) == 5
    assert sum(samples["nexus_http_request_duration_seconds_count"].values()) == 50

    # An upgrade hands the folded table to the new master with its counts.
    os.kill(master, signal.SIGUSR2)
    wait_for(lambda: not is_running(master), 30, message="the old master to exit after the upgrade")
    for _ in range(10):
        assert request(gateway.url, path="/echo/c") == 200
    wait_for(lambda: total(scrape(address), "nexus_http_requests_total") == 60, 10, message="60 requests counted")
    assert value(scrape(address), "nexus_http_requests_total", route="echo", **safe_2xx) == 40
