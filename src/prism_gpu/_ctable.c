/* The op table's hot path compiled: TableCore, the base of _optable.OpTable.
 *
 * _tablecore.PyTableCore is the reference, in Python: this type does what it does,
 * statement for statement, and the test suite runs against both. The uncommon cases go
 * to the subclass's Python methods (_failed_op, _resolve_deps), as in the reference.
 */
#include "_ccore.h"
#include <structmember.h>

static PyObject *s_append, *s_failed_op, *s_resolve_deps_slow;

static int
table_traverse(TableObject *t, visitproc visit, void *arg)
{
    return visit_run(FIELD_RUN(t, id_type, reports), visit, arg);
}

static int
table_clear(TableObject *t)
{
    return clear_run(FIELD_RUN(t, id_type, reports));
}

static void
table_dealloc(TableObject *t)
{
    PyObject_GC_UnTrack(t);
    table_clear(t);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyObject *
table_init(TableObject *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "_table_init(report_backlog, id_type) takes 2 arguments");
        return NULL;
    }
    Py_ssize_t backlog = PyNumber_AsSsize_t(args[0], PyExc_OverflowError);
    if (backlog == -1 && PyErr_Occurred())
        return NULL;
    PyObject *collections = PyImport_ImportModule("collections");
    PyObject *deque = collections ? PyObject_GetAttrString(collections, "deque") : NULL;
    Py_XDECREF(collections);
    if (deque == NULL)
        return NULL;
    PyObject *kw = Py_BuildValue("{s:n}", "maxlen", backlog);
    PyObject *none = PyTuple_New(0);
    PyObject *reports = kw && none ? PyObject_Call(deque, none, kw) : NULL;
    Py_DECREF(deque);
    Py_XDECREF(kw);
    Py_XDECREF(none);
    if (reports == NULL)
        return NULL;
    Py_XSETREF(t->id_type, Py_NewRef(args[1]));
    t->next = 0;
    t->backlog = backlog;
    Py_XSETREF(t->reports, reports);
    t->dropped_reports = 0;
    t->failed_total = 0;
    Py_RETURN_NONE;
}

int
table_complete(TableObject *t, PyObject *oid, PyObject *op_type, PyObject *duration,
               PyObject *error)
{
    if (t->reports == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this op table was never set up (_table_init)");
        return -1;
    }
    PyObject *reports = Py_NewRef(t->reports);
    Py_ssize_t n = PyObject_Size(reports);
    PyObject *report = n < 0 ? NULL : PyTuple_Pack(4, oid, op_type, duration, error);
    if (report == NULL) {
        Py_DECREF(reports);
        return -1;
    }
    if (n == t->backlog)
        t->dropped_reports++;
    PyObject *r = PyObject_CallMethodOneArg(reports, s_append, report);
    Py_DECREF(report);
    Py_DECREF(reports);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    if (error != Py_None) {
        PyObject *args[3] = {(PyObject *)t, oid, error};
        r = PyObject_VectorcallMethod(s_failed_op, args, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                      NULL);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
    }
    return 0;
}

static PyObject *
table_complete_method(TableObject *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "complete(oid, op_type, duration, error) takes 4 arguments");
        return NULL;
    }
    if (table_complete(t, args[0], args[1], args[2], args[3]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

PyObject *
table_resolve_deps(TableObject *t, PyObject *deps)
{
    if (PyList_CheckExact(deps) && PyList_GET_SIZE(deps) == 1 && t->id_type != NULL) {
        PyObject *d = PyList_GET_ITEM(deps, 0);
        /* an id of this table's type (an int: its value read with no Python code run) */
        if ((PyObject *)Py_TYPE(d) == t->id_type && PyLong_Check(d)) {
            int overflow;
            long long v = PyLong_AsLongLongAndOverflow(d, &overflow);
            if (v == -1 && PyErr_Occurred())
                return NULL;
            if (!overflow && 0 <= v && v < t->next) {
                PyObject *plain = PyLong_FromLongLong(v); /* plain ints, as documented */
                PyObject *out = plain ? PyList_New(1) : NULL;
                if (out == NULL) {
                    Py_XDECREF(plain);
                    return NULL;
                }
                PyList_SET_ITEM(out, 0, plain);
                return out;
            }
        }
    }
    return PyObject_CallMethodOneArg((PyObject *)t, s_resolve_deps_slow, deps);
}

static PyMethodDef table_methods[] = {
    {"_table_init", (PyCFunction)(void (*)(void))table_init, METH_FASTCALL,
     "Set the table up: its report backlog and op id type."},
    {"complete", (PyCFunction)(void (*)(void))table_complete_method, METH_FASTCALL,
     "Op oid completed: its report kept for poll, its failure kept if it failed."},
    {"resolve_deps", (PyCFunction)table_resolve_deps, METH_O,
     "Dependencies given as an op id or an iterable of them, as plain ints."},
    {NULL},
};

static PyMemberDef table_members[] = {
    {"id_type", T_OBJECT_EX, offsetof(TableObject, id_type), 0, "The op id type."},
    {"_reports", T_OBJECT_EX, offsetof(TableObject, reports), READONLY, "Unpolled reports."},
    {"next", T_PYSSIZET, offsetof(TableObject, next), 0, "The next op id."},
    {"_backlog", T_PYSSIZET, offsetof(TableObject, backlog), READONLY, "Reports kept."},
    {"dropped_reports", T_PYSSIZET, offsetof(TableObject, dropped_reports), 0,
     "Reports dropped unpolled."},
    {"failed_total", T_PYSSIZET, offsetof(TableObject, failed_total), 0, "Ops failed."},
    {NULL},
};

PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "prism_gpu._ccore.TableCore",
    .tp_doc = "The op table's hot path (compiled; see prism_gpu._tablecore.PyTableCore).",
    .tp_basicsize = sizeof(TableObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)table_dealloc,
    .tp_traverse = (traverseproc)table_traverse,
    .tp_clear = (inquiry)table_clear,
    .tp_members = table_members,
    .tp_methods = table_methods,
};

int
table_add_type(PyObject *module)
{
    s_append = PyUnicode_InternFromString("append");
    s_failed_op = PyUnicode_InternFromString("_failed_op");
    s_resolve_deps_slow = PyUnicode_InternFromString("_resolve_deps");
    if (!s_append || !s_failed_op || !s_resolve_deps_slow || PyType_Ready(&TableType) < 0)
        return -1;
    Py_INCREF(&TableType);
    return PyModule_AddObject(module, "TableCore", (PyObject *)&TableType);
}
