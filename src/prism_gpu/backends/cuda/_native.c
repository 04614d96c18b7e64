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
typedef CUresult (*elapsed_fn)(float *, CUevent, CUevent);
typedef void *CUcontext;
typedef CUresult (*ctx_current_fn)(CUcontext *);
typedef CUresult (*stream_ctx_fn)(CUstream, CUcontext *);
typedef CUresult (*launch_fn)(CUfunction, unsigned int, unsigned int, unsigned int,
                              unsigned int, unsigned int, unsigned int, unsigned int,
                              CUstream, void **, void **);

static memcpy_fn p_memcpy;
static record_fn p_record;
static wait_fn p_wait;
static query_fn p_query;
static launch_fn p_launch;
static elapsed_fn p_elapsed; /* NULL if the driver has neither name (not required) */
/* the calling thread's current context, a stream's context: NULL without them (then
 * every call asks the Python side whether its device's context is current) */
static ctx_current_fn p_ctx_current;
static stream_ctx_fn p_stream_ctx;

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
    p_elapsed = (elapsed_fn)dlsym(lib, "cuEventElapsedTime_v2");
    if (p_elapsed == NULL)
        p_elapsed = (elapsed_fn)dlsym(lib, "cuEventElapsedTime");
    p_ctx_current = (ctx_current_fn)dlsym(lib, "cuCtxGetCurrent");
    p_stream_ctx = (stream_ctx_fn)dlsym(lib, "cuStreamGetCtx");
    if (p_ctx_current == NULL || p_stream_ctx == NULL)
        p_ctx_current = NULL, p_stream_ctx = NULL;
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

/* launch_arrays(function, dims, stream, arrays, pointees, extra) -> CUresult, or -1 - i
 * when array i's dtype is not pointees[2 * i] (the caller raises), or -1000 - i when
 * array i has no ``ptr`` that is a plain int (the caller takes the general path). dims: the 7 launch
 * dimensions; each array is passed as (pointer, size_t n), n its length if 1-d, else its
 * size; then the extra values, packed as launch() packs them. */
static PyObject *
n_launch_arrays(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    static PyObject *s_dtype_, *s_ptr_, *s_shape_, *s_size_;
    if (s_dtype_ == NULL) {
        s_dtype_ = PyUnicode_InternFromString("dtype");
        s_ptr_ = PyUnicode_InternFromString("ptr");
        s_shape_ = PyUnicode_InternFromString("shape");
        s_size_ = PyUnicode_InternFromString("size");
        if (!s_dtype_ || !s_ptr_ || !s_shape_ || !s_size_)
            return NULL;
    }
    if (nargs != 6 || !PyTuple_Check(args[1]) || PyTuple_GET_SIZE(args[1]) != 7 ||
        !PySequence_Check(args[3]) || !PySequence_Check(args[4]) || !PyTuple_Check(args[5])) {
        PyErr_SetString(PyExc_TypeError, "launch_arrays(function, dims, stream, arrays, "
                        "pointees, extra)");
        return NULL;
    }
    unsigned long long f, s, dims[7];
    if (!loaded() || !as_u64(args[0], &f) || !as_u64(args[2], &s))
        return NULL;
    for (int i = 0; i < 7; i++) {
        if (!as_u64(PyTuple_GET_ITEM(args[1], i), &dims[i]))
            return NULL;
        if (dims[i] > 0xFFFFFFFFull) {
            PyErr_SetString(PyExc_OverflowError, "launch dimension out of range");
            return NULL;
        }
    }
    /* a tuple of our own: the caller's list cannot change under the packing */
    PyObject *arrays = PySequence_Tuple(args[3]);
    if (arrays == NULL)
        return NULL;
    PyObject *extra = args[5];
    Py_ssize_t na = PySequence_Fast_GET_SIZE(arrays), ne = PyTuple_GET_SIZE(extra);
    Py_ssize_t n = 2 * na + ne;
    if (n > MAX_ARGS) {
        Py_DECREF(arrays);
        PyErr_Format(PyExc_TypeError, "at most %d kernel arguments, got %zd", MAX_ARGS, n);
        return NULL;
    }
    _Alignas(16) unsigned char store[MAX_ARGS][SLOT];
    void *params[MAX_ARGS + 1];
    for (Py_ssize_t i = 0; i < na; i++) {
        PyObject *a = PySequence_Fast_GET_ITEM(arrays, i);
        PyObject *want = PySequence_GetItem(args[4], 2 * i);
        if (want == NULL)
            goto fail;
        if (want != Py_None) {
            PyObject *dt = PyObject_GetAttr(a, s_dtype_);
            if (dt == NULL) {
                if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
                    Py_DECREF(want);
                    goto fail;
                }
                PyErr_Clear(); /* no dtype: nothing to check, as the Python path */
            }
            else if (dt == Py_None)
                Py_DECREF(dt);
            else {
                int same = dt == want ? 1 : PyObject_RichCompareBool(dt, want, Py_EQ);
                Py_DECREF(dt);
                if (same <= 0) {
                    Py_DECREF(want);
                    if (same < 0)
                        goto fail;
                    Py_DECREF(arrays);
                    return PyLong_FromSsize_t(-1 - i);
                }
            }
        }
        Py_DECREF(want);
        PyObject *ptr = PyObject_GetAttr(a, s_ptr_);
        if (ptr == NULL && !PyErr_ExceptionMatches(PyExc_AttributeError))
            goto fail;
        if (ptr == NULL || !PyLong_CheckExact(ptr)) { /* none, or not a plain int */
            if (ptr == NULL)
                PyErr_Clear();
            Py_XDECREF(ptr);
            Py_DECREF(arrays);
            return PyLong_FromSsize_t(-1000 - i);
        }
        unsigned long long pv, len;
        int ok = as_u64(ptr, &pv);
        Py_DECREF(ptr);
        if (!ok)
            goto fail;
        PyObject *shape = PyObject_GetAttr(a, s_shape_);
        if (shape == NULL)
            goto fail;
        PyObject *lenobj = PyTuple_Check(shape) && PyTuple_GET_SIZE(shape) == 1
                               ? (Py_INCREF(PyTuple_GET_ITEM(shape, 0)),
                                  PyTuple_GET_ITEM(shape, 0))
                               : PyObject_GetAttr(a, s_size_);
        Py_DECREF(shape);
        if (lenobj == NULL)
            goto fail;
        ok = as_u64(lenobj, &len);
        Py_DECREF(lenobj);
        if (!ok)
            goto fail;
        memcpy(store[2 * i], &pv, sizeof pv);
        memcpy(store[2 * i + 1], &len, sizeof len);
        memset(store[2 * i] + 8, 0, SLOT - 8);
        memset(store[2 * i + 1] + 8, 0, SLOT - 8);
        params[2 * i] = store[2 * i];
        params[2 * i + 1] = store[2 * i + 1];
    }
    for (Py_ssize_t j = 0; j < ne; j++) {
        Py_ssize_t k = 2 * na + j;
        memset(store[k], 0, SLOT);
        if (!pack(PyTuple_GET_ITEM(extra, j), store[k], k))
            goto fail;
        params[k] = store[k];
    }
    params[n] = NULL;
    Py_DECREF(arrays);
    if (s == 0 || f == 0) /* after the checks, as the general path refuses in that order */
        return result(INVALID_HANDLE);
    CUresult r;
    Py_BEGIN_ALLOW_THREADS
    r = p_launch((CUfunction)(uintptr_t)f, (unsigned)dims[0], (unsigned)dims[1],
                 (unsigned)dims[2], (unsigned)dims[3], (unsigned)dims[4], (unsigned)dims[5],
                 (unsigned)dims[6], (CUstream)(uintptr_t)s, n ? params : NULL, NULL);
    Py_END_ALLOW_THREADS
    return result(r);
