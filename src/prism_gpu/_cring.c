/* A ring's slots and state machine compiled: Slot, RingCore and SlotMap.
 *
 * _ring.py (PySlot, PyRingCore) and _slotmap.py (PySlotMap) hold the same code in
 * Python, the reference: these types do what it does, statement for statement, and the
 * test suite runs against both. The queue calls (_ccore.c) use them as structs.
 *
 * Thread safety: the reference guards each ring transition with a lock; here each one
 * runs whole under the interpreter lock (no Python code runs between its check and its
 * change), which is the same guarantee. Without the interpreter lock (a free-threaded
 * build) this does not compile, and the package runs its Python reference.
 */
#include "_ccore.h"
#include <structmember.h>

#ifdef Py_GIL_DISABLED
#error "the compiled ring relies on the interpreter lock"
#endif

static PyObject *cycle;                 /* the BufferState members, in cycle order */
static PyObject *closed_error, *order_error; /* InvalidOperationError, BufferUnavailableError */
static PyObject *s_id;

static int
refuse_closed(void)
{
    PyErr_SetString(closed_error, "this TripleBuffer is closed");
    return -1;
}

/* ---------------------------------------------------------------- Slot */

#define SLOT(o) ((SlotObject *)(o))

static PyObject *
slot_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *buffer, *index, *full;
    static char *kw[] = {"buffer", "index", "full", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO:Slot", kw, &buffer, &index, &full))
        return NULL;
    if (cycle == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "setup_ring() first");
        return NULL;
    }
    Py_ssize_t n = PyObject_Size(full);
    if (n < 0)
        return NULL;
    SlotObject *s = (SlotObject *)type->tp_alloc(type, 0);
    if (s == NULL)
        return NULL;
    s->buffer = Py_NewRef(buffer);
    s->index = Py_NewRef(index);
    s->state = FREE_I;
    s->full = Py_NewRef(full);
    s->valid = s->capacity = n;
    s->writer = Py_NewRef(Py_None);
    s->failed = Py_NewRef(Py_None);
    s->readers = PyList_New(0);
    s->ops = PyList_New(0);
    s->ref = s->readers && s->ops ? PyWeakref_NewRef((PyObject *)s, NULL) : NULL;
    if (s->ref == NULL) {
        Py_DECREF(s);
        return NULL;
    }
    return (PyObject *)s;
}

static int
slot_traverse(SlotObject *s, visitproc visit, void *arg)
{
    return visit_run(FIELD_RUN(s, buffer, ref), visit, arg);
}

static int
slot_clear(SlotObject *s)
{
    return clear_run(FIELD_RUN(s, buffer, ref));
}

static void
slot_dealloc(SlotObject *s)
{
    PyObject_GC_UnTrack(s);
    if (s->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)s);
    slot_clear(s);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

/* an object field: never deleted; readers and ops stay lists */
static PyObject *
slot_field_get(PyObject *o, void *offset)
{
    PyObject *v = *(PyObject **)((char *)o + (size_t)offset);
    return Py_NewRef(v ? v : Py_None);
}

static int
slot_field_set(PyObject *o, PyObject *v, void *offset)
{
    if (v == NULL) {
        PyErr_SetString(PyExc_AttributeError, "a slot's fields cannot be deleted");
        return -1;
    }
    size_t off = (size_t)offset;
    if ((off == offsetof(SlotObject, readers) || off == offsetof(SlotObject, ops)) &&
        !PyList_CheckExact(v)) {
        PyErr_Format(PyExc_TypeError, "a slot's %s must be a list, got %.100s",
                     off == offsetof(SlotObject, ops) ? "ops" : "readers", Py_TYPE(v)->tp_name);
        return -1;
    }
    PyObject **f = (PyObject **)((char *)o + off);
    Py_SETREF(*f, Py_NewRef(v));
    return 0;
}

static PyObject *
slot_state_get(SlotObject *s, void *unused)
{
    return Py_NewRef(PyTuple_GET_ITEM(cycle, s->state));
}

static int
slot_state_set(SlotObject *s, PyObject *v, void *unused)
{
    for (int i = 0; v != NULL && i < 4; i++)
        if (PyTuple_GET_ITEM(cycle, i) == v) {
            s->state = i;
            return 0;
        }
    PyErr_SetString(PyExc_TypeError, "a slot's state is a BufferState");
    return -1;
}

PyObject *
slot_array(SlotObject *s)
{
    if (s->full == Py_None) {
        refuse_closed();
        return NULL;
    }
    if (s->valid == s->capacity)
        return Py_NewRef(s->full);
    return PySequence_GetSlice(s->full, 0, s->valid);
}

