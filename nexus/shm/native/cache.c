/* Shared-memory response cache: a set-associative index over a circular
 * byte log, in one segment of kind "cache". nexus/shm/cache.py documents the
 * layout word by word; the W_*, E_* and R_* numbers below must match it.
 *
 * Readers take no lock. Each index entry has a sequence word (a seqlock): a
 * writer makes it odd before it changes the entry or reuses the log bytes the
 * entry points to, and even again afterwards. A reader copies the record out
 * between two reads of that word and discards the copy if the word was odd or
 * changed, so it returns a complete record or a miss, and never waits.
 *
 * Writers (put, delete, set_flags, clear, eviction) hold the robust lock in
 * the cache header. Their steps are ordered so that a writer killed at any
 * instruction leaves these invariants true, or true after repair_cache():
 *   - every byte of the log between tail and head belongs to a complete
 *     record or to padding before the end of the arena;
 *   - every entry with an even sequence word and the LIVE bit points to a
 *     complete record between tail and head whose header has the entry's hash;
 *   - head - tail <= capacity.
 * A record's bytes are written before head moves over them and before an
 * entry points to them, and an entry stops pointing to a record (sequence
 * word odd) before tail moves past that record's bytes.
 */
#include "region.h"
#include "atomics.h"
#include "lock.h"

#include <stdio.h>
#include <string.h>

#define CACHE_KIND 0x6568636163ull /* b"cache" read as a little-endian word */
#define CACHE_LAYOUT 1

/* Cache header words, counted from the start of the segment. Line 0 is
 * written once at creation, and line 1 only under the lock. Line 2 contains
 * counters that any process adds to with fetch-add. */
enum {
    W_KIND = 1,
    W_LAYOUT = 2,
    W_SETS = 8,
    W_WAYS = 9,
    W_CAPACITY = 10,
    W_MAX_OBJECT = 11,
    W_INDEX_OFFSET = 12,
    W_REFS_OFFSET = 13,
    W_ARENA_OFFSET = 14,
    W_HASH_SEED = 15,
    W_LOCK = 16,
    W_HEAD = 17,
    W_TAIL = 18,
    W_ENTRIES = 19,
    W_BYTES_USED = 20,
    W_MAX_ENTRIES = 21,
    W_EVICTIONS = 24,
    W_EXPIRED = 25,
    W_PUT_FAILURES = 26,
    W_RECOVERIES = 27,
    W_LOCK_TIMEOUTS = 28,
    W_TOO_BIG = 29,
    W_SECOND_CHANCES = 30,
};

#define INDEX_OFFSET 256
#define WAYS 8

/* Index entry words. */
enum { E_SEQ = 0, E_HASH = 1, E_POS = 2, E_FLAGS = 3, ENTRY_WORDS = 4 };

/* E_POS is the record's log position (a multiple of 8) with bit 0 set while
 * the entry is in use, so position 0 is a valid record. */
#define LIVE 1ull

/* Record header words in the arena. The key, meta and body bytes follow. */
enum {
    R_MAGIC = 0,
    R_BYTES = 1,      /* whole record, header included, a multiple of 8 */
    R_HASH = 2,
    R_LENGTHS = 3,    /* key length in bits 0-31, meta length in bits 32-63 */
    R_BODY_LENGTH = 4,
    R_STORED_AT = 5,  /* CLOCK_REALTIME microseconds */
    R_EXPIRES_AT = 6, /* CLOCK_REALTIME microseconds */
    RECORD_HEADER_WORDS = 7,
};
#define RECORD_HEADER_BYTES (RECORD_HEADER_WORDS * 8)
#define RECORD_MAGIC 0x44524f434552584eull /* b"NXRECORD" read as a little-endian word */
#define PAD_MAGIC 0x444e45444150584eull    /* b"NXPADEND": padding up to the end of the arena */

/* Writers wait at most this long for the lock. A put then gives up and
 * returns False, because a cache write is never worth stalling a request for.
 * The other writers raise TimeoutError. */
#define LOCK_TIMEOUT_US 2000

/* One put moves at most this many bytes, and at most capacity bytes, of
 * referenced records from the tail to the head (their second chance). This
 * bounds the time a put holds the lock even while readers keep setting
 * reference bytes: a 1 MiB memmove takes tens of microseconds (an estimate
 * for current x86-64 and aarch64 servers). A referenced record met after the
 * budget is spent is evicted. */
#define MAX_MOVE_BYTES_PER_PUT (1u << 20)

/* ---- geometry ---------------------------------------------------------- */

struct cache {
    uint64_t *words; /* the segment, from its first byte */
    uint64_t *index; /* sets * WAYS entries of ENTRY_WORDS words */
    uint8_t *refs;   /* one CLOCK reference byte per entry */
    char *arena;
    uint64_t sets;
    uint64_t capacity;
    uint64_t max_object;
    uint64_t seed;
};

static uint64_t round_up_64(uint64_t value)
{
    return (value + 63) & ~63ull;
}

/* Read and check the geometry in the cache header. Every call does this
 * (about ten loads and compares) so that no offset taken from shared memory
 * can send a pointer outside the mapping. */
static int open_cache(PyObject *arg, struct cache *c)
{
    Region *region = nx_as_region(arg);
    if (region == NULL)
        return -1;
    if (region->base == NULL) {
        PyErr_SetString(PyExc_ValueError, "the cache's Region was released (the store is closed)");
        return -1;
    }
    uint64_t *words = nx_region_words_at(region, 0, INDEX_OFFSET);
    if (words == NULL)
        return -1;
    if (words[W_KIND] != CACHE_KIND || words[W_LAYOUT] != CACHE_LAYOUT) {
        PyErr_Format(PyExc_ValueError,
                     "the Region is not a cache segment at layout version %d (kind word %#llx, layout %llu)",
                     CACHE_LAYOUT, (unsigned long long)words[W_KIND], (unsigned long long)words[W_LAYOUT]);
        return -1;
    }

    uint64_t sets = words[W_SETS];
    uint64_t capacity = words[W_CAPACITY];
    uint64_t max_object = words[W_MAX_OBJECT];
    uint64_t size = (uint64_t)region->size;
    int valid = sets != 0 && (sets & (sets - 1)) == 0 && sets <= (1ull << 40)
                && words[W_WAYS] == WAYS
                && capacity % 8 == 0 && capacity <= size
                && max_object < (1ull << 32)
                /* The largest record, rounded up to 8 bytes as record_bytes()
                 * rounds it, must fit. create() and attach() check the same bound. */
                && ((RECORD_HEADER_BYTES + max_object + 7) & ~7ull) <= capacity
                && words[W_INDEX_OFFSET] == INDEX_OFFSET
                && words[W_REFS_OFFSET] == INDEX_OFFSET + sets * WAYS * ENTRY_WORDS * 8
                && words[W_ARENA_OFFSET] == round_up_64(words[W_REFS_OFFSET] + sets * WAYS)
                && words[W_ARENA_OFFSET] <= size - capacity;
    if (!valid) {
        PyErr_SetString(PyExc_ValueError,
                        "the cache segment's geometry words are invalid or do not fit its size");
        return -1;
    }

    c->words = words;
    c->index = (uint64_t *)(region->base + INDEX_OFFSET);
    c->refs = (uint8_t *)(region->base + words[W_REFS_OFFSET]);
    c->arena = region->base + words[W_ARENA_OFFSET];
    c->sets = sets;
    c->capacity = capacity;
    c->max_object = max_object;
    c->seed = words[W_HASH_SEED];
    return 0;
}