fail:
    Py_DECREF(arrays);
    return NULL;
}

/* ---------------------------------------------------------------- stream and event types
 *
 * Event and Stream: the hot methods of the CUDA backend's events and streams in C, the
 * base classes of _stream.NativeCudaEvent and NativeCudaStream (which add the rest in
 * Python). They do what the Python CudaEvent and CudaStream do, statement for statement;
 * those are used where the native calls are not (PRISM_GPU_NATIVE_DRIVER=0, no
 * compiler). bind(InvalidOperationError, current) gives them the error type and the
 * thread-local that says which device's context is current.
 */
#include <structmember.h>

static PyObject *InvalidOperation, *current_local;
static PyObject *s_ordinal, *s_current, *s_run_finishers, *s_refuse_closed, *s_host_info, *s_nbytes, *s_ptr, *s_copy_h2d_staged, *s_copy_d2h_staged, *s_launch,
    *s_name, *s_handle;
static PyObject *error_fn; /* _driver.error(CUresult, what) -> exception */

typedef struct {
    PyObject_HEAD
    unsigned long long h;
    PyObject *ev, *last, *finish, *err;
    char timing;
    PyObject *weakrefs;
} EventObject;

typedef struct {
    PyObject_HEAD
    unsigned long long live;
    PyObject *device, *pending, *dict;
    long ordinal;
    CUcontext ctx; /* the context of handle ctx_for, as the driver told it (or NULL) */
    unsigned long long ctx_for;
    char closed;
    PyObject *weakrefs;
} StreamObject;

static PyTypeObject EventType, StreamType;

static int
bound(void)
{
    if (InvalidOperation == NULL || !loaded()) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "_native.bind() was not called");
        return 0;
    }
    return 1;
}

/* --- events */

static int
event_init(EventObject *self, PyObject *args, PyObject *kwds)
{
    PyObject *ev;
    int timing = 0;
    static char *kwlist[] = {"ev", "timing", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Op:Event", kwlist, &ev, &timing))
        return -1;
    PyObject *h = PyObject_GetAttr(ev, s_handle);
    if (h == NULL)
        return -1;
    PyObject *hi = PyNumber_Long(h);
    Py_DECREF(h);
    if (hi == NULL)
        return -1;
    int ok = as_u64(hi, &self->h);
    Py_DECREF(hi);
    if (!ok)
        return -1;
    Py_INCREF(ev);
    Py_XSETREF(self->ev, ev);
    self->timing = (char)timing;
    Py_INCREF(Py_None);
    Py_XSETREF(self->last, Py_None);
    Py_INCREF(Py_None);
    Py_XSETREF(self->finish, Py_None);
    Py_INCREF(Py_None);
    Py_XSETREF(self->err, Py_None);
    return 0;
}

static int
event_traverse(EventObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->ev);
    Py_VISIT(self->last);
    Py_VISIT(self->finish);
    Py_VISIT(self->err);
    return 0;
}

static int
event_clear(EventObject *self)
{
    Py_CLEAR(self->ev);
    Py_CLEAR(self->last);
    Py_CLEAR(self->finish);
    Py_CLEAR(self->err);
    return 0;
}