static PyObject *
slot_array_get(SlotObject *s, void *unused)
{
    return slot_array(s);
}

PyObject *
slot_head(SlotObject *s, Py_ssize_t n)
{
    if (s->full == Py_None) {
        refuse_closed();
        return NULL;
    }
    if (n == s->capacity)
        return Py_NewRef(s->full);
    return PySequence_GetSlice(s->full, 0, n);
}

static PyObject *
slot_head_method(SlotObject *s, PyObject *n)
{
    if (PyLong_CheckExact(n)) {
        int overflow;
        long long k = PyLong_AsLongLongAndOverflow(n, &overflow);
        if (k == -1 && PyErr_Occurred())
            return NULL;
        if (!overflow)
            return slot_head(s, (Py_ssize_t)k);
    }
    /* any other number: full if n == capacity, else full[:n], as Python has it */
    if (s->full == Py_None) {
        refuse_closed();
        return NULL;
    }
    PyObject *cap = PyLong_FromSsize_t(s->capacity);
    int whole = cap ? PyObject_RichCompareBool(n, cap, Py_EQ) : -1;
    Py_XDECREF(cap);
    if (whole < 0)
        return NULL;
    if (s->full == Py_None) { /* closed by the comparison's own code */
        refuse_closed();
        return NULL;
    }
    if (whole)
        return Py_NewRef(s->full);
    PyObject *cut = PySlice_New(NULL, n, NULL);
    if (cut == NULL)
        return NULL;
    PyObject *r = PyObject_GetItem(s->full, cut);
    Py_DECREF(cut);
    return r;
}

PyObject *
slot_write_hazards(SlotObject *s)
{
    if (PyList_GET_SIZE(s->readers))
        return Py_NewRef(s->readers);
    if (s->writer != Py_None)
        return PyTuple_Pack(1, s->writer);
    return PyTuple_New(0);
}

static PyObject *
slot_write_hazards_method(SlotObject *s, PyObject *unused)
{
    return slot_write_hazards(s);
}

/* op.id, as Python reads it */
static PyObject *
id_of(PyObject *op)
{
    return PyObject_GetAttr(op, s_id);
}

/* ``op`` (id ``oid``) writes fresh data of ``valid`` elements; the ids of the ops on the
 * old data, or NULL */
PyObject *
slot_filled(SlotObject *s, PyObject *op, PyObject *oid, Py_ssize_t valid)
{
    PyObject *ops = PyList_New(1);
    if (ops == NULL)
        return NULL;
    PyObject *readers = PyList_New(0);
    if (readers == NULL) {
        Py_DECREF(ops);
        return NULL;
    }
    PyList_SET_ITEM(ops, 0, Py_NewRef(oid));
    PyObject *old = s->ops, *writer = s->writer, *old_readers = s->readers,
             *failed = s->failed;
    s->ops = ops;
    s->writer = Py_NewRef(op);
    s->readers = readers;
    s->valid = valid;
    s->failed = Py_NewRef(Py_None);
    /* (released once the slot is whole again: releasing may run Python code) */
    Py_DECREF(writer);
    Py_DECREF(old_readers);
    Py_DECREF(failed);
    return old;
}

static PyObject *
slot_filled_method(SlotObject *s, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "filled(op, valid) takes 2 arguments");
        return NULL;
    }
    Py_ssize_t valid = PyNumber_AsSsize_t(args[1], PyExc_OverflowError);
    if (valid == -1 && PyErr_Occurred())
        return NULL;
    PyObject *oid = id_of(args[0]);
    if (oid == NULL)
        return NULL;
    PyObject *old = slot_filled(s, args[0], oid, valid);
    Py_DECREF(oid);
    return old;
}

int
slot_updated(SlotObject *s, PyObject *op, PyObject *oid, PyObject *failed)
{
    PyObject *readers = PyList_New(0);
    if (readers == NULL || PyList_Append(s->ops, oid) < 0) {
        Py_XDECREF(readers);
        return -1;
    }
    PyObject *writer = s->writer, *old_readers = s->readers, *old_failed = NULL;
    s->writer = Py_NewRef(op);
    s->readers = readers;
    if (failed != Py_None && s->failed == Py_None) {
        old_failed = s->failed;
        s->failed = Py_NewRef(failed);
    }
    Py_DECREF(writer);
    Py_DECREF(old_readers);
    Py_XDECREF(old_failed);
    return 0;
}

