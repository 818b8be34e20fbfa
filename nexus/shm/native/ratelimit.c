/* Rate-limit tables: GCRA (rate with burst) and sliding-window quotas.
 *
 * A table is an array of slots addressed by open addressing with linear
 * probing on a 64-bit key hash. Layout, from the table's byte offset:
 *
 *   control line (64 bytes): [0] insert lock  [1] failed-open decisions
 *                            [2] reclaimed slots  [3] inserted keys
 *                            [4] sync mode (low 8 bits) | live nodes << 8
 *                            [5..7] sync status, written by the master only
 *   slots (8 words, one cache line):
 *     GCRA  [key hash, state, allowance, interval_us, limit_us, dirty,
 *            admitted, unused]
 *     quota [key hash, current, previous, remote current, remote previous,
 *            allowance, parameters, dirty]
 *
 * A decision on a key that is already in the table is lock-free: one
 * compare-and-swap on its state word. Only inserting a key takes the
 * table's insert lock, so two processes never insert one key twice.
 * Inserting may take over the slot of an idle key (one whose state is
 * equivalent to a fresh key), so slots are never emptied and probe chains
 * never break.
 *
 * Every state word carries a tag taken from the key's hash. A takeover
 * changes the tag with a compare-and-swap before it changes the key word,
 * so a process that found the old key and then loses the race sees a
 * foreign tag and looks further (and inserts the old key afresh, which is
 * right because it was idle). A takeover never leaves a half state: the
 * worst a killed inserter leaves is a slot whose key and tag disagree,
 * which every reader skips and a later insert reclaims.
 *
 * GCRA state: tag (16 bits) | TAT (48 bits, CLOCK_MONOTONIC microseconds,
 * good for 8.9 years of uptime). A key is admitted when its theoretical
 * arrival time after this request is at most `limit_us` = burst x interval
 * ahead of now, so admissions never exceed burst + rate x elapsed.
 *
 * Quota state: current = tag (12) | window number (20) | count (32);
 * previous = window number (20) | count (44). The estimate is the sliding
 * window counter: previous x (unelapsed share of the window) + current.
 *
 * Sync across nodes (`nexus/redis_sync.py` runs it in the master). The sync
 * mode in control word 4 changes decisions:
 *   local (0): the words below are ignored; no Redis is configured.
 *   connected (1): a decision must also take `cost` from the key's
 *     allowance, a count of admissions that the master leased from Redis.
 *     A key without an allowance yet starts with a small bootstrap share
 *     (burst / (2 x live nodes) tokens, or limit / (32 x live nodes) for a
 *     quota, at least 1) so a new key is admitted before the master leases.
 *     A quota decision adds the other nodes' counts, which the master writes
 *     into the remote words, to its sliding-window estimate.
 *   disconnected (2): Redis is unreachable; each node enforces its share
 *     alone: a rate of rate / live nodes and a quota of limit / live nodes.
 * Outside local mode an admission marks its slot dirty (bit 63 of the dirty
 * word) and a rejection for lack of allowance adds its cost to the dirty
 * word's low bits, so the master's scan finds the keys that need syncing
 * and how much more they asked for. The allowance costs a second
 * compare-and-swap per decision in connected mode only.
 *
 * Allowance words: GCRA = leased bit 63 | tokens; quota = window (20) |
 * set bit 43 | count (43). Remote words: window (20) | count (44). Quota
 * parameters: window in whole seconds (24) | limit (32), 0 when the window
 * is not a whole number of seconds (such a key is never synced).
 */
#include "region.h"
#include "atomics.h"
#include "lock.h"

#define CONTROL_BYTES 64
#define SLOT_WORDS 8
#define CONTROL_SYNC 4
#define MAX_PROBE 64
/* Inserting holds the lock for well under a microsecond, but its holder can
 * be preempted; 20 ms covers a few scheduler time slices before the insert
 * gives up and the decision fails open. */
#define INSERT_LOCK_TIMEOUT_US 20000
/* An idle GCRA key is reclaimable once its TAT is this far in the past; any
 * TAT before now already means "full burst available", so this only keeps
 * slots from changing hands too eagerly. */
#define GCRA_RECLAIM_AFTER_US 1000000

#define TAT_BITS 48
#define TAT_MASK ((UINT64_C(1) << TAT_BITS) - 1)
#define WINDOW_MASK UINT64_C(0xFFFFF)
#define COUNT_MASK UINT64_C(0xFFFFFFFF)
#define PREVIOUS_MASK ((UINT64_C(1) << 44) - 1)
/* Window numbers wrap at 2^20; a difference in the upper half is negative. */
#define HALF_WINDOWS (WINDOW_MASK >> 1)

enum decision { ALLOWED = 0, DENIED = 1, FAILED_OPEN = 2, NOT_MINE = 3 };
enum sync_mode { SYNC_LOCAL = 0, SYNC_CONNECTED = 1, SYNC_DISCONNECTED = 2 };

#define DIRTY_BIT (UINT64_C(1) << 63)
#define LEASED_BIT (UINT64_C(1) << 63)
#define ALLOWANCE_SET (UINT64_C(1) << 43)
#define ALLOWANCE_MASK (ALLOWANCE_SET - 1)
/* A rejection for lack of allowance retries after this long at most: the
 * master leases more every sync interval. */
