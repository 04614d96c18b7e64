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
#define PY_SSIZE_T_CLEAN
#include <Python.h>
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
    *s_attribute, *s_elapsed_ms, *s_give_event, *s_complete, *s_Trace, *s_HELD_EVENTS,
    *s_read_times, *s_lane;
static PyObject *kw_propagate, *kw_stamp, *kw_oid, *kw_force;

/* ---------------------------------------------------------------- the op record */

typedef struct {
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
    Py_VISIT(op->id);
    Py_VISIT(op->type);
    Py_VISIT(op->lane);
    Py_VISIT(op->event);
    Py_VISIT(op->start);
    Py_VISIT(op->end);
    Py_VISIT(op->name);
    Py_VISIT(op->error);
    Py_VISIT(op->keep);
    Py_VISIT(op->on_done);
    Py_VISIT(op->deps);
    Py_VISIT(op->trace);
    return 0;
}

static int
op_clear(OpObject *op)
{
    Py_CLEAR(op->id);
    Py_CLEAR(op->type);
    Py_CLEAR(op->lane);
    Py_CLEAR(op->event);
    Py_CLEAR(op->start);
    Py_CLEAR(op->end);
    Py_CLEAR(op->name);
    Py_CLEAR(op->error);
    Py_CLEAR(op->keep);
    Py_CLEAR(op->on_done);
    Py_CLEAR(op->deps);
    Py_CLEAR(op->trace);
    return 0;
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

typedef struct {
    PyObject_HEAD
    PyObject *device, *table, *inflight, *lanes, *pool, *tpool, *in_callback, *tracer,
        *traced, *callback_errors;
    Py_ssize_t max_in_flight;
    char timing;
} EngineObject;

static PyObject *engine_complete(EngineObject *self, PyObject *op);

static int
engine_traverse(EngineObject *e, visitproc visit, void *arg)
{
    Py_VISIT(e->device);
    Py_VISIT(e->table);
    Py_VISIT(e->inflight);
    Py_VISIT(e->lanes);
    Py_VISIT(e->pool);
    Py_VISIT(e->tpool);
    Py_VISIT(e->in_callback);
    Py_VISIT(e->tracer);
    Py_VISIT(e->traced);
    Py_VISIT(e->callback_errors);
    return 0;
}

static int
engine_clear(EngineObject *e)
{
    Py_CLEAR(e->device);
    Py_CLEAR(e->table);
    Py_CLEAR(e->inflight);
    Py_CLEAR(e->lanes);
    Py_CLEAR(e->pool);
    Py_CLEAR(e->tpool);
    Py_CLEAR(e->in_callback);
    Py_CLEAR(e->tracer);
    Py_CLEAR(e->traced);
    Py_CLEAR(e->callback_errors);
    return 0;
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
    e->inflight = PyDict_New();
    e->lanes = PyList_New(0);
    e->pool = PyList_New(0);
    e->tpool = PyList_New(0);
    e->callback_errors = PyList_New(0);
    if (!e->inflight || !e->lanes || !e->pool || !e->tpool || !e->callback_errors) {
        Py_DECREF(e);
        return NULL;
    }
    e->max_in_flight = 1024;
    return (PyObject *)e;
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

static int
in_callback(EngineObject *self)
{
    return self->in_callback != NULL && truthy(self->in_callback);
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
    return call_method1(self->device, s_create_event, timing ? Py_True : Py_False);
}

static int
set_field(PyObject **field, PyObject *v)
{
    Py_INCREF(v);
    Py_XSETREF(*field, v);
    return 0;
}

static const char *submit_kw[] = {"c", "d", "keep", "on_done", "timing", "root", NULL};

static PyObject *
engine_submit(EngineObject *self, PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    /* lane, op_type, name, deps, quiet, kind, a, b, then c, d, keep, on_done, timing, root */
    PyObject *opt[6] = {Py_None, Py_None, Py_None, Py_None, Py_None, Py_None};
    if (nargs < 8 || nargs > 10) {
        PyErr_Format(PyExc_TypeError, "submit() takes 8 to 10 positional arguments, got %zd",
                     nargs);
        return NULL;
    }
    for (Py_ssize_t i = 8; i < nargs; i++)
        opt[i - 8] = args[i];
    if (kwnames != NULL) {
        for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(kwnames); k++) {
            PyObject *key = PyTuple_GET_ITEM(kwnames, k);
            int j = 0;
            while (submit_kw[j] && PyUnicode_CompareWithASCIIString(key, submit_kw[j]) != 0)
                j++;
            if (!submit_kw[j] || (j < 2 && j + 8 < nargs)) {
                PyErr_Format(PyExc_TypeError, "submit() got an unexpected or repeated "
                             "keyword argument %R", key);
                return NULL;
            }
            opt[j] = args[nargs + k];
        }
    }
    PyObject *lane = args[0], *op_type = args[1], *name = args[2], *deps = args[3],
             *quiet = args[4], *a = args[6], *b = args[7];
    PyObject *c = opt[0], *d = opt[1], *keep = opt[2], *on_done = opt[3], *timing = opt[4];
    long kind = PyLong_AsLong(args[5]);
    if (kind == -1 && PyErr_Occurred())
        return NULL;

    if (in_callback(self)) {
        PyObject *r = PyObject_CallOneArg(refuse_in_callback, self->in_callback);
        Py_XDECREF(r);
        return NULL;
    }
    if (self->inflight == NULL || !PyDict_Check(self->inflight)) {
        PyErr_SetString(PyExc_TypeError, "the engine's inflight must be a dict");
        return NULL;
    }
    if (PyDict_GET_SIZE(self->inflight) >= self->max_in_flight) {
        PyObject *r = PyObject_CallMethodNoArgs((PyObject *)self, s_throttle);
        if (r == NULL)
            return NULL;
        Py_DECREF(r);
    }
    PyObject *root = opt[5];
    Py_INCREF(root);
    OpObject *op = (OpObject *)op_make(op_type, lane, name);
    PyObject *stream = NULL, *seq = NULL, *tracer = NULL, *mark = NULL, *start = NULL,
             *table = NULL, *oid = NULL, *ev = NULL, *r = NULL;
    if (op == NULL)
        goto fail;
    stream = PyObject_GetAttr(lane, s_stream);
    if (stream == NULL)
        goto fail;
    Py_INCREF(deps);
    op->deps = deps;
    seq = PySequence_Fast(deps, "deps must be a sequence of ops");
    if (seq == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *dep = PySequence_Fast_GET_ITEM(seq, i);
        PyObject *dev = op_get(dep, offsetof(OpObject, event), s_event);
        if (dev == NULL)
            goto fail;
        if (dev != Py_None) {
            r = call_method1(stream, s_wait, dev);
            if (r == NULL) {
                Py_DECREF(dev);
                goto fail;
            }
            Py_CLEAR(r);
        }
        Py_DECREF(dev);
        if (root == Py_None) {
            PyObject *derr = op_get(dep, offsetof(OpObject, error), s_error);
            if (derr == NULL)
                goto fail;
            int failed = derr != Py_None;
            Py_DECREF(derr);
            if (failed) {
                PyObject *rt = PyObject_CallOneArg(root_of, dep);
                if (rt == NULL)
                    goto fail;
                Py_SETREF(root, rt);
            }
        }
    }
    Py_CLEAR(seq);
    seq = PySequence_Fast(quiet, "quiet must be a sequence of ops");
    if (seq == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *dep = PySequence_Fast_GET_ITEM(seq, i);
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
    int timed = timing == Py_None ? self->timing : truthy(timing);
    if (timed < 0)
        goto fail;
    tracer = PyObject_GetAttr(trace_mod, s_ACTIVE);
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
        PyObject *state = PyObject_GetAttr(trace_mod, s_STATE);
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
        PyObject *tr = PyTuple_Pack(4, index, nbytes, timed ? Py_True : Py_False, tracer);
        Py_DECREF(index);
        Py_DECREF(nbytes);
        if (tr == NULL)
            goto fail;
        Py_XSETREF(op->trace, tr);
    }
    PyObject *on = PyObject_GetAttr(nvtx_mod, s_ON);
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
            if (kind != LAUNCH || PyObject_IsInstance(exc, PrismGpuError) > 0) {
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
    PyObject *ops = PyObject_GetAttr(lane, s_ops);
    if (ops == NULL)
        goto fail;
    r = call_method1(ops, s_append, (PyObject *)op);
    Py_DECREF(ops);
    if (r == NULL)
        goto fail;
    Py_CLEAR(r);
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
    return (PyObject *)op;
fail:
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
    if (dict_discard(self->inflight, op->id) < 0)
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
        held = self->traced;
        Py_INCREF(held);
        r = call_method1(held, s_append, opobj);
        if (r == NULL)
            goto fail_start;
        Py_CLEAR(r);
    }
    else if (start != Py_None) { /* (an op whose trace ended: its times are not wanted) */
        r = call_method1((PyObject *)self, s_give_event, start);
        if (r == NULL)
            goto fail_start;
        Py_CLEAR(r);
        PyObject *end = op->end; /* its closing event */
        Py_INCREF(end);
        r = call_method1((PyObject *)self, s_give_event, end);
        Py_DECREF(end);
        if (r == NULL)
            goto fail_start;
        Py_CLEAR(r);
        set_field(&op->start, Py_None);
        set_field(&op->end, Py_None);
        set_field(&op->trace, Py_None);
    }
    {
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
        PyObject *trace_cls = PyObject_GetAttr(trace_mod, s_Trace);
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
    PyObject *ops = PyObject_GetAttr(lane, s_ops);
    if (ops == NULL)
        return NULL;
    Py_ssize_t n = PyObject_Size(ops);
    if (n < 0)
        goto fail;
    if (upto != Py_None) {
        while (PyObject_Size(ops) > 0) {
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

static PyObject *
engine_harvest_lane(EngineObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "_harvest_lane(lane, upto=None)");
        return NULL;
    }
    return harvest_lane(self, args[0], nargs == 2 ? args[1] : Py_None);
}

static PyObject *
engine_harvest(EngineObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "harvest(upto=None)");
        return NULL;
    }
    PyObject *upto = nargs ? args[0] : Py_None;
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
    if (ok && !PyList_Check(self->lanes)) {
        PyErr_SetString(PyExc_TypeError, "the engine's lanes must be a list");
        ok = 0;
    }
    for (Py_ssize_t i = 0; ok && i < PyList_GET_SIZE(self->lanes); i++) {
        PyObject *lane = PyList_GET_ITEM(self->lanes, i);
        Py_INCREF(lane);
        PyObject *ops = PyObject_GetAttr(lane, s_ops);
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
    if (ok) {
        set_in_callback(self, Py_False);
        Py_RETURN_NONE;
    }
    PyObject *exc = take_exception();
    set_in_callback(self, Py_False);
    restore_exception(exc);
    return NULL;
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
    {"max_in_flight", T_PYSSIZET, offsetof(EngineObject, max_in_flight), 0, NULL},
    {"timing", T_BOOL, offsetof(EngineObject, timing), 0, NULL},
    {NULL},
};

static PyMethodDef engine_methods[] = {
    {"submit", (PyCFunction)(void (*)(void))engine_submit, METH_FASTCALL | METH_KEYWORDS,
     "Queue one op (see _core.EngineCore.submit)."},
    {"_complete", (PyCFunction)engine_complete, METH_O, "Complete one op known done."},
    {"_harvest_lane", (PyCFunction)(void (*)(void))engine_harvest_lane, METH_FASTCALL,
     "Complete the done ops at the head of a lane."},
    {"harvest", (PyCFunction)(void (*)(void))engine_harvest, METH_FASTCALL,
     "Complete every op known done."},
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

static PyMethodDef methods[] = {
    {"setup", (PyCFunction)setup, METH_O, "setup(helpers): the Python side's functions."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ccore", "The engine's hot path, compiled.", -1, methods,
};

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
        {&s_elapsed_ms, "elapsed_ms"}, {&s_give_event, "give_event"},
        {&s_complete, "complete"}, {&s_Trace, "Trace"}, {&s_HELD_EVENTS, "HELD_EVENTS"},
        {&s_read_times, "read_times"}, {&s_lane, "lane"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        *names[i].slot = PyUnicode_InternFromString(names[i].text);
        if (*names[i].slot == NULL)
            return 0;
    }
    kw_propagate = Py_BuildValue("(s)", "propagate");
    kw_stamp = Py_BuildValue("(s)", "stamp");
    kw_oid = Py_BuildValue("(s)", "oid");
    kw_force = Py_BuildValue("(s)", "force");
    minus_one = PyLong_FromLong(-1);
    one = PyLong_FromLong(1);
    empty_tuple = PyTuple_New(0);
    return kw_propagate && kw_stamp && kw_oid && kw_force && minus_one && one && empty_tuple;
}

PyMODINIT_FUNC
PyInit__ccore(void)
{
    if (!intern_all() || PyType_Ready(&OpType) < 0 || PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&OpType);
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Op", (PyObject *)&OpType) < 0 ||
        PyModule_AddObject(m, "EngineCore", (PyObject *)&EngineType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