static PyObject *
slot_updated_method(SlotObject *s, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "updated(op, failed=None) takes 1 or 2 arguments");
        return NULL;
    }
    PyObject *oid = id_of(args[0]);
    if (oid == NULL)
        return NULL;
    int r = slot_updated(s, args[0], oid, nargs == 2 ? args[1] : Py_None);
    Py_DECREF(oid);
    if (r < 0)
        return NULL;
    Py_RETURN_NONE;
}

int
slot_read(SlotObject *s, PyObject *op, PyObject *oid)
{
    if (PyList_Append(s->ops, oid) < 0)
        return -1;
    return PyList_Append(s->readers, op);
}

static PyObject *
slot_read_method(SlotObject *s, PyObject *op)
{
    PyObject *oid = id_of(op);
    if (oid == NULL)
        return NULL;
    int r = slot_read(s, op, oid);
    Py_DECREF(oid);
    if (r < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
slot_repr(SlotObject *s)
{
    PyObject *state = PyTuple_GET_ITEM(cycle, s->state);
    PyObject *name = PyObject_GetAttrString(state, "name");
    if (name == NULL)
        return NULL;
    PyObject *r = PyUnicode_FromFormat("Slot(index=%R, state=%S, valid=%zd)", s->index, name,
                                       s->valid);
    Py_DECREF(name);
    return r;
}

#define SLOT_FIELD(name, field, doc) \
    {name, slot_field_get, slot_field_set, doc, (void *)offsetof(SlotObject, field)}

static PyGetSetDef slot_getset[] = {
    SLOT_FIELD("buffer", buffer, "The TripleBuffer of the slot."),
    SLOT_FIELD("index", index, "The slot's position in its ring."),
    SLOT_FIELD("full", full, "The slot's whole device array (None once its ring is closed)."),
    SLOT_FIELD("writer", writer, "The last op that wrote the slot."),
    SLOT_FIELD("readers", readers, "The ops that read the slot since (a list)."),
    SLOT_FIELD("ops", ops, "Ids of the ops on the slot's current data (a list)."),
    SLOT_FIELD("failed", failed, "(root op id, its error) of spoiled data, or None."),
    SLOT_FIELD("ref", ref, "A weak reference to the slot."),
    {"state", (getter)slot_state_get, (setter)slot_state_set, "The slot's BufferState.",
     NULL},
    {"array", (getter)slot_array_get, NULL,
     "The slot's valid elements (refused once its ring is closed: read it once).", NULL},
    {NULL},
};

static PyMemberDef slot_members[] = {
    {"valid", T_PYSSIZET, offsetof(SlotObject, valid), 0, "Elements holding data."},
    {"capacity", T_PYSSIZET, offsetof(SlotObject, capacity), 0, "Elements of the slot."},
    {NULL},
};

static PyMethodDef slot_methods[] = {
    {"head", (PyCFunction)slot_head_method, METH_O,
     "The slot's first n elements; refused once its ring is closed."},
    {"write_hazards", (PyCFunction)slot_write_hazards_method, METH_NOARGS,
     "Ops a new write must follow on the device."},
    {"filled", (PyCFunction)(void (*)(void))slot_filled_method, METH_FASTCALL,
     "op writes fresh data of valid elements; the ids of the ops on the old data."},
    {"updated", (PyCFunction)(void (*)(void))slot_updated_method, METH_FASTCALL,
     "op read and rewrote the slot's data in place."},
    {"read", (PyCFunction)slot_read_method, METH_O, "op reads the slot's data."},
    {NULL},
};

PyTypeObject SlotType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "prism_gpu.Slot",
    .tp_doc = "One device slot of a ring, with the hazards of its memory (compiled; see "
              "prism_gpu._ring.PySlot).",
    .tp_basicsize = sizeof(SlotObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = slot_new,
    .tp_dealloc = (destructor)slot_dealloc,
    .tp_traverse = (traverseproc)slot_traverse,
    .tp_clear = (inquiry)slot_clear,
    .tp_weaklistoffset = offsetof(SlotObject, weakreflist),
    .tp_repr = (reprfunc)slot_repr,
    .tp_getset = slot_getset,
    .tp_members = slot_members,
    .tp_methods = slot_methods,
};

/* ---------------------------------------------------------------- RingCore */

static int
ring_ready(RingObject *r)
{
    if (r->slots != NULL)
        return 0;
    PyErr_SetString(PyExc_RuntimeError, "this ring was never started (_ring_init)");
    return -1;
}

/* ready and not closed (as the reference checks, before it reads a cursor): 0, or -1 */
static int
ring_open(RingObject *r)
{
    if (ring_ready(r) < 0)
        return -1;
    return r->closed ? refuse_closed() : 0;
}

static SlotObject *
ring_slot(RingObject *r, Py_ssize_t i)
{
    return SLOT(PyTuple_GET_ITEM(r->slots, i));
}

static int
ring_traverse(RingObject *r, visitproc visit, void *arg)
{
    Py_VISIT(r->slots);
    return 0;
}

static int
ring_clear(RingObject *r)
{
    Py_CLEAR(r->slots);
    return 0;
}

static void
ring_dealloc(RingObject *r)
{
    PyObject_GC_UnTrack(r);
    ring_clear(r);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyObject *
ring_init_method(RingObject *r, PyObject *slots)
{
    if (r->slots != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this ring was started already");
        return NULL;
    }
    PyObject *t = PySequence_Tuple(slots);
    if (t == NULL)
        return NULL;
    if (r->slots != NULL) { /* started meanwhile, by the iteration's own code */
        Py_DECREF(t);
        PyErr_SetString(PyExc_RuntimeError, "this ring was started already");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(t);
    for (Py_ssize_t i = 0; i < n; i++)
        if (Py_TYPE(PyTuple_GET_ITEM(t, i)) != &SlotType) {
            Py_DECREF(t);
            PyErr_SetString(PyExc_TypeError, "a ring's slots are Slots");
            return NULL;
        }
    if (n < 1) {
        Py_DECREF(t);
        PyErr_SetString(PyExc_ValueError, "a ring needs a slot");
        return NULL;
    }
    r->slots = t;
    r->depth = n;
    r->cursor[0] = r->cursor[1] = r->cursor[2] = r->cursor[3] = 0;
    r->closed = 0;
    Py_RETURN_NONE;
}

/* a cursor's position (a state's in the cycle), 0 to 3; -1 on error */
static int
which_arg(PyObject *o)
{
    long w = PyLong_AsLong(o);
    if (w == -1 && PyErr_Occurred())
        return -1;
    if (w < 0 || w > 3) {
        PyErr_Format(PyExc_IndexError, "no cursor %ld (a ring has 0 to 3)", w);
        return -1;
    }
    return (int)w;
}

PyObject *
ring_take(RingObject *r, int which)
{
    if (ring_open(r) < 0)
        return NULL;
    Py_ssize_t i = r->cursor[which];
    SlotObject *s = ring_slot(r, i);
    if (s->state != which)
        Py_RETURN_NONE;
    s->state = (which + 1) & 3;
    r->cursor[which] = (i + 1) % r->depth;
    return Py_NewRef(s);
}

static PyObject *
ring_take_method(RingObject *r, PyObject *which)
{
    if (ring_open(r) < 0)
        return NULL;
    int w = which_arg(which);
    return w < 0 ? NULL : ring_take(r, w);
}

void
ring_untake(RingObject *r, SlotObject *s, int which)
{
    s->state = which;
    r->cursor[which] = (r->cursor[which] - 1 + r->depth) % r->depth;
}

static PyObject *
ring_untake_method(RingObject *r, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "untake(slot, which) takes 2 arguments");
        return NULL;
    }
    if (ring_ready(r) < 0)
        return NULL;
    int w = which_arg(args[1]);
    if (w < 0)
        return NULL;
    if (Py_TYPE(args[0]) != &SlotType) { /* (as the reference: no state to set) */
        PyErr_Format(PyExc_AttributeError, "untake() takes a Slot, got %.100s",
                     Py_TYPE(args[0])->tp_name);
        return NULL;
    }
    ring_untake(r, SLOT(args[0]), w);
    Py_RETURN_NONE;
}

PyObject *
ring_peek(RingObject *r, int which, Py_ssize_t ahead)
{
    if (ring_open(r) < 0)
        return NULL;
    Py_ssize_t i = (r->cursor[which] + ahead % r->depth + r->depth) % r->depth;
    SlotObject *s = ring_slot(r, i);
    return s->state == which ? (PyObject *)s : Py_None;
}

static PyObject *
ring_peek_method(RingObject *r, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "peek(which, ahead=0) takes 1 or 2 arguments");
        return NULL;
    }
    if (ring_open(r) < 0)
        return NULL;
    int w = which_arg(args[0]);
    if (w < 0)
        return NULL;
    Py_ssize_t ahead = 0;
    if (nargs == 2) {
        ahead = PyNumber_AsSsize_t(args[1], PyExc_OverflowError);
        if (ahead == -1 && PyErr_Occurred())
            return NULL;
    }
    PyObject *s = ring_peek(r, w, ahead);
    return s ? Py_NewRef(s) : NULL;
}