static uint64_t *entry_at(const struct cache *c, uint64_t slot)
{
    return c->index + slot * ENTRY_WORDS;
}

static uint64_t *record_at(const struct cache *c, uint64_t position)
{
    return (uint64_t *)(c->arena + (position & ~LIVE) % c->capacity);
}

static uint64_t first_slot(const struct cache *c, uint64_t hash)
{
    return (hash & (c->sets - 1)) * WAYS;
}

/* CLOCK reference bytes are written by readers and writers at once, so every
 * access is a single-byte atomic (a plain MOV on x86-64 and aarch64). */
static int is_referenced(const struct cache *c, uint64_t slot)
{
    return __atomic_load_n(&c->refs[slot], __ATOMIC_RELAXED);
}

static void set_referenced(const struct cache *c, uint64_t slot, uint8_t value)
{
    __atomic_store_n(&c->refs[slot], value, __ATOMIC_RELAXED);
}

/* ---- hashing ----------------------------------------------------------- */

/* Multiply-xorshift hash, 8 bytes per step. The per-segment seed (random,
 * chosen at creation) makes it hard to aim many keys at one set from outside.
 * The multipliers are random odd 64-bit numbers with the top bit set. */
#define HASH_MULTIPLIER_A 0xe80311b7911c4795ull
#define HASH_MULTIPLIER_B 0xb7cac5c4ca1895d1ull

static uint64_t mix(uint64_t value)
{
    value ^= value >> 32;
    value *= HASH_MULTIPLIER_A;
    value ^= value >> 29;
    value *= HASH_MULTIPLIER_B;
    value ^= value >> 32;
    return value;
}

static uint64_t hash_key(const char *data, size_t length, uint64_t seed)
{
    uint64_t hash = seed ^ (length * HASH_MULTIPLIER_B);
    while (length >= 8) {
        uint64_t word;
        memcpy(&word, data, 8);
        hash = (hash ^ mix(word)) * HASH_MULTIPLIER_A;
        hash ^= hash >> 31;
        data += 8;
        length -= 8;
    }
    if (length > 0) {
        uint64_t word = 0;
        memcpy(&word, data, length);
        hash = (hash ^ mix(word ^ length)) * HASH_MULTIPLIER_A;
    }
    return mix(hash);
}

/* ---- arguments --------------------------------------------------------- */

/* A bytes-like argument: bytes is read in place, anything else through the
 * buffer protocol. */
struct bytes_arg {
    const char *data;
    uint64_t size;
    Py_buffer view;
    int has_view;
};

static int bytes_arg_get(PyObject *object, struct bytes_arg *out, const char *name)
{
    out->has_view = 0;
    if (PyBytes_Check(object)) {
        out->data = PyBytes_AS_STRING(object);
        out->size = (uint64_t)PyBytes_GET_SIZE(object);
        return 0;
    }
    if (PyObject_GetBuffer(object, &out->view, PyBUF_SIMPLE) < 0) {
        PyErr_Format(PyExc_TypeError, "%s must be bytes-like, got %.100s", name, Py_TYPE(object)->tp_name);
        return -1;
    }
    out->has_view = 1;
    out->data = out->view.buf;
    out->size = (uint64_t)out->view.len;
    return 0;
}

static void bytes_arg_release(struct bytes_arg *arg)
{
    if (arg->has_view)
        PyBuffer_Release(&arg->view);
    arg->has_view = 0;
}

static int check_arg_count(const char *name, Py_ssize_t nargs, Py_ssize_t least, Py_ssize_t most)
{
    if (nargs < least || nargs > most) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd to %zd arguments (%zd given)", name, least, most, nargs);
        return -1;
    }
    return 0;
}

/* The key's hash: the optional argument `args[at]` if given and not None
 * (tests use it to force collisions), otherwise hash_key(). */
static int key_hash(const struct cache *c, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t at,
                    const struct bytes_arg *key, uint64_t *out)
{
    if (nargs > at && args[at] != Py_None)
        return nx_as_u64(args[at], out);
    *out = hash_key(key->data, key->size, c->seed);
    return 0;
}

/* ---- Entry, the value get() returns ------------------------------------ */

static PyStructSequence_Field entry_fields[] = {
    {"meta", "bytes stored with the entry for the HTTP layer (status, headers, dates, tags)"},
    {"body", "response body bytes"},
    {"stored_at_us", "CLOCK_REALTIME microseconds when the entry was put"},
    {"expires_at_us", "CLOCK_REALTIME microseconds from which the entry reads as a miss"},
    {"flags", "flag bits given to put(), ORed with those from set_flags()"},
    {NULL, NULL},
};

static PyStructSequence_Desc entry_desc = {
    "nexus.shm.cache.Entry",
    "One cached response, copied out of shared memory.",
    entry_fields,
    5,
};

static PyTypeObject EntryType;
static int entry_type_ready = 0;

static int ensure_entry_type(void)
{
    if (entry_type_ready)
        return 0;
    if (PyStructSequence_InitType2(&EntryType, &entry_desc) < 0)
        return -1;
    entry_type_ready = 1;
    return 0;
}

/* ---- lock-free reads --------------------------------------------------- */

enum read_result { READ_MISS, READ_FOUND, READ_CHANGED, READ_ERROR };

/* True if the entry's sequence word is still `seq`, so everything read from
 * the entry and its record since `seq` was loaded is consistent. */
