"""Fill slots and tag purge times in shared memory, with real forked processes."""

from __future__ import annotations

import os
import signal
import time

from nexus.shm.cache import CacheStore


def _store() -> CacheStore:
    return CacheStore.create(1 << 20, 1024, 1 << 16)


def test_fill_slot_taken_once():
    state = _store().state
    assert state.try_begin_fill(12345) == 1
    assert state.is_filling(12345)
    state.end_fill(12345)
    assert not state.is_filling(12345)
    assert state.try_begin_fill(12345) == 1


def test_fill_slot_other_key_not_coalesced():
    state = _store().state
    assert state.try_begin_fill(1 << 40 | 7) == 1
    # Same bucket (low bits), different hash tag.
    assert state.try_begin_fill(2 << 40 | 7) == -1


def test_fill_of_dead_holder_taken_over():
    store = _store()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        store.state.try_begin_fill(99)
        os.write(write_fd, b"x")
        time.sleep(60)
        os._exit(0)
    os.close(write_fd)
    os.read(read_fd, 1)
    assert store.state.try_begin_fill(99) == 0
    assert store.state.is_filling(99)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    # The holder was SIGKILLed: its slot is free to take over.
    assert not store.state.is_filling(99)
    assert store.state.try_begin_fill(99) == 1


def test_tag_purge_times():
    state = _store().state
    bucket = state.tag_bucket(0xABCDEF)
    assert state.tag_purged_at(bucket) == (0, 0)
    state.purge_tag(bucket, soft=False, at_us=100)
    state.purge_tag(bucket, soft=True, at_us=50)
    state.purge_tag(bucket, soft=False, at_us=90)
    assert state.tag_purged_at(bucket) == (100, 50)


def test_attach_sees_state():
    store = _store()
    store.state.purge_tag(3, soft=False, at_us=7)
    attached = CacheStore.attach(store.fd)
    assert attached.state.tag_purged_at(3) == (7, 0)