static void
event_dealloc(EventObject *self)
{
    PyObject_GC_UnTrack(self);
    if (self->weakrefs != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    event_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
run_finishers(EventObject *self)
{
    PyObject *r = PyObject_CallMethodNoArgs((PyObject *)self, s_run_finishers);
    Py_XDECREF(r);
    return r != NULL;
}

static PyObject *
event_query(EventObject *self, PyObject *unused)
{
    if (!bound())
        return NULL;
    CUresult r = self->h ? p_query((CUevent)(uintptr_t)self->h) : INVALID_HANDLE;
    int done;
    if (r == 0)
        done = 1;
    else if (r == 600) /* CUDA_ERROR_NOT_READY */
        done = 0;
    else if (!self->h) {
        PyErr_SetString(InvalidOperation, "querying a closed event");
        return NULL;
    }
    else { /* a sticky error: a fault of earlier work */
        PyObject *exc = PyObject_CallFunction(error_fn, "is", (int)r, "querying an event");
        if (exc != NULL) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
        return NULL;
    }
    if (done && self->finish != NULL && self->finish != Py_None && !run_finishers(self))
        return NULL;
    return PyBool_FromLong(done);
}

static PyObject *
event_error(EventObject *self, PyObject *unused)
{
    if (self->finish != NULL && self->finish != Py_None && !run_finishers(self))
        return NULL;
    PyObject *e = self->err ? self->err : Py_None;
    Py_INCREF(e);
    return e;
}

static PyTypeObject EventType;

/* elapsed_ms(start): milliseconds from timing event ``start`` to this one, both complete
 * (_EventCommon.elapsed_ms, which reads them through cuda.core) */
static PyObject *
event_elapsed_ms(EventObject *self, PyObject *start)
{
    if (!bound())
        return NULL;
    if (!PyObject_TypeCheck(start, &EventType)) {
        PyErr_SetString(PyExc_TypeError, "elapsed_ms() takes the start event");
        return NULL;
    }
    unsigned long long s = ((EventObject *)start)->h;
    if (!self->h || !s) {
        PyErr_SetString(InvalidOperation, "reading the times of a closed event");
        return NULL;
    }
    if (p_elapsed == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the CUDA driver library has no cuEventElapsedTime");
        return NULL;
    }
    float ms = 0;
    CUresult r = p_elapsed(&ms, (CUevent)(uintptr_t)s, (CUevent)(uintptr_t)self->h);
    if (r) {
        PyObject *exc = PyObject_CallFunction(error_fn, "is", (int)r, "reading event times");
        if (exc != NULL) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
        return NULL;
    }
    return PyFloat_FromDouble(ms);
}

static PyMemberDef event_members[] = {
    {"_h", T_ULONGLONG, offsetof(EventObject, h), 0, NULL},
    {"_ev", T_OBJECT, offsetof(EventObject, ev), 0, NULL},
    {"_last", T_OBJECT, offsetof(EventObject, last), 0, NULL},
    {"_finish", T_OBJECT, offsetof(EventObject, finish), 0, NULL},
    {"_err", T_OBJECT, offsetof(EventObject, err), 0, NULL},
    {"timing", T_BOOL, offsetof(EventObject, timing), 0, NULL},
    {NULL},
};

static PyMethodDef event_methods[] = {
    {"query", (PyCFunction)event_query, METH_NOARGS, "True once the record is complete."},
    {"error", (PyCFunction)event_error, METH_NOARGS,
     "What the record's host work raised (called once it is known complete)."},
    {"elapsed_ms", (PyCFunction)event_elapsed_ms, METH_O,
     "Milliseconds from timing event start to this one (both complete)."},
    {NULL},
};

static PyTypeObject EventType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "prism_gpu.backends.cuda._native.Event",
    .tp_doc = "A CUDA event's hot methods (the base of NativeCudaEvent).",
    .tp_basicsize = sizeof(EventObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)event_init,
    .tp_dealloc = (destructor)event_dealloc,
    .tp_traverse = (traverseproc)event_traverse,
    .tp_clear = (inquiry)event_clear,
    .tp_weaklistoffset = offsetof(EventObject, weakrefs),
    .tp_members = event_members,
    .tp_methods = event_methods,
};

/* --- streams */

static int
stream_init(StreamObject *self, PyObject *args, PyObject *kwds)
{
    PyObject *device, *handle;
    static char *kwlist[] = {"device", "handle", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:Stream", kwlist, &device, &handle))
        return -1;
    if (!as_u64(handle, &self->live))
        return -1;
    self->ctx = NULL; /* (asked on the first call) */
    self->ctx_for = 0;
    PyObject *o = PyObject_GetAttr(device, s_ordinal);
    if (o == NULL)
        return -1;
    self->ordinal = PyLong_AsLong(o);
    Py_DECREF(o);
    if (self->ordinal == -1 && PyErr_Occurred())
        return -1;
    Py_INCREF(device);
    Py_XSETREF(self->device, device);
    PyObject *pending = PyList_New(0);
    if (pending == NULL)
        return -1;
    Py_XSETREF(self->pending, pending);
    self->closed = 0;
    return 0;
}

static int
stream_traverse(StreamObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->device);
    Py_VISIT(self->pending);
    Py_VISIT(self->dict);
    return 0;
}

static int
stream_clear(StreamObject *self)
{
    Py_CLEAR(self->device);
    Py_CLEAR(self->pending);
    Py_CLEAR(self->dict);
    return 0;
}

static void
stream_dealloc(StreamObject *self)
{
    PyObject_GC_UnTrack(self);
    if (self->weakrefs != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    stream_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int current_by_device(StreamObject *self);

/* the stream's device, or an error for a stream never initialised */
static int
has_device(StreamObject *self)
{
    if (self->device == NULL || self->device == Py_None) {
        PyErr_SetString(InvalidOperation, "this stream was never set up");
        return 0;
    }
    return 1;
}

/* the stream's device's context current on this thread: where the driver says the
 * stream's own context (asked once) is current, at once; else as the Python side does
 * it, its thread-local cleared first where another context is current (set by other
 * code on this thread), so that the device makes its own current again. */
static int
ensure_current(StreamObject *self)
{
    if (!has_device(self))
        return 0;
    unsigned long long sh = self->live;
    if (sh != self->ctx_for && p_stream_ctx != NULL) { /* asked once per handle */
        /* (handles 1 and 2 name the default streams, whose context is the current one) */
        CUcontext mine = NULL;
        self->ctx = sh > 2 && p_stream_ctx((CUstream)(uintptr_t)sh, &mine) == 0 ? mine
                                                                                 : NULL;
        self->ctx_for = sh;
    }
    if (self->ctx != NULL) {
        CUcontext cur = NULL;
        CUresult r = p_ctx_current(&cur);
        if (r == 0 && cur == self->ctx) /* the driver says it is current: nothing to ask */
            return 1;
        /* another context (or none) is current, made so by other code (a library, a
         * thread's own calls): the Python side's thread-local may still name this
         * stream's device; cleared, its device makes its context current again */
        if (r == 0 && PyObject_SetAttr(current_local, s_ordinal, Py_None) < 0)
            return 0;
    }
    return current_by_device(self);
}

/* the Python side's check: its thread-local says which device's context it made
 * current on this thread; device._current() if not this stream's */
static int
current_by_device(StreamObject *self)
{
    PyObject *o = PyObject_GetAttr(current_local, s_ordinal);
    if (o == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return 0;
        PyErr_Clear();
    }
    else {
        int same = PyLong_CheckExact(o) && PyLong_AsLong(o) == self->ordinal;
        Py_DECREF(o);
        if (same)
            return 1;
        PyErr_Clear();
    }
    PyObject *r = PyObject_CallMethodNoArgs(self->device, s_current);
    Py_XDECREF(r);
    return r != NULL;
}

/* raise InvalidOperationError(f"{what} on a closed stream"), through the Python method */
static PyObject *
refuse_closed(StreamObject *self, PyObject *what)
{
    if (what == NULL)
        return NULL;
    PyObject *r = PyObject_CallMethodOneArg((PyObject *)self, s_refuse_closed, what);
    Py_DECREF(what);
    Py_XDECREF(r);
    if (r != NULL && !PyErr_Occurred())
        PyErr_SetString(InvalidOperation, "the stream is closed");
    return NULL;
}

/* raise self.error_of(err, what) */
static PyObject *
raise_error_of(StreamObject *self, CUresult err, const char *what)
{
    PyObject *exc = PyObject_CallMethod((PyObject *)self, "error_of", "is", (int)err, what);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static EventObject *
as_event(PyObject *o)
{
    if (!PyObject_TypeCheck(o, &EventType)) {
        PyErr_Format(PyExc_TypeError, "expected a native CUDA event, got %.100s",
                     Py_TYPE(o)->tp_name);
        return NULL;
    }
    return (EventObject *)o;
}

/* one keyword-only bool of a FASTCALL method with one positional argument */
static int
one_flag(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, const char *usage,
         const char *flag, int *value)
{
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, usage);
        return 0;
    }
    if (kwnames != NULL) {
        for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(kwnames); k++) {
            if (PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, k), flag) != 0) {
                PyErr_SetString(PyExc_TypeError, usage);
                return 0;
            }
            int v = PyObject_IsTrue(args[1 + k]);
            if (v < 0)
                return 0;
            *value = v;
        }
    }
    return 1;
}

