"""Atomics and robust locks of nexus.shm._native.Region, across real forked processes.

Every test shares an anonymous `mmap` (MAP_SHARED) created before `fork`, so
parent and children address the same words. Children run a bounded action
and leave with `os._exit`. Every child is reaped, and any child still alive
when a test ends is SIGKILLed and reaped.
"""

from __future__ import annotations

import mmap
import os
import select
import signal
import threading
import time

import pytest

from nexus.shm import _native
from tests.forking import Children

WORD_MASK = (1 << 64) - 1
# A lock word keeps the holder's thread id in its low 22 bits.
TID_MASK = (1 << 22) - 1


def shared_region(size: int = 4096) -> tuple[mmap.mmap, _native.Region]:
    """Return an anonymous shared mapping and a Region over it. Call it before forking."""
    mapping = mmap.mmap(-1, size)
    return mapping, _native.Region(mapping)


def read_byte(fd: int, timeout_s: float) -> bytes:
    """Read one byte from the pipe `fd`, failing the test if none arrives within `timeout_s`."""
    ready, _, _ = select.select([fd], [], [], timeout_s)
    assert ready, f"no byte on the pipe within {timeout_s} s"
    return os.read(fd, 1)


# ---- atomic arithmetic ----


def test_fetch_add_four_processes_exact():
    """fetch_add from 4 processes x 200k loses no increment and returns distinct old values."""
    _mapping, region = shared_region()
    processes, increments = 4, 200_000

    def add_many() -> None:
        previous = -1
        for _ in range(increments):
            old = region.fetch_add(0, 1)
            # The word only grows, so the old values returned to this process must grow too.
            assert old > previous
            previous = old

    with Children() as children:
        for _ in range(processes):
            children.fork(add_many)
        codes = children.wait_all(timeout_s=20)

    assert codes == [0] * processes
    assert region.load(0) == processes * increments


def test_fetch_add_wraps_modulo_2_64():
    """fetch_add returns the old value and wraps both ways, with a negative delta as two's complement."""
    _mapping, region = shared_region()
    region.store(8, WORD_MASK)

    assert region.fetch_add(8, 1) == WORD_MASK
    assert region.load(8) == 0
    assert region.fetch_add(8, -1) == 0
    assert region.load(8) == WORD_MASK
    assert region.fetch_add(8, -5) == WORD_MASK
    assert region.load(8) == WORD_MASK - 5


def test_cas_loop_four_processes_exact():
    """A load + compare-and-swap retry loop from 4 processes loses no increment."""
    _mapping, region = shared_region()
    processes, increments = 4, 100_000

    def increment_with_cas() -> None:
        for _ in range(increments):
            while True:
                seen = region.load(64)
                if region.cas(64, seen, seen + 1):
                    break

    with Children() as children:
        for _ in range(processes):
            children.fork(increment_with_cas)
        codes = children.wait_all(timeout_s=20)

    assert codes == [0] * processes
    assert region.load(64) == processes * increments


def test_cas_mismatch_leaves_word():
    """cas returns False and changes nothing when the word differs from `expected`."""
    _mapping, region = shared_region()
    region.store(0, 7)

    assert region.cas(0, 6, 100) is False
    assert region.load(0) == 7
    assert region.cas(0, 7, WORD_MASK) is True
    assert region.load(0) == WORD_MASK


@pytest.mark.parametrize("reader", ["region", "memoryview"])
def test_load_store_never_tear(reader):
    """A reader in another process reads only whole words while a writer alternates two patterns.

    Both halves of each pattern differ from the other pattern's halves, so a torn
    read would show up as a value that is neither. `memoryview.cast("Q")` is the
    plain access that segment.py documents as tear-free, so it is checked too.
    """
    pattern_a = 0x5555_5555_5555_5555
    pattern_b = 0xAAAA_AAAA_AAAA_AAAA
    mapping, region = shared_region()
    words = memoryview(mapping).cast("Q")
    region.store(0, pattern_a)

    def alternate() -> None:
        deadline = time.monotonic() + 5
        while region.load(64) == 0 and time.monotonic() < deadline:
            for _ in range(1000):
                region.store(0, pattern_b)
                region.store(0, pattern_a)

    torn = []
    seen = {pattern_a: 0, pattern_b: 0}
    reads = 0
    try:
        with Children() as children:
            children.fork(alternate)
            # Read until the writer has clearly been running (it starts a few ms after fork).
            deadline = time.monotonic() + 5
            while (reads < 300_000 or seen[pattern_b] < 10_000) and time.monotonic() < deadline:
                for _ in range(10_000):
                    value = region.load(0) if reader == "region" else words[0]
                    if value in seen:
                        seen[value] += 1
                    else:
                        torn.append(value)
                reads += 10_000
            region.store(64, 1)
            codes = children.wait_all(timeout_s=10)
    finally:
        words.release()

    assert codes == [0]
    assert torn == []
    # Both patterns were observed, so the reader really ran while the writer wrote.
    assert seen[pattern_a] > 0
    assert seen[pattern_b] > 0


