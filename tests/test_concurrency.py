"""The adaptive concurrency limit: shared table, Gradient2 updates, queue and shedding.

Tests that involve several workers fork real processes that map the same
memfd table, as the master's workers do.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import traceback
from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexus.concurrency import MIN_RTT_TOLERANCE, MIN_RTT_WINDOW, ConcurrencyLimiter, next_limit, slot_cap
from nexus.config import Concurrency, parse_config
from nexus.errors import UpstreamOverloaded
from nexus.shm.concurrency import ConcurrencyTable
from nexus.shm.segment import HEADER_BYTES, Segment
from nexus.shm.state import SharedState
from nexus.telemetry import build_layout
from nexus.upstream import UpstreamPool


def _settings(**fields) -> Concurrency:
    return Concurrency(**fields)


def _limiter(table: ConcurrencyTable, worker: int = 0, **fields) -> ConcurrencyLimiter:
    return ConcurrencyLimiter(table, 0, worker, _settings(**fields), "app")


def _fork(action) -> tuple[int, int]:
    """Run `action` in a forked child; return its pid and a pipe that gets its JSON result."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_fd)
            result = json.dumps(action()).encode()
            os.write(write_fd, result)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_fd)
    return pid, read_fd


def _join(child: tuple[int, int]):
    """Wait for a child from `_fork` and return its result."""
    pid, read_fd = child
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    assert status == 0, f"child {pid} failed with exit status {status}"
    return json.loads(data)


# The table.


def test_table_rows_follow_config_order():
    config = parse_config(
        'listen: ["127.0.0.1:0"]\n'
        "upstreams:\n"
        "  first: {targets: ['http://127.0.0.1:9']}\n"
        "  second: {targets: ['http://127.0.0.1:9'], concurrency: {initial_limit: 30}}\n"
        "routes: [{name: r, upstream: first}]\n"
    )
    state = SharedState.create(config, 2, build_layout(config))

    assert state.concurrency.index_of("first") == 0
    assert state.concurrency.index_of("second") == 1
    assert state.concurrency.limit(0) == 0.0
    assert state.concurrency.limit(1) == 30.0
    assert "concurrency" in state.fds()
    with pytest.raises(KeyError, match="'third'"):
        state.concurrency.index_of("third")


def test_table_attached_from_fd_shares_state():
    table = ConcurrencyTable.create([("a", 8.0), ("b", 12.0)], 3)
    attached = ConcurrencyTable.attach(os.dup(table.segment.fd))

    assert attached.upstreams == 2
    assert attached.workers == 3
    assert attached.index_of("b") == 1
    assert attached.limit(1) == 12.0
    assert table.try_acquire(1, 2, cap=12)
    assert attached.in_flight(1) == 1
    assert attached.worker_in_flight(1, 2) == 1
    attached.close()


def test_try_acquire_stops_at_cap():
    table = ConcurrencyTable.create([("app", 3.0)], 1)

    taken = [table.try_acquire(0, 0, cap=3) for _ in range(5)]

    assert taken == [True, True, True, False, False]
    assert table.in_flight(0) == 3
    table.release(0, 0)
    assert table.in_flight(0) == 2
    assert table.worker_in_flight(0, 0) == 2


# The limit algorithm as a function.


@pytest.mark.parametrize(
    ("limit", "critical", "expected"),
    [(10.0, False, 8), (10.0, True, 10), (1.0, False, 1), (1.0, True, 1), (4.9, False, 3), (4.9, True, 4)],
)
def test_slot_cap_keeps_critical_reserve(limit, critical, expected):
    assert slot_cap(limit, critical, critical_reserve=0.2) == expected


def test_next_limit_grows_only_near_limit():
    busy = next_limit(20.0, long_rtt=10, short_rtt=10, in_flight=16, min_limit=4, max_limit=1000)
    idle = next_limit(20.0, long_rtt=10, short_rtt=10, in_flight=3, min_limit=4, max_limit=1000)

    # One sample of 16 in flight moves 1/16 of the way to limit + sqrt(limit).
    assert busy == pytest.approx(20.0 + 20.0**0.5 / 16)
    assert idle == 20.0


def test_next_limit_round_moves_to_target():
    # The short RTT is ten times the long one, so the gradient is clamped at
    # 0.5 and the target is 100 x 0.5 + sqrt(100) = 60.
    first = next_limit(100.0, long_rtt=10, short_rtt=100, in_flight=80, min_limit=4, max_limit=1000)
    limit = 100.0
    for _ in range(80):
        limit = next_limit(limit, long_rtt=10, short_rtt=100, in_flight=80, min_limit=4, max_limit=1000)

    assert first == pytest.approx(100.0 - 40.0 / 80)
    # One round of samples covers most of the way to the target (which
    # falls with the limit) but does not overshoot it.
    assert 60.0 < limit < 70.0


