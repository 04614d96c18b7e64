/* A pipeline iteration's ops queued from C: _pipequeue.queue_ops (the reference), statement
 * for statement, where every ring is an exact TripleBuffer of the compiled twins, every
 * slot a Slot and every mapping a dict (anything else: the reference runs). A stage that
 * rewrites a buffer it reads is queued by the queue's own Python method, as there. */

#include "_ccore.h"

static PyObject *reference;  /* _pipequeue.queue_ops */
static PyObject *fast_io_reference; /* _pipefeed.fast_io */
static PyObject *k_upload, *k_compute, *k_download, *k_h2d, *k_d2h, *k_launch;
static Py_ssize_t queued_at = -1; /* an accumulator's QUEUED index */
static PyObject *s_rewrite, *s_wait_ops, *one, *empty;

#define STEP_FIELDS 13

/* acc[index] += 1 (an accumulator is a list: its item replaced in place) */
static int
add_one(PyObject *acc, Py_ssize_t index)
{
    if (PyList_CheckExact(acc) && index >= 0 && index < PyList_GET_SIZE(acc)) {
        PyObject *n = PyNumber_InPlaceAdd(PyList_GET_ITEM(acc, index), one);
        if (n == NULL)
            return -1;
        if (index >= PyList_GET_SIZE(acc)) { /* (emptied by the addition's own code) */
            Py_DECREF(n);
            PyErr_SetString(PyExc_IndexError, "list assignment index out of range");
            return -1;
        }
        return PyList_SetItem(acc, index, n); /* (steals n; drops the old item) */
    }
    PyObject *key = PyLong_FromSsize_t(index);
    if (key == NULL)
        return -1;
    PyObject *v = PyObject_GetItem(acc, key);
    PyObject *n = v ? PyNumber_InPlaceAdd(v, one) : NULL;
    int r = n ? PyObject_SetItem(acc, key, n) : -1;
    Py_XDECREF(v);
    Py_XDECREF(n);
    Py_DECREF(key);
    return r;
}

/* acc[QUEUED] += 1 */
static int
bump(PyObject *acc)
{
    return add_one(acc, queued_at);
}

/* container[key] (new reference): a list indexed by an int in range directly */
static PyObject *
item(PyObject *container, PyObject *key)
{
    if (PyList_CheckExact(container) && PyLong_CheckExact(key)) {
        Py_ssize_t i = PyLong_AsSsize_t(key);
        if (i >= 0 && i < PyList_GET_SIZE(container))
            return Py_NewRef(PyList_GET_ITEM(container, i));
        PyErr_Clear();
    }
    return PyObject_GetItem(container, key);
}

/* bufs[b], checked again at every fetch (code run since the first check may have put
 * something else there): a new reference to an exact ring, or NULL with TypeError */
static PyObject *
ring_at(PyObject *bufs, PyObject *b)
{
    PyObject *buf = item(bufs, b);
    if (buf != NULL && !core_is_ring(buf)) {
        PyErr_Format(PyExc_TypeError, "pipeline buffer %R is no longer a TripleBuffer", b);
        Py_CLEAR(buf);
    }
    return buf;
}

/* slots[b], a Slot (borrowed from the dict; the caller holds the dict) */
static SlotObject *
slot_of(PyObject *slots, PyObject *b)
{
    PyObject *s = PyDict_GetItemWithError(slots, b);
    if (s == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetObject(PyExc_KeyError, b);
        return NULL;
    }
    if (!Py_IS_TYPE(s, &SlotType)) {
        PyErr_SetString(PyExc_TypeError, "a pipeline slot must be a Slot");
        return NULL;
    }
    return (SlotObject *)s;
}

/* a dict, or an empty mapping (the pipeline's "nothing fed"): 1 dict, 0 empty, -1 other */
static int
kind_of_map(PyObject *m)
{
    if (PyDict_CheckExact(m))
        return 1;
    Py_ssize_t n = PyObject_Size(m);
    if (n < 0)
        PyErr_Clear();
    return n == 0 ? 0 : -1;
}