PyObject *
ring_produce(RingObject *r, PyObject *unused)
{
    if (ring_open(r) < 0)
        return NULL;
    Py_ssize_t i = r->cursor[FREE_I];
    SlotObject *s = ring_slot(r, i);
    if (s->state != FREE_I)
        Py_RETURN_NONE;
    if (r->cursor[UPLOADING_I] != i) {
        PyErr_SetString(closed_error,
                        "a compute output buffer must not have uploads waiting for a compute");
        return NULL;
    }
    s->state = PROCESSING_I;
    r->cursor[FREE_I] = r->cursor[UPLOADING_I] = (i + 1) % r->depth;
    return Py_NewRef(s);
}

PyObject *
ring_retire(RingObject *r, PyObject *unused)
{
    if (ring_open(r) < 0)
        return NULL;
    Py_ssize_t i = r->cursor[PROCESSING_I];
    SlotObject *s = ring_slot(r, i);
    if (s->state != PROCESSING_I)
        Py_RETURN_FALSE;
    if (r->cursor[DOWNLOADING_I] != i) {
        PyErr_SetString(order_error,
                        "retire() needs every downloaded slot advanced first (ring order); "
                        "call advance()");
        return NULL;
    }
    s->state = FREE_I;
    r->cursor[PROCESSING_I] = r->cursor[DOWNLOADING_I] = (i + 1) % r->depth;
    Py_RETURN_TRUE;
}