@given(
    limit=st.floats(1.0, 2000.0),
    long_rtt=st.integers(1, 10**10),
    short_rtt=st.integers(1, 10**10),
    in_flight=st.integers(0, 5000),
    min_limit=st.integers(1, 50),
    span=st.integers(0, 1000),
)
def test_next_limit_stays_within_bounds(limit, long_rtt, short_rtt, in_flight, min_limit, span):
    max_limit = min_limit + span
    limit = min(max(limit, min_limit), max_limit)

    new = next_limit(limit, long_rtt, short_rtt, in_flight, min_limit, max_limit)

    assert min_limit <= new <= max_limit


# The limit across forked processes.


def test_limit_holds_across_processes():
    table = ConcurrencyTable.create([("app", 10.0)], 4)
    cap = slot_cap(10.0, critical=False, critical_reserve=0.2)

    def worker(slot: int) -> dict[str, int]:
        async def run() -> dict[str, int]:
            limiter = _limiter(table, slot, max_queue_wait=0.05, overloaded_queue_wait=0.005)
            seen = {"peak": 0, "admitted": 0, "shed": 0}

            async def client() -> None:
                for _ in range(30):
                    try:
                        permit = await limiter.acquire(1, None)
                    except UpstreamOverloaded:
                        seen["shed"] += 1
                        continue
                    seen["admitted"] += 1
                    try:
                        seen["peak"] = max(seen["peak"], table.in_flight(0))
                        await asyncio.sleep(0.002)
                    finally:
                        permit.release()

            await asyncio.gather(*(client() for _ in range(12)))
            return seen

        return asyncio.run(run())

    children = [_fork(lambda slot=slot: worker(slot)) for slot in range(4)]
    results = [_join(child) for child in children]

    assert max(result["peak"] for result in results) <= cap
    assert max(result["peak"] for result in results) == cap, "the load never reached the limit"
    assert table.in_flight(0) == 0
    assert all(table.worker_in_flight(0, slot) == 0 for slot in range(4))
    counters = table.counters(0)
    assert counters.admitted == sum(result["admitted"] for result in results)
    assert counters.shed == sum(result["shed"] for result in results)
    assert counters.admitted + counters.shed == 4 * 12 * 30


