/* nexus.observability._lines: one pass over a drain of a worker's ring.
 *
 * The master reads every access record its workers push: it counts each
 * one for the usage table and writes the sampled ones as JSON lines. In
 * Python, splitting the records from their text, counting them and
 * formatting the lines cost about 3 us a record, which at 10,000 requests a
 * second is 3% of a CPU taken from the workers it shares the machine with.
 * This pass does it in about 0.25 us. The record layout and what a line
 * contains are described in nexus/observability/access_log.py, whose
 * `drain_batch` is the only caller.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define MASK32 0xFFFFFFFFull
#define ID_IS_TRACE 1ull

/* The name tables, in the order `drain_batch` passes them. */
enum { METHODS, CACHES, LIMITS, ROUTES, CONSUMERS, TARGETS, TABLES };

/* A growing output buffer. */
typedef struct {
    char *data;
    size_t size;
    size_t capacity;
} Buffer;

static int reserve(Buffer *buffer, size_t more)
{
    if (buffer->size + more <= buffer->capacity)
        return 0;
    size_t capacity = buffer->capacity ? buffer->capacity : 4096;
    while (capacity < buffer->size + more)
        capacity *= 2;
    char *data = PyMem_Realloc(buffer->data, capacity);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    buffer->data = data;
    buffer->capacity = capacity;
    return 0;
}

static int put(Buffer *buffer, const char *text, size_t length)
{
    if (reserve(buffer, length) < 0)
        return -1;
    memcpy(buffer->data + buffer->size, text, length);
    buffer->size += length;
    return 0;
}

static int put_text(Buffer *buffer, const char *text)
{
    return put(buffer, text, strlen(text));
}

/* `value` in decimal, at least `width` digits (zero-padded). snprintf took
 * most of the time of a line, so numbers are written by hand. */
static int put_decimal(Buffer *buffer, uint64_t value, int width)
{
    char digits[24];
    int length = 0;
    do {
        digits[sizeof digits - 1 - length++] = (char)('0' + value % 10);
        value /= 10;
    } while (value != 0);
    while (length < width)
        digits[sizeof digits - 1 - length++] = '0';
    return put(buffer, digits + sizeof digits - length, (size_t)length);
}

/* `value` as 16 lower-case hex digits. */
static void write_hex16(char *out, uint64_t value)
{
    static const char hex[] = "0123456789abcdef";
    for (int i = 15; i >= 0; i--) {
        out[i] = hex[value & 0xF];
        value >>= 4;
    }
}

/* The JSON of id `index` in `table` (a tuple of bytes, each a JSON value),
 * or "#index" as a string for an id the table does not reach. */
static int put_name(Buffer *buffer, PyObject *table, uint64_t index)
{
    if (index < (uint64_t)PyTuple_GET_SIZE(table)) {
        PyObject *name = PyTuple_GET_ITEM(table, (Py_ssize_t)index);
        return put(buffer, PyBytes_AS_STRING(name), (size_t)PyBytes_GET_SIZE(name));
    }
    return put_text(buffer, "\"#") < 0 || put_decimal(buffer, index, 1) < 0 ? -1 : put_text(buffer, "\"");
}

/* Microseconds as a JSON number of seconds: 4211 is 0.004211, 1500000 is 1.5. */
static int put_seconds(Buffer *buffer, uint64_t microseconds)
{
    uint64_t fraction = microseconds % 1000000;
    int width = 6;
    /* Trailing zeros are dropped, but one digit stays after the point. */
    while (width > 1 && fraction % 10 == 0) {
        fraction /= 10;
        width--;
    }
    if (put_decimal(buffer, microseconds / 1000000, 1) < 0 || put(buffer, ".", 1) < 0)
        return -1;
    return put_decimal(buffer, fraction, width);
}

/* `text` as a JSON string. Like Python's bytes.decode("ascii", "replace"),
 * a byte above 127 becomes U+FFFD; an empty text is null. */
