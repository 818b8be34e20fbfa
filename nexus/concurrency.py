"""Adaptive concurrency limit per upstream: a Gradient2-style limit, a priority queue, shedding.

Each upstream with a `concurrency` section has one limit for the whole node,
kept in the shared concurrency table (`nexus.shm.concurrency`). Every try
sent to the upstream (retries included) takes one slot before it is sent
and gives it back when its response body is finished or the try fails.

The limit follows Netflix's Gradient2 (concurrency-limits, `Gradient2Limit`):

    gradient = clamp(long_rtt / short_rtt, 0.5, 1.0)
    target   = limit x gradient + sqrt(limit)
    limit   += (target - limit) x SMOOTHING / in_flight, clamped to [min_limit, max_limit]

applied on every RTT sample. `short_rtt` averages the last samples
(SHORT_RTT_WEIGHT each); `long_rtt` follows `short_rtt` with a time
constant of LONG_RTT_TIME_CONSTANT seconds, so it is the upstream's latency
without a queue. When the upstream queues requests, short_rtt rises above
long_rtt and the limit falls; the sqrt(limit) term lets a queue of about
sqrt(limit) requests form, which is the allowance for probing upward.

Gradient2 moves the limit by SMOOTHING on each sample. Here each sample
moves it by 1/in_flight of that, so a round trip of the requests in flight
makes about one Gradient2 step whatever the request rate. With whole steps
per sample, a 200 ms upstream saw the limit climb from 8 to its maximum of
40 in one round trip, before the first RTT sample of the larger load came
back, and then fall back to 10: it oscillated. The limit does not grow
while fewer than GROWTH_MIN_UTILIZATION x limit requests are in flight, so
a lightly loaded upstream does not drift up to max_limit.

Under an overload that lasts much longer than LONG_RTT_TIME_CONSTANT,
long_rtt would rise toward the queued latency and the limit creep up again,
as in Gradient2. So long_rtt is capped at MIN_RTT_TOLERANCE x the lowest RTT
the worker saw in the last MIN_RTT_WINDOW seconds: latency may double
before the limit falls, but the queue cannot grow for good. An upstream
that becomes slower for good (more than MIN_RTT_TOLERANCE x) is limited
harder for up to MIN_RTT_WINDOW seconds, until the window forgets the old
RTTs.

Admission: a request of the tier named "critical" may take a slot while
fewer than `limit` are held; any other request only while fewer than
(1 - critical_reserve) x limit are held, which keeps the rest for critical
traffic. A request that finds no slot waits in its worker's queue: higher
priority first, first come first served within one priority. Waiters get a
slot when one frees in this worker, or from a poll every POLL_INTERVAL for
slots freed by other workers. A waiter waits at most `max_queue_wait`, or
`overloaded_queue_wait` once the queue has been standing for CODEL_INTERVAL
(CoDel's interval, RFC 8289): requests have kept having to wait, and
neither did admissions empty the queue nor did it stay empty for an
interval. A worker's queue holds at most `limit` waiters; when it is full,
an arriving request takes the place of the newest waiter of the lowest
priority if its own priority is higher, and is rejected otherwise. Every
rejection is UpstreamOverloaded: a 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque

from nexus.config import Concurrency
from nexus.errors import UpstreamOverloaded
from nexus.shm.concurrency import ADMITTED, QUEUE_TIMEOUTS, QUEUED, SHED, ConcurrencyTable

__all__ = ["ConcurrencyLimiter", "Permit", "next_limit", "slot_cap"]

log = logging.getLogger("nexus.concurrency")

CRITICAL_TIER = "critical"

# Share of the way to the target that the limit moves per round trip of the
# requests in flight (one sample each).
SMOOTHING = 1.0
# Weight of the newest RTT sample in the short-term average: about the last ten samples.
SHORT_RTT_WEIGHT = 0.1
# Time constant of the long-term average, in seconds, and the minimum time
# between two of its updates (most samples skip it at high request rates).
LONG_RTT_TIME_CONSTANT = 10.0
LONG_RTT_UPDATE_INTERVAL_NS = 1_000_000
# After an overload ends, the long-term average may be far above the current
# RTT. Above this multiple of the short-term average it decays by
# LONG_RTT_DECAY per update instead of following it slowly.
LONG_RTT_RESET_RATIO = 2.0
LONG_RTT_DECAY = 0.95
# The long-term average may not exceed this multiple of the lowest RTT the
# worker saw in the last MIN_RTT_WINDOW seconds. Without that anchor, an
# overload lasting much longer than LONG_RTT_TIME_CONSTANT lets the average
# catch up with the queued latency, and the limit creeps up again.
MIN_RTT_TOLERANCE = 1.5
MIN_RTT_WINDOW = 30

# The limit grows only while at least this share of it is in flight.
GROWTH_MIN_UTILIZATION = 0.5
# How long a worker's queue must be standing before waits are cut to
# `overloaded_queue_wait`, in seconds (CoDel's interval).
CODEL_INTERVAL = 0.1
# How often a worker with waiters checks for slots freed by other workers, in seconds.
POLL_INTERVAL = 0.001
# Retry-After of a shed request, in seconds.
RETRY_AFTER = 1
# A worker logs that an upstream is overloaded at most this often, in seconds.
OVERLOAD_LOG_INTERVAL = 10.0

_ADMITTED = "admitted"
_TIMED_OUT = "timed out"
_DISPLACED = "displaced"


def next_limit(limit: float, long_rtt: float, short_rtt: float, in_flight: int, min_limit: int, max_limit: int) -> float:
    """Return the limit after one RTT sample (any unit, the same for both averages)."""
    gradient = min(1.0, max(0.5, long_rtt / short_rtt))
    target = limit * gradient + math.sqrt(limit)
    if target > limit and in_flight < limit * GROWTH_MIN_UTILIZATION:
        return limit
    step = SMOOTHING / max(1, in_flight)
    smoothed = limit + (target - limit) * step
    return min(float(max_limit), max(float(min_limit), smoothed))


def slot_cap(limit: float, critical: bool, critical_reserve: float) -> int:
    """Return how many slots may be held node-wide when a request of this kind takes one."""
    if critical:
        return max(1, int(limit))
    return max(1, int(limit * (1.0 - critical_reserve)))


class Permit:
    """One held slot; record the try's RTT with `sample` and always `release` it."""

    __slots__ = ("_limiter", "_released")

    def __init__(self, limiter: ConcurrencyLimiter) -> None:
        self._limiter = limiter
        self._released = False

    def sample(self, rtt_seconds: float) -> None:
        self._limiter.record_rtt(rtt_seconds)

    def release(self) -> None:
        """Give the slot back; a second call does nothing."""
        if not self._released:
            self._released = True
            self._limiter.release()


