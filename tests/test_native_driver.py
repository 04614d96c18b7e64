"""The native driver calls of the CUDA hot path, against a stand-in driver library.

The stand-in (compiled here from C) exports the five driver functions the extension
uses and records each call: the arguments reach it exactly, kernel parameters are
packed with the C type's bytes, and what may never reach a driver (a null stream or
event, an array passed by value, a bool) does not. Each check runs in a fresh process
so the stand-in is the only driver library loaded. The real driver is exercised by the
GPU suite (tests/test_cuda.py and every CUDA test through the backend).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

try:
    from prism_gpu.backends.cuda import _native  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - a build without a C compiler
    _native = None

CC = shutil.which("cc") or shutil.which("gcc")
pytestmark = [
    pytest.mark.skipif(_native is None, reason="the native driver extension is not built here"),
    pytest.mark.skipif(CC is None, reason="no C compiler to build the stand-in driver"),
]

STAND_IN = r"""
#include <string.h>
#include <unistd.h>
typedef int CUresult;
int gated = 0;                  /* calls wait for the gate to open (up to 5 s) */
volatile int gate = 0;
static CUresult through_gate(void) {
    for (int i = 0; gated && !gate; i++) {
        if (i > 50000) return 999;  /* nobody opened it: the caller held the GIL */
        usleep(100);
    }
    return 0;
}
int result = 0;                 /* what every call returns */
int calls = 0;                  /* calls made */
unsigned long long last[12];    /* the last call's scalar arguments */
int nparams = 0;                /* how many kernel parameters to read */
unsigned char params[64][16];   /* their bytes, as the kernel would see them */
int null_params = 0;            /* the launch got no parameter array */

CUresult cuMemcpyAsync(unsigned long long d, unsigned long long s, unsigned long n, void *st) {
    calls++; last[0] = d; last[1] = s; last[2] = n; last[3] = (unsigned long long)st;
    return through_gate() ? 999 : result;
}
CUresult cuEventRecord(void *e, void *s) {
    calls++; last[0] = (unsigned long long)e; last[1] = (unsigned long long)s;
    return through_gate() ? 999 : result;
}
CUresult cuStreamWaitEvent(void *s, void *e, unsigned flags) {
    calls++; last[0] = (unsigned long long)s; last[1] = (unsigned long long)e; last[2] = flags;
    return through_gate() ? 999 : result;
}
CUresult cuEventQuery(void *e) { calls++; last[0] = (unsigned long long)e; return result; }
CUresult cuEventElapsedTime(float *ms, void *s, void *e) {
    calls++; last[0] = (unsigned long long)s; last[1] = (unsigned long long)e;
    *ms = 1.25f;
    return result;
}
void *cur_ctx = 0;              /* the calling thread's current context (one thread) */
void *stream_ctx = (void *)0xC0;  /* every stream's context */
int ctx_result = 0;             /* what cuCtxGetCurrent returns */
int ctx_calls = 0;
CUresult cuCtxGetCurrent(void **c) { ctx_calls++; *c = cur_ctx; return ctx_result; }
CUresult cuStreamGetCtx(void *s, void **c) { *c = stream_ctx; return 0; }
CUresult cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned smem, void *s, void **kp,
                        void **extra) {
    calls++;
    last[0] = (unsigned long long)f; last[1] = gx; last[2] = gy; last[3] = gz;
    last[4] = bx; last[5] = by; last[6] = bz; last[7] = smem;
    last[8] = (unsigned long long)s; last[9] = (unsigned long long)extra;
    null_params = kp == 0;
    for (int i = 0; i < nparams && kp && kp[i]; i++) memcpy(params[i], kp[i], 16);
    return through_gate() ? 999 : result;
}
"""

PRELUDE = """
import ctypes, sys
import numpy as np
lib = ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)
from prism_gpu.backends.cuda import _native as n
TYPES = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
         np.uint64, np.float16, np.float32, np.float64, np.complex64, np.complex128)
