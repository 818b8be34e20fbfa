"""Tests of the load balancers in nexus.balance, through make_balancer and TargetState."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus.balance import BALANCER_KINDS, EWMA_DECAY_SECONDS, TargetState, make_balancer


def make_targets(weights: list[int]) -> list[TargetState]:
    return [
        TargetState(index, f"http://10.0.0.{index + 1}:8080", weight=weight) for index, weight in enumerate(weights)
    ]


def longest_run(picks: list[int]) -> int:
    longest = 0
    run = 0
    previous = None
    for pick in picks:
        run = run + 1 if pick == previous else 1
        previous = pick
        longest = max(longest, run)
    return longest


def random_keys(count: int, seed: int) -> list[bytes]:
    generator = random.Random(seed)
    return [generator.randbytes(16) for _ in range(count)]


# ---- round robin ----


@pytest.mark.parametrize(
    "weights",
    [[1], [1, 1, 1], [5, 1, 1], [3, 2], [10, 1], [7, 3, 2, 1], [1000, 1], [4, 4, 2, 9, 1]],
)
def test_round_robin_exact_share_every_cycle(weights: list[int]) -> None:
    balancer = make_balancer("round_robin", make_targets(weights))
    candidates = list(range(len(weights)))
    cycle = sum(weights)

    for _ in range(5):
        counts = Counter(balancer.pick(candidates) for _ in range(cycle))
        for index, weight in enumerate(weights):
            assert counts[index] == weight, f"target {index} got {counts[index]} picks in a cycle, expected {weight}"


@pytest.mark.parametrize(
    ("weights", "max_run"),
    [
        ([1, 1, 1], 1),
        ([5, 1, 1], 3),
        ([3, 1], 3),
        ([5, 2], 3),
        ([9, 1, 1, 1], 3),
        ([10, 1, 1], 5),
        ([3, 1, 1, 1], 1),
        ([2, 2, 1], 1),
    ],
)
def test_round_robin_runs_no_longer_than_needed(weights: list[int], max_run: int) -> None:
    # Runs are counted across cycle boundaries, over 20 cycles.
    balancer = make_balancer("round_robin", make_targets(weights))
    candidates = list(range(len(weights)))

    picks = [balancer.pick(candidates) for _ in range(20 * sum(weights))]

    assert longest_run(picks) == max_run


def test_round_robin_five_one_one_order() -> None:
    balancer = make_balancer("round_robin", make_targets([5, 1, 1]))

    picks = [balancer.pick([0, 1, 2]) for _ in range(14)]

    assert picks == [0, 1, 0, 0, 2, 0, 0] * 2


def test_round_robin_rejoining_target_gets_no_burst() -> None:
    balancer = make_balancer("round_robin", make_targets([1, 1, 1, 1]))
    for _ in range(10):
        balancer.pick([0, 1, 2, 3])
    for _ in range(25):
        balancer.pick([0, 1, 2])

    picks = [balancer.pick([0, 1, 2, 3]) for _ in range(40)]

    assert longest_run(picks) <= 2
    assert picks[:4].count(3) <= 2
    assert Counter(picks) == {0: 10, 1: 10, 2: 10, 3: 10}


def test_round_robin_weight_change_takes_effect() -> None:
    targets = make_targets([1, 1])
    balancer = make_balancer("round_robin", targets)
    for _ in range(7):
        balancer.pick([0, 1])

    targets[0].weight = 3
    picks = [balancer.pick([0, 1]) for _ in range(400)]

    assert Counter(picks[-100:]) == {0: 75, 1: 25}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=8))
def test_round_robin_exact_share_any_weights(weights: list[int]) -> None:
    balancer = make_balancer("round_robin", make_targets(weights))
    candidates = list(range(len(weights)))

    for _ in range(3):
        counts = Counter(balancer.pick(candidates) for _ in range(sum(weights)))
        assert [counts[index] for index in candidates] == weights


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_round_robin_no_burst_after_candidate_changes(data: st.DataObject) -> None:
    # After any change of the candidate set, runs are at most one longer than
    # the shortest possible for the new set, and shares settle to exact ones.
    weights = data.draw(st.lists(st.integers(min_value=1, max_value=6), min_size=2, max_size=6), label="weights")
    balancer = make_balancer("round_robin", make_targets(weights))
    subsets = st.lists(st.sampled_from(range(len(weights))), min_size=2, unique=True).map(sorted)

    for _ in range(data.draw(st.integers(min_value=1, max_value=6), label="changes")):
        candidates = data.draw(subsets, label="candidates")
        picks = [balancer.pick(candidates) for _ in range(data.draw(st.integers(1, 40), label="picks"))]
        total = sum(weights[index] for index in candidates)
        heaviest = max(weights[index] for index in candidates)
        needed = max(1, math.ceil(heaviest / (total - heaviest)))
        assert longest_run(picks) <= needed + 1

    counts = Counter(balancer.pick(candidates) for _ in range(50 * total))
    for index in candidates:
        assert abs(counts[index] - 50 * weights[index]) <= 1


# ---- least request ----


@pytest.mark.parametrize(
    ("in_flight", "weights", "expected"),
    [
        ([3, 1, 2], [1, 1, 1], 1),
        ([0, 4, 9], [1, 1, 1], 0),
        ([5, 5, 4, 5], [1, 1, 1, 1], 2),
        ([4, 3], [4, 1], 0),  # 1.0 per weight against 3.0
        ([6, 2], [2, 1], 1),  # 3.0 per weight against 2.0
        ([9, 2, 2], [3, 1, 1], 1),  # 1 and 2 tie at 2.0 against 3.0, and the first pick scans from 0
    ],
)
def test_least_request_picks_least_loaded(in_flight: list[int], weights: list[int], expected: int) -> None:
    targets = make_targets(weights)
    for target, count in zip(targets, in_flight):
        target.in_flight = count
    balancer = make_balancer("least_request", targets)

    assert balancer.pick(list(range(len(targets)))) == expected


def test_least_request_spreads_ties() -> None:
    targets = make_targets([1, 1, 1, 1])
    balancer = make_balancer("least_request", targets)

    picks = [balancer.pick([0, 1, 2, 3]) for _ in range(8)]

    assert Counter(picks) == {0: 2, 1: 2, 2: 2, 3: 2}


def test_least_request_spreads_ties_among_least_loaded() -> None:
    targets = make_targets([1, 1, 1, 1])
    for target, count in zip(targets, [0, 5, 0, 5]):
        target.in_flight = count
    balancer = make_balancer("least_request", targets)

    picks = [balancer.pick([0, 1, 2, 3]) for _ in range(8)]

    assert set(picks) == {0, 2}
    assert Counter(picks)[0] >= 2
    assert Counter(picks)[2] >= 2


def test_least_request_tracks_in_flight() -> None:
    # The caller counts each pick as in flight, so equal targets fill evenly.
    targets = make_targets([2, 1])
    balancer = make_balancer("least_request", targets)

    for _ in range(30):
        targets[balancer.pick([0, 1])].in_flight += 1

    assert targets[0].in_flight == 20
    assert targets[1].in_flight == 10


# ---- p2c ewma ----


def simulate_p2c(latencies: list[float], picks: int, seed: int) -> Counter[int]:
    """Count picks in a simulated clock: one request per ms, each taking its target's latency."""
    targets = make_targets([1] * len(latencies))
    balancer = make_balancer("p2c_ewma", targets, seed=seed)
    candidates = list(range(len(targets)))
    outstanding: list[tuple[float, int, float]] = []  # (finish time, target, started)
    counts: Counter[int] = Counter()

    for step in range(picks):
        now = step / 1000
        still_running = []
        for finish, index, started in outstanding:
            if finish <= now:
                targets[index].in_flight -= 1
                targets[index].record_latency(finish - started, finish)
            else:
                still_running.append((finish, index, started))
        outstanding = still_running

        index = balancer.pick(candidates)
        assert index in candidates
        counts[index] += 1
        targets[index].in_flight += 1
        outstanding.append((now + latencies[index], index, now))
    return counts


