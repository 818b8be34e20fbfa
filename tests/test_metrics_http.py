"""The /metrics listener serves GET and HEAD on /metrics, and problem documents elsewhere."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from nexus.observability.metrics_http import MetricsServer, start_metrics_server


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    registry = CollectorRegistry()
    Counter("nexus_test_events", "Events counted by the test.", registry=registry).inc(3)
    server = start_metrics_server("127.0.0.1", 0, registry)
    yield server
    server.shutdown()
    server.server_close()


def request(server: MetricsServer, method: str, path: str) -> tuple[http.client.HTTPResponse, bytes]:
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=5)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response, response.read()
    finally:
        connection.close()


def test_get_serves_the_registry(server: MetricsServer) -> None:
    response, body = request(server, "GET", "/metrics")
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/plain")
    assert b"nexus_test_events_total 3.0" in body


def test_head_matches_get_without_body(server: MetricsServer) -> None:
    _, get_body = request(server, "GET", "/metrics")
    response, body = request(server, "HEAD", "/metrics")
    assert response.status == 200
    assert body == b""
    assert int(response.getheader("Content-Length")) == len(get_body)
    assert response.getheader("Content-Type").startswith("text/plain")


@pytest.mark.parametrize("path", ["/", "/metric", "/metrics/", "/favicon.ico"])
def test_other_paths_get_a_404_problem(server: MetricsServer, path: str) -> None:
    response, body = request(server, "GET", path)
    assert response.status == 404
    assert response.getheader("Content-Type") == "application/problem+json"
    problem = json.loads(body)
    assert problem["status"] == 404
    assert "/metrics" in problem["detail"]
    assert repr(path) in problem["detail"]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_get_a_405_problem_with_allow(server: MetricsServer, method: str) -> None:
    response, body = request(server, method, "/metrics")
    assert response.status == 405
    assert response.getheader("Allow") == "GET, HEAD"
    assert method in json.loads(body)["detail"]


def test_serves_on_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.fail("this machine has no IPv6; the gateway's listeners need ::1 in other tests too")
    server = start_metrics_server("::1", 0, CollectorRegistry())
    try:
        response, _ = request(server, "GET", "/metrics")
        assert response.status == 200
    finally:
        server.shutdown()
        server.server_close()


def test_address_in_use_raises_oserror(server: MetricsServer) -> None:
    with pytest.raises(OSError):
        start_metrics_server("127.0.0.1", server.server_address[1], CollectorRegistry())