static int seq_unchanged(uint64_t *entry, uint64_t seq)
{
    nx_fence_acquire();
    return nx_load_relaxed(&entry[E_SEQ]) == seq;
}

/* Header fields of a record, read with single-word loads from bytes that a
 * writer may be overwriting: the caller validates them with seq_unchanged()
 * before trusting anything. */
struct record_view {
    const char *key;
    const char *meta;
    const char *body;
    uint64_t key_length;
    uint64_t meta_length;
    uint64_t body_length;
    uint64_t stored_at;
    uint64_t expires_at;
    uint64_t hash;
    uint64_t bytes;
};

/* Fill `view` from the record at `position` and return 1 if its header is
 * well formed and every length fits inside the record and the arena, else
 * return 0. Whatever the header contains, nothing outside the arena is read. */
static int view_record(const struct cache *c, uint64_t position, struct record_view *view)
{
    uint64_t offset = (position & ~LIVE) % c->capacity;
    uint64_t *record = (uint64_t *)(c->arena + offset);
    if (nx_load_relaxed(&record[R_MAGIC]) != RECORD_MAGIC)
        return 0;
    uint64_t bytes = nx_load_relaxed(&record[R_BYTES]);
    uint64_t lengths = nx_load_relaxed(&record[R_LENGTHS]);
    uint64_t key_length = lengths & 0xffffffffu;
    uint64_t meta_length = lengths >> 32;
    uint64_t body_length = nx_load_relaxed(&record[R_BODY_LENGTH]);
    if (bytes > c->capacity - offset || bytes < RECORD_HEADER_BYTES || body_length > bytes
        || RECORD_HEADER_BYTES + key_length + meta_length + body_length > bytes
        || key_length + meta_length + body_length > c->max_object)
        return 0;
    view->key = (const char *)record + RECORD_HEADER_BYTES;
    view->meta = view->key + key_length;
    view->body = view->meta + meta_length;
    view->key_length = key_length;
    view->meta_length = meta_length;
    view->body_length = body_length;
    view->stored_at = nx_load_relaxed(&record[R_STORED_AT]);
    view->expires_at = nx_load_relaxed(&record[R_EXPIRES_AT]);
    view->hash = nx_load_relaxed(&record[R_HASH]);
    view->bytes = bytes;
    return 1;
}

static PyObject *new_entry(PyObject *meta, PyObject *body, uint64_t stored_at, uint64_t expires_at, uint64_t flags)
{
    PyObject *entry = PyStructSequence_New(&EntryType);
    PyObject *stored = PyLong_FromUnsignedLongLong(stored_at);
    PyObject *expires = PyLong_FromUnsignedLongLong(expires_at);
    PyObject *flag_bits = PyLong_FromUnsignedLongLong(flags);
    if (entry == NULL || stored == NULL || expires == NULL || flag_bits == NULL) {
        Py_XDECREF(entry);
        Py_XDECREF(stored);
        Py_XDECREF(expires);
        Py_XDECREF(flag_bits);
        Py_DECREF(meta);
        Py_DECREF(body);
        return NULL;
    }
    PyStructSequence_SET_ITEM(entry, 0, meta);
    PyStructSequence_SET_ITEM(entry, 1, body);
    PyStructSequence_SET_ITEM(entry, 2, stored);
    PyStructSequence_SET_ITEM(entry, 3, expires);
    PyStructSequence_SET_ITEM(entry, 4, flag_bits);
    return entry;
}

/* One pass over the key's set. Returns READ_CHANGED if an entry with the
 * key's hash changed under the reader, so the caller may try once more. */
static enum read_result read_entry(const struct cache *c, uint64_t hash, const struct bytes_arg *key, uint64_t now,
                                   PyObject **out)
{
    uint64_t first = first_slot(c, hash);
    enum read_result result = READ_MISS;

    for (uint64_t slot = first; slot < first + WAYS; slot++) {
        uint64_t *entry = entry_at(c, slot);
        if (nx_load_relaxed(&entry[E_HASH]) != hash)
            continue;
        uint64_t seq = nx_load(&entry[E_SEQ]);
        if (seq & 1)
            continue; /* being written or left odd by a killed writer, so a miss */
        uint64_t position = nx_load_relaxed(&entry[E_POS]);
        uint64_t flags = nx_load_relaxed(&entry[E_FLAGS]);
        if (!(position & LIVE) || nx_load_relaxed(&entry[E_HASH]) != hash)
            continue;

        struct record_view view;
        if (!view_record(c, position, &view)
            || view.key_length != key->size || memcmp(view.key, key->data, key->size) != 0) {
            /* Either another key with the same hash, or bytes that changed
             * while they were read. */
            if (!seq_unchanged(entry, seq))
                result = READ_CHANGED;
            continue;
        }
        if (view.expires_at <= now) {
            if (!seq_unchanged(entry, seq)) {
                result = READ_CHANGED;
                continue;
            }
            return READ_MISS;
        }

        PyObject *meta = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)view.meta_length);
        PyObject *body = meta == NULL ? NULL : PyBytes_FromStringAndSize(NULL, (Py_ssize_t)view.body_length);
        if (body == NULL) {
            Py_XDECREF(meta);
            return READ_ERROR;
        }
        memcpy(PyBytes_AS_STRING(meta), view.meta, view.meta_length);
        memcpy(PyBytes_AS_STRING(body), view.body, view.body_length);
        if (!seq_unchanged(entry, seq)) {
            Py_DECREF(meta);
            Py_DECREF(body);
            result = READ_CHANGED;
            continue;
        }

        /* CLOCK reference bit: a plain byte store, skipped when already set
         * so a hot entry does not keep dirtying the cache line. A stale store
         * after the entry was reused only gives the new record one extra
         * second chance. */
        if (!is_referenced(c, slot))
            set_referenced(c, slot, 1);

        *out = new_entry(meta, body, view.stored_at, view.expires_at, flags);
        return *out == NULL ? READ_ERROR : READ_FOUND;
    }
    return result;
}

static PyObject *cache_get(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct cache c;
    struct bytes_arg key;
    uint64_t hash;
    if (check_arg_count("cache_get", nargs, 2, 3) < 0 || open_cache(args[0], &c) < 0 || ensure_entry_type() < 0)
        return NULL;
    if (bytes_arg_get(args[1], &key, "key") < 0)
        return NULL;
    if (key_hash(&c, args, nargs, 2, &key, &hash) < 0) {
        bytes_arg_release(&key);
        return NULL;
    }

    uint64_t now = nx_realtime_us();
    PyObject *found = NULL;
    enum read_result result = read_entry(&c, hash, &key, now, &found);
    if (result == READ_CHANGED)
        result = read_entry(&c, hash, &key, now, &found);
    bytes_arg_release(&key);

    if (result == READ_ERROR)
        return NULL;
    if (result == READ_FOUND)
        return found;
    Py_RETURN_NONE;
}

