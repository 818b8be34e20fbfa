/* Rate-limit tables: GCRA (rate with burst) and sliding-window quotas.
 *
 * A table is an array of slots addressed by open addressing with linear
 * probing on a 64-bit key hash. Layout, from the table's byte offset:
 *
 *   control line (64 bytes): [0] insert lock  [1] failed-open decisions
 *                            [2] reclaimed slots  [3] inserted keys
 *   slots: GCRA  = 2 words  [key hash, state]
 *          quota = 4 words  [key hash, current, previous, unused]
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
 */
#include "region.h"
#include "atomics.h"
#include "lock.h"

#define CONTROL_BYTES 64
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
} GcraRequest;

static int gcra_decide(uint64_t *slot, uint64_t tag, const void *raw, Outcome *out)
{
    const GcraRequest *request = raw;
    uint64_t now = request->now_us;
    uint64_t state = nx_load(&slot[1]);

    for (;;) {
        if ((state >> TAT_BITS) != tag)
            return NOT_MINE;
        uint64_t tat = state & TAT_MASK;
        if (tat < now)
            tat = now;
        uint64_t next = tat + request->cost * request->interval_us;
        uint64_t ahead = next - now;
        if (ahead > request->limit_us) {
            out->code = DENIED;
            out->remaining = 0;
            /* A cost above the burst never fits, however long one waits. */
            out->wait_us = request->cost * request->interval_us > request->limit_us ? UINT64_MAX
                                                                                      : ahead - request->limit_us;
            return DENIED;
        }
        if (nx_cas(&slot[1], &state, (tag << TAT_BITS) | (next & TAT_MASK))) {
            out->code = ALLOWED;
            out->remaining = (request->limit_us - ahead) / request->interval_us;
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

static int gcra_take(uint64_t *slot, uint64_t seen, uint64_t tag, const void *raw)
{
    return nx_cas(&slot[1], &seen, tag << TAT_BITS);
}

static const Kind GCRA = {16, 0xFFFF, gcra_decide, gcra_reclaimable, gcra_take};

/* ---- sliding-window quota ------------------------------------------- */

typedef struct {
    uint64_t now_us;
    uint64_t window_us;
    uint64_t limit;
    uint64_t cost;
} QuotaRequest;

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
    const QuotaRequest *request = raw;
    uint64_t state = nx_load(&slot[1]);

    for (;;) {
        if ((state >> 52) != tag)
            return NOT_MINE;
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

        /* estimate x window = previous x (window - elapsed) + current x window */
        unsigned __int128 scaled = (unsigned __int128)previous * (request->window_us - elapsed)
                                   + (unsigned __int128)(current + request->cost) * request->window_us;
        unsigned __int128 ceiling = (unsigned __int128)request->limit * request->window_us;
        if (scaled > ceiling) {
            out->code = DENIED;
            out->remaining = 0;
            out->wait_us = quota_wait(request, elapsed, previous, current);
            return DENIED;
        }
        if (age == 1)
            publish_previous(&slot[2], (window - 1) & WINDOW_MASK, previous);

        uint64_t next = (tag << 52) | (window << 32) | ((current + request->cost) & COUNT_MASK);
        if (nx_cas(&slot[1], &state, next)) {
            out->code = ALLOWED;
            out->remaining = (uint64_t)((ceiling - scaled) / request->window_us);
            out->wait_us = request->window_us - elapsed;
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
    nx_store(&slot[2], 0);
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
    if (table_from(args, 2, &table) < 0 || read_u64s(args + 3, 5, values) < 0)
        return NULL;
    GcraRequest request = {values[4] ? values[4] : nx_monotonic_us(), values[1], values[2], values[3]};
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
    if (table_from(args, 4, &table) < 0 || read_u64s(args + 3, 5, values) < 0)
        return NULL;
    QuotaRequest request = {values[4] ? values[4] : nx_realtime_us(), values[1], values[2], values[3]};
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
    if (slot_words != 2 && slot_words != 4) {
        PyErr_SetString(PyExc_ValueError, "slot_words must be 2 (GCRA) or 4 (quota)");
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

PyMethodDef nx_ratelimit_methods[] = {
    {"gcra_acquire", (PyCFunction)(void (*)(void))gcra_acquire, METH_FASTCALL,
     "gcra_acquire(region, offset, slots, hash, interval_us, limit_us, cost, now_us) -> (code, remaining, wait_us)"},
    {"quota_acquire", (PyCFunction)(void (*)(void))quota_acquire, METH_FASTCALL,
     "quota_acquire(region, offset, slots, hash, window_us, limit, cost, now_us) -> (code, remaining, wait_us)"},
    {"table_usage", (PyCFunction)(void (*)(void))table_usage, METH_FASTCALL,
     "table_usage(region, offset, slots, slot_words) -> (occupied, failed_open, reclaimed, inserted)"},
    {NULL, NULL, 0, NULL},
};
