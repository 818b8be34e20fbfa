"""Rate limits across nodes: the master leases allowance from Redis in batches.

Workers decide every request in shared memory and never talk to Redis. In
connected mode a decision also takes its cost from the key's allowance, a
count the master leased from Redis (a key without one starts with a small
bootstrap share, see `nexus/shm/native/ratelimit.c`). Every `sync_interval`
the master's sync thread:

1. heartbeats its node id into a sorted set and counts the live nodes
   (entries newer than three intervals, at least 0.5 s);
2. scans both tables for dirty keys (admitted, or rejected for lack of
   allowance, since the last scan);
3. runs ONE script call per virtual shard (64 shards, keys hash-tagged
   `{v<N>}` so a shard's keys share a Redis Cluster slot). For each key the
   script adds this node's admissions to the global counts and reserves
   what the node used beyond its leases. Then it leases a chunk of
   min(want, room), capped at room / live nodes. Want is twice the key's
   demand in the last interval, minus the allowance left, but at least
   room / (16 x live nodes). Leased allowance is reserved in Redis before a worker
   spends it, so nodes together never admit more than the limit plus the
   bootstrap shares that no round has reported yet;
4. writes the grants, and for quotas the other nodes' counts, into the slots.

Quotas keep per-window hashes {u: admitted, r: reserved} that expire after
two windows; room = limit - (previous window's u x its share still inside
the sliding window) - r. Rates keep a global theoretical arrival time (TAT)
in Redis server time; a lease of n tokens moves it n x interval ahead, and
room is what fits within burst x interval plus two sync intervals.

When a round fails (Redis down, a timeout, a cluster failover) the thread
switches the tables to disconnected mode: each node enforces limit / live
nodes alone, with the live count last seen. It logs that once, retries every
interval with the configured timeout, and logs once when sync resumes.
"""

from __future__ import annotations

import calendar
import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from nexus.config import Redis as RedisConfig
from nexus.shm.events import WINDOW_MASK, GcraEvent, QuotaEvent, gcra_event, quota_event
from nexus.shm.ratelimit import GcraTable, QuotaTable, SyncMode

__all__ = ["SHARDS", "RedisSync", "SyncStatus", "read_status"]

log = logging.getLogger("nexus.redis_sync")

SHARDS = 64
# A node is live while its heartbeat is newer than this many sync intervals.
_LIVE_INTERVALS = 3
_MIN_LIVE_S = 0.5
# Leases of a rate may reserve up to this many sync intervals past the burst,
# so a lease can cover the requests of the interval before the next round.
_RATE_HORIZON_INTERVALS = 2
# After sync resumes, leases wait this many intervals, so that every node has
# reported what it admitted during the outage before room is computed.
_RESUME_HOLD_INTERVALS = 3
# A key with demand leases at least room / (this x live nodes), so a sudden
# rise in load far from the limit is not rejected for lack of allowance. A
# node whose load stops strands at most that much until the window ends.
_HEADROOM_DIVISOR = 16
# An exhausted quota key whose previous window still weighs is asked about again after this long.
_EXHAUSTED_RECHECK_S = 1.0

# Status words in the quota table's control line (word 4 is the sync mode).
_STATUS_LAST_SYNC = 5  # realtime microseconds of the last successful round
_STATUS_BATCH = 6  # last successful round: script calls << 32 | keys synced
_STATUS_ERRORS = 7  # failed rounds since the master started

