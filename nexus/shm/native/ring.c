/* Single-producer single-consumer rings of fixed-size records.
 *
 * Each worker owns one ring and is its only producer; the master is its
 * only consumer. Layout, from the ring's byte offset:
 *
 *   line 0: [0] head: records ever published (written by the producer)
 *           [1] dropped: records refused because the ring was full
 *   line 1: [8] tail: records ever consumed (written by the consumer)
 *   records: `capacity` (a power of two) records of RECORD_WORDS words
 *
 * Head and tail sit on separate cache lines so the two sides do not
 * bounce one line between CPUs. The producer writes a record, then
 * publishes it with one release store of head; a producer killed before
 * that store leaves nothing visible. A full ring drops the record and
 * counts it: a worker never waits for the master.
 */
#include "region.h"
#include "atomics.h"

#include <string.h>

#define RECORD_WORDS 8
#define RING_CONTROL_BYTES 128

typedef struct {
    uint64_t *head;
    uint64_t *dropped;
    uint64_t *tail;
    uint64_t *records;
    uint64_t capacity;
} Ring;

static int ring_from(PyObject *const *args, Ring *ring)
{
    Region *region = nx_as_region(args[0]);
    uint64_t capacity;
    if (region == NULL || nx_as_u64(args[2], &capacity) < 0)
        return -1;
    if (capacity == 0 || (capacity & (capacity - 1)) != 0) {
        PyErr_Format(PyExc_ValueError, "ring capacity %llu is not a power of two", (unsigned long long)capacity);
        return -1;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    if (offset == -1 && PyErr_Occurred())
        return -1;
    uint64_t *control = nx_region_words_at(region, offset, RING_CONTROL_BYTES + (Py_ssize_t)(capacity * RECORD_WORDS * 8));
    if (control == NULL)
        return -1;
    ring->head = &control[0];
    ring->dropped = &control[1];
    ring->tail = &control[8];
    ring->records = control + RING_CONTROL_BYTES / 8;
    ring->capacity = capacity;
    return 0;
}

/* Copy `record` into the ring and publish it; 0 if the ring was full (the drop is counted). */
static int publish(Ring *ring, const uint64_t record[RECORD_WORDS])
{
    uint64_t head = nx_load_relaxed(ring->head);
    uint64_t tail = nx_load(ring->tail);
    if (head - tail >= ring->capacity) {
        nx_store(ring->dropped, nx_load_relaxed(ring->dropped) + 1);
        return 0;
    }
    memcpy(ring->records + (head & (ring->capacity - 1)) * RECORD_WORDS, record, RECORD_WORDS * 8);
    nx_store(ring->head, head + 1);
    return 1;
}

/* ring_push(region, offset, capacity, word0, ..., word7) -> bool
 * Missing trailing words are stored as 0. */
static PyObject *ring_push(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Ring ring;
    uint64_t record[RECORD_WORDS] = {0};
    if (nargs < 4 || nargs > 3 + RECORD_WORDS) {
        PyErr_Format(PyExc_TypeError, "ring_push() takes 4 to %d arguments (%zd given)", 3 + RECORD_WORDS, nargs);
        return NULL;
    }
    if (ring_from(args, &ring) < 0)
        return NULL;
    for (Py_ssize_t i = 3; i < nargs; i++)
        if (nx_as_u64(args[i], &record[i - 3]) < 0)
            return NULL;

    return PyBool_FromLong(publish(&ring, record));
}

#define MASK32 0xFFFFFFFFull

/* ring_push_access(region, offset, capacity, head, started_ns, parties,
 *                  bytes_sent, duration_ns, upstream_ns, trace_id, flags) -> bool
 * Publish one access record (layout in nexus/observability/access_log.py):
 * the words Python cannot pack without big-integer arithmetic are packed
 * here. upstream_ns is an int or None; trace_id is the 128-bit trace id. */
static PyObject *ring_push_access(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Ring ring;
    uint64_t record[RECORD_WORDS] = {0};
    uint64_t duration_ns, upstream_ns = 0;
    if (nargs != 11) {
        PyErr_Format(PyExc_TypeError, "ring_push_access() takes 11 arguments (%zd given)", nargs);
        return NULL;
    }
    if (ring_from(args, &ring) < 0 || nx_as_u64(args[3], &record[0]) < 0 || nx_as_u64(args[4], &record[1]) < 0
        || nx_as_u64(args[5], &record[2]) < 0 || nx_as_u64(args[6], &record[3]) < 0 || nx_as_u64(args[7], &duration_ns) < 0
        || (args[8] != Py_None && nx_as_u64(args[8], &upstream_ns) < 0) || nx_as_u64(args[10], &record[7]) < 0)
        return NULL;
    if (!PyLong_Check(args[9])) {
        PyErr_Format(PyExc_TypeError, "trace_id must be an int, got %.100s", Py_TYPE(args[9])->tp_name);
        return NULL;
    }
    /* The trace id's two halves, through the public API only (the byte
     * conversion changed its signature in Python 3.13). */
    PyObject *sixty_four = PyLong_FromLong(64);
    PyObject *high = sixty_four ? PyNumber_Rshift(args[9], sixty_four) : NULL;
    Py_XDECREF(sixty_four);
    if (high == NULL)
        return NULL;
    /* Raises OverflowError for a negative id or one past 128 bits. */
    record[5] = PyLong_AsUnsignedLongLong(high);
    Py_DECREF(high);
    if (record[5] == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    record[6] = PyLong_AsUnsignedLongLongMask(args[9]);
    if (record[6] == (uint64_t)-1 && PyErr_Occurred())
        return NULL;

    /* Microseconds, capped to 32 bits; upstream + 1 so that 0 means none. */
    uint64_t total_us = duration_ns / 1000 < MASK32 ? duration_ns / 1000 : MASK32;
    uint64_t upstream_us = 0;
    if (args[8] != Py_None)
        upstream_us = upstream_ns / 1000 + 1 < MASK32 ? upstream_ns / 1000 + 1 : MASK32;
    record[4] = total_us | upstream_us << 32;
    return PyBool_FromLong(publish(&ring, record));
}

/* ring_drain(region, offset, capacity, limit) -> bytes
 * Consume up to `limit` records and return them back to back, each
 * RECORD_WORDS native-endian 64-bit words. */
static PyObject *ring_drain(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Ring ring;
    uint64_t limit;
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "ring_drain() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    if (ring_from(args, &ring) < 0 || nx_as_u64(args[3], &limit) < 0)
        return NULL;

    uint64_t tail = nx_load_relaxed(ring.tail);
    uint64_t head = nx_load(ring.head);
    uint64_t count = head - tail;
    if (count > ring.capacity)
        count = ring.capacity;  /* only after a corrupt head; never read past the ring */
    if (count > limit)
        count = limit;

    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(count * RECORD_WORDS * 8));
    if (out == NULL)
        return NULL;
    char *cursor = PyBytes_AS_STRING(out);
    for (uint64_t i = 0; i < count; i++) {
        const uint64_t *record = ring.records + ((tail + i) & (ring.capacity - 1)) * RECORD_WORDS;
        memcpy(cursor, record, RECORD_WORDS * 8);
        cursor += RECORD_WORDS * 8;
    }
    /* Release: the producer may reuse these records only after the copy. */
    nx_store(ring.tail, tail + count);
    return out;
}

/* ring_counts(region, offset, capacity) -> (head, tail, dropped) */
static PyObject *ring_counts(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Ring ring;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "ring_counts() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    if (ring_from(args, &ring) < 0)
        return NULL;
    return Py_BuildValue("(KKK)", (unsigned long long)nx_load(ring.head), (unsigned long long)nx_load(ring.tail),
                         (unsigned long long)nx_load(ring.dropped));
}

PyMethodDef nx_ring_methods[] = {
    {"ring_push", (PyCFunction)(void (*)(void))ring_push, METH_FASTCALL,
     "ring_push(region, offset, capacity, *words) -> bool: publish one record of up to 8 words, False if full."},
    {"ring_push_access", (PyCFunction)(void (*)(void))ring_push_access, METH_FASTCALL,
     "ring_push_access(region, offset, capacity, head, started_ns, parties, bytes_sent, duration_ns, upstream_ns, "
     "trace_id, flags) -> bool: publish one access record, False if full."},
    {"ring_drain", (PyCFunction)(void (*)(void))ring_drain, METH_FASTCALL,
     "ring_drain(region, offset, capacity, limit) -> bytes: consume up to limit records."},
    {"ring_counts", (PyCFunction)(void (*)(void))ring_counts, METH_FASTCALL,
     "ring_counts(region, offset, capacity) -> (head, tail, dropped)"},
    {NULL, NULL, 0, NULL},
};
