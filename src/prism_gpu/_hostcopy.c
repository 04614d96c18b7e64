/* Host memory copies on native worker threads that never take the GIL.
 *
 * The Python copy pool's workers need the GIL twice per piece (to take a job and
 * to count it done), and so take turns with the thread queuing device work: a
 * piece waits for the GIL longer than it takes to copy. Here the workers are
 * plain threads running memmove, jobs are queued under a mutex, and only the
 * caller's wait() releases and retakes the GIL.
 *
 * Pool(workers, stream=False)
 *                          threads start on the first copy; stream: pieces of
 *                          64 KiB and more are written with non-temporal stores
 *                          (x86-64), which skip reading the destination into the
 *                          cache first: a third less memory traffic per copy,
 *                          what memmove itself does only for copies of megabytes
 * Pool.copy(dst, src, n, urgent=False)
 *                          -> Ticket; dst and src are C-contiguous buffers of the
 *                            same size that do not overlap; n pieces; urgent
 *                            pieces are taken before the others (each kind in order)
 * Pool.close()             finishes every queued piece, then stops the threads
 *                          (a second close, from another thread, waits for them too)
 * Ticket.wait()            blocks (GIL released) until every piece is copied
 * Ticket.done()            never blocks
 * address(buffer)          the address of a buffer's first element
 * A ticket holds both buffers until its copy is complete; a ticket dropped early
 * waits for its pieces before it lets go of them. Buffers of Python objects (format
 * 'O') are refused: their bytes are references. After fork the child has the pool
 * but not its threads: there, the pool takes no copy and a ticket waits for nothing
 * (wait() raises if its copy was not complete at the fork).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <string.h>
#include <stdint.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define HAVE_STREAM 1
#endif

typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock;
    pthread_cond_t cond;
    Py_ssize_t left;  /* pieces not copied yet */
    int held;         /* the buffers below are held */
    pid_t pid;        /* the process whose threads copy the pieces */
    Py_buffer dst, src;
} Ticket;

typedef struct Job {
    struct Job *next;
    Ticket *ticket;
    char *dst;
    const char *src;
    size_t n;
} Job;

typedef struct {
    Job *head, *tail;    /* pieces in order */
} Queue;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock;
    pthread_cond_t cond;
    Queue queue;         /* queued pieces */
    Queue urgent;        /* urgent ones: taken first */
    int stop;
    int workers;
    int stream;          /* non-temporal stores for large pieces */
    int started;         /* threads started and not joined yet */
    int running;         /* threads not finished yet (under lock) */
    pid_t pid;           /* the process that started them */
    pthread_t *threads;
} Pool;

static PyTypeObject TicketType;

/* Ticket ------------------------------------------------------------------ */

static int ticket_settle(Ticket *t) {
    /* wait, without the GIL, until no worker will touch t again; 0 when t came
       here through fork with pieces left: no thread of this process copies them */
    int complete = 1;
    if (t->pid != getpid()) {
        complete = t->left == 0;  /* no lock: it may have been held at the fork */
    } else {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&t->lock);
        while (t->left > 0)
            pthread_cond_wait(&t->cond, &t->lock);
        pthread_mutex_unlock(&t->lock);
        Py_END_ALLOW_THREADS
    }
    if (t->held) {
        t->held = 0;
        PyBuffer_Release(&t->dst);
        PyBuffer_Release(&t->src);
    }
    return complete;
}

static PyObject *ticket_wait(Ticket *t, PyObject *unused) {
    if (!ticket_settle(t)) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this copy was in flight when the process forked: it is not "
                        "complete in the child");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *ticket_done(Ticket *t, PyObject *unused) {
    Py_ssize_t left;
    if (t->pid != getpid())
        return PyBool_FromLong(t->left == 0);
    pthread_mutex_lock(&t->lock);
    left = t->left;
    pthread_mutex_unlock(&t->lock);
    return PyBool_FromLong(left == 0);
}

static void ticket_dealloc(Ticket *t) {
    ticket_settle(t);
    if (t->pid == getpid()) {  /* after fork: the parent's waiters are counted (above) */
        pthread_mutex_destroy(&t->lock);
        pthread_cond_destroy(&t->cond);
    }
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyMethodDef ticket_methods[] = {
    {"wait", (PyCFunction)ticket_wait, METH_NOARGS, "Block until the copy is complete."},
    {"done", (PyCFunction)ticket_done, METH_NOARGS, "True once the copy is complete."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject TicketType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "prism_gpu._hostcopy.Ticket",
    .tp_basicsize = sizeof(Ticket),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One copy in flight.",
    .tp_dealloc = (destructor)ticket_dealloc,
    .tp_methods = ticket_methods,
};

/* Pool -------------------------------------------------------------------- */

static Job *queue_pop(Queue *q) {
    Job *job = q->head;
    if (job != NULL) {
        q->head = job->next;
        if (q->head == NULL)
            q->tail = NULL;
    }
    return job;
}

static void queue_push(Queue *q, Job *first, Job *last) {
    if (q->tail == NULL)
        q->head = first;
    else
        q->tail->next = first;
    q->tail = last;
}

#define STREAM_MIN (64 * 1024)

static void copy_piece(char *dst, const char *src, size_t n, int stream) {
#ifdef HAVE_STREAM
    if (stream && n >= STREAM_MIN) {
        size_t head = (16 - ((uintptr_t)dst & 15)) & 15;  /* to 16-byte alignment */
        size_t blocks;
        memcpy(dst, src, head);
        dst += head;
        src += head;
        n -= head;
        for (blocks = n / 64; blocks; blocks--) {
            __m128i a = _mm_loadu_si128((const __m128i *)src);
            __m128i b = _mm_loadu_si128((const __m128i *)(src + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(src + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(src + 48));
            _mm_stream_si128((__m128i *)dst, a);
            _mm_stream_si128((__m128i *)(dst + 16), b);
            _mm_stream_si128((__m128i *)(dst + 32), c);
            _mm_stream_si128((__m128i *)(dst + 48), d);
            src += 64;
            dst += 64;
        }
        memcpy(dst, src, n & 63);
        _mm_sfence();  /* the stores are visible before the piece is counted done */
        return;
    }
#endif
    (void)stream;
    memmove(dst, src, n);
}

static void *worker(void *arg) {
    Pool *p = (Pool *)arg;
    for (;;) {
        Job *job;
        Ticket *t;
        pthread_mutex_lock(&p->lock);
        while (p->urgent.head == NULL && p->queue.head == NULL && !p->stop)
            pthread_cond_wait(&p->cond, &p->lock);
        job = queue_pop(&p->urgent);
        if (job == NULL)
            job = queue_pop(&p->queue);
        if (job == NULL) {  /* stopping, and nothing is left */
            if (--p->running == 0)
                pthread_cond_broadcast(&p->cond);  /* for pool_stop */
            pthread_mutex_unlock(&p->lock);
            return NULL;
        }
        pthread_mutex_unlock(&p->lock);
        copy_piece(job->dst, job->src, job->n, p->stream);
        t = job->ticket;
        free(job);
        pthread_mutex_lock(&t->lock);
        if (--t->left == 0)
            pthread_cond_broadcast(&t->cond);
        pthread_mutex_unlock(&t->lock);  /* t may be freed from here on */
    }
}

static int pool_init(Pool *p, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"workers", "stream", NULL};
    int workers, stream = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i|p", kwlist, &workers, &stream))
        return -1;
    if (workers < 1 || workers > 256) {
        PyErr_SetString(PyExc_ValueError, "workers must be between 1 and 256");
        return -1;
    }
    if (p->threads != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a Pool is initialised once");
        return -1;
    }
    p->threads = PyMem_Calloc((size_t)workers, sizeof(pthread_t));
    if (p->threads == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->cond, NULL);
    p->workers = workers;
    p->stream = stream;
    return 0;
}

static int pool_start(Pool *p) {
    if (p->started == 0)
        p->pid = getpid();
    pthread_mutex_lock(&p->lock);
    while (p->started < p->workers
           && pthread_create(&p->threads[p->started], NULL, worker, p) == 0) {
        p->started++;
        p->running++;
    }
    pthread_mutex_unlock(&p->lock);
    if (p->started == 0) {  /* fewer workers still copy everything; none do not */
        PyErr_SetString(PyExc_RuntimeError, "could not start a copy thread");
        return -1;
    }
    return 0;
}

static int pool_forked(Pool *p) {
    /* the threads were started by the parent of this (forked) process */
    return p->pid != 0 && p->pid != getpid();
}

static PyObject *pool_copy(Pool *p, PyObject *args) {
    PyObject *dst_obj, *src_obj;
    Py_ssize_t pieces, i, step;
    int urgent = 0;
    Ticket *t;
    Job *first = NULL, *last = NULL;
    if (!PyArg_ParseTuple(args, "OOn|p", &dst_obj, &src_obj, &pieces, &urgent))
        return NULL;
    t = PyObject_New(Ticket, &TicketType);
    if (t == NULL)
        return NULL;
    t->held = 0;
    t->left = 0;
    t->pid = getpid();
    pthread_mutex_init(&t->lock, NULL);
    pthread_cond_init(&t->cond, NULL);
    if (PyObject_GetBuffer(dst_obj, &t->dst,
                           PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT) < 0)
        goto fail;
    if (PyObject_GetBuffer(src_obj, &t->src, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&t->dst);
        goto fail;
    }
    t->held = 1;
    /* checked after the exports, which may run Python code (that may close p) */
    if (p->threads == NULL || p->stop || pool_forked(p)) {
        PyErr_SetString(PyExc_RuntimeError, p->stop || p->threads == NULL
                        ? "the copy pool is closed"
                        : "the copy pool's threads are in the parent process (fork)");
        goto fail;
    }
    if ((t->dst.format != NULL && strchr(t->dst.format, 'O') != NULL)
        || (t->src.format != NULL && strchr(t->src.format, 'O') != NULL)) {
        PyErr_SetString(PyExc_ValueError, "buffers of Python objects are not plain bytes");
        goto fail;
    }
    if (t->dst.len != t->src.len) {
        PyErr_SetString(PyExc_ValueError, "dst and src differ in size");
        goto fail;
    }
    {
        const char *d = t->dst.buf, *s = t->src.buf;
        if (t->dst.len > 0 && d < s + t->src.len && s < d + t->dst.len) {
            PyErr_SetString(PyExc_ValueError, "dst and src overlap");
            goto fail;
        }
    }
    if (t->dst.len == 0)
        return (PyObject *)t;  /* nothing to copy: done already */
    if (pool_start(p) < 0)
        goto fail;
    if (pieces < 1)
        pieces = 1;
    if (pieces > t->dst.len)  /* and no overflow below */
        pieces = t->dst.len;
    step = (t->dst.len + pieces - 1) / pieces;
    step = (step + 63) & ~(Py_ssize_t)63;  /* pieces start on cache lines */
    for (i = 0; i < t->dst.len; i += step) {
        Job *job = malloc(sizeof(Job));
        if (job == NULL) {
            while (first != NULL) {
                Job *next = first->next;
                free(first);
                first = next;
            }
            t->left = 0;
            PyErr_NoMemory();
            goto fail;
        }
        job->next = NULL;
        job->ticket = t;
        job->dst = (char *)t->dst.buf + i;
        job->src = (const char *)t->src.buf + i;
        job->n = (size_t)((t->dst.len - i) < step ? (t->dst.len - i) : step);
        if (last == NULL)
            first = job;
        else
            last->next = job;
        last = job;
        t->left++;
    }
    pthread_mutex_lock(&p->lock);
    queue_push(urgent ? &p->urgent : &p->queue, first, last);
    if (t->left > 1)
        pthread_cond_broadcast(&p->cond);
    else
        pthread_cond_signal(&p->cond);
    pthread_mutex_unlock(&p->lock);
    return (PyObject *)t;
fail:  /* the ticket releases whatever buffers it holds */
    Py_DECREF(t);
    return NULL;
}

static void pool_stop(Pool *p) {
    /* returns once every queued piece is copied, also while another thread closes */
    int i, started = p->started;
    if (p->threads == NULL)
        return;
    if (pool_forked(p)) {  /* no thread to stop or wait for in this process */
        p->stop = 1;
        p->started = p->running = 0;
        return;
    }
    pthread_mutex_lock(&p->lock);
    p->stop = 1;
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->lock);
    p->started = 0;  /* joined by this caller; a concurrent one waits below */
    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < started; i++)
        pthread_join(p->threads[i], NULL);
    pthread_mutex_lock(&p->lock);
    while (p->running > 0)
        pthread_cond_wait(&p->cond, &p->lock);
    pthread_mutex_unlock(&p->lock);
    Py_END_ALLOW_THREADS
}

static PyObject *pool_close(Pool *p, PyObject *unused) {
    pool_stop(p);
    Py_RETURN_NONE;
}

static PyObject *pool_get_closed(Pool *p, void *unused) {
    return PyBool_FromLong(p->stop);
}

static void pool_dealloc(Pool *p) {
    int forked = pool_forked(p);
    pool_stop(p);
    if (p->threads != NULL) {
        /* after fork the copied condition counts the parent's waiting workers, which
           this process lacks: destroying it would wait for them forever */
        if (!forked) {
            pthread_mutex_destroy(&p->lock);
            pthread_cond_destroy(&p->cond);
        }
        PyMem_Free(p->threads);
    }
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyMethodDef pool_methods[] = {
    {"copy", (PyCFunction)pool_copy, METH_VARARGS,
     "copy(dst, src, pieces, urgent=False) -> Ticket: start copying src into dst\n"
     "(arguments by position only)."},
    {"close", (PyCFunction)pool_close, METH_NOARGS,
     "Finish every queued piece, then stop the threads."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef pool_getset[] = {
    {"closed", (getter)pool_get_closed, NULL, "True once closed.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PoolType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "prism_gpu._hostcopy.Pool",
    .tp_basicsize = sizeof(Pool),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Native threads copying host memory without the GIL.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)pool_init,
    .tp_dealloc = (destructor)pool_dealloc,
    .tp_methods = pool_methods,
    .tp_getset = pool_getset,
};

static PyObject *address(PyObject *mod, PyObject *obj) {
    /* the address of a buffer's first element (numpy's data pointer) */
    Py_buffer view;
    PyObject *out;
    if (PyObject_GetBuffer(obj, &view, PyBUF_STRIDES) < 0)
        return NULL;
    out = PyLong_FromVoidPtr(view.buf);
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef module_methods[] = {
    {"address", (PyCFunction)address, METH_O,
     "address(buffer) -> int: the address of its first element."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_hostcopy",
    "Host memory copies on native threads that never take the GIL.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__hostcopy(void) {
    PyObject *m;
    if (PyType_Ready(&TicketType) < 0 || PyType_Ready(&PoolType) < 0)
        return NULL;
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&PoolType);
    if (PyModule_AddObject(m, "Pool", (PyObject *)&PoolType) < 0) {
        Py_DECREF(&PoolType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&TicketType);
    if (PyModule_AddObject(m, "Ticket", (PyObject *)&TicketType) < 0) {
        Py_DECREF(&TicketType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
