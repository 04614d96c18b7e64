"""Kernels and helpers shared by the test modules.

Data-touching test kernels are CUDA C++ source with a numpy ``cpu=`` version,
so the same tests run on both backends. Python callables get numpy arrays on the
CPU backend and device arrays on CUDA (run on the host at queue time, with their
stream current in CuPy): they work through :func:`device_view` (numpy ufuncs
dispatch to CuPy) and read data back with :func:`host_copy`.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from typing import Any, Callable, Iterator, List, Tuple

import numpy as np

import prism_gpu as pg

try:  # imported up front so the CUDA backend makes each op's stream current in CuPy
    import cupy
except ImportError:  # the CPU backend needs no CuPy
    cupy = None

F32 = np.float32
LATCH_TIMEOUT_S = 30.0

_LOOP = """
    size_t stride = (size_t)blockDim.x * gridDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
"""

ADD1_SRC = 'extern "C" __global__ void add1(float* a, size_t n) {' + _LOOP + "a[i] += 1.0f; }"
MUL3_SRC = 'extern "C" __global__ void mul3(float* a, size_t n) {' + _LOOP + "a[i] *= 3.0f; }"
JOIN_SRC = ('extern "C" __global__ void join(float* a, size_t na, const float* b, size_t nb) {'
            "size_t n = na < nb ? na : nb;" + _LOOP + "a[i] += b[i]; }")
SQUARE2_SRC = ('extern "C" __global__ void square2(const float* x, size_t n, float* out, '
               "size_t m) {" + _LOOP + "{ out[i] = x[i]; out[n + i] = x[i] * x[i]; } }")
PAIRSUM_SRC = ('extern "C" __global__ void pairsum(const float* x, size_t nx, float* out, '
               "size_t n) {" + _LOOP + "out[i] = x[2 * i] + x[2 * i + 1]; }")


def _add1(a: np.ndarray) -> None:
    a += F32(1)


def _mul3(a: np.ndarray) -> None:
    a *= F32(3)


def _join(a: np.ndarray, b: np.ndarray) -> None:
    n = min(len(a), len(b))
    a[:n] += b[:n]


def _square2(x: np.ndarray, out: np.ndarray) -> None:
    n = len(x)
    out[:n] = x
    np.multiply(x, x, out=out[n:2 * n])


def _pairsum(x: np.ndarray, out: np.ndarray) -> None:
    m = len(out)
    np.add(x[0:2 * m:2], x[1:2 * m:2], out=out)


AFFINE_SRC = r"""
extern "C" __global__ void affine(const float* x, size_t n, float* y, size_t m, float a,
                                  float b) {
    size_t k = n < m ? n : m;
    size_t stride = (size_t)blockDim.x * gridDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < k; i += stride)
        y[i] = a * x[i] + b;
}
"""


def _affine_cpu(x: np.ndarray, y: np.ndarray, a: float, b: float) -> None:
    k = min(len(x), len(y))
    np.multiply(x[:k], F32(a), out=y[:k])
    y[:k] += F32(b)


def affine() -> pg.Kernel:
    """``y[:k] = a * x[:k] + b`` (k the shorter length): one input, one output array."""
    return pg.Kernel.from_source(AFFINE_SRC, "affine", cpu=_affine_cpu)


def add1() -> pg.Kernel:
    """``a += 1`` on one float32 array."""
    return pg.Kernel.from_source(ADD1_SRC, "add1", cpu=_add1)


def mul3() -> pg.Kernel:
    """``a *= 3`` on one float32 array."""
    return pg.Kernel.from_source(MUL3_SRC, "mul3", cpu=_mul3)


def join() -> pg.Kernel:
    """``a[:n] += b[:n]`` (n the shorter length) on two float32 arrays."""
    return pg.Kernel.from_source(JOIN_SRC, "join", cpu=_join)


def square2() -> pg.Kernel:
    """``out`` (2n elements) = ``x`` then ``x * x``."""
    return pg.Kernel.from_source(SQUARE2_SRC, "square2", cpu=_square2)


def pairsum() -> pg.Kernel:
    """``out[i] = x[2i] + x[2i+1]``."""
    return pg.Kernel.from_source(PAIRSUM_SRC, "pairsum", cpu=_pairsum)


def device_view(a: Any) -> Any:
    """An array numpy ufuncs can write in place: ``a`` itself on CPU, a CuPy view on CUDA."""
    return a if isinstance(a, np.ndarray) else cupy.asarray(a)


def host_copy(a: Any) -> np.ndarray:
    """A host copy of what a callable kernel was given (ordered on its stream on CUDA)."""
    return a.copy() if isinstance(a, np.ndarray) else cupy.asnumpy(cupy.asarray(a))


def write(a: Any, values: np.ndarray) -> None:
    """Fill the array a callable kernel was given with host ``values``."""
    if isinstance(a, np.ndarray):
        a[...] = values
    else:
        cupy.asarray(a).set(values)


def recorder(log: List[Tuple[str, List[np.ndarray]]], name: str,
             then: Callable[..., Any] = lambda *a: None) -> pg.Kernel:
    """A callable kernel appending ``(name, [host copies of its arrays])`` to ``log``,
    then calling ``then`` on :func:`device_view` s of them."""
    def kernel(*arrays: Any) -> None:
        log.append((name, [host_copy(a) for a in arrays]))
        then(*(device_view(a) for a in arrays))
    return pg.Kernel.from_callable(kernel, name)


def rand(rng: np.random.Generator, n: int) -> np.ndarray:
    """Fresh float32 data, never all zeros."""
    return rng.standard_normal(n).astype(F32) + F32(0.5)


def ring_ordered(states: List[pg.BufferState]) -> bool:
    """True if some rotation of ``states`` reads DOWNLOADING* PROCESSING* UPLOADING* FREE*."""
    rank = {pg.BufferState.DOWNLOADING: 3, pg.BufferState.PROCESSING: 2,
            pg.BufferState.UPLOADING: 1, pg.BufferState.FREE: 0}
    r = [rank[s] for s in states]
    return any(all(a >= b for a, b in zip(rot, rot[1:]))
               for rot in (r[i:] + r[:i] for i in range(len(r))))


def snapshot(coord: pg.AsyncCoordinator, *buffers: pg.TripleBuffer) -> Tuple[Any, ...]:
    """What a rejected call must leave unchanged: the next op id and every slot state."""
    return coord.statistics().issued, [b.get_states() for b in buffers]


class Latch:
    """A kernel that holds the stream it runs on until :meth:`release`.

    CPU backend: a callable waiting on a ``threading.Event``. It gives up after
    ``timeout`` seconds (raising, so the op fails) so a broken test cannot hang.
    """

    def __init__(self, timeout: float = LATCH_TIMEOUT_S) -> None:
        self.timeout = timeout
        self._release = threading.Event()
        self._entered = threading.Event()
        self._finished = threading.Event()
        self.kernel = pg.Kernel.from_callable(self._run, "latch")

    def _run(self, *_arrays: Any) -> None:
        self._entered.set()
        try:
            if not self._release.wait(self.timeout):
                raise TimeoutError(f"latch not released within {self.timeout} s")
        finally:
            self._finished.set()

    def release(self) -> None:
        self._release.set()

    @property
    def released(self) -> bool:
        return self._release.is_set()

    @property
    def entered(self) -> bool:
        """The kernel has started (its stream is held)."""
        return self._entered.is_set()

    @property
    def finished(self) -> bool:
        """The kernel has returned (its stream moved on)."""
        return self._finished.is_set()

    @property
    def held(self) -> bool:
        """Not released and not finished: nothing after it on its stream has run."""
        return not self._release.is_set() and not self._finished.is_set()

    def wait_entered(self, timeout: float = LATCH_TIMEOUT_S) -> bool:
        return self._entered.wait(timeout)


CUDA_LATCH_SRC = r"""
extern "C" __global__ void latch(volatile int* flag, double timeout_s) {
    // flag[0]: released by the host; [1]: entered; [2]: finished; [3]: timed out
    flag[1] = 1;
    __threadfence_system();
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    unsigned long long limit = (unsigned long long)(timeout_s * 1e9);
    while (flag[0] == 0) {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
        if (now - start > limit) { flag[3] = 1; break; }
        __nanosleep(1000);
    }
    flag[2] = 1;
    __threadfence_system();
}
"""


_LATCH_FLAGS: List[np.ndarray] = []


class CudaLatch:
    """The CUDA latch: a one-thread kernel spinning on a flag in pinned host memory.

    The host writes ``flag[0]`` to release it; the kernel reports entry and exit
    through the other flags. It gives up after ``timeout`` seconds so a broken
    test cannot hold the GPU.
    """

    def __init__(self, timeout: float = LATCH_TIMEOUT_S) -> None:
        self.timeout = timeout
        # Freeing pinned memory (cudaFreeHost) waits for the whole device: garbage of an
        # earlier test collected while this latch holds a stream would block the host
        # until the latch times out. Collect now and pause the collector until release.
        gc.collect()
        gc.disable()
        self._flag = pg.pinned_empty(4, np.int32)
        # kept for the whole session: a latch kernel still spinning after its test (until
        # its timeout) must write into its own flags, never into a later latch's
        _LATCH_FLAGS.append(self._flag)
        self._flag[:] = 0
        ptr = self._flag.__array_interface__["data"][0]
        self.kernel = pg.Kernel("latch", source=CUDA_LATCH_SRC, entry="latch",
                                uses_arrays=False, defaults=(ptr, float(timeout)),
                                config=pg.LaunchConfig(grid=1, block=1))

    def release(self) -> None:
        self._flag[0] = 1
        gc.enable()

    @property
    def released(self) -> bool:
        return bool(self._flag[0])

    @property
    def entered(self) -> bool:
        return bool(self._flag[1])

    @property
    def finished(self) -> bool:
        return bool(self._flag[2])

    @property
    def held(self) -> bool:
        return not self._flag[0] and not self._flag[2]

    def __repr__(self) -> str:
        released, entered, finished, timed_out = (int(v) for v in self._flag)
        return (f"CudaLatch(released={released}, entered={entered}, finished={finished}, "
                f"timed_out={timed_out}, flag at 0x{self._flag.ctypes.data:x})")

    def wait_entered(self, timeout: float = LATCH_TIMEOUT_S) -> bool:
        deadline = time.monotonic() + timeout
        while not self._flag[1]:
            if time.monotonic() > deadline:
                return False
            time.sleep(1e-4)
        return True


def in_threads(fn: Callable[..., None], args: List[Tuple[Any, ...]]) -> List[BaseException]:
    """Run ``fn(*a)`` for every ``a`` in ``args``, each on a thread of its own, all at
    once; returns what they raised."""
    errors: List[BaseException] = []

    def run(*a: Any) -> None:
        try:
            fn(*a)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=a) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@contextlib.contextmanager
def release_timer(latch: Any, delay: float = 0.1) -> Iterator[threading.Timer]:
    """A timer that releases ``latch`` after ``delay`` seconds once started; on exit the
    latch is released and the timer stopped, whatever happened."""
    timer = threading.Timer(delay, latch.release)
    try:
        yield timer
    finally:
        latch.release()
        timer.cancel()
        if timer.is_alive():
            timer.join()


def make_latch(backend: str) -> Any:
    """A latch for ``backend``. Release it before closing what runs it."""
    if backend == "cuda":
        return CudaLatch()
    return Latch()


class Boom(Exception):
    """What failing test kernels raise."""


def boom(*_arrays: Any) -> None:
    """A kernel that always fails."""
    raise Boom("kernel exploded")


def checked_round(coord: pg.AsyncCoordinator, buf: pg.TripleBuffer,
                  rng: np.random.Generator) -> None:
    """One checked Pattern-1 iteration (upload, compute, download, advance) on fresh data."""
    x, out = rand(rng, buf.size()), np.full(buf.size(), np.nan, dtype=F32)
    up = coord.queue_upload(x, buf)
    coord.queue_compute("scale", [up])
    coord.wait(coord.queue_download(buf, out))
    assert buf.advance() is True
    np.testing.assert_array_equal(out, x * F32(2))


def refusal_recorder(action: Callable[[], Any], seen: List[BaseException]
                     ) -> Callable[[Any, Any], None]:
    """An ``on_done`` callback running ``action`` and keeping the InvalidOperationError
    it raises in ``seen`` (what a callback may not do is refused, not fatal)."""
    def callback(report: Any, ms: Any) -> None:
        try:
            action()
        except pg.InvalidOperationError as exc:
            seen.append(exc)
    return callback


def doubling_pipeline(ctx: pg.ManagedGpuContext, n: int) -> Tuple[Any, int, int]:
    """A CPU pipeline of buffers a and b (n float32 each) and one stage b = 2a."""
    pipe = ctx.create_pipeline_manager()
    a, b = pipe.add_buffer(n), pipe.add_buffer(n)
    pipe.add_stage(pg.GpuPipelineStage("s", [a], [b],
                                       kernel=lambda x, y: np.multiply(x, 2, out=y)))
    return pipe, a, b


def over_reference(cls: type, reference: type) -> type:
    """``cls`` (a class deriving from a compiled core) rebuilt over that core's Python
    ``reference``: the same methods, so a test runs both twins."""
    return type(f"Py{cls.__name__}", (reference,),
                {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")})


def peak_memory_of_iterations(pipe: pg.PipelineStageManager, count: int) -> int:
    """Run ``count`` iterations of ``pipe``, then ``get_stats()``: the most memory traced
    meanwhile (``tracemalloc`` running). The coordinator's completion reports are drained
    after every iteration: they are bounded by its ``report_backlog``, a separate matter."""
    import tracemalloc

    coord = pipe.coordinator()
    peak = 0
    for _ in range(count):
        pipe.execute_iteration()
        coord.poll()
        peak = max(peak, tracemalloc.get_traced_memory()[0])
    pipe.get_stats()
    coord.poll()
    return max(peak, tracemalloc.get_traced_memory()[0])


def pipeline_memory_growth(pipe: pg.PipelineStageManager) -> int:
    """Bytes more at the peak of iterations 2200..2700 than at that of 200..700 (counted
    from now), with ``tracemalloc`` running meanwhile: bounded structures fill and empty
    as they go, so two windows' peaks are compared, not two single points."""
    import tracemalloc

    tracemalloc.start()
    try:
        peak_memory_of_iterations(pipe, 200)
        early = peak_memory_of_iterations(pipe, 500)
        peak_memory_of_iterations(pipe, 1500)
        late = peak_memory_of_iterations(pipe, 500)
    finally:
        tracemalloc.stop()
    return late - early


class StampEvent:
    """A timing event stamped at device time ``t`` (ms), as a statistics window reads it."""

    def __init__(self, t: float) -> None:
        self.t = t

    def elapsed_ms(self, ref: "StampEvent") -> float:
        return self.t - ref.t

    def query(self) -> bool:
        return True


class ReportedOp:
    """What a window's timer reads of an engine op: its id, end event and error."""

    def __init__(self, oid: int, end: float, error: Any = None) -> None:
        self.id, self.end, self.error = oid, StampEvent(end), error
