"""The access log, usage and nexusctl top through a real gateway: fields, sampling, errors, reopening."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nexus.admin.client import AdminClient
from nexus.auth import hash_key
from tests.conftest import admin_socket_dir, wait_for
from tests.e2e.obs_support import metrics_address, obs_config, request, scrape, value
from tests.e2e.proxy_support import echoed_headers, send

pytestmark = pytest.mark.e2e

KEY = "nx_obs-e2e-key-0000000000000000000000000000000"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
CONSUMERS = f"""
consumers:
  acme: {{keys: [{json.dumps(hash_key(KEY))}]}}
"""
NEXUSCTL = [sys.executable, "-c", "from nexus.cli import nexusctl; nexusctl()"]


def lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def keyed_config(upstream_url: str, socket: Path, access_log: dict) -> str:
    config = obs_config(upstream_url, socket, metrics=False, access_log=json.dumps(access_log), extra=CONSUMERS)
    # The echo route requires the API key, and the status route is public.
    return config.replace("match: {path_prefix: /echo}}", "match: {path_prefix: /echo}, auth: api_key}")


def test_records_carry_every_field(tmp_path, upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    log_path = tmp_path / "access.log"
    gateway = gateway_factory(keyed_config(upstream.url, admin_socket_dir(tmp_path) / "a.sock", {"path": str(log_path)}))

    headers = [("x-api-key", KEY), ("x-request-id", "req-e2e-1"), ("traceparent", TRACEPARENT), ("tracestate", "v=1")]
    result = send(gateway.url, "/echo/item", headers=headers)
    assert result.status == 200
    assert echoed_headers(result.json(), "traceparent") == [TRACEPARENT]
    assert echoed_headers(result.json(), "tracestate") == ["v=1"]
    anonymous = send(gateway.url, "/status/503")
    assert anonymous.status == 503

    wait_for(lambda: len(lines(log_path)) == 2, 5, message="two access log lines")
    first, second = sorted(lines(log_path), key=lambda line: line["status"])
    assert first["request_id"] == "req-e2e-1"
    assert first["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert first["consumer"] == "acme"
    assert first["route"] == "echo"
    assert first["method"] == "GET"
    assert first["target"] == upstream.url
    assert first["status"] == 200
    assert first["bytes"] == int(result.header("content-length"))
    assert 0 < first["upstream_s"] <= first["duration_s"] < 5
    assert first["rate_limit"] is None
    assert first["cache"] is None
    assert first["time"].endswith("Z")

    assert second["status"] == 503
    assert second["route"] == "status"
    assert second["consumer"] is None
    # No traceparent came in: the gateway made one and logged its trace id.
    assert len(second["trace_id"]) == 32
    assert second["trace_id"] != first["trace_id"]
    assert second["request_id"] == anonymous.header("x-request-id")
    # With no request id sent, the trace id is the request id.
    assert second["request_id"] == second["trace_id"]


def test_access_log_to_stderr(tmp_path, upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    gateway = gateway_factory(keyed_config(upstream.url, admin_socket_dir(tmp_path) / "a.sock", {"path": "-"}))
    assert send(gateway.url, "/status/204", headers=[("x-request-id", "to-stderr")]).status == 204

    def logged() -> list[dict]:
        return [json.loads(line) for line in gateway.log().splitlines() if line.startswith('{"time":')]

    wait_for(lambda: len(logged()) == 1, 5, message="one access log line among the master's output")
    [line] = logged()
    assert (line["request_id"], line["status"], line["route"]) == ("to-stderr", 204, "status")


def test_cached_route_records_the_target_and_its_duration(tmp_path, upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    log_path = tmp_path / "access.log"
    cached = "  - {name: cached, upstream: app, match: {path_prefix: /echo/cached}, cache: {}}\n"
    config = obs_config(upstream.url, admin_socket_dir(tmp_path) / "a.sock", access_log=json.dumps({"path": str(log_path)}))
    gateway = gateway_factory(config.replace("routes:\n", "routes:\n" + cached))

    assert request(gateway.url, path="/echo/cached/one") == 200
    wait_for(lambda: len(lines(log_path)) == 1, 5, message="one access log line")
    [line] = lines(log_path)
    assert line["route"] == "cached"
    assert line["cache"] is not None
    assert line["target"] == upstream.url
    assert line["upstream_s"] is not None
    samples = scrape(metrics_address(gateway.log()))
    assert value(samples, "nexus_upstream_request_duration_seconds_count", upstream="app", target=upstream.url) == 1


def test_sampling_keeps_errors_and_usage_counts_all(tmp_path, upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    log_path = tmp_path / "access.log"
    socket = admin_socket_dir(tmp_path) / "a.sock"
    settings = {"path": str(log_path), "sample": "0%", "always_log_errors": True}
    gateway = gateway_factory(keyed_config(upstream.url, socket, settings))

    for _ in range(40):
        assert request(gateway.url, path="/echo/x", headers={"x-api-key": KEY}) == 200
    for _ in range(6):
        assert request(gateway.url, path="/status/500") == 500
    for _ in range(3):
        assert request(gateway.url, path="/echo/x") == 401

    # The master drains the rings every 100 ms: wait until it has read all 49 records.
    client = AdminClient(str(socket))
    wait_for(lambda: client.call("GET", "/usage")["records"] == 49, 5, message="49 records in usage")
    top = subprocess.run([*NEXUSCTL, "top", "--once", "--json", "--socket", str(socket)], capture_output=True, text=True, timeout=30)
    assert top.returncode == 0, top.stderr
    usage = json.loads(top.stdout)
    assert [line["status"] for line in lines(log_path)] == [500] * 6
    consumers = {row["name"]: row for row in usage["consumers"]}
    assert consumers["acme"]["requests"] == 40
    assert consumers["acme"]["errors"] == 0
    assert consumers["(anonymous)"]["requests"] == 9
    assert consumers["(anonymous)"]["errors"] == 6
    assert consumers["(anonymous)"]["client_errors"] == 3
    routes = {row["name"]: row for row in usage["routes"]}
    assert routes["echo"]["requests"] == 43
    assert routes["status"]["requests"] == 6
    assert routes["echo"]["latency_s"]["p50"] > 0

    # --once reads twice, --interval apart, and shows the rate between: requests sent meanwhile count.
    table = subprocess.Popen([*NEXUSCTL, "top", "--once", "--interval", "2", "--socket", str(socket)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    for _ in range(10):
        assert request(gateway.url, path="/echo/x", headers={"x-api-key": KEY}) == 200
    out, err = table.communicate(timeout=30)
    assert table.returncode == 0, err
    assert "rates over the last 2." in out
    acme = next(line.split() for line in out.splitlines() if line.startswith("acme"))
    assert float(acme[1]) > 0
    for name in ("(anonymous)", "echo"):
        assert name in out


def test_reopen_on_sigusr1_and_nexusctl(tmp_path, upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    log_path = tmp_path / "access.log"
    socket = admin_socket_dir(tmp_path) / "a.sock"
    gateway = gateway_factory(keyed_config(upstream.url, socket, {"path": str(log_path)}))

    request(gateway.url, path="/status/200")
    wait_for(lambda: len(lines(log_path)) == 1, 5, message="the first line")
    log_path.rename(tmp_path / "access.log.1")
    os.kill(gateway.process.pid, signal.SIGUSR1)
    wait_for(lambda: "access log reopened" in gateway.log(), 5, message="the reopen")
    request(gateway.url, path="/status/201")
    wait_for(lambda: len(lines(log_path)) == 1, 5, message="a line in the new file")
    assert lines(log_path)[0]["status"] == 201
    assert len(lines(tmp_path / "access.log.1")) == 1

    log_path.rename(tmp_path / "access.log.2")
    reopen = subprocess.run(
        [*NEXUSCTL, "access-log", "reopen", "--socket", str(socket)], capture_output=True, text=True, timeout=30
    )
    assert reopen.returncode == 0, reopen.stderr
    request(gateway.url, path="/status/202")
    wait_for(lambda: len(lines(log_path)) == 1, 5, message="a line in the newest file")
    assert lines(log_path)[0]["status"] == 202
    assert gateway.process.poll() is None


def test_reload_rejects_unwritable_access_log(tmp_path, upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    log_path = tmp_path / "access.log"
    socket = admin_socket_dir(tmp_path) / "a.sock"
    gateway = gateway_factory(keyed_config(upstream.url, socket, {"path": str(log_path)}))
    before = AdminClient(str(socket)).call("GET", "/status")

    missing = tmp_path / "no-such-dir" / "access.log"
    gateway.config_path.write_text(keyed_config(upstream.url, socket, {"path": str(missing)}))
    reload = subprocess.run([*NEXUSCTL, "reload", "--socket", str(socket)], capture_output=True, text=True, timeout=30)

    assert reload.returncode != 0
    assert "access_log.path" in reload.stderr
    assert str(missing) in reload.stderr
    # The running generation keeps serving and logging where it did.
    after = AdminClient(str(socket)).call("GET", "/status")
    assert after["generation"] == before["generation"]
    assert [worker["pid"] for worker in after["workers"]] == [worker["pid"] for worker in before["workers"]]
    request(gateway.url, path="/status/200")
    wait_for(lambda: len(lines(log_path)) == 1, 5, message="a line in the old access log")