def test_p2c_prefers_faster_target() -> None:
    counts = simulate_p2c([0.010, 0.050], picks=20_000, seed=7)

    assert counts[0] > 0.8 * 20_000
    assert counts[1] > 0


def test_p2c_avoids_one_slow_target() -> None:
    counts = simulate_p2c([0.010, 0.010, 0.010, 0.100], picks=20_000, seed=11)

    assert counts[3] < 0.1 * 20_000
    for fast in (0, 1, 2):
        assert counts[fast] > 0.25 * 20_000


def test_p2c_same_seed_same_picks() -> None:
    targets = make_targets([1, 1, 1, 1, 1])
    first = make_balancer("p2c_ewma", targets, seed=3)
    second = make_balancer("p2c_ewma", targets, seed=3)

    assert [first.pick([0, 1, 2, 3, 4]) for _ in range(50)] == [second.pick([0, 1, 2, 3, 4]) for _ in range(50)]


def test_p2c_tries_target_without_sample() -> None:
    targets = make_targets([1, 1, 1])
    targets[0].record_latency(0.010, 100.0)
    targets[1].record_latency(0.010, 100.0)
    balancer = make_balancer("p2c_ewma", targets, seed=5)

    picks = [balancer.pick([0, 1, 2]) for _ in range(300)]

    # Drawn in two of three pairs, and an idle new target wins its pairs.
    assert 150 < picks.count(2) < 250