static PyObject *
stream_record(StreamObject *self, PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames)
{
    int stamp = 0;
    if (!one_flag(args, PyVectorcall_NARGS(nargsf), kwnames, "record(event, *, stamp=False)",
                  "stamp", &stamp) || !bound())
        return NULL;
    if (self->closed)
        return refuse_closed(self, PyUnicode_FromString("recording an event"));
    EventObject *ev = as_event(args[0]);
    if (ev == NULL)
        return NULL;
    if (!ev->h) { /* cuda.core would record a new event instead, and succeed */
        PyErr_SetString(InvalidOperation, "recording a closed event");
        return NULL;
    }
    if (!ensure_current(self))
        return NULL;
    CUresult r;
    /* read with the interpreter lock held: another thread may close them meanwhile */
    unsigned long long eh = ev->h, sh = self->live;
    if (sh == 0)
        r = INVALID_HANDLE;
    else {
        Py_BEGIN_ALLOW_THREADS
        r = p_record((CUevent)(uintptr_t)eh, (CUstream)(uintptr_t)sh);
        Py_END_ALLOW_THREADS
    }
    if (r)
        return raise_error_of(self, r, "recording an event");
    Py_INCREF(self);
    Py_XSETREF(ev->last, (PyObject *)self);
    Py_INCREF(Py_None);
    Py_XSETREF(ev->err, Py_None);
    if (!stamp && self->pending != NULL && PyList_Check(self->pending) &&
        PyList_GET_SIZE(self->pending)) {
        PyObject *fresh = PyList_New(0);
        if (fresh == NULL)
            return NULL;
        /* the old host work is released last: its release may run Python code */
        PyObject *old = ev->finish;
        ev->finish = self->pending;
        self->pending = fresh;
        Py_XDECREF(old);
    }
    Py_RETURN_NONE;
}

static PyObject *
stream_wait(StreamObject *self, PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames)
{
    int propagate = 1;
    if (!one_flag(args, PyVectorcall_NARGS(nargsf), kwnames,
                  "wait(event, *, propagate=True)", "propagate", &propagate) || !bound())
        return NULL;
    if (self->closed)
        return refuse_closed(self, PyUnicode_FromString("stream wait on an event"));
    EventObject *ev = as_event(args[0]);
    if (ev == NULL)
        return NULL;
    if (!ev->h) {
        PyErr_SetString(InvalidOperation, "stream wait on a closed event");
        return NULL;
    }
    if (!ensure_current(self))
        return NULL;
    if (ev->last == (PyObject *)self) /* stream order already puts this after that record */
        Py_RETURN_NONE;
    CUresult r;
    unsigned long long eh = ev->h, sh = self->live; /* read with the lock held */
    if (sh == 0)
        r = INVALID_HANDLE;
    else {
        Py_BEGIN_ALLOW_THREADS
        r = p_wait((CUstream)(uintptr_t)sh, (CUevent)(uintptr_t)eh, 0);
        Py_END_ALLOW_THREADS
    }
    if (r)
        return raise_error_of(self, r, "stream wait on an event");
    Py_RETURN_NONE;
}