#define ALLOWANCE_RETRY_US 1000000

typedef struct {
    unsigned mode;
    uint64_t live;  /* at least 1 */
} SyncView;

static SyncView sync_view(const uint64_t *control)
{
    uint64_t word = nx_load(&control[CONTROL_SYNC]);
    SyncView view = {(unsigned)(word & 0xFF), word >> 8};
    if (view.live == 0)
        view.live = 1;
    return view;
}

/* Record that the slot needs syncing; `denied` adds to the demand the
 * allowance could not meet. */
static void mark_dirty(uint64_t *word, uint64_t denied)
{
    if (denied)
        nx_fetch_add(word, denied);
    if (!(nx_load_relaxed(word) & DIRTY_BIT))
        __atomic_fetch_or(word, DIRTY_BIT, __ATOMIC_ACQ_REL);
}

static void store_if_changed(uint64_t *word, uint64_t value)
{
    if (nx_load_relaxed(word) != value)
        nx_store(word, value);
}

typedef struct {
    int code;
    uint64_t remaining;
    uint64_t wait_us;   /* allowed: until fully replenished; denied: retry after */
} Outcome;

typedef struct {
    uint64_t *control;
    uint64_t *slots;
    uint64_t mask;       /* slot count - 1; the count is a power of two */
    unsigned slot_words;
} Table;

/* ---- shared probing -------------------------------------------------- */

typedef int (*decide_fn)(uint64_t *slot, uint64_t tag, const void *request, Outcome *out);
/* Return whether the slot's key is idle; store the state word checked in *seen. */
typedef int (*reclaimable_fn)(uint64_t *slot, const void *request, uint64_t *seen);
typedef void (*claim_fn)(uint64_t *slot, uint64_t tag, const void *request);

typedef struct {
    unsigned tag_shift;
    uint64_t tag_mask;
    decide_fn decide;
    reclaimable_fn reclaimable;
    /* Set the state of a claimed slot to fresh with a compare-and-swap from
     * `seen` (0 for an empty slot); returns 0 if the state changed meanwhile. */
    int (*take)(uint64_t *slot, uint64_t seen, uint64_t tag, const void *request);
} Kind;

static uint64_t key_word(uint64_t hash)
{
    return hash == 0 ? 1 : hash;  /* 0 marks an empty slot */
}

static uint64_t key_tag(uint64_t hash, const Kind *kind)
{
    uint64_t tag = (hash >> (64 - kind->tag_shift)) & kind->tag_mask;
    return tag == 0 ? 1 : tag;  /* a state of 0 must never look like a claimed one */
}

static uint64_t *slot_at(const Table *table, uint64_t index)
{
    return table->slots + (index & table->mask) * table->slot_words;
}

/* Look for the key without locking; returns the decision or NOT_MINE when
 * the key is not in the table. */
static int find_and_decide(const Table *table, const Kind *kind, uint64_t key, uint64_t tag,
                           const void *request, Outcome *out)
{
    for (uint64_t probe = 0; probe < MAX_PROBE && probe <= table->mask; probe++) {
        uint64_t *slot = slot_at(table, key + probe);
        uint64_t found = nx_load(&slot[0]);
        if (found == 0)
            return NOT_MINE;
        if (found == key) {
            int code = kind->decide(slot, tag, request, out);
            if (code != NOT_MINE)
                return code;
        }
    }
    return NOT_MINE;
}

/* Insert the key under the table's lock, then decide on its slot. */
static int insert_and_decide(const Table *table, const Kind *kind, uint64_t key, uint64_t tag,
                             const void *request, Outcome *out)
{
    enum nx_lock_result locked = nx_lock_acquire(&table->control[0], INSERT_LOCK_TIMEOUT_US);
    if (locked == NX_LOCK_TIMEOUT || locked == NX_LOCK_SELF)
        return FAILED_OPEN;

    /* Another process may have inserted the key while we waited. */
    int code = find_and_decide(table, kind, key, tag, request, out);
    if (code != NOT_MINE) {
        nx_lock_release(&table->control[0]);
        return code;
    }

    uint64_t *claimed = NULL;
    uint64_t seen = 0;
    for (uint64_t probe = 0; probe < MAX_PROBE && probe <= table->mask && claimed == NULL; probe++) {
        uint64_t *slot = slot_at(table, key + probe);
        uint64_t found = nx_load(&slot[0]);
        if (found == 0) {
            kind->take(slot, nx_load(&slot[1]), tag, request);
            claimed = slot;
        } else if (kind->reclaimable(slot, request, &seen)) {
            /* Take over from exactly the state judged idle: if the old key
             * was admitted in between, the compare-and-swap fails. */
            if (kind->take(slot, seen, tag, request)) {
                nx_fetch_add(&table->control[2], 1);
                claimed = slot;
            }
        }
    }
    if (claimed == NULL) {
        nx_lock_release(&table->control[0]);
        return FAILED_OPEN;
    }
    nx_store(&claimed[0], key);
    nx_fetch_add(&table->control[3], 1);
    nx_lock_release(&table->control[0]);

    code = kind->decide(claimed, tag, request, out);
    return code == NOT_MINE ? FAILED_OPEN : code;
}

