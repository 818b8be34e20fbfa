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

    uint64_t head = nx_load_relaxed(ring.head);
    uint64_t tail = nx_load(ring.tail);
    if (head - tail >= ring.capacity) {
        nx_store(ring.dropped, nx_load_relaxed(ring.dropped) + 1);
        Py_RETURN_FALSE;
    }
    memcpy(ring.records + (head & (ring.capacity - 1)) * RECORD_WORDS, record, sizeof record);
    nx_store(ring.head, head + 1);
    Py_RETURN_TRUE;
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
    {"ring_drain", (PyCFunction)(void (*)(void))ring_drain, METH_FASTCALL,
     "ring_drain(region, offset, capacity, limit) -> bytes: consume up to limit records."},
    {"ring_counts", (PyCFunction)(void (*)(void))ring_counts, METH_FASTCALL,
     "ring_counts(region, offset, capacity) -> (head, tail, dropped)"},
    {NULL, NULL, 0, NULL},
};