def test_p2c_counts_in_flight_of_target_without_sample() -> None:
    targets = make_targets([1, 1, 1])
    targets[0].record_latency(0.010, 100.0)
    targets[1].record_latency(0.010, 100.0)
    targets[2].in_flight = 5
    balancer = make_balancer("p2c_ewma", targets, seed=5)

    picks = [balancer.pick([0, 1, 2]) for _ in range(300)]

    assert 2 not in picks


def test_p2c_weight_lowers_cost() -> None:
    targets = make_targets([1, 4])
    for target in targets:
        target.record_latency(0.020, 1.0)
    targets[0].in_flight = 1
    targets[1].in_flight = 4  # cost 0.020 * 5 / 4 = 0.025 against 0.020 * 2 / 1 = 0.040
    balancer = make_balancer("p2c_ewma", targets, seed=1)

    assert balancer.pick([0, 1]) == 1


def test_p2c_single_candidate() -> None:
    targets = make_targets([1, 1, 1])
    targets[2].in_flight = 1000
    balancer = make_balancer("p2c_ewma", targets, seed=1)

    assert [balancer.pick([2]) for _ in range(10)] == [2] * 10


# ---- maglev ----


def test_maglev_same_key_same_target() -> None:
    targets = make_targets([1] * 10)
    balancer = make_balancer("maglev", targets)
    other_worker = make_balancer("maglev", make_targets([1] * 10))
    candidates = list(range(10))

    for key in random_keys(1000, seed=1):
        first = balancer.pick(candidates, key)
        assert balancer.pick(candidates, key) == first
        assert other_worker.pick(candidates, key) == first


@pytest.mark.parametrize("weights", [[1] * 10, [1, 2, 3, 4], [5, 1, 1], [1, 1]])
def test_maglev_distribution_follows_weights(weights: list[int]) -> None:
    balancer = make_balancer("maglev", make_targets(weights))
    candidates = list(range(len(weights)))

    counts = Counter(balancer.pick(candidates, key) for key in random_keys(100_000, seed=2))

    for index, weight in enumerate(weights):
        expected = 100_000 * weight / sum(weights)
        message = f"target {index}: {counts[index]} keys, expected {expected:.0f}"
        assert abs(counts[index] - expected) < 0.05 * expected, message


def test_maglev_removed_target_moves_only_its_keys() -> None:
    balancer = make_balancer("maglev", make_targets([1] * 10))
    keys = random_keys(20_000, seed=3)
    before = {key: balancer.pick(list(range(10)), key) for key in keys}

    remaining = [index for index in range(10) if index != 4]
    after = {key: balancer.pick(remaining, key) for key in keys}

    moved = [key for key in keys if before[key] != after[key]]
    assert moved
    assert all(before[key] == 4 for key in moved)
    assert all(after[key] != 4 for key in keys)
    assert len({after[key] for key in moved}) == 9


def test_maglev_bounded_load_moves_keys_off_busy_target() -> None:
    targets = make_targets([1] * 10)
    balancer = make_balancer("maglev", targets)
    candidates = list(range(10))
    keys = random_keys(5000, seed=4)
    before = {key: balancer.pick(candidates, key) for key in keys}

    targets[0].in_flight = 10  # bound: ceil(1.25 * (10 + 1) / 10) = 2
    after = {key: balancer.pick(candidates, key) for key in keys}

    assert any(target == 0 for target in before.values())
    assert all(target != 0 for target in after.values())
    for key in keys:
        if before[key] != 0:
            assert after[key] == before[key]