static PyObject *cache_keys(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct cache c;
    struct bytes_arg prefix = {"", 0};
    if (check_arg_count("cache_keys", nargs, 1, 2) < 0 || open_cache(args[0], &c) < 0)
        return NULL;
    if (nargs == 2 && bytes_arg_get(args[1], &prefix, "prefix") < 0)
        return NULL;

    PyObject *keys = PyList_New(0);
    if (keys == NULL) {
        bytes_arg_release(&prefix);
        return NULL;
    }
    uint64_t now = nx_realtime_us();
    uint64_t slots = c.sets * WAYS;
    for (uint64_t slot = 0; slot < slots; slot++) {
        uint64_t *entry = entry_at(&c, slot);
        uint64_t seq = nx_load(&entry[E_SEQ]);
        uint64_t position = nx_load_relaxed(&entry[E_POS]);
        struct record_view view;
        if ((seq & 1) || !(position & LIVE) || !view_record(&c, position, &view))
            continue;
        if (view.expires_at <= now || view.key_length < prefix.size
            || memcmp(view.key, prefix.data, prefix.size) != 0)
            continue;
        PyObject *key = PyBytes_FromStringAndSize(view.key, (Py_ssize_t)view.key_length);
        if (key == NULL)
            goto error;
        /* An entry that changed while it was read is left out: it is being
         * replaced or removed right now. */
        if (!seq_unchanged(entry, seq)) {
            Py_DECREF(key);
            continue;
        }
        int appended = PyList_Append(keys, key);
        Py_DECREF(key);
        if (appended < 0)
            goto error;
    }
    bytes_arg_release(&prefix);
    return keys;

error:
    bytes_arg_release(&prefix);
    Py_DECREF(keys);
    return NULL;
}

/* ---- writer steps (lock held) ------------------------------------------ */

/* Make the entry's sequence word odd and return that value for
 * close_entry(). A word left odd by a killed writer keeps its value. The
 * release fence orders that store before every later store (entry words and
 * the arena bytes that the entry pointed to), so a reader that observes any
 * of those later stores also observes the sequence word change. */
static uint64_t open_entry(uint64_t *entry)
{
    uint64_t odd = nx_load_relaxed(&entry[E_SEQ]) | 1;
    nx_store_relaxed(&entry[E_SEQ], odd);
    nx_fence_release();
    return odd;
}

static void close_entry(uint64_t *entry, uint64_t odd)
{
    nx_store(&entry[E_SEQ], odd + 1);
}

static void add_counter(const struct cache *c, int word, int64_t delta)
{
    nx_fetch_add(&c->words[word], (uint64_t)delta);
}

/* Empty the entry in `slot`. Readers miss it from the first store on. */
static void clear_entry(const struct cache *c, uint64_t slot)
{
    uint64_t *entry = entry_at(c, slot);
    uint64_t odd = open_entry(entry);
    nx_store_relaxed(&entry[E_HASH], 0);
    nx_store_relaxed(&entry[E_POS], 0);
    nx_store_relaxed(&entry[E_FLAGS], 0);
    close_entry(entry, odd);
    set_referenced(c, slot, 0);
}

/* Empty a live entry and take its record out of the entries and bytes_used
 * counters. */
static void drop_entry(const struct cache *c, uint64_t slot)
{
    uint64_t *record = record_at(c, entry_at(c, slot)[E_POS]);
    uint64_t bytes = record[R_BYTES];
    clear_entry(c, slot);
    add_counter(c, W_ENTRIES, -1);
    add_counter(c, W_BYTES_USED, -(int64_t)bytes);
}

/* Slot of the live entry for `key` in its set, or -1. Under the lock every
 * live entry's record is complete, so its key can be compared directly. */
static int64_t find_slot(const struct cache *c, uint64_t hash, const struct bytes_arg *key)
{
    uint64_t first = first_slot(c, hash);
    for (uint64_t slot = first; slot < first + WAYS; slot++) {
        uint64_t *entry = entry_at(c, slot);
        if (!(entry[E_POS] & LIVE) || entry[E_HASH] != hash)
            continue;
        uint64_t *record = record_at(c, entry[E_POS]);
        const char *stored_key = (const char *)record + RECORD_HEADER_BYTES;
        if ((record[R_LENGTHS] & 0xffffffffu) == key->size && memcmp(stored_key, key->data, key->size) == 0)
            return (int64_t)slot;
    }
    return -1;
}

/* Slot of the live entry that points to the record at log position
 * `position`, or -1 if the record is dead (deleted or replaced). */
static int64_t slot_of_record(const struct cache *c, uint64_t hash, uint64_t position)
{
    uint64_t first = first_slot(c, hash);
    for (uint64_t slot = first; slot < first + WAYS; slot++) {
        if (entry_at(c, slot)[E_POS] == (position | LIVE))
            return (int64_t)slot;
    }
    return -1;
}

/* Mark the arena from `head` to its end as padding, so that tail skips it.
 * A gap shorter than a record header needs no mark: tail skips any gap
 * that could not hold a record. */
static void write_padding(const struct cache *c, uint64_t head)
{
    uint64_t offset = head % c->capacity;
    if (c->capacity - offset >= RECORD_HEADER_BYTES) {
        uint64_t *pad = (uint64_t *)(c->arena + offset);
        nx_store_relaxed(&pad[R_MAGIC], PAD_MAGIC);
        nx_store_relaxed(&pad[R_BYTES], c->capacity - offset);
    }
}

/* Empty every entry and every byte of the log. Used by clear() and when
 * repair finds the log unreadable, since a cache may always drop entries. */
static void reset_cache(const struct cache *c)
{
    uint64_t slots = c->sets * WAYS;
    for (uint64_t slot = 0; slot < slots; slot++) {
        if (entry_at(c, slot)[E_POS] != 0 || (entry_at(c, slot)[E_SEQ] & 1))
            clear_entry(c, slot);
    }
    uint64_t head = nx_load_relaxed(&c->words[W_HEAD]);
    if (head % 8 != 0) {
        head = 0;
        nx_store(&c->words[W_HEAD], head);
    }
    nx_store(&c->words[W_TAIL], head);
    nx_store(&c->words[W_ENTRIES], 0);
    nx_store(&c->words[W_BYTES_USED], 0);
}