static int put_text_json(Buffer *buffer, const unsigned char *text, Py_ssize_t length)
{
    if (length == 0)
        return put_text(buffer, "null");
    /* Six bytes at most per input byte, the quotes, and sprintf's NUL. */
    if (reserve(buffer, (size_t)length * 6 + 3) < 0)
        return -1;
    char *out = buffer->data + buffer->size;
    *out++ = '"';
    for (Py_ssize_t i = 0; i < length; i++) {
        unsigned char byte = text[i];
        if (byte == '"' || byte == '\\') {
            *out++ = '\\';
            *out++ = (char)byte;
        } else if (byte < 0x20) {
            out += sprintf(out, "\\u%04x", byte);
        } else if (byte > 0x7F) {
            memcpy(out, "\\ufffd", 6);
            out += 6;
        } else {
            *out++ = (char)byte;
        }
    }
    *out++ = '"';
    buffer->size = (size_t)(out - buffer->data);
    return 0;
}

/* RFC 3339 UTC with microseconds. The date and time of the last second are
 * kept: a drain formats thousands of records, most in the same second. */
static int put_time(Buffer *buffer, uint64_t time_ns)
{
    static uint64_t cached_second = UINT64_MAX;
    static char cached[32];
    uint64_t second = time_ns / 1000000000u;
    if (second != cached_second) {
        time_t seconds = (time_t)second;
        struct tm utc;
        if (gmtime_r(&seconds, &utc) == NULL || strftime(cached, sizeof cached, "%Y-%m-%dT%H:%M:%S", &utc) == 0) {
            PyErr_Format(PyExc_ValueError, "access record time %llu ns is out of range", (unsigned long long)time_ns);
            return -1;
        }
        cached_second = second;
    }
    if (put(buffer, "\"", 1) < 0 || put_text(buffer, cached) < 0 || put(buffer, ".", 1) < 0
        || put_decimal(buffer, time_ns % 1000000000u / 1000u, 6) < 0)
        return -1;
    return put(buffer, "Z\"", 2);
}

static int put_line(Buffer *buffer, const uint64_t w[8], const unsigned char *text, Py_ssize_t text_length, long worker,
                    PyObject **tables)
{
    uint64_t head = w[0], parties = w[2], durations = w[4];
    char trace[35] = "null";
    if (w[5] || w[6]) {
        trace[0] = '"';
        write_hex16(trace + 1, w[5]);
        write_hex16(trace + 17, w[6]);
        trace[33] = '"';
        trace[34] = '\0';
    }
    uint64_t upstream_us = durations >> 32;

    if (put_text(buffer, "{\"time\":") < 0 || put_time(buffer, w[1]) < 0 || put_text(buffer, ",\"request_id\":") < 0)
        return -1;
    if (w[7] & ID_IS_TRACE) {
        if (put_text(buffer, trace) < 0)
            return -1;
    } else if (put_text_json(buffer, text, text_length) < 0) {
        return -1;
    }
    if (put_text(buffer, ",\"trace_id\":") < 0 || put_text(buffer, trace) < 0
        || put_text(buffer, ",\"worker\":") < 0 || put_decimal(buffer, (uint64_t)worker, 1) < 0
        || put_text(buffer, ",\"method\":") < 0
        || put_name(buffer, tables[METHODS], head >> 56) < 0
        || put_text(buffer, ",\"route\":") < 0
        || put_name(buffer, tables[ROUTES], (head >> 32) & 0xFFFF) < 0
        || put_text(buffer, ",\"consumer\":") < 0
        || put_name(buffer, tables[CONSUMERS], parties & MASK32) < 0
        || put_text(buffer, ",\"target\":") < 0
        || put_name(buffer, tables[TARGETS], parties >> 32) < 0
        || put_text(buffer, ",\"status\":") < 0 || put_decimal(buffer, (head >> 16) & 0xFFFF, 1) < 0
        || put_text(buffer, ",\"bytes\":") < 0 || put_decimal(buffer, w[3], 1) < 0
        || put_text(buffer, ",\"duration_s\":") < 0
        || put_seconds(buffer, durations & MASK32) < 0
        || put_text(buffer, ",\"upstream_s\":") < 0
        || (upstream_us ? put_seconds(buffer, upstream_us - 1) : put_text(buffer, "null")) < 0
        || put_text(buffer, ",\"cache\":") < 0
        || put_name(buffer, tables[CACHES], (head >> 48) & 0xF) < 0
        || put_text(buffer, ",\"rate_limit\":") < 0
        || put_name(buffer, tables[LIMITS], (head >> 52) & 0xF) < 0
        || put_text(buffer, "}\n") < 0)
        return -1;
    return 0;
}

/* ---- usage counts -------------------------------------------------- */