static int
attr_u64(PyObject *o, PyObject *name, unsigned long long *out)
{
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL)
        return 0;
    int ok = as_u64(v, out);
    Py_DECREF(v);
    return ok;
}

/* (address, pinned) of host arrays, as the device's host_info gives them, kept by
 * identity (a weak reference tells a dead array's reused address) until a registration
 * of host memory changes; a few entries, by hashed address: a loop cycles through few
 * arrays.
 * The Python backend keeps the same in PinnedAllocator.host_info. */
#define HOST_CACHE 128 /* in pairs: an array may stand in either entry of its pair */
static PyObject *host_ranges; /* the registered ranges: their .state[1] is a generation */
static struct {
    PyObject *ref;
    unsigned long long ptr;
    long long generation;
    int pinned;
} host_cache[HOST_CACHE];

/* the registrations' generation: >= 0, -1 without the cache, -2 on error */
static long long
host_generation(void)
{
    if (host_ranges == NULL)
        return -1;
    PyObject *state = PyObject_GetAttrString(host_ranges, "state");
    if (state == NULL)
        return -2;
    long long g = -1;
    if (PyTuple_Check(state) && PyTuple_GET_SIZE(state) == 2) {
        g = PyLong_AsLongLong(PyTuple_GET_ITEM(state, 1));
        if (g == -1 && PyErr_Occurred())
            g = -2;
    }
    Py_DECREF(state);
    return g;
}

/* the first entry of ``host``'s pair */
static size_t
host_slot(PyObject *host)
{
    unsigned long long h = (unsigned long long)(uintptr_t)host * 0x9E3779B97F4A7C15ull;
    return (size_t)(h >> 40) % HOST_CACHE & ~(size_t)1;
}

/* the object entry ``k`` refers to (compared by identity only; None if dead or empty) */
static PyObject *
host_referent(size_t k)
{
    PyObject *ref = host_cache[k].ref;
    if (ref == NULL)
        return Py_None;
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *o;
    if (PyWeakref_GetRef(ref, &o) < 0) {
        PyErr_Clear();
        return Py_None;
    }
    Py_XDECREF(o);
    return o ? o : Py_None;
#else
    return PyWeakref_GET_OBJECT(ref);
#endif
}

/* 1 and (ptr, pinned) if ``host`` is known at ``generation``, else 0 */
static int
host_cached(PyObject *host, long long generation, unsigned long long *ptr, int *pinned)
{
    if (generation < 0)
        return 0;
    size_t pair = host_slot(host);
    for (size_t k = pair; k < pair + 2; k++)
        if (host_cache[k].generation == generation && host_referent(k) == host) {
            *ptr = host_cache[k].ptr;
            *pinned = host_cache[k].pinned;
            return 1;
        }
    return 0;
}

static void
host_remember(PyObject *host, long long generation, unsigned long long ptr, int pinned)
{
    if (generation < 0)
        return;
    PyObject *ref = PyWeakref_NewRef(host, NULL);
    if (ref == NULL) { /* an object without weak references: not kept */
        PyErr_Clear();
        return;
    }
    size_t k = host_slot(host); /* the pair's first entry, unless it holds a live array */
    if (host_referent(k) != Py_None && host_referent(k + 1) == Py_None)
        k++;
    PyObject *old = host_cache[k].ref;
    host_cache[k].ref = ref;
    host_cache[k].ptr = ptr;
    host_cache[k].generation = generation;
    host_cache[k].pinned = pinned;
    Py_XDECREF(old);
}

/* a copy between host array ``host`` and device array ``dev``: pinned memory is copied
 * here, pageable memory through the Python method ``staged`` (a pinned staging buffer) */
static PyObject *
stream_copy(StreamObject *self, PyObject *const *args, Py_ssize_t nargs, int h2d)
{
    const char *what = h2d ? "host-to-device copy" : "device-to-host copy";
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, h2d ? "copy_h2d(dst, src)" : "copy_d2h(dst, src)");
        return NULL;
    }
    if (!bound())
        return NULL;
    if (self->closed)
        return refuse_closed(self, PyUnicode_FromString(what));
    if (!ensure_current(self))
        return NULL;
    PyObject *host = h2d ? args[1] : args[0], *dev = h2d ? args[0] : args[1];
    PyObject *nbytes = PyObject_GetAttr(host, s_nbytes);
    if (nbytes == NULL)
        return NULL;
    unsigned long long n, hptr = 0, dptr;
    PyObject *info = NULL;
    if (!as_u64(nbytes, &n))
        goto fail;
    if (!has_device(self))
        goto fail;
    long long generation = host_generation(); /* before the answer: a change meanwhile misses */
    if (generation == -2)
        goto fail;
    int pinned;
    if (!host_cached(host, generation, &hptr, &pinned)) {
        info = PyObject_CallMethodOneArg(self->device, s_host_info, host);
        if (info == NULL)
            goto fail;
        if (!PyTuple_Check(info) || PyTuple_GET_SIZE(info) != 2) {
            PyErr_SetString(PyExc_TypeError, "host_info() must give (address, pinned)");
            goto fail;
        }
        pinned = PyObject_IsTrue(PyTuple_GET_ITEM(info, 1));
        if (pinned < 0 || (pinned && !as_u64(PyTuple_GET_ITEM(info, 0), &hptr)))
            goto fail;
        host_remember(host, generation, pinned ? hptr : 0, pinned);
    }
    if (!pinned) {
        /* never hand pageable memory to an async copy: stage it */
        PyObject *r = PyObject_CallMethodObjArgs((PyObject *)self,
                                                 h2d ? s_copy_h2d_staged : s_copy_d2h_staged,
                                                 args[0], args[1], nbytes, NULL);
        Py_XDECREF(info);
        Py_DECREF(nbytes);
        return r;
    }
    if (!attr_u64(dev, s_ptr, &dptr))
        goto fail;
    CUresult r;
    unsigned long long sh = self->live; /* read with the lock held */
    if (sh == 0)
        r = INVALID_HANDLE;
    else {
        Py_BEGIN_ALLOW_THREADS
        r = p_memcpy((CUdeviceptr)(h2d ? dptr : hptr), (CUdeviceptr)(h2d ? hptr : dptr),
                     (size_t)n, (CUstream)(uintptr_t)sh);
        Py_END_ALLOW_THREADS
    }
    Py_XDECREF(info);
    Py_DECREF(nbytes);
    if (r)
        return raise_error_of(self, r, what);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(info);
    Py_DECREF(nbytes);
    return NULL;
}

