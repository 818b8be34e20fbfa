"""Measure the shared-memory response cache (nexus/shm/cache.py), with LMDB on /dev/shm side by side.

Every figure is the median, over --runs runs, of the mean time per call in a
loop of --calls calls (Python loop overhead included), in microseconds. Values
are 1 KiB bodies with 64 bytes of meta under keys of about 25 bytes.

Measured:
  get hit / miss        one process, 1000 keys, C hash of the key
  get hit, xxh3 hash    the same with xxhash.xxh3_64_intdigest computed in Python
                        and passed in (the alternative to hashing in C)
  put overwrite         the same 1000 keys again: no eviction
  put with eviction     a 1 MiB budget for 1000 keys of about 1.2 KiB, so each
                        put evicts about one record
  get, writer running   one process reads while a second process puts other
                        keys in a loop (on the other CPU when there are two)
  put, reader running   that second process's mean time per put
  lmdb get / put        LMDB on tmpfs, one read or write transaction per call,
                        sync off (tmpfs keeps nothing across a reboot either);
                        skipped when the lmdb package is not installed

    .venv/bin/python benchmarks/shm_cache.py               # 5 runs of 100000 calls, about 15 s
    .venv/bin/python benchmarks/shm_cache.py --runs 3 --calls 50000

The lmdb package is not a project dependency: `.venv/bin/pip install lmdb`.
"""

from __future__ import annotations

import argparse
import mmap
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime

import xxhash

from nexus.shm import _native
from nexus.shm.cache import CacheStore

TTL_US = 600_000_000
KEY_COUNT = 1000
META = b"m" * 64
BODY = bytes(range(256)) * 4
# A writer process stops by itself after this many seconds if stop[0] is never set.
WRITER_LIMIT_SECONDS = 60


def machine_description() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{when}, {platform.machine()}, {cpu}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, Linux {platform.release()}"
    )


def make_keys(prefix: str) -> list[bytes]:
    return [f"/api/v1/{prefix}/{index}?page=2".encode() for index in range(KEY_COUNT)]


