"""Shared-memory response cache: geometry at its limits and killed writers, across real forks."""

from __future__ import annotations

import mmap
import os
import random
import signal
import time

import pytest

from nexus.shm.cache import _LOCK as LOCK_WORD
from nexus.shm.cache import RECORD_HEADER_BYTES, CacheStore
from tests.forking import collect, fork_with_result

TTL_US = 60_000_000
LOCK_OFFSET = LOCK_WORD * 8


def _record_bytes(object_bytes: int) -> int:
    return (RECORD_HEADER_BYTES + object_bytes + 7) // 8 * 8


# ---- capacity of exactly one largest record ------------------------------------------


@pytest.mark.parametrize("max_object_bytes", [8, 1000, 4040])
def test_exact_fit_capacity_stores_largest_object(max_object_bytes):
    # create() accepts a capacity equal to the largest record rounded up to 8
    # bytes. When RECORD_HEADER_BYTES + max_object_bytes is already a multiple
    # of 8, every native call must accept that geometry too.
    capacity = _record_bytes(max_object_bytes)
    store = CacheStore.create(capacity_bytes=capacity, max_entries=4, max_object_bytes=max_object_bytes)
    key = b"/k"
    meta = b"m"
    body = bytes(range(256)) * (max_object_bytes // 256 + 1)
    body = body[: max_object_bytes - len(key) - len(meta)]

    def child() -> dict:
        attached = CacheStore.attach(os.dup(store.fd))
        stored = attached.put(key, meta, body, TTL_US)
        attached.close()
        return {"stored": stored}

    assert collect(*fork_with_result(child)) == {"stored": True}
    entry = store.get(key)
    assert entry is not None
    assert entry.meta == meta
    assert entry.body == body
    assert store.stats()["log_bytes"] == capacity
    assert store.verify() == []
    store.close()


# ---- killed writers on a store with room for one record -----------------------------------

ONE_RECORD_OBJECT_BYTES = 1000
ONE_RECORD_KEYS = 8


def _one_record_value(key_index: int, version: int) -> tuple[bytes, bytes]:
    """Return (meta, body) for a key and version. The body repeats the meta, so a reader detects a mix."""
    meta = b"%d:%d" % (key_index, version)
    length = ONE_RECORD_OBJECT_BYTES - 8 - len(meta) - version % 200
    return meta, (meta * (length // len(meta) + 1))[:length]


def _one_record_writer(store: CacheStore, seed: int) -> None:
    """Put and delete values until killed, or for at most 10 s."""
    rng = random.Random(seed)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        key_index = rng.randrange(ONE_RECORD_KEYS)
        key = b"/one/%d" % key_index
        if rng.randrange(16) == 0:
            try:
                store.delete(key)
            except TimeoutError:
                pass
        else:
            store.put(key, *_one_record_value(key_index, rng.randrange(1_000_000)), TTL_US)


def _one_record_reader(store: CacheStore, stop: mmap.mmap) -> dict:
    """Get the keys until stop[0] is set, and count hits and torn values."""
    rng = random.Random(os.getpid())
    counts = {"hits": 0, "torn": 0, "first_torn": None}
    deadline = time.monotonic() + 10
    while stop[0] == 0 and time.monotonic() < deadline:
        key_index = rng.randrange(ONE_RECORD_KEYS)
        entry = store.get(b"/one/%d" % key_index)
        if entry is None:
            continue
        counts["hits"] += 1
        stored_index, _, version = entry.meta.partition(b":")
        whole = (
            stored_index == b"%d" % key_index
            and version.isdigit()
            and _one_record_value(key_index, int(version)) == (entry.meta, entry.body)
        )
        if not whole:
            counts["torn"] += 1
            counts["first_torn"] = counts["first_torn"] or repr(entry)[:200]
    return counts


def test_exact_fit_capacity_survives_killed_writers():
    # Every put evicts the one record in the arena, so writers keep rewriting
    # the bytes that readers copy, and a kill often lands inside the lock.
    capacity = _record_bytes(ONE_RECORD_OBJECT_BYTES)
    store = CacheStore.create(capacity_bytes=capacity, max_entries=16, max_object_bytes=ONE_RECORD_OBJECT_BYTES)
    stop = mmap.mmap(-1, mmap.PAGESIZE)
    reader = fork_with_result(lambda: _one_record_reader(store, stop))
    rng = random.Random(3)
    seeds = iter(range(1, 1_000_000))

    def start_writer() -> int:
        seed = next(seeds)
        pid = os.fork()
        if pid == 0:
            try:
                _one_record_writer(store, seed)
            finally:
                os._exit(0)
        return pid

    writers = [start_writer(), start_writer()]
    kills = 0
    kills_inside_lock = 0
    deadline = time.monotonic() + 3
    try:
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0, 0.003))
            victim = rng.randrange(len(writers))
            os.kill(writers[victim], signal.SIGKILL)
            os.waitpid(writers[victim], 0)
            kills += 1
            # A lower bound: another writer may have taken the lock over already.
            if store.segment.region.load(LOCK_OFFSET) == writers[victim]:
                kills_inside_lock += 1
            writers[victim] = start_writer()
    finally:
        for pid in writers:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        stop[0] = 1
    counts = collect(*reader)

    assert kills >= 50, f"only {kills} kills in 3 s"
    assert counts["torn"] == 0, f"torn value read: {counts['first_torn']}"
    assert counts["hits"] > 0
    assert store.put(b"/after", b"m", b"after body", TTL_US)
    assert store.stats()["recoveries"] >= kills_inside_lock
    assert store.get(b"/after").body == b"after body"
    assert store.stats()["log_bytes"] <= capacity
    assert store.verify() == []
    store.close()
