"""Request coalescing: concurrent misses for one key, in any worker of the node, make one upstream request.

The first miss becomes the fill's leader. Inside one worker the others wait
on an asyncio future. Across workers the leader holds the key's fill slot in
shared memory (`nexus.shm.cache_state`), and a miss in another worker that
finds the slot held polls the store: asyncio sleeps from 1 ms, doubling up
to 16 ms, so a waiter costs one store read per sleep and no Redis or pipe
round trip. Polling beats a cross-process wake-up here, because the wait is
an upstream round trip (milliseconds) and the store read takes a few
microseconds.

A wait ends when the entry appears, when the slot is released without one
(the response was not storable, or the leader failed), when the holder is
found dead, or after the route's `coalesce_timeout`; the waiter then goes
upstream itself.

A stale entry is revalidated the same way: one request leads the
conditional request, and the others wait until its fill ends
(`wait_done`), then look the entry up again.
"""

from __future__ import annotations

import asyncio
import time

from nexus.shm.cache import CacheStore, Entry

__all__ = ["Coalescer", "Fill"]

_FIRST_POLL_S = 0.001
_MAX_POLL_S = 0.016


class Fill:
    """The leader's handle on one fill; `finish()` must run when the fill ends, stored or not."""

    __slots__ = ("_coalescer", "done", "key", "key_hash", "future", "shared")

    def __init__(self, coalescer: Coalescer, key: bytes, key_hash: int, shared: bool) -> None:
        self._coalescer = coalescer
        self.key = key
        self.key_hash = key_hash
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.shared = shared
        self.done = False

    def finish(self) -> None:
        """End the fill and wake its waiters; later calls do nothing (the slot may belong to another fill by then)."""
        if self.done:
            return
        self.done = True
        self._coalescer._finish(self)


class Coalescer:
    """One worker's side of request coalescing."""

    def __init__(self, store: CacheStore) -> None:
        self._store = store
        self._state = store.state
        self._local: dict[bytes, Fill] = {}

    def try_lead(self, key: bytes) -> Fill | None:
        """Become the leader of the fill of `key`, or return None when a fill is already running."""
        if key in self._local:
            return None
        key_hash = self._store.hash_key(key)
        taken = self._state.try_begin_fill(key_hash)
        if taken == 0:
            return None
        # -1: the slot is held for another key, so this key is coalesced
        # only within this worker.
        fill = Fill(self, key, key_hash, shared=taken == 1)
        self._local[key] = fill
        return fill

    async def wait(self, key: bytes, timeout: float) -> Entry | None:
        """Wait for the running fill of `key`; return the stored entry, or None to go upstream."""
        deadline = time.monotonic() + timeout
        fill = self._local.get(key)
        if fill is not None:
            try:
                await asyncio.wait_for(asyncio.shield(fill.future), timeout)
            except TimeoutError:
                return None
            return self._store.get(key)
        return await self._poll(key, deadline)

    async def wait_done(self, key: bytes, timeout: float) -> bool:
        """Wait until the running fill of `key` ends; return False if `timeout` passed first.

        Unlike `wait`, an entry already in the store does not end the wait:
        for a stale entry, the fill is its revalidation.
        """
        fill = self._local.get(key)
        if fill is not None:
            try:
                await asyncio.wait_for(asyncio.shield(fill.future), timeout)
            except TimeoutError:
                return False
            return True
        key_hash = self._store.hash_key(key)
        deadline = time.monotonic() + timeout
        delay = _FIRST_POLL_S
        while self._state.is_filling(key_hash):
            if time.monotonic() + delay > deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_POLL_S)
        return True

    async def _poll(self, key: bytes, deadline: float) -> Entry | None:
        key_hash = self._store.hash_key(key)
        delay = _FIRST_POLL_S
        while True:
            await asyncio.sleep(delay)
            entry = self._store.get(key)
            if entry is not None:
                return entry
            if not self._state.is_filling(key_hash) or time.monotonic() + delay > deadline:
                return None
            delay = min(delay * 2, _MAX_POLL_S)

    def _finish(self, fill: Fill) -> None:
        if self._local.get(fill.key) is fill:
            del self._local[fill.key]
        if fill.shared:
            self._state.end_fill(fill.key_hash)
        if not fill.future.done():
            fill.future.set_result(None)