static int decide_key(const Table *table, const Kind *kind, uint64_t hash, const void *request, Outcome *out)
{
    uint64_t key = key_word(hash);
    uint64_t tag = key_tag(hash, kind);
    int code = find_and_decide(table, kind, key, tag, request, out);
    if (code == NOT_MINE)
        code = insert_and_decide(table, kind, key, tag, request, out);
    if (code == FAILED_OPEN)
        nx_fetch_add(&table->control[1], 1);
    return code;
}

/* ---- GCRA ------------------------------------------------------------ */

typedef struct {
    uint64_t now_us;
    uint64_t interval_us;  /* 1 / rate */
    uint64_t limit_us;     /* burst x interval */
    uint64_t cost;
    SyncView sync;
} GcraRequest;

/* Take `cost` tokens from a GCRA allowance word; a word never leased gets
 * the bootstrap share first. Returns 0 when the allowance is too small. */
static int gcra_take_allowance(uint64_t *word, uint64_t cost, uint64_t bootstrap)
{
    uint64_t seen = nx_load(word);
    for (;;) {
        uint64_t tokens = (seen & LEASED_BIT) ? seen & ~LEASED_BIT : bootstrap;
        if (tokens < cost) {
            if (!(seen & LEASED_BIT))
                nx_cas(word, &seen, LEASED_BIT | tokens);
            return 0;
        }
        if (nx_cas(word, &seen, LEASED_BIT | (tokens - cost)))
            return 1;
    }
}

static void gcra_refund(uint64_t *word, uint64_t cost)
{
    uint64_t seen = nx_load(word);
    while (!nx_cas(word, &seen, LEASED_BIT | ((seen & ~LEASED_BIT) + cost)))
        ;
}

static int gcra_decide(uint64_t *slot, uint64_t tag, const void *raw, Outcome *out)
{
    const GcraRequest *request = raw;
    uint64_t now = request->now_us;
    uint64_t interval = request->interval_us;
    uint64_t limit = request->limit_us;
    uint64_t state = nx_load(&slot[1]);
    int leased = 0;

    if ((state >> TAT_BITS) != tag)
        return NOT_MINE;
    if (request->sync.mode == SYNC_DISCONNECTED) {
        /* This node's share of the rate, keeping the burst as a time span. */
        interval *= request->sync.live;
        if (limit < interval)
            limit = interval;
    } else if (request->sync.mode == SYNC_CONNECTED) {
        uint64_t burst = request->limit_us / request->interval_us;
        uint64_t bootstrap = burst / (2 * request->sync.live);
        if (!gcra_take_allowance(&slot[2], request->cost, bootstrap ? bootstrap : 1)) {
            mark_dirty(&slot[5], request->cost);
            out->code = DENIED;
            out->remaining = 0;
            out->wait_us = interval < ALLOWANCE_RETRY_US ? interval : ALLOWANCE_RETRY_US;
            return DENIED;
        }
        leased = 1;
    }

    for (;;) {
        if ((state >> TAT_BITS) != tag) {
            if (leased)
                gcra_refund(&slot[2], request->cost);
            return NOT_MINE;
        }
        uint64_t tat = state & TAT_MASK;
        if (tat < now)
            tat = now;
        uint64_t next = tat + request->cost * interval;
        uint64_t ahead = next - now;
        if (ahead > limit) {
            if (leased)
                gcra_refund(&slot[2], request->cost);
            out->code = DENIED;
            out->remaining = 0;
            /* A cost above the burst never fits, however long one waits. */
            out->wait_us = request->cost * interval > limit ? UINT64_MAX : ahead - limit;
            return DENIED;
        }
        if (nx_cas(&slot[1], &state, (tag << TAT_BITS) | (next & TAT_MASK))) {
            if (request->sync.mode != SYNC_LOCAL) {
                store_if_changed(&slot[3], request->interval_us);
                store_if_changed(&slot[4], request->limit_us);
                nx_fetch_add(&slot[6], request->cost);
                mark_dirty(&slot[5], 0);
            }
            out->code = ALLOWED;
            out->remaining = (limit - ahead) / interval;
            out->wait_us = ahead;
            return ALLOWED;
        }
    }
}

static int gcra_reclaimable(uint64_t *slot, const void *raw, uint64_t *seen)
{
    const GcraRequest *request = raw;
    *seen = nx_load(&slot[1]);
    return (*seen & TAT_MASK) + GCRA_RECLAIM_AFTER_US < request->now_us;
}

static void clear_sync_words(uint64_t *slot, unsigned first)
{
    for (unsigned word = first; word < SLOT_WORDS; word++)
        nx_store(&slot[word], 0);
}

static int gcra_take(uint64_t *slot, uint64_t seen, uint64_t tag, const void *raw)
{
    if (!nx_cas(&slot[1], &seen, tag << TAT_BITS))
        return 0;
    clear_sync_words(slot, 2);
    return 1;
}

static const Kind GCRA = {16, 0xFFFF, gcra_decide, gcra_reclaimable, gcra_take};

/* ---- sliding-window quota ------------------------------------------- */

typedef struct {
    uint64_t now_us;
    uint64_t window_us;
    uint64_t limit;
    uint64_t cost;
    SyncView sync;
} QuotaRequest;

/* Take `cost` from a quota allowance word for `window`; a word of an older
 * window starts over at the bootstrap share. Returns 0 when too small. */
