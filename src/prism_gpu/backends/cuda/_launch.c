/* Kernel launches made from C.
 *
 * cuda.core's launch converts each argument through Python objects of its own:
 * about 15 us for a kernel of four parameters, more than the launch costs the
 * driver. The kernel's signature is known (parsed from its source), so the
 * arguments are packed here from a string of type codes and handed to
 * cuLaunchKernel directly. Nothing CUDA is linked at build time: the driver
 * library is opened on first use (the package builds and imports without CUDA).
 *
 * launch(stream, function, grid, block, shmem, codes, params) -> CUresult code
 *     stream, function: handles as ints (the function's context must be current);
 *     grid, block: 3-tuples; codes: bytes, one per parameter: P pointer, Q/q 64-bit,
 *     I/i 32-bit, H/h 16-bit, B/b 8-bit integers, ? bool, f float, d double;
 *     params: a tuple of Python or numpy numbers.
 * available() -> bool: the driver library opened and has cuLaunchKernel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <stdint.h>
#include <string.h>

#define NOT_LOADED 999 /* CUDA_ERROR_UNKNOWN: the driver library could not be opened */
#define MAX_PARAMS 64

typedef int (*launch_fn)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                         unsigned, void *, void **, void **);

static launch_fn cu_launch;
static int loaded = -1; /* -1 not tried, 0 failed, 1 loaded */

static int load(void) {
    if (loaded < 0) {
        void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        loaded = 0;
        if (lib != NULL) {
            *(void **)(&cu_launch) = dlsym(lib, "cuLaunchKernel");
            loaded = cu_launch != NULL;
        }
    }
    return loaded;
}

static int handle(PyObject *o, void **out) {
    unsigned long long v = PyLong_AsUnsignedLongLongMask(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = (void *)(uintptr_t)v;
    return 0;
}

/* One parameter, converted to its C type; integers wrap as C casts do. */
static int put_param(char code, PyObject *v, uint64_t *slot) {
    *slot = 0;
    if (code == 'f' || code == 'd') {
        double d = PyFloat_AsDouble(v);
        if (d == -1.0 && PyErr_Occurred())
            return -1;
        if (code == 'f') {
            float f = (float)d;
            memcpy(slot, &f, sizeof f);
        } else {
            memcpy(slot, &d, sizeof d);
        }
        return 0;
    }
    if (code == '?') {
        int b = PyObject_IsTrue(v);
        if (b < 0)
            return -1;
        *(uint8_t *)slot = (uint8_t)b;
        return 0;
    }
    if (PyFloat_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "an integer parameter got a float");
        return -1;
    }
    unsigned long long u = PyLong_AsUnsignedLongLongMask(v);
    if (u == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    switch (code) {
    case 'P': case 'Q': case 'q': *slot = u; return 0;
    case 'I': case 'i': { uint32_t x = (uint32_t)u; memcpy(slot, &x, 4); return 0; }
    case 'H': case 'h': { uint16_t x = (uint16_t)u; memcpy(slot, &x, 2); return 0; }
    case 'B': case 'b': { uint8_t x = (uint8_t)u; memcpy(slot, &x, 1); return 0; }
    default:
        PyErr_Format(PyExc_ValueError, "unknown parameter code %c", code);
        return -1;
    }
}

static int dims(PyObject *t, unsigned *out) {
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 3) {
        PyErr_SetString(PyExc_TypeError, "grid and block must be 3-tuples");
        return -1;
    }
    for (int j = 0; j < 3; j++) {
        unsigned long v = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(t, j));
        if (v == (unsigned long)-1 && PyErr_Occurred())
            return -1;
        if (v > 0xFFFFFFFFUL) {
            PyErr_SetString(PyExc_OverflowError, "a launch dimension exceeds 32 bits");
            return -1;
        }
        out[j] = (unsigned)v;
    }
    return 0;
}

static PyObject *launch(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    void *stream, *function;
    unsigned grid[3], block[3];
    uint64_t slots[MAX_PARAMS];
    void *ptrs[MAX_PARAMS];
    if (nargs != 7) {
        PyErr_Format(PyExc_TypeError, "launch takes 7 arguments (%zd given)", nargs);
        return NULL;
    }
    if (handle(args[0], &stream) < 0 || handle(args[1], &function) < 0 ||
        dims(args[2], grid) < 0 || dims(args[3], block) < 0)
        return NULL;
    unsigned long shmem = PyLong_AsUnsignedLong(args[4]);
    if (shmem == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    PyObject *codes = args[5], *params = args[6];
    if (!PyBytes_Check(codes) || !PyTuple_Check(params) ||
        PyBytes_GET_SIZE(codes) != PyTuple_GET_SIZE(params) ||
        PyTuple_GET_SIZE(params) > MAX_PARAMS) {
        PyErr_SetString(PyExc_TypeError, "codes (bytes) and params (a tuple) must match, "
                                         "at most 64");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(params);
    const char *c = PyBytes_AS_STRING(codes);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (put_param(c[i], PyTuple_GET_ITEM(params, i), &slots[i]) < 0)
            return NULL;
        ptrs[i] = &slots[i];
    }
    if (!load())
        return PyLong_FromLong(NOT_LOADED);
    int err = cu_launch(function, grid[0], grid[1], grid[2], block[0], block[1], block[2],
                        (unsigned)shmem, stream, n ? ptrs : NULL, NULL);
    return PyLong_FromLong(err);
}

static PyObject *available(PyObject *self, PyObject *unused) {
    return PyBool_FromLong(load());
}

static PyMethodDef methods[] = {
    {"launch", (PyCFunction)(void (*)(void))launch, METH_FASTCALL,
     "launch(stream, function, grid, block, shmem, codes, params) -> CUresult code"},
    {"available", available, METH_NOARGS, "True if the CUDA driver library is usable."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_launch",
                                    "Kernel launches made from C.", -1, methods};

PyMODINIT_FUNC PyInit__launch(void) { return PyModule_Create(&module); }