def _hold_until_killed(take_slots) -> int:
    """Fork a child that runs `take_slots`, reports, and sleeps until killed; return its pid."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            kept = take_slots()
            os.write(write_fd, b"held\n")
            time.sleep(60)
            del kept
        finally:
            os._exit(1)
    os.close(write_fd)
    with os.fdopen(read_fd) as ready:
        assert ready.readline() == "held\n"
    return pid


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    status = os.waitpid(pid, 0)[1]
    assert os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == signal.SIGKILL


def test_sigkilled_worker_slots_reclaimed_by_master():
    table = ConcurrencyTable.create([("app", 10.0)], 2)
    assert table.try_acquire(0, 0, cap=10)
    assert table.try_acquire(0, 0, cap=10)

    def take_slots() -> list:
        limiter = _limiter(table, worker=1)
        permits = [limiter.try_acquire(None) for _ in range(3)]
        assert all(permits)
        return permits

    _kill(_hold_until_killed(take_slots))
    assert table.in_flight(0) == 5
    assert table.worker_in_flight(0, 1) == 3

    assert table.reclaim_worker(1) == 3
    assert table.in_flight(0) == 2
    assert table.worker_in_flight(0, 1) == 0
    assert table.worker_in_flight(0, 0) == 2
    assert table.reclaim_worker(1) == 0, "a second reclaim must not subtract again"
    assert table.in_flight(0) == 2


def test_sigkilled_worker_slots_reclaimed_by_next_worker():
    config = parse_config(
        'listen: ["127.0.0.1:0"]\n'
        "upstreams:\n"
        "  other: {targets: ['http://127.0.0.1:9']}\n"
        "  app: {targets: ['http://127.0.0.1:9'], concurrency: {initial_limit: 10}}\n"
        "routes: [{name: r, upstream: app}]\n"
    )
    state = SharedState.create(config, 2, build_layout(config))
    table = state.concurrency
    index = table.index_of("app")
    assert index == 1
    assert table.try_acquire(index, 0, cap=10)

    def take_slots() -> list:
        pool = UpstreamPool("app", config.upstreams["app"], state.health, 1, worker_id=1, concurrency=table)
        permits = [pool.limiter.try_acquire(None) for _ in range(4)]
        assert all(permits)
        return permits

    pid = _hold_until_killed(take_slots)
    _kill(pid)
    assert table.in_flight(index) == 5

    def next_worker() -> dict[str, int]:
        # The pool gets the node's table, as in Gateway.
        pool = UpstreamPool("app", config.upstreams["app"], state.health, 1, worker_id=1, concurrency=table)
        return {"in_flight": pool.limiter.in_flight(), "limit": pool.limiter.limit()}

    seen = _join(_fork(next_worker))

    assert seen == {"in_flight": 1, "limit": 10.0}
    assert table.in_flight(index) == 1
    assert table.worker_in_flight(index, 1) == 0


def _drive_samples(table: ConcurrencyTable, control: Segment, slot: int, settings: Concurrency) -> int:
    """Keep the slots full and record the RTT of the phase in the control word until it is 0."""
    limiter = ConcurrencyLimiter(table, 0, slot, settings, "app")
    held: deque = deque()
    samples = 0
    while (phase := control.region.load(HEADER_BYTES)) != 0:
        while (permit := limiter.try_acquire(None)) is not None:
            held.append(permit)
        if held:
            permit = held.popleft()
            permit.sample(_PHASE_RTT[phase])
            permit.release()
            samples += 1
    for permit in held:
        permit.release()
    return samples


_FAST, _SLOW, _STOP = 1, 2, 0
_PHASE_RTT = {_FAST: 0.010, _SLOW: 0.040}


def _watch_limit(table: ConcurrencyTable, seconds: float) -> list[float]:
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.append(table.limit(0))
        time.sleep(0.001)
    return seen


def test_limit_falls_when_rtt_rises_and_recovers():
    settings = _settings(min_limit=4, max_limit=200, initial_limit=20)
    table = ConcurrencyTable.create([("app", 20.0)], 2)
    control = Segment.create(b"testctl", 1, 8)
    control.region.store(HEADER_BYTES, _FAST)

    children = [_fork(lambda slot=slot: _drive_samples(table, control, slot, settings)) for slot in range(2)]
    try:
        fast = _watch_limit(table, 0.4)
        control.region.store(HEADER_BYTES, _SLOW)
        slow = _watch_limit(table, 0.4)
        control.region.store(HEADER_BYTES, _FAST)
        recovered = _watch_limit(table, 0.4)
    finally:
        control.region.store(HEADER_BYTES, _STOP)
        samples = [_join(child) for child in children]

    assert all(count > 100 for count in samples), samples
    assert fast[-1] == 200.0, "under load with a steady RTT the limit grows to max_limit"
    assert slow[-1] == pytest.approx(4.0, abs=0.01), "with four times the RTT the limit falls to min_limit"
    assert recovered[-1] == 200.0, "when the RTT is back the limit grows again"
    every = fast + slow + recovered
    assert min(every) >= 4.0
    assert max(every) <= 200.0
    assert table.in_flight(0) == 0


def test_limit_does_not_grow_when_idle():
    table = ConcurrencyTable.create([("app", 20.0)], 1)

    def one_at_a_time() -> int:
        limiter = _limiter(table, min_limit=4, max_limit=200, initial_limit=20)
        for _ in range(5000):
            permit = limiter.try_acquire(None)
            permit.sample(0.010)
            permit.release()
        return table.samples(0)

    assert _join(_fork(one_at_a_time)) == 5000
    assert table.limit(0) == 20.0
    assert table.rtt(0)[1] == pytest.approx(10_000_000, rel=0.01)


# The queue and shedding, in one worker.


def test_critical_tier_uses_the_reserve():
    table = ConcurrencyTable.create([("app", 10.0)], 1)
    limiter = _limiter(table)

    general = [limiter.try_acquire(None) for _ in range(9)]
    critical = [limiter.try_acquire("critical") for _ in range(3)]

    assert sum(permit is not None for permit in general) == 8
    assert sum(permit is not None for permit in critical) == 2
    assert table.in_flight(0) == 10


def test_queue_wait_times_out_with_503():
    table = ConcurrencyTable.create([("app", 5.0)], 1)
    limiter = _limiter(table, max_queue_wait=0.05)
    held = [limiter.try_acquire(None) for _ in range(4)]
    assert all(held)

    async def wait() -> tuple[UpstreamOverloaded, float]:
        started = time.monotonic()
        with pytest.raises(UpstreamOverloaded) as caught:
            await limiter.acquire(1, "free")
        return caught.value, time.monotonic() - started

    error, waited = asyncio.run(wait())

    assert 0.045 <= waited < 0.5
    assert error.status == 503
    assert error.kind == "upstream_overloaded"
    assert (b"retry-after", b"1") in error.headers
    assert "no slot became free within 50 ms" in error.detail
    assert table.counters(0) == (4, 1, 1, 1)
    assert limiter.waiting == 0


def test_queue_serves_higher_priority_first():
    table = ConcurrencyTable.create([("app", 10.0)], 1)
    limiter = _limiter(table, max_queue_wait=2.0)

    async def run() -> list[str]:
        held = [limiter.try_acquire(None) for _ in range(8)]
        assert all(held)
        order: list[str] = []
        permits = []

        async def request(name: str, priority: int) -> None:
            permits.append(await limiter.acquire(priority, None))
            order.append(name)

        tasks = [
            asyncio.create_task(request(name, priority))
            for name, priority in [("a1", 1), ("b2", 2), ("c1", 1), ("d2", 2), ("e0", 0)]
        ]
        await asyncio.sleep(0.01)
        assert limiter.waiting == 5
        for permit in held[:5]:
            permit.release()
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks)
        for permit in held[5:] + permits:
            permit.release()
        return order

    assert asyncio.run(run()) == ["b2", "d2", "a1", "c1", "e0"]
    assert table.in_flight(0) == 0


def test_critical_request_passes_blocked_queue():
    table = ConcurrencyTable.create([("app", 10.0)], 1)
    limiter = _limiter(table, max_queue_wait=0.2)

    async def run() -> None:
        general_held = [limiter.try_acquire(None) for _ in range(8)]
        assert all(general_held)

        # Non-critical waiters cannot use the reserve, so a critical request
        # does not queue behind them, whatever their priority.
        general = asyncio.create_task(limiter.acquire(5, "gold"))
        await asyncio.sleep(0.01)
        direct = limiter.try_acquire("critical")
        assert direct is not None

        # With the reserve full too, a critical request waits, and gets the
        # next reserve slot before the higher-priority non-critical waiter.
        last = limiter.try_acquire("critical")
        assert last is not None
        critical = asyncio.create_task(limiter.acquire(3, "critical"))
        await asyncio.sleep(0.01)
        assert limiter.waiting == 2
        last.release()
        permit = await asyncio.wait_for(critical, 0.05)
        assert not general.done()
        with pytest.raises(UpstreamOverloaded):
            await general

        for held in [*general_held, direct, permit]:
            held.release()

    asyncio.run(run())
    assert table.in_flight(0) == 0


def test_waiter_gets_slot_freed_by_other_process():
    table = ConcurrencyTable.create([("app", 10.0)], 2)
    for _ in range(8):
        assert table.try_acquire(0, 1, cap=8)

    def release_later() -> None:
        time.sleep(0.1)
        table.release(0, 1)

    async def wait() -> float:
        limiter = _limiter(table, max_queue_wait=1.0)
        started = time.monotonic()
        permit = await limiter.acquire(1, None)
        waited = time.monotonic() - started
        permit.release()
        return waited

    child = _fork(release_later)
    waited = asyncio.run(wait())
    _join(child)

    assert 0.09 <= waited < 0.5
    assert table.in_flight(0) == 7


def test_standing_queue_cuts_wait():
    table = ConcurrencyTable.create([("app", 5.0)], 1)
    limiter = _limiter(table, max_queue_wait=0.4, overloaded_queue_wait=0.01)
    held = [limiter.try_acquire(None) for _ in range(4)]
    assert all(held)

    async def timed_wait() -> float:
        started = time.monotonic()
        with pytest.raises(UpstreamOverloaded):
            await limiter.acquire(1, None)
        return time.monotonic() - started

    async def run() -> tuple[float, float]:
        first = asyncio.create_task(timed_wait())
        # The queue has been non-empty for 150 ms, longer than CoDel's 100 ms.
        await asyncio.sleep(0.15)
        second = await timed_wait()
        return await first, second

    first, second = asyncio.run(run())

    assert first >= 0.39
    assert second < 0.1


def test_full_queue_sheds_lower_priority_first():
    # Limit 2: one slot for non-critical requests, and a queue of two per worker.
    table = ConcurrencyTable.create([("app", 2.0)], 1)
    limiter = _limiter(table, max_queue_wait=1.0)

    async def run() -> dict[str, str]:
        held = limiter.try_acquire(None)
        outcomes: dict[str, str] = {}

        async def request(name: str, priority: int) -> None:
            try:
                permit = await limiter.acquire(priority, None)
            except UpstreamOverloaded as error:
                outcomes[name] = error.detail
                return
            outcomes[name] = "admitted"
            await asyncio.sleep(0.01)
            permit.release()

        low1 = asyncio.create_task(request("low1", 1))
        low2 = asyncio.create_task(request("low2", 1))
        await asyncio.sleep(0.01)
        await request("low3", 1)
        high = asyncio.create_task(request("high", 2))
        await asyncio.sleep(0.01)
        held.release()
        await asyncio.gather(low1, low2, high)
        return outcomes

    outcomes = asyncio.run(run())

    assert outcomes["low3"].endswith("the queue for a slot is full")
    assert outcomes["low2"].endswith("a request of higher priority took its place in the queue")
    assert outcomes["high"] == "admitted"
    assert outcomes["low1"] == "admitted"
    assert table.counters(0).shed == 2
    assert table.counters(0).queue_timeouts == 0
    assert table.in_flight(0) == 0


def test_cancelled_waiter_leaves_queue():
    table = ConcurrencyTable.create([("app", 5.0)], 1)
    limiter = _limiter(table, max_queue_wait=1.0)

    async def run() -> None:
        held = [limiter.try_acquire(None) for _ in range(4)]
        waiter = asyncio.create_task(limiter.acquire(1, None))
        await asyncio.sleep(0.01)
        assert limiter.waiting == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert limiter.waiting == 0
        held[0].release()
        assert table.in_flight(0) == 3, "the freed slot went to nobody"
        for permit in held[1:]:
            permit.release()

    asyncio.run(run())
    assert table.in_flight(0) == 0


def test_waiter_cancelled_after_grant_releases_slot():
    table = ConcurrencyTable.create([("app", 5.0)], 1)
    limiter = _limiter(table, max_queue_wait=1.0)

    async def run() -> None:
        held = [limiter.try_acquire(None) for _ in range(4)]
        waiter = asyncio.create_task(limiter.acquire(1, None))
        await asyncio.sleep(0.01)
        # The release grants the slot to the waiter; the cancel arrives
        # before the waiter's task runs again.
        held[0].release()
        assert table.in_flight(0) == 4
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert table.in_flight(0) == 3
        for permit in held[1:]:
            permit.release()

    asyncio.run(run())
    assert table.in_flight(0) == 0


def test_permit_release_is_idempotent():
    table = ConcurrencyTable.create([("app", 5.0)], 1)
    limiter = _limiter(table)
    first = limiter.try_acquire(None)
    second = limiter.try_acquire(None)

    first.release()
    first.release()

    assert table.in_flight(0) == 1
    second.release()
    assert table.in_flight(0) == 0


def test_long_overload_cannot_raise_the_latency_anchor():
    """A long-term RTT that caught up with a queued latency is capped at MIN_RTT_TOLERANCE x the window's lowest RTT.

    The worker saw 100 ms responses; then the long-term average is pushed to
    400 ms, as a long overload would. 400 ms samples must still lower the
    limit, because the anchor keeps the long-term side at 150 ms; without
    it the gradient would be 1 and the limit would grow.
    """
    table = ConcurrencyTable.create([("app", 100)], 1)
    limiter = _limiter(table, max_limit=1000, initial_limit=100)
    for _ in range(20):
        limiter.record_rtt(0.1)
    table.update_long_rtt(0, lambda old: 400_000_000)
    table.set_limit(0, 100.0)
    holders = [table.try_acquire(0, 0, cap=100) for _ in range(100)]
    assert all(holders)

    for _ in range(30):
        table.update_long_rtt(0, lambda old: 400_000_000)
        limiter.record_rtt(0.4)

    assert MIN_RTT_TOLERANCE == 1.5
    assert table.limit(0) < 100.0


def test_lowest_rtt_window_forgets_old_seconds(monkeypatch):
    """The anchor is the lowest RTT of the last MIN_RTT_WINDOW seconds, so a lasting slowdown is learnt."""
    table = ConcurrencyTable.create([("app", 20)], 1)
    limiter = _limiter(table)
    clock = [1000.0]
    monkeypatch.setattr("nexus.concurrency.time.monotonic", lambda: clock[0])

    assert limiter._lowest_rtt(100) == 100
    clock[0] += MIN_RTT_WINDOW - 1
    assert limiter._lowest_rtt(300) == 100
    clock[0] += 2
    assert limiter._lowest_rtt(300) == 300