static int quota_take_allowance(uint64_t *word, uint64_t window, uint64_t cost, uint64_t bootstrap)
{
    uint64_t seen = nx_load(word);
    for (;;) {
        int current = (seen & ALLOWANCE_SET) && (seen >> 44) == window;
        uint64_t count = current ? seen & ALLOWANCE_MASK : bootstrap;
        uint64_t stamp = (window << 44) | ALLOWANCE_SET;
        if (count < cost) {
            if (!current)
                nx_cas(word, &seen, stamp | count);
            return 0;
        }
        if (nx_cas(word, &seen, stamp | (count - cost)))
            return 1;
    }
}

static void quota_refund(uint64_t *word, uint64_t window, uint64_t cost)
{
    uint64_t seen = nx_load(word);
    while ((seen >> 44) == window && (seen & ALLOWANCE_SET))
        if (nx_cas(word, &seen, seen + cost))
            return;
}

static uint64_t remote_count(const uint64_t *word, uint64_t window)
{
    uint64_t value = nx_load(word);
    return (value >> 44) == window ? value & PREVIOUS_MASK : 0;
}

static uint64_t window_of(const QuotaRequest *request)
{
    return (request->now_us / request->window_us) & WINDOW_MASK;
}

/* Raise the previous-window word to (window, count) unless it already
 * holds that window with at least that count, or a newer window. */
static void publish_previous(uint64_t *word, uint64_t window, uint64_t count)
{
    uint64_t want = (window << 44) | (count & PREVIOUS_MASK);
    uint64_t seen = nx_load(word);
    for (;;) {
        uint64_t seen_window = seen >> 44;
        uint64_t age = (window - seen_window) & WINDOW_MASK;
        if (seen != 0 && age == 0 && (seen & PREVIOUS_MASK) >= count)
            return;
        if (seen != 0 && age != 0 && age >= HALF_WINDOWS)
            return;  /* the word already holds a newer window */
        if (nx_cas(word, &seen, want))
            return;
    }
}

/* Microseconds from `elapsed` into a window until the estimate falls to
 * `room`, given previous count `previous` and current count `current`. */
static uint64_t quota_wait(const QuotaRequest *request, uint64_t elapsed, uint64_t previous,
                           uint64_t current)
{
    uint64_t window = request->window_us;
    if (request->cost > request->limit)
        return UINT64_MAX;
    if (current + request->cost <= request->limit) {
        /* Wait in this window until previous x (window - t) / window <= room. */
        uint64_t room = request->limit - current - request->cost;
        if (previous == 0)
            return 0;
        unsigned __int128 need = (unsigned __int128)window * (previous - (room < previous ? room : previous));
        uint64_t at = (uint64_t)((need + previous - 1) / previous);
        return at > elapsed ? at - elapsed : 1;
    }
    /* Wait into the next window, where this window's count becomes previous. */
    uint64_t room = request->limit - request->cost;
    unsigned __int128 need = (unsigned __int128)window * (current - (room < current ? room : current));
    uint64_t at = current == 0 ? 0 : (uint64_t)((need + current - 1) / current);
    return window - elapsed + at;
}

