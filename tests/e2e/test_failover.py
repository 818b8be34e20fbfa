"""Failover between upstream targets: active health checks, passive ejection, retries.

Two targets sit behind round_robin. The tests kill a target's process or
make its health endpoint fail, and watch from a steady-rate client which
target responds and whether any request fails.
"""

from __future__ import annotations

import re
import time

from conftest import wait_for
from lifecycle_support import ServiceUnavailableUpstream, SteadyClient, gateway_config, get, summarize

HEALTH = "health: {path: /healthz, interval: 250ms, timeout: 100ms, unhealthy_after: 2, healthy_after: 2}"
# Passive ejection that never triggers in these tests, so only the active checks move targets.
NO_PASSIVE = "passive: {consecutive_failures: 1000, eject_for: 1s}"


def _log_has(gateway, pattern: str) -> bool:
    return re.search(pattern, gateway.log()) is not None


def _retry_lines(log: str, target: str) -> int:
    return len(re.findall(rf"retrying upstream=app target={re.escape(target)} ", log))


def test_killed_target_stops_failing_within_1s(upstream_factory, gateway_factory, record_property):
    a = upstream_factory("a")
    b = upstream_factory("b")
    settings = f"{HEALTH}, {NO_PASSIVE}, retries: {{attempts: 0}}"
    gateway = gateway_factory(gateway_config([a.url, b.url], upstream_settings=settings))

    with SteadyClient(gateway.addresses[0], rate=50) as client:
        time.sleep(0.5)
        killed_at = time.monotonic()
        b.kill()
        wait_for(
            lambda: _log_has(gateway, rf"target down upstream=app target={re.escape(b.url)} "),
            timeout=1.0,
            message=f"'target down' for {b.url} within 1 s of its kill",
        )
        record_property("target_down_after_s", round(time.monotonic() - killed_at, 3))
        time.sleep(1.5)
    records = client.records

    before = [record for record in records if record.finished < killed_at]
    assert before and all(record.status == 200 for record in before), summarize(before)
    assert {record.upstream for record in before} == {"a", "b"}, "both targets should serve before the kill"

    failures = [record for record in records if record.finished >= killed_at and record.status != 200]
    last_failure = max((record.started - killed_at for record in failures), default=0.0)
    record_property("failures", len(failures))
    record_property("last_failure_after_s", round(last_failure, 3))
    assert last_failure < 1.0, (
        f"requests still failed {last_failure:.3f} s after the kill ({len(failures)} failures, {summarize(records)})"
    )
    settled = [record for record in records if record.started >= killed_at + 1.0]
    assert len(settled) >= 25, f"too few requests after the target went down: {summarize(records)}"
    assert all(record.status == 200 and record.upstream == "a" for record in settled), summarize(settled)
    assert gateway.stop() == 0


def test_killed_target_no_failures_with_retries(upstream_factory, gateway_factory, record_property):
    a = upstream_factory("a")
    b = upstream_factory("b")
    gateway = gateway_factory(gateway_config([a.url, b.url], upstream_settings=HEALTH))

    with SteadyClient(gateway.addresses[0], rate=50) as client:
        time.sleep(0.5)
        b.kill()
        time.sleep(1.0)
        retries_after_1s = _retry_lines(gateway.log(), b.url)
        time.sleep(1.0)
        retries_after_2s = _retry_lines(gateway.log(), b.url)
    records = client.records
    record_property("retries_to_dead_target", retries_after_2s)

    not_ok = [record for record in records if record.status != 200 or record.first_error]
    assert not not_ok, f"requests failed although connect failures are retried ({summarize(records)}): {not_ok[:5]}"
    assert len(records) >= 100, f"the client sent too few requests to judge: {summarize(records)}"
    assert retries_after_2s == retries_after_1s, (
        f"requests still went to the dead target more than 1 s after the kill: "
        f"{retries_after_1s} retries logged after 1 s, {retries_after_2s} after 2 s"
    )
    assert gateway.stop() == 0


def test_restarted_target_logged_down_then_up(upstream_factory, gateway_factory):
    a = upstream_factory("a")
    b = upstream_factory("b")
    gateway = gateway_factory(gateway_config([a.url, b.url], upstream_settings=f"{HEALTH}, {NO_PASSIVE}"))

    b.kill()
    down = rf"target down upstream=app target={re.escape(b.url)} failures=2 reason="
    wait_for(lambda: _log_has(gateway, down), timeout=1.0, message=f"'target down' for {b.url}")
    assert not _log_has(gateway, rf"target down upstream=app target={re.escape(a.url)} "), gateway.log()

    upstream_factory("b", port=b.port)
    restarted_at = time.monotonic()
    up = rf"target up upstream=app target={re.escape(b.url)} successes=2"
    wait_for(lambda: _log_has(gateway, up), timeout=1.5, message=f"'target up' for {b.url}")

    # Back in rotation: round robin over two healthy targets reaches b within a few requests.
    seen = {get(gateway.addresses[0], "/status/200")[1] for _ in range(8)}
    assert "b" in seen, f"b served no request {time.monotonic() - restarted_at:.2f} s after its restart: {seen}"
    assert gateway.stop() == 0