/* whether the call is one this file does as the reference does */
static int
usable(PyObject *const *args)
{
    PyObject *bufs = args[2], *views = args[3], *steps = args[5], *copies = args[6],
             *fed = args[8], *touched = args[9], *slots = args[10], *valid = args[11],
             *downs = args[12];
    if (reference == NULL || queued_at < 0 || !PyList_CheckExact(bufs) ||
        !PyDict_CheckExact(views) || !PyList_CheckExact(steps) || !PyTuple_CheckExact(copies) ||
        PyTuple_GET_SIZE(copies) != 5 || !PyTuple_CheckExact(touched) ||
        !PyDict_CheckExact(slots) || kind_of_map(fed) < 0 || kind_of_map(valid) < 0 ||
        kind_of_map(downs) < 0)
        return 0;
    /* every buffer written is an exact ring (those fed among them: the flow starts from
     * them); each is checked again where it is used, as is each step */
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(touched); i++) {
        PyObject *b = PyTuple_GET_ITEM(touched, i);
        PyObject *buf = PyLong_CheckExact(b) ? item(bufs, b) : NULL;
        if (buf == NULL)
            PyErr_Clear();
        int ok = buf != NULL && core_is_ring(buf);
        Py_XDECREF(buf);
        if (!ok)
            return 0;
    }
    return 1;
}

/* the op's id appended to ``ops`` (a new reference to the id, or NULL) */
static PyObject *
note_id(PyObject *ops, PyObject *op)
{
    PyObject *oid = core_op_field(op, 0);
    if (oid == NULL || PyList_Append(ops, oid) < 0) {
        Py_XDECREF(oid);
        return NULL;
    }
    return oid;
}

static int
filled(SlotObject *s, PyObject *op, PyObject *oid, Py_ssize_t n)
{
    PyObject *old = slot_filled(s, op, oid, n);
    if (old == NULL)
        return -1;
    Py_DECREF(old); /* (the slot is whole again: releasing may run Python code) */
    return 0;
}

static int
uploads(PyObject *const *args, PyObject *ops)
{
    PyObject *bufs = args[2], *copies = args[6], *timed = args[7], *fed = args[8],
             *slots = args[10], *valid = args[11], *up = args[13], *eng = args[1];
    PyObject *timer = PyTuple_GET_ITEM(copies, 0), *acc = PyTuple_GET_ITEM(copies, 1);
    PyObject *b, *x;
    Py_ssize_t pos = 0;
    while (PyDict_Next(fed, &pos, &b, &x)) {
        Py_INCREF(b);
        Py_INCREF(x);
        PyObject *nobj = NULL, *buf = NULL, *slot = NULL, *view = NULL, *hz = NULL, *op = NULL,
                 *oid = NULL, *r = NULL;
        int ok = 0;
        nobj = PyObject_GetItem(valid, b);
        Py_ssize_t n = nobj ? PyNumber_AsSsize_t(nobj, PyExc_OverflowError) : -1;
        if (nobj == NULL || (n == -1 && PyErr_Occurred()))
            goto done;
        buf = ring_at(bufs, b);
        if (buf == NULL)
            goto done;
        slot = ring_take((RingObject *)buf, FREE_I);
        if (slot == NULL)
            goto done;
        if (slot == Py_None) {
            PyErr_SetNone(PyExc_AssertionError);
            goto done;
        }
        view = slot_head((SlotObject *)slot, n);
        hz = view ? slot_write_hazards((SlotObject *)slot) : NULL;
        if (hz == NULL)
            goto done;
        PyObject *sub[14] = {NULL, up, k_upload, Py_None, empty, hz, k_h2d, view,
                             x, Py_None, Py_None, view, timer, timed};
        op = pipe_submit(eng, sub, 13);
        if (op == NULL || bump(acc) < 0)
            goto done;
        oid = core_op_field(op, 0);
        if (oid == NULL || filled((SlotObject *)slot, op, oid, n) < 0)
            goto done;
        r = ring_take((RingObject *)buf, UPLOADING_I);
        if (r == NULL || PyDict_SetItem(slots, b, slot) < 0 || PyList_Append(ops, oid) < 0)
            goto done;
        ok = 1;
    done:
        Py_XDECREF(r);
        Py_XDECREF(oid);
        Py_XDECREF(op);
        Py_XDECREF(hz);
        Py_XDECREF(view);
        Py_XDECREF(slot);
        Py_XDECREF(buf);
        Py_XDECREF(nobj);
        Py_DECREF(x);
        Py_DECREF(b);
        if (!ok)
            return -1;
    }
    return 0;
}