static int quota_decide(uint64_t *slot, uint64_t tag, const void *raw, Outcome *out)
{
    QuotaRequest local = *(const QuotaRequest *)raw;
    const QuotaRequest *request = &local;
    uint64_t state = nx_load(&slot[1]);
    int connected = local.sync.mode == SYNC_CONNECTED;
    uint64_t taken_window = UINT64_MAX;  /* the window whose allowance this decision took from */

    if (local.sync.mode == SYNC_DISCONNECTED) {
        local.limit /= local.sync.live;
        if (local.limit == 0)
            local.limit = 1;
    }
    for (;;) {
        if ((state >> 52) != tag) {
            if (taken_window != UINT64_MAX)
                quota_refund(&slot[5], taken_window, request->cost);
            return NOT_MINE;
        }
        uint64_t window = window_of(request);
        uint64_t elapsed = request->now_us % request->window_us;
        uint64_t state_window = (state >> 32) & WINDOW_MASK;
        uint64_t current = state & COUNT_MASK;
        uint64_t previous = 0;
        uint64_t age = (window - state_window) & WINDOW_MASK;
        if (age >= HALF_WINDOWS) {
            /* Another process already moved the key to a later window than
             * this request's clock reading (it read the clock later). Count
             * the request at the start of that window: the strictest view. */
            window = state_window;
            elapsed = 0;
            age = 0;
        }

        if (age == 0) {
            uint64_t stored = nx_load(&slot[2]);
            if (stored >> 44 == ((window - 1) & WINDOW_MASK))
                previous = stored & PREVIOUS_MASK;
        } else if (age == 1) {
            previous = current;
            current = 0;
        } else {
            current = 0;
        }

        /* Other nodes' counts, as of the master's last sync. Right after a
         * window change the remote current word still contains the old window. */
        uint64_t remote_now = 0;
        uint64_t remote_before = 0;
        uint64_t before = (window - 1) & WINDOW_MASK;
        if (connected) {
            remote_now = remote_count(&slot[3], window);
            remote_before = remote_count(&slot[4], before);
            if (remote_before == 0)
                remote_before = remote_count(&slot[3], before);
        }

        /* estimate x window = previous x (window - elapsed) + current x window */
        unsigned __int128 scaled = (unsigned __int128)(previous + remote_before) * (request->window_us - elapsed)
                                   + (unsigned __int128)(current + remote_now + request->cost) * request->window_us;
        unsigned __int128 ceiling = (unsigned __int128)request->limit * request->window_us;
        if (scaled > ceiling) {
            if (taken_window != UINT64_MAX)
                quota_refund(&slot[5], taken_window, request->cost);
            out->code = DENIED;
            out->remaining = 0;
            out->wait_us = quota_wait(request, elapsed, previous + remote_before, current + remote_now);
            return DENIED;
        }
        if (connected && taken_window != window) {
            if (taken_window != UINT64_MAX)
                quota_refund(&slot[5], taken_window, request->cost);
            taken_window = UINT64_MAX;
            uint64_t bootstrap = request->limit / (32 * request->sync.live);
            if (!quota_take_allowance(&slot[5], window, request->cost, bootstrap ? bootstrap : 1)) {
                mark_dirty(&slot[7], request->cost);
                uint64_t until_end = request->window_us - elapsed;
                out->code = DENIED;
                out->remaining = 0;
                out->wait_us = until_end < ALLOWANCE_RETRY_US ? until_end : ALLOWANCE_RETRY_US;
                return DENIED;
            }
            taken_window = window;
        }
        if (age == 1)
            publish_previous(&slot[2], (window - 1) & WINDOW_MASK, previous);

        uint64_t next = (tag << 52) | (window << 32) | ((current + request->cost) & COUNT_MASK);
        if (nx_cas(&slot[1], &state, next)) {
            if (local.sync.mode != SYNC_LOCAL) {
                uint64_t seconds = request->window_us % 1000000 == 0 ? request->window_us / 1000000 : 0;
                uint64_t parameters = seconds < (UINT64_C(1) << 24) ? (seconds << 32) | ((const QuotaRequest *)raw)->limit : 0;
                store_if_changed(&slot[6], parameters);
                mark_dirty(&slot[7], 0);
            }
            out->code = ALLOWED;
            out->remaining = (uint64_t)((ceiling - scaled) / request->window_us);
            /* The whole quota is back once this window's count has slid
             * out too, at the end of the next window. */
            out->wait_us = 2 * request->window_us - elapsed;
            return ALLOWED;
        }
    }
}

static int quota_reclaimable(uint64_t *slot, const void *raw, uint64_t *seen)
{
    const QuotaRequest *request = raw;
    *seen = nx_load(&slot[1]);
    uint64_t age = (window_of(request) - ((*seen >> 32) & WINDOW_MASK)) & WINDOW_MASK;
    /* Both counts have expired; an age in the upper half means the slot's
     * window is ahead of this request's clock, so it is in use. */
    return age >= 2 && age < HALF_WINDOWS;
}

static int quota_take(uint64_t *slot, uint64_t seen, uint64_t tag, const void *raw)
{
    const QuotaRequest *request = raw;
    if (!nx_cas(&slot[1], &seen, (tag << 52) | (window_of(request) << 32)))
        return 0;
    clear_sync_words(slot, 2);
    return 1;
}

static const Kind QUOTA = {12, 0xFFF, quota_decide, quota_reclaimable, quota_take};

/* ---- Python entry points -------------------------------------------- */