static PyObject *
ring_advance(RingObject *r, PyObject *unused)
{
    PyObject *s = ring_take(r, DOWNLOADING_I);
    if (s == NULL)
        return NULL;
    int freed = s != Py_None;
    Py_DECREF(s);
    return PyBool_FromLong(freed);
}

static PyObject *
ring_get_states(RingObject *r, PyObject *unused)
{
    if (ring_ready(r) < 0)
        return NULL;
    PyObject *out = PyList_New(r->depth);
    for (Py_ssize_t i = 0; out && i < r->depth; i++)
        PyList_SET_ITEM(out, i, Py_NewRef(PyTuple_GET_ITEM(cycle, ring_slot(r, i)->state)));
    return out;
}

static PyObject *
ring_close(RingObject *r, PyObject *unused)
{
    if (ring_ready(r) < 0)
        return NULL;
    r->closed = 1;
    PyObject *slots = Py_NewRef(r->slots);
    PyObject *gone = PyList_New(0); /* released once every slot is closed */
    for (Py_ssize_t i = 0; gone && i < r->depth; i++) {
        SlotObject *s = ring_slot(r, i);
        if (PyList_Append(gone, s->full) < 0)
            Py_CLEAR(gone);
        else
            Py_SETREF(s->full, Py_NewRef(Py_None));
    }
    Py_DECREF(slots);
    if (gone == NULL)
        return NULL;
    Py_DECREF(gone);
    Py_RETURN_NONE;
}

static PyObject *
ring_closed_get(RingObject *r, void *unused)
{
    return PyBool_FromLong(r->closed);
}

static PyObject *
ring_slots_get(RingObject *r, void *unused)
{
    if (ring_ready(r) < 0)
        return NULL;
    return PySequence_List(r->slots);
}

static PyGetSetDef ring_getset[] = {
    {"closed", (getter)ring_closed_get, NULL, "Whether close() was called.", NULL},
    {"slots", (getter)ring_slots_get, NULL, "The ring's slots, in ring order (a new list).",
     NULL},
    {NULL},
};

static PyMemberDef ring_members[] = {
    {"depth", T_PYSSIZET, offsetof(RingObject, depth), READONLY, "Slots in the ring."},
    {NULL},
};

