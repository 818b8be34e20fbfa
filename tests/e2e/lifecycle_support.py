"""Helpers for the lifecycle, failover, streaming and CLI end-to-end tests.

Everything here runs on 127.0.0.1: a steady-rate HTTP client thread, an
upstream that returns 503 for every request, readers of /proc/PID/status and
a sampler of worker memory.
"""

from __future__ import annotations

import http.client
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Errors that mean the gateway closed or reset a connection under a request.
CONNECTION_ERRORS = (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead, TimeoutError)

_EXITED_LINE = re.compile(
    r"worker exited unexpectedly worker=(\d+) pid=(\d+) status=(.+?) lived_s=(\S+) restart_in_s=(\S+)"
)


def gateway_config(
    targets: list[str],
    *,
    workers: int = 2,
    shutdown_timeout: str | None = None,
    upstream_settings: str = "",
    max_body: str | None = None,
) -> str:
    """Return a config with one upstream `app` over `targets` and one catch-all route.

    `upstream_settings` is extra YAML flow-mapping entries for the upstream,
    such as `health: {path: /healthz}`, without the leading comma.
    """
    target_list = ", ".join(f'"{target}"' for target in targets)
    extra = f", {upstream_settings}" if upstream_settings else ""
    lines = ['listen: ["127.0.0.1:0"]', f"workers: {workers}"]
    if shutdown_timeout is not None:
        lines.append(f"shutdown_timeout: {shutdown_timeout}")
    if max_body is not None:
        lines.append(f"limits: {{max_body: {max_body}}}")
    lines += [
        "upstreams:",
        f"  app: {{targets: [{target_list}]{extra}}}",
        "routes:",
        "  - {name: all, upstream: app}",
        "",
    ]
    return "\n".join(lines)


def host_port(address: str) -> tuple[str, int]:
    """Split "127.0.0.1:8080" into ("127.0.0.1", 8080)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


# /proc readers


def proc_status(pid: int) -> dict[str, str]:
    """Return the fields of /proc/PID/status, or {} if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as file:
            text = file.read()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


def is_running(pid: int) -> bool:
    """Return whether `pid` exists and is not a zombie."""
    state = proc_status(pid).get("State", "")
    return bool(state) and not state.startswith(("Z", "X"))


def child_pids(parent: int) -> list[int]:
    """Return the pids of the running processes whose parent is `parent`."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and proc_status(int(entry)).get("PPid") == str(parent) and is_running(int(entry)):
            children.append(int(entry))
    return sorted(children)


def rss_bytes(pid: int) -> int | None:
    """Return the resident set size of `pid` in bytes, or None if it is gone."""
    value = proc_status(pid).get("VmRSS")
    if value is None:
        return None
    number, unit = value.split()
    assert unit == "kB", f"unexpected VmRSS unit in /proc/{pid}/status: {value!r}"
    return int(number) * 1024


def exited_lines(log: str) -> list[dict[str, str]]:
    """Return the master's 'worker exited unexpectedly' lines as dicts, in log order."""
    return [
        {"worker": match[1], "pid": match[2], "status": match[3], "lived_s": match[4], "restart_in_s": match[5]}
        for match in _EXITED_LINE.finditer(log)
    ]


# Steady-rate client


@dataclass
class RequestRecord:
    """One GET as the client saw it: when it started and ended, its outcome and the upstream."""

    started: float  # time.monotonic()
    finished: float  # time.monotonic()
    status: int | None  # None when both attempts failed
    upstream: str | None  # the x-upstream response header
    first_error: str | None  # the error of the first attempt, if it failed
    final_error: str | None  # the error of the retry, when the retry failed too


@dataclass
class SteadyClient:
    """Sends GET `path` to `address` at `rate` requests per second from one thread.

    Each request uses a new connection, so the listening socket spreads them
    over all workers. A request whose connection is reset or closed before
    the response is retried once, as an HTTP client may do for an idempotent
    method, and `records` keeps both outcomes. The thread stops at `stop()`
    or after `max_seconds`, whichever comes first.
    """

    address: str
    path: str = "/status/200"
    rate: float = 50.0
    timeout: float = 5.0
    max_seconds: float = 30.0
    records: list[RequestRecord] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> SteadyClient:
        self._thread = threading.Thread(target=self._run, name="steady-client", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[RequestRecord]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout * 2 + 1)
        return self.records

    def __enter__(self) -> SteadyClient:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        interval = 1.0 / self.rate
        started = time.monotonic()
        next_at = started
        while not self._stop.is_set() and time.monotonic() - started < self.max_seconds:
            self.records.append(self._request())
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = time.monotonic()

    def _request(self) -> RequestRecord:
        started = time.monotonic()
        first_error = None
        for attempt in range(2):
            try:
                status, upstream = get(self.address, self.path, self.timeout)
                return RequestRecord(started, time.monotonic(), status, upstream, first_error, None)
            except CONNECTION_ERRORS as exc:
                if attempt == 0:
                    first_error = repr(exc)
                else:
                    return RequestRecord(started, time.monotonic(), None, None, first_error, repr(exc))
        raise AssertionError("unreachable")


