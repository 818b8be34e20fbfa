"""Floors of the proxy path: minimal ASGI apps served the way a Nexus worker serves the gateway.

Each app runs in its own process on CPU 0, served by
`nexus.workers.granian_server.serve` with a uvloop loop, as a worker does.
An nginx upstream returning the same 100-byte body as in
benchmarks/proxy_vs_nginx.py runs on CPU 1 with wrk. The apps:

- `respond`: responds to every request at once, without an upstream;
- `respond-granian-tasks`: the same, with granian's own task scheduler in
  place of asyncio tasks (Nexus cannot use it: its stand-in task cannot be
  cancelled, so `asyncio.timeout` does nothing);
- `pyreqwest`: a bare proxy through one pyreqwest client (streamed response,
  body read whole), the client Nexus used before `nexus.http1_client`;
- `loop-client`: a bare proxy through `nexus.http1_client` on the loop;
- `rsgi-respond` and `rsgi-loop-client`: the first and the last served
  through granian's RSGI interface instead of ASGI, with
  `response_bytes`, to measure what RSGI would save.

For each app the script prints requests/s and the CPU time per request of
the app's process (all threads, from /proc/PID/stat), as medians of --runs
wrk runs, with an nginx reverse proxy measured between them for scale:

    .venv/bin/python benchmarks/proxy_floor.py --runs 3 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import proxy_vs_nginx as bench  # noqa: E402

APPS = ("respond", "respond-granian-tasks", "pyreqwest", "loop-client", "rsgi-respond", "rsgi-loop-client")


def serve_app(app_name: str, upstream_url: str, port: int) -> None:
    """Serve one floor app on 127.0.0.1:`port` until SIGTERM; runs in the child process."""
    import uvloop

    import nexus.workers.granian_server as granian_server

    os.sched_setaffinity(0, {0})
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    app = loop.run_until_complete(_make_app(app_name, upstream_url))
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    listener.set_inheritable(True)
    if app_name == "respond-granian-tasks":
        make_scheduler = granian_server._new_cbscheduler
        granian_server._new_cbscheduler = lambda loop, callback, impl_asyncio=True: make_scheduler(
            loop, callback, impl_asyncio=False
        )
    interface = "rsgi" if app_name.startswith("rsgi-") else "asgi"
    settings = granian_server.ServerSettings(worker_id=0, interface=interface)
    granian_server.serve(app, [listener.fileno()], settings, loop, lambda: None)


async def _make_app(app_name: str, upstream_url: str):
    body = b"x" * 100

    async def respond(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
        await send({"type": "http.response.body", "body": body})

    if app_name.startswith("respond"):
        return respond
    if app_name == "rsgi-respond":
        return _rsgi_respond(body)
    if app_name == "rsgi-loop-client":
        return _rsgi_loop_client_app(upstream_url)
    if app_name == "pyreqwest":
        return await _pyreqwest_app(upstream_url)
    return _loop_client_app(upstream_url)


async def _pyreqwest_app(upstream_url: str):
    from pyreqwest.client import ClientBuilder

    client = ClientBuilder().http1_only().tcp_nodelay(True).gzip(False).follow_redirects(False).build()

    async def proxy(scope, receive, send):
        if scope["type"] != "http":
            return
        async with client.request("GET", upstream_url + scope["path"]).build_streamed() as response:
            headers = [(name.encode(), value.encode()) for name, value in response.headers.items()]
            content = bytes(await response.bytes())
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    return proxy


def _loop_client(upstream_url: str):
    """Return fetch(path) -> (status, headers, body): one GET through `nexus.http1_client`."""
    from nexus.http1_client import TargetConnections

    host, port = upstream_url.removeprefix("http://").split(":")
    connections = TargetConnections(host, int(port), connect_timeout=1.0)

    async def fetch(path: str):
        head = f"GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n".encode()
        loop = asyncio.get_running_loop()
        response = await connections.request("GET", head, None, loop.time() + 10)
        try:
            content = await response.read_all()
        finally:
            response.finish()
        return response.status, response.headers, content

    return fetch


def _loop_client_app(upstream_url: str):
    fetch = _loop_client(upstream_url)

    async def proxy(scope, receive, send):
        if scope["type"] != "http":
            return
        status, fields, content = await fetch(scope["path"])
        headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in fields]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    return proxy


def _rsgi_respond(body: bytes):
    headers = [("content-length", str(len(body)))]

    async def respond(scope, proto):
        proto.response_bytes(200, headers, body)

    return respond


def _rsgi_loop_client_app(upstream_url: str):
    fetch = _loop_client(upstream_url)

    async def proxy(scope, proto):
        status, fields, content = await fetch(scope.path)
        proto.response_bytes(status, list(fields), content)

    return proxy


def measure(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="nexus-floor-"))
    with bench.Services(workdir) as services:
        upstream_port = bench.free_port()
        upstream_conf = bench.upstream_nginx_conf(workdir, upstream_port)
        bench.start_nginx(services, "upstream", upstream_conf, upstream_port, "1")
        proxy_port = bench.free_port()
        proxy_conf = bench.proxy_nginx_conf(workdir, proxy_port, upstream_port, 1)
        nginx = bench.start_nginx(services, "nginx-proxy", proxy_conf, proxy_port, "0")
        nginx_rates: list[float] = []
        print("| app | requests/s | CPU per request | runs (requests/s) |")
        print("|---|---:|---:|---|")
        for app_name in args.apps:
            port = bench.free_port()
            command = [sys.executable, __file__, "--serve", app_name, "--upstream", f"http://127.0.0.1:{upstream_port}", "--port", str(port)]
            service = services.start(f"floor-{app_name}", command, cwd=ROOT)
            service.url = f"http://127.0.0.1:{port}"
            bench.wait_for_http(service.url, service)
            bench.run_wrk(service.url, args.connections, bench.WARMUP_SECONDS)
            rates, cpu_us = [], []
            for _ in range(args.runs):
                before = bench.cpu_seconds([service.process.pid])
                result = bench.run_wrk(service.url, args.connections, args.duration)
                cpu_us.append((bench.cpu_seconds([service.process.pid]) - before) / max(result.requests, 1) * 1e6)
                rates.append(result.requests_per_second)
                nginx_rates.append(bench.run_wrk(nginx.url, args.connections, args.duration).requests_per_second)
            bench._stop_group(service.process)
            each = ", ".join(f"{rate:,.0f}" for rate in rates)
            print(f"| {app_name} | {statistics.median(rates):,.0f} | {statistics.median(cpu_us):.1f} us | {each} |", flush=True)
        print(f"| nginx as the proxy, for scale | {statistics.median(nginx_rates):,.0f} | - | {len(nginx_rates)} runs |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="wrk runs per app (default 3)")
    parser.add_argument("--duration", type=float, default=5, help="seconds of each wrk run (default 5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--apps", nargs="+", choices=APPS, default=list(APPS), help="apps to measure (default: all)")
    parser.add_argument("--serve", choices=APPS, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.serve:
        serve_app(args.serve, args.upstream, args.port)
        return 0
    bench.check_tools()
    if importlib.util.find_spec("pyreqwest") is None and "pyreqwest" in args.apps:
        print("pyreqwest is not installed: leave it out with --apps, or install it", file=sys.stderr)
        return 2
    measure(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