static PyMethodDef ring_methods[] = {
    {"_ring_init", (PyCFunction)ring_init_method, METH_O, "Start the ring on slots, once."},
    {"take", (PyCFunction)ring_take_method, METH_O,
     "Move the slot at cursor which on (see _ring.PyRingCore.take)."},
    {"untake", (PyCFunction)(void (*)(void))ring_untake_method, METH_FASTCALL,
     "Undo the last take at cursor which."},
    {"peek", (PyCFunction)(void (*)(void))ring_peek_method, METH_FASTCALL,
     "The slot the ahead-th next take at cursor which would return, or None."},
    {"produce", (PyCFunction)ring_produce, METH_NOARGS,
     "Oldest FREE slot straight to PROCESSING: a compute writes it, no upload."},
    {"retire", (PyCFunction)ring_retire, METH_NOARGS,
     "Oldest PROCESSING slot -> FREE without a download. True if a slot was retired."},
    {"advance", (PyCFunction)ring_advance, METH_NOARGS,
     "Oldest DOWNLOADING slot -> FREE. True if a slot was freed."},
    {"get_states", (PyCFunction)ring_get_states, METH_NOARGS, "Each slot's BufferState."},
    {"close", (PyCFunction)ring_close, METH_NOARGS,
     "Drop the device memory. Ops still in flight keep what they use alive."},
    {NULL},
};

PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "prism_gpu._ccore.RingCore",
    .tp_doc = "A ring's state machine (compiled; see prism_gpu._ring.PyRingCore).",
    .tp_basicsize = sizeof(RingObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)ring_dealloc,
    .tp_traverse = (traverseproc)ring_traverse,
    .tp_clear = (inquiry)ring_clear,
    .tp_getset = ring_getset,
    .tp_members = ring_members,
    .tp_methods = ring_methods,
};

/* ---------------------------------------------------------------- SlotMap */

static PyObject *
slotmap_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (!_PyArg_NoPositional("SlotMap", args) || !_PyArg_NoKeywords("SlotMap", kwds))
        return NULL;
    SlotMapObject *m = (SlotMapObject *)type->tp_alloc(type, 0);
    if (m == NULL)
        return NULL;
    m->map = PyDict_New();
    if (m->map == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    m->sweep_at = 4096;
    return (PyObject *)m;
}

static int
slotmap_traverse(SlotMapObject *m, visitproc visit, void *arg)
{
    Py_VISIT(m->map);
    return 0;
}

static int
slotmap_clear_gc(SlotMapObject *m)
{
    Py_CLEAR(m->map);
    return 0;
}

static void
slotmap_dealloc(SlotMapObject *m)
{
    PyObject_GC_UnTrack(m);
    slotmap_clear_gc(m);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

/* the referent of weakref (or callable) ``r``, a new reference (None if dropped) */
static PyObject *
deref(PyObject *r)
{
    if (PyWeakref_CheckRefExact(r)) {
#if PY_VERSION_HEX >= 0x030D0000
        PyObject *o;
        if (PyWeakref_GetRef(r, &o) < 0)
            return NULL;
        return o ? o : Py_NewRef(Py_None);
#else
        return Py_NewRef(PyWeakref_GET_OBJECT(r));
#endif
    }
    return PyObject_CallNoArgs(r);
}

/* 1 if every referent of ``refs`` (a weakref or a tuple of them) is gone */
static int
all_dropped(PyObject *refs)
{
    int tuple = PyTuple_Check(refs);
    Py_ssize_t n = tuple ? PyTuple_GET_SIZE(refs) : 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = deref(tuple ? PyTuple_GET_ITEM(refs, i) : refs);
        if (o == NULL)
            return -1;
        int gone = o == Py_None;
        Py_DECREF(o);
        if (!gone)
            return 0;
    }
    return 1;
}

static PyObject *
slotmap_sweep(SlotMapObject *m, PyObject *unused)
{
    PyObject *map = Py_NewRef(m->map);
    /* a snapshot: a slot's ref called below may run code that changes the map */
    PyObject *items = PyDict_Items(map), *dead = items ? PyList_New(0) : NULL;
    for (Py_ssize_t i = 0; dead && i < PyList_GET_SIZE(items); i++) {
        PyObject *kv = PyList_GET_ITEM(items, i);
        int gone = all_dropped(PyTuple_GET_ITEM(kv, 1));
        if (gone < 0 || (gone && PyList_Append(dead, PyTuple_GET_ITEM(kv, 0)) < 0))
            Py_CLEAR(dead);
    }
    Py_XDECREF(items);
    for (Py_ssize_t i = 0; dead && i < PyList_GET_SIZE(dead); i++)
        if (PyDict_DelItem(map, PyList_GET_ITEM(dead, i)) < 0) {
            if (PyErr_ExceptionMatches(PyExc_KeyError)) /* (gone meanwhile, as in Python) */
                PyErr_Clear();
            else
                Py_CLEAR(dead);
        }
    if (dead != NULL)
        m->sweep_at = 2 * PyDict_GET_SIZE(map) + 4096;
    Py_DECREF(map);
    if (dead == NULL)
        return NULL;
    Py_DECREF(dead);
    Py_RETURN_NONE;
}