static PyObject *
stream_copy_h2d(StreamObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return stream_copy(self, args, nargs, 1);
}

static PyObject *
stream_copy_d2h(StreamObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return stream_copy(self, args, nargs, 0);
}

/* SourceKernel (the CUDA backend's compiled kernels), once bound: its launch's common case
 * is done here, the first branch of SourceKernel.launch statement for statement, from the
 * caches that method keeps (the configuration's dimensions, the extra values converted,
 * the array layout); any miss goes to the method, which fills them. */
static PyObject *source_kernel, *s_func_, *s_conv_, *s_layouts_, *s_configs_, *s_ext_,
    *s_pointee_, *s_error_of;
static Py_ssize_t max_native_args;

/* an attribute of kernel ``k`` (NULL, no error, if absent) */
static PyObject *
kattr(PyObject *k, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(k, name);
    if (v == NULL && PyErr_ExceptionMatches(PyExc_AttributeError))
        PyErr_Clear();
    return v;
}

/* the launch's driver refusal (err > 0) raised as the method raises it: -1 */
static int
refused_launch(StreamObject *self, PyObject *k, long err)
{
    PyObject *name = PyObject_GetAttr(k, s_name);
    PyObject *what = name ? PyUnicode_FromFormat("launching kernel %R", name) : NULL;
    Py_XDECREF(name);
    PyObject *code = what ? PyLong_FromLong(err) : NULL;
    PyObject *exc = code ? PyObject_CallMethodObjArgs((PyObject *)self, s_error_of, code, what,
                                                      NULL)
                         : NULL;
    Py_XDECREF(what);
    Py_XDECREF(code);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return -1;
}

/* the cached dimensions of ``config`` for kernel ``k`` (a new reference), or NULL (no
 * error set: not cached) */
static PyObject *
cached_dims(PyObject *k, PyObject *config)
{
    PyObject *configs = kattr(k, s_configs_);
    PyObject *key = configs ? PyLong_FromVoidPtr(config) : NULL; /* id(config) */
    PyObject *cfg = NULL;
    if (key != NULL && PyDict_CheckExact(configs)) {
        PyObject *hit = PyDict_GetItemWithError(configs, key);
        if (hit != NULL && PyTuple_CheckExact(hit) && PyTuple_GET_SIZE(hit) == 2 &&
            PyTuple_GET_ITEM(hit, 0) == config)
            cfg = Py_NewRef(PyTuple_GET_ITEM(hit, 1));
    }
    Py_XDECREF(configs);
    Py_XDECREF(key);
    return cfg;
}

/* A launch with no arrays and no extra values: the method's general branch with no
 * arguments (the native call, cached dimensions); 1, 0 or -1 as source_launch */
static int
bare_launch(StreamObject *self, PyObject *k, PyObject *config)
{
    PyObject *func = kattr(k, s_func_);
    int ok = func != NULL && PyLong_Check(func) ? PyObject_IsTrue(func) : 0;
    if (ok > 0) { /* a kernel whose signature has parameters: the method refuses it */
        PyObject *conv = kattr(k, s_conv_);
        Py_ssize_t nconv = conv == NULL || conv == Py_None ? 0 : PyObject_Size(conv);
        Py_XDECREF(conv);
        if (nconv != 0)
            ok = nconv < 0 ? -1 : 0;
    }
    PyObject *cfg = ok > 0 ? cached_dims(k, config) : NULL;
    if (cfg == NULL || !PyTuple_CheckExact(cfg) || PyTuple_GET_SIZE(cfg) != 7) {
        Py_XDECREF(func);
        Py_XDECREF(cfg);
        return PyErr_Occurred() ? -1 : 0;
    }
    PyObject *handle = PyLong_FromUnsignedLongLong(self->live);
    PyObject *none = PyTuple_New(0);
    PyObject *r = NULL;
    if (handle != NULL && none != NULL) {
        PyObject *call[10] = {func, NULL, NULL, NULL, NULL, NULL, NULL, NULL, handle, none};
        for (int i = 0; i < 7; i++)
            call[1 + i] = PyTuple_GET_ITEM(cfg, i);
        r = n_launch(NULL, call, 10);
    }
    Py_XDECREF(handle);
    Py_XDECREF(none);
    Py_DECREF(cfg);
    Py_DECREF(func);
    if (r == NULL) { /* refused before the driver: the method says so as it does */
        if (PyErr_ExceptionMatches(PyExc_TypeError) ||
            PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            return 0;
        }
        return -1;
    }
    long err = PyLong_AsLong(r);
    Py_DECREF(r);
    if (err == -1 && PyErr_Occurred())
        return -1;
    return err ? refused_launch(self, k, err) : 1;
}

