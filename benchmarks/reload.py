"""Requests lost and latency while the gateway reloads its config under load.

    .venv/bin/python benchmarks/reload.py                 # 3 runs, 1 reload each
    .venv/bin/python benchmarks/reload.py --runs 5 --upgrade

Each run starts a test upstream (tests/upstream_server.py) and a gateway
with two workers on 127.0.0.1. It measures the capacity of the gateway with
the client in this script in closed loop (32 keep-alive connections, each
sending its next GET /echo when the last response arrives), so the client's
own CPU use is part of the capacity on this 2-CPU machine. Then it offers
half of that in open loop: request k is due at k / rate and its latency
counts from that moment, so a stall during the reload shows in the numbers
instead of slowing the client down. After `--before` seconds
the script sends SIGHUP (or, with `--upgrade`, SIGUSR2) and waits for the
master to log that the new generation serves and the old one is gone.

A GET that fails on a kept-alive connection (the server closed it while it
sat idle in the client's pool, the race every HTTP/1.1 client meets) is
retried once on a new connection, as HTTP clients do for idempotent
requests; `resets` counts those first attempts. A request is lost when it
still got no 200: a connection error or any other status. The report gives,
per run and as medians over the runs: resets and lost requests before the
signal (the same-run reference), in the window from the signal until the
old generation is gone plus one second, and after it; and p50 and p99
latency before the signal and in the window.

Every process this script starts stops when it ends, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = ROOT / "tests" / "upstream_server.py"
PYTHON = sys.executable

# Keep-alive connections the client starts with. In open loop a request due
# while all are busy opens a new one, up to MAX_CONNECTIONS.
CONNECTIONS = 32
MAX_CONNECTIONS = 256
REQUEST = b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@dataclass
class Sample:
    due: float  # time.monotonic() when the request was due
    latency: float  # seconds from due to the end of the response
    status: int  # the response status, 0 for a connection error
    reset: bool  # the first attempt failed on a kept-alive connection and was retried

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class RunResult:
    capacity: float
    rate: float
    sent: int
    lost_before: int  # before the signal: the same-run reference
    lost_during: int  # from the signal until the old generation is gone plus one second
    lost_after: int
    lost_kinds: dict[str, int]
    resets_before: int
    resets_during: int
    before_p50_ms: float
    before_p99_ms: float
    during_p50_ms: float
    during_p99_ms: float
    switch_s: float  # from the signal to "the old generation is gone"


@dataclass
class _Pool:
    host: str
    port: int
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)
    opened: int = 0
    freed: asyncio.Event = field(default_factory=asyncio.Event)

    async def take(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Return an idle connection, a new one below MAX_CONNECTIONS, or the next one freed."""
        while not self.idle and self.opened >= MAX_CONNECTIONS:
            self.freed.clear()
            await self.freed.wait()
        if self.idle:
            return self.idle.pop()
        self.opened += 1
        try:
            return await asyncio.open_connection(self.host, self.port)
        except OSError:
            self.opened -= 1
            raise

    def give_back(self, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], reusable: bool) -> None:
        if reusable:
            self.idle.append(connection)
        else:
            connection[1].close()
            self.opened -= 1
        self.freed.set()


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, bool]:
    """Send one GET and read the response; return its status and whether the connection is reusable."""
    writer.write(REQUEST)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head).group(1))
    await reader.readexactly(length)
    return status, not re.search(rb"(?i)\r\nconnection:\s*close", head)


async def _one_request(pool: _Pool, due: float, samples: list[Sample]) -> None:
    reused = bool(pool.idle)
    status = await _attempt(pool)
    reset = status == 0 and reused
    if reset:
        status = await _attempt(pool, fresh=True)
    samples.append(Sample(due, time.monotonic() - due, status, reset))