why = n.load(TYPES)
assert why is None, why
def calls(): return ctypes.c_int.in_dll(lib, "calls").value
def last(i): return (ctypes.c_ulonglong * 12).in_dll(lib, "last")[i]
def param(i, size): return bytes((ctypes.c_ubyte * 16 * 64).in_dll(lib, "params")[i])[:size]
def set_int(name, v): ctypes.c_int.in_dll(lib, name).value = v
"""


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("driver")
    src = d / "driver.c"
    src.write_text(STAND_IN)
    lib = d / "libcuda.so.1"
    subprocess.run([CC, "-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o", str(lib),
                    str(src)], check=True, capture_output=True)
    return lib


def run(stand_in: Path, body: str) -> None:
    env = dict(os.environ, LD_LIBRARY_PATH=str(stand_in.parent))
    code = PRELUDE + textwrap.dedent(body) + "\nprint('ok')\n"
    p = subprocess.run([sys.executable, "-c", code, str(stand_in)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr or p.stdout


def test_without_a_driver_library_load_says_why_and_calls_refuse() -> None:
    code = textwrap.dedent("""
        import sys
        from prism_gpu.backends.cuda import _native as n
        try:
            n.load([int])
        except TypeError:
            pass
        else:
            raise AssertionError("load took a list")
        try:
            n.load((1,))
        except TypeError:
            pass
        else:
            raise AssertionError("load took a non-type")
        why = n.load(())
        if why is None:
            sys.exit(3)  # this machine has a driver library
        assert "libcuda" in why, why
        for call in (lambda: n.memcpy(1, 2, 3, 4), lambda: n.query(1),
                     lambda: n.launch(1, 1, 1, 1, 1, 1, 1, 0, 1, ())):
            try:
                call()
            except RuntimeError as e:
                assert "not loaded" in str(e)
            else:
                raise AssertionError("a call without the driver ran")
        print("ok")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    if p.returncode == 3:
        pytest.skip("this machine has a CUDA driver library")
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_copies_records_waits_and_queries_reach_the_driver_exactly(stand_in: Path) -> None:
    run(stand_in, """
        big = (1 << 64) - 16  # handles and pointers are unsigned 64-bit
        assert n.memcpy(big, 0x2000, 1 << 33, 0x77) == 0 and calls() == 1
        assert (last(0), last(1), last(2), last(3)) == (big, 0x2000, 1 << 33, 0x77)
        assert n.record(0x11, 0x22) == 0 and (last(0), last(1)) == (0x11, 0x22)
        assert n.wait(0x33, 0x44) == 0 and (last(0), last(1), last(2)) == (0x33, 0x44, 0)
        assert n.query(0x55) == 0 and last(0) == 0x55
        set_int("result", 600)  # the driver's code comes back as it is
        assert n.query(0x55) == 600 and n.record(0x11, 0x22) == 600
        assert calls() == 6
    """)


def test_null_handles_never_reach_the_driver(stand_in: Path) -> None:
    # a closed stream's handle reads 0: the driver would take it for the default stream
    run(stand_in, """
        assert n.memcpy(1, 2, 3, 0) == 400
        assert n.record(0, 5) == 400 and n.record(5, 0) == 400
        assert n.wait(0, 5) == 400 and n.wait(5, 0) == 400
        assert n.query(0) == 400
        assert n.launch(0, 1, 1, 1, 1, 1, 1, 0, 5, ()) == 400
        assert n.launch(5, 1, 1, 1, 1, 1, 1, 0, 0, ()) == 400
        assert calls() == 0
    """)


def test_kernel_parameters_are_packed_with_their_c_types(stand_in: Path) -> None:
    run(stand_in, """
        set_int("nparams", 11)
        args = [0xDEADBEEF0, np.uint64(7), np.float32(1.5), np.int8(-3), np.float64(-2.25),
                np.complex128(1 + 2j), np.bool_(True), (1 << 64) - 1, np.float16(-0.5),
                np.complex64(3 - 4j), -(1 << 63)]
        assert n.launch(0xF0, 4, 2, 1, 128, 2, 1, 256, 0x99, args) == 0
        assert [last(i) for i in range(10)] == [0xF0, 4, 2, 1, 128, 2, 1, 256, 0x99, 0]
        assert param(0, 8) == (0xDEADBEEF0).to_bytes(8, "little")
        assert param(1, 8) == np.uint64(7).tobytes()
        assert param(2, 4) == np.float32(1.5).tobytes()
        assert param(3, 1) == np.int8(-3).tobytes()
        assert param(4, 8) == np.float64(-2.25).tobytes()
        assert param(5, 16) == np.complex128(1 + 2j).tobytes()
        assert param(6, 1) == b"\\x01"
        assert param(7, 8) == b"\\xff" * 8
        assert param(8, 2) == np.float16(-0.5).tobytes()
        assert param(9, 8) == np.complex64(3 - 4j).tobytes()
        assert param(10, 8) == np.int64(-(1 << 63)).tobytes()
        assert n.launch(0xF0, 1, 1, 1, 1, 1, 1, 0, 0x99, [np.int32(5)] * 256) == 0  # the most
        assert n.launch(0xF0, 1, 1, 1, 1, 1, 1, 0, 0x99, ()) == 0
        assert ctypes.c_int.in_dll(lib, "null_params").value == 1  # no parameters: NULL
        n.launch(0xF0, 1, 1, 1, 1, 1, 1, 0, 0x99, (np.int32(-1),))  # a tuple works too
        assert param(0, 4) == np.int32(-1).tobytes()
    """)


