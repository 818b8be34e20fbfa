"""Sync events: what the master's scan of a rate-limit table reports per dirty key.

A decision outside local sync mode marks its slot dirty (see the header of
`nexus/shm/native/ratelimit.c`). `GcraTable.collect()` and
`QuotaTable.collect()` return each dirty slot's raw words and clear the
mark. The functions here decode those words into events, which
`nexus.redis_sync` turns into Redis script arguments. A key whose window is
not a whole number of seconds has no synced parameters and decodes to None.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["WINDOW_MASK", "GcraEvent", "QuotaEvent", "gcra_event", "quota_event"]

WINDOW_MASK = 0xFFFFF
_COUNT_MASK = 0xFFFFFFFF
_PREVIOUS_MASK = (1 << 44) - 1
_DIRTY_BIT = 1 << 63
_LEASED_BIT = 1 << 63
_ALLOWANCE_SET = 1 << 43


class QuotaEvent(NamedTuple):
    """A quota key that admitted or lacked allowance since the last scan."""

    index: int
    key: int
    window: int  # window number modulo 2**20
    count: int  # this node's admissions in `window`
    previous_window: int
    previous_count: int  # this node's admissions in `previous_window`
    allowance: int  # admissions left from leases for `window`
    window_s: int
    limit: int
    denied: int  # cost rejected for lack of allowance since the last scan


class GcraEvent(NamedTuple):
    """A rate key that admitted or lacked allowance since the last scan."""

    index: int
    key: int
    allowance: int  # tokens left from leases
    interval_us: int
    limit_us: int
    denied: int
    admitted: int  # this node's admissions ever, modulo 2**64


def quota_event(row: tuple[int, ...]) -> QuotaEvent | None:
    """Decode a `QuotaTable.collect()` row; None when the key is not synced."""
    index, key, current, previous, _remote_now, _remote_before, allowance, parameters, dirty = row
    window_s, limit = parameters >> 32, parameters & _COUNT_MASK
    if window_s == 0 or limit == 0:
        return None
    window = (current >> 32) & WINDOW_MASK
    left = 0
    if allowance & _ALLOWANCE_SET and allowance >> 44 == window:
        left = allowance & (_ALLOWANCE_SET - 1)
    return QuotaEvent(
        index=index,
        key=key,
        window=window,
        count=current & _COUNT_MASK,
        previous_window=previous >> 44,
        previous_count=previous & _PREVIOUS_MASK,
        allowance=left,
        window_s=window_s,
        limit=limit,
        denied=dirty & ~_DIRTY_BIT,
    )


def gcra_event(row: tuple[int, ...]) -> GcraEvent | None:
    """Decode a `GcraTable.collect()` row; None when the key has no parameters yet."""
    index, key, _state, allowance, interval_us, limit_us, dirty, admitted, _unused = row
    if interval_us == 0:
        return None
    left = allowance & ~_LEASED_BIT if allowance & _LEASED_BIT else 0
    return GcraEvent(index, key, left, interval_us, limit_us, dirty & ~_DIRTY_BIT, admitted)
