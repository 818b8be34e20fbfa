/* nexus.shm._native: atomics, locks and table operations on shared memory.
 *
 * Python code keeps layouts and policy; this module does the few steps that
 * must be single instructions (atomics), or that run on every request and
 * must cost well under a microsecond (rate-limit decisions, ring pushes,
 * cache copies).
 */
#include "region.h"
#include "atomics.h"
#include "lock.h"

/* Method tables of the other source files. */
extern PyMethodDef nx_ratelimit_methods[];
extern PyMethodDef nx_ring_methods[];
extern PyMethodDef nx_cache_methods[];

/* ---- argument helpers ---------------------------------------------- */

int nx_as_u64(PyObject *arg, uint64_t *out)
{
    if (!PyLong_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "expected an int, got %.100s", Py_TYPE(arg)->tp_name);
        return -1;
    }
    int overflow = 0;
    long long value = PyLong_AsLongLongAndOverflow(arg, &overflow);
    if (overflow == 0) {
        if (value == -1 && PyErr_Occurred())
            return -1;
        *out = (uint64_t)value;
        return 0;
    }
    unsigned long long big = PyLong_AsUnsignedLongLong(arg);
    if (big == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = big;
    return 0;
}

int nx_as_i64(PyObject *arg, int64_t *out)
{
    long long value = PyLong_AsLongLong(arg);
    if (value == -1 && PyErr_Occurred())
        return -1;
    *out = value;
    return 0;
}

Region *nx_as_region(PyObject *arg)
{
    if (!PyObject_TypeCheck(arg, &RegionType)) {
        PyErr_Format(PyExc_TypeError, "expected a Region, got %.100s", Py_TYPE(arg)->tp_name);
        return NULL;
    }
    return (Region *)arg;
}

uint64_t *nx_region_words_at(Region *region, Py_ssize_t offset, Py_ssize_t span)
{
    if (offset < 0 || offset % 8 != 0 || span < 0 || offset > region->size - span) {
        PyErr_Format(PyExc_ValueError,
                     "offset %zd (+%zd bytes) is outside the %zd-byte region or not a multiple of 8",
                     offset, span, region->size);
        return NULL;
    }
    return (uint64_t *)(region->base + offset);
}

uint64_t *nx_region_words(Region *region, PyObject *offset, Py_ssize_t span)
{
    Py_ssize_t at = PyLong_AsSsize_t(offset);
    if (at == -1 && PyErr_Occurred())
        return NULL;
    return nx_region_words_at(region, at, span);
}

static int check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t want)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want, nargs);
        return -1;
    }
    return 0;
}

/* ---- Region type ----------------------------------------------------- */

