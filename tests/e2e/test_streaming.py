"""Streaming through the gateway keeps worker memory bounded.

A 1 GiB download and a 1 GiB chunked upload pass through a worker while a
thread samples VmRSS of every worker. A slow reader of a 200 MiB download
must not make the worker buffer what the reader has not taken. Measured
numbers are in the assertion messages and in the `record_property` values
(shown in a JUnit XML report, for example with `--junitxml`).
"""

from __future__ import annotations

import http.client
import socket
import time

import pytest
from lifecycle_support import RssSampler, gateway_config, get, host_port

pytestmark = pytest.mark.slow

MiB = 1 << 20
GiB = 1 << 30
TRANSFER_SIZE = 1 * GiB
# Bound on a worker's RSS growth during a full-speed transfer.
MAX_GROWTH = 64 * MiB
# Bound on a worker's RSS growth while a downstream reads slowly.
MAX_SLOW_READER_GROWTH = 32 * MiB
READ_SIZE = 1 * MiB


def _start(upstream_factory, gateway_factory):
    upstream = upstream_factory("a")
    gateway = gateway_factory(gateway_config([upstream.url], workers=2, max_body="2GiB"))
    # Warm both workers up, so that first-request allocations do not count as growth.
    for _ in range(6):
        assert get(gateway.addresses[0], "/bytes?n=1048576")[0] == 200
    return gateway


def _upload_chunks(total: int, chunk_size: int = MiB):
    chunk = b"y" * chunk_size
    remaining = total
    while remaining:
        size = min(remaining, chunk_size)
        yield chunk if size == chunk_size else chunk[:size]
        remaining -= size


def test_large_download_bounded_memory(upstream_factory, gateway_factory, record_property):
    gateway = _start(upstream_factory, gateway_factory)
    host, port = host_port(gateway.addresses[0])

    with RssSampler(list(gateway.worker_pids.values())) as sampler:
        connection = http.client.HTTPConnection(host, port, timeout=30)
        started = time.monotonic()
        connection.request("GET", f"/bytes?n={TRANSFER_SIZE}")
        response = connection.getresponse()
        received = 0
        wrong_bytes = 0
        while chunk := response.read(READ_SIZE):
            received += len(chunk)
            wrong_bytes += len(chunk) - chunk.count(b"x")
        seconds = time.monotonic() - started
        connection.close()

    growth = max(sampler.growth().values())
    record_property("seconds", round(seconds, 2))
    record_property("rss", sampler.report())
    assert response.status == 200
    assert received == TRANSFER_SIZE, f"received {received} of {TRANSFER_SIZE} bytes"
    assert wrong_bytes == 0, f"{wrong_bytes} received bytes are not the upstream's b'x'"
    assert growth < MAX_GROWTH, (
        f"worker RSS grew by {growth / MiB:.1f} MiB during a {TRANSFER_SIZE / GiB:g} GiB download "
        f"in {seconds:.1f} s: {sampler.report()}"
    )
    assert gateway.stop() == 0


def test_large_upload_bounded_memory(upstream_factory, gateway_factory, record_property):
    gateway = _start(upstream_factory, gateway_factory)
    host, port = host_port(gateway.addresses[0])

    with RssSampler(list(gateway.worker_pids.values())) as sampler:
        connection = http.client.HTTPConnection(host, port, timeout=30)
        started = time.monotonic()
        connection.request("POST", "/upload", body=_upload_chunks(TRANSFER_SIZE), encode_chunked=True)
        response = connection.getresponse()
        body = response.read()
        seconds = time.monotonic() - started
        connection.close()

    growth = max(sampler.growth().values())
    record_property("seconds", round(seconds, 2))
    record_property("rss", sampler.report())
    assert response.status == 200, body[:500]
    assert body == str(TRANSFER_SIZE).encode(), f"the upstream counted {body[:100]!r} bytes"
    assert growth < MAX_GROWTH, (
        f"worker RSS grew by {growth / MiB:.1f} MiB during a {TRANSFER_SIZE / GiB:g} GiB upload "
        f"in {seconds:.1f} s: {sampler.report()}"
    )
    assert gateway.stop() == 0


def test_slow_reader_bounded_memory(upstream_factory, gateway_factory, record_property):
    gateway = _start(upstream_factory, gateway_factory)
    host, port = host_port(gateway.addresses[0])
    size = 200 * MiB

    with RssSampler(list(gateway.worker_pids.values())) as sampler:
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(f"GET /bytes?n={size} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            # Read 64 KiB every 50 ms for 5 s: about 6 MiB of the 200 MiB.
            received = b""
            reads = 0
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                data = sock.recv(64 * 1024)
                if not data:
                    break
                if reads == 0:
                    received = data
                reads += 1
                time.sleep(0.05)
        # The sample after the reader left shows no buffered-up body either.
        time.sleep(0.2)

    growth = max(sampler.growth().values())
    record_property("reads", reads)
    record_property("rss", sampler.report())
    assert received.startswith(b"HTTP/1.1 200 "), received[:200]
    assert reads >= 80, f"the connection ended after {reads} reads of 64 KiB"
    assert growth < MAX_SLOW_READER_GROWTH, (
        f"worker RSS grew by {growth / MiB:.1f} MiB while a reader took 64 KiB every 50 ms for 5 s "
        f"of a {size // MiB} MiB download: {sampler.report()}"
    )
    assert gateway.stop() == 0
