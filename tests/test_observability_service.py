"""The master-side service over real shared memory: drain, usage, admin routes, reconfigure, /metrics listener."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest

from nexus.config import parse_config
from nexus.observability.access_log import AccessRecorder, Names
from nexus.observability.service import ObservabilityService
from nexus.services import AdminError
from nexus.shm.metrics import MetricLayout
from nexus.shm.state import SharedState
from nexus.telemetry import build_layout

CONFIG = """
listen: ["127.0.0.1:0"]
admin: {metrics: "127.0.0.1:0"}
upstreams: {app: {targets: ["http://127.0.0.1:9001"]}}
routes: [{name: catalog, upstream: app}]
"""


@dataclass
class MasterTables:
    """What the service reads from the master: its config, shared tables, layout and generation."""

    config: object
    shared: SharedState
    metric_layout: MetricLayout
    generation: int = 1


@pytest.fixture
def service():
    config = parse_config(CONFIG)
    layout = build_layout(config)
    shared = SharedState.create(config, 2, layout)
    service = ObservabilityService(MasterTables(config, shared, layout))
    service.start()
    yield service
    service.stop()
    shared.close()


def push(service: ObservabilityService, worker: int, status: int) -> None:
    recorder = AccessRecorder(service.master.shared.rings[worker], Names(service.config))
    assert recorder.record(0, 1_000_000, "GET", status, "catalog", None, None, 10, None, None, None, "req", 0)


def scrape(service: ObservabilityService) -> str:
    with urllib.request.urlopen(f"http://{service.metrics_address}/metrics", timeout=5) as response:
        return response.read().decode()


def test_drain_feeds_usage_and_metrics(service):
    push(service, 0, 200)
    push(service, 1, 503)
    assert service.drain_once() == 2
    usage = service.admin_routes()[("GET", "/usage")]({}, None)
    assert usage["records"] == 2
    assert usage["routes"][0]["errors"] == 1
    text = scrape(service)
    assert "nexus_access_records_total 2.0" in text
    assert 'nexus_http_requests_total{method_class="safe",route="catalog",status_class="2xx"} 0.0' in text


def test_admin_routes_reject_bad_input(service):
    routes = service.admin_routes()
    with pytest.raises(AdminError) as rejected:
        routes[("GET", "/usage")]({"limit": "ten"}, None)
    assert rejected.value.status == 400
    with pytest.raises(AdminError) as no_log:
        routes[("POST", "/access-log/reopen")]({}, None)
    assert no_log.value.status == 409


def test_reconfigure_opens_the_log_and_moves_the_listener(service, tmp_path):
    log_path = tmp_path / "access.log"
    first_address = service.metrics_address
    new = parse_config(CONFIG.replace('metrics: "127.0.0.1:0"', "metrics: null") + f"access_log: {{path: {json.dumps(str(log_path))}}}\n")
    service.reconfigure(new)
    push(service, 0, 200)
    service.drain_once()
    assert json.loads(log_path.read_text())["route"] == "catalog"
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://{first_address}/metrics", timeout=2)


def test_unwritable_log_path_leaves_the_log_off(tmp_path):
    config = parse_config(CONFIG + f"access_log: {{path: {json.dumps(str(tmp_path / 'missing' / 'access.log'))}}}\n")
    layout = build_layout(config)
    shared = SharedState.create(config, 1, layout)
    try:
        assert ObservabilityService(MasterTables(config, shared, layout)).writer is None
    finally:
        shared.close()


@dataclass
class ReloadingMaster(MasterTables):
    """A master in the middle of a reload: each live generation's config, rings and slots."""

    sources: list = None

    def ring_sources(self):
        return list(self.sources)


def test_each_generation_is_named_by_its_own_config(tmp_path):
    # The new config puts a route in front of `catalog`, so route ids shift:
    # an old worker's record read with the new names would say `first`.
    old = parse_config(CONFIG + f"access_log: {{path: {json.dumps(str(tmp_path / 'access.log'))}}}\n")
    new = parse_config(CONFIG.replace("routes: [", "routes: [{name: first, upstream: app, match: {path_prefix: /first}}, ") + f"access_log: {{path: {json.dumps(str(tmp_path / 'access.log'))}}}\n")
    layout = build_layout(old)
    shared = SharedState.create(old, 4, layout)
    master = ReloadingMaster(old, shared, layout, sources=[(old, shared.rings, range(0, 2)), (new, shared.rings, range(2, 4))])
    service = ObservabilityService(master)
    try:
        AccessRecorder(shared.rings[0], Names(old)).record(0, 1, "GET", 200, "catalog", None, None, 1, None, None, None, "a", 0)
        AccessRecorder(shared.rings[2], Names(new)).record(0, 1, "GET", 200, "first", None, None, 1, None, None, None, "b", 0)
        assert service.drain_once() == 2

        # The old generation retires; what its worker pushed just before it
        # exited is drained once more after it left the master's list.
        AccessRecorder(shared.rings[1], Names(old)).record(0, 1, "GET", 200, "catalog", None, None, 1, None, None, None, "c", 0)
        master.sources = master.sources[1:]
        assert service.drain_once() == 1
        AccessRecorder(shared.rings[1], Names(old)).record(0, 1, "GET", 200, "catalog", None, None, 1, None, None, None, "d", 0)
        assert service.drain_once() == 0
    finally:
        service.stop()
        shared.close()

    lines = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    assert [(line["request_id"], line["route"]) for line in lines] == [("a", "catalog"), ("b", "first"), ("c", "catalog")]