/* Counts of one (consumer, route, status, latency bucket), and the bytes
 * of one (consumer, route): a drain has few distinct keys, kept in small
 * open-addressing tables that double when half full. Values are 64-bit: a
 * drain reads at most a ring's records (2^22), so bytes sum safely for
 * responses below 2^41 bytes each, far above what one response sends. */
typedef struct {
    uint64_t key;  /* 0 is an empty slot; keys are stored + 1 */
    uint64_t value;
} Slot;

typedef struct {
    Slot *slots;
    size_t capacity;  /* a power of two */
    size_t used;
} Counts;

static int counts_add(Counts *counts, uint64_t key, uint64_t amount);

static int counts_grow(Counts *counts)
{
    Counts grown = {PyMem_Calloc(counts->capacity ? counts->capacity * 2 : 64, sizeof(Slot)),
                    counts->capacity ? counts->capacity * 2 : 64, 0};
    if (grown.slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < counts->capacity; i++)
        if (counts->slots[i].key)
            counts_add(&grown, counts->slots[i].key - 1, counts->slots[i].value);
    PyMem_Free(counts->slots);
    *counts = grown;
    return 0;
}

static int counts_add(Counts *counts, uint64_t key, uint64_t amount)
{
    if ((counts->used + 1) * 2 > counts->capacity && counts_grow(counts) < 0)
        return -1;
    uint64_t stored = key + 1;
    size_t mask = counts->capacity - 1;
    size_t i = (size_t)((stored * 0x9E3779B97F4A7C15ull) >> 20) & mask;
    while (counts->slots[i].key && counts->slots[i].key != stored)
        i = (i + 1) & mask;
    if (!counts->slots[i].key) {
        counts->slots[i].key = stored;
        counts->used++;
    }
    counts->slots[i].value += amount;
    return 0;
}

/* The counts as a dict from a tuple of `fields` ints (taken from the key's
 * bit fields, `widths` bits each, lowest first) to the value. */
static PyObject *counts_dict(const Counts *counts, int fields, const int *widths)
{
    PyObject *dict = PyDict_New();
    if (dict == NULL)
        return NULL;
    for (size_t i = 0; i < counts->capacity; i++) {
        if (!counts->slots[i].key)
            continue;
        uint64_t key = counts->slots[i].key - 1;
        PyObject *tuple = PyTuple_New(fields);
        PyObject *value = PyLong_FromUnsignedLongLong(counts->slots[i].value);
        if (tuple == NULL || value == NULL) {
            Py_XDECREF(tuple);
            Py_XDECREF(value);
            Py_DECREF(dict);
            return NULL;
        }
        for (int field = 0; field < fields; field++) {
            PyTuple_SET_ITEM(tuple, field, PyLong_FromUnsignedLongLong(key & ((1ull << widths[field]) - 1)));
            key >>= widths[field];
        }
        int failed = PyErr_Occurred() != NULL || PyDict_SetItem(dict, tuple, value) < 0;
        Py_DECREF(tuple);
        Py_DECREF(value);
        if (failed) {
            Py_DECREF(dict);
            return NULL;
        }
    }
    return dict;
}

/* ---- one drain ------------------------------------------------------ */

#define RECORD_WORDS 8
#define ACCESS_KIND 1
#define TEXT_KIND 2
#define TEXT_BYTES 56
#define MAX_TEXT (255 * TEXT_BYTES)

typedef struct {
    long worker;
    PyObject **tables;
    const uint64_t *bounds;  /* latency bucket upper bounds, microseconds */
    Py_ssize_t bound_count;
    double sample;
    int always_errors;
    uint64_t random;  /* xorshift64 state */
    Buffer lines;
    uint64_t records;
    uint64_t written;
    Counts requests;  /* keyed as access_entry packs them */
    Counts sent;
    PyObject *others;
} Drain;

static double next_random(Drain *drain)
{
    uint64_t x = drain->random;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    drain->random = x;
    return (double)(x >> 11) / 9007199254740992.0;
}

static Py_ssize_t latency_bucket(const Drain *drain, uint64_t microseconds)
{
    /* The first bound >= the value, as Python's bisect_left. */
    Py_ssize_t low = 0, high = drain->bound_count;
    while (low < high) {
        Py_ssize_t middle = (low + high) / 2;
        if (drain->bounds[middle] < microseconds)
            low = middle + 1;
        else
            high = middle;
    }
    return low;
}