/* 1 launched, 0 not (the method must), -1 error (raised; nothing launched unless the
 * driver refused the launch) */
static int
source_launch(StreamObject *self, PyObject *k, PyObject *config, PyObject *arrays,
              PyObject *extra)
{
    if (!PyList_CheckExact(arrays) && !PyTuple_CheckExact(arrays))
        return 0;
    if (!PyTuple_CheckExact(extra))
        return 0;
    Py_ssize_t na = PySequence_Size(arrays), ne = PyTuple_GET_SIZE(extra);
    if (na < 0)
        return -1;
    if (na == 0 && ne == 0)
        return bare_launch(self, k, config);
    if (na == 0)
        return 0;
    int done = 0;
    PyObject *func = NULL, *conv = NULL, *layouts = NULL, *configs = NULL, *ext = NULL,
             *pointee = NULL, *nakey = NULL;
    func = kattr(k, s_func_);
    conv = func ? kattr(k, s_conv_) : NULL;
    if (conv == NULL || !PyLong_Check(func) || conv == Py_None)
        goto out;
    Py_ssize_t nconv = PyObject_Size(conv);
    if (nconv < 0) {
        done = -1;
        goto out;
    }
    int truthy_func = PyObject_IsTrue(func);
    if (truthy_func <= 0 || 2 * na + ne != nconv || nconv > max_native_args) {
        done = truthy_func < 0 ? -1 : 0;
        goto out;
    }
    layouts = kattr(k, s_layouts_);
    nakey = PyLong_FromSsize_t(na);
    if (layouts == NULL || nakey == NULL || !PyDict_CheckExact(layouts))
        goto out;
    if (PyDict_GetItemWithError(layouts, nakey) != Py_True) /* unknown yet, or not fast */
        goto out;
    configs = cached_dims(k, config); /* (held here as the dimensions) */
    if (configs == NULL)
        goto out;
    PyObject *cfg = configs;
    ext = kattr(k, s_ext_);
    if (ext == NULL || !PyTuple_CheckExact(ext) || PyTuple_GET_SIZE(ext) != 3 ||
        PyTuple_GET_ITEM(ext, 0) != extra)
        goto out;
    int same_na = PyObject_RichCompareBool(PyTuple_GET_ITEM(ext, 1), nakey, Py_EQ);
    if (same_na <= 0) {
        done = same_na < 0 ? -1 : 0;
        goto out;
    }
    pointee = kattr(k, s_pointee_);
    if (pointee == NULL)
        goto out;
    {
        PyObject *handle = PyLong_FromUnsignedLongLong(self->live);
        if (handle == NULL) {
            done = -1;
            goto out;
        }
        Py_INCREF(cfg);
        PyObject *vals = Py_NewRef(PyTuple_GET_ITEM(ext, 2));
        PyObject *call[6] = {func, cfg, handle, arrays, pointee, vals};
        PyObject *r = n_launch_arrays(NULL, call, 6);
        Py_DECREF(handle);
        Py_DECREF(cfg);
        Py_DECREF(vals);
        if (r == NULL) { /* refused before the driver: the method says so as it does */
            if (PyErr_ExceptionMatches(PyExc_TypeError) ||
                PyErr_ExceptionMatches(PyExc_OverflowError))
                PyErr_Clear();
            else
                done = -1;
            goto out;
        }
        long err = PyLong_AsLong(r);
        Py_DECREF(r);
        if (err == -1 && PyErr_Occurred()) {
            done = -1;
            goto out;
        }
        if (err == 0)
            done = 1;
        else if (err > 0) /* the driver refused the launch: raised as the method does */
            done = refused_launch(self, k, err);
        /* err < 0: a dtype refused or an array without a pointer, before the driver: the
         * method says so, or takes its general path */
    }
out:
    Py_XDECREF(func);
    Py_XDECREF(conv);
    Py_XDECREF(layouts);
    Py_XDECREF(configs);
    Py_XDECREF(ext);
    Py_XDECREF(pointee);
    Py_XDECREF(nakey);
    if (done == 0 && PyErr_Occurred())
        done = -1;
    return done;
}

static PyObject *
stream_launch(StreamObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "launch(kernel, config, arrays, extra)");
        return NULL;
    }
    if (!bound())
        return NULL;
    if (self->closed) { /* a callable would run CuPy or PyTorch on the freed stream */
        PyObject *name = PyObject_GetAttr(args[0], s_name);
        if (name == NULL)
            return NULL;
        PyObject *what = PyUnicode_FromFormat("launching kernel %R", name);
        Py_DECREF(name);
        return refuse_closed(self, what);
    }
    if (!ensure_current(self))
        return NULL;
    if (source_kernel != NULL && (PyObject *)Py_TYPE(args[0]) == source_kernel) {
        int done = source_launch(self, args[0], args[1], args[2], args[3]);
        if (done < 0)
            return NULL;
        if (done)
            Py_RETURN_NONE;
    }
    PyObject *call[5] = {args[0], (PyObject *)self, args[1], args[2], args[3]};
    return PyObject_VectorcallMethod(s_launch, call, 5 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

static PyMemberDef stream_members[] = {
    {"live_handle", T_ULONGLONG, offsetof(StreamObject, live), 0,
     "The handle work is queued on: 0 once closed (refused then)."},
    {"_device", T_OBJECT, offsetof(StreamObject, device), 0, NULL},
    {"_pending", T_OBJECT, offsetof(StreamObject, pending), 0, NULL},
    {"_closed", T_BOOL, offsetof(StreamObject, closed), 0, NULL},
    {NULL},
};

static PyMethodDef stream_methods[] = {
    {"record", (PyCFunction)(void (*)(void))stream_record, METH_FASTCALL | METH_KEYWORDS,
     "record(event, *, stamp=False)"},
    {"wait", (PyCFunction)(void (*)(void))stream_wait, METH_FASTCALL | METH_KEYWORDS,
     "wait(event, *, propagate=True)"},
    {"copy_h2d", (PyCFunction)(void (*)(void))stream_copy_h2d, METH_FASTCALL,
     "copy_h2d(dst, src)"},
    {"copy_d2h", (PyCFunction)(void (*)(void))stream_copy_d2h, METH_FASTCALL,
     "copy_d2h(dst, src)"},
    {"launch", (PyCFunction)(void (*)(void))stream_launch, METH_FASTCALL,
     "launch(kernel, config, arrays, extra)"},
    {NULL},
};

static PyGetSetDef stream_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL},
};

