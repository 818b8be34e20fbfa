"""Benchmark Nexus as a reverse proxy against nginx, side by side in one run.

One nginx instance serves a fixed ~100-byte body as the upstream of both
proxies: an nginx reverse proxy and a Nexus gateway with the same number of
workers. The script then measures, for each proxy:

1. Maximum throughput: `wrk -t1 -c{connections} -d{duration}s --latency`,
   alternating Nexus and nginx for --runs runs, each after a 2 s warm-up,
   and reports the median requests/s and latency percentiles per proxy and
   the ratio of Nexus's median requests/s to nginx's.
2. Latency at half load: an open-loop client (in this file, asyncio over
   keep-alive connections) sends at half of Nexus's median maximum for 10 s
   to each proxy, alternating for --runs runs, and reports median p50/p99.

Pinning on a 2-CPU machine: the upstream nginx, wrk and the open-loop client
run on CPU 1 (`taskset -c 1`). With one worker, the proxies run on CPU 0:
Nexus pins its worker itself, and the nginx proxy runs under `taskset -c 0`.
With more workers, Nexus pins worker i to CPU i (when there are no more
workers than CPUs) and the nginx proxy uses `worker_cpu_affinity auto`, so
the proxies share CPUs with the load generator and the upstream.

Before and after the runs, a probe spins on both CPUs at once for 2 s and
reports the share of time it was kept off each CPU, by other processes or by
the host of a virtual machine. When that share is large, the results, p99
latency above all, carry that noise. The script also estimates the CPU time
that processes outside the benchmark used during the run.

Run from the repository root:

    .venv/bin/python benchmarks/proxy_vs_nginx.py --runs 3 --duration 10 \
        --write docs/benchmarks.md

Every process the script starts runs in its own session and is stopped at
the end, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"

# The upstream's response body: 100 bytes of ASCII, so it needs no escaping in nginx.conf.
UPSTREAM_BODY = "nexus-vs-nginx benchmark body " + "x" * 69 + "\n"
WARMUP_SECONDS = 2.0
OPEN_LOOP_SECONDS = 10.0
# Target set for Nexus: requests/s per worker as a fraction of nginx's, and
# p99 latency at half of Nexus's own maximum throughput.
TARGET_RATIO = 0.3
TARGET_P99_MS = 5.0

# Share of one CPU that other processes may use during a run before the report warns about it.
OTHER_LOAD_LIMIT = 0.10
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

# Log lines of a Nexus master or worker that mean a request or a worker failed.
_NEXUS_FAILURE_LINE = re.compile(
    r"worker crashed|worker exited unexpectedly|killing stuck worker|unhandled error|request failed|Traceback"
)


class BenchmarkError(Exception):
    """A step of the benchmark failed; the message names the step and the cause."""


# Processes


@dataclass
class Service:
    """A server process started by the benchmark, with its log file."""

    name: str
    process: subprocess.Popen
    log_path: Path
    url: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Services:
    """Starts server processes in their own sessions and stops all of them on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Service] = []

    def start(self, name: str, args: list[str], cwd: Path | None = None) -> Service:
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "wb") as log_file:
            # A new session makes the process a group leader, so stop_all() can
            # signal it with all its children (nginx or Nexus workers), and a
            # Ctrl-C in the terminal reaches only this script, which stops them.
            process = subprocess.Popen(
                args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True
            )
        service = Service(name, process, log_path)
        self.started.append(service)
        return service

    def stop_all(self) -> None:
        for service in reversed(self.started):
            _stop_group(service.process)
        self.started.clear()

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop_all()


def _stop_group(process: subprocess.Popen) -> None:
    """Send SIGTERM to the process group, then SIGKILL what is left after STOP_TIMEOUT."""
    group = process.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass
    # Children of the leader (workers) may outlive it; the group id stays valid while any member lives.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate, timeout: float, condition: str, service: Service) -> None:
    """Poll `predicate` every 50 ms; raise BenchmarkError if the service exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if service.process.poll() is not None:
            raise BenchmarkError(
                f"{service.name} exited with status {service.process.returncode} before {condition}; "
                f"its log ({service.log_path}):\n{service.log()[-4000:]}"
            )
        time.sleep(0.05)
    raise BenchmarkError(f"timed out after {timeout:g} s waiting for {condition}; log of {service.name}:\n{service.log()[-4000:]}")


def wait_for_http(url: str, service: Service) -> None:
    """Wait until a GET of `url` returns status 200."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")

    def returns_200() -> bool:
        try:
            with socket.create_connection((host, int(port)), timeout=1) as conn:
                conn.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                return conn.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    wait_until(returns_200, START_TIMEOUT, f"{service.name} to answer 200 on {url}", service)


# nginx and Nexus