def test_arguments_c_cannot_pass_are_refused_before_the_driver(stand_in: Path) -> None:
    run(stand_in, """
        def refused(args, exc=TypeError):
            before = calls()
            try:
                n.launch(0xF0, 1, 1, 1, 1, 1, 1, 0, 0x99, args)
            except exc:
                assert calls() == before, "the driver was called"
            else:
                raise AssertionError(f"{args!r} was accepted")
        refused([True])                          # a bool: which C type?
        refused([1.5])                           # a Python float: double or float?
        refused([np.arange(2, dtype=np.float32)])  # an array is not a value
        refused([np.ones(1, np.float32)])        # not even of one element
        refused([np.array(1.5, np.float32)])     # nor a 0-d array
        refused([np.array(None, object)])        # whose bytes would be a PyObject*
        refused(["text"])
        refused([np.str_("ab")])                 # 8 bytes of UCS-4: not a C scalar
        refused([np.longdouble(1)])              # 16 bytes, 6 of them padding
        refused([np.zeros((), "V4")[()]])        # raw bytes
        refused([np.datetime64(1, "s")])
        refused([object()])
        refused([np.int32(1)] * 257)             # past the argument limit
        refused([-1 << 64], OverflowError)        # no 64-bit value
        refused(5)                               # not a sequence
        for bad in (-1, 1 << 64):
            try:
                n.launch(0xF0, bad, 1, 1, 1, 1, 1, 0, 0x99, ())
            except OverflowError:
                pass
            else:
                raise AssertionError("a dimension out of range was accepted")
        try:
            n.launch(0xF0, 1 << 32, 1, 1, 1, 1, 1, 0, 0x99, ())
        except OverflowError:
            pass
        else:
            raise AssertionError("a 33-bit dimension was accepted")
        for bad in (-5, "1", None):
            try:
                n.memcpy(bad, 1, 1, 1)
            except (OverflowError, TypeError):
                pass
            else:
                raise AssertionError(f"memcpy took {bad!r}")
        assert calls() == 0
    """)


def test_calls_that_queue_work_let_other_threads_run_meanwhile(stand_in: Path) -> None:
    # a full device queue blocks a call in the driver: other Python threads must go on.
    # The stand-in's calls wait for a gate that only another Python thread opens.
    run(stand_in, """
        import threading, time
        set_int("gated", 1)
        calls_ = [lambda: n.memcpy(1, 2, 3, 4), lambda: n.record(1, 2), lambda: n.wait(1, 2),
                  lambda: n.launch(0xF0, 1, 1, 1, 1, 1, 1, 0, 0x99, [np.int32(1)])]
        for call in calls_:
            ctypes.c_int.in_dll(lib, "gate").value = 0
            def opener():
                time.sleep(0.05)
                ctypes.c_int.in_dll(lib, "gate").value = 1
            t = threading.Thread(target=opener)
            t.start()
            assert call() == 0, "the other thread never ran: the call held the GIL"
            t.join()
    """)


