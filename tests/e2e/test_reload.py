"""Config reload under load: SIGHUP and the admin API's POST /reload on a real gateway.

Each test runs `nexus run` with real workers, a real upstream and real
signals on 127.0.0.1. A reload starts a new worker generation on the same
sockets, waits until it serves, and drains the old one; these tests check
that no request is lost on the way, that a request in flight finishes,
that a bad config changes nothing, and that listen addresses and
rate-limit state follow the config across reloads.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import wait_for
from lifecycle_support import LoadClient, assert_no_request_failed, child_pids, get, host_port, signal_and_wait, wait_gone

from nexus.admin import AdminClient, AdminClientError

pytestmark = pytest.mark.e2e

RELOADED = "reload done"
REJECTED = "reload failed"


def _config(upstream_url: str, *, extra_route: bool = False, listen: str = '"127.0.0.1:0"', routes: str = "") -> str:
    """Two workers, one upstream; `extra_route` adds a route, which changes the metric layout."""
    lines = [
        f"listen: [{listen}]",
        "workers: 2",
        "shutdown_timeout: 10s",
        "reload_timeout: 10s",
        "upstreams:",
        f'  app: {{targets: ["{upstream_url}"]}}',
        "routes:",
    ]
    if extra_route:
        lines.append("  - {name: extra, upstream: app, match: {path_prefix: /extra}}")
    lines.append(routes or "  - {name: all, upstream: app}")
    return "\n".join(lines) + "\n"


def _rewrite(gateway, config_yaml: str) -> None:
    """Replace the gateway's config file, keeping the admin section the fixture added."""
    admin = [line for line in gateway.config_path.read_text().splitlines() if line.startswith("admin:")]
    gateway.config_path.write_text(config_yaml + "\n".join(admin) + "\n")


def _admin(gateway) -> AdminClient:
    text = gateway.config_path.read_text()
    path = text.split("admin: {socket: ", 1)[1].split(",", 1)[0].strip('"')
    return AdminClient(path, timeout=60)


def test_twenty_reloads_lose_no_request(upstream_factory, gateway_factory, record_property):
    upstream = upstream_factory("a")
    gateway = gateway_factory(_config(upstream.url))
    admin = _admin(gateway)
    first_workers = set(child_pids(gateway.process.pid))

    with LoadClient(gateway.addresses[0], concurrency=4) as load:
        wait_for(lambda: len(load.records) > 20, 10, message="load to start")
        for number in range(20):
            # Every other reload changes the routes, and with them the metric layout.
            _rewrite(gateway, _config(upstream.url, extra_route=number % 2 == 0))
            if number % 2 == 0:
                outcome = signal_and_wait(gateway.log, gateway.process.pid, signal.SIGHUP, (RELOADED, REJECTED))
                assert outcome == RELOADED, gateway.log()[-3000:]
            else:
                result = admin.call("POST", "/reload")
                assert result["generation"] == number + 2, result
        time.sleep(0.5)
    records = load.records

    # Raw resets (the retry hid them) are reported, not asserted: a
    # connection that an old worker accepted in the instant before its stop
    # can be closed before its request is read (docs/architecture.md).
    summary = assert_no_request_failed(records, "20 reloads under load", record_property)
    assert sum(1 for record in records if record.method == "POST") > 50, summary

    status = admin.call("GET", "/status")
    assert status["generation"] == 21
    assert status["reloads"] == 20
    assert {worker["generation"] for worker in status["workers"]} == {21}, status["workers"]
    # Older generations drain and leave only the two workers of the last one.
    wait_for(lambda: len(child_pids(gateway.process.pid)) == 2, 15, message="old generations to exit")
    assert not first_workers & set(child_pids(gateway.process.pid))
    assert gateway.stop() == 0