static int access_entry(Drain *drain, const uint64_t w[8], const unsigned char *text, Py_ssize_t text_length)
{
    uint64_t consumer = w[2] & MASK32, route = (w[0] >> 32) & 0xFFFF, status = (w[0] >> 16) & 0xFFFF;
    uint64_t bucket = (uint64_t)latency_bucket(drain, w[4] & MASK32);
    drain->records++;
    /* One word packs 24 bits of consumer id, 16 of route, 16 of status and
     * 8 of bucket. Consumer ids are positions in the config, far below 2^24;
     * a larger one (only a corrupt record) is counted as the last id. */
    if (consumer >= (1u << 24))
        consumer = (1u << 24) - 1;
    uint64_t key = consumer | route << 24 | status << 40 | bucket << 56;
    if (counts_add(&drain->requests, key, 1) < 0 || counts_add(&drain->sent, consumer | route << 24, w[3]) < 0)
        return -1;
    int keep = drain->sample >= 1.0 || (drain->always_errors && status >= 500) || next_random(drain) < drain->sample;
    if (!keep)
        return 0;
    drain->written++;
    return put_line(&drain->lines, w, text, text_length, drain->worker, drain->tables);
}

static int other_entry(Drain *drain, const uint64_t w[8], const unsigned char *text, Py_ssize_t text_length)
{
    PyObject *row = PyTuple_New(RECORD_WORDS);
    if (row == NULL)
        return -1;
    for (int i = 0; i < RECORD_WORDS; i++) {
        PyObject *word = PyLong_FromUnsignedLongLong(w[i]);
        if (word == NULL) {
            Py_DECREF(row);
            return -1;
        }
        PyTuple_SET_ITEM(row, i, word);
    }
    PyObject *entry = Py_BuildValue("(Ny#)", row, (const char *)text, text_length);
    if (entry == NULL)
        return -1;
    int failed = PyList_Append(drain->others, entry) < 0;
    Py_DECREF(entry);
    return failed ? -1 : 0;
}

static int finish_entry(Drain *drain, const uint64_t w[8], const unsigned char *text, Py_ssize_t text_length)
{
    if ((w[0] & 0xFF) == ACCESS_KIND)
        return access_entry(drain, w, text, text_length);
    return other_entry(drain, w, text, text_length);
}

/* Walk the drained records: a head record, then the text records it
 * counts in bits 8-15. Text whose head was dropped is skipped; a head whose
 * text was cut short keeps what arrived. */
static int walk(Drain *drain, const uint64_t *words, Py_ssize_t count)
{
    static unsigned char text[MAX_TEXT];
    uint64_t head[RECORD_WORDS];
    int pending = 0;
    uint64_t expected = 0;
    Py_ssize_t text_length = 0;
    for (Py_ssize_t r = 0; r < count; r++) {
        const uint64_t *w = words + r * RECORD_WORDS;
        if ((w[0] & 0xFF) == TEXT_KIND) {
            if (pending && expected > 0) {
                uint64_t length = (w[0] >> 8) & 0xFFFF;
                if (length > TEXT_BYTES)
                    length = TEXT_BYTES;
                for (uint64_t i = 0; i < length; i++)
                    text[text_length + i] = (unsigned char)(w[1 + i / 8] >> (8 * (i % 8)));
                text_length += (Py_ssize_t)length;
                if (--expected == 0) {
                    pending = 0;
                    if (finish_entry(drain, head, text, text_length) < 0)
                        return -1;
                }
            }
            continue;
        }
        if (pending) {
            pending = 0;
            if (finish_entry(drain, head, text, text_length) < 0)
                return -1;
        }
        memcpy(head, w, sizeof head);
        expected = (w[0] >> 8) & 0xFF;
        text_length = 0;
        if (expected) {
            pending = 1;
        } else if (finish_entry(drain, head, text, 0) < 0) {
            return -1;
        }
    }
    if (pending)
        return finish_entry(drain, head, text, text_length);
    return 0;
}

/* drain_records(raw, worker, tables, bounds, sample, always_errors, seed)
 *   -> (records, lines, written, counts, sent, others)
 * raw: drained ring records back to back (8 native 64-bit words each).
 * tables: 6 tuples of bytes, each entry the JSON of a name (b"null" for
 * none): methods, cache results, rate-limit results, routes, consumers,
 * targets, indexed by the ids in the record. bounds: the usage table's
 * latency bucket bounds in microseconds. A line is written for every
 * access record when sample >= 1, else for errors (with always_errors) and
 * a random share `sample` drawn from `seed`.
 * Returns the access records read, their lines, how many lines, the
 * counts {(consumer, route, status, bucket): n}, the bytes
 * {(consumer, route): n}, and the records of other kinds as
 * [(row, text)]. */