@pytest.mark.parametrize(
    ("weights", "in_flight", "stays"),
    [
        # bound = ceil(1.25 * (total + 1) * weight / total weight)
        ([1, 1, 1, 1], [5, 4, 4, 4], True),  # ceil(1.25 * 18 / 4) = 6
        ([1, 1, 1, 1], [6, 4, 4, 4], False),  # ceil(1.25 * 19 / 4) = 6
        # Weighted: unweighted bounds of 3 and 4 would move these keys.
        ([3, 1, 1, 1], [5, 1, 1, 1], True),  # ceil(1.25 * 9 * 3 / 6) = 6
        ([3, 1, 1, 1], [6, 1, 1, 1], True),  # ceil(1.25 * 10 * 3 / 6) = 7
        ([3, 1, 1, 1], [7, 1, 1, 1], False),  # ceil(1.25 * 11 * 3 / 6) = 7
    ],
)
def test_maglev_load_bound(weights: list[int], in_flight: list[int], stays: bool) -> None:
    targets = make_targets(weights)
    balancer = make_balancer("maglev", targets)
    candidates = list(range(len(targets)))
    keys_on_first = [key for key in random_keys(2000, seed=5) if balancer.pick(candidates, key) == 0]

    for target, count in zip(targets, in_flight):
        target.in_flight = count

    assert keys_on_first
    for key in keys_on_first:
        assert (balancer.pick(candidates, key) == 0) is stays


def test_maglev_without_key_is_round_robin() -> None:
    balancer = make_balancer("maglev", make_targets([2, 1, 1]))

    picks = [balancer.pick([0, 1, 2]) for _ in range(40)]

    assert Counter(picks) == {0: 20, 1: 10, 2: 10}
    assert longest_run(picks) == 1


def test_maglev_reaches_target_with_tiny_weight() -> None:
    targets = make_targets([1000] * 99 + [1])
    balancer = make_balancer("maglev", targets)

    for key in random_keys(50, seed=6):
        assert balancer.pick([99], key) == 99


def test_maglev_table_ignores_candidates_and_load_at_build() -> None:
    # Two workers whose targets differ in load still map keys the same way.
    busy = make_targets([1] * 5)
    busy[2].in_flight = 7
    idle_balancer = make_balancer("maglev", make_targets([1] * 5))
    busy_balancer = make_balancer("maglev", busy)
    busy[2].in_flight = 0

    for key in random_keys(500, seed=8):
        assert busy_balancer.pick([0, 1, 2, 3, 4], key) == idle_balancer.pick([0, 1, 2, 3, 4], key)


# ---- every balancer ----


@pytest.mark.parametrize("kind", BALANCER_KINDS)
def test_balancer_respects_candidate_subset(kind: str) -> None:
    targets = make_targets([1, 3, 1, 2, 1, 1])
    targets[1].record_latency(0.005, 1.0)
    targets[3].record_latency(0.050, 1.0)
    balancer = make_balancer(kind, targets, seed=9)
    candidates = [1, 3, 4]

    picks = [balancer.pick(candidates, key) for key in random_keys(600, seed=9)]

    assert set(picks) <= set(candidates)
    if kind != "p2c_ewma":
        assert set(picks) == set(candidates)


@pytest.mark.parametrize("kind", BALANCER_KINDS)
def test_balancer_rejects_empty_candidates(kind: str) -> None:
    balancer = make_balancer(kind, make_targets([1, 1]))

    with pytest.raises(ValueError, match="no candidate targets"):
        balancer.pick([], b"key")


@pytest.mark.parametrize("kind", BALANCER_KINDS)
@pytest.mark.parametrize("candidates", [[0, 2], [-1, 0], [5]])
def test_balancer_rejects_unknown_index(kind: str, candidates: list[int]) -> None:
    balancer = make_balancer(kind, make_targets([1, 1]))

    with pytest.raises(ValueError, match="out of range for 2 targets"):
        balancer.pick(candidates, b"key")


def test_make_balancer_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError) as error:
        make_balancer("weighted_random", make_targets([1]))

    message = str(error.value)
    assert "'weighted_random'" in message
    for kind in BALANCER_KINDS:
        assert kind in message


@pytest.mark.parametrize("kind", BALANCER_KINDS)
def test_make_balancer_rejects_no_targets(kind: str) -> None:
    with pytest.raises(ValueError, match="at least one target"):
        make_balancer(kind, [])


def test_make_balancer_rejects_misplaced_index() -> None:
    targets = [TargetState(0, "http://10.0.0.1:8080"), TargetState(2, "http://10.0.0.2:8080")]

    with pytest.raises(ValueError, match="has index 2 but is at position 1"):
        make_balancer("round_robin", targets)


def test_make_balancer_rejects_weight_changed_to_zero() -> None:
    targets = make_targets([1, 1])
    targets[1].weight = 0

    with pytest.raises(ValueError, match="invalid weight 0"):
        make_balancer("least_request", targets)