# KEYS: per quota entry the window's hash and the previous window's hash;
# per rate entry its TAT key. ARGV[1] = live nodes, ARGV[2] = the headroom
# divisor (a key with demand leases at least room / (divisor x live nodes)), then per entry:
#   q, limit, ttl_ms, previous weight (millionths), admitted, reserve, target, left
#   g, interval_us, horizon_us, reserve, target, left
# where target is the allowance the key should hold (0: lease nothing) and
# left is the allowance it holds now.
# Returns per entry {granted, admitted in window, admitted in previous window, room left}.
_BATCH_SCRIPT = """
local live = tonumber(ARGV[1])
local headroom = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local results = {}
local k = 1
local a = 3
while a <= #ARGV do
  if ARGV[a] == 'q' then
    local current, previous = KEYS[k], KEYS[k + 1]
    k = k + 2
    local limit, weight = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 3])
    local target, left = tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7])
    local used = redis.call('HINCRBY', current, 'u', ARGV[a + 4])
    local reserved = redis.call('HINCRBY', current, 'r', ARGV[a + 5])
    redis.call('PEXPIRE', current, ARGV[a + 2])
    local before = tonumber(redis.call('HGET', previous, 'u') or '0')
    local room = limit - math.floor(before * weight / 1000000) - reserved
    local grant = 0
    if target > 0 and room > 0 then
      local want = math.max(target, math.floor(room / (headroom * live))) - left
      if want > 0 then
        grant = math.min(want, math.max(1, math.floor(room / live)))
        redis.call('HINCRBY', current, 'r', grant)
        room = room - grant
      end
    end
    a = a + 8
    results[#results + 1] = {grant, used, before, room}
  else
    local key = KEYS[k]
    k = k + 1
    local interval, horizon = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    local target, left = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
    local tat = tonumber(redis.call('GET', key) or '0')
    if tat < now then tat = now end
    tat = tat + tonumber(ARGV[a + 3]) * interval
    local room = math.floor((now + horizon - tat) / interval)
    local grant = 0
    if target > 0 and room > 0 then
      local want = math.max(target, math.floor(room / (headroom * live))) - left
      if want > 0 then
        grant = math.min(want, math.max(1, math.floor(room / live)))
        tat = tat + grant * interval
        room = room - grant
      end
    end
    redis.call('SET', key, string.format('%d', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
    a = a + 6
    results[#results + 1] = {grant, 0, 0, room}
  end
end
return results
"""

# KEYS[1] = the heartbeat sorted set; ARGV = node id, live span in ms. Returns the live node count.
_HEARTBEAT_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 10)
return redis.call('ZCARD', KEYS[1])
"""


class SyncStatus(NamedTuple):
    """The sync state that the master exports in shared memory, for metrics and status."""

    mode: SyncMode
    live_nodes: int
    last_sync_us: int  # CLOCK_REALTIME microseconds; 0 before the first successful round
    script_calls: int  # in the last successful round
    keys_synced: int  # in the last successful round
    errors: int  # failed rounds since the master started

    @property
    def connected(self) -> bool:
        return self.mode is SyncMode.CONNECTED


def read_status(quotas: QuotaTable) -> SyncStatus:
    """Read the exported sync state from the quota table's control line."""
    mode, live = quotas.sync()
    batch = quotas.control(_STATUS_BATCH)
    return SyncStatus(
        mode, live, quotas.control(_STATUS_LAST_SYNC), batch >> 32, batch & 0xFFFFFFFF, quotas.control(_STATUS_ERRORS)
    )


@dataclass(slots=True)
class _QuotaKey:
    """This node's bookkeeping for one quota key in its current window."""

    window: int
    window_s: int
    reported: int = 0  # admissions added to the window's global count
    granted: int = 0  # allowance leased for the window
    reserved: int = 0  # admissions beyond leases, reserved after the fact
    previous_window: int = -1
    previous_reported: int = 0
    exhausted_until: float = 0.0


@dataclass(slots=True)
class _GcraKey:
    """This node's bookkeeping for one rate key."""

    admitted: int  # the slot's admitted counter at the last round
    granted: int = 0  # tokens leased, plus admissions already reserved


class _Entry(NamedTuple):
    """One key's part of a shard's script call, and how to apply its result."""

    keys: list[str]
    args: list[object]
    event: QuotaEvent | GcraEvent
    reported: int  # quota: admissions added by this entry; rate: tokens reserved after the fact
    reserved: int