static PyTypeObject StreamType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "prism_gpu.backends.cuda._native.Stream",
    .tp_doc = "A CUDA stream's hot methods (the base of NativeCudaStream).",
    .tp_basicsize = sizeof(StreamObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)stream_init,
    .tp_dealloc = (destructor)stream_dealloc,
    .tp_traverse = (traverseproc)stream_traverse,
    .tp_clear = (inquiry)stream_clear,
    .tp_dictoffset = offsetof(StreamObject, dict),
    .tp_weaklistoffset = offsetof(StreamObject, weakrefs),
    .tp_members = stream_members,
    .tp_methods = stream_methods,
    .tp_getset = stream_getset,
};

static PyObject *
bind(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 && nargs != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "bind(InvalidOperationError, current, error, registered=None)");
        return NULL;
    }
    for (int i = 0; i < 3; i++)
        Py_INCREF(args[i]);
    Py_XSETREF(InvalidOperation, args[0]);
    Py_XSETREF(current_local, args[1]);
    Py_XSETREF(error_fn, args[2]);
    /* the registered host ranges turn the host_info cache on (None: off) */
    Py_XSETREF(host_ranges, nargs == 4 && args[3] != Py_None ? Py_NewRef(args[3]) : NULL);
    for (int i = 0; i < HOST_CACHE; i++)
        Py_CLEAR(host_cache[i].ref);
    Py_RETURN_NONE;
}

static PyObject *
bind_kernel(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyType_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "bind_kernel(SourceKernel, max_args)");
        return NULL;
    }
    Py_ssize_t m = PyNumber_AsSsize_t(args[1], PyExc_OverflowError);
    if (m == -1 && PyErr_Occurred())
        return NULL;
    Py_XSETREF(source_kernel, Py_NewRef(args[0]));
    max_native_args = m;
    Py_RETURN_NONE;
}

static int
intern_names(void)
{
    struct {
        PyObject **slot;
        const char *text;
    } names[] = {
        {&s_ordinal, "ordinal"}, {&s_current, "_current"},
        {&s_run_finishers, "_run_finishers"}, {&s_refuse_closed, "_refuse_closed"},
        {&s_host_info, "host_info"}, {&s_nbytes, "nbytes"},
        {&s_ptr, "ptr"}, {&s_copy_h2d_staged, "_copy_h2d_staged"},
        {&s_copy_d2h_staged, "_copy_d2h_staged"}, {&s_launch, "launch"}, {&s_name, "name"},
        {&s_handle, "handle"}, {&s_func_, "_func"}, {&s_conv_, "_conv"},
        {&s_layouts_, "_layouts"}, {&s_configs_, "_configs"}, {&s_ext_, "_ext"},
        {&s_pointee_, "_pointee"}, {&s_error_of, "error_of"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        *names[i].slot = PyUnicode_InternFromString(names[i].text);
        if (*names[i].slot == NULL)
            return 0;
    }
    return 1;
}

/* the calling thread's current context as an int (0: none), or None where the driver
 * cannot tell (load() not called, or no such entry point) */
static PyObject *
current_context(PyObject *self, PyObject *unused)
{
    CUcontext cur = NULL;
    if (p_ctx_current == NULL || p_launch == NULL || p_ctx_current(&cur) != 0)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong((unsigned long long)(uintptr_t)cur);
}

static PyMethodDef methods[] = {
    {"load", (PyCFunction)load, METH_O,
     "load(scalar_types): find the driver functions; None, or why they are absent."},
    {"current_context", (PyCFunction)current_context, METH_NOARGS,
     "current_context() -> the thread's current context (an int, 0 for none), or None."},
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
    {"launch_arrays", (PyCFunction)(void (*)(void))n_launch_arrays, METH_FASTCALL,
     "launch_arrays(function, dims, stream, arrays, pointees, extra) -> CUresult (or a "
     "negative code: see the source)."},
    {"bind", (PyCFunction)(void (*)(void))bind, METH_FASTCALL,
     "bind(InvalidOperationError, current, error, registered=None): what the Event and "
     "Stream types raise, the thread-local of the current device, and the registered host "
     "ranges (their generation keeps the copies' host_info answers; None: not kept)."},
    {"bind_kernel", (PyCFunction)(void (*)(void))bind_kernel, METH_FASTCALL,
     "bind_kernel(SourceKernel, max_args): launches of that exact type take their common "
     "case here, from the caches its launch method keeps."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "The CUDA driver calls of the hot path, from C.", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    if (!intern_names() || PyType_Ready(&EventType) < 0 || PyType_Ready(&StreamType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&EventType);
    Py_INCREF(&StreamType);
    if (PyModule_AddObject(m, "Event", (PyObject *)&EventType) < 0 ||
        PyModule_AddObject(m, "Stream", (PyObject *)&StreamType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