async def _attempt(pool: _Pool, fresh: bool = False) -> int:
    """Send one GET on a pooled connection (or a new one); return its status, 0 for a connection error."""
    status = 0
    try:
        if fresh:
            pool.opened += 1
            connection = await asyncio.open_connection(pool.host, pool.port)
        else:
            connection = await pool.take()
    except OSError:
        pool.opened -= fresh
        return status
    reusable = False
    try:
        status, reusable = await _exchange(*connection)
    except (OSError, asyncio.IncompleteReadError, AttributeError, ValueError):
        pass
    pool.give_back(connection, reusable)
    return status


async def closed_loop_rate(host: str, port: int, seconds: float) -> float:
    """Return the responses per second that CONNECTIONS connections get, each waiting for its last response."""
    done = 0
    deadline = time.monotonic() + seconds

    async def one_connection() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection(host, port)
        while time.monotonic() < deadline:
            status, reusable = await _exchange(reader, writer)
            done += status == 200
            if not reusable:
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
        writer.close()

    started = time.monotonic()
    await asyncio.gather(*(one_connection() for _ in range(CONNECTIONS)))
    return done / (time.monotonic() - started)


async def offer_load(host: str, port: int, rate: float, seconds: float, samples: list[Sample]) -> None:
    """Start requests at `rate` per second for `seconds`, open loop; wait for the last ones."""
    pool = _Pool(host, port)
    for _ in range(CONNECTIONS):
        pool.idle.append(await asyncio.open_connection(host, port))
    pool.opened = CONNECTIONS
    start = time.monotonic()
    total = int(rate * seconds)
    tasks = set()
    for index in range(total):
        due = start + index / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(_one_request(pool, due, samples))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    for _, writer in pool.idle:
        writer.close()


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else 0.0


