"""Load balancers that pick the upstream target for each request.

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
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import xxhash

__all__ = ["BALANCER_KINDS", "MAGLEV_TABLE_SIZE", "Balancer", "TargetState", "make_balancer"]

BALANCER_KINDS = ("round_robin", "least_request", "p2c_ewma", "maglev")

# Slots in a Maglev lookup table. A prime, so that every skip in 1..size-1
# visits every slot. The Maglev paper (Eisenbud et al., NSDI 2016) recommends
# more than 100 slots per target, which this size meets up to 655 targets.
# Each table takes 256 KiB (4-byte slots) per upstream and worker.
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
        """Fold one latency sample, in seconds, into `ewma_seconds`.

        The average decays with time, not with the number of samples: a
        sample taken `dt` seconds after the previous one gets the weight
        1 - exp(-dt / EWMA_DECAY_SECONDS). Samples close together move the
        average a little each, and the first sample after a long pause almost
        replaces it. Unlike Finagle's peak EWMA, a sample above the average
        does not replace it, so on a busy target one slow request moves the
        average only a little. `now` is time.monotonic() when the response
        completed. A sample with the same `now` as the previous one gets
        weight 0, so do not pass one cached time for a batch of responses.
        Raises ValueError for a negative or non-finite sample.
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
    """A policy that picks the target for each request to one upstream."""

    def pick(self, candidates: Sequence[int], key: bytes | None = None) -> int:
        """Pick the target for the next request and return its index.

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
    its table. The list itself must keep its length, so build a new balancer
    when the upstream's targets change. `hash_balance_factor` (>= 1) bounds maglev's load per target.
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
    """Smooth weighted round robin with the eligibility rule of WF2Q.

    Each target has a score: how far it lags behind its share, in units of
    1/W of a pick, where W is the candidates' total weight. A pick adds each
    candidate's weight to its score and takes W from the chosen target's
    score, so the candidates' scores keep their sum. With a fixed candidate
    set, every W picks give each target exactly its weight.

    nginx's smooth round robin picks the highest score. Here, as in
    worst-case fair weighted fair queueing (WF2Q), only targets that are not
    ahead of their share (score >= 0) are eligible. Among those, the one whose
    next pick falls due first, at (W - score) / weight, wins, and the lowest
    index wins a tie. This spreads the light targets apart. For weights 5,1,1
    the cycle is a b a a c a a, so a runs at most 3 times, counting across
    cycles, where highest-score-first gives a a b a c a a and runs of 4.

    Every pick first checks two invariants on the candidates' scores: they
    sum to 0, and each lies in weight - W .. W - 1. A fixed candidate set that
    starts from zero scores keeps both, so the check changes nothing there
    (checked by simulation over random weights, not proven here).
    A change of the candidate set or of a weight can break them, and then
    `_rebase` restores them. The sum of 0 guarantees an eligible target. With
    two or more candidates, the upper bound caps a run of target h at
    ceil(W / (W - weight_h)) picks, because each pick of h lowers its score by
    W - weight_h and h needs a score >= 0 to be picked. That holds only if no
    rebase makes h eligible again during the run, so a rebase raises the
    target picked last at most to its lower bound, which is below 0.
    """

    def __init__(self, targets: Sequence[TargetState]) -> None:
        self._targets = targets
        self._scores = [0] * len(targets)
        self._last_pick = -1

    def pick(self, candidates: Sequence[int], key: bytes | None = None) -> int:
        _validate_candidates(candidates, len(self._targets))
        targets = self._targets
        weights = [targets[index].weight for index in candidates]
        total = sum(weights)

        best = self._select(candidates, weights, total)
        if best < 0:
            self._rebase(candidates, weights, total)
            best = self._select(candidates, weights, total)

        scores = self._scores
        for index, weight in zip(candidates, weights):
            scores[index] += weight
        scores[best] -= total
        self._last_pick = best
        return best

    def _select(self, candidates: Sequence[int], weights: Sequence[int], total: int) -> int:
        """Return the eligible candidate that falls due first, or -1 if the scores break an invariant."""
        scores = self._scores
        score_sum = 0
        best = -1
        best_due = 0
        best_weight = 1
        for index, weight in zip(candidates, weights):
            score = scores[index]
            if score >= total or score < weight - total:
                return -1
            score_sum += score
            if score < 0:
                continue
            # (total - score) / weight < best_due / best_weight, in integers.
            due = total - score
            if best < 0 or due * best_weight < best_due * weight:
                best = index
                best_due = due
                best_weight = weight

        # A sum of 0 means some score is >= 0, so best is a candidate.
        if score_sum != 0:
            return -1
        return best

    def _rebase(self, candidates: Sequence[int], weights: Sequence[int], total: int) -> None:
        """Clamp the candidates' scores to weight - total .. total - 1 and shift them to sum to 0.

        Scores carried over from another candidate set or weight can be out
        of that range, and the candidates' sum is off by the scores of the
        targets that joined or left. The shift moves every score in
        proportion to its weight, which moves every due time by the same
        amount and so keeps their order, apart from rounding. A score that
        would pass its bound stops there, and the rest goes to the first
        candidates by index that have room. Scores of targets that are not
        candidates stay as they were.
        """
        scores = self._scores
        last_pick = self._last_pick
        last_pick_weight = 0
        score_sum = 0
        for index, weight in zip(candidates, weights):
            score = scores[index]
            if score >= total:
                score = scores[index] = total - 1
            elif score < weight - total:
                score = scores[index] = weight - total
            score_sum += score
            if index == last_pick:
                last_pick_weight = weight

        if score_sum > 0:
            self._lower_scores(candidates, weights, total, score_sum)
        elif score_sum < 0:
            # A single candidate's range is 0 .. weight - 1, so here there
            # are at least two candidates. Raising the target picked last
            # could lengthen its run, so it gets no share. The others have
            # room, because raising all of them to total - 1 gives a sum >= 0.
            self._raise_scores(candidates, weights, total, -score_sum, last_pick, total - last_pick_weight)

    def _lower_scores(self, candidates: Sequence[int], weights: Sequence[int], total: int, amount: int) -> None:
        """Take `amount` from the candidates' scores, in proportion to weight, down to weight - total at most."""
        scores = self._scores
        remaining = amount
        for index, weight in zip(candidates, weights):
            moved = amount * weight // total
            room = scores[index] - (weight - total)
            moved = min(moved, room)
            scores[index] -= moved
            remaining -= moved

        for index, weight in zip(candidates, weights):
            if remaining == 0:
                return
            room = scores[index] - (weight - total)
            moved = min(room, remaining)
            scores[index] -= moved
            remaining -= moved

    def _raise_scores(
        self,
        candidates: Sequence[int],
        weights: Sequence[int],
        total: int,
        amount: int,
        excluded: int,
        shared_weight: int,
    ) -> None:
        """Add `amount` to the scores of the candidates other than `excluded`, up to total - 1 at most.

        Each gets a share in proportion to its weight, and `shared_weight` is
        the sum of their weights.
        """
        scores = self._scores
        remaining = amount
        for index, weight in zip(candidates, weights):
            if index == excluded:
                continue
            moved = amount * weight // shared_weight
            room = total - 1 - scores[index]
            moved = min(moved, room)
            scores[index] += moved
            remaining -= moved

        for index in candidates:
            if remaining == 0:
                return
            if index == excluded:
                continue
            room = total - 1 - scores[index]
            moved = min(room, remaining)
            scores[index] += moved
            remaining -= moved


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
        # NOTE: an average changes only in record_latency. A target that
        # looked slow and then loses every pick keeps its old average, so at
        # low load it gets no requests until its rivals' in_flight raises
        # their cost above its own.
        cost_a = latency_a * (a.in_flight + 1) / a.weight
        cost_b = latency_b * (b.in_flight + 1) / b.weight

        if cost_b < cost_a or (cost_b == cost_a and b.ewma_seconds == 0.0 and a.ewma_seconds != 0.0):
            return b.index
        return a.index