static int table_from(PyObject *const *args, unsigned slot_words, Table *table)
{
    Region *region = nx_as_region(args[0]);
    uint64_t slots;
    if (region == NULL || nx_as_u64(args[2], &slots) < 0)
        return -1;
    if (slots == 0 || (slots & (slots - 1)) != 0) {
        PyErr_Format(PyExc_ValueError, "slot count %llu is not a power of two", (unsigned long long)slots);
        return -1;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    if (offset == -1 && PyErr_Occurred())
        return -1;
    Py_ssize_t span = CONTROL_BYTES + (Py_ssize_t)(slots * slot_words * 8);
    uint64_t *control = nx_region_words_at(region, offset, span);
    if (control == NULL)
        return -1;
    table->control = control;
    table->slots = control + CONTROL_BYTES / 8;
    table->mask = slots - 1;
    table->slot_words = slot_words;
    return 0;
}

static PyObject *outcome_tuple(const Outcome *out)
{
    return Py_BuildValue("(iKK)", out->code, (unsigned long long)out->remaining, (unsigned long long)out->wait_us);
}

static int read_u64s(PyObject *const *args, Py_ssize_t count, uint64_t *values)
{
    for (Py_ssize_t i = 0; i < count; i++)
        if (nx_as_u64(args[i], &values[i]) < 0)
            return -1;
    return 0;
}

/* gcra_acquire(region, offset, slots, hash, interval_us, limit_us, cost, now_us)
 *   -> (code, remaining, wait_us); now_us = 0 reads CLOCK_MONOTONIC. */
static PyObject *gcra_acquire(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Table table;
    uint64_t values[5];
    if (nargs != 8) {
        PyErr_Format(PyExc_TypeError, "gcra_acquire() takes 8 arguments (%zd given)", nargs);
        return NULL;
    }
    if (table_from(args, SLOT_WORDS, &table) < 0 || read_u64s(args + 3, 5, values) < 0)
        return NULL;
    GcraRequest request = {values[4] ? values[4] : nx_monotonic_us(), values[1], values[2], values[3],
                           sync_view(table.control)};
    if (request.interval_us == 0 || request.limit_us < request.interval_us) {
        PyErr_Format(PyExc_ValueError, "GCRA needs interval_us >= 1 and limit_us >= interval_us (got %llu, %llu)",
                     (unsigned long long)request.interval_us, (unsigned long long)request.limit_us);
        return NULL;
    }
    Outcome out = {FAILED_OPEN, 0, 0};
    decide_key(&table, &GCRA, values[0], &request, &out);
    out.code = out.code == NOT_MINE ? FAILED_OPEN : out.code;
    return outcome_tuple(&out);
}

/* quota_acquire(region, offset, slots, hash, window_us, limit, cost, now_us)
 *   -> (code, remaining, wait_us); now_us = 0 reads CLOCK_REALTIME. */
static PyObject *quota_acquire(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Table table;
    uint64_t values[5];
    if (nargs != 8) {
        PyErr_Format(PyExc_TypeError, "quota_acquire() takes 8 arguments (%zd given)", nargs);
        return NULL;
    }
    if (table_from(args, SLOT_WORDS, &table) < 0 || read_u64s(args + 3, 5, values) < 0)
        return NULL;
    QuotaRequest request = {values[4] ? values[4] : nx_realtime_us(), values[1], values[2], values[3],
                            sync_view(table.control)};
    if (request.window_us == 0 || request.limit == 0 || request.limit > COUNT_MASK) {
        PyErr_Format(PyExc_ValueError, "a quota needs window_us >= 1 and 1 <= limit <= %llu (got %llu, %llu)",
                     (unsigned long long)COUNT_MASK, (unsigned long long)request.window_us,
                     (unsigned long long)request.limit);
        return NULL;
    }
    Outcome out = {FAILED_OPEN, 0, 0};
    decide_key(&table, &QUOTA, values[0], &request, &out);
    out.code = out.code == NOT_MINE ? FAILED_OPEN : out.code;
    return outcome_tuple(&out);
}

/* ---- release: undo an admission that a later limit made void ---------- */

/* A request must pass every limit that applies to it. When a later limit
 * rejects it, the earlier admissions are given back to the key's local
 * state, so the rejected request does not use up the others. The counts
 * already handed to the sync (the admitted counter, the allowance) stay as
 * they are: they only ever grow between two sync rounds, so the request
 * still counts across nodes, which errs on the strict side. */

typedef struct {
    uint64_t interval_us;
    uint64_t cost;
    SyncView sync;
} GcraRelease;

static int gcra_release_decide(uint64_t *slot, uint64_t tag, const void *raw, Outcome *out)
{
    const GcraRelease *release = raw;
    uint64_t interval = release->interval_us;
    if (release->sync.mode == SYNC_DISCONNECTED)
        interval *= release->sync.live;
    uint64_t back = release->cost * interval;
    uint64_t state = nx_load(&slot[1]);
    for (;;) {
        if ((state >> TAT_BITS) != tag)
            return NOT_MINE;
        uint64_t tat = state & TAT_MASK;
        uint64_t earlier = tat > back ? tat - back : 0;
        if (nx_cas(&slot[1], &state, (tag << TAT_BITS) | earlier)) {
            out->code = ALLOWED;
            return ALLOWED;
        }
    }
}

typedef struct {
    uint64_t now_us;
    uint64_t window_us;
    uint64_t cost;
} QuotaRelease;

static int quota_release_decide(uint64_t *slot, uint64_t tag, const void *raw, Outcome *out)
{
    const QuotaRelease *release = raw;
    uint64_t window = (release->now_us / release->window_us) & WINDOW_MASK;
    uint64_t state = nx_load(&slot[1]);
    for (;;) {
        if ((state >> 52) != tag)
            return NOT_MINE;
        /* Once the window has moved on, the count is history: leave it. */
        if (((state >> 32) & WINDOW_MASK) != window) {
            out->code = DENIED;
            return DENIED;
        }
        uint64_t count = state & COUNT_MASK;
        uint64_t lower = count > release->cost ? count - release->cost : 0;
        if (nx_cas(&slot[1], &state, (state & ~COUNT_MASK) | lower)) {
            out->code = ALLOWED;
            return ALLOWED;
        }
    }
}

static const Kind GCRA_RELEASE = {16, 0xFFFF, gcra_release_decide, NULL, NULL};
static const Kind QUOTA_RELEASE = {12, 0xFFF, quota_release_decide, NULL, NULL};

/* gcra_release(region, offset, slots, hash, interval_us, cost) -> bool (found and given back) */
static PyObject *gcra_release(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Table table;
    uint64_t values[3];
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "gcra_release() takes 6 arguments (%zd given)", nargs);
        return NULL;
    }
    if (table_from(args, SLOT_WORDS, &table) < 0 || read_u64s(args + 3, 3, values) < 0)
        return NULL;
    GcraRelease release = {values[1], values[2], sync_view(table.control)};
    Outcome out = {FAILED_OPEN, 0, 0};
    uint64_t hash = values[0];
    int code = find_and_decide(&table, &GCRA_RELEASE, key_word(hash), key_tag(hash, &GCRA_RELEASE), &release, &out);
    return PyBool_FromLong(code == ALLOWED);
}