WORD_OPERATIONS = {
    "load": lambda region, offset: region.load(offset),
    "store": lambda region, offset: region.store(offset, 1),
    "cas": lambda region, offset: region.cas(offset, 0, 1),
    "fetch_add": lambda region, offset: region.fetch_add(offset, 1),
    "add_local": lambda region, offset: region.add_local(offset, 1),
    "lock": lambda region, offset: region.lock(offset, 0),
    "unlock": lambda region, offset: region.unlock(offset),
}


@pytest.mark.parametrize("offset", [4, 1, 4096, 4104, -8, 4093])
@pytest.mark.parametrize("operation", sorted(WORD_OPERATIONS))
def test_bad_offset_raises_naming_offset(operation, offset):
    """Every word operation rejects an unaligned or out-of-range offset with a ValueError naming it."""
    mapping, region = shared_region()

    with pytest.raises(ValueError, match=rf"offset {offset} .*4096-byte region"):
        WORD_OPERATIONS[operation](region, offset)

    # The rejected call wrote nothing inside the region.
    assert bytes(mapping) == bytes(4096)


def test_last_word_of_region_is_usable():
    """The word that ends exactly at the region's end is inside it."""
    _mapping, region = shared_region(128)

    region.store(120, 42)

    assert region.load(120) == 42
    assert region.size == 128


def test_region_rejects_bad_buffer():
    """Region needs a writable buffer that starts on a 64-byte boundary."""
    mapping = mmap.mmap(-1, 4096)

    with pytest.raises(ValueError, match="64-byte boundary"):
        _native.Region(memoryview(mapping)[8:])
    with pytest.raises(BufferError):
        _native.Region(bytes(64))


def test_released_region_raises():
    """After release() a Region has size 0 and every access raises ValueError."""
    mapping, region = shared_region()
    region.release()

    assert region.size == 0
    with pytest.raises(ValueError, match="0-byte region"):
        region.load(0)
    with pytest.raises(ValueError, match="0-byte region"):
        region.store(0, 1)
    # The mapping can be closed once the Region let go of its buffer.
    mapping.close()


# ---- robust lock ----


def test_lock_excludes_four_processes():
    """A non-atomic read-modify-write under the lock from 4 processes sums exactly.

    Each holder also raises an "inside" word with fetch_add and checks that it
    was alone. A second holder at the same time would find a nonzero value.
    """
    lock_at, counter_at, inside_at, overlaps_at = 0, 64, 128, 192
    _mapping, region = shared_region()
    processes, rounds = 4, 20_000

    def increment_under_lock() -> None:
        for _ in range(rounds):
            assert region.lock(lock_at, 5_000_000) == 0
            if region.fetch_add(inside_at, 1) != 0:
                region.fetch_add(overlaps_at, 1)
            value = region.load(counter_at)
            region.store(counter_at, value + 1)
            region.fetch_add(inside_at, -1)
            region.unlock(lock_at)

    with Children() as children:
        for _ in range(processes):
            children.fork(increment_under_lock)
        codes = children.wait_all(timeout_s=25)

    assert codes == [0] * processes
    assert region.load(overlaps_at) == 0
    assert region.load(counter_at) == processes * rounds
    assert region.load(lock_at) == 0


def holder_tid(word: int) -> int:
    """The thread id part of a lock word (bits 0-21; start-time bits sit above)."""
    return word & TID_MASK


def test_lock_word_holds_holder_thread_id():
    """A held lock word contains the holder's Linux thread id and start-time bits, and unlock clears it."""
    _mapping, region = shared_region()

    assert region.lock(0, 0) == 0
    assert region.load(0) == _native.thread_id()
    assert holder_tid(region.load(0)) == threading.get_native_id()
    assert region.load(0) >> 22 != 0
    region.unlock(0)
    assert region.load(0) == 0


def test_reused_thread_id_does_not_pass_for_the_holder():
    """A lock word naming a live thread id with another start time is a dead holder: lock() recovers it."""
    _mapping, region = shared_region()
    me = _native.thread_id()
    impostor = holder_tid(me) | (((me >> 22) + 1) << 22)

    assert _native.task_alive(impostor) is False
    region.store(0, impostor)
    assert region.lock(0, 0) == 1
    assert region.load(0) == me
    region.unlock(0)


def test_lock_twice_in_one_thread_raises():
    """Taking a lock that the calling thread already holds raises RuntimeError and keeps it held."""
    _mapping, region = shared_region()
    assert region.lock(8, 1000) == 0

    with pytest.raises(RuntimeError, match="already holds"):
        region.lock(8, 1000)
    assert region.load(8) == _native.thread_id()

    region.unlock(8)
    assert region.lock(8, 0) == 0