def test_reloads_reset_no_new_connection(upstream_factory, gateway_factory, record_property):
    # A worker of the old generation must stop accepting when its drain
    # starts: a connection it accepted at its stop would be closed before
    # its request was read, which a client sees as a reset it cannot tell
    # from a lost request.
    upstream = upstream_factory("a")
    gateway = gateway_factory(_config(upstream.url))
    with LoadClient(gateway.addresses[0], concurrency=6) as load:
        wait_for(lambda: len(load.records) > 20, 10, message="load to start")
        for _ in range(15):
            outcome = signal_and_wait(gateway.log, gateway.process.pid, signal.SIGHUP, (RELOADED, REJECTED))
            assert outcome == RELOADED, gateway.log()[-3000:]
            # Past the old generation's stop, where the resets happened.
            time.sleep(0.8)
    records = load.records

    summary = assert_no_request_failed(records, "15 reloads, raw resets", record_property)
    fresh = [record for record in records if not record.keep_alive]
    assert len(fresh) > 1000, summary
    assert [record.first_error for record in fresh if record.first_error] == [], summary


def test_long_request_finishes_during_reload(upstream_factory, gateway_factory):
    upstream = upstream_factory("a")
    gateway = gateway_factory(_config(upstream.url))
    old_workers = child_pids(gateway.process.pid)
    outcome: dict[str, object] = {}

    def slow_request() -> None:
        started = time.monotonic()
        try:
            outcome["status"] = get(gateway.addresses[0], "/slow?delay=5", timeout=15)[0]
        except Exception as exc:  # noqa: BLE001 - the test reports whatever happened
            outcome["error"] = repr(exc)
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.5)
    assert signal_and_wait(gateway.log, gateway.process.pid, signal.SIGHUP, (RELOADED, REJECTED)) == RELOADED
    # The new generation serves while the old one finishes the slow request.
    assert get(gateway.addresses[0], "/echo")[0] == 200
    thread.join(20)

    assert outcome.get("status") == 200, outcome
    assert outcome["seconds"] >= 4.5, outcome
    assert wait_gone(old_workers, 10) == []


def test_client_that_gave_up_is_logged_plainly(upstream_factory, gateway_factory):
    # A reload waits while an older generation drains a slow request; a
    # nexusctl that stops waiting first must leave one log line, no traceback.
    upstream = upstream_factory("a")
    gateway = gateway_factory(_config(upstream.url))
    slow = threading.Thread(target=lambda: get(gateway.addresses[0], "/slow?delay=3", timeout=15))
    slow.start()
    time.sleep(0.3)
    assert signal_and_wait(gateway.log, gateway.process.pid, signal.SIGHUP, (RELOADED, REJECTED)) == RELOADED

    impatient = AdminClient(_admin(gateway).path, timeout=0.5)
    with pytest.raises(AdminClientError):
        impatient.call("POST", "/reload")
    slow.join(20)
    wait_for(lambda: "admin client left before the response" in gateway.log(), 15, message="the abandoned reload to be logged")
    assert "Traceback" not in gateway.log()
    assert admin_generation(gateway) == 3


def admin_generation(gateway) -> int:
    return _admin(gateway).call("GET", "/status")["generation"]


def test_invalid_config_changes_nothing(upstream_factory, gateway_factory):
    upstream = upstream_factory("a")
    gateway = gateway_factory(_config(upstream.url))
    admin = _admin(gateway)
    workers = child_pids(gateway.process.pid)
    _rewrite(gateway, _config(upstream.url).replace("workers: 2", "wrokers: 2"))

    with pytest.raises(AdminClientError) as raised:
        admin.call("POST", "/reload")
    message = str(raised.value)
    assert raised.value.status == 422, message
    assert f"invalid config {gateway.config_path}: wrokers: unknown key" in message
    assert "generation 1 keeps serving" in message

    # SIGHUP takes the same path and logs the same message.
    assert signal_and_wait(gateway.log, gateway.process.pid, signal.SIGHUP, (RELOADED, REJECTED)) == REJECTED
    assert "wrokers: unknown key" in gateway.log().split(REJECTED)[-1]

    assert child_pids(gateway.process.pid) == workers
    assert get(gateway.addresses[0], "/echo")[0] == 200
    status = admin.call("GET", "/status")
    assert (status["generation"], status["reloads"], status["reloads_failed"]) == (1, 0, 2)


