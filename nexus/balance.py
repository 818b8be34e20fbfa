"""Load balancers: which upstream target gets the next request.

Each worker process keeps one TargetState per target of an upstream and one
balancer per upstream, built by `make_balancer`. Health checks and ejection
live elsewhere: on every request the caller passes the indexes of the targets
that may be used now, and the balancer picks one of them. The caller also
keeps `in_flight` up to date and reports latencies with `record_latency`.
Nothing here does I/O or reads the clock, and nothing is shared between
workers, so no locking is needed inside one event loop.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import xxhash

__all__ = ["Balancer", "TargetState", "make_balancer", "BALANCER_KINDS", "MAGLEV_TABLE_SIZE"]

BALANCER_KINDS = ("round_robin", "least_request", "p2c_ewma", "maglev")

# A prime, so that every skip in 1..size-1 visits every slot. The Maglev paper
# uses 65537 as its small table size and advises a size much larger than the
# number of targets (about 100 times) to keep each target's share within ~1%.
MAGLEV_TABLE_SIZE = 65537

# Time constant of the latency EWMA, in seconds: a sample that is this old
# keeps a weight of 1/e.
EWMA_DECAY_SECONDS = 10.0

# Smallest latency sample stored, in seconds, so that a recorded latency of 0.0
# cannot be mistaken for "no sample yet".
_MIN_LATENCY_SECONDS = 1e-6

# Seeds of the two target-name hashes that place a target in the Maglev table.
# Keys use xxh3's default seed 0.
_MAGLEV_OFFSET_SEED = 1
_MAGLEV_SKIP_SEED = 2


@dataclass(slots=True)
class TargetState:
    """Per-worker view of one upstream target."""

    index: int  # position in the upstream's target list
    url: str  # "http://host:port"
    weight: int = 1  # >= 1
    in_flight: int = 0  # requests this worker has outstanding to the target (caller increments/decrements)
    ewma_seconds: float = 0.0  # latency EWMA, 0.0 = no sample yet
    _last_sample_at: float = field(default=0.0, init=False, repr=False)  # time.monotonic() of the last sample

    def __post_init__(self) -> None:
        if self.weight < 1:
            raise ValueError(f"invalid weight {self.weight} for target {self.url}: must be 1 or more")

    def record_latency(self, seconds: float, now: float) -> None:
        """Fold one latency sample into `ewma_seconds`.

        The EWMA decays with time, not with the number of samples: a sample
        taken `dt` seconds after the previous one gets the weight
        1 - exp(-dt / EWMA_DECAY_SECONDS). A burst of samples moves the average
        a little, and the first sample after a long pause almost replaces it.
        Unlike a peak EWMA, a sample above the average does not replace it.
        A single slow request is therefore not enough to starve the target,
        because p2c_ewma picks never refresh the average of a target that gets
        no requests. `now` is time.monotonic() in seconds. Raises ValueError
        for a negative or non-finite sample.
        """
        if not math.isfinite(seconds) or seconds < 0.0:
            raise ValueError(f"invalid latency {seconds!r} s for target {self.url}: must be finite and >= 0")
        sample = max(seconds, _MIN_LATENCY_SECONDS)

        if self.ewma_seconds == 0.0:
            self.ewma_seconds = sample
        else:
            # A clock that went backwards counts as no time passed.
            elapsed = max(now - self._last_sample_at, 0.0)
            kept = math.exp(-elapsed / EWMA_DECAY_SECONDS)
            self.ewma_seconds = self.ewma_seconds * kept + sample * (1.0 - kept)
        self._last_sample_at = now


class Balancer(Protocol):
    def pick(self, candidates: Sequence[int], key: bytes | None = None) -> int:
        """Return the index of the target for the next request.

        `candidates` is a non-empty list of target indexes allowed now, sorted
        ascending, and the result is always one of them. `key` is the hash key
        for maglev. The other balancers ignore it, and maglev falls back to
        round robin without one. Raises ValueError for an empty list or an
        index outside the target list.
        """
        ...


def make_balancer(
    kind: str,
    targets: Sequence[TargetState],
    *,
    hash_balance_factor: float = 1.25,
    seed: int | None = None,
) -> Balancer:
    """Build the balancer `kind` for one upstream's targets.

    `targets[i].index` must be i. The balancer reads weight, in_flight and
    ewma_seconds from these objects on every pick, so updates by the caller
    take effect at once, except that maglev reads weights only when it builds
    its table. `hash_balance_factor` (>= 1) bounds maglev's load per target.
    `seed` seeds p2c_ewma's random choices, and None seeds them from the OS.
    Build balancers after the fork, so that workers do not share a random
    sequence. Raises ValueError for an unknown kind or invalid targets.
    """
    _validate_targets(targets)

    if kind == "round_robin":
        return _SmoothRoundRobin(targets)
    if kind == "least_request":
        return _LeastRequest(targets)
    if kind == "p2c_ewma":
        return _PowerOfTwoEwma(targets, random.Random(seed))
    if kind == "maglev":
        if not math.isfinite(hash_balance_factor) or hash_balance_factor < 1.0:
            raise ValueError(f"invalid hash_balance_factor {hash_balance_factor!r}: must be a number >= 1.0")
        return _Maglev(targets, hash_balance_factor)
    raise ValueError(f"unknown balancer kind {kind!r}: expected one of {', '.join(BALANCER_KINDS)}")


def _validate_targets(targets: Sequence[TargetState]) -> None:
    if not targets:
        raise ValueError("an upstream needs at least one target to balance over")
    for position, target in enumerate(targets):
        if target.index != position:
            raise ValueError(f"target {target.url} has index {target.index} but is at position {position}")
        if target.weight < 1:
            raise ValueError(f"invalid weight {target.weight} for target {target.url}: must be 1 or more")


def _validate_candidates(candidates: Sequence[int], target_count: int) -> None:
    if not candidates:
        raise ValueError("no candidate targets: the caller must pass at least one target index")
    lowest = min(candidates)
    highest = max(candidates)
    if lowest < 0 or highest >= target_count:
        bad = lowest if lowest < 0 else highest
        raise ValueError(f"candidate index {bad} is out of range for {target_count} targets")


class _SmoothRoundRobin:
    """Smooth weighted round robin, as in nginx's upstream module.

    On each pick every candidate's score grows by its weight, the highest
    score wins (lowest index on a tie) and drops by the candidates' total
    weight. Over any run of picks with a fixed candidate set, each target gets
    exactly its weight's share of every total-weight picks, spread out rather
    than in runs. The sum of all scores stays 0, and scores of targets that
    are not candidates stay frozen. So when the candidate set changes, picks
    carry on from the current scores and no target gets a burst.
    """

    def __init__(self, targets: Sequence[TargetState]) -> None:
        self._targets = targets
        self._scores = [0] * len(targets)

    def pick(self, candidates: Sequence[int], key: bytes | None = None) -> int:
        _validate_candidates(candidates, len(self._targets))
        targets = self._targets
        scores = self._scores

        total_weight = 0
        best = -1
        best_score = 0
        for index in candidates:
            weight = targets[index].weight
            total_weight += weight
            score = scores[index] + weight
            scores[index] = score
            if best < 0 or score > best_score:
                best = index
                best_score = score

        scores[best] -= total_weight
        return best


class _LeastRequest:
    """The candidate with the fewest requests in flight per unit of weight.

    Ties go to the first tied candidate counted from a start position that
    moves by one on every pick, so idle targets take turns.
    """

    def __init__(self, targets: Sequence[TargetState]) -> None:
        self._targets = targets
        self._start = 0

    def pick(self, candidates: Sequence[int], key: bytes | None = None) -> int:
        _validate_candidates(candidates, len(self._targets))
        targets = self._targets
        count = len(candidates)
        start = self._start % count
        self._start = start + 1

        best = candidates[start]
        best_load = targets[best].in_flight
        best_weight = targets[best].weight
        for offset in range(1, count):
            index = candidates[(start + offset) % count]
            target = targets[index]
            # in_flight / weight < best_load / best_weight, in integers.
            if target.in_flight * best_weight < best_load * target.weight:
                best = index
                best_load = target.in_flight
                best_weight = target.weight
        return best


class _PowerOfTwoEwma:
    """Power of two choices on cost = ewma_seconds * (in_flight + 1) / weight.

    A target without a latency sample is costed with the latency of the target
    it is compared with, so the pair is decided by load per weight alone, and
    an idle new target wins the tie. It gets tried at once, but only while it
    is no busier than its rival, because in_flight still counts.
    """

    def __init__(self, targets: Sequence[TargetState], rng: random.Random) -> None:
        self._targets = targets
        self._rng = rng

    def pick(self, candidates: Sequence[int], key: bytes | None = None) -> int:
        _validate_candidates(candidates, len(self._targets))
        count = len(candidates)
        if count == 1:
            return candidates[0]

        # Two distinct positions, uniform over all pairs.
        first = self._rng.randrange(count)
        second = self._rng.randrange(count - 1)
        if second >= first:
            second += 1

        a = self._targets[candidates[first]]
        b = self._targets[candidates[second]]
        latency_a = a.ewma_seconds or b.ewma_seconds
        latency_b = b.ewma_seconds or a.ewma_seconds
        cost_a = latency_a * (a.in_flight + 1) / a.weight
        cost_b = latency_b * (b.in_flight + 1) / b.weight

        if cost_b < cost_a or (cost_b == cost_a and b.ewma_seconds == 0.0 and a.ewma_seconds != 0.0):
            return b.index
        return a.index
        # NOTE: a target that looked slow and then gets no requests keeps its
        # old EWMA, since averages change only in record_latency. At low load
        # it can stay out of picks until its rivals' in_flight makes them dearer.


class _Maglev:
    """Maglev consistent hashing with bounded loads.

    The lookup table (Eisenbud et al., "Maglev: A Fast and Reliable Software
    Network Load Balancer", NSDI 2016) is built once from all targets, so each
    worker and each candidate set share it. A key starts at its hash's slot
    and walks forward to the first slot whose target is a candidate and under
    its load bound. So keys of a candidate never move when another target
    leaves the candidates or gets busy.

    The load bound follows Mirrokni, Thorup and Zadimoghaddam, "Consistent
    Hashing with Bounded Loads" (2018), weighted: a target is skipped while
    in_flight >= ceil(factor * (total in_flight + 1) * weight / total weight),
    with totals over the candidates. With equal weights this is
    ceil(factor * (total + 1) / candidates). With factor >= 1 at least one
    candidate is always under its bound.
    """

    def __init__(self, targets: Sequence[TargetState], hash_balance_factor: float) -> None:
        self._targets = targets
        self._factor = hash_balance_factor
        self._table = _build_maglev_table(targets, MAGLEV_TABLE_SIZE)
        self._keyless = _SmoothRoundRobin(targets)

    def pick(self, candidates: Sequence[int], key: bytes | None = None) -> int:
        if key is None:
            return self._keyless.pick(candidates)
        _validate_candidates(candidates, len(self._targets))

        targets = self._targets
        allowed = set(candidates)
        total_in_flight = 0
        total_weight = 0
        for index in candidates:
            total_in_flight += targets[index].in_flight
            total_weight += targets[index].weight
        # Bound per unit of weight, before rounding up per target.
        bound_per_weight = self._factor * (total_in_flight + 1) / total_weight

        chosen = self._walk(xxhash.xxh3_64_intdigest(key), allowed, bound_per_weight)
        if chosen is not None:
            return chosen
        # No slot belongs to a candidate: a heavily outweighed target may own
        # no slot at all. Spread such keys over the candidates by hash.
        return candidates[xxhash.xxh3_64_intdigest(key) % len(candidates)]

    def _walk(self, key_hash: int, allowed: set[int], bound_per_weight: float) -> int | None:
        """Return the first candidate under its load bound from the key's slot on.

        Falls back to the first candidate met when all are at their bound,
        which only a factor below 1 allows, and to None when no slot in the
        whole table belongs to a candidate.
        """
        table = self._table
        targets = self._targets
        size = len(table)
        slot = key_hash % size
        first_allowed: int | None = None

        for _ in range(size):
            index = table[slot]
            if index in allowed:
                target = targets[index]
                if target.in_flight < math.ceil(bound_per_weight * target.weight):
                    return index
                if first_allowed is None:
                    first_allowed = index
            slot += 1
            if slot == size:
                slot = 0
        return first_allowed


def _build_maglev_table(targets: Sequence[TargetState], size: int) -> list[int]:
    """Fill a Maglev lookup table of `size` slots (a prime) with target indexes.

    Each target walks its own permutation of the slots, offset + j * skip
    (mod size), with offset and skip hashed from its URL, so the table does
    not depend on the order of the target list. Targets take turns claiming
    their next free slot. A target of weight w takes w / max_weight turns per
    round, and every target takes a turn in the first round, so it owns at
    least one slot if there are no more targets than slots.
    """
    offsets = []
    skips = []
    for target in targets:
        name = target.url.encode()
        offsets.append(xxhash.xxh3_64_intdigest(name, seed=_MAGLEV_OFFSET_SEED) % size)
        skips.append(xxhash.xxh3_64_intdigest(name, seed=_MAGLEV_SKIP_SEED) % (size - 1) + 1)

    weights = [target.weight for target in targets]
    max_weight = max(weights)
    return _fill_maglev_table(offsets, skips, weights, max_weight, size)


def _fill_maglev_table(offsets: list[int], skips: list[int], weights: list[int], max_weight: int, size: int) -> list[int]:
    # Integer credits give the weighted turns: a target gains its weight each
    # round and takes a turn for every max_weight of credit.
    table = [-1] * size
    next_slots = offsets[:]
    credits = [max_weight] * len(offsets)
    order = range(len(offsets))
    filled = 0

    while True:
        for index in order:
            credit = credits[index] + weights[index]
            if credit < max_weight:
                credits[index] = credit
                continue
            credits[index] = credit - max_weight

            slot = next_slots[index]
            skip = skips[index]
            while table[slot] >= 0:
                slot += skip
                if slot >= size:
                    slot -= size
            table[slot] = index

            slot += skip
            next_slots[index] = slot - size if slot >= size else slot
            filled += 1
            if filled == size:
                return table