/* Move the referenced record at `tail` to the head of the log: its second
 * chance. The entry stays odd from before tail moves past the old bytes until
 * it points to the new ones, so a writer killed in between leaves an odd
 * entry, which repair clears, and bytes outside [tail, head).
 *
 * The caller guarantees head % capacity + bytes <= capacity. The new place
 * then overlaps no live record but this one: the bytes from head up to
 * tail + capacity are free, and with this record's own bytes they cover
 * [head, head + bytes). Old and new place can overlap, hence memmove. */
static void move_to_head(const struct cache *c, uint64_t slot, uint64_t tail, uint64_t bytes)
{
    uint64_t *entry = entry_at(c, slot);
    uint64_t odd = open_entry(entry);
    set_referenced(c, slot, 0);
    const char *old_place = c->arena + tail % c->capacity;
    nx_store(&c->words[W_TAIL], tail + bytes);

    uint64_t head = nx_load_relaxed(&c->words[W_HEAD]);
    memmove(c->arena + head % c->capacity, old_place, bytes);
    nx_store(&c->words[W_HEAD], head + bytes);
    nx_store_relaxed(&entry[E_POS], head | LIVE);
    close_entry(entry, odd);
    add_counter(c, W_SECOND_CHANCES, 1);
}

/* Whether the record header at `record` (log offset `offset`) can be
 * stepped over: a known magic and a size that stays inside the arena. */
static int record_header_valid(const struct cache *c, const uint64_t *record, uint64_t offset)
{
    uint64_t bytes = record[R_BYTES];
    return record[R_MAGIC] == RECORD_MAGIC && bytes >= RECORD_HEADER_BYTES && bytes % 8 == 0
           && bytes <= c->capacity - offset;
}

/* Free the oldest bytes of the log: skip padding, step over a dead record,
 * evict a live one, or give a referenced live one its second chance while
 * `*move_budget` (bytes) allows. The caller makes sure tail < head. */
static void advance_tail(const struct cache *c, uint64_t now, uint64_t *move_budget)
{
    uint64_t head = nx_load_relaxed(&c->words[W_HEAD]);
    uint64_t tail = nx_load_relaxed(&c->words[W_TAIL]);
    uint64_t offset = tail % c->capacity;
    uint64_t *record = (uint64_t *)(c->arena + offset);

    if (c->capacity - offset < RECORD_HEADER_BYTES || record[R_MAGIC] == PAD_MAGIC) {
        uint64_t next = tail - offset + c->capacity;
        if (next > head) {
            reset_cache(c);
            return;
        }
        nx_store(&c->words[W_TAIL], next);
        return;
    }
    if (!record_header_valid(c, record, offset) || tail + record[R_BYTES] > head) {
        reset_cache(c);
        return;
    }

    uint64_t bytes = record[R_BYTES];
    int64_t slot = slot_of_record(c, record[R_HASH], tail);
    /* make_room() calls this only while head - tail > head % capacity, that
     * is while the live log runs past the end of the arena, so the record at
     * tail lies after head in the arena and also fits at head. The check
     * keeps move_to_head() safe if that ever changes. */
    int fits_at_head = head % c->capacity + bytes <= c->capacity;
    if (slot >= 0) {
        if (record[R_EXPIRES_AT] <= now) {
            drop_entry(c, (uint64_t)slot);
            add_counter(c, W_EXPIRED, 1);
        } else if (is_referenced(c, (uint64_t)slot) && bytes <= *move_budget && fits_at_head) {
            *move_budget -= bytes;
            move_to_head(c, (uint64_t)slot, tail, bytes);
            return;
        } else {
            drop_entry(c, (uint64_t)slot);
            add_counter(c, W_EVICTIONS, 1);
        }
    }
    nx_store(&c->words[W_TAIL], tail + bytes);
}

/* Free space for a record of `bytes` bytes at head, padding to the arena
 * start first when the record would cross the end of the arena. Afterwards
 * head % capacity + bytes <= capacity and head + bytes - tail <= capacity.
 * It ends because every advance_tail() frees bytes, except for moves, which
 * the move budget bounds, and bytes <= capacity. */
static void make_room(const struct cache *c, uint64_t bytes, uint64_t now)
{
    uint64_t move_budget = c->capacity < MAX_MOVE_BYTES_PER_PUT ? c->capacity : MAX_MOVE_BYTES_PER_PUT;
    for (;;) {
        uint64_t head = nx_load_relaxed(&c->words[W_HEAD]);
        uint64_t tail = nx_load_relaxed(&c->words[W_TAIL]);
        uint64_t offset = head % c->capacity;
        if (offset + bytes > c->capacity) {
            uint64_t wrapped = head - offset + c->capacity;
            if (wrapped - tail <= c->capacity) {
                write_padding(c, head);
                nx_store(&c->words[W_HEAD], wrapped);
                continue;
            }
        } else if (head + bytes - tail <= c->capacity) {
            return;
        }
        advance_tail(c, now, &move_budget);
    }
}

struct put_request {
    struct bytes_arg key;
    struct bytes_arg meta;
    struct bytes_arg body;
    uint64_t hash;
    uint64_t ttl_us;
    uint64_t flags;
};

static uint64_t record_bytes(const struct put_request *request)
{
    return (RECORD_HEADER_BYTES + request->key.size + request->meta.size + request->body.size + 7) & ~7ull;
}

/* The slot for a new key in its set: a free way, else the way whose record
 * is expired, else the unreferenced way with the oldest record, else the
 * way with the oldest record. The chosen entry is dropped and counted. */
static uint64_t choose_slot(const struct cache *c, uint64_t hash, uint64_t now)
{
    uint64_t first = first_slot(c, hash);
    uint64_t victim = first;
    int victim_rank = 3; /* 0 expired, 1 unreferenced, 2 referenced */
    uint64_t victim_position = UINT64_MAX;

    for (uint64_t slot = first; slot < first + WAYS; slot++) {
        uint64_t position = entry_at(c, slot)[E_POS];
        if (!(position & LIVE))
            return slot;
        int rank = 1;
        if (record_at(c, position)[R_EXPIRES_AT] <= now)
            rank = 0;
        else if (is_referenced(c, slot))
            rank = 2;
        if (rank < victim_rank || (rank == victim_rank && position < victim_position)) {
            victim = slot;
            victim_rank = rank;
            victim_position = position;
        }
    }
    drop_entry(c, victim);
    add_counter(c, victim_rank == 0 ? W_EXPIRED : W_EVICTIONS, 1);
    return victim;
}

