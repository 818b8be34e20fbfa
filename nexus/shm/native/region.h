/* Region: a Python object holding a writable buffer (a shared mmap) for as
 * long as it lives, so C code can address its words without re-acquiring the
 * buffer on every call.
 */
#ifndef NEXUS_REGION_H
#define NEXUS_REGION_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    char *base;
    Py_ssize_t size;
} Region;

extern PyTypeObject RegionType;

/* Return a pointer to the 64-bit word at byte `offset`, or NULL with
 * ValueError set when the offset is unaligned or `span` bytes from it do not
 * fit in the region. */
uint64_t *nx_region_words(Region *region, PyObject *offset, Py_ssize_t span);

/* The same for an offset already converted to a C integer. */
uint64_t *nx_region_words_at(Region *region, Py_ssize_t offset, Py_ssize_t span);

/* Check that `arg` is a Region; set TypeError and return NULL if not. */
Region *nx_as_region(PyObject *arg);

/* Convert a Python int to an unsigned 64-bit value, accepting negative
 * numbers as their two's complement (for fetch-add deltas). */
int nx_as_u64(PyObject *arg, uint64_t *out);

/* Convert a Python int to a signed 64-bit value. */
int nx_as_i64(PyObject *arg, int64_t *out);

#endif
