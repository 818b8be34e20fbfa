"""GCRA and sliding-window quota tables of nexus.shm.ratelimit, single-process and across forks.

Property tests drive one process with explicit `now_us` values and compare
every decision with a reference model written from the algorithm's
definition. Contention tests fork real processes that decide with the real
clock; their results come back through a shared anonymous mmap. Children
leave with `os._exit`, every child is reaped, and any child still alive when
a test ends is SIGKILLed and reaped.
"""

from __future__ import annotations

import mmap
import os
import random
import signal
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus.shm import _native
from nexus.shm.ratelimit import Decision, GcraTable, Outcome, QuotaTable, key_hash
from nexus.shm.segment import HEADER_BYTES, SegmentError
from tests.forking import Children

NEVER = (1 << 64) - 1
# Byte offset of a table's insert lock: control word 0 of the table, after the segment header.
INSERT_LOCK_AT = HEADER_BYTES
# A lock word keeps the holder's thread id in its low 22 bits.
TID_MASK = (1 << 22) - 1


def shared_words(count: int) -> _native.Region:
    """Return a Region over `count` zeroed shared words, for children to report results."""
    return _native.Region(mmap.mmap(-1, max(count * 8, 64)))


# ---- GCRA against the virtual scheduling algorithm ----


class VirtualScheduling:
    """GCRA in its virtual-scheduling form (ITU-T I.371): a reference for one key.

    A request of `cost` conforms unless it arrives before TAT - tolerance, where
    the tolerance is limit_us - cost x interval_us. A conforming request moves
    TAT to max(TAT, now) + cost x interval_us. Only valid for cost <= burst.
    """

    def __init__(self, interval_us: int, limit_us: int) -> None:
        self.interval_us = interval_us
        self.limit_us = limit_us
        self.tat = 0

    def decide(self, now_us: int, cost: int) -> Decision:
        increment = cost * self.interval_us
        earliest = self.tat - (self.limit_us - increment)
        if now_us < earliest:
            return Decision(Outcome.DENIED, 0, earliest - now_us)
        self.tat = max(self.tat, now_us) + increment
        ahead = self.tat - now_us
        return Decision(Outcome.ALLOWED, (self.limit_us - ahead) // self.interval_us, ahead)


@st.composite
def gcra_scenarios(draw):
    interval_us = draw(st.integers(1, 1_000_000))
    burst = draw(st.integers(1, 20))
    limit_us = burst * interval_us
    start_us = draw(st.integers(1, 1 << 40))
    step_us = st.one_of(st.just(0), st.integers(0, interval_us), st.integers(0, 2 * limit_us))
    action = st.sampled_from(["plain", "retry", "use_remaining", "idle"])
    steps = draw(st.lists(st.tuples(step_us, st.integers(1, burst), action), min_size=1, max_size=60))
    return interval_us, burst, limit_us, start_us, steps


@settings(max_examples=300, deadline=None)
@given(gcra_scenarios())
def test_gcra_matches_reference_and_bound(scenario):
    """Every GCRA decision equals the reference, and admitted cost never exceeds burst + rate x elapsed.

    After a denial, the same request one microsecond before now + wait_us is
    still denied and at now + wait_us it is allowed. After an allowance,
    exactly `remaining` unit requests fit at the same instant, and after
    waiting its wait_us the full burst is back.
    """
    interval_us, burst, limit_us, start_us, steps = scenario
    table = GcraTable.create(1)
    key = key_hash("tenant", "gcra-property")
    model = VirtualScheduling(interval_us, limit_us)
    admitted_cost = 0
    first_admitted_us = None

    def decide(now_us: int, cost: int) -> Decision:
        nonlocal admitted_cost, first_admitted_us
        decision = table.acquire(key, interval_us, limit_us, cost, now_us)
        assert decision == model.decide(now_us, cost)
        if decision.outcome == Outcome.ALLOWED:
            admitted_cost += cost
            if first_admitted_us is None:
                first_admitted_us = now_us
        if first_admitted_us is not None:
            # burst + rate x elapsed, in integers: cost x interval <= limit + elapsed.
            assert admitted_cost * interval_us <= limit_us + (now_us - first_admitted_us)
        return decision

    try:
        now_us = start_us
        for step_us, cost, action in steps:
            now_us += step_us
            decision = decide(now_us, cost)
            if decision.outcome == Outcome.DENIED:
                assert decision.remaining == 0
                assert decision.wait_us > 0
                if action == "retry":
                    assert decide(now_us + decision.wait_us - 1, cost).outcome == Outcome.DENIED
                    now_us += decision.wait_us
                    assert decide(now_us, cost).outcome == Outcome.ALLOWED
            elif action == "use_remaining":
                for _ in range(decision.remaining):
                    assert decide(now_us, 1).outcome == Outcome.ALLOWED
                assert decide(now_us, 1).outcome == Outcome.DENIED
            elif action == "idle":
                now_us += decision.wait_us
                assert decide(now_us, cost).remaining == burst - cost
    finally:
        table.close()


def test_gcra_cost_above_burst_wait():
    """A request costing more than the burst can never be allowed, so its wait_us must not promise it.

    Decision documents wait_us after a denial as the time after which the same
    request would be allowed. QuotaTable returns 2**64 - 1 for a cost above its
    limit; GcraTable must either do the same or keep its promise.
    """
    table = GcraTable.create(1)
    key = key_hash("tenant", "big-cost")
    interval_us, burst = 1000, 5
    now_us = 1_000_000_000

    denied = table.acquire(key, interval_us, burst * interval_us, burst + 1, now_us)
    assert denied.outcome == Outcome.DENIED
    if denied.wait_us != NEVER:
        retry = table.acquire(key, interval_us, burst * interval_us, burst + 1, now_us + denied.wait_us)
        assert retry.outcome == Outcome.ALLOWED, (
            f"denied with wait_us={denied.wait_us}, and denied again after waiting it: {retry}"
        )


def test_gcra_rejects_invalid_rate():
    """interval_us of 0 or limit_us below one interval raises ValueError naming both values."""
    table = GcraTable.create(1)

    with pytest.raises(ValueError, match=r"got 0, 10"):
        table.acquire(1, 0, 10)
    with pytest.raises(ValueError, match=r"got 100, 99"):
        table.acquire(1, 100, 99)
    assert table.usage().inserted == 0


def test_gcra_now_zero_reads_clock():
    """now_us=0 reads CLOCK_MONOTONIC: a full burst is allowed now and replenishes at the configured rate."""
    table = GcraTable.create(1)
    key = key_hash("tenant", "real-clock")
    interval_us, burst = 20_000, 3

    outcomes = [table.acquire(key, interval_us, burst * interval_us).outcome for _ in range(burst + 1)]
    assert outcomes == [Outcome.ALLOWED] * burst + [Outcome.DENIED]

    time.sleep(2 * interval_us / 1e6)
    assert table.acquire(key, interval_us, burst * interval_us).outcome == Outcome.ALLOWED


# ---- GCRA across processes ----


def test_gcra_hot_key_four_processes():
    """4 processes hammering one key for 1 s admit at most burst + rate x elapsed, and at least 90% of it.

    Elapsed runs from before the first fork to after the last decision, so
    every decision's clock reading lies inside it.
    """
    table = GcraTable.create(16)
    key = key_hash("tenant", "hot")
    interval_us, burst = 500, 50
    limit_us = burst * interval_us
    processes = 4
    results = shared_words(2 * processes)  # per process: admitted, last decision end (us)

    started_us = _native.monotonic_us()
    run_until_us = started_us + 1_000_000

    def hammer(index: int) -> None:
        admitted = 0
        requests = 0
        while requests < 5_000_000:
            decision = table.acquire(key, interval_us, limit_us)
            requests += 1
            if decision.outcome == Outcome.ALLOWED:
                admitted += 1
            else:
                assert decision.outcome == Outcome.DENIED
                assert decision.remaining == 0
            if requests % 64 == 0 and _native.monotonic_us() >= run_until_us:
                break
        results.store(16 * index, admitted)
        results.store(16 * index + 8, _native.monotonic_us())

    with Children() as children:
        for index in range(processes):
            children.fork(lambda index=index: hammer(index))
        codes = children.wait_all(timeout_s=10)

    assert codes == [0] * processes
    admitted = sum(results.load(16 * index) for index in range(processes))
    elapsed_us = max(results.load(16 * index + 8) for index in range(processes)) - started_us
    bound = burst + elapsed_us / interval_us
    assert admitted * interval_us <= limit_us + elapsed_us, f"{admitted} admitted, bound {bound:.1f}"
    assert admitted >= 0.9 * bound, f"{admitted} admitted, bound {bound:.1f}"
    usage = table.usage()
    assert usage.inserted == 1
    assert usage.failed_open == 0


def test_gcra_many_keys_no_cross_talk():
    """100k keys, each requested burst + 2 times by 4 processes at once, are each allowed exactly burst times.

    Every process requests every key once (one of them twice), in a different
    order, so first requests race for the insert and later ones probe past
    neighbours. The rate is 1 per 10 s, so nothing replenishes during the test.
    """
    key_count, processes, burst = 100_000, 4, 3
    interval_us = 10_000_000
    limit_us = burst * interval_us
    table = GcraTable.create(key_count)
    keys = [key_hash("client", str(number)) for number in range(key_count)]
    admitted_map = mmap.mmap(-1, processes * key_count)

    def request_all(index: int) -> None:
        admitted = bytearray(key_count)
        order = list(range(key_count))
        random.Random(index).shuffle(order)
        passes = 2 if index == 0 else 1
        for _ in range(passes):
            for number in order:
                decision = table.acquire(keys[number], interval_us, limit_us)
                if decision.outcome == Outcome.ALLOWED:
                    admitted[number] += 1
                else:
                    assert decision.outcome == Outcome.DENIED, decision
        admitted_map[index * key_count : (index + 1) * key_count] = bytes(admitted)

    with Children() as children:
        for index in range(processes):
            children.fork(lambda index=index: request_all(index))
        codes = children.wait_all(timeout_s=20)

    assert codes == [0] * processes
    per_key = [
        sum(admitted_map[index * key_count + number] for index in range(processes)) for number in range(key_count)
    ]
    wrong = {number: count for number, count in enumerate(per_key) if count != burst}
    assert wrong == {}, f"{len(wrong)} keys not admitted exactly {burst} times, e.g. {list(wrong.items())[:5]}"

    usage = table.usage()
    assert usage.slots == 262_144
    assert usage.occupied == key_count
    assert usage.inserted == key_count
    assert usage.failed_open == 0
    assert usage.reclaimed == 0


# ---- GCRA slot reclaiming and failing open ----


def fill_table(table: GcraTable, prefix: str, count: int, interval_us: int, now_us: int) -> list[int]:
    """Insert `count` keys with one request each at `now_us` and return their hashes."""
    keys = [key_hash(prefix, str(number)) for number in range(count)]
    for key in keys:
        assert table.acquire(key, interval_us, 10 * interval_us, 1, now_us).outcome == Outcome.ALLOWED
    return keys


def test_gcra_full_active_table_fails_open():
    """With every slot held by a key active in the last second, a new key fails open and is counted."""
    table = GcraTable.create(32)
    interval_us = 1000
    now_us = 50_000_000
    old_keys = fill_table(table, "active", table.slots, interval_us, now_us)
    assert table.usage().occupied == table.slots

    # The old keys' TAT is now + interval, and a slot is reclaimable only once its TAT is over 1 s old.
    for later_us in (now_us, now_us + 500_000, now_us + interval_us + 1_000_000):
        decision = table.acquire(key_hash("newcomer"), interval_us, 10 * interval_us, 1, later_us)
        assert decision.outcome == Outcome.FAILED_OPEN

    usage = table.usage()
    assert usage.failed_open == 3
    assert usage.reclaimed == 0
    assert usage.inserted == table.slots
    # Keys already in the table are still decided normally.
    assert table.acquire(old_keys[0], interval_us, 10 * interval_us, 1, now_us).outcome == Outcome.ALLOWED
    assert table.acquire(old_keys[0], interval_us, interval_us, 1, now_us).outcome == Outcome.DENIED


def test_gcra_reclaims_idle_keys_only():
    """New keys take over slots of keys idle for over 1 s, while keys active meanwhile keep their state."""
    table = GcraTable.create(32)
    interval_us = 1000
    limit_us = 10 * interval_us
    filled_us = 50_000_000
    keys = fill_table(table, "old", table.slots, interval_us, filled_us)
    later_us = filled_us + interval_us + 1_000_001

    # Half the old keys become active again and use up their whole burst.
    active = keys[: table.slots // 2]
    for key in active:
        for _ in range(10):
            assert table.acquire(key, interval_us, limit_us, 1, later_us).outcome == Outcome.ALLOWED
        assert table.acquire(key, interval_us, limit_us, 1, later_us).outcome == Outcome.DENIED

    newcomers = [key_hash("new", str(number)) for number in range(table.slots // 2)]
    for key in newcomers:
        decision = table.acquire(key, interval_us, limit_us, 1, later_us)
        assert decision == Decision(Outcome.ALLOWED, 9, interval_us)

    usage = table.usage()
    assert usage.reclaimed == len(newcomers)
    assert usage.failed_open == 0
    assert usage.occupied == table.slots
    assert usage.inserted == table.slots + len(newcomers)
    for key in active:
        assert table.acquire(key, interval_us, limit_us, 1, later_us).outcome == Outcome.DENIED
    # The table is full of active keys again, so one more newcomer fails open.
    assert table.acquire(key_hash("one more"), interval_us, limit_us, 1, later_us).outcome == Outcome.FAILED_OPEN


def test_gcra_reclaimed_key_starts_fresh():
    """A key whose slot was reclaimed comes back with its full burst, by reclaiming another idle slot."""
    table = GcraTable.create(32)
    interval_us = 1000
    limit_us = 10 * interval_us
    keys = fill_table(table, "first", table.slots, interval_us, 50_000_000)
    later_us = 60_000_000
    newcomers = [key_hash("second", str(number)) for number in range(table.slots)]
    for key in newcomers:
        assert table.acquire(key, interval_us, limit_us, 1, later_us).outcome == Outcome.ALLOWED

    returning_us = later_us + 2_000_000
    decision = table.acquire(keys[0], interval_us, limit_us, 1, returning_us)

    assert decision == Decision(Outcome.ALLOWED, 9, interval_us)
    assert table.usage().reclaimed == table.slots + 1


def test_gcra_reclaim_race_keeps_admission():
    """A key admitted while another process reclaims its idle slot keeps that admission.

    Key K (burst 1) is idle at the start of every round. In each round one
    process requests K twice at the same instant, while another inserts a new
    key whose home slot is K's slot, so the insert checks K's slot for
    reclaiming at the same moment. A correct table allows K at most once per
    round: either the takeover happens first and K is inserted afresh, or K's
    admission comes first and makes its slot active, so not reclaimable. If the
    takeover's compare-and-swap starts from the state read after the
    reclaimable check, it can erase K's admission and K is allowed twice.
    """
    table = GcraTable.create(32)
    slots = table.slots
    region = table.segment.region
    slots_at = HEADER_BYTES + 64  # slot array after the segment header and the table's control line
    interval_us = 1000  # with limit_us = interval_us, a burst of 1
    start_us = 1_000_000_000
    # Raw hashes: the low 6 bits pick the home slot, the top 16 bits are the tag.
    fillers = [((0x1000 + index) << 48) | index for index in range(slots)]
    for key in fillers:
        assert table.acquire(key, interval_us, interval_us, 1, start_us).outcome == Outcome.ALLOWED
    hot = fillers[5]
    sync = shared_words(8)  # 0: barrier arrivals, 8: 1 once the rounds should stop
    results = shared_words(16)  # 0: rounds done, 8: rounds in which K was allowed twice
    max_rounds = 300_000
    # Rounds stop at the first double admission, so only a passing run lasts the full 3 s.
    stop_at = time.monotonic() + 3

    def start_round(round_number: int) -> bool:
        """Wait until both processes reach this round. Return False if it is the last round."""
        sync.fetch_add(0, 1)
        for spin in range(100_000_000):
            if sync.load(0) >= 2 * (round_number + 1):
                break
            if spin > 1000:
                os.sched_yield()  # the other process may be waiting for this CPU
        return sync.load(8) == 0

    cpus = sorted(os.sched_getaffinity(0))

    def slot_index(key: int) -> int:
        """Return the index of the slot that contains `key`, or the key's home index if none does."""
        for index in range(slots):
            if region.load(slots_at + 8 * GcraTable.SLOT_WORDS * index) == key:
                return index
        return key & (slots - 1)

    def pin_to_own_cpu(index: int) -> None:
        """Keep the two processes on different CPUs, so their steps really overlap."""
        if len(cpus) >= 2:
            os.sched_setaffinity(0, {cpus[index]})

    def request_hot_twice() -> None:
        pin_to_own_cpu(0)
        doubles = 0
        for round_number in range(max_rounds):
            now_us = start_us + (round_number + 1) * 2_000_000  # every key is idle again
            if doubles > 0 or time.monotonic() > stop_at or round_number == max_rounds - 1:
                sync.store(8, 1)  # set before arriving, so both processes see it after the barrier
            more = start_round(round_number)
            for _ in range(round_number % 32):
                pass  # vary which step of the other process this request meets
            first = table.acquire(hot, interval_us, interval_us, 1, now_us).outcome
            second = table.acquire(hot, interval_us, interval_us, 1, now_us).outcome
            doubles += first == Outcome.ALLOWED and second == Outcome.ALLOWED
            results.store(0, round_number + 1)
            if not more:
                break
        results.store(8, doubles)

    def insert_over_hot() -> None:
        pin_to_own_cpu(1)
        for round_number in range(max_rounds):
            now_us = start_us + (round_number + 1) * 2_000_000
            home = slot_index(hot)
            newcomer = ((0x4000 + round_number % 0x3000) << 48) | ((round_number + 1) << 6) | home
            more = start_round(round_number)
            table.acquire(newcomer, interval_us, interval_us, 1, now_us)
            if not more:
                break

    with Children() as children:
        children.fork(request_hot_twice)
        children.fork(insert_over_hot)
        codes = children.wait_all(timeout_s=10)

    assert codes == [0, 0]
    rounds = results.load(0)
    assert results.load(8) == 0, f"K was allowed twice in {results.load(8)} of {rounds} rounds"
    assert rounds >= 1000, f"only {rounds} rounds ran"


# ---- insert lock and killed processes ----


def test_gcra_insert_recovers_killed_holder():
    """A process SIGKILLed while holding the insert lock does not block inserts: the next one recovers it."""
    table = GcraTable.create(16)
    region = table.segment.region

    def hold_insert_lock() -> None:
        assert region.lock(INSERT_LOCK_AT, 0) == 0
        time.sleep(30)

    with Children() as children:
        pid = children.fork(hold_insert_lock)
        deadline = time.monotonic() + 5
        while region.load(INSERT_LOCK_AT) & TID_MASK != pid and time.monotonic() < deadline:
            time.sleep(0.001)
        assert region.load(INSERT_LOCK_AT) & TID_MASK == pid
        children.kill(pid)

    started = time.monotonic()
    decision = table.acquire(key_hash("after-kill"), 1000, 5000)
    elapsed = time.monotonic() - started

    assert decision.outcome == Outcome.ALLOWED
    assert elapsed < 0.1
    assert region.load(INSERT_LOCK_AT) == 0
    assert table.usage().failed_open == 0


def test_gcra_stopped_lock_holder_fails_open():
    """While a live process holds the insert lock, new keys fail open after its timeout but known keys still decide."""
    table = GcraTable.create(16)
    region = table.segment.region
    known = key_hash("known")
    assert table.acquire(known, 1000, 1000, 1, 10_000_000).outcome == Outcome.ALLOWED

    def hold_then_stop() -> None:
        assert region.lock(INSERT_LOCK_AT, 0) == 0
        os.kill(os.getpid(), signal.SIGSTOP)

    with Children() as children:
        pid = children.fork(hold_then_stop)
        _, status = os.waitpid(pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)

        started = time.monotonic()
        decision = table.acquire(key_hash("new"), 1000, 5000, 1, 10_000_000)
        elapsed = time.monotonic() - started
        assert decision.outcome == Outcome.FAILED_OPEN
        assert elapsed < 0.1
        assert table.acquire(known, 1000, 1000, 1, 10_000_000).outcome == Outcome.DENIED
        assert table.usage().failed_open == 1
        children.kill(pid)

    assert table.acquire(key_hash("new"), 1000, 5000, 1, 10_000_000).outcome == Outcome.ALLOWED


def test_gcra_survives_sigkill_storm():
    """200 SIGKILLs of processes deciding on new and known keys leave the table usable and the hot-key bound intact.

    Two deciders run at a time; the parent kills one at a random moment and
    forks a replacement. Admissions of the hot key are counted in a shared
    word after each decision, so a kill can lose a count but never add one.
    Afterwards a fresh process must insert 1000 new keys without failing
    open, and a clean run on the hot key must keep the GCRA bound.
    """
    table = GcraTable.create(65_536)
    region = table.segment.region
    hot = key_hash("tenant", "hot")
    interval_us, burst = 200, 20
    limit_us = burst * interval_us
    counters = shared_words(8)  # 0: hot-key admissions during the storm
    key_space = 40_000

    def decide_forever(seed: int) -> None:
        generator = random.Random(seed)
        for _ in range(10_000_000):
            key = key_hash("client", str(generator.randrange(key_space)))
            table.acquire(key, 1_000_000, 5_000_000)
            if table.acquire(hot, interval_us, limit_us).outcome == Outcome.ALLOWED:
                counters.fetch_add(0, 1)

    kills = 0
    generator = random.Random(7)
    storm_started_us = _native.monotonic_us()
    storm_deadline = time.monotonic() + 8
    with Children() as children:
        deciders = [children.fork(lambda seed=seed: decide_forever(seed)) for seed in range(2)]
        seed = 2
        while kills < 200 and time.monotonic() < storm_deadline:
            time.sleep(generator.uniform(0, 0.004))
            victim = deciders.pop(generator.randrange(len(deciders)))
            assert children.kill(victim) == -signal.SIGKILL
            kills += 1
            deciders.append(children.fork(lambda seed=seed: decide_forever(seed)))
            seed += 1
        for pid in list(deciders):
            children.kill(pid)
    storm_ended_us = _native.monotonic_us()

    assert kills == 200, f"only {kills} kills within 8 s"
    storm_admitted = counters.load(0)
    storm_bound = burst + (storm_ended_us - storm_started_us) / interval_us
    assert storm_admitted * interval_us <= limit_us + (storm_ended_us - storm_started_us), (
        f"{storm_admitted} admitted during the storm, bound {storm_bound:.1f}"
    )

    # A fresh process inserts new keys promptly: the insert lock is not stuck.
    failed_open_before = table.usage().failed_open

    def insert_new_keys() -> None:
        started = time.monotonic()
        for number in range(1000):
            decision = table.acquire(key_hash("fresh", str(number)), 1_000_000, 5_000_000)
            assert decision.outcome == Outcome.ALLOWED, (number, decision)
        assert time.monotonic() - started < 0.5

    with Children() as children:
        assert children.wait(children.fork(insert_new_keys), timeout_s=5) == 0
    assert table.usage().failed_open == failed_open_before
    assert region.load(INSERT_LOCK_AT) == 0

    # The hot key, which survived the storm, still keeps the bound in a clean run.
    results = shared_words(8)
    clean_started_us = _native.monotonic_us()
    run_until_us = clean_started_us + 300_000

    def hammer_hot(index: int) -> None:
        admitted = 0
        while _native.monotonic_us() < run_until_us:
            admitted += table.acquire(hot, interval_us, limit_us).outcome == Outcome.ALLOWED
        results.store(8 * index, admitted)

    with Children() as children:
        for index in range(2):
            children.fork(lambda index=index: hammer_hot(index))
        assert children.wait_all(timeout_s=5) == [0, 0]
    clean_elapsed_us = _native.monotonic_us() - clean_started_us
    clean_admitted = results.load(0) + results.load(8)
    clean_bound = burst + clean_elapsed_us / interval_us
    assert clean_admitted * interval_us <= limit_us + clean_elapsed_us, (
        f"{clean_admitted} admitted, bound {clean_bound:.1f}"
    )
    # Only a loose floor: the key must not be stuck, but a loaded machine may delay the forks.
    assert clean_admitted >= 0.5 * clean_bound, f"{clean_admitted} admitted, bound {clean_bound:.1f}"


# ---- sliding-window quota ----


class SlidingWindowModel:
    """Sliding-window counter for one key: previous x unelapsed share of the window + current <= limit."""

    def __init__(self, window_us: int, limit: int) -> None:
        self.window_us = window_us
        self.limit = limit
        self.counts: dict[int, int] = {}

    def scaled_estimate(self, now_us: int, cost: int) -> int:
        """Return the estimate after admitting `cost` at `now_us`, multiplied by window_us to stay exact."""
        window, elapsed = divmod(now_us, self.window_us)
        previous = self.counts.get(window - 1, 0)
        current = self.counts.get(window, 0)
        return previous * (self.window_us - elapsed) + (current + cost) * self.window_us

    def allows(self, now_us: int, cost: int) -> bool:
        return self.scaled_estimate(now_us, cost) <= self.limit * self.window_us

    def earliest_allowed(self, now_us: int, cost: int) -> int | None:
        """Return the first instant from `now_us` at which the request would be allowed, or None if never.

        The estimate only falls as time passes, so a binary search over the
        next two windows finds it.
        """
        low, high = now_us, now_us + 2 * self.window_us
        if not self.allows(high, cost):
            return None
        while low < high:
            middle = (low + high) // 2
            if self.allows(middle, cost):
                high = middle
            else:
                low = middle + 1
        return low

    def decide(self, now_us: int, cost: int) -> Decision:
        window, elapsed = divmod(now_us, self.window_us)
        scaled = self.scaled_estimate(now_us, cost)
        if scaled > self.limit * self.window_us:
            earliest = self.earliest_allowed(now_us, cost)
            return Decision(Outcome.DENIED, 0, NEVER if earliest is None else earliest - now_us)
        self.counts[window] = self.counts.get(window, 0) + cost
        # The whole quota is back when this window's count has slid out, at the end of the next window.
        return Decision(
            Outcome.ALLOWED, (self.limit * self.window_us - scaled) // self.window_us, 2 * self.window_us - elapsed
        )


@st.composite
def quota_scenarios(draw):
    window_us = draw(st.integers(1, 2_000_000))
    limit = draw(st.integers(1, 40))
    start_us = draw(st.integers(1_600_000_000_000_000, 1_900_000_000_000_000))
    step_us = st.one_of(st.just(0), st.integers(0, window_us // 8 + 1), st.integers(0, 3 * window_us))
    action = st.sampled_from(["plain", "plain", "retry"])
    steps = draw(st.lists(st.tuples(step_us, st.integers(1, limit + 1), action), min_size=1, max_size=60))
    return window_us, limit, start_us, steps


@settings(max_examples=300, deadline=None)
@given(quota_scenarios())
def test_quota_matches_sliding_window_model(scenario):
    """Every quota decision equals the sliding-window formula, and wait_us is the exact time to the first allowed retry.

    A cost above the limit is denied with wait_us = 2**64 - 1. After any other
    denial, the same request is still denied one microsecond before
    now + wait_us and allowed at now + wait_us.
    """
    window_us, limit, start_us, steps = scenario
    table = QuotaTable.create(1)
    key = key_hash("tenant", "quota-property")
    model = SlidingWindowModel(window_us, limit)

    def decide(now_us: int, cost: int) -> Decision:
        decision = table.acquire(key, window_us, limit, cost, now_us)
        assert decision == model.decide(now_us, cost), f"at {now_us} cost {cost}, counts {model.counts}"
        return decision

    try:
        now_us = start_us
        for step_us, cost, action in steps:
            now_us += step_us
            decision = decide(now_us, cost)
            if action == "retry" and decision.outcome == Outcome.DENIED and decision.wait_us != NEVER:
                assert decide(now_us + decision.wait_us - 1, cost).outcome == Outcome.DENIED
                now_us += decision.wait_us
                assert decide(now_us, cost).outcome == Outcome.ALLOWED
    finally:
        table.close()


@pytest.mark.parametrize("elapsed_us", [0, 1, 250_000, 500_000, 999_999])
def test_quota_estimate_across_boundary(elapsed_us):
    """With 60 requests in the previous window, a 100/s quota allows floor(100 - 60 x unelapsed share) now.

    The count left in the current window then becomes the previous count of
    the next window, and two windows later everything is forgotten.
    """
    window_us, limit, previous = 1_000_000, 100, 60
    table = QuotaTable.create(1)
    key = key_hash("tenant", "boundary")
    window_start_us = 1_700_000_000 * window_us

    for _ in range(previous):
        assert table.acquire(key, window_us, limit, 1, window_start_us - 300_000).outcome == Outcome.ALLOWED
    now_us = window_start_us + elapsed_us
    expected = (limit * window_us - previous * (window_us - elapsed_us)) // window_us
    decisions = [table.acquire(key, window_us, limit, 1, now_us) for _ in range(limit + 1)]
    allowed = [decision for decision in decisions if decision.outcome == Outcome.ALLOWED]

    assert len(allowed) == expected
    assert decisions[expected].outcome == Outcome.DENIED
    assert [decision.remaining for decision in allowed] == list(range(expected - 1, -1, -1))

    # In the next window, at 40% elapsed, `expected` is the previous count.
    next_us = window_start_us + window_us + 400_000
    next_expected = (limit * window_us - expected * (window_us - 400_000)) // window_us
    next_allowed = [table.acquire(key, window_us, limit, 1, next_us).outcome for _ in range(limit + 1)]
    assert next_allowed.count(Outcome.ALLOWED) == next_expected

    # Two windows after that one, nothing of it counts any more.
    forgotten_us = window_start_us + 3 * window_us + 1
    outcomes = [table.acquire(key, window_us, limit, 1, forgotten_us).outcome for _ in range(limit + 1)]
    assert outcomes.count(Outcome.ALLOWED) == limit


def test_quota_wait_leads_to_allowed():
    """wait_us of a denial leads exactly to the first allowed instant, in the same window or the next."""
    window_us, limit = 1_000_000, 10
    table = QuotaTable.create(1)
    key = key_hash("tenant", "wait")
    now_us = 1_700_000_000 * window_us + 100_000
    for _ in range(limit):
        assert table.acquire(key, window_us, limit, 1, now_us).outcome == Outcome.ALLOWED

    denied = table.acquire(key, window_us, limit, 1, now_us)
    assert denied.outcome == Outcome.DENIED
    # The current window is full, so the wait reaches into the next one.
    retry_us = now_us + denied.wait_us
    assert retry_us // window_us == now_us // window_us + 1
    assert table.acquire(key, window_us, limit, 1, retry_us - 1).outcome == Outcome.DENIED
    assert table.acquire(key, window_us, limit, 1, retry_us).outcome == Outcome.ALLOWED

    denied_again = table.acquire(key, window_us, limit, 1, retry_us)
    assert denied_again.outcome == Outcome.DENIED
    # Now the previous window's weight must decay within this window.
    second_retry_us = retry_us + denied_again.wait_us
    assert second_retry_us // window_us == retry_us // window_us
    assert table.acquire(key, window_us, limit, 1, second_retry_us).outcome == Outcome.ALLOWED


def test_quota_exact_limit_four_processes():
    """4 processes requesting 500 each inside one window of a 1000-per-window quota get exactly 1000 in total."""
    window_us, limit, processes, requests = 3_600_000_000, 1000, 4, 500
    table = QuotaTable.create(1)
    key = key_hash("tenant", "contended")
    window_start_us = 470_000 * window_us
    results = shared_words(processes)

    def request_many(index: int) -> None:
        admitted = 0
        for number in range(requests):
            decision = table.acquire(key, window_us, limit, 1, window_start_us + 1 + number)
            admitted += decision.outcome == Outcome.ALLOWED
            assert decision.outcome != Outcome.FAILED_OPEN
        results.store(8 * index, admitted)

    with Children() as children:
        for index in range(processes):
            children.fork(lambda index=index: request_many(index))
        codes = children.wait_all(timeout_s=10)

    assert codes == [0] * processes
    assert sum(results.load(8 * index) for index in range(processes)) == limit
    assert table.acquire(key, window_us, limit, 1, window_start_us + 2 * requests).outcome == Outcome.DENIED


def test_quota_late_request_keeps_counts():
    """A request stamped in the previous window, decided after the key moved on, must not erase its counts.

    Decisions carry the caller's timestamp (or one read before the
    compare-and-swap), so a process can be decided after another process
    already counted the next window. Here window 1 admits 9 requests late in
    the window, then a request stamped at the end of window 0 arrives. A
    correct sliding window still allows at most `limit` in window 1.
    """
    window_us, limit = 1_000_000, 10
    table = QuotaTable.create(1)
    key = key_hash("tenant", "late")
    window_0_us = 1_700_000_000 * window_us

    first = [table.acquire(key, window_us, limit, 1, window_0_us + 100_000).outcome for _ in range(limit)]
    assert first == [Outcome.ALLOWED] * limit
    late_in_window_1_us = window_0_us + window_us + 999_000
    window_1 = [table.acquire(key, window_us, limit, 1, late_in_window_1_us).outcome for _ in range(limit)]

    table.acquire(key, window_us, limit, 1, window_0_us + window_us - 1)

    window_1 += [table.acquire(key, window_us, limit, 1, late_in_window_1_us + 500).outcome for _ in range(limit)]
    assert window_1.count(Outcome.ALLOWED) <= limit


def test_quota_real_clock_window_limit():
    """4 processes hammering one key across 50 short windows never get more than limit + 4 in one window.

    Each process stamps its request with CLOCK_REALTIME read just before the
    call, and results are grouped by the stamp's window. A request stamped just
    before a boundary may be counted in the next window, at most one per
    process, hence the slack of 4.
    """
    window_us, limit, processes = 20_000, 40, 4
    table = QuotaTable.create(1)
    key = key_hash("tenant", "real-clock")
    windows = 60
    first_window = _native.realtime_us() // window_us
    run_until_us = (first_window + 51) * window_us
    results = shared_words(processes * windows)

    def hammer(index: int) -> None:
        counts = [0] * windows
        for _ in range(5_000_000):
            stamp_us = _native.realtime_us()
            if stamp_us >= run_until_us:
                break
            if table.acquire(key, window_us, limit, 1, stamp_us).outcome == Outcome.ALLOWED:
                counts[stamp_us // window_us - first_window] += 1
        for window, count in enumerate(counts):
            results.store(8 * (index * windows + window), count)

    with Children() as children:
        for index in range(processes):
            children.fork(lambda index=index: hammer(index))
        codes = children.wait_all(timeout_s=10)

    assert codes == [0] * processes
    per_window = [
        sum(results.load(8 * (index * windows + window)) for index in range(processes)) for window in range(windows)
    ]
    over = {window: count for window, count in enumerate(per_window) if count > limit + processes}
    assert over == {}, f"windows over {limit} + {processes}: {over}"
    # The key was requested throughout every full window, so each one admitted a share of its limit.
    assert min(per_window[1:50]) >= limit // 4


# ---- usage and segment headers ----


def test_usage_counts_inserts():
    """usage() reports slots, occupied slots and inserted keys, and a repeat request inserts nothing."""
    table = QuotaTable.create(10)
    keys = [key_hash("usage", str(number)) for number in range(7)]
    for key in keys + keys:
        table.acquire(key, 1_000_000, 5, 1, 1_700_000_000_000_000)

    usage = table.usage()
    assert usage.slots == 64
    assert usage.occupied == 7
    assert usage.inserted == 7
    assert usage.failed_open == 0
    assert usage.reclaimed == 0


def test_key_hash_separates_parts():
    """key_hash joins parts with a 0 byte, so moving a character between parts changes the hash."""
    assert key_hash("ab", "c") != key_hash("a", "bc")
    assert key_hash("a", "b") == key_hash(b"a", b"b")


def test_attach_in_child_shares_decisions():
    """A GcraTable attached from its fd in a child decides on the same state as the parent."""
    table = GcraTable.create(8)
    key = key_hash("tenant", "shared")
    now_us = 5_000_000
    assert table.acquire(key, 1000, 2000, 1, now_us).outcome == Outcome.ALLOWED

    def use_last_token() -> None:
        attached = GcraTable.attach(table.segment.fd)
        assert attached.slots == table.slots
        assert attached.acquire(key, 1000, 2000, 1, now_us).outcome == Outcome.ALLOWED
        assert attached.acquire(key, 1000, 2000, 1, now_us).outcome == Outcome.DENIED

    with Children() as children:
        assert children.wait(children.fork(use_last_token), timeout_s=5) == 0
    assert table.acquire(key, 1000, 2000, 1, now_us).outcome == Outcome.DENIED


def test_attach_wrong_kind_raises():
    """A GcraTable segment attached as a QuotaTable raises SegmentError naming both kinds."""
    table = GcraTable.create(8)

    with pytest.raises(SegmentError, match=r"holds b'gcra', expected b'quota'"):
        QuotaTable.attach(table.segment.fd)


def test_attach_newer_layout_raises():
    """A segment whose header carries layout version 3 is rejected by a reader of version 2, and vice versa."""

    class GcraTableV3(GcraTable):
        LAYOUT = 3

    table = GcraTable.create(8)
    with pytest.raises(SegmentError, match=r"layout version 2, this Nexus reads version 3"):
        GcraTableV3.attach(table.segment.fd)

    # Bump the version word of the header (word 2) in place.
    table.segment.region.store(16, 3)
    with pytest.raises(SegmentError, match=r"layout version 3, this Nexus reads version 2"):
        GcraTable.attach(table.segment.fd)