TYPES_PRELUDE = """
import gc, threading, weakref
from prism_gpu._errors import InvalidOperationError, KernelError
CUR = threading.local()
def err(code, what): return KernelError(f"{what} failed with {code}")
n.bind(InvalidOperationError, CUR, err)
class FakeEv:
    def __init__(self, h): self.handle = h
class Dev:
    ordinal, currents = 0, 0
    def _current(self):
        Dev.currents += 1
        CUR.ordinal = self.ordinal
    def host_info(self, a):  # arrays of 7 elements stand for pageable memory
        return a.ctypes.data, a.size != 7
class Ev(n.Event):
    __slots__ = ()
    def _run_finishers(self):
        work, self._finish = self._finish, None
        for fn in work or ():
            try:
                fn()
            except Exception as exc:
                self._err = self._err or exc
class St(n.Stream):
    def _refuse_closed(self, what): raise InvalidOperationError(f"{what} on a closed stream")
    def error_of(self, code, what): return err(code, what)
    def _copy_h2d_staged(self, dst, src, nbytes): self.staged = ("h2d", nbytes)
    def _copy_d2h_staged(self, dst, src, nbytes): self.staged = ("d2h", nbytes)
class DA:
    def __init__(self, p): self.ptr = p
class K:
    name = "kern"
    def launch(self, stream, cfg, arrays, extra): self.got = (stream, cfg, arrays, extra)
def refused(exc, text, fn):
    try:
        fn()
    except exc as e:
        assert text in str(e), (text, e)
    else:
        raise AssertionError("accepted: " + text)
dev = Dev()
"""


def test_native_stream_and_event_types_do_what_the_python_ones_do(stand_in: Path) -> None:
    """The C stream and event (the CUDA backend's hot methods) against the stand-in: each
    call reaches the driver exactly or is skipped where the Python code skips it, host
    work moves with a record, the context is made current when another is, closed
    streams and events and wrong arguments are refused before the driver, and nothing
    leaks or outlives its cycle."""
    run(stand_in, TYPES_PRELUDE + textwrap.dedent("""
        s, s2 = St(dev, 0x50), St(dev, 0x60)
        e, t = Ev(FakeEv(0xE1), False), Ev(FakeEv(0xE2), True)
        assert s.live_handle == 0x50 and s._device is dev and s._pending == []
        assert not s._closed and e._h == 0xE1 and not e.timing and t.timing
        s.record(e)
        assert (calls(), last(0), last(1)) == (1, 0xE1, 0x50) and e._last is s
        s.wait(e)  # stream order already puts it after that record
        assert calls() == 1
        s2.wait(e, propagate=False)
        assert (calls(), last(0), last(1)) == (2, 0x60, 0xE1)
        s._pending.append(lambda: None)
        s.record(t, stamp=True)  # a stamp takes no host work
        assert t._finish is None and len(s._pending) == 1
        s.record(e)
        assert e._finish is not None and s._pending == []
        assert e.error() is None and e._finish is None
        set_int("result", 600)
        assert e.query() is False
        set_int("result", 700)
        refused(KernelError, "querying an event failed with 700", e.query)
        set_int("result", 0)
        s._pending.append(lambda: 1 / 0)
        s.record(e)
        assert e.query() is True and isinstance(e.error(), ZeroDivisionError)
        s.record(e)
        assert e.error() is None, "a new record clears what the last one's work raised"
        h, d = np.arange(16, dtype=np.float32), DA(0xD0)
        s.copy_h2d(d, h)
        assert (last(0), last(1), last(2), last(3)) == (0xD0, h.ctypes.data, 64, 0x50)
        s.copy_d2h(h, d)
        assert (last(0), last(1), last(2), last(3)) == (h.ctypes.data, 0xD0, 64, 0x50)
        before, p = calls(), np.arange(7, dtype=np.float32)
        s.copy_h2d(d, p)
        assert s.staged == ("h2d", 28)
        s.copy_d2h(p, d)
        assert s.staged == ("d2h", 28) and calls() == before
        set_int("result", 999)
        refused(KernelError, "host-to-device copy failed with 999", lambda: s.copy_h2d(d, h))
        refused(KernelError, "recording an event failed with 999", lambda: s.record(e))
        refused(KernelError, "stream wait on an event failed with 999", lambda: s2.wait(t))
        set_int("result", 0)
        k = K()
        s.launch(k, "cfg", (1,), (2,))
        assert k.got == (s, "cfg", (1,), (2,))
        for bad in (lambda: s.record(1), lambda: s.record(e, bogus=True), lambda: s.wait(),
                    lambda: s.copy_h2d(d), lambda: s.launch(k)):
            refused(TypeError, "", bad)
        CUR.ordinal, made = 3, Dev.currents  # another device's context is current
        s.record(e)
        assert Dev.currents == made + 1 and CUR.ordinal == 0
        del CUR.ordinal
        s.record(e)
        assert Dev.currents == made + 2
        closed_ev = Ev(FakeEv(0xE3), False)
        closed_ev._h = 0
        before = calls()
        refused(InvalidOperationError, "recording a closed event", lambda: s.record(closed_ev))
        refused(InvalidOperationError, "stream wait on a closed event",
                lambda: s2.wait(closed_ev))
        refused(InvalidOperationError, "querying a closed event", closed_ev.query)
        s._closed, s.live_handle = True, 0
        refused(InvalidOperationError, "recording an event on a closed stream",
                lambda: s.record(e))
        refused(InvalidOperationError, "stream wait on an event on a closed stream",
                lambda: s.wait(t))
        refused(InvalidOperationError, "host-to-device copy on a closed stream",
                lambda: s.copy_h2d(d, h))
        refused(InvalidOperationError, "device-to-host copy on a closed stream",
                lambda: s.copy_d2h(h, d))
        refused(InvalidOperationError, "launching kernel 'kern' on a closed stream",
                lambda: s.launch(k, 0, (), ()))
        assert calls() == before, "refused calls reached the driver"
        s3, ev = St(dev, 0x70), Ev(FakeEv(0xE4), False)
        watched = (ev, h, d, dev, k)
        base = [sys.getrefcount(x) for x in watched]
        for _ in range(5000):
            s3.wait(e)
            s3.copy_h2d(d, h)
            s3.record(ev)
            ev.query()
            ev.error()
            s3.copy_d2h(h, d)
            s3.launch(k, 0, (), ())
        k.got = None
        assert [sys.getrefcount(x) for x in watched] == base
        r1, r2 = weakref.ref(s3), weakref.ref(ev)
        ev._finish = [lambda s=s3, e=ev: (s, e)]  # a cycle through both
        del s3, ev, watched
        gc.collect()
        assert r1() is None and r2() is None
    """))