class _Maglev:
    """Maglev consistent hashing with bounded loads.

    The lookup table follows "Maglev: A Fast and Reliable Software Network
    Load Balancer" (Eisenbud et al., NSDI 2016). It is built once from all
    targets, so it does not change with the candidate set, and every worker
    builds the same table. A key starts at the slot of its hash and walks
    forward to the first slot whose target is a candidate under its load
    bound. So removing a target from the candidates moves only the keys that
    were on it, and so does loading a target past its bound, as long as the
    other targets stay under theirs.

    The load bound is the one of consistent hashing with bounded loads, as in
    HAProxy's hash-balance-factor, extended to weights: a target is
    skipped while in_flight >= ceil(factor * (total in_flight + 1) * weight /
    total weight), with totals over the candidates. With equal weights this is
    ceil(factor * (total in_flight + 1) / number of candidates). With
    factor >= 1 at least one candidate is always under its bound, because
    the bounds add up to more than the total in flight.
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
        # NOTE: in_flight counts one worker's requests, so at low concurrency
        # the bound is tight. With 10 equal candidates and 7 or fewer requests
        # in flight it is 1, and keys move off any target already serving one.
        bound_per_weight = self._factor * (total_in_flight + 1) / total_weight

        key_hash = xxhash.xxh3_64_intdigest(key)
        chosen = self._walk(key_hash, allowed, bound_per_weight)
        if chosen is not None:
            return chosen
        # No slot belongs to a candidate, which only happens with more targets
        # than slots. Spread by hash instead.
        return candidates[key_hash % len(candidates)]

    def _walk(self, key_hash: int, allowed: set[int], bound_per_weight: float) -> int | None:
        """Return the first candidate under its load bound from the key's slot on.

        Falls back to the first candidate met when all are at their bound,
        which a factor >= 1 rules out, and to None when no slot in the whole
        table belongs to a candidate.
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


def _build_maglev_table(targets: Sequence[TargetState], size: int) -> array[int]:
    """Build a Maglev lookup table of `size` slots (a prime) of target indexes.

    Each target walks its own permutation of the slots, offset + j * skip
    (mod size), with offset and skip hashed from its URL, so a rebuild after
    adding or removing a target moves few slots of the others (0.2% of the
    table when one of 10 targets is removed). Targets take
    turns claiming their next free slot, and each turn claims one slot. A
    target of weight w takes w / max_weight turns per round, so its slot
    count is proportional to its weight, give or take one. Every target
    takes a turn in the first round, so each owns a slot if there are no
    more targets than slots.
    """
    offsets = []
    skips = []
    for target in targets:
        name = target.url.encode()
        offsets.append(xxhash.xxh3_64_intdigest(name, seed=_MAGLEV_OFFSET_SEED) % size)
        skips.append(xxhash.xxh3_64_intdigest(name, seed=_MAGLEV_SKIP_SEED) % (size - 1) + 1)

    weights = [target.weight for target in targets]
    max_weight = max(weights)
    # 4-byte slots take half the memory of a list of references.
    return array("i", _fill_maglev_table(offsets, skips, weights, max_weight, size))


def _fill_maglev_table(
    offsets: list[int], skips: list[int], weights: list[int], max_weight: int, size: int
) -> list[int]:
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