/* quota_release(region, offset, slots, hash, window_us, cost, now_us) -> bool */
static PyObject *quota_release(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Table table;
    uint64_t values[4];
    if (nargs != 7) {
        PyErr_Format(PyExc_TypeError, "quota_release() takes 7 arguments (%zd given)", nargs);
        return NULL;
    }
    if (table_from(args, SLOT_WORDS, &table) < 0 || read_u64s(args + 3, 4, values) < 0)
        return NULL;
    if (values[1] == 0) {
        PyErr_SetString(PyExc_ValueError, "quota_release needs window_us >= 1");
        return NULL;
    }
    QuotaRelease release = {values[3] ? values[3] : nx_realtime_us(), values[1], values[2]};
    Outcome out = {FAILED_OPEN, 0, 0};
    uint64_t hash = values[0];
    int code = find_and_decide(&table, &QUOTA_RELEASE, key_word(hash), key_tag(hash, &QUOTA_RELEASE), &release, &out);
    return PyBool_FromLong(code == ALLOWED);
}

/* table_usage(region, offset, slots, slot_words) -> (occupied, failed_open, reclaimed, inserted) */
static PyObject *table_usage(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Table table;
    uint64_t slot_words;
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "table_usage() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    if (nx_as_u64(args[3], &slot_words) < 0)
        return NULL;
    if (slot_words != SLOT_WORDS) {
        PyErr_Format(PyExc_ValueError, "slot_words must be %d", SLOT_WORDS);
        return NULL;
    }
    if (table_from(args, (unsigned)slot_words, &table) < 0)
        return NULL;
    uint64_t occupied = 0;
    for (uint64_t index = 0; index <= table.mask; index++)
        occupied += nx_load_relaxed(slot_at(&table, index)) != 0;
    return Py_BuildValue("(KKKK)", (unsigned long long)occupied, (unsigned long long)nx_load(&table.control[1]),
                         (unsigned long long)nx_load(&table.control[2]), (unsigned long long)nx_load(&table.control[3]));
}

/* ---- master side: scan and lease ------------------------------------ */

static uint64_t *checked_slot(const Table *table, PyObject *index_arg, PyObject *hash_arg, int *found)
{
    uint64_t index, hash;
    *found = 0;
    if (nx_as_u64(index_arg, &index) < 0 || nx_as_u64(hash_arg, &hash) < 0)
        return NULL;
    if (index > table->mask) {
        PyErr_Format(PyExc_ValueError, "slot index %llu is outside the table of %llu slots",
                     (unsigned long long)index, (unsigned long long)(table->mask + 1));
        return NULL;
    }
    uint64_t *slot = slot_at(table, index);
    *found = nx_load(&slot[0]) == key_word(hash);
    return slot;
}

/* table_collect(region, offset, slots, dirty_word) -> [(index, word0, ..., word7)]
 * Return every slot whose dirty word is not 0, and reset that word to 0. */
static PyObject *table_collect(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Table table;
    uint64_t dirty_word;
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "table_collect() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    if (table_from(args, SLOT_WORDS, &table) < 0 || nx_as_u64(args[3], &dirty_word) < 0)
        return NULL;
    if (dirty_word < 2 || dirty_word >= SLOT_WORDS) {
        PyErr_Format(PyExc_ValueError, "dirty_word must be 2 to %d", SLOT_WORDS - 1);
        return NULL;
    }
    PyObject *found = PyList_New(0);
    if (found == NULL)
        return NULL;
    for (uint64_t index = 0; index <= table.mask; index++) {
        uint64_t *slot = slot_at(&table, index);
        if (nx_load_relaxed(&slot[dirty_word]) == 0 || nx_load_relaxed(&slot[0]) == 0)
            continue;
        uint64_t dirty = __atomic_exchange_n(&slot[dirty_word], 0, __ATOMIC_ACQ_REL);
        uint64_t words[SLOT_WORDS];
        for (unsigned word = 0; word < SLOT_WORDS; word++)
            words[word] = nx_load(&slot[word]);
        words[dirty_word] = dirty;
        PyObject *row = Py_BuildValue("(KKKKKKKKK)", (unsigned long long)index, (unsigned long long)words[0],
                                      (unsigned long long)words[1], (unsigned long long)words[2],
                                      (unsigned long long)words[3], (unsigned long long)words[4],
                                      (unsigned long long)words[5], (unsigned long long)words[6],
                                      (unsigned long long)words[7]);
        if (row == NULL || PyList_Append(found, row) < 0) {
            Py_XDECREF(row);
            Py_DECREF(found);
            return NULL;
        }
        Py_DECREF(row);
    }
    return found;
}

/* quota_grant(region, offset, slots, index, hash, window, remote_now, remote_before, grant) -> bool
 * Store the other nodes' counts for `window` and the one before it, and add
 * `grant` to the allowance for `window`. False if the slot holds another
 * key now, or its allowance already belongs to a later window. */