def _nginx_main_block(workdir: Path, name: str, workers: int, cpu_affinity_auto: bool) -> str:
    affinity = "worker_cpu_affinity auto;\n" if cpu_affinity_auto else ""
    return (
        "daemon off;\n"
        "master_process on;\n"
        f"worker_processes {workers};\n"
        f"{affinity}"
        f"pid {workdir / (name + '.pid')};\n"
        f"error_log {workdir / (name + '-error.log')} warn;\n"
        "events { worker_connections 4096; }\n"
    )


def _nginx_temp_paths(workdir: Path, name: str) -> str:
    temp = workdir / f"{name}-temp"
    return "".join(
        f"    {directive} {temp / directive};\n"
        for directive in ("client_body_temp_path", "proxy_temp_path", "fastcgi_temp_path", "uwsgi_temp_path", "scgi_temp_path")
    )


def upstream_nginx_conf(workdir: Path, port: int) -> str:
    """Return nginx.conf for the upstream: one worker returning UPSTREAM_BODY for every path."""
    return (
        _nginx_main_block(workdir, "upstream", 1, False)
        + "http {\n"
        "    access_log off;\n"
        + _nginx_temp_paths(workdir, "upstream")
        + "    keepalive_requests 1000000;\n"
        f"    server {{\n"
        f"        listen 127.0.0.1:{port};\n"
        "        location / {\n"
        "            default_type text/plain;\n"
        f'            return 200 "{UPSTREAM_BODY.rstrip()}\\n";\n'
        "        }\n"
        "    }\n"
        "}\n"
    )


def proxy_nginx_conf(workdir: Path, port: int, upstream_port: int, workers: int) -> str:
    """Return nginx.conf for the reverse proxy, with keep-alive connections to the upstream."""
    return (
        _nginx_main_block(workdir, "nginx-proxy", workers, workers > 1)
        + "http {\n"
        "    access_log off;\n"
        + _nginx_temp_paths(workdir, "nginx-proxy")
        + "    keepalive_requests 1000000;\n"
        "    upstream backend {\n"
        f"        server 127.0.0.1:{upstream_port};\n"
        "        keepalive 64;\n"
        "        keepalive_requests 1000000;\n"
        "    }\n"
        "    server {\n"
        f"        listen 127.0.0.1:{port};\n"
        "        location / {\n"
        "            proxy_pass http://backend;\n"
        "            proxy_http_version 1.1;\n"
        '            proxy_set_header Connection "";\n'
        "        }\n"
        "    }\n"
        "}\n"
    )


def nexus_config(upstream_port: int, workers: int) -> str:
    return (
        'listen: ["127.0.0.1:0"]\n'
        f"workers: {workers}\n"
        "upstreams:\n"
        "  bench:\n"
        f'    targets: ["http://127.0.0.1:{upstream_port}"]\n'
        "routes:\n"
        "  - name: all\n"
        "    upstream: bench\n"
        "    match: {path_prefix: /}\n"
    )


def start_nginx(services: Services, name: str, conf: str, port: int, cpu: str | None) -> Service:
    conf_path = services.workdir / f"{name}.conf"
    conf_path.write_text(conf)
    (services.workdir / f"{name}-temp").mkdir()
    error_log = services.workdir / f"{name}-error.log"
    args = ["nginx", "-c", str(conf_path), "-p", str(services.workdir), "-e", str(error_log)]
    if cpu is not None:
        args = ["taskset", "-c", cpu, *args]
    service = services.start(name, args)
    service.log_path = error_log
    service.url = f"http://127.0.0.1:{port}"
    wait_for_http(service.url, service)
    return service


def start_nexus(
    services: Services, upstream_port: int, workers: int, config_text: str | None = None, name: str = "nexus"
) -> Service:
    """Start Nexus on `config_text` (default: one route to the upstream) and wait until every worker serves."""
    conf_path = services.workdir / f"{name}.yaml"
    conf_path.write_text(config_text or nexus_config(upstream_port, workers))
    python = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
    service = services.start(name, [python, "-m", "nexus", "run", "--config", str(conf_path)], cwd=ROOT)
    wait_until(
        lambda: service.log().count("worker serving") >= workers,
        START_TIMEOUT,
        f"Nexus to log 'worker serving' {workers} times",
        service,
    )
    addresses = re.findall(r"listening address=(\S+)", service.log())
    if not addresses:
        raise BenchmarkError(f"Nexus logged no 'listening address=' line:\n{service.log()}")
    service.url = f"http://{addresses[0]}"
    wait_for_http(service.url, service)
    return service


def nexus_worker_pids(nexus: Service) -> list[int]:
    """Return the pids of the workers currently serving, one per slot, from the log."""
    slots = dict(re.findall(r"worker serving worker=(\d+) pid=(\d+)", nexus.log()))
    return [int(pid) for pid in slots.values()]