class _Waiter:
    __slots__ = ("critical", "future", "key", "timer")

    def __init__(self, future: asyncio.Future, priority: int, critical: bool) -> None:
        self.future = future
        self.critical = critical
        # Queues are ordered by this key, highest first: a critical waiter
        # goes before a non-critical one of the same priority.
        self.key = (priority, critical)
        self.timer: asyncio.TimerHandle | None = None


class ConcurrencyLimiter:
    """One worker's side of one upstream's shared limit: admission, queue and RTT samples."""

    def __init__(self, table: ConcurrencyTable, index: int, worker: int, settings: Concurrency, upstream: str) -> None:
        self.table = table
        self.index = index
        self.worker = worker
        self.settings = settings
        self.upstream = upstream
        self._reserve = float(settings.critical_reserve)
        self._queues: dict[tuple[int, bool], deque[_Waiter]] = {}
        self._waiting = 0
        self._critical_waiting = 0
        # Loop time when the current congestion episode began (None: no
        # episode), and when the queue last became empty for any reason.
        self._congested_since: float | None = None
        self._emptied_at = 0.0
        self._logged_at = -math.inf
        self._shed_since_log = 0
        self._poll: asyncio.TimerHandle | None = None
        # The worker's event loop, known from the first request that waits.
        self._loop: asyncio.AbstractEventLoop | None = None
        # (second, lowest RTT in ns that second), for the last MIN_RTT_WINDOW seconds.
        self._min_rtts: deque[tuple[int, int]] = deque()

    def limit(self) -> float:
        return self.table.limit(self.index)

    def in_flight(self) -> int:
        return self.table.in_flight(self.index)

    @property
    def waiting(self) -> int:
        """Requests in this worker's queue for a slot."""
        return self._waiting

    async def acquire(self, priority: int, tier: str | None) -> Permit:
        """Take a slot, waiting in the queue if none is free; raise UpstreamOverloaded if none comes."""
        permit = self.try_acquire(tier)
        if permit is not None:
            return permit
        return await self._wait(priority, tier == CRITICAL_TIER)

    def try_acquire(self, tier: str | None) -> Permit | None:
        """Take a slot if one is free and no one in this worker waits before this request; never waits.

        A critical request goes before waiting non-critical ones: they
        cannot use the reserve it may take a slot from.
        """
        critical = tier == CRITICAL_TIER
        if self._critical_waiting or (self._waiting and not critical):
            return None
        if not self._try_acquire(critical, self.table.limit(self.index)):
            return None
        self.table.count(self.index, self.worker, ADMITTED)
        return Permit(self)

    def release(self) -> None:
        self.table.release(self.index, self.worker)
        if self._waiting:
            self._admit_waiters()

    def record_rtt(self, rtt_seconds: float) -> None:
        """Update the shared RTT averages and the limit with one try's RTT."""
        table, index = self.table, self.index
        rtt_ns = max(1, int(rtt_seconds * 1e9))
        short_rtt = table.update_short_rtt(index, rtt_ns, SHORT_RTT_WEIGHT)
        elapsed_ns = table.claim_long_update(index, time.monotonic_ns(), LONG_RTT_UPDATE_INTERVAL_NS)
        if elapsed_ns is None:
            long_rtt = table.rtt(index)[0]
        else:
            long_rtt = table.update_long_rtt(index, lambda old: _long_rtt_step(old, short_rtt, elapsed_ns))
        if long_rtt == 0:
            return
        long_rtt = min(long_rtt, MIN_RTT_TOLERANCE * self._lowest_rtt(rtt_ns))
        in_flight = table.in_flight(index)
        settings = self.settings
        table.update_limit(
            index,
            lambda limit: next_limit(limit, long_rtt, short_rtt, in_flight, settings.min_limit, settings.max_limit),
        )

    def _lowest_rtt(self, rtt_ns: int) -> int:
        """Fold one sample into the per-second minima and return the lowest of the window."""
        second = int(time.monotonic())
        minima = self._min_rtts
        if minima and minima[-1][0] == second:
            if rtt_ns < minima[-1][1]:
                minima[-1] = (second, rtt_ns)
        else:
            minima.append((second, rtt_ns))
            while minima[0][0] <= second - MIN_RTT_WINDOW:
                minima.popleft()
        return min(lowest for _, lowest in minima)

    # The queue.

    def _try_acquire(self, critical: bool, limit: float) -> bool:
        return self.table.try_acquire(self.index, self.worker, slot_cap(limit, critical, self._reserve))

    async def _wait(self, priority: int, critical: bool) -> Permit:
        loop = self._loop = asyncio.get_running_loop()
        limit = self.table.limit(self.index)
        if self._waiting >= max(1, int(limit)) and not self._displace_lowest((priority, critical)):
            self._count_shed(timed_out=False)
            raise UpstreamOverloaded(
                f"upstream {self.upstream!r} is at its concurrency limit of {int(limit)} requests "
                "and the queue for a slot is full",
                upstream=self.upstream,
                retry_after=RETRY_AFTER,
            )

        now = loop.time()
        if self._congested_since is None or (not self._waiting and now - self._emptied_at >= CODEL_INTERVAL):
            self._congested_since = now
        wait = self.settings.max_queue_wait
        if now - self._congested_since >= CODEL_INTERVAL:
            wait = self.settings.overloaded_queue_wait
            self._note_overload(now)
        waiter = _Waiter(loop.create_future(), priority, critical)
        self._enqueue(waiter)
        waiter.timer = loop.call_later(wait, self._expire, waiter)
        self.table.count(self.index, self.worker, QUEUED)
        self._admit_waiters()
        if self._waiting and self._poll is None:
            self._poll = loop.call_later(POLL_INTERVAL, self._on_poll)

        try:
            outcome = await waiter.future
        except BaseException:
            # Cancelled (client gone, total timeout): give back a slot that
            # was granted in the same loop iteration, or leave the queue.
            future = waiter.future
            if future.done() and not future.cancelled() and future.result() == _ADMITTED:
                self.release()
            else:
                self._remove(waiter)
            raise
        if outcome == _ADMITTED:
            self.table.count(self.index, self.worker, ADMITTED)
            return Permit(self)
        self._count_shed(timed_out=outcome == _TIMED_OUT)
        if outcome == _TIMED_OUT:
            detail = f"no slot became free within {wait * 1000:g} ms"
        else:
            detail = "a request of higher priority took its place in the queue"
        raise UpstreamOverloaded(
            f"upstream {self.upstream!r} is at its concurrency limit of {int(self.table.limit(self.index))} "
            f"requests and {detail}",
            upstream=self.upstream,
            retry_after=RETRY_AFTER,
        )

    def _enqueue(self, waiter: _Waiter) -> None:
        queue = self._queues.get(waiter.key)
        if queue is None:
            queue = self._queues[waiter.key] = deque()
        queue.append(waiter)
        self._waiting += 1
        self._critical_waiting += waiter.critical

    def _remove(self, waiter: _Waiter) -> None:
        """Take a waiter out of the queue if it is still there and stop its timer."""
        if waiter.timer is not None:
            waiter.timer.cancel()
        queue = self._queues.get(waiter.key)
        if queue is None:
            return
        try:
            queue.remove(waiter)
        except ValueError:
            return
        self._forget(waiter, queue)

    def _forget(self, waiter: _Waiter, queue: deque[_Waiter]) -> None:
        """Update the counts after `waiter` left `queue`."""
        if not queue:
            del self._queues[waiter.key]
        self._waiting -= 1
        self._critical_waiting -= waiter.critical
        if not self._waiting:
            self._emptied_at = self._loop.time()

    def _finish(self, waiter: _Waiter, outcome: str) -> None:
        if waiter.timer is not None:
            waiter.timer.cancel()
        if not waiter.future.done():
            waiter.future.set_result(outcome)

    def _expire(self, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        self._remove(waiter)
        waiter.future.set_result(_TIMED_OUT)

    def _displace_lowest(self, key: tuple[int, bool]) -> bool:
        """Shed the newest waiter of the lowest priority if it ranks below `key`; return whether one was shed."""
        lowest = min(self._queues)
        if lowest >= key:
            return False
        queue = self._queues[lowest]
        waiter = queue.pop()
        self._forget(waiter, queue)
        self._finish(waiter, _DISPLACED)
        return True

    def _admit_waiters(self) -> None:
        """Give free slots to waiters, highest priority first."""
        limit = self.table.limit(self.index)
        general_blocked = False
        for key in sorted(self._queues, reverse=True):
            critical = key[1]
            if general_blocked and not critical:
                continue
            queue = self._queues[key]
            while queue:
                waiter = queue[0]
                if waiter.future.done():
                    # Cancelled: its task leaves the queue on its next step
                    # and must not be given a slot it would never release.
                    queue.popleft()
                    self._forget(waiter, queue)
                    continue
                if not self._try_acquire(critical, limit):
                    break
                queue.popleft()
                self._forget(waiter, queue)
                self._finish(waiter, _ADMITTED)
                if not self._waiting:
                    # Admissions caught up with arrivals: the episode is over.
                    self._congested_since = None
            if queue:
                if critical:
                    # A critical waiter has the highest cap, so no other waiter fits either.
                    return
                general_blocked = True
                if not self._critical_waiting:
                    return

    def _on_poll(self) -> None:
        self._poll = None
        if not self._waiting:
            return
        self._admit_waiters()
        if self._waiting:
            self._poll = self._loop.call_later(POLL_INTERVAL, self._on_poll)

    # A worker logs an overload at most once per OVERLOAD_LOG_INTERVAL, with
    # the number of requests shed since its last line.

    def _count_shed(self, timed_out: bool) -> None:
        self.table.count(self.index, self.worker, SHED)
        if timed_out:
            self.table.count(self.index, self.worker, QUEUE_TIMEOUTS)
        self._shed_since_log += 1

    def _note_overload(self, now: float) -> None:
        if now - self._logged_at < OVERLOAD_LOG_INTERVAL:
            return
        self._logged_at = now
        log.warning(
            "upstream overloaded, shortening queue waits worker=%d upstream=%s limit=%.1f in_flight=%d waiting=%d "
            "shed_since_last_report=%d",
            self.worker,
            self.upstream,
            self.table.limit(self.index),
            self.table.in_flight(self.index),
            self._waiting,
            self._shed_since_log,
        )
        self._shed_since_log = 0


def _long_rtt_step(old: int, short_rtt: int, elapsed_ns: int) -> float:
    """Move the long-term RTT average toward the short-term one over `elapsed_ns`."""
    if old == 0:
        return short_rtt
    if old > LONG_RTT_RESET_RATIO * short_rtt:
        return old * LONG_RTT_DECAY
    weight = 1.0 - math.exp(-elapsed_ns / (LONG_RTT_TIME_CONSTANT * 1e9))
    return old + (short_rtt - old) * weight