static PyObject *drain_records(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_Format(PyExc_TypeError, "drain_records() takes 7 arguments (%zd given)", nargs);
        return NULL;
    }
    Py_buffer raw;
    if (PyObject_GetBuffer(args[0], &raw, PyBUF_SIMPLE) < 0)
        return NULL;
    Drain drain = {0};
    PyObject *tables[TABLES];
    uint64_t bounds[128];
    PyObject *result = NULL, *lines = NULL, *counts = NULL, *sent = NULL;

    drain.worker = PyLong_AsLong(args[1]);
    drain.sample = PyFloat_AsDouble(args[4]);
    drain.always_errors = PyObject_IsTrue(args[5]);
    drain.random = PyLong_AsUnsignedLongLongMask(args[6]) | 1;
    if (PyErr_Occurred() || drain.always_errors < 0)
        goto done;
    if (raw.len % (RECORD_WORDS * 8) != 0) {
        PyErr_Format(PyExc_ValueError, "drained records of %zd bytes are not whole 64-byte records", raw.len);
        goto done;
    }
    if (!PyTuple_Check(args[2]) || PyTuple_GET_SIZE(args[2]) != TABLES) {
        PyErr_SetString(PyExc_TypeError, "drain_records() takes a tuple of 6 name tables");
        goto done;
    }
    for (Py_ssize_t i = 0; i < TABLES; i++) {
        tables[i] = PyTuple_GET_ITEM(args[2], i);
        if (!PyTuple_Check(tables[i]))
            goto bad_table;
        for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(tables[i]); j++)
            if (!PyBytes_Check(PyTuple_GET_ITEM(tables[i], j)))
                goto bad_table;
    }
    if (!PyTuple_Check(args[3]) || PyTuple_GET_SIZE(args[3]) > 128) {
        PyErr_SetString(PyExc_TypeError, "drain_records() takes at most 128 latency bounds as a tuple of ints");
        goto done;
    }
    drain.bound_count = PyTuple_GET_SIZE(args[3]);
    for (Py_ssize_t i = 0; i < drain.bound_count; i++) {
        bounds[i] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(args[3], i));
        if (PyErr_Occurred())
            goto done;
    }
    drain.tables = tables;
    drain.bounds = bounds;
    drain.others = PyList_New(0);
    if (drain.others == NULL || walk(&drain, (const uint64_t *)raw.buf, raw.len / (RECORD_WORDS * 8)) < 0)
        goto done;

    lines = PyBytes_FromStringAndSize(drain.lines.data ? drain.lines.data : "", (Py_ssize_t)drain.lines.size);
    static const int request_widths[] = {24, 16, 16, 8};
    static const int sent_widths[] = {24, 16};
    counts = counts_dict(&drain.requests, 4, request_widths);
    sent = counts_dict(&drain.sent, 2, sent_widths);
    if (lines != NULL && counts != NULL && sent != NULL)
        result = Py_BuildValue("(KOKOOO)", (unsigned long long)drain.records, lines, (unsigned long long)drain.written,
                               counts, sent, drain.others);
    goto done;

bad_table:
    PyErr_SetString(PyExc_TypeError, "each name table must be a tuple of bytes");
done:
    Py_XDECREF(lines);
    Py_XDECREF(counts);
    Py_XDECREF(sent);
    Py_XDECREF(drain.others);
    PyMem_Free(drain.lines.data);
    PyMem_Free(drain.requests.slots);
    PyMem_Free(drain.sent.slots);
    PyBuffer_Release(&raw);
    return result;
}

static PyMethodDef methods[] = {
    {"drain_records", (PyCFunction)(void (*)(void))drain_records, METH_FASTCALL,
     "drain_records(raw, worker, tables, bounds, sample, always_errors, seed) -> "
     "(records, lines, written, counts, sent, others): one drain of a worker's ring."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef lines_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "nexus.observability._lines",
    .m_doc = "Access records to JSON lines, for the master's drain.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__lines(void)
{
    return PyModule_Create(&lines_module);
}