def nginx_worker_pids(nginx: Service) -> list[int]:
    """Return the pids of the nginx master's worker processes (its children)."""
    master = nginx.process.pid
    workers = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            # The parent pid is the second field after the parenthesised command name.
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == master:
                workers.append(int(entry.name))
    return workers


def cpu_seconds(pids: list[int]) -> float:
    """Return the user + system CPU time of processes `pids`, all their threads included."""
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime and stime, in clock ticks
    return total / ticks_per_second


def nexus_failures(nexus: Service) -> list[str]:
    return [line for line in nexus.log().splitlines() if _NEXUS_FAILURE_LINE.search(line)]


# wrk


@dataclass
class WrkResult:
    requests_per_second: float
    latency_ms: dict[str, float]
    requests: int
    socket_errors: dict[str, int]
    non_2xx_3xx: int
    output: str

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values()) + self.non_2xx_3xx


_WRK_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _wrk_duration_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise BenchmarkError(f"cannot read the wrk latency {text!r}")
    return float(match.group(1)) * _WRK_UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    """Read requests/s, the latency distribution and the error counts from wrk's output."""
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in ", output)
    if not rate or not total:
        raise BenchmarkError(f"wrk printed no 'Requests/sec' line:\n{output}")
    latency = {
        f"p{percent}": _wrk_duration_ms(value)
        for percent, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", output, re.MULTILINE)
    }
    if set(latency) != {"p50", "p75", "p90", "p99"}:
        raise BenchmarkError(f"wrk printed no full latency distribution (was --latency given?):\n{output}")
    socket_errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    errors_line = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if errors_line:
        socket_errors = dict(zip(socket_errors, map(int, errors_line.groups())))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkResult(
        requests_per_second=float(rate.group(1)),
        latency_ms=latency,
        requests=int(total.group(1)),
        socket_errors=socket_errors,
        non_2xx_3xx=int(non_2xx.group(1)) if non_2xx else 0,
        output=output,
    )


def run_wrk(url: str, connections: int, duration: float, headers: tuple[str, ...] = ()) -> WrkResult:
    header_args = [arg for header in headers for arg in ("-H", header)]
    args = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", *header_args, url + "/"]
    completed = subprocess.run(args, capture_output=True, text=True, timeout=duration + 30)
    if completed.returncode != 0:
        raise BenchmarkError(f"{shlex.join(args)} failed with status {completed.returncode}:\n{completed.stderr}")
    return parse_wrk(completed.stdout)


# Open-loop client: a fixed request rate regardless of how fast responses come.


@dataclass
class OpenLoopResult:
    target_rate: float
    sent: int
    completed: int
    errors: int
    non_2xx: int
    queued: int
    latencies_ms: list[float] = field(repr=False)
    dispatch_lags_ms: list[float] = field(repr=False)
    duration: float = 0.0

    @property
    def achieved_rate(self) -> float:
        return self.sent / self.duration if self.duration else 0.0

    def percentile(self, fraction: float) -> float:
        """Return the nearest-rank percentile of the recorded latencies, in ms."""
        return _nearest_rank(self.latencies_ms, fraction)

    def dispatch_lag(self, fraction: float) -> float:
        return _nearest_rank(self.dispatch_lags_ms, fraction)


