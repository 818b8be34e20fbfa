"""Error responses of a real gateway: RFC 9457 problem bodies, statuses, and recovery.

Every error response the gateway makes itself must be `application/problem+json`
with type, title, status, detail and the request id, and the worker must go
on serving the next request with the same pid.
"""

from __future__ import annotations

import json
import time

import pytest

from conftest import wait_for
from proxy_support import Reply, parse_raw, send, send_raw


def _config(targets: list[str], extra: str = "", upstream_extra: str = "", routes: str = "") -> str:
    target_list = ", ".join(f'"{url}"' for url in targets)
    routes = routes or "  - {name: all, upstream: app}"
    return f"""
listen: ["127.0.0.1:0"]
workers: 1
{extra}
upstreams:
  app:
    targets: [{target_list}]
{upstream_extra}
routes:
{routes}
"""


def _assert_problem(reply: Reply, status: int, kind: str) -> dict:
    """Check that `reply` is the gateway's problem response with `status`, and return the problem."""
    assert reply.status == status, reply
    assert reply.header("content-type") == "application/problem+json", reply.headers
    assert reply.header("x-upstream") is None, "the gateway, not the upstream, must respond"
    problem = json.loads(reply.body)
    assert problem["type"] == f"urn:nexus:problem:{kind}", problem
    assert problem["status"] == status, problem
    assert isinstance(problem["title"], str) and problem["title"], problem
    assert isinstance(problem["detail"], str) and problem["detail"], problem
    assert problem["request_id"] == reply.header("x-request-id"), (problem, reply.headers)
    assert len(reply.body) == int(reply.header("content-length")), reply.headers
    return problem


def _assert_still_serving(gateway) -> None:
    """Check that the worker that returned the error serves a normal request next."""
    reply = send(gateway.url, "/status/200")
    assert reply.status == 200, reply
    assert reply.header("x-upstream") is not None
    assert gateway.serving_pids() == gateway.worker_pids, gateway.log()
    assert "worker crashed" not in gateway.log()
    assert "unhandled error" not in gateway.log()


def test_no_route_is_404(upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    gateway = gateway_factory(
        _config([upstream.url], routes="  - {name: api, upstream: app, match: {host: api.example.com}}"),
        workers=1,
    )

    reply = send(gateway.url, "/missing", headers=[("Host", "other.example.com")])
    with_id = send(gateway.url, "/missing", headers=[("Host", "other.example.com"), ("X-Request-Id", "req-404")])

    problem = _assert_problem(reply, 404, "no_route")
    assert "/missing" in problem["detail"]
    assert _assert_problem(with_id, 404, "no_route")["request_id"] == "req-404"
    assert send(gateway.url, "/x", headers=[("Host", "api.example.com")]).status == 200
    assert gateway.serving_pids() == gateway.worker_pids


def test_refused_connection_is_502(upstream_factory, gateway_factory):
    dead = upstream_factory("dead")
    dead.kill()
    gateway = gateway_factory(_config([dead.url]), workers=1)

    reply = send(gateway.url, "/x")

    problem = _assert_problem(reply, 502, "upstream_connect_failed")
    assert problem["upstream"] == "app"
    assert gateway.serving_pids() == gateway.worker_pids


def test_refused_target_skipped_for_live_one(upstream_factory, gateway_factory):
    dead = upstream_factory("dead")
    live = upstream_factory("live")
    dead.kill()
    gateway = gateway_factory(_config([dead.url, live.url], upstream_extra="    balance: round_robin"), workers=1)

    # A connect failure is retried on the other target, so no request fails.
    answers = [send(gateway.url, "/status/200") for _ in range(6)]

    assert [reply.status for reply in answers] == [200] * 6
    assert {reply.header("x-upstream") for reply in answers} == {"live"}


def test_all_targets_down_is_503(upstream_factory, gateway_factory, tmp_path):
    down_file = tmp_path / "down"
    down_file.write_text("")
    upstream = upstream_factory("app", unhealthy_file=str(down_file))
    health = "    health: {path: /healthz, interval: 50ms, timeout: 50ms, unhealthy_after: 2, healthy_after: 2, fail_open: false}"
    gateway = gateway_factory(_config([upstream.url], upstream_extra=health), workers=1)
    wait_for(lambda: "nexus.health target down " in gateway.log(), 5, message="the target to be marked down")

    reply = send(gateway.url, "/x")

    problem = _assert_problem(reply, 503, "no_healthy_target")
    assert problem["upstream"] == "app"

    # The target comes back once its health checks pass again.
    down_file.unlink()
    wait_for(lambda: "INFO nexus.health target up " in gateway.log(), 5, message="the target to be marked up")
    _assert_still_serving(gateway)


def test_all_targets_down_fails_open(upstream_factory, gateway_factory, tmp_path):
    # The probe path fails while the service itself works: with every
    # target down, requests still go to them (health.fail_open, the default).
    down_file = tmp_path / "down"
    down_file.write_text("")
    upstream = upstream_factory("app", unhealthy_file=str(down_file))
    health = "    health: {path: /healthz, interval: 50ms, timeout: 50ms, unhealthy_after: 2, healthy_after: 2}"
    gateway = gateway_factory(_config([upstream.url], upstream_extra=health), workers=1)
    wait_for(lambda: "nexus.health target down " in gateway.log(), 5, message="the target to be marked down")

    assert send(gateway.url, "/status/200").status == 200
    assert "no target is up: sending requests to all targets" in gateway.log()

    down_file.unlink()
    wait_for(lambda: "INFO nexus.health target up " in gateway.log(), 5, message="the target to be marked up")
    assert send(gateway.url, "/status/200").status == 200
    wait_for(lambda: "a target is up again" in gateway.log(), 5, message="the worker to stop failing open")


def test_slow_upstream_is_504(upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    gateway = gateway_factory(
        _config([upstream.url], upstream_extra="    timeouts: {response_header: 300ms}"),
        workers=1,
    )

    started = time.monotonic()
    reply = send(gateway.url, "/slow?delay=2")
    took = time.monotonic() - started

    _assert_problem(reply, 504, "upstream_timeout")
    assert took < 1.5, f"the 504 took {took:.2f} s with a 300 ms response_header timeout"
    _assert_still_serving(gateway)


def test_declared_body_over_limit_is_413(upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    gateway = gateway_factory(_config([upstream.url], extra="limits: {max_body: 1KiB}"), workers=1)

    over = send(gateway.url, "/upload", method="POST", body=b"x" * 1025)
    at_limit = send(gateway.url, "/upload", method="POST", body=b"x" * 1024)

    problem = _assert_problem(over, 413, "payload_too_large")
    assert "1025" in problem["detail"]
    assert over.header("connection") == "close"
    assert at_limit.status == 200
    assert at_limit.body == b"1024"
    _assert_still_serving(gateway)


def test_declared_body_rejected_before_sent(upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    gateway = gateway_factory(_config([upstream.url], extra="limits: {max_body: 1KiB}"), workers=1)
    head = b"POST /upload HTTP/1.1\r\nHost: example.com\r\nContent-Length: 104857600\r\n\r\n"

    # Only the head is sent, so the response must not wait for 100 MiB of body.
    started = time.monotonic()
    reply = parse_raw(send_raw(gateway.url, head, wait=5))

    _assert_problem(reply, 413, "payload_too_large")
    assert time.monotonic() - started < 2.0
    _assert_still_serving(gateway)


def test_chunked_body_over_limit_is_413(upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    gateway = gateway_factory(_config([upstream.url], extra="limits: {max_body: 1KiB}"), workers=1)

    over = send(gateway.url, "/upload", method="POST", body=iter([b"x" * 512] * 3))
    under = send(gateway.url, "/upload", method="POST", body=iter([b"x" * 512] * 2))

    _assert_problem(over, 413, "payload_too_large")
    assert under.status == 200
    assert under.body == b"1024"
    _assert_still_serving(gateway)


def test_stalled_body_is_408(upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    gateway = gateway_factory(_config([upstream.url], extra="limits: {body_timeout: 500ms}"), workers=1)
    request = b"POST /upload HTTP/1.1\r\nHost: example.com\r\nContent-Length: 100\r\n\r\n" + b"x" * 10

    started = time.monotonic()
    raw = send_raw(gateway.url, request, wait=4)
    took = time.monotonic() - started

    assert raw, f"no response within {took:.1f} s to a body stalled after 10 of 100 bytes"
    problem = _assert_problem(parse_raw(raw), 408, "request_timeout")
    assert "10 bytes" in problem["detail"]
    assert took < 3.0
    _assert_still_serving(gateway)


def test_stalled_chunked_body_is_408(upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    gateway = gateway_factory(_config([upstream.url], extra="limits: {body_timeout: 500ms}"), workers=1)
    request = b"POST /upload HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n"

    started = time.monotonic()
    raw = send_raw(gateway.url, request, wait=4)
    took = time.monotonic() - started

    assert raw, f"no response within {took:.1f} s to a chunked body stalled after 10 bytes"
    _assert_problem(parse_raw(raw), 408, "request_timeout")
    assert took < 3.0
    _assert_still_serving(gateway)


def test_content_length_with_chunked_uses_chunked_and_closes(upstream_factory, gateway_factory):
    # granian 2.8.9 removes Content-Length when Transfer-Encoding is present,
    # before Nexus sees the request, so Nexus cannot answer 400. What reaches
    # the upstream follows RFC 9112 section 6.3: the chunked framing wins and
    # the downstream connection is closed after the response, so no bytes
    # can be smuggled into a next request.
    upstream = upstream_factory("app")
    gateway = gateway_factory(_config([upstream.url]), workers=1)
    request = (
        b"POST /upload HTTP/1.1\r\nHost: example.com\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )

    reply = parse_raw(send_raw(gateway.url, request, wait=5))

    assert reply.status == 200, reply
    assert reply.body == b"5", "the upstream must receive the chunked body, not 3 bytes"
    assert reply.header("connection") == "close", reply
    _assert_still_serving(gateway)


def test_unsupported_transfer_coding_is_501(upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    gateway = gateway_factory(_config([upstream.url]), workers=1)
    request = b"POST /upload HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"

    reply = parse_raw(send_raw(gateway.url, request, wait=5))

    _assert_problem(reply, 501, "unsupported_transfer_coding")
    assert reply.header("x-upstream") is None
    _assert_still_serving(gateway)


def test_invalid_content_length_is_400(upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    gateway = gateway_factory(_config([upstream.url]), workers=1)

    for value in [b"abc", b"-1", b"+5", b"5, 6", b"0x10", b"1e3"]:
        request = b"POST /upload HTTP/1.1\r\nHost: example.com\r\nContent-Length: " + value + b"\r\n\r\nhello"

        reply = parse_raw(send_raw(gateway.url, request, wait=5))

        assert reply.status == 400, value
        assert reply.header("x-upstream") is None, value
        # granian 2.8.9 rejects these itself, before the request reaches Nexus,
        # with an empty body and no problem document.
        assert reply.header("connection") == "close", value
    _assert_still_serving(gateway)


def test_errors_in_a_row_keep_worker(upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    gateway = gateway_factory(
        _config(
            [upstream.url],
            extra="limits: {max_body: 1KiB}",
            routes="  - {name: api, upstream: app, match: {path_prefix: /api}}",
        ),
        workers=1,
    )
    dot_segment = b"GET /api/../x HTTP/1.1\r\nHost: a\r\n\r\n"
    bad_length = b"POST /api/upload HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n"

    for _ in range(3):
        assert send(gateway.url, "/nothing-here").status == 404
        assert send(gateway.url, "/api/upload", method="POST", body=b"x" * 2048).status == 413
        assert send(gateway.url, "/api/upload", method="POST", body=iter([b"x" * 800] * 2)).status == 413
        assert parse_raw(send_raw(gateway.url, dot_segment, wait=5)).status == 400
        assert parse_raw(send_raw(gateway.url, bad_length, wait=5)).status == 400
        ok = send(gateway.url, "/api/status/200")
        assert ok.status == 200
        assert ok.header("x-upstream") == "app"
    assert gateway.serving_pids() == gateway.worker_pids
    assert "unhandled error" not in gateway.log()


@pytest.mark.parametrize(
    "host_lines",
    [b"", b"Host: a.example\r\nHost: b.example\r\n", b"Host: a b\r\n"],
    ids=["missing", "repeated", "invalid"],
)
def test_bad_host_is_400(upstream_factory, gateway_factory, host_lines):
    # RFC 9112 section 3.2: an HTTP/1.1 request needs exactly one valid Host.
    upstream = upstream_factory("app")
    gateway = gateway_factory(_config([upstream.url]), workers=1)
    head = b"GET /status/200 HTTP/1.1\r\n" + host_lines + b"Connection: close\r\n\r\n"

    reply = parse_raw(send_raw(gateway.url, head, wait=5))

    problem = _assert_problem(reply, 400, "bad_request")
    assert "Host" in problem["detail"]
    _assert_still_serving(gateway)
