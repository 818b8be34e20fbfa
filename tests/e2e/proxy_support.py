"""Helpers for the routing, balancing, proxy and error end-to-end tests.

`send` makes one request with http.client, which sends the path and the
headers as given (no dot-segment removal, no added Host when one is passed),
and returns the whole response. `send_raw` writes bytes on a plain socket and
reads the reply, for requests that no client library would produce.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass

# Seconds a single test request may take before the test fails.
REQUEST_TIMEOUT = 10.0


@dataclass
class Reply:
    """One HTTP response as the downstream saw it."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """Return the first value of header `name` (case-insensitive), or None."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def json(self) -> dict:
        return json.loads(self.body)


def host_port(url: str) -> tuple[str, int]:
    """Split "http://127.0.0.1:8080" into ("127.0.0.1", 8080)."""
    authority = url.split("://", 1)[1].split("/", 1)[0]
    host, _, port = authority.rpartition(":")
    return host.strip("[]"), int(port)


def send(
    url: str,
    path: str,
    method: str = "GET",
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | Iterable[bytes] | None = None,
    timeout: float = REQUEST_TIMEOUT,
) -> Reply:
    """Send one request on a new connection to the gateway at `url` and read the whole response.

    Headers are sent in the given order, repeated names included. An iterable
    body (not bytes) is sent with chunked transfer encoding.
    """
    host, port = host_port(url)
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        names = {name.lower() for name, _ in headers}
        connection.putrequest(
            method,
            path,
            skip_host="host" in names,
            skip_accept_encoding=True,
        )
        for name, value in headers:
            connection.putheader(name, value)
        chunked = body is not None and not isinstance(body, bytes)
        if chunked:
            connection.putheader("Transfer-Encoding", "chunked")
        elif body is not None and "content-length" not in names:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders()
        if chunked:
            for chunk in body:
                if chunk:
                    connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            connection.send(b"0\r\n\r\n")
        elif body:
            connection.send(body)
        response = connection.getresponse()
        data = response.read()
        return Reply(response.status, response.getheaders(), data)
    finally:
        connection.close()


def echo(url: str, path: str, **kwargs) -> dict:
    """Send a request that the upstream echoes and return the echo; its "upstream" is the name of the server."""
    reply = send(url, path, **kwargs)
    assert reply.status == 200, f"{path}: expected 200, got {reply.status}: {reply.body[:300]!r}"
    return reply.json()


def echoed_headers(result: dict, name: str) -> list[str]:
    """Return the values of header `name` that the upstream received, in order."""
    return [value for key, value in result["headers"] if key == name.lower()]


def send_raw(url: str, data: bytes, wait: float = REQUEST_TIMEOUT, pause_after: float = 0.0) -> bytes:
    """Write `data` on a new connection and return what arrives until the peer closes or `wait` passes.

    `pause_after` keeps the connection open and silent for that many seconds
    after writing, before reading begins.
    """
    host, port = host_port(url)
    with socket.create_connection((host, port), timeout=wait) as sock:
        sock.sendall(data)
        if pause_after:
            time.sleep(pause_after)
        return read_until_close(sock, wait)


def read_until_close(sock: socket.socket, wait: float) -> bytes:
    """Read from `sock` until EOF, a reset, a complete response, or `wait` seconds."""
    received = b""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
        if _is_complete(received):
            break
    return received


def _is_complete(data: bytes) -> bool:
    """Return whether `data` contains a whole response framed by Content-Length."""
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def parse_raw(data: bytes) -> Reply:
    """Parse one raw response with a Content-Length body (or none) into a Reply."""
    head, separator, body = data.partition(b"\r\n\r\n")
    assert separator, f"no complete response head in {data[:300]!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return Reply(status, headers, body)


def count_by(values: Iterable[str | None]) -> dict[str | None, int]:
    counts: dict[str | None, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts
