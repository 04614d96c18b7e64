/* The engine's hot path compiled: the op record, submission and completion.
 *
 * _core.py holds the same code in Python, the reference: this module does exactly
 * what it does, statement for statement, and the test suite runs against both
 * (PRISM_GPU_COMPILED=0 selects the Python one). Backends stay Python objects:
 * their streams and events are called through their methods, as from Python.
 *
 * setup(helpers)  give the Python functions and modules the rare paths call (a dict:
 *                 root_of, dependency_error, own_error, refuse_in_callback, KERNEL,
 *                 PrismGpuError, trace, nvtx); once, before an engine is made
 * Op(op_type, lane, name)           an op in flight (the fields of _core.Op)
 * EngineCore                        a base class: submit, _complete, _harvest_lane,
 *                                   harvest; its fields are set by the subclass
 */
#include "_ccore.h"
#include <structmember.h>

#define H2D 0
#define D2H 1
#define LAUNCH 2

static PyObject *root_of, *dependency_error, *own_error, *refuse_in_callback, *KERNEL,
    *PrismGpuError, *trace_mod, *nvtx_mod;
static PyObject *s_stream, *s_event, *s_error, *s_ops, *s_wait, *s_record, *s_launch,
    *s_copy_h2d, *s_copy_d2h, *s_query, *s_popleft, *s_append, *s_throttle, *s_next,
    *s_create_event, *s_ACTIVE, *s_STATE, *s_index, *s_nbytes, *s_begin, *s_ON,
    *s_range_start, *s_range_end, *s_name, *s_value, *s_drop_start, *s_note_root,
    *s_attribute, *s_elapsed_ms, *s_complete, *s_Trace, *s_HELD_EVENTS,
    *s_read_times, *s_lane, *s_harvest, *s_get, *s_synchronize, *s_timing, *s_close;
static PyObject *kw_propagate, *kw_stamp, *kw_oid, *kw_force;

/* ---------------------------------------------------------------- the op record */

typedef struct { /* (object fields side by side: FIELD_RUN) */
    PyObject_HEAD
    PyObject *id, *type, *lane, *event, *start, *end, *name, *error, *keep, *on_done, *deps,
        *trace;
} OpObject;

static PyTypeObject OpType;

static PyObject *minus_one, *one, *empty_tuple;

/* dict.pop(key, None), the value dropped: 0, or -1 on error */
static int
dict_discard(PyObject *dict, PyObject *key)
{
    if (!PyDict_Check(dict)) {
        PyErr_SetString(PyExc_TypeError, "the engine's inflight must be a dict");
        return -1;
    }
    if (PyDict_DelItem(dict, key) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_KeyError))
            return -1;
        PyErr_Clear();
    }
    return 0;
}

static PyObject *
op_make(PyObject *op_type, PyObject *lane, PyObject *name)
{
    OpObject *op = PyObject_GC_New(OpObject, &OpType);
    if (op == NULL)
        return NULL;
    Py_INCREF(minus_one);
    op->id = minus_one;
    Py_INCREF(op_type);
    op->type = op_type;
    Py_INCREF(lane);
    op->lane = lane;
    Py_INCREF(name);
    op->name = name;
    PyObject **rest[] = {&op->event, &op->start, &op->end, &op->error, &op->keep,
                         &op->on_done, &op->trace};
    for (size_t i = 0; i < sizeof rest / sizeof rest[0]; i++) {
        Py_INCREF(Py_None);
        *rest[i] = Py_None;
    }
    op->deps = NULL; /* set by the engine's submit, for every op */
    PyObject_GC_Track(op);
    return (PyObject *)op;
}

static PyObject *
op_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *op_type, *lane, *name;
    static char *kwlist[] = {"op_type", "lane", "name", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO:Op", kwlist, &op_type, &lane, &name))
        return NULL;
    return op_make(op_type, lane, name);
}

static int
op_traverse(OpObject *op, visitproc visit, void *arg)
{
    return visit_run(FIELD_RUN(op, id, trace), visit, arg);
}

static int
op_clear(OpObject *op)
{
    return clear_run(FIELD_RUN(op, id, trace));
}

static void
op_dealloc(OpObject *op)
{
    PyObject_GC_UnTrack(op);
    Py_TRASHCAN_BEGIN(op, op_dealloc)
    op_clear(op);
    PyObject_GC_Del(op);
    Py_TRASHCAN_END
}

static PyObject *
op_times_since(OpObject *op, PyObject *ref)
{
    if (op->start == NULL || op->end == NULL) {
        PyErr_SetString(PyExc_AttributeError, "this op has no start or end event");
        return NULL;
    }
    PyObject *a = PyObject_CallMethodOneArg(op->start, s_elapsed_ms, ref);
    if (a == NULL)
        return NULL;
    PyObject *b = PyObject_CallMethodOneArg(op->end, s_elapsed_ms, ref);
    if (b == NULL) {
        Py_DECREF(a);
        return NULL;
    }
    PyObject *t = PyTuple_Pack(2, a, b);
    Py_DECREF(a);
    Py_DECREF(b);
    return t;
}

#define OP_FIELD(name) \
    {#name, T_OBJECT_EX, offsetof(OpObject, name), 0, NULL}

static PyMemberDef op_members[] = {
    OP_FIELD(id), OP_FIELD(type), OP_FIELD(lane), OP_FIELD(event), OP_FIELD(start),
    OP_FIELD(end), OP_FIELD(name), OP_FIELD(error), OP_FIELD(keep), OP_FIELD(on_done),
    OP_FIELD(deps), OP_FIELD(trace), {NULL},
};

static PyMethodDef op_methods[] = {
    {"times_since", (PyCFunction)op_times_since, METH_O,
     "(start, end) in ms since timing event ref; only inside on_done of a timed op."},
    {NULL},
};

static PyTypeObject OpType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "prism_gpu._ccore.Op",
    .tp_doc = "An op in flight: its events, what it keeps alive, who to tell when it is done.",
    .tp_basicsize = sizeof(OpObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = op_new,
    .tp_dealloc = (destructor)op_dealloc,
    .tp_traverse = (traverseproc)op_traverse,
    .tp_clear = (inquiry)op_clear,
    .tp_members = op_members,
    .tp_methods = op_methods,
};

/* ---------------------------------------------------------------- helpers */

/* the exception being raised, taken (normalized, with its traceback) */
static PyObject *
take_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL) {
        PyException_SetTraceback(value, tb);
        Py_DECREF(tb);
    }
    Py_XDECREF(type);
    return value;
#endif
}

static void
restore_exception(PyObject *exc) /* steals exc */
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyObject *type = (PyObject *)Py_TYPE(exc);
    Py_INCREF(type);
    PyErr_Restore(type, exc, PyException_GetTraceback(exc));
#endif
}

/* raise exc again, after ``failed`` (a cleanup's exception, if any) chained to it */
static void
raise_after_cleanup(PyObject *exc, int cleanup_failed)
{
    if (!cleanup_failed) {
        restore_exception(exc);
        return;
    }
    PyObject *later = take_exception();
    PyException_SetContext(later, exc); /* steals exc */
    restore_exception(later);
}

static int
truthy(PyObject *o)
{
    if (o == Py_True)
        return 1;
    if (o == Py_False || o == Py_None)
        return 0;
    return PyObject_IsTrue(o);
}

static PyObject *
call_method1(PyObject *obj, PyObject *name, PyObject *arg)
{
    return PyObject_CallMethodOneArg(obj, name, arg);
}

/* obj.name(arg, <kw>=value) */
static PyObject *
call_method_kw(PyObject *obj, PyObject *name, PyObject *arg, PyObject *value, PyObject *kw)
{
    PyObject *args[3] = {obj, arg, value};
    return PyObject_VectorcallMethod(name, args, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, kw);
}

/* _optable.OpTable and EngineCallback, once the queue calls are set up (NULL before) */
static PyObject *q_table_type, *q_engine_callback;

/* an op table whose hot path is ours, unchanged (an OpTable of the compiled twins) */
static int
is_table(PyObject *o)
{
    return q_table_type != NULL && Py_TYPE(o) == (PyTypeObject *)q_table_type &&
           PyObject_TypeCheck(o, &TableType);
}

/* an op's field, by struct where it is one of ours */
static PyObject *
op_get(PyObject *op, size_t offset, PyObject *name)
{
    if (Py_TYPE(op) == &OpType) {
        PyObject *v = *(PyObject **)((char *)op + offset);
        if (v == NULL) {
            PyErr_Format(PyExc_AttributeError, "op has no attribute %U", name);
            return NULL;
        }
        Py_INCREF(v);
        return v;
    }
    return PyObject_GetAttr(op, name);
}

/* a list or tuple as it is; another iterable as a list (its errors are iteration's) */
static PyObject *
as_sequence(PyObject *o)
{
    if (PyList_Check(o) || PyTuple_Check(o)) {
        Py_INCREF(o);
        return o;
    }
    return PySequence_List(o);
}

static PyObject *
list_pop(PyObject *list)
{
    Py_ssize_t n = PyList_GET_SIZE(list);
    PyObject *v = PyList_GET_ITEM(list, n - 1);
    Py_INCREF(v);
    if (PyList_SetSlice(list, n - 1, n, NULL) < 0) {
        Py_DECREF(v);
        return NULL;
    }
    return v;
}

/* ---------------------------------------------------------------- the engine */

typedef struct { /* (object fields side by side, device to timing_obj: FIELD_RUN) */
    PyObject_HEAD
    PyObject *device, *table, *inflight, *lanes, *pool, *tpool, *in_callback, *tracer,
        *traced, *callback_errors;
    PyObject *max_in_flight; /* compared with the ops in flight (any number, as in Python) */
    PyObject *timing_obj; /* the default for whether ops are timed (any truthy value) */
    Py_ssize_t reclaim_at; /* ops in flight at which a submit short of events harvests */
    Py_ssize_t pool_cap;   /* events kept in each pool */
} EngineObject;

#define RECLAIM 64 /* _core.RECLAIM */

static PyObject *engine_complete(EngineObject *self, PyObject *op);
/* call sites' slot attributes (see slot_attr) */
static SlotAttr c_lane_ops, c_lane_stream;
static PyObject *give_event(EngineObject *self, PyObject *ev);

static int
engine_traverse(EngineObject *e, visitproc visit, void *arg)
{
    return visit_run(FIELD_RUN(e, device, timing_obj), visit, arg);
}

static int
engine_clear(EngineObject *e)
{
    return clear_run(FIELD_RUN(e, device, timing_obj));
}

static void
engine_dealloc(EngineObject *e)
{
    PyObject_GC_UnTrack(e);
    engine_clear(e);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyObject *
engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    EngineObject *e = (EngineObject *)type->tp_alloc(type, 0);
    if (e == NULL)
        return NULL;
    PyObject **fields[] = {&e->device, &e->table, &e->tracer, &e->traced};
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        Py_INCREF(Py_None);
        *fields[i] = Py_None;
    }
    Py_INCREF(Py_False);
    e->in_callback = Py_False;
    Py_INCREF(Py_False);
    e->timing_obj = Py_False;
    e->inflight = PyDict_New();
    e->lanes = PyList_New(0);
    e->pool = PyList_New(0);
    e->tpool = PyList_New(0);
    e->callback_errors = PyList_New(0);
    if (!e->inflight || !e->lanes || !e->pool || !e->tpool || !e->callback_errors) {
        Py_DECREF(e);
        return NULL;
    }
    e->reclaim_at = RECLAIM;
    e->pool_cap = 2 * 1024 + 64;
    e->max_in_flight = PyLong_FromLong(1024);
    if (e->max_in_flight == NULL) {
        Py_DECREF(e);
        return NULL;
    }
    return (PyObject *)e;
}

/* an engine field that must be set (deleted: AttributeError, as in Python) */
static int
need_field(PyObject *o, const char *what)
{
    if (o == NULL) {
        PyErr_Format(PyExc_AttributeError, "the engine has no attribute '%s'", what);
        return 0;
    }
    return 1;
}

/* a field that must hold a list (the pools, the callback errors) */
static int
need_list(PyObject *o, const char *what)
{
    if (o == NULL || !PyList_Check(o)) {
        PyErr_Format(PyExc_TypeError, "the engine's %s must be a list", what);
        return 0;
    }
    return 1;
}

/* 1 inside a callback or launch, 0 if not, -1 on error */
static int
in_callback(EngineObject *self)
{
    return self->in_callback == NULL ? 0 : truthy(self->in_callback);
}

