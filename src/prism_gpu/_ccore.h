/* What the compiled core's files share: the garbage collector's helpers and the ring's
 * types (_cring.c), which the queue calls (_ccore.c) use as structs. */
#ifndef PRISM_GPU_CCORE_H
#define PRISM_GPU_CCORE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* The object fields of our types lie side by side in their structs, first to last:
 * the garbage collector's traversal and clearing go over them as one run. */
#define FIELD_RUN(obj, first, last) \
    (&(obj)->first), (int)(&(obj)->last - &(obj)->first + 1)

static inline int
visit_run(PyObject **f, int n, visitproc visit, void *arg)
{
    for (int i = 0; i < n; i++)
        Py_VISIT(f[i]);
    return 0;
}

static inline int
clear_run(PyObject **f, int n)
{
    for (int i = 0; i < n; i++)
        Py_CLEAR(f[i]);
    return 0;
}

/* A module's attribute (new reference), read from the module's dict when it is a plain
 * module: what getattr gives for a name its dict holds, at a dict lookup's cost rather
 * than a generic attribute lookup's; anything else goes the generic way. */
static inline PyObject *
mod_get(PyObject *mod, PyObject *name)
{
    if (PyModule_CheckExact(mod)) {
        PyObject *d = PyModule_GetDict(mod); /* borrowed, never NULL for a module */
        PyObject *v = PyDict_GetItemWithError(d, name);
        if (v != NULL)
            return Py_NewRef(v);
        if (PyErr_Occurred())
            return NULL;
    }
    return PyObject_GetAttr(mod, name);
}

/* An attribute held in a slot of the object's struct (a ``__slots__`` name, or a C type's
 * object member), read at its offset: a call site keeps the type and offset found by
 * its first lookup, valid while the type's version tag stands (any change to the type
 * or its bases gives a new tag; 0 is none). A member is a data descriptor, which comes before the
 * instance dict, so for a type with the generic getattr this is what getattr gives;
 * anything else goes the generic way. */
#include <structmember.h>
typedef struct {
    PyTypeObject *type; /* borrowed: compared only, while its tag matches */
    unsigned int tag;
    Py_ssize_t offset;
} SlotAttr;

static inline PyObject *
slot_attr(PyObject *o, PyObject *name, SlotAttr *c)
{
    PyTypeObject *t = Py_TYPE(o);
    if (t->tp_getattro != PyObject_GenericGetAttr) /* (a __getattribute__ or __getattr__ of
                                                     * its own: getattr runs it) */
        return PyObject_GetAttr(o, name);
    if (c->type == t && c->tag == t->tp_version_tag && t->tp_version_tag != 0) {
        PyObject *v = *(PyObject **)((char *)o + c->offset);
        if (v != NULL)
            return Py_NewRef(v);
    }
    else {
        PyObject *d = _PyType_Lookup(t, name); /* borrowed; sets the version tag */
        /* (a member of a base of the type: a foreign class's member, set on the class,
         * is refused by getattr, and its offset means nothing in this object) */
        if (d != NULL && Py_IS_TYPE(d, &PyMemberDescr_Type) && t->tp_version_tag != 0 &&
            PyType_IsSubtype(t, PyDescr_TYPE(d))) {
            PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
            if (m->type == T_OBJECT_EX) {
                c->type = t;
                c->tag = t->tp_version_tag;
                c->offset = m->offset;
            }
        }
    }
    return PyObject_GetAttr(o, name);
}

/* positions in the cycle FREE -> UPLOADING -> PROCESSING -> DOWNLOADING */
#define FREE_I 0
#define UPLOADING_I 1
#define PROCESSING_I 2
#define DOWNLOADING_I 3

typedef struct { /* _ring.PySlot's fields (objects side by side, buffer to ref: FIELD_RUN) */
    PyObject_HEAD
    PyObject *buffer, *index, *full, *writer, *readers, *ops, *failed, *ref;
    Py_ssize_t valid, capacity;
    int state; /* its position in the cycle */
    PyObject *weakreflist;
} SlotObject;

typedef struct { /* _ring.PyRingCore's state */
    PyObject_HEAD
    PyObject *slots; /* a tuple of Slot, NULL until _ring_init */
    Py_ssize_t depth;
    Py_ssize_t cursor[4]; /* the next slot of each transition, by the state it leaves */
    int closed;
} RingObject;

typedef struct { /* _slotmap.PySlotMap's */
    PyObject_HEAD
    PyObject *map; /* op id -> a weakref to its slot, or a tuple of them */
    Py_ssize_t sweep_at;
} SlotMapObject;

typedef struct { /* _tablecore.PyTableCore's fields (objects side by side: FIELD_RUN) */
    PyObject_HEAD
    PyObject *id_type, *reports;
    Py_ssize_t next, backlog, dropped_reports, failed_total;
} TableObject;

extern PyTypeObject SlotType, RingType, SlotMapType, TableType;

int table_add_type(PyObject *module);
int table_complete(TableObject *t, PyObject *oid, PyObject *op_type, PyObject *duration,
                   PyObject *error);
PyObject *table_resolve_deps(TableObject *t, PyObject *deps);

int ring_add_types(PyObject *module);
PyObject *setup_ring(PyObject *module, PyObject *helpers);

/* The queue calls' uses; each does what the Python method of the same name does. */
PyObject *ring_take(RingObject *r, int which);              /* the slot or None; NULL: error */
void ring_untake(RingObject *r, SlotObject *s, int which);
PyObject *ring_peek(RingObject *r, int which, Py_ssize_t ahead); /* borrowed; None; NULL */
PyObject *slot_array(SlotObject *s);
PyObject *slot_head(SlotObject *s, Py_ssize_t n);
PyObject *slot_write_hazards(SlotObject *s);
int slot_updated(SlotObject *s, PyObject *op, PyObject *oid, PyObject *failed);
int slot_read(SlotObject *s, PyObject *op, PyObject *oid);
int slotmap_filled(SlotMapObject *m, SlotObject *s, PyObject *op, PyObject *oid,
                   Py_ssize_t n);
int slotmap_touched(SlotMapObject *m, PyObject *oid, PyObject *slots); /* list or tuple */
PyObject *slotmap_data_slots(SlotMapObject *m, PyObject *dep_ids);     /* a list */

/* A pipeline iteration's ops (_cpipe.c), and what it uses of the core (_ccore.c) and the
 * ring (_cring.c). */
PyObject *pipe_ops(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
PyObject *setup_pipe(PyObject *module, PyObject *helpers);
PyObject *pipe_submit(PyObject *engine, PyObject **args, Py_ssize_t nargs); /* args[0] free */
PyObject *core_op_field(PyObject *op, int which); /* 0: id, 1: error, 2: event (new ref) */
PyObject *core_root_of(PyObject *op);
int core_is_ring(PyObject *o); /* an exact TripleBuffer of the compiled twins */
Py_ssize_t core_plain_array(PyObject *a, PyObject *dtype, int writable); /* 0: look again */
PyObject *core_flat(PyObject *a);
PyObject *pipe_fast_io(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
int pipe_add_types(PyObject *module); /* Tally */
PyObject *pipe_slots(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
PyObject *slot_filled(SlotObject *s, PyObject *op, PyObject *oid, Py_ssize_t valid);
PyObject *ring_produce(RingObject *r, PyObject *unused);
PyObject *ring_retire(RingObject *r, PyObject *unused);

#endif