def _nearest_rank(values: list[float], fraction: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


class _ResponseReader:
    """Incremental parser for HTTP/1.1 responses framed by Content-Length or chunked encoding."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def next_status(self) -> int | None:
        """Consume one complete response from the buffer and return its status, or None if incomplete."""
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return None
        head = bytes(self.buffer[:head_end]).decode("latin-1").lower()
        status = int(head.split(" ", 2)[1])
        body_start = head_end + 4
        length = re.search(r"\r\ncontent-length:\s*(\d+)", head)
        if length:
            end = body_start + int(length.group(1))
            if len(self.buffer) < end:
                return None
        elif "\r\ntransfer-encoding: chunked" in head:
            end = self._chunked_end(body_start)
            if end is None:
                return None
        else:
            raise BenchmarkError(f"response without Content-Length or chunked encoding: {head!r}")
        del self.buffer[:end]
        return status

    def _chunked_end(self, position: int) -> int | None:
        # Trailers are not expected from the benchmark upstream, so the last chunk ends with an empty line.
        while True:
            line_end = self.buffer.find(b"\r\n", position)
            if line_end < 0:
                return None
            size = int(bytes(self.buffer[position:line_end]).split(b";")[0], 16)
            if size == 0:
                end = line_end + 4
                return end if len(self.buffer) >= end else None
            position = line_end + 2 + size + 2
            if len(self.buffer) < position:
                return None


class _Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, client: _OpenLoopClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.reader = _ResponseReader()
        self.started_at: float | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, started_at: float) -> None:
        self.started_at = started_at
        self.transport.write(self.client.request)

    def data_received(self, data: bytes) -> None:
        self.reader.buffer += data
        status = self.reader.next_status()
        if status is None:
            return
        started_at, self.started_at = self.started_at, None
        self.client.on_response(self, started_at, status)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.client.on_lost(self)


class _OpenLoopClient:
    """Sends requests at `rate` per second over `connections` keep-alive connections.

    A 1 ms ticker sends every request that has come due. A request for which
    no connection is idle waits in a queue, and its latency counts from the
    tick that found it due, so a slow server cannot slow the sender down
    (no coordinated omission). The time between a request's due time and
    the tick that sends it (about 1 ms at most while the client keeps up) is
    not counted in the latency but recorded as the dispatch lag.
    """

    def __init__(self, host: str, port: int, rate: float, connections: int) -> None:
        self.host = host
        self.port = port
        self.rate = rate
        self.connection_count = connections
        self.request = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: open-loop-bench\r\n\r\n".encode()
        self.idle: collections.deque[_Connection] = collections.deque()
        self.waiting: collections.deque[float] = collections.deque()
        self.recording_from = math.inf
        self.latencies_ms: list[float] = []
        self.sent = 0
        self.completed = 0
        self.errors = 0
        self.non_2xx = 0
        self.queued = 0
        self.in_flight = 0
        # How late the ticker sent each request after its due time. Lags above
        # the 1 ms tick mean the client's CPU stalled or could not keep the rate.
        self.dispatch_lags_ms: list[float] = []

    async def run(self, warmup: float, duration: float) -> OpenLoopResult:
        loop = asyncio.get_running_loop()
        for _ in range(self.connection_count):
            _, connection = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
            connection.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.idle.append(connection)

        start = time.perf_counter()
        self.recording_from = start + warmup
        end = self.recording_from + duration
        due = 0
        measured_sent = 0
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            target = int((now - start) * self.rate)
            while due < target:
                due += 1
                self._dispatch(now)
                if now >= self.recording_from:
                    measured_sent += 1
                    self.dispatch_lags_ms.append((now - (start + due / self.rate)) * 1000.0)
            await asyncio.sleep(0.001)

        # Give the requests in flight up to 5 s to finish; what is left counts as errors.
        drain_deadline = time.perf_counter() + 5.0
        while (self.in_flight or self.waiting) and time.perf_counter() < drain_deadline:
            await asyncio.sleep(0.005)
        self.errors += self.in_flight + len(self.waiting)
        for connection in list(self.idle):
            connection.transport.close()
        return OpenLoopResult(
            target_rate=self.rate,
            sent=measured_sent,
            completed=self.completed,
            errors=self.errors,
            non_2xx=self.non_2xx,
            queued=self.queued,
            latencies_ms=self.latencies_ms,
            dispatch_lags_ms=self.dispatch_lags_ms,
            duration=duration,
        )

    def _dispatch(self, due_at: float) -> None:
        self.sent += 1
        if self.idle:
            self.in_flight += 1
            self.idle.popleft().send(due_at)
        else:
            if due_at >= self.recording_from:
                self.queued += 1
            self.waiting.append(due_at)

    def on_response(self, connection: _Connection, started_at: float, status: int) -> None:
        self.in_flight -= 1
        if started_at >= self.recording_from:
            self.completed += 1
            self.latencies_ms.append((time.perf_counter() - started_at) * 1000.0)
            if not 200 <= status < 300:
                self.non_2xx += 1
        if self.waiting:
            self.in_flight += 1
            connection.send(self.waiting.popleft())
        else:
            self.idle.append(connection)

    def on_lost(self, connection: _Connection) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(connection)
        if connection.started_at is not None:
            self.in_flight -= 1
            self.errors += 1


def open_loop_main(url: str, rate: float, duration: float, warmup: float, connections: int, result_file: Path) -> None:
    """Run the open-loop client in this process and write its result as JSON to `result_file`."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    client = _OpenLoopClient(host, int(port), rate, connections)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(client.run(warmup, duration))
    result_file.write_text(json.dumps(result.__dict__))


def run_open_loop(url: str, rate: float, duration: float, connections: int) -> OpenLoopResult:
    """Run the open-loop client pinned to CPU 1 in a child process of this script."""
    # NOTE: a file rather than stdout, because the JSON once came out of the stdout
    # pipe with a newline inside a list, for a reason not found.
    with tempfile.TemporaryDirectory(prefix="open-loop-") as directory:
        result_file = Path(directory) / "result.json"
        args = [
            "taskset", "-c", "1", sys.executable, str(Path(__file__).resolve()),
            "--open-loop-client", url, "--rate", f"{rate:.1f}", "--duration", f"{duration:g}",
            "--connections", str(connections), "--result-file", str(result_file),
        ]  # fmt: skip
        completed = subprocess.run(args, capture_output=True, text=True, timeout=duration + WARMUP_SECONDS + 60)
        if completed.returncode != 0:
            raise BenchmarkError(f"the open-loop client failed with status {completed.returncode}:\n{completed.stderr}")
        try:
            return OpenLoopResult(**json.loads(result_file.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise BenchmarkError(f"cannot read the open-loop client's result {result_file}: {exc}") from exc


# CPU availability: on a virtual machine the host may not run both vCPUs all the time.


def cpu_probe_main(seconds: float) -> None:
    """Spin for `seconds` and print, as JSON, how long this CPU was taken away from the process."""
    gap_threshold = 0.0002
    stalled = 0.0
    longest = 0.0
    last = time.perf_counter()
    end = last + seconds
    while last < end:
        now = time.perf_counter()
        gap = now - last
        if gap > gap_threshold:
            stalled += gap
            longest = max(longest, gap)
        last = now
    print(json.dumps({"stalled_fraction": stalled / seconds, "longest_stall_ms": longest * 1000.0}))


def probe_cpus(seconds: float = 2.0) -> str:
    """Spin on CPUs 0 and 1 at once; describe the share of time the probe was kept off each CPU."""
    script = str(Path(__file__).resolve())
    probes = {
        cpu: subprocess.Popen(
            ["taskset", "-c", str(cpu), sys.executable, script, "--cpu-probe", str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for cpu in (0, 1)
    }
    parts = []
    for cpu, probe in probes.items():
        output, _ = probe.communicate(timeout=seconds + 30)
        result = json.loads(output)
        parts.append(
            f"CPU {cpu} unavailable {result['stalled_fraction']:.0%} of the time (longest gap {result['longest_stall_ms']:.1f} ms)"
        )
    return ", ".join(parts)


@dataclass(frozen=True)
class CpuClock:
    """CPU seconds used so far by the whole machine and by this script with its reaped descendants."""

    machine: float
    ours: float
    wall: float

    @classmethod
    def read(cls) -> CpuClock:
        # user, nice and system ticks of all CPUs; irq and softirq time is left out because
        # /proc/<pid>/stat does not charge it to the processes whose packets caused it.
        ticks = Path("/proc/stat").read_text().splitlines()[0].split()[1:4]
        times = os.times()
        ours = times.user + times.system + times.children_user + times.children_system
        return cls(sum(map(int, ticks)) / os.sysconf("SC_CLK_TCK"), ours, time.monotonic())


def other_load_share(before: CpuClock, after: CpuClock) -> tuple[float, float]:
    """Return the CPU-seconds that processes outside this benchmark used between two readings, and the wall seconds."""
    other = (after.machine - before.machine) - (after.ours - before.ours)
    return max(other, 0.0), after.wall - before.wall


# Machine facts and report


def nexus_commit() -> str:
    """Return the short commit of the checkout, noting uncommitted changes under nexus/."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        changes = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "nexus"], capture_output=True, text=True)
    except OSError:
        return "unknown (git not found)"
    if commit.returncode != 0:
        return "unknown (not a git checkout)"
    if changes.stdout.strip():
        return f"{commit.stdout.strip()}, with uncommitted changes under nexus/"
    return commit.stdout.strip()


def machine_facts() -> dict[str, str]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    nexus = nexus_commit()
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[0]
    return {
        "Nexus commit": nexus,
        "CPU": cpu_model,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "granian": importlib.metadata.version("granian"),
        "uvloop": importlib.metadata.version("uvloop"),
        "nginx": nginx.removeprefix("nginx version: "),
        "wrk": wrk.split(" Copyright")[0],
    }


def pinning_text(workers: int) -> str:
    """Return the CPU pinning of every process as Markdown list items."""
    load = "- The upstream nginx (1 worker), wrk and the open-loop client: CPU 1 (`taskset -c 1`).\n"
    if workers == 1:
        return (
            load
            + "- The Nexus worker: CPU 0, pinned by Nexus itself. The master is not pinned and mostly sleeps.\n"
            + "- The nginx proxy, master and worker: CPU 0 (`taskset -c 0`).\n"
        )
    return (
        load
        + f"- Nexus, {workers} workers: worker i on CPU i, pinned by Nexus itself when there are no more workers "
        "than CPUs.\n"
        + f"- The nginx proxy, {workers} workers: `worker_cpu_affinity auto`.\n"
        + "- So the proxies share CPUs with the load generators and the upstream.\n"
    )


@dataclass
class ProxyResults:
    """The measured runs of one proxy."""

    name: str
    wrk_runs: list[WrkResult] = field(default_factory=list)
    open_loop_runs: list[OpenLoopResult] = field(default_factory=list)
    # CPU time of the proxy's worker processes per request in each wrk run, in microseconds.
    cpu_us_per_request: list[float] = field(default_factory=list)

    def median_rps(self) -> float:
        return statistics.median(run.requests_per_second for run in self.wrk_runs)

    def median_cpu_us(self) -> float:
        return statistics.median(self.cpu_us_per_request)

    def median_latency(self, key: str) -> float:
        return statistics.median(run.latency_ms[key] for run in self.wrk_runs)

    def median_open_loop(self, fraction: float) -> float:
        return statistics.median(run.percentile(fraction) for run in self.open_loop_runs)


@dataclass
class BenchmarkRun:
    """Everything one invocation measured and noticed."""

    nexus: ProxyResults = field(default_factory=lambda: ProxyResults("Nexus"))
    nginx: ProxyResults = field(default_factory=lambda: ProxyResults("nginx"))
    half_load_rate: float = 0.0
    # Failures of a proxy under load: errors, non-2xx responses, crashed workers.
    problems: list[str] = field(default_factory=list)
    # Doubts about the measurement itself: a client that fell behind, CPUs the host took away.
    notes: list[str] = field(default_factory=list)
    cpu_before: str = ""
    cpu_after: str = ""
    other_load: str = ""


def _ms(value: float) -> str:
    return f"{value:.2f} ms"


def _runs(count: int) -> str:
    return "1 run" if count == 1 else f"{count} runs"


def throughput_table(run: BenchmarkRun, args: argparse.Namespace) -> list[str]:
    lines = [
        f"Maximum throughput: `wrk -t1 -c{args.connections} -d{args.duration:g}s --latency`, "
        f"{_runs(args.runs)} per proxy, alternating, each after a {WARMUP_SECONDS:g} s warm-up; medians:",
        "",
        "| Proxy | Workers | Requests/s | p50 | p90 | p99 | Requests/s of each run | Errors | CPU per request |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for proxy in (run.nexus, run.nginx):
        each = ", ".join(f"{result.requests_per_second:,.0f}" for result in proxy.wrk_runs)
        errors = sum(result.errors for result in proxy.wrk_runs)
        lines.append(
            f"| {proxy.name} | {args.workers} | {proxy.median_rps():,.0f} | {_ms(proxy.median_latency('p50'))} | "
            f"{_ms(proxy.median_latency('p90'))} | {_ms(proxy.median_latency('p99'))} | {each} | {errors} | "
            f"{proxy.median_cpu_us():.1f} us |"
        )
    lines += [
        "",
        "CPU per request is the CPU time (user + system, all threads) of the proxy's worker processes during "
        "the run, divided by the requests wrk counted; the median of the runs.",
    ]
    return lines


def half_load_table(run: BenchmarkRun, args: argparse.Namespace) -> list[str]:
    rate = run.half_load_rate
    lines = [
        f"Latency at half of Nexus's median maximum: the open-loop client sends {rate:,.0f} requests/s "
        f"for {OPEN_LOOP_SECONDS:g} s after a {WARMUP_SECONDS:g} s warm-up over {args.connections} keep-alive "
        f"connections, {_runs(args.runs)} per proxy, alternating; medians:",
        "",
        "| Proxy | Rate sent | p50 | p99 | p99 of each run | Errors | Non-2xx | Waited for a connection | Client dispatch lag p99 |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for proxy in (run.nexus, run.nginx):
        results = proxy.open_loop_runs
        sent = statistics.median(result.achieved_rate for result in results)
        each = ", ".join(_ms(result.percentile(0.99)) for result in results)
        lines.append(
            f"| {proxy.name} | {sent:,.0f} | {_ms(proxy.median_open_loop(0.5))} | "
            f"{_ms(proxy.median_open_loop(0.99))} | {each} | {sum(result.errors for result in results)} | "
            f"{sum(result.non_2xx for result in results)} | {sum(result.queued for result in results)} | "
            f"{_ms(max(result.dispatch_lag(0.99) for result in results))} |"
        )
    return lines


def results_markdown(run: BenchmarkRun, args: argparse.Namespace) -> str:
    ratio = run.nexus.median_rps() / run.nginx.median_rps()
    cpu_ratio = run.nginx.median_cpu_us() / run.nexus.median_cpu_us()
    p99 = run.nexus.median_open_loop(0.99)
    lines = [
        *throughput_table(run, args),
        "",
        f"Ratio Nexus/nginx of median requests/s: **{ratio:.2f}**",
        "",
        f"Ratio of nginx's CPU time per request to Nexus's: {cpu_ratio:.2f}. It estimates the throughput ratio "
        "of the two proxies when each is held back only by its own CPU. Unlike requests/s, it changes little "
        "when other processes take CPU time during the run.",
        "",
        *half_load_table(run, args),
        "",
        "Targets:",
        "",
        f"- Nexus at least {TARGET_RATIO}x nginx's requests/s per worker: "
        f"{ratio:.2f}x, **{'met' if ratio >= TARGET_RATIO else 'not met'}**.",
        f"- Nexus p99 under {TARGET_P99_MS:g} ms at half of its own maximum: "
        f"{_ms(p99)}, **{'met' if p99 < TARGET_P99_MS else 'not met'}**.",
        "",
        "CPU availability, from a probe spinning on both CPUs at once for 2 s:",
        "",
        f"- before the runs: {run.cpu_before}",
        f"- after the runs: {run.cpu_after}",
        "",
        f"Other load during the run: {run.other_load}.",
    ]
    if run.problems:
        lines += ["", "Failures under load:", "", *(f"- {problem}" for problem in run.problems)]
    if run.notes:
        lines += ["", "Measurement notes:", "", *(f"- {note}" for note in run.notes)]
    return "\n".join(lines)


def report_section(table: str, facts: dict[str, str], command: str, workers: int) -> str:
    fact_lines = "\n".join(f"- {name}: {value}" for name, value in facts.items())
    return (
        f"Run on {datetime.date.today().isoformat()} with:\n\n"
        f"```\n{command}\n```\n\n"
        f"Machine:\n\n{fact_lines}\n\n"
        f"Pinning:\n\n{pinning_text(workers)}\n"
        f"{table}\n"
    )


START_MARKER = "<!-- proxy_vs_nginx:start -->"
END_MARKER = "<!-- proxy_vs_nginx:end -->"


def write_section(path: Path, section: str) -> None:
    """Replace the text between the proxy_vs_nginx markers in `path` with `section`."""
    text = path.read_text()
    start = text.find(START_MARKER)
    end = text.find(END_MARKER)
    if start < 0 or end < start:
        raise BenchmarkError(f"{path}: missing the markers {START_MARKER} and {END_MARKER}; add them where the results go")
    path.write_text(text[: start + len(START_MARKER)] + "\n" + section + text[end:])


def shown_command() -> str:
    """Return the command line of this run, with the interpreter relative to the working directory."""
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    return shlex.join([str(python), *sys.argv])


# Main


def check_tools() -> None:
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            raise BenchmarkError(f"{tool} not found on PATH; install it (Debian packages: nginx-light, wrk, util-linux)")
    cpus = os.sched_getaffinity(0)
    if not {0, 1} <= cpus:
        raise BenchmarkError(f"the pinning needs CPUs 0 and 1, but this process may use only {sorted(cpus)}")


def start_services(args: argparse.Namespace, services: Services) -> tuple[Service, Service]:
    """Start the upstream, the nginx proxy and Nexus; return (Nexus, nginx proxy)."""
    upstream_port = free_port()
    upstream = start_nginx(services, "upstream", upstream_nginx_conf(services.workdir, upstream_port), upstream_port, "1")
    proxy_port = free_port()
    proxy_conf = proxy_nginx_conf(services.workdir, proxy_port, upstream_port, args.workers)
    nginx = start_nginx(services, "nginx-proxy", proxy_conf, proxy_port, "0" if args.workers == 1 else None)
    nexus = start_nexus(services, upstream_port, args.workers)
    print(f"upstream {upstream.url}, nginx proxy {nginx.url}, Nexus {nexus.url}", file=sys.stderr)
    return nexus, nginx


def measure_throughput(
    run: BenchmarkRun, args: argparse.Namespace, proxies: list[tuple[ProxyResults, Service, list[int]]]
) -> None:
    for number in range(1, args.runs + 1):
        for results, service, worker_pids in proxies:
            run_wrk(service.url, args.connections, WARMUP_SECONDS)
            cpu_before = cpu_seconds(worker_pids)
            result = run_wrk(service.url, args.connections, args.duration)
            cpu_used = cpu_seconds(worker_pids) - cpu_before
            results.wrk_runs.append(result)
            results.cpu_us_per_request.append(cpu_used / max(result.requests, 1) * 1e6)
            if result.errors:
                run.problems.append(
                    f"{results.name}, wrk run {number}: {result.non_2xx_3xx} non-2xx/3xx responses, "
                    f"socket errors {result.socket_errors} of {result.requests} requests"
                )
            print(
                f"run {number} {results.name}: {result.requests_per_second:,.0f} requests/s, "
                f"p99 {result.latency_ms['p99']:.2f} ms, errors {result.errors}, "
                f"CPU {results.cpu_us_per_request[-1]:.1f} us/request",
                file=sys.stderr,
            )


def measure_half_load(
    run: BenchmarkRun, args: argparse.Namespace, proxies: list[tuple[ProxyResults, Service, list[int]]]
) -> None:
    rate = run.half_load_rate
    lagging: list[float] = []
    for number in range(1, args.runs + 1):
        for results, service, _ in proxies:
            result = run_open_loop(service.url, rate, OPEN_LOOP_SECONDS, args.connections)
            results.open_loop_runs.append(result)
            if result.errors or result.non_2xx:
                run.problems.append(
                    f"{results.name}, open-loop run {number}: {result.errors} failed requests, {result.non_2xx} non-2xx"
                )
            if result.achieved_rate < 0.98 * rate:
                run.notes.append(
                    f"{results.name}, open-loop run {number}: the client sent only {result.achieved_rate:,.0f} "
                    f"of {rate:,.0f} requests/s"
                )
            if result.dispatch_lag(0.99) > 2.0:
                lagging.append(result.dispatch_lag(0.99))
            print(
                f"half load run {number} {results.name}: {rate:,.0f} requests/s, "
                f"p50 {result.percentile(0.5):.2f} ms, p99 {result.percentile(0.99):.2f} ms",
                file=sys.stderr,
            )
    if lagging:
        run.notes.append(
            f"In {len(lagging)} of {2 * args.runs} open-loop runs the client's dispatch lag p99 was above 2 ms "
            f"(up to {max(lagging):.2f} ms): its own CPU stalled, which shifts some send times and latencies "
            "by milliseconds."
        )


def check_nexus(run: BenchmarkRun, nexus: Service, workers_at_start: list[int]) -> None:
    """Record worker restarts, an exited master and failure lines in the Nexus log as problems."""
    run.problems.extend(f"Nexus log: {line}" for line in nexus_failures(nexus))
    workers_now = nexus_worker_pids(nexus)
    if sorted(workers_now) != sorted(workers_at_start):
        run.problems.append(f"Nexus workers were replaced during the run: pids {workers_at_start} at start, {workers_now} at the end")
    if nexus.process.poll() is not None:
        run.problems.append(f"Nexus exited during the benchmark with status {nexus.process.returncode}")


def benchmark(args: argparse.Namespace, services: Services) -> BenchmarkRun:
    run = BenchmarkRun()
    run.cpu_before = probe_cpus()
    clock_before = CpuClock.read()
    nexus, nginx = start_services(args, services)
    workers_at_start = nexus_worker_pids(nexus)
    proxies = [(run.nexus, nexus, workers_at_start), (run.nginx, nginx, nginx_worker_pids(nginx))]

    measure_throughput(run, args, proxies)
    run.half_load_rate = run.nexus.median_rps() / 2
    measure_half_load(run, args, proxies)

    check_nexus(run, nexus, workers_at_start)
    services.stop_all()
    other, wall = other_load_share(clock_before, CpuClock.read())
    run.other_load = (
        f"processes outside the benchmark used about {other:.0f} CPU-seconds in {wall:.0f} s "
        f"({other / wall:.0%} of one CPU on average; an estimate from /proc/stat and os.times)"
    )
    if other / wall > OTHER_LOAD_LIMIT:
        run.notes.append(
            f"Other processes used {other / wall:.0%} of one CPU during the run, above {OTHER_LOAD_LIMIT:.0%}: "
            "they took CPU time from the proxies and the clients, so rerun on a quieter machine before trusting the numbers."
        )
    run.cpu_after = probe_cpus()
    return run


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark Nexus as a reverse proxy against nginx on this machine.")
    parser.add_argument("--duration", type=float, default=10, help="seconds of each measured wrk run (default 10)")
    parser.add_argument(
        "--connections", type=int, default=32, help="keep-alive connections of wrk and of the open-loop client (default 32)"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes of each proxy (default 1)")
    parser.add_argument("--runs", type=int, default=3, help="runs per proxy of each measurement, alternating (default 3)")
    parser.add_argument(
        "--write", type=Path, metavar="FILE", help="replace the proxy_vs_nginx section of this Markdown file with the results"
    )
    # Internal: the script starts itself with these to run a client or a CPU probe pinned to one CPU.
    parser.add_argument("--open-loop-client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cpu-probe", type=float, metavar="SECONDS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workers < 1 or args.runs < 1 or args.connections < 1 or args.duration <= 0:
        parser.error("--workers, --runs and --connections must be at least 1, and --duration above 0")
    return args


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    if args.open_loop_client:
        open_loop_main(args.open_loop_client, args.rate, args.duration, WARMUP_SECONDS, args.connections, args.result_file)
        return 0
    if args.cpu_probe:
        cpu_probe_main(args.cpu_probe)
        return 0

    # SIGINT too, because a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    command = shown_command()
    try:
        check_tools()
        facts = machine_facts()
        with tempfile.TemporaryDirectory(prefix="proxy-vs-nginx-") as workdir, Services(Path(workdir)) as services:
            run = benchmark(args, services)
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; every process the benchmark started was stopped", file=sys.stderr)
        return 130

    section = report_section(results_markdown(run, args), facts, command, args.workers)
    print(section)
    if args.write:
        try:
            write_section(args.write, section)
        except BenchmarkError as exc:
            print(f"benchmark finished, but writing the results failed: {exc}", file=sys.stderr)
            return 1
        print(f"wrote the results to {args.write}", file=sys.stderr)
    # Exit status 2 means a proxy failed under load, although the numbers were printed.
    return 2 if run.problems else 0


if __name__ == "__main__":
    sys.exit(main())