/* 1 (raised) inside a callback or launch, as refuse_in_callback raises; 0 if not */
static int
refused_in_callback(EngineObject *self)
{
    int busy = in_callback(self);
    if (busy <= 0)
        return busy < 0;
    PyObject *r = PyObject_CallOneArg(refuse_in_callback, self->in_callback);
    Py_XDECREF(r);
    if (r != NULL && !PyErr_Occurred())
        PyErr_SetString(PyExc_RuntimeError, "refuse_in_callback returned");
    return 1;
}

static void
set_in_callback(EngineObject *self, PyObject *v)
{
    Py_INCREF(v);
    Py_XSETREF(self->in_callback, v);
}

/* an event from ``pool`` (a list), or a new one from the device */
static PyObject *
pooled_event(EngineObject *self, PyObject *pool, int timing)
{
    if (PyList_GET_SIZE(pool))
        return list_pop(pool);
    if (!need_field(self->device, "device"))
        return NULL;
    return call_method1(self->device, s_create_event, timing ? Py_True : Py_False);
}

static int
set_field(PyObject **field, PyObject *v)
{
    Py_INCREF(v);
    Py_XSETREF(*field, v);
    return 0;
}

/* n >= limit as Python compares them (limit any number): 1, 0, or -1 on error; a plain
 * int limit, the usual case, without making an int object */
static int
compare_ge(Py_ssize_t n, PyObject *limit)
{
    if (PyLong_CheckExact(limit)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(limit, &overflow);
        if (overflow)
            return overflow < 0;
        if (v != -1 || !PyErr_Occurred())
            return (long long)n >= v;
        return -1;
    }
    PyObject *count = PyLong_FromSsize_t(n);
    int ge = count ? PyObject_RichCompareBool(count, limit, Py_GE) : -1;
    Py_XDECREF(count);
    return ge;
}

/* H2D, LAUNCH or D2H for a kind compared as Python compares it (== LAUNCH, == H2D, else
 * D2H); -1 on error */
static int
kind_of(PyObject *kind)
{
    if (PyLong_CheckExact(kind)) {
        long k = PyLong_AsLong(kind);
        if (k == -1 && PyErr_Occurred()) {
            PyErr_Clear(); /* too large to be LAUNCH or H2D */
            return D2H;
        }
        return k == LAUNCH ? LAUNCH : k == H2D ? H2D : D2H;
    }
    PyObject *launch = PyLong_FromLong(LAUNCH), *h2d = PyLong_FromLong(H2D);
    int is_launch = launch ? PyObject_RichCompareBool(kind, launch, Py_EQ) : -1;
    int is_h2d = is_launch == 0 && h2d ? PyObject_RichCompareBool(kind, h2d, Py_EQ) : 0;
    Py_XDECREF(launch);
    Py_XDECREF(h2d);
    if (is_launch < 0 || is_h2d < 0)
        return -1;
    return is_launch ? LAUNCH : is_h2d ? H2D : D2H;
}

static const char *submit_kw[] = {"lane", "op_type", "name", "deps", "quiet", "kind", "a",
                                  "b", "c", "d", "keep", "on_done", "timing", "root", NULL};
/* the same names interned: a call's keywords (interned where they come from code, and in
 * the queue calls' own tuples) are found by identity, without comparing text */
static PyObject *submit_kw_obj[14];

/* the position of keyword ``key`` in submit_kw, 14 if none */
static int
submit_kw_index(PyObject *key)
{
    int j = 0;
    while (j < 14 && submit_kw_obj[j] != key)
        j++;
    if (j < 14)
        return j;
    j = 0;
    while (submit_kw[j] && PyUnicode_CompareWithASCIIString(key, submit_kw[j]) != 0)
        j++;
    return j;
}

static PyObject *
engine_submit(EngineObject *self, PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames)
{
    /* submit(lane, op_type, name, deps, quiet, kind, a, b, c=None, d=None, keep=None,
     *        on_done=None, timing=None, root=None), positional or by keyword */
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *v[14] = {NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                       Py_None, Py_None, Py_None, Py_None, Py_None, Py_None};
    if (nargs > 14) {
        PyErr_Format(PyExc_TypeError, "submit() takes at most 14 arguments, got %zd", nargs);
        return NULL;
    }
    char given[14] = {0};
    for (Py_ssize_t i = 0; i < nargs; i++) {
        v[i] = args[i];
        given[i] = 1;
    }
    if (kwnames != NULL) {
        for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(kwnames); k++) {
            PyObject *key = PyTuple_GET_ITEM(kwnames, k);
            int j = submit_kw_index(key);
            if (!submit_kw[j] || given[j]) {
                PyErr_Format(PyExc_TypeError, "submit() got an unexpected or repeated "
                             "keyword argument %R", key);
                return NULL;
            }
            v[j] = args[nargs + k];
            given[j] = 1;
        }
    }
    for (int j = 0; j < 8; j++) {
        if (!given[j]) {
            PyErr_Format(PyExc_TypeError, "submit() missing required argument '%s'",
                         submit_kw[j]);
            return NULL;
        }
    }
    PyObject *lane = v[0], *op_type = v[1], *name = v[2], *deps = v[3], *quiet = v[4],
             *a = v[6], *b = v[7];
    PyObject *c = v[8], *d = v[9], *keep = v[10], *on_done = v[11], *timing = v[12];
    PyObject *kind_obj = v[5];

    if (refused_in_callback(self))
        return NULL;
    if (!need_field(self->inflight, "inflight"))
        return NULL;
    if (!PyDict_Check(self->inflight)) {
        PyErr_SetString(PyExc_TypeError, "the engine's inflight must be a dict");
        return NULL;
    }
    if (!need_field(self->max_in_flight, "max_in_flight"))
        return NULL;
    int full = compare_ge(PyDict_GET_SIZE(self->inflight), self->max_in_flight);
    if (full < 0)
        return NULL;
    /* the kind of work, compared as Python compares it (H2D, LAUNCH, else D2H) */
    int kind = kind_of(kind_obj);
    if (kind < 0)
        return NULL;
    if (full) {
        PyObject *r = PyObject_CallMethodNoArgs((PyObject *)self, s_throttle);
        if (r == NULL)
            return NULL;
        Py_DECREF(r);
    }
    else if (!need_field(self->inflight, "inflight") || !PyDict_Check(self->inflight)) {
        /* (deleted or rebound by code the comparisons above ran) */
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "the engine's inflight must be a dict");
        return NULL;
    }
    else if (PyDict_GET_SIZE(self->inflight) >= self->reclaim_at) {
        /* no pooled event for this op and RECLAIM ops in flight since the last look: take
         * back the events of those complete (a few queries) rather than make one (a
         * driver call costing about 13 queries) */
        PyObject *t_obj = timing == Py_None ? (self->timing_obj ? self->timing_obj : Py_False)
                                            : timing;
        int t = truthy(t_obj);
        if (t < 0)
            return NULL;
        if (!t) {
            PyObject *active = mod_get(trace_mod, s_ACTIVE);
            if (active == NULL)
                return NULL;
            t = active != Py_None;
            Py_DECREF(active);
        }
        PyObject *pool = t ? self->tpool : self->pool;
        if (!need_list(pool, t ? "_tpool" : "_pool"))
            return NULL;
        if (PyList_GET_SIZE(pool) == 0) {
            PyObject *r = PyObject_CallMethodNoArgs((PyObject *)self, s_harvest);
            if (r == NULL)
                return NULL;
            Py_DECREF(r);
            if (!need_field(self->inflight, "inflight"))
                return NULL;
            self->reclaim_at = PyObject_Size(self->inflight) + RECLAIM;
            if (self->reclaim_at < RECLAIM)
                return NULL; /* (not a dict any more: its size's error) */
        }
    }
    PyObject *root = v[13];
    Py_INCREF(root);
    OpObject *op = (OpObject *)op_make(op_type, lane, name);
    PyObject *timed_obj = NULL; /* held: code run below (a trace's begin) may rebind it */
    PyObject *stream = NULL, *seq = NULL, *tracer = NULL, *mark = NULL, *start = NULL,
             *table = NULL, *oid = NULL, *ev = NULL, *r = NULL;
    if (op == NULL)
        goto fail;
    stream = slot_attr(lane, s_stream, &c_lane_stream);
    if (stream == NULL)
        goto fail;
    Py_INCREF(deps);
    op->deps = deps;
    seq = as_sequence(deps);
    if (seq == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        /* held: a wait may run code that changes the caller's list */
        PyObject *dep = PySequence_Fast_GET_ITEM(seq, i);
        Py_INCREF(dep);
        PyObject *dev = op_get(dep, offsetof(OpObject, event), s_event);
        if (dev == NULL) {
            Py_DECREF(dep);
            goto fail;
        }
        if (dev != Py_None) {
            r = call_method1(stream, s_wait, dev);
            if (r == NULL) {
                Py_DECREF(dev);
                Py_DECREF(dep);
                goto fail;
            }
            Py_CLEAR(r);
        }
        Py_DECREF(dev);
        if (root == Py_None) {
            PyObject *derr = op_get(dep, offsetof(OpObject, error), s_error);
            if (derr == NULL) {
                Py_DECREF(dep);
                goto fail;
            }
            int failed = derr != Py_None;
            Py_DECREF(derr);
            if (failed) {
                PyObject *rt = PyObject_CallOneArg(root_of, dep);
                if (rt == NULL) {
                    Py_DECREF(dep);
                    goto fail;
                }
                Py_SETREF(root, rt);
            }
        }
        Py_DECREF(dep);
    }
    Py_CLEAR(seq);
    seq = as_sequence(quiet);
    if (seq == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *dep = PySequence_Fast_GET_ITEM(seq, i); /* used before any call */
        PyObject *dev = op_get(dep, offsetof(OpObject, event), s_event);
        if (dev == NULL)
            goto fail;
        if (dev != Py_None) {
            r = call_method_kw(stream, s_wait, dev, Py_False, kw_propagate);
            if (r == NULL) {
                Py_DECREF(dev);
                goto fail;
            }
            Py_CLEAR(r);
        }
        Py_DECREF(dev);
    }
    Py_CLEAR(seq);
    timed_obj = Py_NewRef(timing == Py_None ? (self->timing_obj ? self->timing_obj : Py_False)
                                            : timing);
    int timed = truthy(timed_obj);
    if (timed < 0)
        goto fail;
    tracer = mod_get(trace_mod, s_ACTIVE);
    if (tracer == NULL)
        goto fail;
    if (tracer != Py_None) {
        /* a traced op: a start stamp, and its closing record (a timing event) is its end */
        if (self->tracer != tracer) {
            PyObject *args2[3] = {tracer, (PyObject *)self, lane};
            PyObject *traced = PyObject_VectorcallMethod(
                s_begin, args2, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
            if (traced == NULL)
                goto fail;
            Py_XSETREF(self->traced, traced);
            set_field(&self->tracer, tracer);
        }
        PyObject *state = mod_get(trace_mod, s_STATE);
        if (state == NULL)
            goto fail;
        PyObject *index = PyObject_GetAttr(state, s_index);
        Py_DECREF(state);
        if (index == NULL)
            goto fail;
        PyObject *nbytes = kind == H2D ? PyObject_GetAttr(b, s_nbytes)
                           : kind == D2H ? PyObject_GetAttr(a, s_nbytes)
                                         : PyLong_FromLong(0);
        if (nbytes == NULL) {
            Py_DECREF(index);
            goto fail;
        }
        PyObject *tr = PyTuple_Pack(4, index, nbytes, timed_obj, tracer);
        Py_DECREF(index);
        Py_DECREF(nbytes);
        if (tr == NULL)
            goto fail;
        Py_XSETREF(op->trace, tr);
    }
    PyObject *on = mod_get(nvtx_mod, s_ON);
    if (on == NULL)
        goto fail;
    int nvtx_on = truthy(on);
    Py_DECREF(on);
    if (nvtx_on < 0)
        goto fail;
    if (nvtx_on) {
        PyObject *lname = PyObject_GetAttr(lane, s_name);
        PyObject *tvalue = lname ? PyObject_GetAttr(op_type, s_value) : NULL;
        if (tvalue != NULL) {
            PyObject *args3[4] = {nvtx_mod, lname, tvalue, name};
            mark = PyObject_VectorcallMethod(s_range_start, args3,
                                             4 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        }
        Py_XDECREF(lname);
        Py_XDECREF(tvalue);
        if (mark == NULL)
            goto fail;
    }
    else {
        Py_INCREF(Py_None);
        mark = Py_None;
    }
    if (timed || tracer != Py_None) {
        if (!need_list(self->tpool, "_tpool"))
            goto fail;
        start = pooled_event(self, self->tpool, 1);
        if (start == NULL)
            goto fail;
        set_field(&op->start, start);
        r = call_method_kw(stream, s_record, start, Py_True, kw_stamp);
        if (r == NULL)
            goto fail;
        Py_CLEAR(r);
    }
    if (!need_field(self->table, "table"))
        goto fail;
    table = self->table;
    Py_INCREF(table);
    oid = PyObject_GetAttr(table, s_next);
    if (oid == NULL)
        goto fail;
    if (root != Py_None) {
        PyObject *args4[3] = {(PyObject *)op, root, oid};
        PyObject *err = PyObject_Vectorcall(dependency_error, args4, 2, kw_oid);
        if (err == NULL)
            goto fail;
        Py_XSETREF(op->error, err);
    }
    else {
        if (kind == LAUNCH) {
            /* a callable runs here on CUDA: no re-entry */
            set_in_callback(self, KERNEL);
            PyObject *args5[5] = {stream, a, b, c, d};
            r = PyObject_VectorcallMethod(s_launch, args5,
                                          5 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
            if (r == NULL) {
                PyObject *exc = take_exception();
                set_in_callback(self, Py_False);
                restore_exception(exc);
            }
            else
                set_in_callback(self, Py_False);
        }
        else {
            PyObject *args6[3] = {stream, a, b};
            r = PyObject_VectorcallMethod(kind == H2D ? s_copy_h2d : s_copy_d2h, args6,
                                          3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        }
        if (r == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception))
                goto fail;
            PyObject *exc = take_exception();
            int refused = kind != LAUNCH ? 1 : PyObject_IsInstance(exc, PrismGpuError);
            if (refused < 0) {
                Py_DECREF(exc);
                goto fail;
            }
            if (refused) {
                /* refused: raised here */
                PyObject *args7[3] = {(PyObject *)self, (PyObject *)op, mark};
                PyObject *dr = PyObject_VectorcallMethod(
                    s_drop_start, args7, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
                Py_XDECREF(dr);
                raise_after_cleanup(exc, dr == NULL);
                goto fail;
            }
            PyObject *args8[4] = {(PyObject *)op, exc, oid};
            PyObject *err = PyObject_Vectorcall(own_error, args8, 3, NULL);
            if (err == NULL) {
                Py_DECREF(exc);
                goto fail;
            }
            Py_XSETREF(op->error, err);
            PyObject *pair = PyTuple_Pack(2, oid, err);
            if (pair == NULL) {
                Py_DECREF(exc);
                goto fail;
            }
            PyObject *args9[3] = {(PyObject *)self, exc, pair};
            PyObject *nr = PyObject_VectorcallMethod(
                s_note_root, args9, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
            Py_DECREF(pair);
            Py_DECREF(exc);
            if (nr == NULL)
                goto fail;
            Py_DECREF(nr);
        }
        Py_CLEAR(r);
    }
    if (start != NULL) {
        /* a timed or traced op's closing event is its end stamp: one record fewer than
         * an end stamp and an untimed closing event (benchmarks/trace_designs.py) */
        if (!need_list(self->tpool, "_tpool"))
            goto fail;
        ev = pooled_event(self, self->tpool, 1);
        if (ev == NULL)
            goto fail;
        set_field(&op->event, ev);
        set_field(&op->end, ev);
    }
    else {
        if (!need_list(self->pool, "_pool"))
            goto fail;
        ev = pooled_event(self, self->pool, 0);
        if (ev == NULL)
            goto fail;
        set_field(&op->event, ev);
    }
    r = call_method1(stream, s_record, ev);
    if (r == NULL)
        goto fail;
    Py_CLEAR(r);
    set_field(&op->keep, keep);
    set_field(&op->on_done, on_done);
    set_field(&op->id, oid);
    PyObject *next = PyNumber_Add(oid, one);
    if (next == NULL)
        goto fail;
    int bad = PyObject_SetAttr(table, s_next, next);
    Py_DECREF(next);
    if (bad < 0)
        goto fail;
    PyObject *ops = slot_attr(lane, s_ops, &c_lane_ops);
    if (ops == NULL)
        goto fail;
    r = call_method1(ops, s_append, (PyObject *)op);
    Py_DECREF(ops);
    if (r == NULL)
        goto fail;
    Py_CLEAR(r);
    if (!need_field(self->inflight, "inflight"))
        goto fail;
    if (!PyDict_Check(self->inflight)) {
        PyErr_SetString(PyExc_TypeError, "the engine's inflight must be a dict");
        goto fail;
    }
    if (PyDict_SetItem(self->inflight, oid, (PyObject *)op) < 0)
        goto fail;
    if (mark != Py_None) {
        r = PyObject_CallMethodOneArg(nvtx_mod, s_range_end, mark);
        if (r == NULL)
            goto fail;
        Py_CLEAR(r);
    }
    Py_DECREF(root);
    Py_DECREF(stream);
    Py_DECREF(tracer);
    Py_DECREF(mark);
    Py_XDECREF(start);
    Py_DECREF(table);
    Py_DECREF(oid);
    Py_DECREF(ev);
    Py_DECREF(timed_obj);
    return (PyObject *)op;
fail:
    Py_XDECREF(timed_obj);
    Py_XDECREF(root);
    Py_XDECREF(op);
    Py_XDECREF(stream);
    Py_XDECREF(seq);
    Py_XDECREF(tracer);
    Py_XDECREF(mark);
    Py_XDECREF(start);
    Py_XDECREF(table);
    Py_XDECREF(oid);
    Py_XDECREF(ev);
    return NULL;
}

static PyObject *
engine_complete(EngineObject *self, PyObject *opobj)
{
    if (Py_TYPE(opobj) != &OpType) {
        PyErr_Format(PyExc_TypeError, "_complete() takes an Op, got %.100s",
                     Py_TYPE(opobj)->tp_name);
        return NULL;
    }
    OpObject *op = (OpObject *)opobj;
    PyObject *err = NULL, *duration = NULL, *held = NULL, *tr = NULL, *r = NULL;
    if (!op->id || !op->type || !op->event || !op->error || !op->start || !op->end ||
        !op->on_done || !op->trace) {
        PyErr_SetString(PyExc_AttributeError, "an op's field was deleted");
        return NULL;
    }
    if (op->trace != Py_None && (!PyTuple_Check(op->trace) || PyTuple_GET_SIZE(op->trace) != 4)) {
        PyErr_SetString(PyExc_TypeError, "an op's trace must be None or a 4-tuple");
        return NULL;
    }
    /* (absent if a Ctrl-C cut its submit short) */
    if (!need_field(self->inflight, "inflight") || dict_discard(self->inflight, op->id) < 0)
        return NULL;
    PyObject *ev = op->event;
    Py_INCREF(ev);
    err = op->error;
    Py_INCREF(err);
    if (err == Py_None) {
        PyObject *fault = PyObject_CallMethodNoArgs(ev, s_error);
        if (fault == NULL)
            goto fail;
        if (fault != Py_None) {
            PyObject *args[3] = {(PyObject *)self, opobj, fault};
            PyObject *e = PyObject_VectorcallMethod(s_attribute, args,
                                                   3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
            Py_DECREF(fault);
            if (e == NULL)
                goto fail;
            Py_SETREF(err, e);
            set_field(&op->error, e);
        }
        else {
            Py_DECREF(fault);
            if (op->deps != NULL && op->deps != Py_None) {
                PyObject *seq = PySequence_Fast(op->deps, "deps must be a sequence");
                if (seq == NULL)
                    goto fail;
                for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
                    PyObject *dep = PySequence_Fast_GET_ITEM(seq, i);
                    PyObject *derr = op_get(dep, offsetof(OpObject, error), s_error);
                    if (derr == NULL) {
                        Py_DECREF(seq);
                        goto fail;
                    }
                    int failed = derr != Py_None;
                    Py_DECREF(derr);
                    if (failed) {
                        PyObject *rt = PyObject_CallOneArg(root_of, dep);
                        PyObject *e = NULL;
                        if (rt != NULL) {
                            PyObject *args[2] = {opobj, rt};
                            e = PyObject_Vectorcall(dependency_error, args, 2, NULL);
                            Py_DECREF(rt);
                        }
                        if (e == NULL) {
                            Py_DECREF(seq);
                            goto fail;
                        }
                        Py_SETREF(err, e);
                        set_field(&op->error, e);
                        break;
                    }
                }
                Py_DECREF(seq);
            }
        }
    }
    PyObject *start = op->start;
    Py_INCREF(start);
    tr = op->trace;
    Py_INCREF(tr);
    Py_INCREF(Py_None);
    duration = Py_None;
    if (start == Py_None) { /* an untimed op's closing event (a timed op's is its end) */
        if (!need_list(self->pool, "_pool") || PyList_Append(self->pool, ev) < 0)
            goto fail_start;
    }
    else {
        int want = 1;
        if (tr != Py_None) {
            want = truthy(PyTuple_GET_ITEM(tr, 2));
            if (want < 0)
                goto fail_start;
        }
        if (want) {
            if (op->end == NULL) {
                PyErr_SetString(PyExc_AttributeError, "an op's field was deleted");
                goto fail_start;
            }
            PyObject *ms = PyObject_CallMethodOneArg(op->end, s_elapsed_ms, start);
            if (ms == NULL)
                goto fail_start;
            Py_SETREF(duration, ms);
        }
    }
    PyObject *cb = op->on_done;
    if (cb != Py_None) {
        Py_INCREF(cb);
        PyObject *args[2] = {opobj, duration};
        r = PyObject_Vectorcall(cb, args, 2, NULL);
        Py_DECREF(cb);
        if (r == NULL) {
            /* raised by the call that harvested, after the bookkeeping (Ctrl-C too) */
            PyObject *exc = take_exception();
            int bad = !need_list(self->callback_errors, "_callback_errors") ||
                      PyList_Append(self->callback_errors, exc) < 0;
            Py_DECREF(exc);
            if (bad)
                goto fail_start;
        }
        Py_CLEAR(r);
        set_field(&op->on_done, Py_None);
    }
    if (tr != Py_None && PyTuple_GET_ITEM(tr, 3) == self->tracer) {
        /* the trace reads the times later (in batches), gives back */
        if (!need_field(self->traced, "_traced"))
            goto fail_start;
        held = self->traced;
        Py_INCREF(held);
        r = call_method1(held, s_append, opobj);
        if (r == NULL)
            goto fail_start;
        Py_CLEAR(r);
    }
    else if (start != Py_None) { /* (an op whose trace ended: its times are not wanted) */
        r = give_event(self, start);
        if (r == NULL)
            goto fail_start;
        Py_CLEAR(r);
        PyObject *end = op->end; /* its closing event */
        if (end == NULL) {
            PyErr_SetString(PyExc_AttributeError, "an op's field was deleted");
            goto fail_start;
        }
        Py_INCREF(end);
        r = give_event(self, end);
        Py_DECREF(end);
        if (r == NULL)
            goto fail_start;
        Py_CLEAR(r);
        set_field(&op->start, Py_None);
        set_field(&op->end, Py_None);
        set_field(&op->trace, Py_None);
    }
    if (op->id == NULL || op->type == NULL || self->table == NULL) {
        PyErr_SetString(PyExc_AttributeError, "an op's or the engine's field was deleted");
        goto fail_start;
    }
    if (is_table(self->table)) {
        /* (held: a report dropped from the backlog may run code that rebinds them) */
        PyObject *table = Py_NewRef(self->table), *id = Py_NewRef(op->id),
                 *type = Py_NewRef(op->type);
        int rc = table_complete((TableObject *)table, id, type, duration, err);
        Py_DECREF(table);
        Py_DECREF(id);
        Py_DECREF(type);
        if (rc < 0)
            goto fail_start;
    }
    else {
        PyObject *args[5] = {self->table, op->id, op->type, duration, err};
        r = PyObject_VectorcallMethod(s_complete, args, 5 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                      NULL);
        if (r == NULL)
            goto fail_start;
        Py_CLEAR(r);
    }
    set_field(&op->keep, Py_None);
    set_field(&op->event, Py_None);
    /* completed ops keep no chain of earlier ops alive */
    set_field(&op->deps, empty_tuple);
    if (held != NULL) {
        Py_ssize_t n = PyObject_Size(held);
        if (n < 0)
            goto fail_start;
        PyObject *trace_cls = mod_get(trace_mod, s_Trace);
        PyObject *limit = trace_cls ? PyObject_GetAttr(trace_cls, s_HELD_EVENTS) : NULL;
        Py_XDECREF(trace_cls);
        if (limit == NULL)
            goto fail_start;
        Py_ssize_t lim = PyLong_AsSsize_t(limit);
        Py_DECREF(limit);
        if (lim == -1 && PyErr_Occurred())
            goto fail_start;
        if (n >= lim) { /* its trace (which may end meanwhile) */
            r = PyObject_VectorcallMethod(s_read_times,
                                          (PyObject *[]){PyTuple_GET_ITEM(tr, 3), Py_False},
                                          1 | PY_VECTORCALL_ARGUMENTS_OFFSET, kw_force);
            if (r == NULL)
                goto fail_start;
            Py_CLEAR(r);
        }
    }
    Py_DECREF(start);
    Py_DECREF(ev);
    Py_DECREF(err);
    Py_DECREF(duration);
    Py_XDECREF(held);
    Py_DECREF(tr);
    Py_RETURN_NONE;
fail_start:
    Py_DECREF(start);
fail:
    Py_DECREF(ev);
    Py_XDECREF(err);
    Py_XDECREF(duration);
    Py_XDECREF(held);
    Py_XDECREF(tr);
    return NULL;
}

static PyObject *
event_query(PyObject *op)
{
    PyObject *ev = op_get(op, offsetof(OpObject, event), s_event);
    if (ev == NULL)
        return NULL;
    PyObject *r = PyObject_CallMethodNoArgs(ev, s_query);
    Py_DECREF(ev);
    return r;
}

/* complete the first ``count`` ops of deque ``ops`` */
static int
complete_head(EngineObject *self, PyObject *ops, Py_ssize_t count)
{
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *head = PyObject_CallMethodNoArgs(ops, s_popleft);
        if (head == NULL)
            return 0;
        PyObject *r = engine_complete(self, head);
        Py_DECREF(head);
        if (r == NULL)
            return 0;
        Py_DECREF(r);
    }
    return 1;
}

static PyObject *
harvest_lane(EngineObject *self, PyObject *lane, PyObject *upto)
{
    PyObject *ops = slot_attr(lane, s_ops, &c_lane_ops);
    if (ops == NULL)
        return NULL;
    Py_ssize_t n = PyObject_Size(ops);
    if (n < 0)
        goto fail;
    if (upto != Py_None) {
        for (;;) {
            Py_ssize_t left = PyObject_Size(ops);
            if (left < 0)
                goto fail;
            if (left == 0)
                break;
            PyObject *head = PyObject_CallMethodNoArgs(ops, s_popleft);
            if (head == NULL)
                goto fail;
            PyObject *r = engine_complete(self, head);
            int reached = head == upto;
            Py_DECREF(head);
            if (r == NULL)
                goto fail;
            Py_DECREF(r);
            if (reached)
                break;
        }
        Py_DECREF(ops);
        Py_RETURN_NONE;
    }
    if (n == 0) {
        Py_DECREF(ops);
        Py_RETURN_NONE;
    }
    /* a lane is one stream: its ops complete in order. The newest first (a GPU that
     * keeps up with the host is retired in one query), then the oldest, then bisection */
    Py_ssize_t count = 0;
    PyObject *item = PySequence_GetItem(ops, n - 1);
    if (item == NULL)
        goto fail;
    PyObject *q = event_query(item);
    Py_DECREF(item);
    if (q == NULL)
        goto fail;
    int done = truthy(q);
    Py_DECREF(q);
    if (done < 0)
        goto fail;
    if (done)
        count = n;
    else if (n > 1) {
        item = PySequence_GetItem(ops, 0);
        if (item == NULL)
            goto fail;
        q = event_query(item);
        Py_DECREF(item);
        if (q == NULL)
            goto fail;
        done = truthy(q);
        Py_DECREF(q);
        if (done < 0)
            goto fail;
        if (done) {
            Py_ssize_t lo = 0, hi = n - 1; /* ops[lo] done, ops[hi] not */
            while (hi - lo > 1) {
                Py_ssize_t mid = (lo + hi) / 2;
                item = PySequence_GetItem(ops, mid);
                if (item == NULL)
                    goto fail;
                q = event_query(item);
                Py_DECREF(item);
                if (q == NULL)
                    goto fail;
                done = truthy(q);
                Py_DECREF(q);
                if (done < 0)
                    goto fail;
                if (done)
                    lo = mid;
                else
                    hi = mid;
            }
            count = hi;
        }
    }
    if (!complete_head(self, ops, count))
        goto fail;
    Py_DECREF(ops);
    Py_RETURN_NONE;
fail:
    Py_DECREF(ops);
    return NULL;
}

/* arguments of a method taking ``names`` (``required`` of them required), by position or
 * keyword, into ``out`` (missing optional ones None): 0 with TypeError on a mismatch */
static int
parse_args(PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames, const char *usage,
           const char *const *names, int n, int required, PyObject **out)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs > n)
        goto bad;
    for (int i = 0; i < n; i++)
        out[i] = i < nargs ? args[i] : NULL;
    for (Py_ssize_t k = 0; kwnames && k < PyTuple_GET_SIZE(kwnames); k++) {
        int j = 0;
        while (j < n && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, k),
                                                         names[j]) != 0)
            j++;
        if (j == n || out[j] != NULL)
            goto bad;
        out[j] = args[nargs + k];
    }
    for (int i = 0; i < n; i++) {
        if (out[i] == NULL) {
            if (i < required)
                goto bad;
            out[i] = Py_None;
        }
    }
    return 1;
