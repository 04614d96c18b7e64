/* The CUDA driver calls of the hot path, made from C.
 *
 * A queued op costs a few driver calls (waits, a copy or a launch, a record), each a
 * fraction of a microsecond inside the driver; made through Python bindings, each
 * costs a microsecond or more of argument handling around it. This module makes them
 * directly. It links nothing at build time: the driver library is opened on first
 * use, so the package builds and imports where there is no CUDA at all.
 *
 * Every call takes the context it must run in and makes it current on the calling
 * thread when it is not (a thread may drive several devices). Calls return the
 * driver's result code (0: success); the caller maps codes to errors.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <stdint.h>
#include <string.h>

typedef int CUresult;
typedef void *CUcontext;
typedef void *CUstream;
typedef void *CUevent;
typedef void *CUfunction;
typedef unsigned long long CUdeviceptr;

#define NOT_LOADED 999 /* CUDA_ERROR_UNKNOWN: the driver library could not be opened */
#define MAX_PARAMS 64

static CUresult (*cu_ctx_get)(CUcontext *);
static CUresult (*cu_ctx_set)(CUcontext);
static CUresult (*cu_memcpy)(CUdeviceptr, CUdeviceptr, size_t, CUstream);
static CUresult (*cu_record)(CUevent, CUstream);
static CUresult (*cu_wait)(CUstream, CUevent, unsigned int);
static CUresult (*cu_query)(CUevent);
static CUresult (*cu_elapsed)(float *, CUevent, CUevent);
static CUresult (*cu_launch)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                             unsigned, unsigned, CUstream, void **, void **);
static int loaded = -1; /* -1 not tried, 0 failed, 1 loaded */

static int load(void) {
    if (loaded >= 0)
        return loaded;
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL)
        lib = dlopen("libcuda.so", RTLD_NOW | RTLD_LOCAL);
    loaded = 0;
    if (lib == NULL)
        return 0;
#define SYM(var, name)                                    \
    *(void **)(&var) = dlsym(lib, name);                  \
    if (var == NULL)                                      \
        return 0;
    SYM(cu_ctx_get, "cuCtxGetCurrent")
    SYM(cu_ctx_set, "cuCtxSetCurrent")
    SYM(cu_memcpy, "cuMemcpyAsync")
    SYM(cu_record, "cuEventRecord")
    SYM(cu_wait, "cuStreamWaitEvent")
    SYM(cu_query, "cuEventQuery")
    SYM(cu_elapsed, "cuEventElapsedTime")
    SYM(cu_launch, "cuLaunchKernel")
#undef SYM
    loaded = 1;
    return 1;
}

/* Handles come as Python ints (pointer values). */
static int handle(PyObject *o, void **out) {
    unsigned long long v = PyLong_AsUnsignedLongLongMask(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = (void *)(uintptr_t)v;
    return 0;
}

static CUresult enter(PyObject *ctx_obj) {
    void *ctx, *cur = NULL;
    if (handle(ctx_obj, &ctx) < 0)
        return -1;
    CUresult err = cu_ctx_get(&cur);
    if (err != 0)
        return err;
    return cur == ctx ? 0 : cu_ctx_set(ctx);
}

/* Parse the leading handles of a call; returns the driver code, or -1 with a Python error. */
static CUresult prologue(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want,
                         const char *name, void **h) {
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", name, want, nargs);
        return -1;
    }
    if (loaded != 1 && load() == 0)
        return NOT_LOADED;
    for (Py_ssize_t i = 1; i < want; i++)
        if (handle(args[i], &h[i - 1]) < 0)
            return -1;
    return enter(args[0]);
}

#define RESULT(err) ((err) == -1 && PyErr_Occurred() ? NULL : PyLong_FromLong(err))

/* make_current(ctx) */
static PyObject *make_current(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    void *h[1];
    CUresult err = prologue(args, nargs, 1, "make_current", h);
    return RESULT(err);
}

/* memcpy(ctx, stream, dst, src, nbytes): cuMemcpyAsync, unified addresses */
static PyObject *memcpy_async(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    void *h[4];
    CUresult err = prologue(args, nargs, 5, "memcpy", h);
    if (err == 0)
        err = cu_memcpy((CUdeviceptr)(uintptr_t)h[1], (CUdeviceptr)(uintptr_t)h[2],
                        (size_t)(uintptr_t)h[3], h[0]);
    return RESULT(err);
}

/* record(ctx, stream, event) */
static PyObject *record(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    void *h[2];
    CUresult err = prologue(args, nargs, 3, "record", h);
    if (err == 0)
        err = cu_record(h[1], h[0]);
    return RESULT(err);
}

/* wait(ctx, stream, event) */
static PyObject *wait(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    void *h[2];
    CUresult err = prologue(args, nargs, 3, "wait", h);
    if (err == 0)
        err = cu_wait(h[0], h[1], 0);
    return RESULT(err);
}

/* query(ctx, event): 0 done, 600 (CUDA_ERROR_NOT_READY) not yet, else an error */
static PyObject *query(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    void *h[1];
    CUresult err = prologue(args, nargs, 2, "query", h);
    if (err == 0)
        err = cu_query(h[0]);
    return RESULT(err);
}

