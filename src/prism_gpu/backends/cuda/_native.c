/* The CUDA driver calls of the hot path, straight from C.
 *
 * Each queued op makes a few driver calls: stream waits, a copy or a launch, an
 * event record. Through cuda.core or cuda.bindings each call costs a microsecond
 * or more of Python on top of the driver's own time; here it is one C call.
 * The driver is not linked: load() finds the functions in the driver library the
 * process has already loaded (cuda.core loads it), so the module builds and imports
 * where no CUDA is installed, and only load() says whether it can be used.
 *
 * load(scalar_types)                  -> None, or why the driver functions are absent;
 *                                         scalar_types: the numpy scalar types a launch
 *                                         passes by value (exactly these types)
 * memcpy(dst, src, nbytes, stream)     -> CUresult (cuMemcpyAsync)
 * record(event, stream)                -> CUresult (cuEventRecord)
 * wait(stream, event)                  -> CUresult (cuStreamWaitEvent)
 * query(event)                         -> CUresult (cuEventQuery)
 * launch(function, gx, gy, gz, bx, by, bz, smem, stream, args)
 *                                      -> CUresult (cuLaunchKernel); args a tuple or
 *                                         list of at most MAX_ARGS ints (pointer-sized
 *                                         integers, as cuda.core passes them) and
 *                                         scalars of the types given to load (their
 *                                         bytes, exactly the C type's)
 * Handles, pointers and sizes are Python ints. A call before load() succeeded raises.
 * A null stream or event handle is refused with CUDA_ERROR_INVALID_HANDLE before any
 * driver call: a closed stream's handle reads 0, which the driver would take for the
 * legacy default stream.
 * The calls that queue work release the GIL while in the driver: it returns at once,
 * unless the device's queue is full, and then other threads run meanwhile.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <stdint.h>
#include <string.h>

typedef int CUresult;
#define INVALID_HANDLE 400 /* CUDA_ERROR_INVALID_HANDLE */
typedef void *CUstream;
typedef void *CUevent;
typedef void *CUfunction;
typedef unsigned long long CUdeviceptr;

typedef CUresult (*memcpy_fn)(CUdeviceptr, CUdeviceptr, size_t, CUstream);
typedef CUresult (*record_fn)(CUevent, CUstream);
typedef CUresult (*wait_fn)(CUstream, CUevent, unsigned int);
typedef CUresult (*query_fn)(CUevent);
typedef CUresult (*launch_fn)(CUfunction, unsigned int, unsigned int, unsigned int,
                              unsigned int, unsigned int, unsigned int, unsigned int,
                              CUstream, void **, void **);

static memcpy_fn p_memcpy;
static record_fn p_record;
static wait_fn p_wait;
static query_fn p_query;
static launch_fn p_launch;

#define MAX_ARGS 256 /* more go through cuda.core (the caller checks) */
#define SLOT 16 /* bytes per argument: the widest numpy scalar a kernel takes (complex128) */
#define MAX_TYPES 32

static PyTypeObject *scalar_types[MAX_TYPES]; /* owned references, set once by load() */
static int n_scalar_types;

static int
loaded(void)
{
    if (p_launch == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the CUDA driver functions are not loaded");
        return 0;
    }
    return 1;
}

static PyObject *
load(PyObject *self, PyObject *types)
{
    if (p_launch != NULL)
        Py_RETURN_NONE;
    if (!PyTuple_Check(types) || PyTuple_GET_SIZE(types) > MAX_TYPES) {
        PyErr_Format(PyExc_TypeError, "load() takes a tuple of at most %d types", MAX_TYPES);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(types); i++) {
        if (!PyType_Check(PyTuple_GET_ITEM(types, i))) {
            PyErr_SetString(PyExc_TypeError, "load() takes a tuple of types");
            return NULL;
        }
    }
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (lib == NULL)
        lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (lib == NULL)
        return PyUnicode_FromString("the CUDA driver library (libcuda.so.1) is not loadable");
    /* the plain names are the driver's stable entry points for these calls (the
     * per-thread-default-stream variants carry a suffix; explicit streams need none) */
    memcpy_fn m = (memcpy_fn)dlsym(lib, "cuMemcpyAsync");
    record_fn r = (record_fn)dlsym(lib, "cuEventRecord");
    wait_fn w = (wait_fn)dlsym(lib, "cuStreamWaitEvent");
    query_fn q = (query_fn)dlsym(lib, "cuEventQuery");
    launch_fn l = (launch_fn)dlsym(lib, "cuLaunchKernel");
    if (!m || !r || !w || !q || !l)
        return PyUnicode_FromString("the CUDA driver library lacks an expected function");
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(types); i++) {
        PyObject *t = PyTuple_GET_ITEM(types, i);
        Py_INCREF(t);
        scalar_types[n_scalar_types++] = (PyTypeObject *)t;
    }
    p_memcpy = m;
    p_record = r;
    p_wait = w;
    p_query = q;
    p_launch = l; /* last: loaded() tests it */
    Py_RETURN_NONE;
}