def test_arrays_are_packed_as_pointer_and_length_then_the_extra_values(stand_in: Path) -> None:
    """launch_arrays: each array as (pointer, size_t n), n its length if 1-d else its
    size; then the extra values; an array of another dtype than its parameter's, or one
    without a pointer of its own, is answered before the driver (the caller raises or
    takes the general path); null handles never reach it."""
    run(stand_in, """
        class A:
            def __init__(self, ptr, shape, dtype):
                self.ptr, self.shape, self.dtype = ptr, shape, np.dtype(dtype)
                self.size = int(np.prod(shape))
        f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
        set_int("nparams", 6)
        dims = (4, 2, 1, 128, 2, 1, 256)
        arrays = [A(0xA0, (5,), f32), A(0xB0, (3, 4), f64)]
        pointees = (f32, None, f64, None)
        assert n.launch_arrays(0xF0, dims, 0x99, arrays, pointees,
                               (np.float32(1.5), np.int32(-2))) == 0
        assert [last(i) for i in range(9)] == [0xF0, 4, 2, 1, 128, 2, 1, 256, 0x99]
        assert param(0, 8) == (0xA0).to_bytes(8, "little")
        assert param(1, 8) == np.uint64(5).tobytes()
        assert param(2, 8) == (0xB0).to_bytes(8, "little")
        assert param(3, 8) == np.uint64(12).tobytes()
        assert param(4, 4) == np.float32(1.5).tobytes()
        assert param(5, 4) == np.int32(-2).tobytes()
        before = calls()
        assert n.launch_arrays(0xF0, dims, 0x99, arrays, (f32, None, f32, None), ()) == -2
        no_ptr = A(None, (5,), f32)
        assert n.launch_arrays(0xF0, dims, 0x99, [arrays[0], no_ptr], (f32, None, f32, None),
                               ()) == -1001
        assert n.launch_arrays(0, dims, 0x99, arrays, pointees, ()) == 400
        assert n.launch_arrays(0xF0, dims, 0, arrays, pointees, ()) == 400
        for bad in ((np.float32(1), True), ([1.5],)):
            try:
                n.launch_arrays(0xF0, dims, 0x99, arrays, pointees, bad[0] if len(bad) == 1
                                else bad)
            except TypeError:
                pass
            else:
                raise AssertionError("a value C cannot pass was taken")
        assert calls() == before, "refused launches reached the driver"
    """)