class RedisSync:
    """The master's sync thread: call `start()` once the tables exist and `stop()` at shutdown."""

    def __init__(self, config: RedisConfig, gcra: GcraTable, quotas: QuotaTable, node_id: str) -> None:
        self.config = config
        self.node_id = node_id
        self._gcra = gcra
        self._quotas = quotas
        self._interval = float(config.sync_interval)
        self._timeout = float(config.timeout)
        self._prefix = config.key_prefix
        self._heartbeat_key = f"{self._prefix}:{{nodes}}:heartbeat"
        self._client: redis.Redis | RedisCluster | None = None
        self._batch = None
        self._heartbeat = None
        self._connected: bool | None = None  # None before the first round
        self._live = 1
        self._errors = 0
        self._lease_after = 0.0  # monotonic time before which rounds only report
        self._quota_keys: dict[int, _QuotaKey] = {}
        self._gcra_keys: dict[int, _GcraKey] = {}
        # Rows collected but not synced yet because their round failed.
        self._pending_quotas: dict[int, tuple[int, ...]] = {}
        self._pending_gcra: dict[int, tuple[int, ...]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        gcra.set_sync(SyncMode.CONNECTED, 1)
        quotas.set_sync(SyncMode.CONNECTED, 1)

    def start(self) -> None:
        """Run one round now (so the mode is right before workers start), then sync in a thread."""
        self.run_round()
        self._thread = threading.Thread(target=self._run, name="redis-sync", daemon=True)
        self._thread.start()
        log.info("redis sync started node=%s interval_s=%g shards=%d", self.node_id, self._interval, SHARDS)

    def stop(self) -> None:
        """Stop the thread and remove this node from the heartbeat set, if Redis is reachable."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self._interval + 4 * self._timeout + 1.0)
        if self._client is not None:
            try:
                self._client.zrem(self._heartbeat_key, self.node_id)
            except (redis.RedisError, RedisClusterException, OSError) as exc:
                log.info("redis sync stopped without removing the heartbeat node=%s error=%s", self.node_id, exc)
            self._client.close()
        log.info("redis sync stopped node=%s", self.node_id)

    def _run(self) -> None:
        next_round = time.monotonic() + self._interval
        while not self._stop.wait(max(0.0, next_round - time.monotonic())):
            next_round = max(next_round + self._interval, time.monotonic())
            self.run_round()

    def run_round(self) -> bool:
        """Sync once; return whether the round succeeded. Never raises."""
        try:
            self._sync_once()
        except (redis.RedisError, RedisClusterException, OSError) as exc:
            self._on_failure(exc)
            return False
        except Exception as exc:
            # A bug must not end the thread: the node falls back to local limits and logs why.
            if self._connected is not False:
                log.exception("redis sync round failed unexpectedly node=%s", self.node_id)
            self._on_failure(exc)
            return False
        return True

    # ---- one round ---------------------------------------------------

    def _sync_once(self) -> None:
        client = self._connect()
        live = int(
            self._heartbeat(keys=[self._heartbeat_key], args=[self.node_id, self._live_span_ms()], client=client)
        )
        self._live = max(1, live)
        resumed = self._connected is False
        if resumed:
            # Rate admissions made while disconnected were enforced locally
            # already; reserving them now would block the key for as long.
            self._gcra_keys.clear()
            self._lease_after = time.monotonic() + _RESUME_HOLD_INTERVALS * self._interval

        for row in self._quotas.collect():
            self._pending_quotas[row[1]] = row
        for row in self._gcra.collect():
            self._pending_gcra[row[1]] = row
        shards = self._build_entries(resumed)

        calls = 0
        synced = 0
        for shard, entries in sorted(shards.items()):
            keys = [key for entry in entries for key in entry.keys]
            args = [self._live, _HEADROOM_DIVISOR] + [arg for entry in entries for arg in entry.args]
            results = self._batch(keys=keys, args=args, client=client)
            calls += 1
            for entry, result in zip(entries, results, strict=True):
                self._apply(entry, [int(value) for value in result])
            for entry in entries:
                pending = self._pending_gcra if isinstance(entry.event, GcraEvent) else self._pending_quotas
                pending.pop(entry.event.key, None)
            synced += len(entries)

        self._set_mode(SyncMode.CONNECTED)
        self._quotas.control(_STATUS_LAST_SYNC, time.time_ns() // 1000)
        self._quotas.control(_STATUS_BATCH, (calls << 32) | min(synced, 0xFFFFFFFF))
        if self._connected is not True:
            if resumed:
                log.info("redis sync resumed node=%s live_nodes=%d", self.node_id, self._live)
            else:
                log.info("redis sync connected node=%s live_nodes=%d", self.node_id, self._live)
        self._connected = True

    def _on_failure(self, exc: BaseException) -> None:
        self._errors += 1
        self._quotas.control(_STATUS_ERRORS, self._errors)
        self._set_mode(SyncMode.DISCONNECTED)
        if self._connected is not False:
            log.error(
                "redis sync failed node=%s error=%s: enforcing limit / %d live nodes locally until Redis is reachable again",
                self.node_id,
                exc,
                self._live,
            )
        self._connected = False
        # A fresh client next round: a cluster client may hold a stale topology.
        if self._client is not None:
            try:
                self._client.close()
            except (redis.RedisError, RedisClusterException, OSError):
                pass  # the client is dropped either way
        self._client = None

    def _set_mode(self, mode: SyncMode) -> None:
        self._gcra.set_sync(mode, self._live)
        self._quotas.set_sync(mode, self._live)

    def _live_span_ms(self) -> int:
        return int(max(_LIVE_INTERVALS * self._interval, _MIN_LIVE_S) * 1000)

    def _connect(self) -> redis.Redis | RedisCluster:
        if self._client is not None:
            return self._client
        options = {
            "socket_timeout": self._timeout,
            "socket_connect_timeout": self._timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        if self.config.url is not None:
            client = redis.Redis.from_url(self.config.url, **options)
        else:
            nodes = [ClusterNode(urlsplit(url).hostname, urlsplit(url).port or 6379) for url in self.config.cluster]
            client = RedisCluster(startup_nodes=nodes, **options)
        self._batch = client.register_script(_BATCH_SCRIPT)
        self._heartbeat = client.register_script(_HEARTBEAT_SCRIPT)
        self._client = client
        # Load both now (on every primary of a cluster), so rounds run EVALSHA
        # without a NOSCRIPT retry; a restarted server is met by a new client.
        client.script_load(_BATCH_SCRIPT)
        client.script_load(_HEARTBEAT_SCRIPT)
        return client

    # ---- entries -----------------------------------------------------

    def _build_entries(self, resumed: bool) -> dict[int, list[_Entry]]:
        shards: dict[int, list[_Entry]] = {}
        now = time.monotonic()
        holding = now < self._lease_after
        for row in self._pending_quotas.values():
            event = quota_event(row)
            if event is not None:
                for entry in self._quota_entries(event, now, holding):
                    shards.setdefault(event.key % SHARDS, []).append(entry)
        for row in self._pending_gcra.values():
            event = gcra_event(row)
            if event is not None:
                entry = self._gcra_entry(event, resumed, holding)
                shards.setdefault(event.key % SHARDS, []).append(entry)
        return shards

    def _quota_key(self, key: int, window: int, window_s: int) -> str:
        return f"{self._prefix}:{{v{key % SHARDS}}}:q:{key:016x}:{window_s}s:{window}"

    def _quota_entries(self, event: QuotaEvent, now: float, holding: bool) -> list[_Entry]:
        state = self._quota_keys.get(event.key)
        entries = []
        # When the key moved to a new window, report the old window's last admissions first.
        moved = state is not None and state.window != event.window
        if moved and event.previous_window == state.window and event.previous_count > state.reported:
            entries.append(self._quota_entry(event, state, state.window, event.previous_count, 0))
        if state is None or state.window != event.window or state.window_s != event.window_s:
            state = None
        demand = max(0, event.count - (state.reported if state else 0)) + event.denied
        # NOTE: load that rises past the allowance (twice the last interval's
        # demand, at least room / (16 x live nodes)) within one interval is
        # rejected until the next round leases more.
        target = 2 * demand
        if holding or (state is not None and now < state.exhausted_until):
            target = 0
        entries.append(self._quota_entry(event, state, event.window, event.count, target))
        return entries

    def _quota_entry(self, event: QuotaEvent, state: _QuotaKey | None, window: int, count: int, target: int) -> _Entry:
        reported = state.reported if state is not None and state.window == window else 0
        granted = state.granted if state is not None and state.window == window else 0
        reserved = state.reserved if state is not None and state.window == window else 0
        admitted = max(0, count - reported)
        reserve = max(0, count - granted - reserved)
        window_us = event.window_s * 1_000_000
        keys = [
            self._quota_key(event.key, window, event.window_s),
            self._quota_key(event.key, (window - 1) & WINDOW_MASK, event.window_s),
        ]
        weight = _previous_weight(window, window_us)
        args = ["q", event.limit, 2 * event.window_s * 1000, weight, admitted, reserve, target, event.allowance]
        return _Entry(keys, args, event._replace(window=window, count=count), admitted, reserve)

    def _gcra_entry(self, event: GcraEvent, resumed: bool, holding: bool) -> _Entry:
        state = self._gcra_keys.get(event.key)
        if state is None:
            # A key new to this node spent bootstrap tokens, which are reserved
            # now; after an outage the local admissions are not.
            state = _GcraKey(admitted=event.admitted if resumed else 0)
            if resumed:
                state.granted = event.admitted
            self._gcra_keys[event.key] = state
        admitted = (event.admitted - state.admitted) & ((1 << 64) - 1)
        reserve = max(0, event.admitted - state.granted)
        demand = admitted + event.denied
        target = 0 if holding else 2 * demand
        horizon = event.limit_us + _RATE_HORIZON_INTERVALS * int(self._interval * 1_000_000)
        keys = [f"{self._prefix}:{{v{event.key % SHARDS}}}:g:{event.key:016x}:{event.interval_us}"]
        return _Entry(
            keys, ["g", event.interval_us, horizon, reserve, target, event.allowance], event, admitted, reserve
        )

    # ---- results -----------------------------------------------------

    def _apply(self, entry: _Entry, result: list[int]) -> None:
        grant, used, before, room = result
        event = entry.event
        if isinstance(event, GcraEvent):
            state = self._gcra_keys[event.key]
            state.admitted = event.admitted
            state.granted += entry.reserved
            if grant and self._gcra.grant(event.index, event.key, grant):
                state.granted += grant
            return

        state = self._quota_keys.get(event.key)
        if state is None or state.window != event.window:
            if state is not None and ((event.window - state.window) & WINDOW_MASK) >= WINDOW_MASK // 2:
                return  # an answer about a window older than the one tracked now
            previous = state
            state = _QuotaKey(window=event.window, window_s=event.window_s)
            if previous is not None and previous.window == (event.window - 1) & WINDOW_MASK:
                state.previous_window = previous.window
                state.previous_reported = previous.reported
            self._quota_keys[event.key] = state
        state.reported += entry.reported
        state.reserved += entry.reserved
        mine_before = state.previous_reported if state.previous_window == (event.window - 1) & WINDOW_MASK else 0
        remote_now = max(0, used - state.reported)
        remote_before = max(0, before - mine_before)
        if self._quotas.grant(event.index, event.key, event.window, remote_now, remote_before, grant):
            state.granted += grant
        if grant == 0 and room <= 0:
            recheck = _EXHAUSTED_RECHECK_S if before else event.window_s
            state.exhausted_until = time.monotonic() + recheck
        else:
            state.exhausted_until = 0.0


def _previous_weight(window: int, window_us: int) -> int:
    """Millionths of the previous window that still lie inside the sliding window now.

    Windows are numbered now // window (modulo 2**20), except calendar months,
    which `nexus.ratelimit` numbers year x 12 + month. A window that matches
    neither clock weighs fully, the strictest choice.
    """
    now_us = time.time_ns() // 1000
    if (now_us // window_us) & WINDOW_MASK == window:
        return (window_us - now_us % window_us) * 1_000_000 // window_us
    now = datetime.now(UTC)
    days = calendar.monthrange(now.year, now.month)[1]
    if window_us == days * 86_400_000_000 and (now.year * 12 + now.month) & WINDOW_MASK == window:
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        elapsed_us = (now - start) // datetime.resolution
        return (window_us - elapsed_us) * 1_000_000 // window_us
    return 1_000_000
