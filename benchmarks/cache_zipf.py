"""Hit ratio of the shared-memory cache store on a Zipf-distributed key workload.

The workload: `--keys` distinct keys (URLs), each a response of `--object`
bytes, requested in an order drawn from a Zipf distribution with exponent
`--alpha` (key k, ranked by popularity, has probability proportional to
1 / k^alpha); a fixed seed makes runs repeatable. The store
(`nexus.shm.cache.CacheStore`, CLOCK eviction in a circular log) is sized
at `--size-share` of the key space's bytes, record headers included. Each
request is a get, and a miss puts the response with a one-hour TTL, as the
gateway does on a miss of a cacheable response. The first `--warmup`
requests fill the cache and are not counted.

The report gives the measured hit ratio and, for reference, the hit ratio
of an oracle that keeps exactly the most popular keys that fit (the best
any cache of that size can do on an independent Zipf stream).

Run from the repository root:

    .venv/bin/python benchmarks/cache_zipf.py --alpha 1.0 1.1 1.2
"""

from __future__ import annotations

import argparse
import random
import time

import itertools

from nexus.shm.cache import RECORD_HEADER_BYTES, CacheStore


def _weights(keys: int, alpha: float) -> list[float]:
    return [1.0 / rank**alpha for rank in range(1, keys + 1)]


def zipf_ranks(keys: int, alpha: float, count: int, seed: int) -> list[int]:
    """Draw `count` key ranks (0 = most popular) from a Zipf distribution truncated to `keys` keys."""
    cumulative = list(itertools.accumulate(_weights(keys, alpha)))
    return random.Random(seed).choices(range(keys), cum_weights=cumulative, k=count)


def oracle_hit_ratio(keys: int, alpha: float, cached_keys: int) -> float:
    weights = _weights(keys, alpha)
    return sum(weights[:cached_keys]) / sum(weights)


def run(keys: int, alpha: float, object_bytes: int, size_share: float, requests: int, warmup: int, seed: int) -> dict:
    key_bytes = 40
    record = -(-(RECORD_HEADER_BYTES + key_bytes + 16 + object_bytes) // 8) * 8
    capacity = int(keys * record * size_share)
    store = CacheStore.create(capacity, max(int(keys * size_share * 2), 1024), record)
    body = random.Random(seed).randbytes(object_bytes)
    # A random permutation, so popularity does not follow the key's hash order.
    names = list(range(keys))
    random.Random(seed + 1).shuffle(names)
    keys_of = [b"/item/%034d" % name for name in names]

    hits = 0
    counted = 0
    started = time.perf_counter()
    for i, rank in enumerate(zipf_ranks(keys, alpha, warmup + requests, seed)):
        key = keys_of[rank]
        if store.get(key) is not None:
            if i >= warmup:
                hits += 1
        else:
            store.put(key, b"m" * 16, body, 3_600_000_000)
        if i >= warmup:
            counted += 1
    elapsed = time.perf_counter() - started
    return {
        "alpha": alpha,
        "hit_ratio": hits / counted,
        "oracle": oracle_hit_ratio(keys, alpha, int(keys * size_share)),
        "evictions": store.stats()["evictions"],
        "us_per_request": elapsed / (warmup + requests) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100_000, help="distinct keys in the workload")
    parser.add_argument("--alpha", type=float, nargs="+", default=[1.0, 1.1, 1.2], help="Zipf exponents to run")
    parser.add_argument("--object", type=int, default=1024, help="response body bytes per key")
    parser.add_argument("--size-share", type=float, default=0.10, help="store size as a share of the key space's bytes")
    parser.add_argument("--requests", type=int, default=2_000_000, help="counted requests per exponent")
    parser.add_argument("--warmup", type=int, default=500_000, help="requests before counting starts")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    print(f"keys={args.keys} object={args.object}B store={args.size_share:.0%} of the key space, requests={args.requests}")
    print("| Zipf alpha | hit ratio | oracle (top keys that fit) | evictions | us per request |")
    print("|---|---|---|---|---|")
    for alpha in args.alpha:
        result = run(args.keys, alpha, args.object, args.size_share, args.requests, args.warmup, args.seed)
        print(
            f"| {alpha:g} | {result['hit_ratio']:.1%} | {result['oracle']:.1%} | {result['evictions']} | "
            f"{result['us_per_request']:.2f} |"
        )


if __name__ == "__main__":
    main()