@dataclass
class LoadRecord:
    """One request of a LoadClient as the downstream saw it."""

    method: str
    keep_alive: bool  # sent on a connection kept open across requests
    started: float  # time.monotonic()
    finished: float  # time.monotonic()
    status: int | None  # None when the request failed
    first_error: str | None  # the error of the first attempt, if it failed
    final_error: str | None  # the error that failed the request (after the retry, for GET)

    @property
    def failed(self) -> bool:
        return self.final_error is not None

    @property
    def latency(self) -> float:
        return self.finished - self.started


# Body of each POST of a LoadClient; the upstream's /upload returns its length.
POST_BODY = b"p" * 2048


@dataclass
class LoadClient:
    """Keeps `concurrency` requests in flight against `address` from as many threads.

    Even-numbered threads keep one connection open across requests, odd ones
    open a new connection per request, and each thread alternates GET /echo
    and POST /upload with a 2 KiB body. A request whose connection is reset
    or closed before a response is retried once on a new connection, as an
    HTTP client may do for an idempotent request (RFC 9110 section 9.2.2):
    GET is idempotent, and each POST carries an Idempotency-Key header,
    which makes it one a client may replay (Go's net/http replays such
    requests too). `records` keeps every request, and `first_error` shows
    the raw resets the retry hid. Threads stop at `stop()` or after
    `max_seconds`.
    """

    address: str
    concurrency: int = 4
    timeout: float = 10.0
    max_seconds: float = 120.0
    records: list[LoadRecord] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> LoadClient:
        for index in range(self.concurrency):
            thread = threading.Thread(target=self._run, args=(index % 2 == 0,), name=f"load-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> list[LoadRecord]:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout * 2 + 1)
        return self.records

    def __enter__(self) -> LoadClient:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, keep_alive: bool) -> None:
        host, port = host_port(self.address)
        connection: http.client.HTTPConnection | None = None
        deadline = time.monotonic() + self.max_seconds
        methods = ("GET", "POST")
        turn = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            if connection is None:
                connection = http.client.HTTPConnection(host, port, timeout=self.timeout)
            method = methods[turn % 2]
            turn += 1
            record, reusable = self._request(connection, method, keep_alive)
            self.records.append(record)
            if not (keep_alive and reusable):
                connection.close()
                connection = None
        if connection is not None:
            connection.close()

    def _request(self, connection: http.client.HTTPConnection, method: str, keep_alive: bool) -> tuple[LoadRecord, bool]:
        """Send one request (and for GET one retry); return its record and whether the connection stays usable."""
        started = time.monotonic()
        first_error = None
        for attempt in range(2):
            try:
                status, reusable = _exchange(connection, method)
                return LoadRecord(method, keep_alive, started, time.monotonic(), status, first_error, None), reusable
            except CONNECTION_ERRORS as exc:
                connection.close()
                if attempt == 1:
                    error = repr(exc)
                    return LoadRecord(method, keep_alive, started, time.monotonic(), None, first_error or error, error), False
                first_error = repr(exc)
        raise AssertionError("unreachable")


def _exchange(connection: http.client.HTTPConnection, method: str) -> tuple[int, bool]:
    """Send one request on `connection`; return the status and whether the server keeps the connection."""
    if method == "GET":
        connection.request("GET", "/echo")
    else:
        connection.request("POST", "/upload", body=POST_BODY, headers={"Idempotency-Key": uuid.uuid4().hex})
    response = connection.getresponse()
    body = response.read()
    if method == "POST" and response.status == 200 and body != str(len(POST_BODY)).encode():
        raise AssertionError(f"POST /upload answered {body!r}, expected the body length {len(POST_BODY)}")
    return response.status, not response.will_close


def describe_load(records: list[LoadRecord]) -> str:
    """Describe LoadClient records in one line: counts by outcome, resets, failures, latency."""
    statuses: dict[str, int] = {}
    for record in records:
        key = f"{record.method} {record.status if record.status is not None else 'failed'}"
        statuses[key] = statuses.get(key, 0) + 1
    resets = sum(1 for record in records if record.first_error)
    failures = [
        f"{record.method} {'keep-alive' if record.keep_alive else 'new connection'}: {record.final_error}"
        for record in records
        if record.failed
    ]
    latencies = sorted(record.latency for record in records)
    p99 = latencies[int(len(latencies) * 0.99)] if latencies else 0.0
    return (
        f"{len(records)} requests, {statuses}, raw resets {resets}, failed {len(failures)} "
        f"{failures[:3]}, p99 {p99 * 1000:.1f} ms"
    )