bad:
    PyErr_SetString(PyExc_TypeError, usage);
    return 0;
}

static PyObject *
engine_harvest_lane(EngineObject *self, PyObject *const *args, Py_ssize_t nargsf,
                    PyObject *kwnames)
{
    static const char *const names[] = {"lane", "upto"};
    PyObject *v[2];
    if (!parse_args(args, nargsf, kwnames, "_harvest_lane(lane, upto=None)", names, 2, 1, v))
        return NULL;
    return harvest_lane(self, v[0], v[1]);
}

static PyObject *
engine_harvest(EngineObject *self, PyObject *const *args, Py_ssize_t nargsf,
               PyObject *kwnames)
{
    static const char *const names[] = {"upto"};
    PyObject *upto;
    if (!parse_args(args, nargsf, kwnames, "harvest(upto=None)", names, 1, 0, &upto))
        return NULL;
    int busy = in_callback(self);
    if (busy < 0)
        return NULL;
    if (busy) /* re-entrant calls (from an on_done callback) do nothing */
        Py_RETURN_NONE;
    set_in_callback(self, Py_True);
    int ok = 1;
    if (upto != Py_None) {
        PyObject *lane = op_get(upto, offsetof(OpObject, lane), s_lane);
        PyObject *r = lane ? harvest_lane(self, lane, upto) : NULL;
        Py_XDECREF(lane);
        Py_XDECREF(r);
        ok = r != NULL;
    }
    PyObject *lanes = self->lanes; /* held: the list the loop started on, as in Python */
    Py_XINCREF(lanes);
    if (ok && (lanes == NULL || !PyList_Check(lanes))) {
        PyErr_SetString(PyExc_TypeError, "the engine's lanes must be a list");
        ok = 0;
    }
    for (Py_ssize_t i = 0; ok && i < PyList_GET_SIZE(lanes); i++) {
        PyObject *lane = PyList_GET_ITEM(lanes, i);
        Py_INCREF(lane);
        PyObject *ops = slot_attr(lane, s_ops, &c_lane_ops);
        Py_ssize_t n = ops ? PyObject_Size(ops) : -1;
        Py_XDECREF(ops);
        if (n > 0) {
            PyObject *r = harvest_lane(self, lane, Py_None);
            Py_XDECREF(r);
            ok = r != NULL;
        }
        else
            ok = n == 0;
        Py_DECREF(lane);
    }
    Py_XDECREF(lanes);
    if (ok) {
        set_in_callback(self, Py_False);
        Py_RETURN_NONE;
    }
    PyObject *exc = take_exception();
    set_in_callback(self, Py_False);
    restore_exception(exc);
    return NULL;
}

