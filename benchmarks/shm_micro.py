"""Micro-benchmarks of the shared-memory primitives in nexus.shm, as called from Python.

Each row is the median over `--runs` runs (default 7) of one loop of `--ops`
operations (default 100,000), in microseconds per operation. The time
includes the Python loop and call overhead, because that is what a worker
pays; the "Python loop overhead" row shows that share alone. The contended
row runs the same loop in two forked processes pinned to different CPUs,
each measuring its own runs, and reports the median of the two per-process
medians.

    .venv/bin/python benchmarks/shm_micro.py
    .venv/bin/python benchmarks/shm_micro.py --runs 9 --ops 200000

It prints the machine, the date and a markdown table. It runs for well
under a minute on a 2-CPU x86-64 VM with the defaults.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import mmap
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nexus.shm import _native
from nexus.shm.ratelimit import GcraTable, QuotaTable, key_hash
from nexus.shm.ring import RingSet

# interval_us = 1 with a huge burst: every decision is allowed, so each one
# takes the compare-and-swap path (a denial only loads the state word).
GCRA_INTERVAL_US = 1
GCRA_LIMIT_US = 10**12
QUOTA_WINDOW_US = 60_000_000
QUOTA_LIMIT = 2**32 - 1


@dataclass
class Row:
    operation: str
    median_us: float
    spread_us: tuple[float, float]
    target_us: float | None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", type=int, default=7, help="runs per operation, of which the median is reported (default 7)"
    )
    parser.add_argument("--ops", type=int, default=100_000, help="operations per run (default 100000)")
    args = parser.parse_args()
    if args.runs < 1 or args.ops < 1:
        parser.error(f"--runs and --ops must be at least 1, got {args.runs} and {args.ops}")
    return args


def cpu_model() -> str:
    """Return the CPU model from /proc/cpuinfo, or the platform's processor string where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("model name", "Hardware", "cpu model"):
            return value.strip()
    return platform.processor() or "unknown"


def time_loop(loop: Callable[[int], None], ops: int) -> float:
    """Run `loop(ops)` once with the garbage collector off and return microseconds per operation."""
    gc.disable()
    try:
        started = time.perf_counter_ns()
        loop(ops)
        elapsed_ns = time.perf_counter_ns() - started
    finally:
        gc.enable()
    return elapsed_ns / ops / 1000