def assert_no_request_failed(records: list[LoadRecord], label: str, record_property) -> str:
    """Assert that every LoadClient request got a 200; report the summary (with raw resets) as a test property."""
    summary = describe_load(records)
    record_property(label, summary)
    print(f"{label}: {summary}")
    assert [record for record in records if record.failed] == [], summary
    assert {record.status for record in records} == {200}, summary
    return summary


def get(address: str, path: str, timeout: float = 5.0) -> tuple[int, str | None]:
    """Send one GET on a new connection; return the status and the x-upstream header."""
    host, port = host_port(address)
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status, response.getheader("x-upstream")
    finally:
        connection.close()


def summarize(records: list[RequestRecord]) -> str:
    """Describe client records in one line for assertion messages."""
    statuses: dict[str, int] = {}
    for record in records:
        key = str(record.status) if record.status is not None else "failed"
        statuses[key] = statuses.get(key, 0) + 1
    resets = sum(1 for record in records if record.first_error)
    return f"{len(records)} requests, statuses {statuses}, {resets} first attempts reset"


# Reloads and upgrades


def wait_log_count(read_log, text: str, count: int, timeout: float = 30.0) -> str:
    """Wait until `text` occurs `count` times in the log `read_log()` returns; return the log."""
    deadline = time.monotonic() + timeout
    while True:
        log = read_log()
        if log.count(text) >= count:
            return log
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {count} x {text!r} in the log:\n{log[-4000:]}")
        time.sleep(0.02)


def signal_and_wait(read_log, pid: int, signum: int, outcomes: tuple[str, ...], timeout: float = 30.0) -> str:
    """Send `signum` to `pid` and wait for one more of the log lines `outcomes`; return the one that came."""
    before = {text: read_log().count(text) for text in outcomes}
    os.kill(pid, signum)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = read_log()
        for text in outcomes:
            if log.count(text) > before[text]:
                return text
        time.sleep(0.02)
    raise AssertionError(f"no {outcomes} in the log {timeout} s after signal {signum}:\n{read_log()[-4000:]}")


# An upstream that always fails


class _ServiceUnavailableHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "test-503"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base class signature
        pass

    def do_GET(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.requests += 1  # type: ignore[attr-defined]
        self.send_response(503)
        self.send_header("X-Upstream", self.server.name)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET


class ServiceUnavailableUpstream:
    """An HTTP/1.1 server on 127.0.0.1 that returns 503 for every request on every path."""

    def __init__(self, name: str) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _ServiceUnavailableHandler)
        self.server.daemon_threads = True
        self.server.name = name  # type: ignore[attr-defined]
        self.server.requests = 0  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self.server.serve_forever, name=f"upstream-{name}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def requests(self) -> int:
        return self.server.requests  # type: ignore[attr-defined]

    def __enter__(self) -> ServiceUnavailableUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


# Memory sampling


class RssSampler:
    """Samples VmRSS of some pids every `interval` seconds in a thread and keeps each pid's peak."""

    def __init__(self, pids: list[int], interval: float = 0.02, max_seconds: float = 120.0) -> None:
        self.pids = list(pids)
        self.interval = interval
        self.max_seconds = max_seconds
        self.baseline = {pid: rss_bytes(pid) or 0 for pid in self.pids}
        self.peak = dict(self.baseline)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            for pid in self.pids:
                rss = rss_bytes(pid)
                if rss is not None and rss > self.peak[pid]:
                    self.peak[pid] = rss
            self.samples += 1
            self._stop.wait(self.interval)

    def growth(self) -> dict[int, int]:
        """Return each pid's peak RSS minus its baseline, in bytes."""
        return {pid: self.peak[pid] - self.baseline[pid] for pid in self.pids}

    def report(self) -> str:
        """Describe baseline, peak and growth per pid in MiB, for assertion messages."""
        parts = [
            f"pid {pid}: baseline {self.baseline[pid] / 2**20:.1f} MiB, peak {self.peak[pid] / 2**20:.1f} MiB, "
            f"growth {(self.peak[pid] - self.baseline[pid]) / 2**20:.1f} MiB"
            for pid in self.pids
        ]
        return "; ".join(parts) + f" ({self.samples} samples)"


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait up to `timeout` seconds for every pid to exit; return those still running."""
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if is_running(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [pid for pid in alive if is_running(pid)]
    return alive


def kill_quietly(pid: int, signum: int) -> None:
    """Send `signum` to `pid`, ignoring a process that is already gone."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