def test_lock_excludes_sibling_thread():
    """The lock is per thread: a second thread of the holder's process times out."""
    _mapping, region = shared_region()
    results = []
    assert region.lock(0, 0) == 0

    worker = threading.Thread(target=lambda: results.append(region.lock(0, 20_000)))
    worker.start()
    worker.join(timeout=5)

    assert not worker.is_alive()
    assert results == [2]
    region.unlock(0)


@pytest.mark.parametrize("reaped", [False, True], ids=["zombie", "reaped"])
def test_lock_recovered_from_sigkilled_holder(reaped):
    """A holder SIGKILLed while holding the lock is detected, and the next lock() returns 1 within 300 ms."""
    _mapping, region = shared_region()
    ready_read, ready_write = os.pipe()

    def hold_forever() -> None:
        assert region.lock(0, 0) == 0
        os.write(ready_write, b"x")
        time.sleep(30)

    try:
        with Children() as children:
            pid = children.fork(hold_forever)
            read_byte(ready_read, timeout_s=5)
            assert holder_tid(region.load(0)) == pid

            os.kill(pid, signal.SIGKILL)
            if reaped:
                assert children.wait(pid, timeout_s=5) == -signal.SIGKILL
            started = time.monotonic()
            result = region.lock(0, 2_000_000)
            elapsed = time.monotonic() - started

            assert result == 1
            assert elapsed < 0.3
            assert region.load(0) == _native.thread_id()
            region.unlock(0)
            assert region.lock(0, 0) == 0
            region.unlock(0)
    finally:
        os.close(ready_read)
        os.close(ready_write)


def test_lock_times_out_on_stopped_holder():
    """A SIGSTOPped holder is alive, so lock(off, 20000) returns 2 after about 20 ms.

    After SIGKILL the same lock is recovered.
    """
    _mapping, region = shared_region()

    def hold_then_stop() -> None:
        assert region.lock(0, 0) == 0
        os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(30)

    with Children() as children:
        pid = children.fork(hold_then_stop)
        _, status = os.waitpid(pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        assert holder_tid(region.load(0)) == pid
        assert _native.task_alive(pid) is True

        started = time.monotonic()
        result = region.lock(0, 20_000)
        elapsed = time.monotonic() - started

        assert result == 2
        assert elapsed >= 0.019
        assert elapsed < 0.2
        assert holder_tid(region.load(0)) == pid

        os.kill(pid, signal.SIGKILL)
        assert children.wait(pid, timeout_s=5) == -signal.SIGKILL
        assert region.lock(0, 2_000_000) == 1
        region.unlock(0)


@pytest.mark.parametrize("timeout_us", [0, 1, 50])
def test_lock_short_timeout_recovers_dead_holder(timeout_us):
    """A try-lock, lock(off, 0), or a timeout too short for the periodic liveness check still recovers a dead holder.

    lock.h documents result 2 as "a live holder kept it past the deadline", so
    a caller that only ever try-locks must get 1, not 2, when the holder died.
    """
    _mapping, region = shared_region()

    def take_and_exit() -> None:
        assert region.lock(0, 0) == 0

    with Children() as children:
        pid = children.fork(take_and_exit)
        assert children.wait(pid, timeout_s=5) == 0
    assert holder_tid(region.load(0)) == pid
    assert _native.task_alive(pid) is False

    assert region.lock(0, timeout_us) == 1
    assert region.load(0) == _native.thread_id()


# ---- task liveness ----


def test_task_alive_self_and_thread():
    """task_alive is True for this process, this thread and a running second thread, False once it has ended.

    pthread_join can return while the kernel is still tearing the thread down,
    so the last check polls for up to a second.
    """
    started = threading.Event()
    finish = threading.Event()
    thread_ids = []

    def run() -> None:
        thread_ids.append(_native.thread_id())
        started.set()
        finish.wait(5)

    worker = threading.Thread(target=run)
    worker.start()
    assert started.wait(5)
    assert _native.task_alive(os.getpid()) is True
    assert _native.task_alive(_native.thread_id()) is True
    assert _native.task_alive(thread_ids[0]) is True

    finish.set()
    worker.join(5)
    deadline = time.monotonic() + 1
    while _native.task_alive(thread_ids[0]) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert _native.task_alive(thread_ids[0]) is False


def test_task_alive_zombie_and_reaped():
    """A child that exited is dead both as an un-reaped zombie and after it is reaped."""
    with Children() as children:
        pid = children.fork(lambda: None)
        # Wait for the exit without reaping: the child stays a zombie.
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        assert info.si_pid == pid
        with open(f"/proc/{pid}/stat") as stat:
            assert stat.read().rsplit(")", 1)[1].split()[0] == "Z"

        assert _native.task_alive(pid) is False

        assert children.wait(pid, timeout_s=5) == 0
    assert _native.task_alive(pid) is False