def time_per_call(action: Callable[[bytes], object], keys: list[bytes], calls: int) -> float:
    """Return the mean microseconds per call of `action` over `calls` calls cycling through `keys`."""
    rounds = max(1, calls // len(keys))
    started = time.perf_counter_ns()
    for _ in range(rounds):
        for key in keys:
            action(key)
    return (time.perf_counter_ns() - started) / (rounds * len(keys)) / 1000


def median_runs(action: Callable[[bytes], object], keys: list[bytes], calls: int, runs: int) -> list[float]:
    time_per_call(action, keys, min(calls, 10_000))  # warm caches and the branch predictor
    return [time_per_call(action, keys, calls) for _ in range(runs)]


def pin_to_cpu(cpu: int) -> None:
    available = sorted(os.sched_getaffinity(0))
    if len(available) > 1:
        os.sched_setaffinity(0, {available[cpu % len(available)]})


def start_writer(store: CacheStore, keys: list[bytes], stop: mmap.mmap) -> int:
    """Fork a process that puts `keys` in a loop until stop[0] is set, and return its pid.

    Before it exits, the process stores its mean nanoseconds per put in stop[8:16].
    """
    pid = os.fork()
    if pid != 0:
        return pid
    code = 1
    try:
        pin_to_cpu(1)
        deadline = time.monotonic() + WRITER_LIMIT_SECONDS
        puts = 0
        started = time.perf_counter_ns()
        while stop[0] == 0 and time.monotonic() < deadline:
            for key in keys:
                store.put(key, META, BODY, TTL_US)
            puts += len(keys)
        # Mean nanoseconds per put, for the report.
        stop[8:16] = ((time.perf_counter_ns() - started) // max(puts, 1)).to_bytes(8, "little")
        code = 0
    finally:
        os._exit(code)


def measure_cache(calls: int, runs: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    keys = make_keys("items")
    missing = make_keys("missing")

    store = CacheStore.create(capacity_bytes=64 << 20, max_entries=100_000, max_object_bytes=64 << 10)
    for key in keys:
        store.put(key, META, BODY, TTL_US)
    results["get hit"] = median_runs(store.get, keys, calls, runs)
    if any(store.get(key) is None for key in keys):
        raise RuntimeError("a key missed in the get hit row")
    results["get miss"] = median_runs(store.get, missing, calls, runs)
    results["put overwrite"] = median_runs(lambda key: store.put(key, META, BODY, TTL_US), keys, calls // 2, runs)
    store.close()

    # A fresh store read while another process writes other keys. The reader
    # reads every key before the writer starts, so their reference bytes are
    # set when the writer's evictions reach them (a put clears the byte).
    store = CacheStore.create(capacity_bytes=64 << 20, max_entries=100_000, max_object_bytes=64 << 10)
    for key in keys:
        store.put(key, META, BODY, TTL_US)
        store.get(key)
    stop = mmap.mmap(-1, mmap.PAGESIZE)
    writer = start_writer(store, make_keys("writer"), stop)
    try:
        results["get, writer running"] = median_runs(store.get, keys, calls, runs)
        hits = sum(store.get(key) is not None for key in keys)
    finally:
        stop[0] = 1
        _, status = os.waitpid(writer, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the writer process exited with status {status}")
    if hits < len(keys) * 0.99:
        raise RuntimeError(f"only {hits} of {len(keys)} keys were hits while the writer ran: the row would time misses")
    results["put, reader running"] = [int.from_bytes(stop[8:16], "little") / 1000]
    print(f"while the writer ran: {hits} of {len(keys)} keys were hits, stats {store.stats()}")
    store.close()

    hashed = CacheStore.create(capacity_bytes=64 << 20, max_entries=100_000, max_object_bytes=64 << 10)
    region = hashed.segment.region
    hash_key = xxhash.xxh3_64_intdigest
    cache_get = _native.cache_get
    for key in keys:
        _native.cache_put(region, key, META, BODY, TTL_US, 0, hash_key(key))
    results["get hit, xxh3 hash"] = median_runs(lambda key: cache_get(region, key, hash_key(key)), keys, calls, runs)
    if any(cache_get(region, key, hash_key(key)) is None for key in keys):
        raise RuntimeError("a key missed in the xxh3 get row")
    hashed.close()

    small = CacheStore.create(capacity_bytes=1 << 20, max_entries=4096, max_object_bytes=64 << 10)
    put_keys = make_keys("evicting") * 2
    results["put with eviction"] = median_runs(
        lambda key: small.put(key, META, BODY, TTL_US), put_keys, calls // 2, runs
    )
    if small.stats()["evictions"] == 0:
        raise RuntimeError("the eviction benchmark evicted nothing")
    small.close()
    return results


def measure_lmdb(calls: int, runs: int) -> tuple[dict[str, list[float]], str]:
    """Return the LMDB rows and a note naming the LMDB version, or no rows and why."""
    try:
        import lmdb
    except ImportError:
        return {}, "lmdb is not installed: skipped (.venv/bin/pip install lmdb)"

    directory = tempfile.mkdtemp(prefix="nexus-bench-lmdb-", dir="/dev/shm")
    try:
        environment = lmdb.open(directory, map_size=256 << 20, sync=False, metasync=False, writemap=True)
        keys = make_keys("items")
        value = META + BODY
        with environment.begin(write=True) as transaction:
            for key in keys:
                transaction.put(key, value)

        def get(key: bytes) -> bytes | None:
            with environment.begin() as transaction:
                return transaction.get(key)

        def put(key: bytes) -> None:
            with environment.begin(write=True) as transaction:
                transaction.put(key, value)

        results = {
            "lmdb get": median_runs(get, keys, calls, runs),
            "lmdb put": median_runs(put, keys, calls // 2, runs),
        }
        environment.close()
        library = ".".join(str(part) for part in lmdb.version())
        return results, f"lmdb: py-lmdb {lmdb.__version__}, LMDB {library}, sync=False metasync=False writemap=True"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement (default 5)")
    parser.add_argument(
        "--calls", type=int, default=100_000, help="calls per run of a get (puts do half; default 100000)"
    )
    options = parser.parse_args()
    if options.runs < 1 or not 1000 <= options.calls <= 1_000_000:
        parser.error("--runs must be at least 1 and --calls between 1000 and 1000000")

    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"shm cache benchmark: {machine_description()}")
    print(f"{options.runs} runs per row; get rows {options.calls} calls per run, put rows {options.calls // 2}")
    pin_to_cpu(0)
    started = time.monotonic()

    rows = measure_cache(options.calls, options.runs)
    lmdb_rows, lmdb_note = measure_lmdb(options.calls, options.runs)
    rows.update(lmdb_rows)

    print(f"\n{'operation (1 KiB body)':<28}{'median us':>10}{'min us':>10}{'max us':>10}")
    for name, samples in rows.items():
        print(f"{name:<28}{statistics.median(samples):>10.3f}{min(samples):>10.3f}{max(samples):>10.3f}")
    print("'put, reader running' is one mean over the writer process's whole loop, not a median of runs.")
    print(lmdb_note)
    print(f"\nfinished in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