int
slotmap_filled(SlotMapObject *m, SlotObject *s, PyObject *op, PyObject *oid, Py_ssize_t n)
{
    PyObject *map = Py_NewRef(m->map);
    PyObject *old = slot_filled(s, op, oid, n);
    int rc = old == NULL ? -1 : 0;
    for (Py_ssize_t i = 0; rc == 0 && i < PyList_GET_SIZE(old); i++) {
        PyObject *id = Py_NewRef(PyList_GET_ITEM(old, i)); /* (a key's __eq__ may run code) */
        if (PyDict_DelItem(map, id) < 0) {
            if (!PyErr_ExceptionMatches(PyExc_KeyError))
                rc = -1;
            else
                PyErr_Clear();
        }
        Py_DECREF(id);
    }
    Py_XDECREF(old);
    if (rc == 0)
        rc = PyDict_SetItem(map, oid, s->ref);
    if (rc == 0 && PyDict_GET_SIZE(map) > m->sweep_at && map == m->map) {
        PyObject *r = slotmap_sweep(m, NULL);
        rc = r ? 0 : -1;
        Py_XDECREF(r);
    }
    Py_DECREF(map);
    return rc;
}

static PyObject *
slotmap_filled_method(SlotMapObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "filled(slot, op, n) takes 3 arguments");
        return NULL;
    }
    if (Py_TYPE(args[0]) != &SlotType) {
        PyErr_SetString(PyExc_TypeError, "filled() takes a Slot");
        return NULL;
    }
    Py_ssize_t n = PyNumber_AsSsize_t(args[2], PyExc_OverflowError);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    PyObject *oid = id_of(args[1]);
    if (oid == NULL)
        return NULL;
    int rc = slotmap_filled(m, SLOT(args[0]), args[1], oid, n);
    Py_DECREF(oid);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

int
slotmap_touched(SlotMapObject *m, PyObject *oid, PyObject *slots)
{
    PyObject *seq = PySequence_Fast(slots, "touched() takes a sequence of slots");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *v = n == 1 ? NULL : PyTuple_New(n);
    if (n != 1 && v == NULL) {
        Py_DECREF(seq);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *s = PySequence_Fast_GET_ITEM(seq, i);
        if (Py_TYPE(s) != &SlotType) {
            PyErr_SetString(PyExc_TypeError, "touched() takes Slots");
            Py_XDECREF(v);
            Py_DECREF(seq);
            return -1;
        }
        if (n == 1)
            v = Py_NewRef(SLOT(s)->ref);
        else
            PyTuple_SET_ITEM(v, i, Py_NewRef(SLOT(s)->ref));
    }
    Py_DECREF(seq);
    int rc = PyDict_SetItem(m->map, oid, v); /* (no slots: an empty tuple, as in Python) */
    Py_DECREF(v);
    return rc;
}