def _wait_log(path: Path, text: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while path.read_text(errors="replace").count(text) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {text!r} in {path}")
        time.sleep(0.01)


def one_run(workdir: Path, args: argparse.Namespace, index: int) -> RunResult:
    processes: list[subprocess.Popen] = []
    try:
        upstream = subprocess.Popen([PYTHON, str(UPSTREAM), "0", "a"], stdout=subprocess.PIPE, text=True)
        processes.append(upstream)
        upstream_port = int(re.search(r"on (\d+)", upstream.stdout.readline()).group(1))
        config = workdir / f"nexus-{index}.yaml"
        config.write_text(
            'listen: ["127.0.0.1:0"]\nworkers: 2\nshutdown_timeout: 10s\n'
            f'admin: {{socket: "{workdir}/admin-{index}.sock", metrics: null}}\n'
            f'upstreams:\n  app: {{targets: ["http://127.0.0.1:{upstream_port}"]}}\n'
            "routes:\n  - {name: all, upstream: app}\n"
        )
        log = workdir / f"nexus-{index}.log"
        with open(log, "wb") as log_file:
            gateway = subprocess.Popen(
                [PYTHON, "-m", "nexus", "run", "--config", str(config)], stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT
            )
        processes.append(gateway)
        _wait_log(log, "worker serving", 2, 30)
        address = re.search(r"listening address=(\S+)", log.read_text()).group(1)
        host, port = address.rsplit(":", 1)

        capacity = asyncio.run(closed_loop_rate(host, int(port), args.capacity_seconds))
        rate = capacity * args.load
        samples: list[Sample] = []
        seconds = args.before + args.after
        marks: dict[str, float] = {}

        async def run() -> None:
            load = asyncio.ensure_future(offer_load(host, int(port), rate, seconds, samples))
            await asyncio.sleep(args.before)
            marks["signal"] = time.monotonic()
            os.kill(gateway.pid, signal.SIGUSR2 if args.upgrade else signal.SIGHUP)
            gone = "generation gone generation=1"
            await asyncio.to_thread(_wait_log, log, gone, 1, 60)
            marks["gone"] = time.monotonic()
            await load

        asyncio.run(run())
        window_end = marks["gone"] + 1.0
        before = [s for s in samples if s.due < marks["signal"]]
        during = [s for s in samples if marks["signal"] <= s.due <= window_end]
        after = [s for s in samples if s.due > window_end]
        kinds: dict[str, int] = {}
        for sample in samples:
            if not sample.ok:
                kind = "connection error" if sample.status == 0 else str(sample.status)
                kinds[kind] = kinds.get(kind, 0) + 1
        return RunResult(
            capacity=capacity,
            rate=rate,
            sent=len(samples),
            lost_before=sum(1 for s in before if not s.ok),
            lost_during=sum(1 for s in during if not s.ok),
            lost_after=sum(1 for s in after if not s.ok),
            lost_kinds=kinds,
            resets_before=sum(1 for s in before if s.reset),
            resets_during=sum(1 for s in during if s.reset),
            before_p50_ms=_percentile([s.latency for s in before], 0.5) * 1000,
            before_p99_ms=_percentile([s.latency for s in before], 0.99) * 1000,
            during_p50_ms=_percentile([s.latency for s in during], 0.5) * 1000,
            during_p99_ms=_percentile([s.latency for s in during], 0.99) * 1000,
            switch_s=marks["gone"] - marks["signal"],
        )
    finally:
        _stop_all(processes, workdir)


def _stop_all(processes: list[subprocess.Popen], workdir: Path) -> None:
    """Stop what this run started, and a master that an upgrade started (named in the log)."""
    pids = set()
    for log in workdir.glob("nexus-*.log"):
        pids |= {int(pid) for pid in re.findall(r"took_over_from=\d+|master started pid=(\d+)", log.read_text()) if pid}
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for process in processes:
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def report(results: list[RunResult], args: argparse.Namespace) -> str:
    action = "upgrade (SIGUSR2)" if args.upgrade else "reload (SIGHUP)"
    lines = [
        f"Command: `.venv/bin/python benchmarks/reload.py --runs {args.runs}{' --upgrade' if args.upgrade else ''}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}; "
        f"date {time.strftime('%Y-%m-%d', time.gmtime())}. Gateway: 2 workers, one catch-all route to tests/upstream_server.py.",
        "",
        f"| run | capacity req/s | offered req/s | requests | resets before | resets during | lost before | lost during "
        f"| lost after | p50 before ms | p99 before ms | p50 during {action} ms | p99 during ms | signal to old generation gone s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for number, r in enumerate(results, 1):
        lines.append(
            f"| {number} | {r.capacity:.0f} | {r.rate:.0f} | {r.sent} | {r.resets_before} | {r.resets_during} "
            f"| {r.lost_before} | {r.lost_during} | {r.lost_after} "
            f"| {r.before_p50_ms:.1f} | {r.before_p99_ms:.1f} | {r.during_p50_ms:.1f} | {r.during_p99_ms:.1f} | {r.switch_s:.2f} |"
        )

    def median(name: str) -> float:
        return statistics.median(getattr(r, name) for r in results)

    lines.append(
        f"| median | {median('capacity'):.0f} | {median('rate'):.0f} | {median('sent'):.0f} | {median('resets_before'):.0f} "
        f"| {median('resets_during'):.0f} | {median('lost_before'):.0f} "
        f"| {median('lost_during'):.0f} | {median('lost_after'):.0f} "
        f"| {median('before_p50_ms'):.1f} | {median('before_p99_ms'):.1f} | {median('during_p50_ms'):.1f} "
        f"| {median('during_p99_ms'):.1f} | {median('switch_s'):.2f} |"
    )
    lines.append("")
    lines.append("Lost requests by kind, per run: " + "; ".join(f"{n}: {r.lost_kinds or 'none'}" for n, r in enumerate(results, 1)))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--load", type=float, default=0.5, help="fraction of the measured capacity to offer")
    parser.add_argument("--before", type=float, default=3.0, help="seconds of load before the signal")
    parser.add_argument("--after", type=float, default=4.0, help="seconds of load after the signal")
    parser.add_argument("--capacity-seconds", type=float, default=3.0, help="seconds of the closed-loop capacity run")
    parser.add_argument("--upgrade", action="store_true", help="upgrade (SIGUSR2) instead of reload (SIGHUP)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="nexus-reload-bench-"))
    try:
        results = [one_run(workdir, args, index) for index in range(args.runs)]
    except KeyboardInterrupt:
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