/* elapsed(ctx, start, end) -> (code, milliseconds) */
static PyObject *elapsed(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    void *h[2];
    float ms = 0.0f;
    CUresult err = prologue(args, nargs, 3, "elapsed", h);
    if (err == -1 && PyErr_Occurred())
        return NULL;
    if (err == 0)
        err = cu_elapsed(&ms, h[0], h[1]);
    return Py_BuildValue("(id)", err, (double)ms);
}

/* One kernel parameter, converted to its C type by its code in the signature string. */
static int put_param(char code, PyObject *v, uint64_t *slot) {
    memset(slot, 0, sizeof *slot);
    switch (code) {
    case 'P': case 'Q': case 'q': case 'I': case 'i': case 'H': case 'h': case 'B':
    case 'b': case '?': {
        unsigned long long u;
        if (PyFloat_Check(v)) {
            PyErr_SetString(PyExc_TypeError, "an integer parameter got a float");
            return -1;
        }
        u = PyLong_AsUnsignedLongLongMask(v);
        if (u == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
        switch (code) {
        case 'P': case 'Q': case 'q': *slot = u; break;
        case 'I': case 'i': { uint32_t x = (uint32_t)u; memcpy(slot, &x, 4); break; }
        case 'H': case 'h': { uint16_t x = (uint16_t)u; memcpy(slot, &x, 2); break; }
        default: { uint8_t x = (uint8_t)u; memcpy(slot, &x, 1); break; }
        }
        return 0;
    }
    case 'f': case 'd': {
        double d = PyFloat_AsDouble(v);
        if (d == -1.0 && PyErr_Occurred())
            return -1;
        if (code == 'f') {
            float f = (float)d;
            memcpy(slot, &f, 4);
        } else {
            memcpy(slot, &d, 8);
        }
        return 0;
    }
    default:
        PyErr_Format(PyExc_ValueError, "unknown parameter code %c", code);
        return -1;
    }
}

/* launch(ctx, stream, function, grid, block, shmem, codes, params)
 * grid and block are 3-tuples of ints, codes a bytes object with one code per parameter
 * (P pointer, Q/q 64-bit, I/i 32-bit, H/h 16-bit, B/b/? 8-bit integers, f float,
 * d double), params a tuple of Python numbers. */
static PyObject *launch(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    void *h[2];
    unsigned dims[6];
    uint64_t slots[MAX_PARAMS];
    void *ptrs[MAX_PARAMS];
    if (nargs != 8) {
        PyErr_Format(PyExc_TypeError, "launch takes 8 arguments (%zd given)", nargs);
        return NULL;
    }
    for (int k = 0; k < 2; k++) {
        PyObject *t = args[3 + k];
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 3) {
            PyErr_SetString(PyExc_TypeError, "grid and block must be 3-tuples");
            return NULL;
        }
        for (int j = 0; j < 3; j++) {
            unsigned long v = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(t, j));
            if (v == (unsigned long)-1 && PyErr_Occurred())
                return NULL;
            dims[3 * k + j] = (unsigned)v;
        }
    }
    unsigned long shmem = PyLong_AsUnsignedLong(args[5]);
    if (shmem == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    PyObject *codes = args[6], *params = args[7];
    if (!PyBytes_Check(codes) || !PyTuple_Check(params) ||
        PyBytes_GET_SIZE(codes) != PyTuple_GET_SIZE(params) ||
        PyTuple_GET_SIZE(params) > MAX_PARAMS) {
        PyErr_SetString(PyExc_TypeError, "codes and params must match (at most 64)");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(params);
    const char *c = PyBytes_AS_STRING(codes);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (put_param(c[i], PyTuple_GET_ITEM(params, i), &slots[i]) < 0)
            return NULL;
        ptrs[i] = &slots[i];
    }
    PyObject *head[3] = {args[0], args[1], args[2]};
    CUresult err = prologue(head, 3, 3, "launch", h);
    if (err == 0)
        err = cu_launch(h[1], dims[0], dims[1], dims[2], dims[3], dims[4], dims[5],
                        (unsigned)shmem, h[0], n ? ptrs : NULL, NULL);
    return RESULT(err);
}

/* available() -> bool: the driver library opened and has every call */
static PyObject *available(PyObject *self, PyObject *unused) {
    return PyBool_FromLong(load());
}

static PyMethodDef methods[] = {
    {"available", available, METH_NOARGS, "True if the CUDA driver library is usable."},
    {"make_current", (PyCFunction)(void (*)(void))make_current, METH_FASTCALL,
     "make_current(ctx) -> code"},
    {"memcpy", (PyCFunction)(void (*)(void))memcpy_async, METH_FASTCALL,
     "memcpy(ctx, stream, dst, src, nbytes) -> code"},
    {"record", (PyCFunction)(void (*)(void))record, METH_FASTCALL,
     "record(ctx, stream, event) -> code"},
    {"wait", (PyCFunction)(void (*)(void))wait, METH_FASTCALL,
     "wait(ctx, stream, event) -> code"},
    {"query", (PyCFunction)(void (*)(void))query, METH_FASTCALL, "query(ctx, event) -> code"},
    {"elapsed", (PyCFunction)(void (*)(void))elapsed, METH_FASTCALL,
     "elapsed(ctx, start, end) -> (code, ms)"},
    {"launch", (PyCFunction)(void (*)(void))launch, METH_FASTCALL,
     "launch(ctx, stream, function, grid, block, shmem, codes, params) -> code"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cudrv",
                                    "The CUDA driver calls of the hot path, made from C.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__cudrv(void) { return PyModule_Create(&module); }