/* give_event(ev): _core.PyEngineCore.give_event */
static PyObject *
give_event(EngineObject *self, PyObject *ev)
{
    PyObject *t = PyObject_GetAttr(ev, s_timing);
    int timed = t ? truthy(t) : -1;
    Py_XDECREF(t);
    if (timed < 0)
        return NULL;
    PyObject *pool = timed ? self->tpool : self->pool;
    if (!need_list(pool, timed ? "_tpool" : "_pool"))
        return NULL;
    if (PyList_GET_SIZE(pool) < self->pool_cap) {
        if (PyList_Append(pool, ev) < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    return PyObject_CallMethodNoArgs(ev, s_close);
}

/* wait(oid, timeout=None): _core.PyEngineCore.wait */
static PyObject *
engine_wait(EngineObject *self, PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames)
{
    static const char *const names[] = {"oid", "timeout"};
    PyObject *vals[2];
    if (!parse_args(args, nargsf, kwnames, "wait(oid, timeout=None)", names, 2, 1, vals))
        return NULL;
    PyObject *oid = vals[0], *timeout = vals[1];
    if (refused_in_callback(self))
        return NULL;
    if (!need_field(self->inflight, "inflight"))
        return NULL;
    PyObject *op = PyObject_CallMethodOneArg(self->inflight, s_get, oid);
    if (op == NULL)
        return NULL;
    if (op == Py_None) {
        Py_DECREF(op);
        Py_RETURN_TRUE;
    }
    PyObject *ev = op_get(op, offsetof(OpObject, event), s_event);
    PyObject *r = ev ? PyObject_CallMethodOneArg(ev, s_synchronize, timeout) : NULL;
    Py_XDECREF(ev);
    int done = r ? truthy(r) : -1;
    Py_XDECREF(r);
    if (done <= 0) {
        Py_DECREF(op);
        if (done < 0)
            return NULL;
        Py_RETURN_FALSE;
    }
    r = PyObject_CallMethodOneArg((PyObject *)self, s_harvest, op);
    Py_DECREF(op);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    Py_RETURN_TRUE;
}

static PyObject *
engine_complete_method(EngineObject *self, PyObject *const *args, Py_ssize_t nargsf,
                       PyObject *kwnames)
{
    static const char *const names[] = {"op"};
    PyObject *op;
    if (!parse_args(args, nargsf, kwnames, "_complete(op)", names, 1, 1, &op))
        return NULL;
    return engine_complete(self, op);
}

#define ENGINE_FIELD(name, field) \
    {name, T_OBJECT_EX, offsetof(EngineObject, field), 0, NULL}

static PyMemberDef engine_members[] = {
    ENGINE_FIELD("device", device),
    ENGINE_FIELD("table", table),
    ENGINE_FIELD("inflight", inflight),
    ENGINE_FIELD("lanes", lanes),
    ENGINE_FIELD("_pool", pool),
    ENGINE_FIELD("_tpool", tpool),
    ENGINE_FIELD("in_callback", in_callback),
    ENGINE_FIELD("_tracer", tracer),
    ENGINE_FIELD("_traced", traced),
    ENGINE_FIELD("_callback_errors", callback_errors),
    {"max_in_flight", T_OBJECT_EX, offsetof(EngineObject, max_in_flight), 0, NULL},
    {"timing", T_OBJECT_EX, offsetof(EngineObject, timing_obj), 0, NULL},
    {"_reclaim_at", T_PYSSIZET, offsetof(EngineObject, reclaim_at), 0, NULL},
    {"_pool_cap", T_PYSSIZET, offsetof(EngineObject, pool_cap), 0, NULL},
    {NULL},
};

static PyMethodDef engine_methods[] = {
    {"submit", (PyCFunction)(void (*)(void))engine_submit, METH_FASTCALL | METH_KEYWORDS,
     "Queue one op (see _core.EngineCore.submit)."},
    {"_complete", (PyCFunction)(void (*)(void))engine_complete_method,
     METH_FASTCALL | METH_KEYWORDS, "Complete one op known done."},
    {"_harvest_lane", (PyCFunction)(void (*)(void))engine_harvest_lane,
     METH_FASTCALL | METH_KEYWORDS, "Complete the done ops at the head of a lane."},
    {"harvest", (PyCFunction)(void (*)(void))engine_harvest, METH_FASTCALL | METH_KEYWORDS,
     "Complete every op known done."},
    {"give_event", (PyCFunction)give_event, METH_O,
     "An event back to its pool (closed past the pool's cap)."},
    {"wait", (PyCFunction)(void (*)(void))engine_wait, METH_FASTCALL | METH_KEYWORDS,
     "Block until op oid completes (False if timeout passed first)."},
    {NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "prism_gpu._ccore.EngineCore",
    .tp_doc = "The engine's hot path: submission and completion (compiled).",
    .tp_basicsize = sizeof(EngineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = engine_new,
    .tp_dealloc = (destructor)engine_dealloc,
    .tp_traverse = (traverseproc)engine_traverse,
    .tp_clear = (inquiry)engine_clear,
    .tp_members = engine_members,
    .tp_methods = engine_methods,
};

/* list.extend(other): a new reference to None, or NULL */
static PyObject *
list_extend(PyObject *list, PyObject *other)
{
    Py_ssize_t n = PyList_GET_SIZE(list);
    if (PyList_SetSlice(list, n, n, other) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- the queue calls
 *
 * QueueCore: the coordinator's queue_upload, queue_compute and queue_download for the
 * common cases, statement for statement as _queue.PyQueueCore's; any other call (sync
 * mode, explicit args/config/outputs, extra values other than a tuple
 * without device arrays, arrays that are not plain
 * numpy arrays, a call the checks would refuse, another thread's) goes to that
 * reference before anything changes, and it answers (or raises) as always.
 */
#include <pythread.h>

static PyObject *q_weak_key_dict, *q_kernel_type, *s_direct, *s_data;
static PyObject *q_reference, *q_ring_type, *q_ndarray, *q_sync, *q_pending_uploads, *q_device_array,
    *q_UPLOAD, *q_COMPUTE, *q_DOWNLOAD;
static PyObject *r_upload, *r_compute, *r_download; /* the reference's functions */
static PyObject *s_closed, *s_dtype, *s_capacity, *s_flags, *s_c_contiguous, *s_size,
    *s_device, *s_take, *s_ndim, *s_reshape, *s_id_type, *s_id, *s_ON_, *s_writeable,
    *s_resolve, *s_named, *s_resolve_deps, *s_uses_arrays, *s_defaults, *s_check, *s_config, *s_default_config, *s_failed_total,
    *s_root_pair, *s_buffer, *s_submit, *s_name_attr,
    *s_inflight, *s_reporter, *s_settle;
static PyObject *kw_keep_done, *kw_keep_done_root, *minus_one_tuple;

typedef struct { /* (object fields side by side: FIELD_RUN) */
    PyObject_HEAD
    PyObject *owner, *engine, *device, *table, *kernels, *slots, *up, *compute, *down;
} QueueObject;

/* What a queue call uses of its coordinator, held for the call: a callback run inside
 * it (by a throttled submit) may rebind the coordinator's attributes. */
typedef struct {
    PyObject *engine, *table, *slots, *lane, *kernels;
} Held;


static int
queue_traverse(QueueObject *q, visitproc visit, void *arg)
{
    return visit_run(FIELD_RUN(q, owner, down), visit, arg);
}

static int
queue_clear(QueueObject *q)
{
    return clear_run(FIELD_RUN(q, owner, down));
}

static void
queue_dealloc(QueueObject *q)
{
    PyObject_GC_UnTrack(q);
    queue_clear(q);
    Py_TYPE(q)->tp_free((PyObject *)q);
}

/* reference(self, *args, **kwargs): the Python queue call */
static PyObject *
delegate(PyObject *func, PyObject *self, PyObject *const *args, Py_ssize_t nargsf,
         PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t total = nargs + (kwnames ? PyTuple_GET_SIZE(kwnames) : 0);
    PyObject *small[8];
    PyObject **all = total + 1 <= 8 ? small : PyMem_Malloc((total + 1) * sizeof(PyObject *));
    if (all == NULL)
        return PyErr_NoMemory();
    all[0] = self;
    for (Py_ssize_t i = 0; i < total; i++)
        all[i + 1] = args[i];
    PyObject *r = PyObject_Vectorcall(func, all, nargs + 1, kwnames);
    if (all != small)
        PyMem_Free(all);
    return r;
}

/* 1 if ``v`` (a new reference, released here; NULL after an error) is true, 0 if not,
 * -1 on error */
static int
true_of(PyObject *v)
{
    if (v == NULL)
        return -1;
    int t = truthy(v);
    Py_DECREF(v);
    return t;
}

#define attr_true(o, name) true_of(PyObject_GetAttr((o), (name)))
#define mod_true(mod, name) true_of(mod_get((mod), (name)))

/* whether this call may take the fast path as far as the coordinator goes: the owner's
 * thread, open, not in sync mode (-1 on error) */
static int
queue_usable(QueueObject *self)
{
    if (self->owner == NULL || self->engine == NULL || self->device == NULL)
        return 0;
    unsigned long me = PyThread_get_thread_ident();
    unsigned long owner = PyLong_AsUnsignedLong(self->owner);
    if (owner == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    if (me != owner)
        return 0;
    int c = attr_true(self->engine, s_closed);
    if (c != 0)
        return c < 0 ? -1 : 0;
    c = attr_true(self->device, s_closed);
    if (c != 0)
        return c < 0 ? -1 : 0;
    c = mod_true(q_sync, s_ON_);
    if (c != 0)
        return c < 0 ? -1 : 0;
    return 1;
}

/* The first fields of a numpy array's struct (numpy's PyArrayObject_fields, the same in
 * numpy 1.x and 2.x): read directly where setup_queue found them to match what Python
 * sees of a test array, else (np_fields_ok 0) through attributes. */
typedef struct {
    PyObject_HEAD
    char *data;
    int nd;
    Py_ssize_t *dimensions;
    Py_ssize_t *strides;
    PyObject *base;
    PyObject *descr;
    int flags;
} NpFields;
#define NP_C_CONTIGUOUS 0x0001
#define NP_WRITEABLE 0x0400
static int np_fields_ok;

/* n elements of a plain numpy array of ``dtype`` (C-contiguous, writable if asked),
 * or 0 if the reference must look at it (-1 on error) */
static Py_ssize_t
plain_array(PyObject *a, PyObject *dtype, int writable)
{
    if (Py_TYPE(a) != (PyTypeObject *)q_ndarray)
        return 0;
    if (np_fields_ok) {
        NpFields *f = (NpFields *)a;
        int need = NP_C_CONTIGUOUS | (writable ? NP_WRITEABLE : 0);
        if (f->descr != dtype || (f->flags & need) != need)
            return 0;
        Py_ssize_t n = 1;
        for (int i = 0; i < f->nd; i++)
            n *= f->dimensions[i];
        return n;
    }
    PyObject *dt = PyObject_GetAttr(a, s_dtype);
    if (dt == NULL)
        return -1;
    int same = dt == dtype;
    Py_DECREF(dt);
    if (!same)
        return 0;
    PyObject *flags = PyObject_GetAttr(a, s_flags);
    if (flags == NULL)
        return -1;
    int ok = attr_true(flags, s_c_contiguous);
    if (ok > 0 && writable)
        ok = attr_true(flags, s_writeable);
    Py_DECREF(flags);
    if (ok <= 0)
        return ok;
    PyObject *size = PyObject_GetAttr(a, s_size);
    if (size == NULL)
        return -1;
    Py_ssize_t n = PyLong_AsSsize_t(size);
    Py_DECREF(size);
    if (n == -1 && PyErr_Occurred())
        return -1;
    return n;
}

/* a flat view: a if it is 1-d, else a.reshape(-1) */
static PyObject *
flat(PyObject *a)
{
    if (np_fields_ok && Py_TYPE(a) == (PyTypeObject *)q_ndarray && ((NpFields *)a)->nd == 1)
        return Py_NewRef(a);
    PyObject *nd = PyObject_GetAttr(a, s_ndim);
    if (nd == NULL)
        return NULL;
    long ndim = PyLong_AsLong(nd);
    Py_DECREF(nd);
    if (ndim == -1 && PyErr_Occurred())
        return NULL;
    if (ndim == 1) {
        Py_INCREF(a);
        return a;
    }
    return PyObject_CallMethodOneArg(a, s_reshape, minus_one_tuple);
}

/* a ring whose state machine is ours (a TripleBuffer of the compiled twins) */
static int
is_ring(PyObject *o)
{
    return Py_TYPE(o) == (PyTypeObject *)q_ring_type && PyObject_TypeCheck(o, &RingType);
}

static Py_ssize_t
attr_ssize(PyObject *o, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL)
        return -1;
    Py_ssize_t n = PyLong_AsSsize_t(v);
    Py_DECREF(v);
    return n;
}

static PyObject *
new_id(Held *h, PyObject *op)
{
    PyObject *oid = op_get(op, offsetof(OpObject, id), s_id);
    if (oid == NULL)
        return NULL;
    PyObject *id_type = is_table(h->table) ? Py_XNewRef(((TableObject *)h->table)->id_type)
                                           : PyObject_GetAttr(h->table, s_id_type);
    if (id_type == NULL && !PyErr_Occurred())
        PyErr_SetString(PyExc_AttributeError, "the op table has no id_type");
    PyObject *r = NULL;
    if (id_type != NULL && PyType_Check(id_type) &&
        ((PyTypeObject *)id_type)->tp_new == PyLong_Type.tp_new &&
        ((PyTypeObject *)id_type)->tp_init == PyBaseObject_Type.tp_init) {
        /* an int subclass with neither __new__ nor __init__ of its own (the table's OpId
         * type): made by int's __new__ alone, as calling the type would */
        PyObject *one = PyTuple_Pack(1, oid);
        r = one ? PyLong_Type.tp_new((PyTypeObject *)id_type, one, NULL) : NULL;
        Py_XDECREF(one);
    }
    else if (id_type != NULL)
        r = PyObject_CallOneArg(id_type, oid);
    Py_XDECREF(id_type);
    Py_DECREF(oid);
    return r;
}

/* EngineCore.submit as its type has it: an engine whose class has this one is called
 * directly */
static PyObject *core_submit;

/* engine.submit(*args[1:1 + nargs], **kwargs): args[0] is set to the engine */
static PyObject *
engine_submit_call(PyObject *engine, PyObject **args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (PyObject_TypeCheck(engine, &EngineType) &&
        _PyType_Lookup(Py_TYPE(engine), s_submit) == core_submit)
        return engine_submit((EngineObject *)engine, args + 1, nargs, kwnames);
    args[0] = engine;
    return PyObject_VectorcallMethod(s_submit, args, (nargs + 1) | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                     kwnames);
}

/* kernels.resolve(kernel): a registered name found in the registry's ``named`` (name ->
 * (kernel, prepared)) directly, anything else by the method */
/* (kernel, prepared) from the registry's ``direct`` mapping, or NULL without an error
 * where it has no entry for the kernel (or is not a plain WeakKeyDictionary) */
static PyObject *
direct_entry(PyObject *kernels, PyObject *kernel)
{
    if (!PyObject_TypeCheck(kernel, (PyTypeObject *)q_kernel_type))
        return NULL; /* (only Kernels are its keys: a plain callable goes to resolve) */
    PyObject *direct = PyObject_GetAttr(kernels, s_direct);
    if (direct == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *data = Py_TYPE(direct) == (PyTypeObject *)q_weak_key_dict
                         ? PyObject_GetAttr(direct, s_data) : NULL;
    Py_DECREF(direct);
    if (data == NULL || !PyDict_CheckExact(data)) {
        Py_XDECREF(data);
        PyErr_Clear(); /* (an error reading it: resolve meets it again) */
        return NULL;
    }
    PyObject *ref = PyWeakref_NewRef(kernel, NULL);
    PyObject *prepared = ref ? PyDict_GetItemWithError(data, ref) : NULL; /* borrowed */
    PyObject *e = prepared ? PyTuple_Pack(2, kernel, prepared) : NULL;
    Py_XDECREF(ref);
    Py_DECREF(data);
    if (e == NULL)
        PyErr_Clear(); /* (an object no weak reference or hash takes: resolve's to say) */
    return e;
}

static PyObject *
registry_entry(PyObject *kernels, PyObject *kernel)
{
    if (PyUnicode_CheckExact(kernel)) {
        PyObject *named = PyObject_GetAttr(kernels, s_named);
        if (named == NULL)
            return NULL;
        PyObject *e = PyDict_CheckExact(named) ? PyDict_GetItemWithError(named, kernel) : NULL;
        Py_XINCREF(e);
        Py_DECREF(named);
        if (e != NULL || PyErr_Occurred())
            return e;
    }
    else if (q_weak_key_dict != NULL) {
        /* a Kernel given by object, prepared before: its entry in the registry's ``direct``
         * (a WeakKeyDictionary: its ``data`` maps a weak reference of the kernel to the
         * prepared form), as resolve finds it; anything else goes to resolve */
        PyObject *e = direct_entry(kernels, kernel);
        if (e != NULL || PyErr_Occurred())
            return e;
    }
    return PyObject_CallMethodOneArg(kernels, s_resolve, kernel);
}

static int
hold(QueueObject *self, PyObject *lane, Held *h)
{
    if (!self->engine || !self->table || !self->slots || !lane || !self->kernels ||
        !self->owner || !self->device)
        return 0; /* a field deleted: the reference says so */
    if (Py_TYPE(self->slots) != &SlotMapType)
        return 0; /* another slot map: the reference calls its methods */
    h->engine = self->engine;
    h->table = self->table;
    h->slots = self->slots;
    h->lane = lane;
    h->kernels = self->kernels;
    Py_INCREF(h->engine);
    Py_INCREF(h->table);
    Py_INCREF(h->slots);
    Py_INCREF(h->lane);
    Py_INCREF(h->kernels);
    return 1;
}

static void
release(Held *h)
{
    Py_DECREF(h->engine);
    Py_DECREF(h->table);
    Py_DECREF(h->slots);
    Py_DECREF(h->lane);
    Py_DECREF(h->kernels);
}

/* sync mode turned on during the call (by a callback): wait for the op and raise its
 * error, as the reference's check after queueing does (0 on error) */
static int
settle_if_sync(QueueObject *self, PyObject *op)
{
    int on = mod_true(q_sync, s_ON_);
    if (on <= 0)
        return on == 0;
    PyObject *oid = op_get(op, offsetof(OpObject, id), s_id);
    if (oid == NULL)
        return 0;
    PyObject *r = PyObject_CallMethodOneArg((PyObject *)self, s_settle, oid);
    Py_DECREF(oid);
    Py_XDECREF(r);
    return r != NULL;
}

/* the on_done keyword of a call taking two positional arguments and only that keyword:
 * 1 (found or absent, *on_done set), 0 if the reference must take the call */
static int
only_on_done(Py_ssize_t nargs, PyObject *const *args, PyObject *kwnames, PyObject **on_done)
{
    *on_done = Py_None;
    if (nargs != 2)
        return 0;
    if (kwnames == NULL)
        return 1;
    if (PyTuple_GET_SIZE(kwnames) != 1 ||
        PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "on_done") != 0)
        return 0;
    *on_done = args[2];
    return 1;
}

/* the engine callback reporting to on_done (None for None): the table's reporter */
static PyObject *
reporter(Held *h, PyObject *on_done)
{
    if (on_done == Py_None) {
        Py_INCREF(Py_None);
        return Py_None;
    }
    /* the library's own callbacks: what OpTable.reporter gives for them, themselves */
    if (is_table(h->table) && PyObject_TypeCheck(on_done, (PyTypeObject *)q_engine_callback))
        return Py_NewRef(on_done);
    return PyObject_CallMethodOneArg(h->table, s_reporter, on_done);
}

static PyObject *
q_upload_impl(QueueObject *self, Held *h, PyObject *const *args, Py_ssize_t nargsf,
             PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *on_done;
    if (!only_on_done(nargs, args, kwnames, &on_done))
        return delegate(r_upload, (PyObject *)self, args, nargsf, kwnames);
    PyObject *data = args[0], *buffer = args[1];
    int ok = queue_usable(self);
    if (ok < 0)
        return NULL;
    if (!ok || !is_ring(buffer))
        return delegate(r_upload, (PyObject *)self, args, nargsf, kwnames);
    RingObject *ring = (RingObject *)buffer;
    PyObject *dtype = PyObject_GetAttr(buffer, s_dtype);
    if (dtype == NULL)
        return NULL;
    Py_ssize_t n = plain_array(data, dtype, 0);
    Py_DECREF(dtype);
    if (n < 0)
        return NULL;
    /* (TripleBuffer.capacity, its size: every slot's capacity) */
    Py_ssize_t cap = ring->slots != NULL && PyTuple_GET_SIZE(ring->slots) > 0
                         ? ((SlotObject *)PyTuple_GET_ITEM(ring->slots, 0))->capacity
                         : attr_ssize(buffer, s_capacity);
    if (cap == -1 && PyErr_Occurred())
        return NULL;
    PyObject *dev = n > 0 && n <= cap ? PyObject_GetAttr(buffer, s_device) : NULL;
    if (dev == NULL && PyErr_Occurred())
        return NULL;
    int here = dev == self->device;
    Py_XDECREF(dev);
    if (!here)
        return delegate(r_upload, (PyObject *)self, args, nargsf, kwnames);
    PyObject *done = reporter(h, on_done);
    if (done == NULL)
        return NULL;
    PyObject *slot = ring_take(ring, FREE_I);
    if (slot == NULL) {
        Py_DECREF(done);
        return NULL;
    }
    if (slot == Py_None) { /* no FREE slot: nothing changed; the reference says why */
        Py_DECREF(slot);
        Py_DECREF(done);
        return delegate(r_upload, (PyObject *)self, args, nargsf, kwnames);
    }
    PyObject *view = NULL, *hazards = NULL, *src = NULL, *op = NULL;
    /* (closed by another thread since the take: refused) */
    view = slot_head((SlotObject *)slot, n);
    if (view == NULL)
        goto undo;
    hazards = slot_write_hazards((SlotObject *)slot);
    if (hazards == NULL)
        goto undo;
    src = flat(data);
    if (src == NULL)
        goto undo;
    {
        PyObject *sargs[13] = {NULL, h->lane, q_UPLOAD, Py_None, empty_tuple, hazards,
                               NULL, view, src, view, done};
        PyObject *kind = PyLong_FromLong(H2D);
        if (kind == NULL)
            goto undo;
        sargs[6] = kind;
        op = engine_submit_call(h->engine, sargs, 8, kw_keep_done);
        Py_DECREF(kind);
    }
    if (op == NULL)
        goto undo;
    Py_CLEAR(view);
    Py_CLEAR(hazards);
    Py_CLEAR(src);
    Py_DECREF(done);
    PyObject *oid = op_get(op, offsetof(OpObject, id), s_id);
    int rc = oid ? slotmap_filled((SlotMapObject *)h->slots, (SlotObject *)slot, op, oid, n)
                 : -1;
    Py_XDECREF(oid);
    Py_DECREF(slot);
    if (rc < 0) {
        Py_DECREF(op);
        return NULL;
    }
    if (!settle_if_sync(self, op)) {
        Py_DECREF(op);
        return NULL;
    }
    PyObject *id = new_id(h, op);
    Py_DECREF(op);
    return id;
undo:
    ring_untake(ring, (SlotObject *)slot, FREE_I);
    Py_XDECREF(view);
    Py_XDECREF(hazards);
    Py_XDECREF(src);
    Py_DECREF(slot);
    Py_DECREF(done);
    return NULL;
}

static PyObject *
q_download_impl(QueueObject *self, Held *h, PyObject *const *args, Py_ssize_t nargsf,
               PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *on_done;
    if (!only_on_done(nargs, args, kwnames, &on_done))
        return delegate(r_download, (PyObject *)self, args, nargsf, kwnames);
    PyObject *buffer = args[0], *dst = args[1];
    int ok = queue_usable(self);
    if (ok < 0)
        return NULL;
    if (!ok || !is_ring(buffer))
        return delegate(r_download, (PyObject *)self, args, nargsf, kwnames);
    RingObject *ring = (RingObject *)buffer;
    PyObject *slot = ring_peek(ring, PROCESSING_I, 0);
    if (slot == NULL)
        return NULL;
    Py_INCREF(slot);
    PyObject *dtype = NULL, *view = NULL, *w = NULL, *src = NULL, *deps = NULL, *keep = NULL,
             *root = NULL, *op = NULL, *r = NULL, *done = NULL;
    if (slot == Py_None)
        goto to_reference;
    dtype = PyObject_GetAttr(buffer, s_dtype);
    if (dtype == NULL)
        goto fail;
    Py_ssize_t n = plain_array(dst, dtype, 1);
    if (n < 0)
        goto fail;
    Py_ssize_t valid = ((SlotObject *)slot)->valid;
    if (n == 0 || n < valid)
        goto to_reference;
    view = flat(dst);
    if (view == NULL)
        goto fail;
    if (n != valid) {
        PyObject *cut = PySequence_GetSlice(view, 0, valid);
        if (cut == NULL)
            goto fail;
        Py_SETREF(view, cut);
    }
    done = reporter(h, on_done);
    if (done == NULL)
        goto fail;
    w = Py_NewRef(((SlotObject *)slot)->writer);
    src = slot_array((SlotObject *)slot);
    if (src == NULL)
        goto fail;
    deps = w == Py_None ? (Py_INCREF(empty_tuple), empty_tuple) : PyTuple_Pack(1, w);
    keep = deps ? PyTuple_Pack(2, src, dst) : NULL;
    root = keep ? Py_NewRef(((SlotObject *)slot)->failed) : NULL;
    if (root == NULL)
        goto fail;
    {
        PyObject *kind = PyLong_FromLong(D2H);
        if (kind == NULL)
            goto fail;
        PyObject *sargs[13] = {NULL, h->lane, q_DOWNLOAD, Py_None, deps, empty_tuple,
                               kind, view, src, keep, done, root};
        op = engine_submit_call(h->engine, sargs, 8, kw_keep_done_root);
        Py_DECREF(kind);
    }
    if (op == NULL)
        goto fail;
    r = ring_take(ring, PROCESSING_I);
    if (r == NULL)
        goto fail;
    Py_CLEAR(r);
    {
        PyObject *oid = op_get(op, offsetof(OpObject, id), s_id);
        PyObject *one_slot = oid ? PyTuple_Pack(1, slot) : NULL;
        int rc = one_slot ? slot_read((SlotObject *)slot, op, oid) : -1;
        if (rc == 0)
            rc = slotmap_touched((SlotMapObject *)h->slots, oid, one_slot);
        Py_XDECREF(oid);
        Py_XDECREF(one_slot);
        if (rc < 0)
            goto fail;
    }
    if (!settle_if_sync(self, op))
        goto fail;
    PyObject *id = new_id(h, op);
    Py_DECREF(slot);
    Py_DECREF(dtype);
    Py_DECREF(view);
    Py_DECREF(w);
    Py_DECREF(src);
    Py_DECREF(deps);
    Py_DECREF(keep);
    Py_DECREF(root);
    Py_DECREF(op);
    Py_DECREF(done);
    return id;
to_reference:
    Py_DECREF(slot);
    Py_XDECREF(dtype);
    return delegate(r_download, (PyObject *)self, args, nargsf, kwnames);
fail:
    Py_DECREF(slot);
    Py_XDECREF(dtype);
    Py_XDECREF(view);
    Py_XDECREF(w);
    Py_XDECREF(src);
    Py_XDECREF(deps);
    Py_XDECREF(keep);
    Py_XDECREF(root);
    Py_XDECREF(op);
    Py_XDECREF(done);
    return NULL;
}

static const char *compute_kw[] = {"deps", "args", "extra", "config", "outputs", "on_done",
                                   NULL};

/* True if ``o`` is an empty tuple or list (the default outputs) */
static int
empty_seq(PyObject *o)
{
    return (PyTuple_Check(o) && PyTuple_GET_SIZE(o) == 0) ||
           (PyList_Check(o) && PyList_GET_SIZE(o) == 0);
}

static PyObject *
q_compute_impl(QueueObject *self, Held *h, PyObject *const *args, Py_ssize_t nargsf,
              PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *deps = empty_tuple, *extra = Py_None, *on_done = Py_None;
    if (nargs < 1 || nargs > 2)
        return delegate(r_compute, (PyObject *)self, args, nargsf, kwnames);
    if (nargs == 2)
        deps = args[1];
    if (kwnames != NULL) {
        for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(kwnames); k++) {
            PyObject *key = PyTuple_GET_ITEM(kwnames, k), *v = args[nargs + k];
            int j = 0;
            while (compute_kw[j] && PyUnicode_CompareWithASCIIString(key, compute_kw[j]) != 0)
                j++;
            if (j == 0 && nargs == 1)
                deps = v;
            else if (j == 2 && (v == Py_None || PyTuple_CheckExact(v)))
                extra = v; /* a tuple of values: the kernel's arguments after the arrays */
            else if (j == 5)
                on_done = v;
            else if (!(compute_kw[j] && ((j == 4 && empty_seq(v)) ||
                                         (j >= 1 && j != 4 && v == Py_None))))
                return delegate(r_compute, (PyObject *)self, args, nargsf, kwnames);
        }
    }
    int ok = queue_usable(self);
    if (ok < 0)
        return NULL;
    /* device arrays among the extra values are swapped for the backend's: the reference */
    for (Py_ssize_t i = 0; ok && extra != Py_None && i < PyTuple_GET_SIZE(extra); i++)
        ok = Py_TYPE(PyTuple_GET_ITEM(extra, i)) != (PyTypeObject *)q_device_array;
    if (!ok)
        return delegate(r_compute, (PyObject *)self, args, nargsf, kwnames);
    PyObject *entry = NULL, *kernel = NULL, *prepared = NULL, *dep_ids = NULL, *slots = NULL,
             *pending = NULL, *arrays = NULL, *ext = NULL, *config = NULL, *waits = NULL,
             *quiet = NULL, *root = NULL, *inflight = NULL, *op = NULL, *keep = NULL,
             *kname = NULL, *failed = NULL, *r = NULL, *kind = NULL, *done = NULL;
    entry = registry_entry(h->kernels, args[0]);
    if (entry == NULL)
        goto fail;
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2) {
        PyErr_SetString(PyExc_TypeError, "the kernel registry must give (kernel, prepared)");
        goto fail;
    }
    kernel = PyTuple_GET_ITEM(entry, 0);
    prepared = PyTuple_GET_ITEM(entry, 1);
    dep_ids = is_table(h->table) ? table_resolve_deps((TableObject *)h->table, deps)
                                 : PyObject_CallMethodOneArg(h->table, s_resolve_deps, deps);
    if (dep_ids == NULL)
        goto fail;
    if (!PyList_Check(dep_ids)) {
        PyErr_SetString(PyExc_TypeError, "resolve_deps must give a list");
        goto fail;
    }
    done = reporter(h, on_done);
    if (done == NULL)
        goto fail;
    if (PyList_GET_SIZE(dep_ids))
        slots = slotmap_data_slots((SlotMapObject *)h->slots, dep_ids);
    else
        slots = PyList_New(0);
    if (slots == NULL)
        goto fail;
    if (PyList_GET_SIZE(slots) == 1) { /* the common case: one upload, its buffer's oldest */
        SlotObject *s0 = (SlotObject *)PyList_GET_ITEM(slots, 0);
        PyObject *oldest = NULL;
        if (s0->state != UPLOADING_I)
            pending = PyList_New(0);
        else if (is_ring(s0->buffer) &&
                 (oldest = ring_peek((RingObject *)s0->buffer, UPLOADING_I, 0)) ==
                     (PyObject *)s0)
            pending = Py_NewRef(slots);
        else if (oldest == NULL && PyErr_Occurred())
            goto fail;
        else
            pending = PyObject_CallOneArg(q_pending_uploads, slots);
        if (pending == NULL)
            goto fail;
    }
    else if (PyList_GET_SIZE(slots)) {
        pending = PyObject_CallOneArg(q_pending_uploads, slots);
        if (pending == NULL)
            goto fail;
    }
    else {
        Py_INCREF(slots);
        pending = slots;
    }
    static SlotAttr c_uses;
    int uses = true_of(slot_attr(kernel, s_uses_arrays, &c_uses));
    if (uses < 0)
        goto fail;
    if (!uses) {
        Py_INCREF(empty_tuple);
        arrays = empty_tuple;
    }
    else {
        Py_ssize_t ns = PyList_GET_SIZE(slots);
        arrays = PyList_New(ns);
        if (arrays == NULL)
            goto fail;
        for (Py_ssize_t i = 0; i < ns; i++) {
            PyObject *a = slot_array((SlotObject *)PyList_GET_ITEM(slots, i));
            if (a == NULL)
                goto fail;
            PyList_SET_ITEM(arrays, i, a);
        }
    }
    static SlotAttr c_defaults;
    if (extra != Py_None) {
        Py_INCREF(extra);
        ext = extra;
    }
    else if ((ext = slot_attr(kernel, s_defaults, &c_defaults)) == NULL)
        goto fail;
    {
        static SlotAttr c_check;
        PyObject *check = slot_attr(kernel, s_check, &c_check);
        if (check == NULL)
            goto fail;
        if (check != Py_None) {
            r = PyObject_CallOneArg(check, ext);
            Py_DECREF(check);
            if (r == NULL)
                goto fail;
            Py_CLEAR(r);
        }
        else
            Py_DECREF(check);
    }
    static SlotAttr c_config;
    config = slot_attr(kernel, s_config, &c_config);
    if (config == NULL)
        goto fail;
    int has = truthy(config);
    if (has < 0)
        goto fail;
    if (!has) {
        Py_ssize_t n = 1;
        if (PyObject_Size(arrays) > 0) {
            PyObject *first = PySequence_GetItem(arrays, 0);
            if (first == NULL)
                goto fail;
            n = PyObject_Size(first);
            Py_DECREF(first);
            if (n < 0)
                goto fail;
        }
        PyObject *nobj = PyLong_FromSsize_t(n);
        if (nobj == NULL)
            goto fail;
        PyObject *cfg = PyObject_CallMethodOneArg((PyObject *)self, s_default_config, nobj);
        Py_DECREF(nobj);
        if (cfg == NULL)
            goto fail;
        Py_SETREF(config, cfg);
    }
    /* data flows from each dependency and each slot's writer; a slot rewritten in
     * place also follows its readers */
    static SlotAttr c_inflight;
    inflight = slot_attr(h->engine, s_inflight, &c_inflight);
    if (inflight == NULL || !PyDict_Check(inflight)) {
        if (inflight != NULL)
            PyErr_SetString(PyExc_TypeError, "the engine's inflight must be a dict");
        goto fail;
    }
    waits = PyList_New(0);
    quiet = PyList_New(0);
    if (waits == NULL || quiet == NULL)
        goto fail;
    Py_INCREF(Py_None);
    root = Py_None;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(dep_ids); i++) {
        PyObject *id = PyList_GET_ITEM(dep_ids, i);
        PyObject *dep = PyDict_GetItemWithError(inflight, id);
        if (dep != NULL) {
            if (PyList_Append(waits, dep) < 0)
                goto fail;
        }
        else if (PyErr_Occurred())
            goto fail;
        else if (root == Py_None) {
            int any = attr_true(h->table, s_failed_total);
            if (any < 0)
                goto fail;
            if (any) {
                PyObject *pair = PyObject_CallMethodOneArg(h->table, s_root_pair, id);
                if (pair == NULL)
                    goto fail;
                Py_SETREF(root, pair);
            }
        }
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(slots); i++) {
        SlotObject *sl = (SlotObject *)PyList_GET_ITEM(slots, i);
        PyObject *w = Py_NewRef(sl->writer);
        int add = 0;
        if (w != Py_None) {
            int c = PySequence_Contains(waits, w);
            if (c < 0) {
                Py_DECREF(w);
                goto fail;
            }
            add = !c;
        }
        if (add && PyList_Append(waits, w) < 0) {
            Py_DECREF(w);
            goto fail;
        }
        Py_DECREF(w);
        PyObject *readers = Py_NewRef(sl->readers);
        int some = PyList_GET_SIZE(readers) > 0;
        if (some > 0) {
            PyObject *ext2 = list_extend(quiet, readers);
            if (ext2 == NULL) {
                Py_DECREF(readers);
                goto fail;
            }
            Py_DECREF(ext2);
        }
        Py_DECREF(readers);
        if (some < 0)
            goto fail;
    }
    keep = PyTuple_Pack(2, arrays, ext);
    static SlotAttr c_kname;
    kname = keep ? slot_attr(kernel, s_name_attr, &c_kname) : NULL;
    kind = kname ? PyLong_FromLong(LAUNCH) : NULL;
    if (kind == NULL)
        goto fail;
    {
        PyObject *sargs[14] = {NULL, h->lane, q_COMPUTE, kname, waits, quiet, kind,
                               prepared, config, arrays, ext, keep, done, root};
        op = engine_submit_call(h->engine, sargs, 10, kw_keep_done_root);
    }
    if (op == NULL)
        goto fail;
    Py_ssize_t npending = PyObject_Size(pending);
    if (npending < 0)
        goto fail;
    for (Py_ssize_t i = 0; i < npending; i++) {
        PyObject *sl = PySequence_GetItem(pending, i);
        if (sl == NULL)
            goto fail;
        PyObject *buf = PyObject_GetAttr(sl, s_buffer);
        Py_DECREF(sl);
        if (buf == NULL)
            goto fail;
        if (is_ring(buf))
            r = ring_take((RingObject *)buf, UPLOADING_I);
        else {
            PyObject *one_ = PyLong_FromLong(UPLOADING_I);
            r = one_ ? PyObject_CallMethodOneArg(buf, s_take, one_) : NULL;
            Py_XDECREF(one_);
        }
        Py_DECREF(buf);
        if (r == NULL)
            goto fail;
        Py_CLEAR(r);
    }
    {
        PyObject *err = op_get(op, offsetof(OpObject, error), s_error);
        if (err == NULL)
            goto fail;
        if (err != Py_None)
            failed = PyObject_CallOneArg(root_of, op);
        else {
            Py_INCREF(Py_None);
            failed = Py_None;
        }
        Py_DECREF(err);
        if (failed == NULL)
            goto fail;
    }
    if (PyList_GET_SIZE(slots)) {
        PyObject *oid = op_get(op, offsetof(OpObject, id), s_id);
        if (oid == NULL)
            goto fail;
        int rc = 0;
        for (Py_ssize_t i = 0; rc == 0 && i < PyList_GET_SIZE(slots); i++)
            rc = slot_updated((SlotObject *)PyList_GET_ITEM(slots, i), op, oid, failed);
        if (rc == 0)
            rc = slotmap_touched((SlotMapObject *)h->slots, oid, slots);
        Py_DECREF(oid);
        if (rc < 0)
            goto fail;
    }
    if (!settle_if_sync(self, op))
        goto fail;
    PyObject *id = new_id(h, op);
    Py_DECREF(entry);
    Py_DECREF(dep_ids);
    Py_DECREF(slots);
    Py_DECREF(pending);
    Py_DECREF(arrays);
    Py_DECREF(ext);
    Py_DECREF(config);
    Py_DECREF(inflight);
    Py_DECREF(waits);
    Py_DECREF(quiet);
    Py_DECREF(root);
    Py_DECREF(op);
    Py_DECREF(keep);
    Py_DECREF(kname);
    Py_DECREF(kind);
    Py_DECREF(failed);
    Py_DECREF(done);
    return id;
fail:
    Py_XDECREF(entry);
    Py_XDECREF(dep_ids);
    Py_XDECREF(slots);
    Py_XDECREF(pending);
    Py_XDECREF(arrays);
    Py_XDECREF(ext);
    Py_XDECREF(config);
    Py_XDECREF(inflight);
    Py_XDECREF(waits);
    Py_XDECREF(quiet);
    Py_XDECREF(root);
    Py_XDECREF(op);
    Py_XDECREF(keep);
    Py_XDECREF(kname);
    Py_XDECREF(kind);
    Py_XDECREF(failed);
    Py_XDECREF(done);
    return NULL;
}

/* the queue calls: the coordinator's fields held, then the fast path or the reference */
#define QUEUE_CALL(name, ref, lane_field)                                                   \
    static PyObject *name(QueueObject *self, PyObject *const *args, Py_ssize_t nargsf,      \
                          PyObject *kwnames)                                                \
    {                                                                                       \
        Held h;                                                                             \
        if (!hold(self, self->lane_field, &h))                                              \
            return delegate(ref, (PyObject *)self, args, nargsf, kwnames);                  \
        PyObject *r = name##_impl(self, &h, args, nargsf, kwnames);                         \
        release(&h);                                                                        \
        return r;                                                                           \
    }

QUEUE_CALL(q_upload, r_upload, up)
QUEUE_CALL(q_download, r_download, down)
QUEUE_CALL(q_compute, r_compute, compute)

#define QUEUE_FIELD(name, field) \
    {name, T_OBJECT_EX, offsetof(QueueObject, field), 0, NULL}

static PyMemberDef queue_members[] = {
    QUEUE_FIELD("_owner", owner), QUEUE_FIELD("_engine", engine),
    QUEUE_FIELD("_device", device), QUEUE_FIELD("_table", table),
    QUEUE_FIELD("_kernels", kernels), QUEUE_FIELD("_slots", slots), QUEUE_FIELD("_up", up),
    QUEUE_FIELD("_compute", compute), QUEUE_FIELD("_down", down), {NULL},
};

static PyMethodDef queue_methods[] = {
    {"queue_upload", (PyCFunction)(void (*)(void))q_upload, METH_FASTCALL | METH_KEYWORDS,
     "See prism_gpu.AsyncCoordinator.queue_upload."},
    {"queue_compute", (PyCFunction)(void (*)(void))q_compute, METH_FASTCALL | METH_KEYWORDS,
     "See prism_gpu.AsyncCoordinator.queue_compute."},
    {"queue_download", (PyCFunction)(void (*)(void))q_download,
     METH_FASTCALL | METH_KEYWORDS, "See prism_gpu.AsyncCoordinator.queue_download."},
    {NULL},
};

static PyTypeObject QueueType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "prism_gpu._ccore.QueueCore",
    .tp_doc = "The coordinator's queue calls (compiled).",
    .tp_basicsize = sizeof(QueueObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)queue_dealloc,
    .tp_traverse = (traverseproc)queue_traverse,
    .tp_clear = (inquiry)queue_clear,
    .tp_members = queue_members,
    .tp_methods = queue_methods,
};

/* whether NpFields matches the arrays of the numpy imported (1), or not (0): what
 * Python sees of a 2x3 float32 test array (its data address, dimensions, dtype, flags,
 * also once made read-only, and of a transposed view) against the fields; -1 on error */
static int
np_fields_match(void)
{
    int ok = 0;
    PyObject *a = PyObject_CallFunction(q_ndarray, "(ii)s", 2, 3, "f4");
    PyObject *t = NULL, *iface = NULL, *dt = NULL, *flags = NULL;
    if (a == NULL)
        goto done;
    NpFields *f = (NpFields *)a;
    iface = PyObject_GetAttrString(a, "__array_interface__");
    dt = PyObject_GetAttrString(a, "dtype");
    if (iface == NULL || dt == NULL)
        goto done;
    PyObject *data = PyDict_GetItemString(iface, "data"); /* (address, read-only) */
    if (data == NULL || !PyTuple_Check(data) || PyTuple_GET_SIZE(data) < 1)
        goto done;
    void *addr = PyLong_AsVoidPtr(PyTuple_GET_ITEM(data, 0));
    if (addr == NULL && PyErr_Occurred())
        goto done;
    ok = f->data == addr && f->nd == 2 && f->dimensions[0] == 2 && f->dimensions[1] == 3 &&
         f->descr == dt && (f->flags & (NP_C_CONTIGUOUS | NP_WRITEABLE)) ==
                               (NP_C_CONTIGUOUS | NP_WRITEABLE);
    if (!ok)
        goto done;
    flags = PyObject_GetAttrString(a, "flags");
    if (flags == NULL || PyObject_SetAttrString(flags, "writeable", Py_False) < 0)
        goto done;
    t = PyObject_GetAttrString(a, "T");
    ok = t != NULL && !(f->flags & NP_WRITEABLE) &&
         ((NpFields *)t)->nd == 2 && !(((NpFields *)t)->flags & NP_C_CONTIGUOUS);
done:
    Py_XDECREF(a);
    Py_XDECREF(t);
    Py_XDECREF(iface);
    Py_XDECREF(dt);
    Py_XDECREF(flags);
    if (PyErr_Occurred())
        return -1;
    return ok;
}

static PyObject *
setup_queue(PyObject *module, PyObject *helpers)
{
    if (!PyDict_Check(helpers)) {
        PyErr_SetString(PyExc_TypeError, "setup_queue() takes a dict");
        return NULL;
    }
    struct {
        const char *key;
        PyObject **slot;
    } want[] = {{"reference", &q_reference}, {"TripleBuffer", &q_ring_type},
                {"ndarray", &q_ndarray},     {"sync", &q_sync},
                {"pending_uploads", &q_pending_uploads}, {"UPLOAD", &q_UPLOAD},
                {"COMPUTE", &q_COMPUTE},     {"DOWNLOAD", &q_DOWNLOAD},
                {"DeviceArray", &q_device_array}, {"OpTable", &q_table_type},
                {"EngineCallback", &q_engine_callback},
                {"WeakKeyDictionary", &q_weak_key_dict}, {"Kernel", &q_kernel_type}};
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        PyObject *v = PyDict_GetItemString(helpers, want[i].key);
        if (v == NULL) {
            PyErr_Format(PyExc_KeyError, "setup_queue() needs %s", want[i].key);
            return NULL;
        }
        Py_INCREF(v);
        Py_XSETREF(*want[i].slot, v);
    }
    if (!PyType_Check(q_ring_type) || !PyType_Check(q_ndarray) ||
        !PyType_Check(q_table_type) || !PyType_Check(q_engine_callback) ||
        !PyType_Check(q_kernel_type)) {
        PyErr_SetString(PyExc_TypeError, "setup_queue() needs the ring, array, table and kernel types");
        return NULL;
    }
    np_fields_ok = np_fields_match();
    if (np_fields_ok < 0)
        return NULL;
    Py_XSETREF(r_upload, PyObject_GetAttrString(q_reference, "queue_upload"));
    Py_XSETREF(r_compute, PyObject_GetAttrString(q_reference, "queue_compute"));
    Py_XSETREF(r_download, PyObject_GetAttrString(q_reference, "queue_download"));
    if (!r_upload || !r_compute || !r_download)
        return NULL;
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- for _cpipe.c */

PyObject *
pipe_submit(PyObject *engine, PyObject **args, Py_ssize_t nargs)
{
    if (core_submit == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the queue calls are not set up");
        return NULL;
    }
    return engine_submit_call(engine, args, nargs, NULL);
}

PyObject *
core_op_field(PyObject *op, int which)
{
    return which == 0   ? op_get(op, offsetof(OpObject, id), s_id)
           : which == 1 ? op_get(op, offsetof(OpObject, error), s_error)
                        : op_get(op, offsetof(OpObject, event), s_event);
}

PyObject *
core_root_of(PyObject *op)
{
    if (root_of == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the compiled core is not set up");
        return NULL;
    }
    return PyObject_CallOneArg(root_of, op);
}

int
core_is_ring(PyObject *o)
{
    return q_ring_type != NULL && is_ring(o);
}

Py_ssize_t
core_plain_array(PyObject *a, PyObject *dtype, int writable)
{
    return q_ndarray == NULL ? 0 : plain_array(a, dtype, writable);
}

PyObject *
core_flat(PyObject *a)
{
    return flat(a);
}

/* ---------------------------------------------------------------- the module */

static PyObject *
setup(PyObject *self, PyObject *helpers)
{
    if (!PyDict_Check(helpers)) {
        PyErr_SetString(PyExc_TypeError, "setup() takes a dict");
        return NULL;
    }
    struct {
        const char *key;
        PyObject **slot;
    } want[] = {{"root_of", &root_of},
                {"dependency_error", &dependency_error},
                {"own_error", &own_error},
                {"refuse_in_callback", &refuse_in_callback},
                {"KERNEL", &KERNEL},
                {"PrismGpuError", &PrismGpuError},
                {"trace", &trace_mod},
                {"nvtx", &nvtx_mod}};
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        PyObject *v = PyDict_GetItemString(helpers, want[i].key);
        if (v == NULL) {
            PyErr_Format(PyExc_KeyError, "setup() needs %s", want[i].key);
            return NULL;
        }
        Py_INCREF(v);
        Py_XSETREF(*want[i].slot, v);
    }
    Py_RETURN_NONE;
}

static PyObject *
np_fields(PyObject *module, PyObject *unused)
{
    return PyBool_FromLong(np_fields_ok);
}

static PyMethodDef methods[] = {
    {"setup", (PyCFunction)setup, METH_O, "setup(helpers): the Python side's functions."},
    {"np_fields", (PyCFunction)np_fields, METH_NOARGS,
     "np_fields(): whether the queue calls read numpy arrays' fields directly (set up)."},
    {"setup_queue", (PyCFunction)setup_queue, METH_O,
     "setup_queue(helpers): the queue calls' reference, types and constants."},
    {"setup_ring", (PyCFunction)setup_ring, METH_O,
     "setup_ring(helpers): the ring's states (in cycle order) and errors."},
    {"setup_pipe", (PyCFunction)setup_pipe, METH_O,
     "setup_pipe(helpers): the pipeline's reference queue_ops and constants."},
    {"pipe_ops", (PyCFunction)(void (*)(void))pipe_ops, METH_FASTCALL,
     "pipe_ops(queue, engine, ...): _pipequeue.queue_ops, compiled."},
    {"pipe_fast_io", (PyCFunction)(void (*)(void))pipe_fast_io, METH_FASTCALL,
     "pipe_fast_io(entry, inputs, outputs): _pipefeed.fast_io, compiled."},
    {"pipe_slots", (PyCFunction)(void (*)(void))pipe_slots, METH_FASTCALL,
     "pipe_slots(bufs, touched): the next FREE slot of each buffer written, or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ccore", "The engine's hot path, compiled.", -1, methods,
};

/* (name,): a call's keyword names, interned as code's are */
static PyObject *
kw_tuple(const char *name)
{
    PyObject *key = PyUnicode_InternFromString(name);
    if (key == NULL)
        return NULL;
    PyObject *t = PyTuple_Pack(1, key);
    Py_DECREF(key);
    return t;
}

static int
intern_all(void)
{
    struct {
        PyObject **slot;
        const char *text;
    } names[] = {
        {&s_stream, "stream"}, {&s_event, "event"}, {&s_error, "error"}, {&s_ops, "ops"},
        {&s_wait, "wait"}, {&s_record, "record"}, {&s_launch, "launch"},
        {&s_copy_h2d, "copy_h2d"}, {&s_copy_d2h, "copy_d2h"}, {&s_query, "query"},
        {&s_popleft, "popleft"}, {&s_append, "append"}, {&s_throttle, "throttle"},
        {&s_next, "next"}, {&s_create_event, "create_event"}, {&s_ACTIVE, "ACTIVE"},
        {&s_STATE, "STATE"}, {&s_index, "index"}, {&s_nbytes, "nbytes"}, {&s_begin, "begin"},
        {&s_ON, "ON"}, {&s_range_start, "range_start"}, {&s_range_end, "range_end"},
        {&s_name, "name"}, {&s_value, "value"}, {&s_drop_start, "_drop_start"},
        {&s_note_root, "_note_root"}, {&s_attribute, "_attribute"},
        {&s_elapsed_ms, "elapsed_ms"},
        {&s_complete, "complete"}, {&s_Trace, "Trace"}, {&s_HELD_EVENTS, "HELD_EVENTS"},
        {&s_read_times, "read_times"}, {&s_lane, "lane"}, {&s_harvest, "harvest"},
        {&s_get, "get"}, {&s_synchronize, "synchronize"}, {&s_timing, "timing"},
        {&s_close, "close"},
        {&s_closed, "closed"}, {&s_dtype, "dtype"}, {&s_capacity, "capacity"},
        {&s_flags, "flags"}, {&s_c_contiguous, "c_contiguous"}, {&s_size, "size"},
        {&s_device, "device"}, {&s_take, "take"}, {&s_ndim, "ndim"}, {&s_reshape, "reshape"},
        {&s_id_type, "id_type"}, {&s_id, "id"}, {&s_ON_, "_ON"},
        {&s_writeable, "writeable"}, {&s_resolve, "resolve"}, {&s_named, "named"}, {&s_direct, "direct"}, {&s_data, "data"},
        {&s_resolve_deps, "resolve_deps"}, {&s_uses_arrays, "uses_arrays"},
        {&s_defaults, "defaults"}, {&s_check, "check"},
        {&s_config, "config"}, {&s_default_config, "_default_config"},
        {&s_failed_total, "failed_total"}, {&s_root_pair, "root_pair"},
        {&s_buffer, "buffer"}, {&s_submit, "submit"}, {&s_name_attr, "name"},
        {&s_inflight, "inflight"}, {&s_reporter, "reporter"}, {&s_settle, "_settle"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        *names[i].slot = PyUnicode_InternFromString(names[i].text);
        if (*names[i].slot == NULL)
            return 0;
    }
    kw_propagate = kw_tuple("propagate");
    kw_stamp = kw_tuple("stamp");
    kw_oid = kw_tuple("oid");
    kw_force = kw_tuple("force");
    minus_one = PyLong_FromLong(-1);
    one = PyLong_FromLong(1);
    empty_tuple = PyTuple_New(0);
    for (int j = 0; j < 14; j++) {
        submit_kw_obj[j] = PyUnicode_InternFromString(submit_kw[j]);
        if (submit_kw_obj[j] == NULL)
            return 0;
    }
    kw_keep_done = PyTuple_Pack(2, submit_kw_obj[10], submit_kw_obj[11]);
    kw_keep_done_root = PyTuple_Pack(3, submit_kw_obj[10], submit_kw_obj[11],
                                     submit_kw_obj[13]);
    minus_one_tuple = Py_BuildValue("(i)", -1);
    if (!kw_keep_done || !kw_keep_done_root || !minus_one_tuple)
        return 0;
    return kw_propagate && kw_stamp && kw_oid && kw_force && minus_one && one && empty_tuple;
}

PyMODINIT_FUNC
PyInit__ccore(void)
{
    if (!intern_all() || PyType_Ready(&OpType) < 0 || PyType_Ready(&EngineType) < 0 ||
        PyType_Ready(&QueueType) < 0)
        return NULL;
    core_submit = _PyType_Lookup(&EngineType, s_submit); /* (borrowed: the type is static) */
    if (core_submit == NULL) {
        PyErr_SetString(PyExc_SystemError, "EngineCore has no submit");
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (ring_add_types(m) < 0 || table_add_type(m) < 0 || pipe_add_types(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&OpType);
    Py_INCREF(&EngineType);
    Py_INCREF(&QueueType);
    if (PyModule_AddObject(m, "Op", (PyObject *)&OpType) < 0 ||
        PyModule_AddObject(m, "EngineCore", (PyObject *)&EngineType) < 0 ||
        PyModule_AddObject(m, "QueueCore", (PyObject *)&QueueType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