@pytest.mark.parametrize("factor", [0.99, 0.0, -1.0, math.nan, math.inf])
def test_make_balancer_rejects_bad_hash_balance_factor(factor: float) -> None:
    with pytest.raises(ValueError, match="invalid hash_balance_factor"):
        make_balancer("maglev", make_targets([1, 1]), hash_balance_factor=factor)


def test_target_state_rejects_weight_below_one() -> None:
    with pytest.raises(ValueError, match="invalid weight 0 for target http://10.0.0.1:8080"):
        TargetState(0, "http://10.0.0.1:8080", weight=0)


@st.composite
def balancer_cases(draw: st.DrawFn) -> tuple[list[TargetState], list[list[int]], list[bytes | None]]:
    count = draw(st.integers(min_value=1, max_value=8), label="targets")
    targets = make_targets(draw(st.lists(st.integers(1, 10), min_size=count, max_size=count), label="weights"))
    for target in targets:
        target.in_flight = draw(st.integers(min_value=0, max_value=20))
        target.ewma_seconds = draw(st.sampled_from([0.0, 0.001, 0.02, 1.5]))
    subsets = st.lists(st.sampled_from(range(count)), min_size=1, unique=True).map(sorted)
    candidate_lists = draw(st.lists(subsets, min_size=1, max_size=10), label="candidates")
    key_count = len(candidate_lists)
    keys = draw(st.lists(st.none() | st.binary(max_size=32), min_size=key_count, max_size=key_count), label="keys")
    return targets, candidate_lists, keys


@pytest.mark.parametrize("kind", BALANCER_KINDS)
@settings(max_examples=60, deadline=None)
@given(case=balancer_cases(), seed=st.integers(min_value=0, max_value=2**32))
def test_balancer_always_returns_candidate(
    kind: str, case: tuple[list[TargetState], list[list[int]], list[bytes | None]], seed: int
) -> None:
    targets, candidate_lists, keys = case
    balancer = make_balancer(kind, targets, seed=seed)

    for candidates, key in zip(candidate_lists, keys):
        assert balancer.pick(candidates, key) in candidates


# ---- latency EWMA ----


def test_ewma_first_sample_is_taken_as_is() -> None:
    target = TargetState(0, "http://10.0.0.1:8080")

    target.record_latency(0.25, 100.0)

    assert target.ewma_seconds == 0.25


def test_ewma_weights_sample_by_elapsed_time() -> None:
    target = TargetState(0, "http://10.0.0.1:8080")
    target.record_latency(0.100, 100.0)

    target.record_latency(0.010, 100.0 + EWMA_DECAY_SECONDS)

    kept = math.exp(-1.0)
    assert target.ewma_seconds == pytest.approx(0.100 * kept + 0.010 * (1 - kept))


def test_ewma_decays_toward_new_samples() -> None:
    target = TargetState(0, "http://10.0.0.1:8080")
    target.record_latency(0.100, 0.0)
    history = []

    for second in range(1, 61):
        target.record_latency(0.010, float(second))
        history.append(target.ewma_seconds)

    assert all(later < earlier for earlier, later in zip(history, history[1:]))
    assert history[9] == pytest.approx(0.010 + 0.090 * math.exp(-1.0))
    assert target.ewma_seconds == pytest.approx(0.010, rel=0.03)


def test_ewma_rises_toward_slower_samples() -> None:
    target = TargetState(0, "http://10.0.0.1:8080")
    target.record_latency(0.010, 0.0)

    target.record_latency(1.0, 0.1)

    assert 0.010 < target.ewma_seconds < 0.02


def test_ewma_ignores_clock_going_backwards() -> None:
    target = TargetState(0, "http://10.0.0.1:8080")
    target.record_latency(0.100, 50.0)

    target.record_latency(0.010, 40.0)

    assert target.ewma_seconds == 0.100


def test_ewma_zero_latency_counts_as_sample() -> None:
    target = TargetState(0, "http://10.0.0.1:8080")

    target.record_latency(0.0, 1.0)

    assert target.ewma_seconds > 0.0


@pytest.mark.parametrize("seconds", [-0.001, math.nan, math.inf])
def test_ewma_rejects_invalid_latency(seconds: float) -> None:
    target = TargetState(0, "http://10.0.0.1:8080")

    with pytest.raises(ValueError, match="invalid latency"):
        target.record_latency(seconds, 1.0)
    assert target.ewma_seconds == 0.0