static int Region_init(Region *self, PyObject *args, PyObject *kwargs)
{
    PyObject *source;
    static char *keywords[] = {"buffer", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O:Region", keywords, &source))
        return -1;
    if (self->base != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Region is already initialised");
        return -1;
    }
    if (PyObject_GetBuffer(source, &self->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (((uintptr_t)self->view.buf) % 64 != 0) {
        PyBuffer_Release(&self->view);
        PyErr_SetString(PyExc_ValueError, "a Region's buffer must start on a 64-byte boundary (use an mmap)");
        return -1;
    }
    self->base = self->view.buf;
    self->size = self->view.len;
    return 0;
}

static void Region_dealloc(Region *self)
{
    if (self->base != NULL)
        PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Region_release(Region *self, PyObject *unused)
{
    if (self->base != NULL) {
        PyBuffer_Release(&self->view);
        self->base = NULL;
        self->size = 0;
    }
    Py_RETURN_NONE;
}

static PyObject *Region_load(Region *self, PyObject *offset)
{
    uint64_t *word = nx_region_words(self, offset, 8);
    if (word == NULL)
        return NULL;
    return PyLong_FromUnsignedLongLong(nx_load(word));
}

static PyObject *Region_store(Region *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t value;
    if (check_nargs("store", nargs, 2) < 0)
        return NULL;
    uint64_t *word = nx_region_words(self, args[0], 8);
    if (word == NULL || nx_as_u64(args[1], &value) < 0)
        return NULL;
    nx_store(word, value);
    Py_RETURN_NONE;
}

static PyObject *Region_cas(Region *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t expected, desired;
    if (check_nargs("cas", nargs, 3) < 0)
        return NULL;
    uint64_t *word = nx_region_words(self, args[0], 8);
    if (word == NULL || nx_as_u64(args[1], &expected) < 0 || nx_as_u64(args[2], &desired) < 0)
        return NULL;
    return PyBool_FromLong(nx_cas(word, &expected, desired));
}

static PyObject *Region_fetch_add(Region *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t delta;
    if (check_nargs("fetch_add", nargs, 2) < 0)
        return NULL;
    uint64_t *word = nx_region_words(self, args[0], 8);
    if (word == NULL || nx_as_u64(args[1], &delta) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(nx_fetch_add(word, delta));
}

static PyObject *Region_add_local(Region *self, PyObject *const *args, Py_ssize_t nargs)
{
    /* For words with a single writer (per-worker metric slots): a relaxed
     * load and a release store, cheaper than a locked add and still never
     * torn for a reader in another process. */
    uint64_t delta;
    if (check_nargs("add_local", nargs, 2) < 0)
        return NULL;
    uint64_t *word = nx_region_words(self, args[0], 8);
    if (word == NULL || nx_as_u64(args[1], &delta) < 0)
        return NULL;
    nx_store(word, nx_load_relaxed(word) + delta);
    Py_RETURN_NONE;
}

static PyObject *Region_lock(Region *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t timeout_us;
    if (check_nargs("lock", nargs, 2) < 0)
        return NULL;
    uint64_t *word = nx_region_words(self, args[0], 8);
    if (word == NULL || nx_as_u64(args[1], &timeout_us) < 0)
        return NULL;

    enum nx_lock_result result;
    Py_BEGIN_ALLOW_THREADS
    result = nx_lock_acquire(word, timeout_us);
    Py_END_ALLOW_THREADS
    if (result == NX_LOCK_SELF) {
        PyErr_SetString(PyExc_RuntimeError, "this thread already holds the shared-memory lock");
        return NULL;
    }
    return PyLong_FromLong(result);
}

static PyObject *Region_unlock(Region *self, PyObject *offset)
{
    uint64_t *word = nx_region_words(self, offset, 8);
    if (word == NULL)
        return NULL;
    nx_lock_release(word);
    Py_RETURN_NONE;
}

static PyObject *Region_get_size(Region *self, void *unused)
{
    return PyLong_FromSsize_t(self->size);
}

static PyMethodDef Region_methods[] = {
    {"load", (PyCFunction)Region_load, METH_O, "load(offset) -> int: acquire-load the 64-bit word at byte offset."},
    {"store", (PyCFunction)(void (*)(void))Region_store, METH_FASTCALL, "store(offset, value): release-store a 64-bit word."},
    {"cas", (PyCFunction)(void (*)(void))Region_cas, METH_FASTCALL,
     "cas(offset, expected, desired) -> bool: compare-and-swap a 64-bit word."},
    {"fetch_add", (PyCFunction)(void (*)(void))Region_fetch_add, METH_FASTCALL,
     "fetch_add(offset, delta) -> int: add modulo 2**64 and return the previous value."},
    {"add_local", (PyCFunction)(void (*)(void))Region_add_local, METH_FASTCALL,
     "add_local(offset, delta): add to a word that only this process writes."},
    {"lock", (PyCFunction)(void (*)(void))Region_lock, METH_FASTCALL,
     "lock(offset, timeout_us) -> int: 0 acquired, 1 recovered from a dead holder, 2 timed out."},
    {"unlock", (PyCFunction)Region_unlock, METH_O, "unlock(offset): release a lock taken with lock()."},
    {"release", (PyCFunction)Region_release, METH_NOARGS, "release(): let go of the buffer; the Region is unusable after."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Region_getset[] = {
    {"size", (getter)Region_get_size, NULL, "size of the region in bytes", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject RegionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nexus.shm._native.Region",
    .tp_basicsize = sizeof(Region),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Region(buffer): 64-bit atomic access to a writable, 64-byte aligned buffer.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Region_init,
    .tp_dealloc = (destructor)Region_dealloc,
    .tp_methods = Region_methods,
    .tp_getset = Region_getset,
};

/* ---- module-level functions ----------------------------------------- */

static PyObject *monotonic_us(PyObject *module, PyObject *unused)
{
    return PyLong_FromUnsignedLongLong(nx_monotonic_us());
}

static PyObject *realtime_us(PyObject *module, PyObject *unused)
{
    return PyLong_FromUnsignedLongLong(nx_realtime_us());
}

static PyObject *thread_id(PyObject *module, PyObject *unused)
{
    return PyLong_FromUnsignedLongLong(nx_thread_id());
}

static PyObject *task_alive(PyObject *module, PyObject *arg)
{
    uint64_t tid;
    if (nx_as_u64(arg, &tid) < 0)
        return NULL;
    return PyBool_FromLong(nx_task_alive(tid));
}

static PyMethodDef module_methods[] = {
    {"monotonic_us", monotonic_us, METH_NOARGS, "CLOCK_MONOTONIC in microseconds (the clock of GCRA state)."},
    {"realtime_us", realtime_us, METH_NOARGS, "CLOCK_REALTIME in microseconds (the clock of quota windows)."},
    {"thread_id", thread_id, METH_NOARGS, "The caller's lock identity: Linux thread id in bits 0-21, start-time bits above (what a held lock word holds)."},
    {"task_alive", task_alive, METH_O, "task_alive(identity) -> bool: the thread exists, is not a zombie and, if the identity has start-time bits, started then."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "nexus.shm._native",
    .m_doc = "Atomics, robust locks and table operations on Nexus shared memory.",
    .m_size = -1,
    .m_methods = module_methods,
};

static int add_methods(PyObject *module, PyMethodDef *methods)
{
    PyObject *name = PyModule_GetNameObject(module);
    if (name == NULL)
        return -1;
    for (PyMethodDef *method = methods; method->ml_name != NULL; method++) {
        PyObject *function = PyCFunction_NewEx(method, NULL, name);
        if (function == NULL || PyModule_AddObject(module, method->ml_name, function) < 0) {
            Py_XDECREF(function);
            Py_DECREF(name);
            return -1;
        }
    }
    Py_DECREF(name);
    return 0;
}

PyMODINIT_FUNC PyInit__native(void)
{
    if (PyType_Ready(&RegionType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&native_module);
    if (module == NULL)
        return NULL;

    Py_INCREF(&RegionType);
    if (PyModule_AddObject(module, "Region", (PyObject *)&RegionType) < 0
        || add_methods(module, nx_ratelimit_methods) < 0
        || add_methods(module, nx_ring_methods) < 0
        || add_methods(module, nx_cache_methods) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