def test_launch_arrays_survives_hostile_arrays(stand_in: Path) -> None:
    """Findings of a review, each against the stand-in: an array whose dtype reading
    empties the caller's list (the packing keeps its own tuple), a dtype that raises (it
    reaches the caller: no launch unchecked), a pointer that raises KeyboardInterrupt (it
    is not swallowed), a dtype of None (no check, as in Python), a pointer that is not a
    plain int (the general path)."""
    run(stand_in, """
        f32 = np.dtype(np.float32)
        dims = (1, 1, 1, 1, 1, 1, 0)
        class A:
            shape, size = (4,), 4
            def __init__(self, ptr=0xA0, dtype=f32):
                self.ptr, self._dtype = ptr, dtype
            @property
            def dtype(self):
                return self._dtype() if callable(self._dtype) else self._dtype
        arrays = []
        def clearing():
            arrays.clear()
            return f32
        arrays.extend([A(dtype=clearing), A()])
        assert n.launch_arrays(0xF0, dims, 0x99, arrays, (f32, None, f32, None), ()) == 0
        def raising():
            raise RuntimeError("dtype went wrong")
        before = calls()
        try:
            n.launch_arrays(0xF0, dims, 0x99, [A(dtype=raising)], (f32, None), ())
        except RuntimeError:
            pass
        else:
            raise AssertionError("a dtype that raised was skipped")
        class P(A):
            @property
            def ptr(self):
                raise KeyboardInterrupt
            @ptr.setter
            def ptr(self, v):
                pass
        try:
            n.launch_arrays(0xF0, dims, 0x99, [P()], (f32, None), ())
        except KeyboardInterrupt:
            pass
        else:
            raise AssertionError("a KeyboardInterrupt was swallowed")
        assert calls() == before
        assert n.launch_arrays(0xF0, dims, 0x99, [A(dtype=None)], (f32, None), ()) == 0
        assert n.launch_arrays(0xF0, dims, 0x99, [A(ptr=np.uint64(5))], (f32, None), ()) \\
            == -1000
    """)


def test_a_stream_never_set_up_is_refused_and_streams_have_a_dict(stand_in: Path) -> None:
    run(stand_in, TYPES_PRELUDE + textwrap.dedent("""
        CUR.ordinal = 5
        s = St.__new__(St)
        refused(InvalidOperationError, "never set up", lambda: s.record(Ev(FakeEv(1), False)))
        refused(InvalidOperationError, "never set up", lambda: s.copy_h2d(DA(1), np.ones(4)))
        t = St(dev, 0x50)
        t.extra_note = 1
        assert vars(t)["extra_note"] == 1
        t._device = dev  # writable, as the Python stream's
    """))


def test_copies_keep_host_info_answers_until_a_registration_changes(stand_in: Path) -> None:
    """With the registered ranges bound, a copy asks the device's host_info once per host
    array and generation of registrations: again after a registration changes, again for
    a new array at a dead one's address, and never for a hit (the pinned memory's address
    still reaches the driver exactly); pageable answers are kept too (staged each time)."""
    run(stand_in, TYPES_PRELUDE + textwrap.dedent("""
        class Reg:
            state = ((), 0)
        asked = []
        class CountingDev(Dev):
            def host_info(self, a):
                asked.append(id(a))
                return Dev.host_info(self, a)
        n.bind(InvalidOperationError, CUR, err, Reg)
        s, d = St(CountingDev(), 0x50), DA(0xD0)
        h, p = np.arange(16, dtype=np.float32), np.arange(7, dtype=np.float32)
        for _ in range(5):
            s.copy_h2d(d, h)
            assert (last(0), last(1), last(2)) == (0xD0, h.ctypes.data, 64)
            s.copy_d2h(h, d)
            s.copy_h2d(d, p)
            assert s.staged == ("h2d", 28)
        assert asked == [id(h), id(p)], asked
        Reg.state = ((), 1)  # a registration changed: asked again
        s.copy_h2d(d, h)
        assert asked[2:] == [id(h)]
        del h
        gc.collect()
        fresh = [np.arange(16, dtype=np.float32) for _ in range(64)]
        for a in fresh:  # some may take the dead array's address: never answered for it
            s.copy_h2d(d, a)
            assert last(1) == a.ctypes.data
        assert len(asked) == 3 + 64
        watched = (p, d)
        base = [sys.getrefcount(x) for x in watched]
        for _ in range(1000):
            s.copy_h2d(d, p)
        assert [sys.getrefcount(x) for x in watched] == base
        r = weakref.ref(p)
        del p, watched
        gc.collect()
        assert r() is None, "the cache kept an array alive"
        n.bind(InvalidOperationError, CUR, err)  # None: off, every copy asks
        h2 = np.arange(16, dtype=np.float32)
        before = len(asked)
        s.copy_h2d(d, h2)
        s.copy_h2d(d, h2)
        assert len(asked) == before + 2
    """))