/* Store a record and point an entry to it, replacing the key's old entry. */
static void put_locked(const struct cache *c, const struct put_request *request)
{
    uint64_t now = nx_realtime_us();
    uint64_t bytes = record_bytes(request);

    /* An old record about to be replaced is not worth a second chance. */
    int64_t old_slot = find_slot(c, request->hash, &request->key);
    if (old_slot >= 0)
        set_referenced(c, (uint64_t)old_slot, 0);

    make_room(c, bytes, now);

    /* Write the record past head, where no entry points (a reader still
     * holding an older position there fails its sequence check), then move
     * head over it. Such a reader loads the header words with single atomic
     * loads, so they are stored the same way: a plain store is a data race
     * that the compiler may split. */
    uint64_t head = nx_load_relaxed(&c->words[W_HEAD]);
    uint64_t *record = record_at(c, head);
    char *data = (char *)record + RECORD_HEADER_BYTES;
    nx_store_relaxed(&record[R_MAGIC], RECORD_MAGIC);
    nx_store_relaxed(&record[R_BYTES], bytes);
    nx_store_relaxed(&record[R_HASH], request->hash);
    nx_store_relaxed(&record[R_LENGTHS], request->key.size | (request->meta.size << 32));
    nx_store_relaxed(&record[R_BODY_LENGTH], request->body.size);
    nx_store_relaxed(&record[R_STORED_AT], now);
    nx_store_relaxed(&record[R_EXPIRES_AT], now + request->ttl_us);
    memcpy(data, request->key.data, request->key.size);
    data += request->key.size;
    memcpy(data, request->meta.data, request->meta.size);
    data += request->meta.size;
    memcpy(data, request->body.data, request->body.size);
    data += request->body.size;
    memset(data, 0, (char *)record + bytes - data);
    nx_store(&c->words[W_HEAD], head + bytes);

    /* make_room() may have evicted the old entry, so look again. */
    int64_t slot = find_slot(c, request->hash, &request->key);
    if (slot >= 0) {
        uint64_t old_bytes = record_at(c, entry_at(c, slot)[E_POS])[R_BYTES];
        add_counter(c, W_BYTES_USED, (int64_t)bytes - (int64_t)old_bytes);
    } else {
        slot = (int64_t)choose_slot(c, request->hash, now);
        add_counter(c, W_ENTRIES, 1);
        add_counter(c, W_BYTES_USED, (int64_t)bytes);
    }

    uint64_t *entry = entry_at(c, (uint64_t)slot);
    uint64_t odd = open_entry(entry);
    nx_store_relaxed(&entry[E_HASH], request->hash);
    nx_store_relaxed(&entry[E_POS], head | LIVE);
    nx_store_relaxed(&entry[E_FLAGS], request->flags);
    close_entry(entry, odd);
    set_referenced(c, (uint64_t)slot, 0);
}

/* ---- repair and audit -------------------------------------------------- */

/* Problems found by audit_cache(). Only the first few are kept as text. */
#define MAX_PROBLEM_TEXTS 8
struct problems {
    int count;
    char text[MAX_PROBLEM_TEXTS][160];
};

static void add_problem(struct problems *problems, const char *format, unsigned long long a, unsigned long long b)
{
    if (problems == NULL)
        return;
    if (problems->count < MAX_PROBLEM_TEXTS)
        snprintf(problems->text[problems->count], sizeof problems->text[0], format, a, b);
    problems->count++;
}

/* True if a live entry earlier in the set of `slot` points to the same
 * record as `slot` or to a record with the same key as `view`. */
static int duplicate_in_set(const struct cache *c, uint64_t slot, const struct record_view *view)
{
    uint64_t position = entry_at(c, slot)[E_POS];
    for (uint64_t other = slot - slot % WAYS; other < slot; other++) {
        uint64_t other_position = entry_at(c, other)[E_POS];
        struct record_view other_view;
        if (!(other_position & LIVE) || !view_record(c, other_position, &other_view))
            continue;
        if (other_position == position)
            return 1;
        if (other_view.key_length == view->key_length
            && memcmp(other_view.key, view->key, view->key_length) == 0)
            return 1;
    }
    return 0;
}

/* Check every invariant listed at the top of this file, that no key has two
 * entries, and the entries and bytes_used counters. With `repair` set, fix
 * what is wrong: clear odd entries (a killed writer's), clear entries whose
 * record is not valid or repeated, empty the cache if the log cannot be
 * walked from tail to head, and recompute the counters. The lock must be
 * held. */
static void audit_cache(const struct cache *c, int repair, struct problems *problems)
{
    uint64_t slots = c->sets * WAYS;
    for (uint64_t slot = 0; slot < slots; slot++) {
        if (entry_at(c, slot)[E_SEQ] & 1) {
            add_problem(problems, "entry %llu has an odd sequence word %llu", slot, entry_at(c, slot)[E_SEQ]);
            if (repair)
                clear_entry(c, slot);
        }
    }

    uint64_t head = nx_load_relaxed(&c->words[W_HEAD]);
    uint64_t tail = nx_load_relaxed(&c->words[W_TAIL]);
    int log_valid = head % 8 == 0 && tail % 8 == 0 && tail <= head && head - tail <= c->capacity;
    if (!log_valid)
        add_problem(problems, "head %llu and tail %llu are not a valid log range", head, tail);

    /* Walk the log. Every step moves forward by at least 8 bytes. */
    for (uint64_t position = tail; log_valid && position < head;) {
        uint64_t offset = position % c->capacity;
        uint64_t *record = (uint64_t *)(c->arena + offset);
        if (c->capacity - offset < RECORD_HEADER_BYTES || record[R_MAGIC] == PAD_MAGIC) {
            position += c->capacity - offset;
        } else if (record_header_valid(c, record, offset)) {
            position += record[R_BYTES];
        } else {
            add_problem(problems, "no record or padding at log position %llu (head %llu)", position, head);
            log_valid = 0;
            break;
        }
        if (position > head) {
            add_problem(problems, "the record before head %llu ends at %llu", head, position);
            log_valid = 0;
        }
    }
    if (!log_valid) {
        if (repair)
            reset_cache(c);
        return;
    }

    uint64_t entries = 0, bytes_used = 0;
    for (uint64_t slot = 0; slot < slots; slot++) {
        uint64_t *entry = entry_at(c, slot);
        uint64_t position = entry[E_POS];
        if (!(position & LIVE))
            continue;
        uint64_t start = position & ~LIVE;
        struct record_view view;
        if (start < tail || start >= head || !view_record(c, position, &view) || view.hash != entry[E_HASH]
            || first_slot(c, view.hash) != slot - slot % WAYS) {
            add_problem(problems, "entry %llu points to no valid record (position %llu)", slot, start);
            if (repair)
                clear_entry(c, slot);
            continue;
        }
        if (duplicate_in_set(c, slot, &view)) {
            add_problem(problems, "entry %llu repeats the key or record of an earlier entry in its set", slot, 0);
            if (repair)
                clear_entry(c, slot);
            continue;
        }
        entries++;
        bytes_used += view.bytes;
    }
    if (entries != c->words[W_ENTRIES])
        add_problem(problems, "the entries counter is %llu but the index has %llu", c->words[W_ENTRIES], entries);
    if (bytes_used != c->words[W_BYTES_USED])
        add_problem(problems, "the bytes_used counter is %llu but the records add up to %llu",
                    c->words[W_BYTES_USED], bytes_used);
    if (entries != c->words[W_ENTRIES] || bytes_used != c->words[W_BYTES_USED]) {
        if (repair) {
            nx_store(&c->words[W_ENTRIES], entries);
            nx_store(&c->words[W_BYTES_USED], bytes_used);
        }
    }
}