/* every buffer written and not fed: its next slot taken, its valid length set */
static int
produced(PyObject *const *args, int any_fed)
{
    PyObject *bufs = args[2], *fed = args[8], *touched = args[9], *slots = args[10],
             *valid = args[11];
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(touched); i++) {
        PyObject *b = PyTuple_GET_ITEM(touched, i);
        if (any_fed) {
            int in = PyDict_Contains(fed, b);
            if (in < 0)
                return -1;
            if (in)
                continue;
        }
        PyObject *buf = ring_at(bufs, b);
        if (buf == NULL)
            return -1;
        PyObject *r = ring_produce((RingObject *)buf, NULL);
        Py_DECREF(buf);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
        SlotObject *s = slot_of(slots, b);
        if (s == NULL)
            return -1;
        Py_INCREF(s); /* (held: the look-up below may run code) */
        Py_ssize_t n = s->capacity;
        if (any_fed) {
            PyObject *v = PyDict_CheckExact(valid) ? PyDict_GetItemWithError(valid, b) : NULL;
            if (v != NULL && !PyLong_Check(v)) { /* (as the slot's member refuses it) */
                PyErr_Format(PyExc_TypeError, "a valid length must be an int, got %.100s",
                             Py_TYPE(v)->tp_name);
                v = NULL;
            }
            else if (v != NULL)
                n = PyLong_AsSsize_t(v);
            if (PyErr_Occurred()) {
                Py_DECREF(s);
                return -1;
            }
        }
        s->valid = n;
        Py_DECREF(s);
    }
    return 0;
}

/* the views a stage reads: views[s] = (s.full, s.valid, read_only(s.array)), made again
 * when the slot's array or length changed; the view appended to ``arrays`` */
static int
read_view(PyObject *views, PyObject *read_only, SlotObject *s, PyObject *arrays)
{
    PyObject *hit = PyDict_GetItemWithError(views, (PyObject *)s);
    if (hit == NULL && PyErr_Occurred())
        return -1;
    if (hit != NULL && PyTuple_CheckExact(hit) && PyTuple_GET_SIZE(hit) == 3 &&
        PyTuple_GET_ITEM(hit, 0) == s->full && PyLong_CheckExact(PyTuple_GET_ITEM(hit, 1))) {
        Py_ssize_t v = PyLong_AsSsize_t(PyTuple_GET_ITEM(hit, 1));
        if (v == -1 && PyErr_Occurred())
            return -1;
        if (v == s->valid)
            return PyList_Append(arrays, PyTuple_GET_ITEM(hit, 2));
    }
    else if (hit != NULL && !(PyTuple_CheckExact(hit) && PyTuple_GET_SIZE(hit) == 3)) {
        PyErr_SetString(PyExc_TypeError, "a pipeline view entry must be a 3-tuple");
        return -1;
    }
    PyObject *full = Py_NewRef(s->full);
    PyObject *valid = PyLong_FromSsize_t(s->valid);
    PyObject *arr = valid ? slot_array(s) : NULL;
    PyObject *ro = arr ? PyObject_CallOneArg(read_only, arr) : NULL;
    PyObject *entry = ro ? PyTuple_Pack(3, full, valid, ro) : NULL;
    int r = entry ? PyDict_SetItem(views, (PyObject *)s, entry) : -1;
    if (r == 0)
        r = PyList_Append(arrays, ro);
    Py_XDECREF(entry);
    Py_XDECREF(ro);
    Py_XDECREF(arr);
    Py_XDECREF(valid);
    Py_DECREF(full);
    return r;
}

/* the host waits for ``quiet`` if one of them is in flight: eng.wait_ops(quiet) */
static int
settle(PyObject *eng, PyObject *quiet)
{
    PyObject *seq = PySequence_Fast(quiet, "quiet ops");
    if (seq == NULL)
        return -1;
    int busy = 0;
    for (Py_ssize_t i = 0; !busy && i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *ev = core_op_field(PySequence_Fast_GET_ITEM(seq, i), 2);
        if (ev == NULL) {
            Py_DECREF(seq);
            return -1;
        }
        busy = ev != Py_None;
        Py_DECREF(ev);
    }
    Py_DECREF(seq);
    if (!busy)
        return 0;
    PyObject *r = PyObject_CallMethodOneArg(eng, s_wait_ops, quiet);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* one step that only reads what it reads and fills anew what it writes */
static int
step(PyObject *const *args, PyObject *st, PyObject *ops)
{
    PyObject *eng = args[1], *views = args[3], *read_only = args[4], *timed = args[7],
             *slots = args[10];
    PyObject *const *f = &PyTuple_GET_ITEM(st, 0);
    PyObject *lane = f[0], *name = f[1], *prepared = f[2], *config = f[3], *extra = f[5],
             *reads = f[6], *writes = f[7], *single = f[9], *timer = f[11], *acc = f[12];
    int uses_arrays = PyObject_IsTrue(f[4]);
    if (uses_arrays < 0)
        return -1;
    if (!PyTuple_CheckExact(reads) || !PyTuple_CheckExact(writes)) {
        PyErr_SetString(PyExc_TypeError, "a step's reads and writes must be tuples");
        return -1;
    }
    PyObject *arrays = PyList_New(0), *waits = PyList_New(0), *quiet = NULL, *op = NULL,
             *oid = NULL, *err = NULL;
    SlotObject *out = NULL;
    int ok = 0;
    if (arrays == NULL || waits == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(reads); i++) {
        SlotObject *s = slot_of(slots, PyTuple_GET_ITEM(reads, i));
        if (s == NULL)
            goto done;
        Py_INCREF(s);
        int r = (s->writer != Py_None ? PyList_Append(waits, s->writer) : 0) == 0
                    ? read_view(views, read_only, s, arrays) : -1;
        Py_DECREF(s);
        if (r < 0)
            goto done;
    }
    if (single != Py_None) {
        out = slot_of(slots, single);
        if (out == NULL)
            goto done;
        Py_INCREF(out);
        PyObject *a = slot_array(out);
        if (a == NULL || PyList_Append(arrays, a) < 0) {
            Py_XDECREF(a);
            goto done;
        }
        Py_DECREF(a);
        quiet = slot_write_hazards(out);
    }
    else if (PyTuple_GET_SIZE(writes)) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(writes); i++) {
            SlotObject *s = slot_of(slots, PyTuple_GET_ITEM(writes, i));
            PyObject *a = s ? slot_array(s) : NULL;
            if (a == NULL || PyList_Append(arrays, a) < 0) {
                Py_XDECREF(a);
                goto done;
            }
            Py_DECREF(a);
        }
        quiet = PyList_New(0);
        for (Py_ssize_t i = 0; quiet && i < PyTuple_GET_SIZE(writes); i++) {
            SlotObject *s = slot_of(slots, PyTuple_GET_ITEM(writes, i));
            PyObject *hz = s ? slot_write_hazards(s) : NULL;
            int r = hz ? PyList_SetSlice(quiet, PY_SSIZE_T_MAX, PY_SSIZE_T_MAX, hz) : -1;
            Py_XDECREF(hz);
            if (r < 0)
                Py_CLEAR(quiet);
        }
    }
    else
        quiet = Py_NewRef(empty);
    if (quiet == NULL || settle(eng, quiet) < 0)
        goto done;
    PyObject *sub[14] = {NULL, lane, k_compute, name, waits, quiet, k_launch, prepared, config,
                         uses_arrays ? arrays : empty, extra, arrays, timer, timed};
    op = pipe_submit(eng, sub, 13);
    if (op == NULL || bump(acc) < 0)
        goto done;
    oid = note_id(ops, op);
    if (oid == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(reads); i++) {
        SlotObject *s = slot_of(slots, PyTuple_GET_ITEM(reads, i));
        if (s == NULL || slot_read(s, op, oid) < 0)
            goto done;
    }
    err = core_op_field(op, 1);
    if (err == NULL)
        goto done;
    if (err == Py_None) {
        if (out != NULL) {
            if (filled(out, op, oid, out->valid) < 0)
                goto done;
        }
        else {
            for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(writes); i++) {
                SlotObject *s = slot_of(slots, PyTuple_GET_ITEM(writes, i));
                if (s == NULL)
                    goto done;
                Py_INCREF(s);
                int r = filled(s, op, oid, s->valid);
                Py_DECREF(s);
                if (r < 0)
                    goto done;
            }
        }
    }
    else { /* failed as it was queued, or a dependency had: the data it makes is spoilt */
        PyObject *failed = core_root_of(op);
        if (failed == NULL)
            goto done;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(writes); i++) {
            SlotObject *s = slot_of(slots, PyTuple_GET_ITEM(writes, i));
            if (s != NULL)
                Py_INCREF(s); /* (held: filling releases what the slot held, running code) */
            if (s == NULL || filled(s, op, oid, s->valid) < 0) {
                Py_XDECREF(s);
                Py_DECREF(failed);
                goto done;
            }
            Py_SETREF(s->failed, Py_NewRef(failed));
            Py_DECREF(s);
        }
        Py_DECREF(failed);
    }
    ok = 1;
done:
    Py_XDECREF(err);
    Py_XDECREF(oid);
    Py_XDECREF(op);
    Py_XDECREF(quiet);
    Py_XDECREF(out);
    Py_XDECREF(waits);
    Py_XDECREF(arrays);
    return ok ? 0 : -1;
}

static int
downloads(PyObject *const *args, PyObject *ops)
{
    PyObject *eng = args[1], *copies = args[6], *timed = args[7], *slots = args[10],
             *downs = args[12], *down = args[14];
    PyObject *acc = PyTuple_GET_ITEM(copies, 4);
    Py_ssize_t left = PyDict_GET_SIZE(downs), pos = 0;
    PyObject *b, *dst;
    while (PyDict_Next(downs, &pos, &b, &dst)) {
        Py_INCREF(b);
        Py_INCREF(dst);
        PyObject *src = NULL, *deps = NULL, *keep = NULL, *op = NULL, *oid = NULL;
        int ok = 0;
        SlotObject *s = slot_of(slots, b);
        if (s == NULL)
            goto done;
        Py_INCREF(s);
        PyObject *w = Py_NewRef(s->writer);
        src = slot_array(s);
        left -= 1;
        PyObject *timer = PyTuple_GET_ITEM(copies, left ? 2 : 3); /* the last ends it */
        deps = src ? (w != Py_None ? PyTuple_Pack(1, w) : Py_NewRef(empty)) : NULL;
        keep = deps ? PyTuple_Pack(2, src, dst) : NULL;
        Py_DECREF(w);
        if (keep == NULL) {
            Py_DECREF(s);
            goto done;
        }
        PyObject *failed = Py_NewRef(s->failed);
        PyObject *sub[15] = {NULL, down, k_download, Py_None, deps, empty, k_d2h, dst, src,
                             Py_None, Py_None, keep, timer, timed, failed};
        op = pipe_submit(eng, sub, 14);
        Py_DECREF(failed);
        if (op == NULL || bump(acc) < 0) {
            Py_DECREF(s);
            goto done;
        }
        PyObject *id = core_op_field(op, 0);
        int r = id ? slot_read(s, op, id) : -1;
        Py_XDECREF(id);
        Py_DECREF(s);
        if (r < 0)
            goto done;
        oid = note_id(ops, op);
        ok = oid != NULL;
    done:
        Py_XDECREF(oid);
        Py_XDECREF(op);
        Py_XDECREF(keep);
        Py_XDECREF(deps);
        Py_XDECREF(src);
        Py_DECREF(dst);
        Py_DECREF(b);
        if (!ok)
            return -1;
    }
    return 0;
}

PyObject *
pipe_ops(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 15) {
        PyErr_SetString(PyExc_TypeError, "pipe_ops() takes 15 arguments");
        return NULL;
    }
    if (reference == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "setup_pipe() was not called");
        return NULL;
    }
    int use = usable(args);
    if (use < 0)
        return NULL;
    if (!use)
        return PyObject_Vectorcall(reference, args, nargs, NULL);
    PyObject *queue = args[0], *bufs = args[2], *steps = args[5], *timed = args[7],
             *fed = args[8], *touched = args[9], *slots = args[10], *downs = args[12];
    PyObject *ops = PyList_New(0);
    if (ops == NULL)
        return NULL;
    Py_INCREF(steps); /* (held: a callback run below may drop the caller's) */
    int any_fed = PyDict_CheckExact(fed) && PyDict_GET_SIZE(fed) > 0;
    if (any_fed && uploads(args, ops) < 0)
        goto fail;
    if (produced(args, any_fed) < 0)
        goto fail;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(steps); i++) {
        PyObject *st = PyList_GET_ITEM(steps, i);
        Py_INCREF(st);
        int inplace = -1, r;
        if (!PyTuple_CheckExact(st) || PyTuple_GET_SIZE(st) != STEP_FIELDS) /* (changed since
                                                                             * usable()) */
            PyErr_SetString(PyExc_TypeError, "a compiled pipeline step must be a 13-tuple");
        else
            inplace = PyObject_IsTrue(PyTuple_GET_ITEM(st, 10));
        if (inplace < 0)
            r = -1;
        else if (inplace) { /* (a stage rewriting a buffer it reads) */
            PyObject *op = PyObject_CallMethodObjArgs(queue, s_rewrite, st, slots, timed, NULL);
            PyObject *id = op ? note_id(ops, op) : NULL;
            r = id ? 0 : -1;
            Py_XDECREF(id);
            Py_XDECREF(op);
        }
        else
            r = step(args, st, ops);
        Py_DECREF(st);
        if (r < 0)
            goto fail;
    }
    if (PyDict_CheckExact(downs) && PyDict_GET_SIZE(downs) > 0 && downloads(args, ops) < 0)
        goto fail;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(touched); i++) {
        /* FREE again on the host; the GPU orders the next write into the slot after this
         * iteration's readers */
        PyObject *buf = ring_at(bufs, PyTuple_GET_ITEM(touched, i));
        PyObject *r = buf ? ring_retire((RingObject *)buf, NULL) : NULL;
        Py_XDECREF(buf);
        if (r == NULL)
            goto fail;
        Py_DECREF(r);
    }
    Py_DECREF(steps);
    return ops;
fail:
    Py_DECREF(steps);
    Py_DECREF(ops);
    return NULL;
}

/* into ``into`` (a new dict), each of ``given``'s arrays flat when it passes against
 * ``specs`` (buffer -> (dtype, elements)): 1, 0 if one does not (the reference's checks
 * say why), -1 on error */
static int
plain_io(PyObject *given, PyObject *specs, int writable, PyObject *into)
{
    PyObject *b, *a;
    Py_ssize_t pos = 0;
    while (PyDict_Next(given, &pos, &b, &a)) {
        if (!PyLong_CheckExact(b)) /* (before the look-up, which compares it) */
            return 0;
        Py_INCREF(b); /* (held: the look-up may run code that changes ``given``) */
        Py_INCREF(a);
        PyObject *spec = PyDict_GetItemWithError(specs, b);
        Py_ssize_t want = -1;
        if (spec != NULL && PyTuple_CheckExact(spec) && PyTuple_GET_SIZE(spec) == 2 &&
            PyLong_CheckExact(PyTuple_GET_ITEM(spec, 1))) {
            Py_INCREF(spec);
            want = PyLong_AsSsize_t(PyTuple_GET_ITEM(spec, 1));
        }
        else
            spec = NULL; /* (none, or not a (dtype, int): the reference looks) */
        Py_ssize_t n = spec == NULL || (want == -1 && PyErr_Occurred())
                           ? (PyErr_Occurred() ? -1 : 0)
                           : core_plain_array(a, PyTuple_GET_ITEM(spec, 0), writable);
        Py_XDECREF(spec);
        int r = n < 0 ? -1 : n != want || n == 0 ? 0 : 1;
        PyObject *f = r > 0 ? core_flat(a) : NULL;
        if (r > 0 && (f == NULL || PyDict_SetItem(into, b, f) < 0))
            r = -1;
        Py_XDECREF(f);
        Py_DECREF(a);
        Py_DECREF(b);
        if (r <= 0)
            return r;
    }
    return 1;
}

PyObject *
pipe_fast_io(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "pipe_fast_io(entry, inputs, outputs)");
        return NULL;
    }
    PyObject *entry = args[0], *inputs = args[1], *outputs = args[2];
    if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 4 ||
        !PyDict_CheckExact(PyTuple_GET_ITEM(entry, 0)) ||
        !PyDict_CheckExact(PyTuple_GET_ITEM(entry, 1)) ||
        (inputs != Py_None && !PyDict_CheckExact(inputs)) ||
        (outputs != Py_None && !PyDict_CheckExact(outputs))) {
        if (fast_io_reference == NULL) {
            PyErr_SetString(PyExc_RuntimeError, "setup_pipe() was not called");
            return NULL;
        }
        return PyObject_Vectorcall(fast_io_reference, args, nargs, NULL);
    }
    PyObject *specs = PyTuple_GET_ITEM(entry, 0), *out_specs = PyTuple_GET_ITEM(entry, 1);
    PyObject *fed = PyDict_New(), *downs = PyDict_New(), *r = NULL;
    if (fed == NULL || downs == NULL)
        goto done;
    int ok = 1;
    if (inputs != Py_None && PyDict_GET_SIZE(inputs)) {
        /* (the buffers read back may be fewer: all written) */
        ok = PyDict_GET_SIZE(inputs) == PyDict_GET_SIZE(specs) ? plain_io(inputs, specs, 0, fed)
                                                               : 0;
    }
    else if (PyDict_GET_SIZE(specs))
        ok = 0;
    if (ok > 0 && outputs != Py_None && PyDict_GET_SIZE(outputs))
        ok = plain_io(outputs, out_specs, 1, downs);
    if (ok < 0)
        goto done;
    r = ok ? PyTuple_Pack(4, fed, downs, PyTuple_GET_ITEM(entry, 2), PyTuple_GET_ITEM(entry, 3))
           : Py_NewRef(Py_None);
done:
    Py_XDECREF(fed);
    Py_XDECREF(downs);
    return r;
}

/* pipe_slots(bufs, touched): {b: the next FREE slot of bufs[b]} for every buffer written,
 * or None where one has none (or holds an upload waiting for a compute) or is not an exact
 * ring: the reference loop then runs, and says why */
PyObject *
pipe_slots(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyList_CheckExact(args[0]) || !PyTuple_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "pipe_slots(bufs: list, touched: tuple)");
        return NULL;
    }
    PyObject *bufs = args[0], *touched = args[1];
    PyObject *slots = PyDict_New();
    if (slots == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(touched); i++) {
        PyObject *b = PyTuple_GET_ITEM(touched, i);
        PyObject *buf = PyLong_CheckExact(b) ? item(bufs, b) : NULL;
        if (buf == NULL && PyErr_Occurred())
            goto fail;
        int ours = buf != NULL && core_is_ring(buf) && !((RingObject *)buf)->closed &&
                   ((RingObject *)buf)->slots != NULL;
        PyObject *slot = ours ? ring_peek((RingObject *)buf, FREE_I, 0) : NULL;
        PyObject *up = slot != NULL && slot != Py_None
                           ? ring_peek((RingObject *)buf, UPLOADING_I, 0) : NULL;
        Py_XDECREF(buf);
        if (PyErr_Occurred())
            goto fail;
        if (up != Py_None || slot == NULL) { /* (None, or an upload waiting: the reference) */
            Py_DECREF(slots);
            Py_RETURN_NONE;
        }
        if (PyDict_SetItem(slots, b, slot) < 0)
            goto fail;
    }
    return slots;
fail:
    Py_DECREF(slots);
    return NULL;
}

PyObject *
setup_pipe(PyObject *module, PyObject *helpers)
{
    if (!PyDict_Check(helpers)) {
        PyErr_SetString(PyExc_TypeError, "setup_pipe() takes a dict");
        return NULL;
    }
    struct {
        const char *key;
        PyObject **slot;
    } want[] = {{"queue_ops", &reference},      {"fast_io", &fast_io_reference},
                {"UPLOAD", &k_upload},          {"COMPUTE", &k_compute},
                {"DOWNLOAD", &k_download},  {"H2D", &k_h2d},       {"D2H", &k_d2h},
                {"LAUNCH", &k_launch}};
    PyObject *q = PyDict_GetItemString(helpers, "QUEUED");
    if (q == NULL) {
        PyErr_SetString(PyExc_KeyError, "setup_pipe() needs QUEUED");
        return NULL;
    }
    Py_ssize_t at = PyNumber_AsSsize_t(q, PyExc_OverflowError);
    if (at == -1 && PyErr_Occurred())
        return NULL;
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        PyObject *v = PyDict_GetItemString(helpers, want[i].key);
        if (v == NULL) {
            PyErr_Format(PyExc_KeyError, "setup_pipe() needs %s", want[i].key);
            return NULL;
        }
        Py_XSETREF(*want[i].slot, Py_NewRef(v));
    }
    queued_at = at;
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- Tally */

/* The on_done of a sampled window's untimed ops of one lane (_sampling's reference closures,
 * compiled): counts the lane's reports into acc[index], notes a failed op's id in ``failed``
 * and, for ops ending an iteration, counts iterations while ``live``. */
typedef struct {
    PyObject_HEAD
    PyObject *acc, *failed;
    Py_ssize_t index, ended;
    int last, live;
    vectorcallfunc vectorcall;
} TallyObject;

static PyObject *
tally_call(TallyObject *t, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 2 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "a tally takes (op, ms)");
        return NULL;
    }
    if (add_one(t->acc, t->index) < 0)
        return NULL;
    PyObject *op = args[0];
    int r;
    PyObject *err = core_op_field(op, 1);
    if (err == NULL)
        return NULL;
    int failed = err != Py_None;
    Py_DECREF(err);
    if (failed) {
        PyObject *oid = core_op_field(op, 0);
        r = oid ? PySet_Add(t->failed, oid) : -1;
        Py_XDECREF(oid);
        if (r < 0)
            return NULL;
    }
    if (t->last && t->live)
        t->ended += 1;
    Py_RETURN_NONE;
}

static PyObject *
tally_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *acc, *failed;
    Py_ssize_t index;
    int last;
    static char *names[] = {"acc", "index", "failed", "last", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OnOp:Tally", names, &acc, &index, &failed,
                                     &last))
        return NULL;
    if (!PySet_CheckExact(failed)) { /* (its add is the set's own) */
        PyErr_Format(PyExc_TypeError, "Tally needs a set, got %.100s", Py_TYPE(failed)->tp_name);
        return NULL;
    }
    TallyObject *t = (TallyObject *)type->tp_alloc(type, 0);
    if (t == NULL)
        return NULL;
    t->acc = Py_NewRef(acc);
    t->failed = Py_NewRef(failed);
    t->index = index;
    t->last = last;
    t->live = 1;
    t->vectorcall = (vectorcallfunc)tally_call;
    return (PyObject *)t;
}

static int
tally_traverse(TallyObject *t, visitproc visit, void *arg)
{
    Py_VISIT(t->acc);
    Py_VISIT(t->failed);
    return 0;
}

static int
tally_clear(TallyObject *t)
{
    Py_CLEAR(t->acc);
    Py_CLEAR(t->failed);
    return 0;
}

static void
tally_dealloc(TallyObject *t)
{
    PyObject_GC_UnTrack(t);
    tally_clear(t);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyObject *
tally_live_get(TallyObject *t, void *unused)
{
    return PyBool_FromLong(t->live);
}

static int
tally_live_set(TallyObject *t, PyObject *v, void *unused)
{
    int b = v ? PyObject_IsTrue(v) : -1;
    if (b < 0) {
        if (v == NULL)
            PyErr_SetString(PyExc_AttributeError, "live cannot be deleted");
        return -1;
    }
    t->live = b;
    return 0;
}

static PyGetSetDef tally_getset[] = {
    {"live", (getter)tally_live_get, (setter)tally_live_set,
     "Whether ops ending an iteration are counted.", NULL},
    {NULL},
};

static PyMemberDef tally_members[] = {
    {"ended", T_PYSSIZET, offsetof(TallyObject, ended), READONLY,
     "Iterations counted (ops ending one, reported while live)."},
    {NULL},
};

PyTypeObject TallyType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "prism_gpu._ccore.Tally",
    .tp_basicsize = sizeof(TallyObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Tally(acc, index, failed, last): an untimed op's on_done (see _sampling).",
    .tp_new = tally_new,
    .tp_traverse = (traverseproc)tally_traverse,
    .tp_clear = (inquiry)tally_clear,
    .tp_dealloc = (destructor)tally_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(TallyObject, vectorcall),
    .tp_getset = tally_getset,
    .tp_members = tally_members,
};

int
pipe_add_types(PyObject *module)
{
    s_rewrite = PyUnicode_InternFromString("_rewrite");
    s_wait_ops = PyUnicode_InternFromString("wait_ops");
    one = PyLong_FromLong(1);
    empty = PyTuple_New(0);
    if (s_rewrite == NULL || s_wait_ops == NULL || one == NULL || empty == NULL)
        return -1;
    if (PyType_Ready(&TallyType) < 0)
        return -1;
    return PyModule_AddObjectRef(module, "Tally", (PyObject *)&TallyType);
}