def test_a_source_kernel_launch_takes_its_common_case_from_the_method_caches(
        stand_in: Path) -> None:
    """A native stream launches a bound SourceKernel type from the caches its launch
    method keeps: on a hit the driver gets the cached dimensions, the arrays as
    (pointer, n) and the cached extra values, and the method is not called; any miss
    (configuration, extra tuple, array count, layout, a list of extra values, no arrays
    but extra values, a dtype refused, an array without a pointer, a value C cannot pass)
    calls the method and nothing reaches the driver; a launch with neither arrays nor
    extra values takes the method's general branch here (cached dimensions, no
    arguments); a driver refusal raises the stream's error; another type always calls its
    method; nothing leaks."""
    run(stand_in, TYPES_PRELUDE + textwrap.dedent("""
        class A:
            def __init__(self, ptr, n, dtype=np.float32):
                self.ptr, self.shape, self.dtype, self.size = ptr, (n,), np.dtype(dtype), n
        class SK:  # SourceKernel's caches, as its launch method keeps them
            name = "sk"
            def __init__(self):
                self._func, self._conv = 0xF0, [None] * 3  # (T*, size_t n, double)
                self._pointee = [np.dtype(np.float32), None, None]
                self._layouts, self._configs, self._ext = {1: True}, {}, None
                self.slow = []
            def launch(self, stream, config, arrays, extra):
                self.slow.append((config, tuple(arrays), extra))
        n.bind_kernel(SK, 32)
        s, k, cfg = St(dev, 0x50), SK(), object()
        extra, a = (np.float64(2.5),), A(0xA0, 5)
        k._configs[id(cfg)] = (cfg, (4, 1, 1, 128, 1, 1, 0))
        k._ext = (extra, 1, (np.float64(2.5),))
        set_int("nparams", 3)
        before = calls()
        s.launch(k, cfg, [a], extra)
        assert k.slow == [] and calls() == before + 1
        assert [last(i) for i in range(9)] == [0xF0, 4, 1, 1, 128, 1, 1, 0, 0x50]
        assert param(0, 8) == (0xA0).to_bytes(8, "little")
        assert param(1, 8) == np.uint64(5).tobytes() and param(2, 8) == extra[0].tobytes()
        misses = [(object(), [a], extra), (cfg, [a], (np.float64(2.5),)),  # cache misses
                  (cfg, [a, a], extra), (cfg, [a], [np.float64(2.5)]), (cfg, [], extra),
                  (cfg, [A(0xA0, 5, np.float64)], extra), (cfg, [A(None, 5)], extra)]
        for config, arrays, ex in misses:
            s.launch(k, config, arrays, ex)
        k._ext = (extra, 1, (True,))  # a value C cannot pass: the method says so
        s.launch(k, cfg, [a], extra)
        k._ext, k._layouts = (extra, 1, (np.float64(2.5),)), {1: False}
        s.launch(k, cfg, [a], extra)
        assert len(k.slow) == len(misses) + 2 and calls() == before + 1, "a miss launched"
        k._layouts = {1: True}
        set_int("result", 701)
        refused(KernelError, "launching kernel 'sk' failed with 701",
                lambda: s.launch(k, cfg, [a], extra))
        set_int("result", 0)
        other = K()
        s.launch(other, cfg, [a], extra)
        assert other.got[1] is cfg
        # no arrays and no extra values: the method's general branch, no arguments
        before, slow = calls(), len(k.slow)
        s.launch(k, cfg, [], ())  # a signature with parameters: the method refuses it
        assert calls() == before and len(k.slow) == slow + 1
        k._conv, slow = [], slow + 1  # a kernel without parameters
        set_int("null_params", 0)
        s.launch(k, cfg, [], ())
        assert calls() == before + 1 and len(k.slow) == slow
        assert [last(i) for i in range(9)] == [0xF0, 4, 1, 1, 128, 1, 1, 0, 0x50]
        s.launch(k, object(), [], ())  # dimensions not cached: the method
        k._func = 0                    # no native function: the method
        s.launch(k, cfg, (), ())
        k._func = 0xF0
        assert calls() == before + 1 and len(k.slow) == slow + 2
        set_int("result", 702)
        refused(KernelError, "launching kernel 'sk' failed with 702",
                lambda: s.launch(k, cfg, [], ()))
        set_int("result", 0)
        arrays = [a]
        watched = (k, cfg, a, extra, arrays)
        base = [sys.getrefcount(x) for x in watched]
        k._conv = [None] * 3
        for _ in range(3000):
            s.launch(k, cfg, arrays, extra)
            k._conv = []
            s.launch(k, cfg, (), ())
            k._conv = [None] * 3
        assert [sys.getrefcount(x) for x in watched] == base
    """))