static void repair_cache(const struct cache *c)
{
    add_counter(c, W_RECOVERIES, 1);
    audit_cache(c, 1, NULL);
}

/* ---- locked operations ------------------------------------------------- */

/* Take the cache lock, repairing first if its holder died. Runs without the
 * GIL, so it may not touch Python objects. */
static enum nx_lock_result lock_cache(const struct cache *c)
{
    enum nx_lock_result result = nx_lock_acquire(&c->words[W_LOCK], LOCK_TIMEOUT_US);
    if (result == NX_LOCK_RECOVERED)
        repair_cache(c);
    if (result == NX_LOCK_TIMEOUT)
        add_counter(c, W_LOCK_TIMEOUTS, 1);
    return result;
}

static void unlock_cache(const struct cache *c)
{
    nx_lock_release(&c->words[W_LOCK]);
}

/* Turn a failed lock_cache() into an exception for the operations that must
 * not fail silently (delete, set_flags, clear, verify). */
static PyObject *lock_failed(const char *name, enum nx_lock_result result)
{
    if (result == NX_LOCK_SELF)
        PyErr_Format(PyExc_RuntimeError, "%s(): this thread already holds the cache lock", name);
    else
        PyErr_Format(PyExc_TimeoutError, "%s(): the cache lock was held by another live process for more than %d us",
                     name, LOCK_TIMEOUT_US);
    return NULL;
}

/* The writers below release the GIL while they wait for and hold the cache
 * lock, so a slow holder stalls no other thread of this process. The Region
 * and the argument buffers stay referenced by the call's arguments.
 * NOTE: closing the store from another thread during a call is not
 * supported: it would unmap the memory the call is using. */

static PyObject *cache_put(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct cache c;
    struct put_request request;
    int64_t ttl_us;
    if (check_arg_count("cache_put", nargs, 6, 7) < 0 || open_cache(args[0], &c) < 0)
        return NULL;
    if (nx_as_i64(args[4], &ttl_us) < 0 || nx_as_u64(args[5], &request.flags) < 0)
        return NULL;
    if (ttl_us <= 0) {
        PyErr_Format(PyExc_ValueError, "ttl_us must be positive, got %lld", (long long)ttl_us);
        return NULL;
    }
    request.ttl_us = (uint64_t)ttl_us;
    if (bytes_arg_get(args[1], &request.key, "key") < 0)
        return NULL;
    if (bytes_arg_get(args[2], &request.meta, "meta") < 0) {
        bytes_arg_release(&request.key);
        return NULL;
    }
    if (bytes_arg_get(args[3], &request.body, "body") < 0
        || key_hash(&c, args, nargs, 6, &request.key, &request.hash) < 0) {
        bytes_arg_release(&request.key);
        bytes_arg_release(&request.meta);
        bytes_arg_release(&request.body);
        return NULL;
    }

    enum nx_lock_result locked = NX_LOCK_TIMEOUT;
    int too_big = request.key.size + request.meta.size + request.body.size > c.max_object;
    if (too_big) {
        add_counter(&c, W_TOO_BIG, 1);
        add_counter(&c, W_PUT_FAILURES, 1);
    } else {
        Py_BEGIN_ALLOW_THREADS
        locked = lock_cache(&c);
        if (locked == NX_LOCK_ACQUIRED || locked == NX_LOCK_RECOVERED) {
            put_locked(&c, &request);
            unlock_cache(&c);
        } else if (locked == NX_LOCK_TIMEOUT) {
            add_counter(&c, W_PUT_FAILURES, 1);
        }
        Py_END_ALLOW_THREADS
    }
    bytes_arg_release(&request.key);
    bytes_arg_release(&request.meta);
    bytes_arg_release(&request.body);

    if (locked == NX_LOCK_SELF)
        return lock_failed("cache_put", locked);
    return PyBool_FromLong(locked == NX_LOCK_ACQUIRED || locked == NX_LOCK_RECOVERED);
}

static PyObject *cache_delete(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct cache c;
    struct bytes_arg key;
    uint64_t hash;
    if (check_arg_count("cache_delete", nargs, 2, 3) < 0 || open_cache(args[0], &c) < 0)
        return NULL;
    if (bytes_arg_get(args[1], &key, "key") < 0)
        return NULL;
    if (key_hash(&c, args, nargs, 2, &key, &hash) < 0) {
        bytes_arg_release(&key);
        return NULL;
    }

    int removed = 0;
    enum nx_lock_result locked;
    Py_BEGIN_ALLOW_THREADS
    locked = lock_cache(&c);
    if (locked == NX_LOCK_ACQUIRED || locked == NX_LOCK_RECOVERED) {
        int64_t slot = find_slot(&c, hash, &key);
        if (slot >= 0) {
            drop_entry(&c, (uint64_t)slot);
            removed = 1;
        }
        unlock_cache(&c);
    }
    Py_END_ALLOW_THREADS
    bytes_arg_release(&key);

    if (locked != NX_LOCK_ACQUIRED && locked != NX_LOCK_RECOVERED)
        return lock_failed("cache_delete", locked);
    return PyBool_FromLong(removed);
}