def measure(loop: Callable[[int], None], runs: int, ops: int) -> list[float]:
    """Per-operation times of `runs` runs, after one untimed warm-up run of a tenth of the size."""
    loop(max(ops // 10, 1))
    return [time_loop(loop, ops) for _ in range(runs)]


# ---- the loops ----


def fetch_add_loop(region: _native.Region) -> Callable[[int], None]:
    def loop(ops: int) -> None:
        fetch_add = region.fetch_add
        for _ in range(ops):
            fetch_add(0, 1)

    return loop


def empty_loop(ops: int) -> None:
    make_zero = int
    for _ in range(ops):
        make_zero()


def gcra_loop(table: GcraTable) -> Callable[[int], None]:
    def loop(ops: int) -> None:
        acquire = table.acquire
        for _ in range(ops):
            acquire(key_hash("tenant-1"), GCRA_INTERVAL_US, GCRA_LIMIT_US)

    return loop


def native_gcra_loop(table: GcraTable) -> Callable[[int], None]:
    """Build a loop of the C decision alone, with a precomputed hash and no Decision tuple, to show the wrapper's share."""
    key = key_hash("tenant-1")
    arguments = (table.segment.region, table.segment.payload_offset_words * 8, table.slots, key)

    def loop(ops: int) -> None:
        gcra_acquire = _native.gcra_acquire
        region, offset, slots, key = arguments
        for _ in range(ops):
            gcra_acquire(region, offset, slots, key, GCRA_INTERVAL_US, GCRA_LIMIT_US, 1, 0)

    return loop


def quota_loop(table: QuotaTable) -> Callable[[int], None]:
    def loop(ops: int) -> None:
        acquire = table.acquire
        for _ in range(ops):
            acquire(key_hash("tenant-1"), QUOTA_WINDOW_US, QUOTA_LIMIT)

    return loop


def fill_ring(rings: RingSet, ops: int) -> None:
    push = rings[0].push
    for sequence in range(ops):
        push(1, sequence, 3, 4, 5, 6, 7, 8)


def measure_ring(rings: RingSet, runs: int, ops: int) -> tuple[list[float], list[float]]:
    """Time `ops` pushes into an empty ring, then one drain of them all, and return per-operation times of both.

    The ring has room for at least `ops` records, so no push is dropped. The first
    run is a warm-up and is left out.
    """
    ring = rings[0]
    pushes, drains = [], []
    for run in range(runs + 1):
        ring.drain()
        push_us = time_loop(lambda count: fill_ring(rings, count), ops)
        drain_us = time_loop(lambda count: ring.drain(count), ops)
        if run > 0:
            pushes.append(push_us)
            drains.append(drain_us)
    dropped = ring.counts().dropped
    if dropped:
        raise RuntimeError(f"the ring dropped {dropped} records, so push times are not comparable. Use a larger ring.")
    return pushes, drains


def measure_contended(loop: Callable[[int], None], runs: int, ops: int) -> tuple[list[float], list[int]]:
    """Run `loop` in two forked processes at once and return each one's median and the CPUs they ran on.

    The processes start each run together: both raise a shared counter and
    spin until it reaches the run's expected value, so their timed loops overlap.
    """
    cpus = sorted(os.sched_getaffinity(0))
    pinned = cpus[:2] if len(cpus) >= 2 else []
    sync = _native.Region(mmap.mmap(-1, 4096))  # word 0: processes that reached each run's start
    read_fds = []
    pids = []
    try:
        for index in range(2):
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.close(read_fd)
                    if pinned:
                        os.sched_setaffinity(0, {pinned[index]})
                    loop(max(ops // 10, 1))
                    timings = []
                    for run in range(runs):
                        sync.fetch_add(0, 1)
                        deadline = time.monotonic() + 10
                        while sync.load(0) < 2 * (run + 1) and time.monotonic() < deadline:
                            pass
                        timings.append(time_loop(loop, ops))
                    os.write(write_fd, repr(statistics.median(timings)).encode())
                    code = 0
                finally:
                    os._exit(code)
            os.close(write_fd)
            read_fds.append(read_fd)
            pids.append(pid)

        medians = []
        for read_fd in read_fds:
            text = b""
            while chunk := os.read(read_fd, 64):
                text += chunk
            if not text:
                raise RuntimeError("a contending benchmark process exited without reporting its timings")
            medians.append(float(text))
        return medians, pinned
    finally:
        for read_fd in read_fds:
            os.close(read_fd)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)


def summarize(operation: str, timings: list[float], target_us: float | None) -> Row:
    return Row(operation, statistics.median(timings), (min(timings), max(timings)), target_us)


def format_table(rows: list[Row]) -> str:
    lines = [
        "| Operation | Median (us/op) | Min-max of runs | Target (us/op) | Meets target |",
        "|---|---:|---:|---:|---|",
    ]
    for row in rows:
        target = "-"
        meets = "-"
        if row.target_us is not None:
            target = f"<= {row.target_us:g}"
            meets = "yes" if row.median_us <= row.target_us else "no"
        spread = f"{row.spread_us[0]:.3f}-{row.spread_us[1]:.3f}"
        lines.append(f"| {row.operation} | {row.median_us:.3f} | {spread} | {target} | {meets} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    runs, ops = args.runs, args.ops
    started = time.monotonic()
    cpus = sorted(os.sched_getaffinity(0))

    print(f"date:     {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}")
    print(f"machine:  {platform.machine()}, {cpu_model()}, {os.cpu_count()} CPUs ({len(cpus)} usable)")
    print(f"python:   {platform.python_implementation()} {platform.python_version()}")
    print(f"method:   median of {runs} runs x {ops} operations, after one warm-up run")
    print()

    region = _native.Region(mmap.mmap(-1, 4096))
    gcra = GcraTable.create(1024)
    quota = QuotaTable.create(1024)
    rings = RingSet.create(1, ops)

    # Pin the single-process rows to one CPU so they do not migrate mid-run.
    original_affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[0]})
    try:
        ring_pushes, ring_drains = measure_ring(rings, runs, ops)
        rows = [
            summarize("Python loop overhead (an int() call)", measure(empty_loop, runs, ops), None),
            summarize("Region.fetch_add", measure(fetch_add_loop(region), runs, ops), None),
            summarize("GcraTable.acquire + key_hash, one hot key, 1 process", measure(gcra_loop(gcra), runs, ops), 1.0),
            summarize(
                "_native.gcra_acquire alone (hash precomputed, raw tuple)",
                measure(native_gcra_loop(gcra), runs, ops),
                None,
            ),
            summarize(
                "QuotaTable.acquire + key_hash, one hot key, 1 process", measure(quota_loop(quota), runs, ops), 1.0
            ),
            summarize("Ring push (8 words)", ring_pushes, 0.5),
            summarize("Ring drain, per record (to a list of tuples)", ring_drains, None),
        ]
    finally:
        os.sched_setaffinity(0, original_affinity)

    medians, pinned = measure_contended(gcra_loop(gcra), runs, ops)
    placement = f"CPUs {pinned[0]} and {pinned[1]}" if pinned else "unpinned, 1 CPU"
    rows.insert(
        3,
        Row(
            f"GcraTable.acquire + key_hash, same key, 2 processes ({placement})",
            statistics.median(medians),
            (min(medians), max(medians)),
            2.0,
        ),
    )

    print(format_table(rows))
    print()
    print(
        "Min-max of runs: fastest and slowest run; for the 2-process row, the two per-process medians. "
        f"Total time {time.monotonic() - started:.1f} s."
    )


if __name__ == "__main__":
    main()