static PyObject *quota_grant(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Table table;
    uint64_t values[4];
    int found;
    if (nargs != 9) {
        PyErr_Format(PyExc_TypeError, "quota_grant() takes 9 arguments (%zd given)", nargs);
        return NULL;
    }
    if (table_from(args, SLOT_WORDS, &table) < 0)
        return NULL;
    uint64_t *slot = checked_slot(&table, args[3], args[4], &found);
    if (slot == NULL || read_u64s(args + 5, 4, values) < 0)
        return NULL;
    if (!found)
        Py_RETURN_FALSE;
    uint64_t window = values[0] & WINDOW_MASK;
    nx_store(&slot[3], (window << 44) | (values[1] & PREVIOUS_MASK));
    nx_store(&slot[4], (((window - 1) & WINDOW_MASK) << 44) | (values[2] & PREVIOUS_MASK));

    uint64_t grant = values[3] & ALLOWANCE_MASK;
    uint64_t seen = nx_load(&slot[5]);
    for (;;) {
        uint64_t seen_window = seen >> 44;
        uint64_t next;
        if ((seen & ALLOWANCE_SET) && seen_window == window) {
            uint64_t count = (seen & ALLOWANCE_MASK) + grant;
            next = (window << 44) | ALLOWANCE_SET | (count & ALLOWANCE_MASK);
        } else if ((seen & ALLOWANCE_SET) && ((window - seen_window) & WINDOW_MASK) >= HALF_WINDOWS) {
            Py_RETURN_FALSE;  /* the key already moved to a later window */
        } else {
            next = (window << 44) | ALLOWANCE_SET | grant;
        }
        if (nx_cas(&slot[5], &seen, next))
            Py_RETURN_TRUE;
    }
}

/* gcra_grant(region, offset, slots, index, hash, tokens) -> bool
 * Add leased tokens to the key's allowance; False if the slot holds another key now. */
static PyObject *gcra_grant(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Table table;
    uint64_t tokens;
    int found;
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "gcra_grant() takes 6 arguments (%zd given)", nargs);
        return NULL;
    }
    if (table_from(args, SLOT_WORDS, &table) < 0)
        return NULL;
    uint64_t *slot = checked_slot(&table, args[3], args[4], &found);
    if (slot == NULL || nx_as_u64(args[5], &tokens) < 0)
        return NULL;
    if (!found)
        Py_RETURN_FALSE;
    uint64_t seen = nx_load(&slot[2]);
    for (;;) {
        uint64_t held = (seen & LEASED_BIT) ? seen & ~LEASED_BIT : 0;
        if (nx_cas(&slot[2], &seen, LEASED_BIT | ((held + tokens) & ~LEASED_BIT)))
            Py_RETURN_TRUE;
    }
}

/* table_control(region, offset, slots, index[, value]) -> int
 * Read control word `index` (4 to 7), or store `value` in it and return the old value. */
static PyObject *table_control(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Table table;
    uint64_t index, value;
    if (nargs != 4 && nargs != 5) {
        PyErr_Format(PyExc_TypeError, "table_control() takes 4 or 5 arguments (%zd given)", nargs);
        return NULL;
    }
    if (table_from(args, SLOT_WORDS, &table) < 0 || nx_as_u64(args[3], &index) < 0)
        return NULL;
    if (index < CONTROL_SYNC || index >= CONTROL_BYTES / 8) {
        PyErr_Format(PyExc_ValueError, "control word %llu is not one of 4 to 7", (unsigned long long)index);
        return NULL;
    }
    if (nargs == 4)
        return PyLong_FromUnsignedLongLong(nx_load(&table.control[index]));
    if (nx_as_u64(args[4], &value) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(__atomic_exchange_n(&table.control[index], value, __ATOMIC_ACQ_REL));
}

PyMethodDef nx_ratelimit_methods[] = {
    {"gcra_release", (PyCFunction)(void (*)(void))gcra_release, METH_FASTCALL,
     "gcra_release(region, offset, slots, hash, interval_us, cost) -> bool: give back an admission"},
    {"quota_release", (PyCFunction)(void (*)(void))quota_release, METH_FASTCALL,
     "quota_release(region, offset, slots, hash, window_us, cost, now_us) -> bool: give back an admission"},
    {"gcra_acquire", (PyCFunction)(void (*)(void))gcra_acquire, METH_FASTCALL,
     "gcra_acquire(region, offset, slots, hash, interval_us, limit_us, cost, now_us) -> (code, remaining, wait_us)"},
    {"quota_acquire", (PyCFunction)(void (*)(void))quota_acquire, METH_FASTCALL,
     "quota_acquire(region, offset, slots, hash, window_us, limit, cost, now_us) -> (code, remaining, wait_us)"},
    {"table_usage", (PyCFunction)(void (*)(void))table_usage, METH_FASTCALL,
     "table_usage(region, offset, slots, slot_words) -> (occupied, failed_open, reclaimed, inserted)"},
    {"table_collect", (PyCFunction)(void (*)(void))table_collect, METH_FASTCALL,
     "table_collect(region, offset, slots, dirty_word) -> [(index, word0, ..., word7)]"},
    {"quota_grant", (PyCFunction)(void (*)(void))quota_grant, METH_FASTCALL,
     "quota_grant(region, offset, slots, index, hash, window, remote_now, remote_before, grant) -> bool"},
    {"gcra_grant", (PyCFunction)(void (*)(void))gcra_grant, METH_FASTCALL,
     "gcra_grant(region, offset, slots, index, hash, tokens) -> bool"},
    {"table_control", (PyCFunction)(void (*)(void))table_control, METH_FASTCALL,
     "table_control(region, offset, slots, index[, value]) -> int"},
    {NULL, NULL, 0, NULL},
};