static PyObject *cache_set_flags(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct cache c;
    struct bytes_arg key;
    uint64_t hash, bits;
    if (check_arg_count("cache_set_flags", nargs, 3, 4) < 0 || open_cache(args[0], &c) < 0)
        return NULL;
    if (nx_as_u64(args[2], &bits) < 0 || bytes_arg_get(args[1], &key, "key") < 0)
        return NULL;
    if (key_hash(&c, args, nargs, 3, &key, &hash) < 0) {
        bytes_arg_release(&key);
        return NULL;
    }

    int marked = 0;
    enum nx_lock_result locked;
    Py_BEGIN_ALLOW_THREADS
    locked = lock_cache(&c);
    if (locked == NX_LOCK_ACQUIRED || locked == NX_LOCK_RECOVERED) {
        int64_t slot = find_slot(&c, hash, &key);
        if (slot >= 0 && record_at(&c, entry_at(&c, (uint64_t)slot)[E_POS])[R_EXPIRES_AT] > nx_realtime_us()) {
            /* No sequence change: a reader gets the old or the new flags,
             * and both describe a whole entry. */
            __atomic_fetch_or(&entry_at(&c, (uint64_t)slot)[E_FLAGS], bits, __ATOMIC_RELEASE);
            marked = 1;
        }
        unlock_cache(&c);
    }
    Py_END_ALLOW_THREADS
    bytes_arg_release(&key);

    if (locked != NX_LOCK_ACQUIRED && locked != NX_LOCK_RECOVERED)
        return lock_failed("cache_set_flags", locked);
    return PyBool_FromLong(marked);
}

static PyObject *cache_clear(PyObject *module, PyObject *region)
{
    struct cache c;
    if (open_cache(region, &c) < 0)
        return NULL;
    enum nx_lock_result locked;
    Py_BEGIN_ALLOW_THREADS
    locked = lock_cache(&c);
    if (locked == NX_LOCK_ACQUIRED || locked == NX_LOCK_RECOVERED) {
        reset_cache(&c);
        unlock_cache(&c);
    }
    Py_END_ALLOW_THREADS
    if (locked != NX_LOCK_ACQUIRED && locked != NX_LOCK_RECOVERED)
        return lock_failed("cache_clear", locked);
    Py_RETURN_NONE;
}

static PyObject *cache_verify(PyObject *module, PyObject *region)
{
    struct cache c;
    struct problems problems = {0};
    if (open_cache(region, &c) < 0)
        return NULL;
    enum nx_lock_result locked;
    Py_BEGIN_ALLOW_THREADS
    locked = lock_cache(&c);
    if (locked == NX_LOCK_ACQUIRED || locked == NX_LOCK_RECOVERED) {
        audit_cache(&c, 0, &problems);
        unlock_cache(&c);
    }
    Py_END_ALLOW_THREADS
    if (locked != NX_LOCK_ACQUIRED && locked != NX_LOCK_RECOVERED)
        return lock_failed("cache_verify", locked);

    PyObject *list = PyList_New(0);
    for (int i = 0; list != NULL && i < problems.count && i < MAX_PROBLEM_TEXTS; i++) {
        PyObject *text = PyUnicode_FromString(problems.text[i]);
        if (text == NULL || PyList_Append(list, text) < 0)
            Py_CLEAR(list);
        Py_XDECREF(text);
    }
    if (list != NULL && problems.count > MAX_PROBLEM_TEXTS) {
        PyObject *text = PyUnicode_FromFormat("and %d more problems", problems.count - MAX_PROBLEM_TEXTS);
        if (text == NULL || PyList_Append(list, text) < 0)
            Py_CLEAR(list);
        Py_XDECREF(text);
    }
    return list;
}

static PyObject *cache_hash(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct cache c;
    struct bytes_arg key;
    if (check_arg_count("cache_hash", nargs, 2, 2) < 0 || open_cache(args[0], &c) < 0)
        return NULL;
    if (bytes_arg_get(args[1], &key, "key") < 0)
        return NULL;
    uint64_t hash = hash_key(key.data, key.size, c.seed);
    bytes_arg_release(&key);
    return PyLong_FromUnsignedLongLong(hash);
}

static PyObject *cache_entry_type(PyObject *module, PyObject *unused)
{
    if (ensure_entry_type() < 0)
        return NULL;
    Py_INCREF(&EntryType);
    return (PyObject *)&EntryType;
}

PyMethodDef nx_cache_methods[] = {
    {"cache_get", (PyCFunction)(void (*)(void))cache_get, METH_FASTCALL,
     "cache_get(region, key, hash=None) -> Entry | None: copy out the live entry for key, without locking."},
    {"cache_put", (PyCFunction)(void (*)(void))cache_put, METH_FASTCALL,
     "cache_put(region, key, meta, body, ttl_us, flags, hash=None) -> bool: store an entry; False if it is "
     "too big or the lock stayed busy for 2 ms."},
    {"cache_delete", (PyCFunction)(void (*)(void))cache_delete, METH_FASTCALL,
     "cache_delete(region, key, hash=None) -> bool: remove the entry for key; False if there was none."},
    {"cache_set_flags", (PyCFunction)(void (*)(void))cache_set_flags, METH_FASTCALL,
     "cache_set_flags(region, key, bits, hash=None) -> bool: OR bits into the flags of the live entry for key."},
    {"cache_keys", (PyCFunction)(void (*)(void))cache_keys, METH_FASTCALL,
     "cache_keys(region, prefix=b'') -> list[bytes]: keys of the live entries that start with prefix, "
     "without locking."},
    {"cache_clear", (PyCFunction)cache_clear, METH_O, "cache_clear(region): remove every entry."},
    {"cache_verify", (PyCFunction)cache_verify, METH_O,
     "cache_verify(region) -> list[str]: check the index and log under the lock; an empty list means consistent."},
    {"cache_hash", (PyCFunction)(void (*)(void))cache_hash, METH_FASTCALL,
     "cache_hash(region, key) -> int: the hash that the cache functions use for key in this segment."},
    {"cache_entry_type", (PyCFunction)cache_entry_type, METH_NOARGS,
     "cache_entry_type() -> type: the Entry struct sequence that cache_get returns."},
    {NULL, NULL, 0, NULL},
};