/* An unsigned 64-bit handle or pointer from a Python int (negative ints refused). */
static int
as_u64(PyObject *o, unsigned long long *out)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return 0;
    *out = v;
    return 1;
}

static PyObject *
result(CUresult r)
{
    return PyLong_FromLong((long)r);
}

static PyObject *
n_memcpy(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long long dst, src, n, s;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "memcpy(dst, src, nbytes, stream)");
        return NULL;
    }
    if (!loaded() || !as_u64(args[0], &dst) || !as_u64(args[1], &src) ||
        !as_u64(args[2], &n) || !as_u64(args[3], &s))
        return NULL;
    if (s == 0)
        return result(INVALID_HANDLE);
    CUresult r;
    Py_BEGIN_ALLOW_THREADS
    r = p_memcpy((CUdeviceptr)dst, (CUdeviceptr)src, (size_t)n, (CUstream)(uintptr_t)s);
    Py_END_ALLOW_THREADS
    return result(r);
}

/* the two handles of record(event, stream) and wait(stream, event), in call order:
 * 1 parsed, 0 on error (raised), -1 if either is null (refused: INVALID_HANDLE) */
static int
two_handles(PyObject *const *args, Py_ssize_t nargs, const char *usage,
            unsigned long long *a, unsigned long long *b)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, usage);
        return 0;
    }
    if (!loaded() || !as_u64(args[0], a) || !as_u64(args[1], b))
        return 0;
    return (*a == 0 || *b == 0) ? -1 : 1;
}

static PyObject *
n_record(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long long e, s;
    int ok = two_handles(args, nargs, "record(event, stream)", &e, &s);
    if (ok <= 0)
        return ok == 0 ? NULL : result(INVALID_HANDLE);
    CUresult r;
    Py_BEGIN_ALLOW_THREADS
    r = p_record((CUevent)(uintptr_t)e, (CUstream)(uintptr_t)s);
    Py_END_ALLOW_THREADS
    return result(r);
}

static PyObject *
n_wait(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long long s, e;
    int ok = two_handles(args, nargs, "wait(stream, event)", &s, &e);
    if (ok <= 0)
        return ok == 0 ? NULL : result(INVALID_HANDLE);
    CUresult r;
    Py_BEGIN_ALLOW_THREADS
    r = p_wait((CUstream)(uintptr_t)s, (CUevent)(uintptr_t)e, 0);
    Py_END_ALLOW_THREADS
    return result(r);
}

static PyObject *
n_query(PyObject *self, PyObject *arg)
{
    unsigned long long e;
    if (!loaded() || !as_u64(arg, &e))
        return NULL;
    if (e == 0)
        return result(INVALID_HANDLE);
    return result(p_query((CUevent)(uintptr_t)e));
}

/* Store one kernel argument in ``slot``: an int as a pointer-sized integer, a scalar of
 * one of the types given to load() as its bytes; anything else is refused. */