def test_an_event_reads_its_time_from_the_start_event_in_c(stand_in: Path) -> None:
    """elapsed_ms(start): the start's and this event's handles reach the driver in that
    order and its milliseconds come back; a closed event, another type of start and a
    driver refusal are refused as the Python reads refuse them."""
    run(stand_in, TYPES_PRELUDE + textwrap.dedent("""
        start, end = Ev(FakeEv(0xA1), True), Ev(FakeEv(0xA2), True)
        before = calls()
        assert end.elapsed_ms(start) == 1.25
        assert (calls(), last(0), last(1)) == (before + 1, 0xA1, 0xA2)
        set_int("result", 600)
        refused(KernelError, "reading event times failed with 600",
                lambda: end.elapsed_ms(start))
        set_int("result", 0)
        refused(TypeError, "start event", lambda: end.elapsed_ms(object()))
        start._h = 0
        refused(InvalidOperationError, "closed event", lambda: end.elapsed_ms(start))
        assert calls() == before + 2, "refused reads reached the driver"
    """))


def test_a_stream_asks_its_device_only_when_the_driver_says_another_context_is_current(
        stand_in: Path) -> None:
    """The driver tells a stream its context and which one is current: while its own is,
    no call asks the device (whatever the thread-local says); another context made
    current by other code (or none) is replaced by the stream's own through the device,
    even where the thread-local still names the stream's device, the first call
    included; a driver that cannot tell leaves it to the thread-local."""
    run(stand_in, TYPES_PRELUDE + textwrap.dedent("""
        cur = ctypes.c_void_p.in_dll(lib, "cur_ctx")
        class CtxDev(Dev):
            def _current(self):
                Dev.currents += 1
                CUR.ordinal = self.ordinal
                cur.value = 0xC0  # the device's context, as the stream's is
        s, e, d = St(CtxDev(), 0x50), Ev(FakeEv(0xE1), False), DA(0xD0)
        h = np.arange(16, dtype=np.float32)
        CUR.ordinal = 0  # (the thread-local names the device: the driver says otherwise)
        s.record(e)
        assert Dev.currents == 1 and cur.value == 0xC0
        del CUR.ordinal  # the thread-local no longer says: the driver does
        for _ in range(100):
            s.record(e)
            s.copy_h2d(d, h)
        assert Dev.currents == 1
        for other in (0xBB, None):  # another context current, then none
            cur.value = other
            CUR.ordinal = 0  # (stale: still names the stream's device)
            s.record(e)
            assert Dev.currents == 2 + (other is None) and cur.value == 0xC0
            assert CUR.ordinal == 0 and last(1) == 0x50
        ctx_of = ctypes.c_void_p.in_dll(lib, "stream_ctx")
        ctx_of.value = 0xC1  # the same stream set up again, on a handle of another context
        St.__init__(s, CtxDev(), 0x51)
        before = Dev.currents
        s.record(e)  # (the context it had is not asked for: its device is)
        assert Dev.currents == before + 1 and last(1) == 0x51
        ctx_of.value, cur.value = 0xC0, 0xC0
        St.__init__(s, CtxDev(), 0x50)
        set_int("ctx_result", 201)  # the driver cannot tell: the Python side decides
        before = Dev.currents
        s.record(e)
        assert Dev.currents == before  # (its thread-local names the stream's device)
        del CUR.ordinal
        s.record(e)
        assert Dev.currents == before + 1
    """))
