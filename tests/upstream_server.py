"""A real HTTP/1.1 upstream server for the end-to-end tests.

Run as `python tests/upstream_server.py PORT NAME`; it serves on 127.0.0.1
until killed. Every response carries `x-upstream: NAME`, so tests can tell
which target sent the response. Endpoints:

    /echo...            200, JSON of method, path, query, headers (as a list) and body length
    /status/N           status N with an empty body
    /slow?delay=S       waits S seconds, then 200
    /capacity?slots=N&delay=S
                        serves at most N requests at once, each for S seconds; more
                        wait in the server for a free slot, as in a saturated server
    /capacity/stats     JSON: requests served by /capacity and the most that were
                        inside it at once, waiting ones included
    /bytes?n=N          streams N bytes of b"x" in 64 KiB chunks (chunked encoding)
    /upload             reads the body in chunks and returns its length
    /hop                200 with hop-by-hop response headers that a proxy must remove
    /healthz            200, or 503 once the file named by --unhealthy-file exists
    anything else       200 with the same JSON as /echo
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

CHUNK = 64 * 1024


class Capacity:
    """The fixed capacity behind /capacity: a semaphore per slot count, and counts."""

    lock = threading.Lock()
    semaphores: dict[int, threading.Semaphore] = {}
    inside = 0
    inside_max = 0
    served = 0

    @classmethod
    def serve(cls, slots: int, delay: float) -> None:
        with cls.lock:
            semaphore = cls.semaphores.setdefault(slots, threading.Semaphore(slots))
            cls.inside += 1
            cls.inside_max = max(cls.inside_max, cls.inside)
        try:
            with semaphore:
                time.sleep(delay)
        finally:
            with cls.lock:
                cls.inside -= 1
                cls.served += 1

    @classmethod
    def stats(cls) -> dict[str, int]:
        with cls.lock:
            return {"served": cls.served, "inside_max": cls.inside_max}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without TCP_NODELAY the
    # second waits for the proxy's delayed ACK (about 40 ms per response).
    disable_nagle_algorithm = True
    server_version = "test-upstream"
    name = "upstream"
    unhealthy_file: str | None = None

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base class signature
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = do_GET

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path.startswith("/status/"):
            self._drain_body()
            self._reply(int(url.path.rsplit("/", 1)[1]), b"")
        elif url.path == "/slow":
            self._drain_body()
            time.sleep(float(query.get("delay", ["1"])[0]))
            self._reply(200, b"slow done")
        elif url.path == "/capacity":
            self._drain_body()
            Capacity.serve(int(query.get("slots", ["1"])[0]), float(query.get("delay", ["0.05"])[0]))
            self._reply(200, b"served")
        elif url.path == "/capacity/stats":
            self._drain_body()
            self._reply(200, json.dumps(Capacity.stats()).encode(), [("Content-Type", "application/json")])
        elif url.path == "/bytes":
            self._drain_body()
            self._stream_bytes(int(query.get("n", ["0"])[0]))
        elif url.path == "/upload":
            self._reply(200, str(self._drain_body()).encode())
        elif url.path == "/hop":
            self._drain_body()
            self._reply(
                200,
                b"hop",
                [("Connection", "X-Secret-Hop"), ("X-Secret-Hop", "1"), ("Keep-Alive", "timeout=5"),
                 ("Proxy-Connection", "keep-alive"), ("Upgrade", "h2c"), ("Trailer", "X-T"), ("X-End", "kept")],
            )
        elif url.path == "/healthz":
            self._drain_body()
            down = self.unhealthy_file and os.path.exists(self.unhealthy_file)
            self._reply(503 if down else 200, b"")
        else:
            length = self._drain_body()
            echo = {
                "method": self.command,
                "path": url.path,
                "query": url.query,
                "headers": [[k.lower(), v] for k, v in self.headers.items()],
                "body_length": length,
                "upstream": self.name,
            }
            self._reply(200, json.dumps(echo).encode(), [("Content-Type", "application/json")])

    def _drain_body(self) -> int:
        """Read the request body, chunked or with Content-Length; return its length."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return total
                remaining = size
                while remaining:
                    remaining -= len(self.rfile.read(min(remaining, CHUNK)))
                self.rfile.readline()
                total += size
        length = int(self.headers.get("Content-Length") or 0)
        remaining = length
        while remaining:
            data = self.rfile.read(min(remaining, CHUNK))
            if not data:
                break
            remaining -= len(data)
        return length

    def _reply(self, status: int, body: bytes, headers: list[tuple[str, str]] | None = None) -> None:
        self.send_response(status)
        self.send_header("X-Upstream", self.name)
        for name, value in headers or []:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _stream_bytes(self, count: int) -> None:
        self.send_response(200)
        self.send_header("X-Upstream", self.name)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        block = b"x" * CHUNK
        remaining = count
        while remaining:
            size = min(remaining, CHUNK)
            self.wfile.write(b"%x\r\n" % size + block[:size] + b"\r\n")
            remaining -= size
        self.wfile.write(b"0\r\n\r\n")


def main() -> None:
    port, name = int(sys.argv[1]), sys.argv[2]
    Handler.name = name
    Handler.unhealthy_file = sys.argv[3] if len(sys.argv) > 3 else None
    # The default listen backlog of 5 makes bursts of connections wait for a
    # SYN retry (about 1 s); tests open dozens at once.
    ThreadingHTTPServer.request_queue_size = 128
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"serving {name} on {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