static int
pack(PyObject *o, unsigned char *slot, Py_ssize_t index)
{
    if (PyLong_Check(o)) {
        if (PyBool_Check(o)) {
            PyErr_Format(PyExc_TypeError, "kernel argument %zd is a bool: pass a numpy "
                         "scalar of the parameter's C type", index);
            return 0;
        }
        long long v = PyLong_AsLongLong(o);
        if (v == -1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                return 0;
            PyErr_Clear();
            unsigned long long u = PyLong_AsUnsignedLongLong(o);
            if (u == (unsigned long long)-1 && PyErr_Occurred())
                return 0;
            memcpy(slot, &u, sizeof u);
            return 1;
        }
        memcpy(slot, &v, sizeof v);
        return 1;
    }
    int known = 0;
    for (int i = 0; i < n_scalar_types && !known; i++)
        known = Py_TYPE(o) == scalar_types[i];
    if (!known) {
        PyErr_Format(PyExc_TypeError, "kernel argument %zd is a %.100s: pass a pointer "
                     "(int) or a numpy scalar of the parameter's C type", index,
                     Py_TYPE(o)->tp_name);
        return 0;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(o, &view, PyBUF_SIMPLE) < 0)
        return 0;
    if (view.len <= 0 || view.len > SLOT) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_TypeError, "kernel argument %zd is %zd bytes: at most %d are "
                     "passed by value", index, view.len, SLOT);
        return 0;
    }
    memcpy(slot, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return 1;
}

static PyObject *
n_launch(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long long f, s, dims[7];
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError,
                        "launch(function, gx, gy, gz, bx, by, bz, smem, stream, args)");
        return NULL;
    }
    if (!loaded() || !as_u64(args[0], &f))
        return NULL;
    for (int i = 0; i < 7; i++) {
        if (!as_u64(args[1 + i], &dims[i]))
            return NULL;
        if (dims[i] > 0xFFFFFFFFull) {
            PyErr_SetString(PyExc_OverflowError, "launch dimension out of range");
            return NULL;
        }
    }
    if (!as_u64(args[8], &s))
        return NULL;
    if (s == 0 || f == 0)
        return result(INVALID_HANDLE);
    if (!PyTuple_Check(args[9]) && !PyList_Check(args[9])) {
        PyErr_SetString(PyExc_TypeError, "launch arguments must be a tuple or list");
        return NULL;
    }
    /* a tuple of our own: packing cannot be affected by the caller's list changing */
    PyObject *seq = PySequence_Tuple(args[9]);
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    if (n > MAX_ARGS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_TypeError, "at most %d kernel arguments, got %zd", MAX_ARGS, n);
        return NULL;
    }
    _Alignas(16) unsigned char store[MAX_ARGS][SLOT];
    void *params[MAX_ARGS + 1];
    for (Py_ssize_t i = 0; i < n; i++) {
        memset(store[i], 0, SLOT);
        if (!pack(PyTuple_GET_ITEM(seq, i), store[i], i)) {
            Py_DECREF(seq);
            return NULL;
        }
        params[i] = store[i];
    }
    params[n] = NULL;
    Py_DECREF(seq);
    CUresult r;
    Py_BEGIN_ALLOW_THREADS
    r = p_launch((CUfunction)(uintptr_t)f, (unsigned)dims[0], (unsigned)dims[1],
                 (unsigned)dims[2], (unsigned)dims[3], (unsigned)dims[4], (unsigned)dims[5],
                 (unsigned)dims[6], (CUstream)(uintptr_t)s, n ? params : NULL, NULL);
    Py_END_ALLOW_THREADS
    return result(r);
}

static PyMethodDef methods[] = {
    {"load", (PyCFunction)load, METH_O,
     "load(scalar_types): find the driver functions; None, or why they are absent."},
    {"memcpy", (PyCFunction)(void (*)(void))n_memcpy, METH_FASTCALL,
     "memcpy(dst, src, nbytes, stream) -> CUresult of cuMemcpyAsync."},
    {"record", (PyCFunction)(void (*)(void))n_record, METH_FASTCALL,
     "record(event, stream) -> CUresult of cuEventRecord."},
    {"wait", (PyCFunction)(void (*)(void))n_wait, METH_FASTCALL,
     "wait(stream, event) -> CUresult of cuStreamWaitEvent."},
    {"query", (PyCFunction)n_query, METH_O, "query(event) -> CUresult of cuEventQuery."},
    {"launch", (PyCFunction)(void (*)(void))n_launch, METH_FASTCALL,
     "launch(function, gx, gy, gz, bx, by, bz, smem, stream, args) -> CUresult of "
     "cuLaunchKernel."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "The CUDA driver calls of the hot path, from C.", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    return PyModule_Create(&module);
}