def test_unhealthy_file_takes_target_out(upstream_factory, gateway_factory, tmp_path, record_property):
    marker = tmp_path / "b-unhealthy"
    a = upstream_factory("a")
    b = upstream_factory("b", unhealthy_file=str(marker))
    gateway = gateway_factory(gateway_config([a.url, b.url], upstream_settings=f"{HEALTH}, {NO_PASSIVE}"))

    with SteadyClient(gateway.addresses[0], rate=50) as client:
        time.sleep(0.5)
        marked_at = time.monotonic()
        marker.touch()
        time.sleep(2.0)
        marker.unlink()
        cleared_at = time.monotonic()
        wait_for(
            lambda: any(record.upstream == "b" and record.started > cleared_at for record in client.records),
            timeout=2.0,
            message="a response from b after its unhealthy file was removed",
        )
    records = client.records

    assert all(record.status == 200 for record in records), summarize(records)
    from_b_while_marked = [
        record.started - marked_at for record in records if record.upstream == "b" and marked_at <= record.started < cleared_at
    ]
    left_after = max(from_b_while_marked, default=0.0)
    assert left_after < 1.0, f"b still served requests {left_after:.3f} s after its unhealthy file appeared"
    returned_after = min(record.started - cleared_at for record in records if record.upstream == "b" and record.started > cleared_at)
    record_property("left_after_s", round(left_after, 3))
    record_property("returned_after_s", round(returned_after, 3))
    assert returned_after < 1.5, f"b came back only {returned_after:.3f} s after its unhealthy file was removed"
    assert _log_has(gateway, rf"target down upstream=app target={re.escape(b.url)} failures=2 reason=status 503")
    assert _log_has(gateway, rf"target up upstream=app target={re.escape(b.url)} successes=2")
    assert gateway.stop() == 0


def test_passive_ejection_of_503_target(upstream_factory, gateway_factory):
    a = upstream_factory("a")
    with ServiceUnavailableUpstream("bad") as bad:
        # One worker, so that one passive-failure counter counts every request.
        settings = "passive: {consecutive_failures: 2, eject_for: 2s}"
        gateway = gateway_factory(gateway_config([a.url, bad.url], workers=1, upstream_settings=settings), workers=1)
        address = gateway.addresses[0]

        started = time.monotonic()
        first = [get(address, "/status/200")[0] for _ in range(20)]
        first_took = time.monotonic() - started
        assert first_took < 1.5, f"20 requests took {first_took:.2f} s, too close to eject_for to judge"
        assert first.count(503) == 2, f"expected exactly 2 responses of 503 before the ejection: {first}"
        assert first[:4].count(503) == 2, f"the 503s should come among the first requests: {first}"
        assert all(status == 200 for status in first[4:]), f"the 503 target was not ejected: {first}"
        assert bad.requests == 2

        ejected = (
            rf"ejected target worker=0 upstream=app target={re.escape(bad.url)} reason=status 503 eject_for_s=2\.000"
        )
        assert _log_has(gateway, ejected), gateway.log()

        # The ejection ends after eject_for, and the target gets requests again.
        time.sleep(2.2 - (time.monotonic() - started))
        later = [get(address, "/status/200")[0] for _ in range(4)]
        assert later.count(503) >= 1, f"the 503 target did not return after eject_for: {later}"
        assert gateway.stop() == 0


def test_passive_ejection_of_killed_target(upstream_factory, gateway_factory):
    a = upstream_factory("a")
    b = upstream_factory("b")
    settings = "passive: {consecutive_failures: 2, eject_for: 2s}"
    gateway = gateway_factory(gateway_config([a.url, b.url], workers=1, upstream_settings=settings), workers=1)
    address = gateway.addresses[0]

    b.kill()
    statuses = [get(address, "/status/200") for _ in range(10)]
    assert all(status == 200 for status, _ in statuses), statuses
    assert {upstream for _, upstream in statuses} == {"a"}, statuses

    log = gateway.log()
    assert re.search(rf"ejected target worker=0 upstream=app target={re.escape(b.url)} reason=connect failure ", log), log
    assert len(re.findall(rf"retrying upstream=app target={re.escape(b.url)} ", log)) == 2, (
        f"expected 2 retries before the ejection:\n{log}"
    )
    assert gateway.stop() == 0