def test_empty_config_changes_nothing(upstream_factory, gateway_factory):
    # A config file truncated by an editor or a deploy must not become a
    # gateway with no routes on every interface.
    upstream = upstream_factory("a")
    gateway = gateway_factory(_config(upstream.url))
    admin = _admin(gateway)
    workers = child_pids(gateway.process.pid)
    gateway.config_path.write_text("")

    with pytest.raises(AdminClientError) as raised:
        admin.call("POST", "/reload")
    assert raised.value.status == 422, str(raised.value)
    assert "the config is empty" in str(raised.value)
    assert child_pids(gateway.process.pid) == workers
    assert get(gateway.addresses[0], "/echo")[0] == 200
    assert admin.call("GET", "/status")["generation"] == 1


def test_listen_address_added_then_removed(upstream_factory, gateway_factory):
    upstream = upstream_factory("a")
    gateway = gateway_factory(_config(upstream.url))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    first = gateway.addresses[0]

    _rewrite(gateway, _config(upstream.url, listen=f'"127.0.0.1:0", "127.0.0.1:{port}"'))
    assert signal_and_wait(gateway.log, gateway.process.pid, signal.SIGHUP, (RELOADED, REJECTED)) == RELOADED
    # The port-0 address keeps its socket, so its port does not change.
    assert get(first, "/echo")[0] == 200
    assert get(f"127.0.0.1:{port}", "/echo")[0] == 200

    _rewrite(gateway, _config(upstream.url))
    assert signal_and_wait(gateway.log, gateway.process.pid, signal.SIGHUP, (RELOADED, REJECTED)) == RELOADED
    wait_for(lambda: f"listener closed address=127.0.0.1:{port}" in gateway.log(), 15, message="the removed listener to close")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(host_port(f"127.0.0.1:{port}"), timeout=2).close()
    assert get(first, "/echo")[0] == 200


def test_rate_limit_state_survives_reload(upstream_factory, gateway_factory):
    upstream = upstream_factory("a")
    limited = "  - {name: limited, upstream: app, rate_limit: {rate: 1/min, burst: 3}}"
    gateway = gateway_factory(_config(upstream.url, routes=limited))
    url = f"http://{gateway.addresses[0]}/echo"
    assert [_status(url) for _ in range(3)] == [200, 200, 200]

    # A reload that changes another part of the config keeps the limiter's state.
    _rewrite(gateway, _config(upstream.url, routes=limited, extra_route=True))
    assert signal_and_wait(gateway.log, gateway.process.pid, signal.SIGHUP, (RELOADED, REJECTED)) == RELOADED
    assert _status(url) == 429


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_drain_then_resume(upstream_factory, gateway_factory):
    upstream = upstream_factory("a")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # A fixed port: resume binds the listen addresses again.
    gateway = gateway_factory(_config(upstream.url, listen=f'"127.0.0.1:{port}"'))
    admin = _admin(gateway)
    workers = child_pids(gateway.process.pid)

    drained = admin.call("POST", "/drain")
    assert drained["state"] == "drained", drained
    # Refused at once, not after the workers have finished.
    wait_for(lambda: _refused(port), 0.3, interval=0.01, message="the drained gateway to refuse connections")
    assert wait_gone(workers, 15) == []
    assert _refused(port)
    assert admin.call("GET", "/status")["state"] == "drained"
    with pytest.raises(AdminClientError) as raised:
        admin.call("POST", "/reload")
    assert "resume it first" in str(raised.value)

    resumed = admin.call("POST", "/resume")
    assert (resumed["state"], resumed["generation"]) == ("running", 2), resumed
    assert get(f"127.0.0.1:{port}", "/echo")[0] == 200
    assert len(child_pids(gateway.process.pid)) == 2
    assert gateway.stop() == 0


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False