static PyObject *
slotmap_touched_method(SlotMapObject *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "touched(oid, slots) takes 2 arguments");
        return NULL;
    }
    if (slotmap_touched(m, args[0], args[1]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

PyObject *
slotmap_data_slots(SlotMapObject *m, PyObject *dep_ids)
{
    PyObject *deps = PySequence_Fast(dep_ids, "data_slots() takes a sequence of op ids");
    if (deps == NULL)
        return NULL;
    PyObject *map = Py_NewRef(m->map), *slots = PyList_New(0);
    for (Py_ssize_t k = 0; slots && k < PySequence_Fast_GET_SIZE(deps); k++) {
        PyObject *id = Py_NewRef(PySequence_Fast_GET_ITEM(deps, k)); /* (its __eq__ may run) */
        PyObject *refs = PyDict_GetItemWithError(map, id);
        Py_XINCREF(refs);
        Py_DECREF(id);
        if (refs == NULL) {
            if (PyErr_Occurred())
                Py_CLEAR(slots);
            continue;
        }
        int tuple = PyTuple_Check(refs);
        Py_ssize_t n = tuple ? PyTuple_GET_SIZE(refs) : 1;
        for (Py_ssize_t i = 0; slots && i < n; i++) {
            PyObject *s = deref(tuple ? PyTuple_GET_ITEM(refs, i) : refs);
            if (s == NULL) {
                Py_CLEAR(slots);
                break;
            }
            int keep = 0;
            if (Py_TYPE(s) == &SlotType &&
                (SLOT(s)->state == UPLOADING_I || SLOT(s)->state == PROCESSING_I)) {
                keep = 1;
                for (Py_ssize_t j = 0; keep && j < PyList_GET_SIZE(slots); j++)
                    keep = PyList_GET_ITEM(slots, j) != s;
            }
            else if (s != Py_None && Py_TYPE(s) != &SlotType) {
                PyErr_SetString(PyExc_TypeError, "a slot map holds Slots");
                Py_CLEAR(slots);
            }
            if (keep && SLOT(s)->full == Py_None) { /* set by close, nothing else */
                PyErr_SetString(closed_error,
                                "a dependency's TripleBuffer is closed: its data is gone");
                Py_CLEAR(slots);
            }
            else if (keep && PyList_Append(slots, s) < 0)
                Py_CLEAR(slots);
            Py_DECREF(s);
        }
        Py_DECREF(refs);
    }
    Py_DECREF(map);
    Py_DECREF(deps);
    return slots;
}

static PyObject *
slotmap_clear_method(SlotMapObject *m, PyObject *unused)
{
    PyDict_Clear(m->map);
    Py_RETURN_NONE;
}

static PyMethodDef slotmap_methods[] = {
    {"filled", (PyCFunction)(void (*)(void))slotmap_filled_method, METH_FASTCALL,
     "op put fresh data of n elements in slot."},
    {"touched", (PyCFunction)(void (*)(void))slotmap_touched_method, METH_FASTCALL,
     "op oid touched slots."},
    {"data_slots", (PyCFunction)slotmap_data_slots, METH_O,
     "The slots holding data of ops dep_ids that a compute can still consume."},
    {"clear", (PyCFunction)slotmap_clear_method, METH_NOARGS, "Forget every op."},
    {"_sweep", (PyCFunction)slotmap_sweep, METH_NOARGS, "Drop the entries of dropped buffers."},
    {NULL},
};

static PyMemberDef slotmap_members[] = {
    {"_map", T_OBJECT_EX, offsetof(SlotMapObject, map), READONLY, "op id -> slot ref(s)."},
    {"_sweep_at", T_PYSSIZET, offsetof(SlotMapObject, sweep_at), 0, "The next sweep's size."},
    {NULL},
};

PyTypeObject SlotMapType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "prism_gpu._ccore.SlotMap",
    .tp_doc = "op id -> the slot(s) it touched (compiled; see prism_gpu._slotmap.PySlotMap).",
    .tp_basicsize = sizeof(SlotMapObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = slotmap_new,
    .tp_dealloc = (destructor)slotmap_dealloc,
    .tp_traverse = (traverseproc)slotmap_traverse,
    .tp_clear = (inquiry)slotmap_clear_gc,
    .tp_members = slotmap_members,
    .tp_methods = slotmap_methods,
};

/* ---------------------------------------------------------------- set-up */

PyObject *
setup_ring(PyObject *module, PyObject *helpers)
{
    if (!PyDict_Check(helpers)) {
        PyErr_SetString(PyExc_TypeError, "setup_ring() takes a dict");
        return NULL;
    }
    PyObject *c = PyDict_GetItemString(helpers, "cycle");
    PyObject *e1 = PyDict_GetItemString(helpers, "InvalidOperationError");
    PyObject *e2 = PyDict_GetItemString(helpers, "BufferUnavailableError");
    if (c == NULL || e1 == NULL || e2 == NULL || !PyTuple_Check(c) || PyTuple_GET_SIZE(c) != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "setup_ring() needs cycle (4 states), InvalidOperationError and "
                        "BufferUnavailableError");
        return NULL;
    }
    Py_XSETREF(cycle, Py_NewRef(c));
    Py_XSETREF(closed_error, Py_NewRef(e1));
    Py_XSETREF(order_error, Py_NewRef(e2));
    Py_RETURN_NONE;
}

int
ring_add_types(PyObject *module)
{
    s_id = PyUnicode_InternFromString("id");
    if (s_id == NULL || PyType_Ready(&SlotType) < 0 || PyType_Ready(&RingType) < 0 ||
        PyType_Ready(&SlotMapType) < 0)
        return -1;
    Py_INCREF(&SlotType);
    Py_INCREF(&RingType);
    Py_INCREF(&SlotMapType);
    if (PyModule_AddObject(module, "Slot", (PyObject *)&SlotType) < 0 ||
        PyModule_AddObject(module, "RingCore", (PyObject *)&RingType) < 0 ||
        PyModule_AddObject(module, "SlotMap", (PyObject *)&SlotMapType) < 0)
        return -1;
    return 0;
}
