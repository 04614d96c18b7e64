"""Host copies: the native threads (when the extension is built) and the Python workers
behind them, through the copy pool stream_map and pipelines stage with."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import weakref
from typing import Any, Iterator

import numpy as np
import pytest

import prism_gpu as pg
from prism_gpu import _copypool
from prism_gpu._copypool import CopyPool
from _support import in_threads

try:
    from prism_gpu import _hostcopy  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - a build without a C compiler
    _hostcopy = None

needs_native = pytest.mark.skipif(_hostcopy is None,
                                  reason="the native copy extension is not built here")


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(2024)


@pytest.fixture(params=["native", "python"])
def pool(request: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[CopyPool]:
    if request.param == "native":
        if _hostcopy is None:
            pytest.skip("the native copy extension is not built here")
    else:
        monkeypatch.setenv("PRISM_GPU_NATIVE_COPY", "0")
    p = CopyPool(3, 1 << 16, native_workers=4, native_chunk=1 << 16)
    yield p
    p.close()


@pytest.mark.parametrize("n", [1, 3, 63, 64, 65, 4097, 1 << 20, (5 << 20) + 7])
def test_copies_are_exact_at_every_size(pool: CopyPool, rng: np.random.Generator,
                                        n: int) -> None:
    src = rng.integers(0, 255, n, dtype=np.uint8)
    dst = np.zeros(n, np.uint8)
    pool.copy(dst, src).wait()
    np.testing.assert_array_equal(dst, src)


def test_floats_with_nan_and_inf_and_2d_shapes(pool: CopyPool, rng: np.random.Generator
                                               ) -> None:
    src = rng.standard_normal((300, 257)).astype(np.float32)
    src[0, :3] = [np.nan, np.inf, -np.inf]
    dst = np.empty_like(src)
    pool.copy(dst, src).wait()
    assert np.array_equal(dst, src, equal_nan=True)


def test_copies_numpy_must_do_still_work(pool: CopyPool, rng: np.random.Generator) -> None:
    """Strided, converting and overlapping copies go to numpy, whatever the pool."""
    src = rng.standard_normal(4096)
    strided = np.zeros(8192)
    pool.copy(strided[::2], src).wait()
    np.testing.assert_array_equal(strided[::2], src)
    as32 = np.zeros(4096, np.float32)
    pool.copy(as32, src).wait()
    np.testing.assert_array_equal(as32, src.astype(np.float32))
    buf = np.arange(10000, dtype=np.int64)
    pool.copy(buf[1:], buf[:-1].copy()).wait()  # not overlapping: a copy was made
    np.testing.assert_array_equal(buf[1:], np.arange(9999))
    over = np.arange(10000, dtype=np.int64)
    pool.copy(over[1:], over[:-1]).wait()     # overlapping: numpy's copyto handles it
    np.testing.assert_array_equal(over[1:], np.arange(9999))


def test_a_read_only_destination_fails_at_wait(pool: CopyPool) -> None:
    dst = np.zeros(1 << 16, np.uint8)
    dst.flags.writeable = False
    with pytest.raises(ValueError):
        pool.copy(dst, np.ones(1 << 16, np.uint8)).wait()
    assert not dst.any()


@needs_native
def test_native_pool_rejects_bad_buffers_at_the_call(rng: np.random.Generator) -> None:
    p = _hostcopy.Pool(2)
    a = rng.random(1000)
    with pytest.raises(ValueError, match="overlap"):
        p.copy(a, a, 2)
    with pytest.raises(ValueError, match="differ in size"):
        p.copy(np.empty(999), a, 2)
    with pytest.raises(ValueError):
        p.copy(np.empty(2000)[::2], a, 2)       # not C-contiguous
    ro = np.empty(1000)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        p.copy(ro, a, 2)
    with pytest.raises(TypeError):
        p.copy(object(), a, 2)
    with pytest.raises(TypeError):
        p.copy(np.empty(1000), a, "2")
    assert p.copy(np.empty(0), a[:0], 4).done()  # nothing to copy: done at once
    p.close()
    p.close()  # idempotent
    assert p.closed
    with pytest.raises(RuntimeError, match="closed"):
        p.copy(np.empty(1000), a, 2)
    for bad in (0, -1, 10**6):
        with pytest.raises(ValueError):
            _hostcopy.Pool(bad)


@needs_native
@pytest.mark.parametrize("stream", [False, True])
def test_native_copies_exact_at_every_size_and_alignment(rng: np.random.Generator,
                                                          stream: bool) -> None:
    # non-temporal stores take the pieces of 64 KiB and more: an unaligned head, whole
    # 64-byte blocks, a tail; every byte must land, and nothing past the destination.
    # One piece, so the sizes around 64 KiB reach that path, and source and
    # destination offsets apart, so the source stays unaligned after the head.
    p = _hostcopy.Pool(3, stream=stream)
    for n in (1, 63, 64, (1 << 16) - 1, 1 << 16, (1 << 16) + 1, (1 << 16) + 127,
              3 << 18, (3 << 20) + 13):
        for src_off, dst_off in ((0, 0), (1, 0), (0, 1), (3, 8), (15, 7), (8, 15)):
            for pieces in (1, 3):
                src = rng.integers(0, 256, n + src_off, dtype=np.uint8)[src_off:]
                guard = rng.integers(0, 256, n + 32, dtype=np.uint8)
                before = guard.copy()
                dst = guard[dst_off:dst_off + n]
                p.copy(dst, src, pieces).wait()
                np.testing.assert_array_equal(dst, src)
                np.testing.assert_array_equal(guard[:dst_off], before[:dst_off])
                np.testing.assert_array_equal(guard[dst_off + n:], before[dst_off + n:])
    p.close()


@needs_native
def test_dropping_a_ticket_early_waits_for_its_pieces(rng: np.random.Generator) -> None:
    p = _hostcopy.Pool(4)
    src = rng.random(1 << 22)
    dst = np.zeros_like(src)
    p.copy(dst, src, 8)  # the ticket is dropped at once: it holds both buffers until done
    gc.collect()
    p.close()            # finishes what is queued
    np.testing.assert_array_equal(dst, src)


@needs_native
def test_native_copies_from_several_threads(rng: np.random.Generator) -> None:
    p = _hostcopy.Pool(4)
    srcs = [rng.random(1 << 18) for _ in range(8)]
    outs = [np.zeros_like(s) for s in srcs]

    def run(k: int) -> None:
        for _ in range(20):
            p.copy(outs[k], srcs[k], 3).wait()

    errors = in_threads(run, [(k,) for k in range(8)])
    p.close()
    assert not errors
    for s, o in zip(srcs, outs):
        np.testing.assert_array_equal(o, s)


@needs_native
def test_many_copies_leave_no_threads_and_no_memory() -> None:
    src = np.ones(4096, np.uint8)
    dst = np.zeros(4096, np.uint8)
    before = _os_threads()
    for _ in range(50):
        p = _hostcopy.Pool(4)
        for _ in range(200):
            p.copy(dst, src, 4).wait()
        p.close()
    assert _os_threads() == before
    import tracemalloc

    tracemalloc.start()
    p = _hostcopy.Pool(2)
    for _ in range(2000):
        p.copy(dst, src, 2).wait()
    first = tracemalloc.get_traced_memory()[0]
    for _ in range(20000):
        p.copy(dst, src, 2).wait()
    grown = tracemalloc.get_traced_memory()[0] - first
    tracemalloc.stop()
    p.close()
    assert grown < 64 << 10


@pytest.mark.parametrize("native", ["1", "0"])
def test_stream_map_out_with_and_without_native_copies(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch,
        native: str) -> None:
    monkeypatch.setenv("PRISM_GPU_NATIVE_COPY", native)
    n, count = 300_001, 7
    src = rng.standard_normal(n * count).astype(np.float32)   # pageable: staged by the pool
    out = np.full((count, n), np.nan, np.float32)
    for i, r in enumerate(pg.stream_map("scale", (src[i * n:(i + 1) * n] for i in range(count)),
                                        ctx=ctx, out=out)):
        assert np.shares_memory(r, out[i])
    np.testing.assert_array_equal(out.reshape(-1), src * np.float32(2))
    assert _copypool.native() == (native == "1" and _hostcopy is not None)


def test_host_address_matches_numpy_for_every_kind_of_view() -> None:
    from prism_gpu.backends._hostranges import address_range, host_address

    a = np.arange(4096, dtype=np.float32)
    ro = a.copy()
    ro.flags.writeable = False
    views = [a, a[5:], a[::-2], a.reshape(64, 64)[:, 3:], ro, np.zeros(3, "M8[s]"),
             np.zeros((2, 0)), np.zeros((), np.int16), np.zeros(5, [("x", "<i4"), ("y", "<f8")])]
    for v in views:
        assert host_address(v) == v.__array_interface__["data"][0]
    assert address_range(a[10:20]) == (host_address(a) + 40, host_address(a) + 80)


@needs_native
def test_urgent_copies_are_taken_before_queued_ones(rng: np.random.Generator) -> None:
    """One worker, 16 big copies queued, then an urgent one: the urgent one is done
    long before the last of the others (about 128 MiB of copying behind it)."""
    p = _hostcopy.Pool(1)
    src = rng.integers(0, 255, 8 << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    queued = [p.copy(dst, src, 1) for _ in range(16)]
    small = rng.random(1000)
    out = np.zeros_like(small)
    p.copy(out, small, 1, True).wait()
    assert not queued[-1].done()
    np.testing.assert_array_equal(out, small)
    for t in queued:
        t.wait()
    np.testing.assert_array_equal(dst, src)
    later = [p.copy(np.empty(10), rng.random(10), 1, True) for _ in range(5)]
    for t in later:
        t.wait()
    p.close()


def _run_script(code: str) -> "subprocess.CompletedProcess[str]":
    """``code`` in a fresh interpreter (20 s at most: a hang fails the test)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=20)


def test_object_dtypes_are_copied_with_their_references(pool: CopyPool) -> None:
    """Arrays of Python objects (and numpy's strings, which point into an arena of the
    array) are not plain bytes: copying their bytes would copy pointers without a
    reference, freed once the source goes."""
    marker = object()
    src = np.array([marker] * 1000, dtype=object)
    dst = np.empty(1000, dtype=object)
    before = sys.getrefcount(marker)
    pool.copy(dst, src).wait()
    assert sys.getrefcount(marker) == before + 1000
    assert all(x is marker for x in dst)
    del src
    assert sys.getrefcount(marker) == before
    strings = getattr(getattr(np, "dtypes", None), "StringDType", None)  # numpy 2
    if strings is not None:
        words = np.array([f"word {i} " * 20 for i in range(100)], dtype=strings())
        out = np.empty(100, dtype=strings())
        pool.copy(out, words).wait()
        expected = words.tolist()
        del words
        gc.collect()
        assert out.tolist() == expected


def test_dtypes_without_a_buffer_format_still_copy(pool: CopyPool) -> None:
    for src in (np.arange(5000).astype("M8[s]"), np.arange(5000).astype("m8[ms]"),
                np.zeros(5000, [("x", "<i4"), ("y", "<f8")]), np.arange(5000, dtype="e")):
        dst = np.zeros_like(src)
        pool.copy(dst, src).wait()
        np.testing.assert_array_equal(dst, src)


@needs_native
def test_native_pool_refuses_buffers_of_python_objects() -> None:
    p = _hostcopy.Pool(1)
    with pytest.raises(ValueError, match="Python objects"):
        p.copy(np.empty(10, object), np.array([None] * 10, object), 1)
    with pytest.raises(ValueError, match="Python objects"):
        p.copy(np.empty(4, [("a", "O"), ("b", "<i4")]), np.zeros(4, [("a", "O"), ("b", "<i4")]),
               1)
    p.close()


@needs_native
def test_huge_piece_counts_cost_no_memory() -> None:
    """A piece count near the largest integer once overflowed into pieces of no bytes:
    jobs were made until memory ran out (here: a cap on the address space)."""
    done = _run_script(
        "import resource, sys, numpy as np\n"
        "from prism_gpu import _hostcopy\n"
        "vm = [int(line.split()[1]) for line in open('/proc/self/status')\n"
        "      if line.startswith('VmSize')][0] * 1024\n"
        "p = _hostcopy.Pool(2)\n"
        "a, b = np.arange(1000.0), np.zeros(1000)\n"
        "p.copy(b, a, 1).wait()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), resource.RLIM_INFINITY))\n"
        "for n in (sys.maxsize, sys.maxsize - 500, 1 << 62, -sys.maxsize - 1, 0, 10**6):\n"
        "    b[:] = 0\n"
        "    p.copy(b, a, n).wait()\n"
        "    assert (b == a).all(), n\n"
        "p.close()\n"
        "print('ok')\n")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_copies_after_close_are_refused_on_every_path(pool: CopyPool) -> None:
    """Closed is closed: a copy after close (plain or not, native threads or not) raises
    instead of starting threads that nobody stops (or queuing behind their stop)."""
    pool.copy(np.zeros(1 << 17), np.ones(1 << 17)).wait()
    pool.copy(np.zeros(1 << 18)[::2], np.ones(1 << 17)).wait()
    pool.close()
    before = _os_threads()
    with pytest.raises(RuntimeError, match="closed"):
        pool.copy(np.zeros(1 << 17)[::1], np.ones(1 << 17))
    with pytest.raises(RuntimeError, match="closed"):
        pool.copy(np.zeros(1 << 18)[::2], np.ones(1 << 17))
    assert _os_threads() <= before  # (threads joined just now may still be ending)
    pool.close()  # again: nothing to do


def test_closing_from_several_threads_at_once(pool: CopyPool) -> None:
    """Every close returns once the queued copies are complete, and a copy after them is
    refused. (Closes at once queued a stop per worker each: the workers a later copy
    started took the extra stops and exited, and that copy never completed.)"""
    src = np.arange(1 << 22, dtype=np.float64)
    dst = np.zeros_like(src)
    pool.copy(dst, src)
    pool.copy(np.zeros(1 << 23)[::2], src)
    seen = []

    def close() -> None:
        pool.close()
        seen.append(bool(dst[-1] == src[-1]))

    closers = [threading.Thread(target=close) for _ in range(4)]
    for t in closers:
        t.start()
    for t in closers:
        t.join()
    assert seen == [True] * 4
    with pytest.raises(RuntimeError, match="closed"):
        pool.copy(np.zeros(1 << 18)[::2], np.ones(1 << 17))


def test_a_smaller_source_is_broadcast_not_copied_in_part(pool: CopyPool) -> None:
    """Pieces are cut only from arrays of the same shape; anything else is numpy's."""
    dst = np.zeros(1 << 20, np.uint8)
    pool.copy(dst, np.ones(1, np.uint8)).wait()
    assert (dst == 1).all()
    with pytest.raises(ValueError):
        pool.copy(np.zeros(1 << 20, np.uint8), np.ones(3, np.uint8)).wait()


@needs_native
def test_a_second_close_waits_for_the_queued_copies(rng: np.random.Generator) -> None:
    """close() from a second thread, while the first is stopping the workers, returns
    once every queued piece is copied too (it returned at once). About 256 MiB are
    queued behind one worker: the first close is still waiting for them."""
    p = _hostcopy.Pool(1)
    src = rng.integers(0, 255, 8 << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    queued = [p.copy(dst, src, 1) for _ in range(32)]
    first = threading.Thread(target=p.close)
    first.start()
    while not p.closed:
        pass
    p.close()
    assert all(t.done() for t in queued)
    first.join()
    np.testing.assert_array_equal(dst, src)


@needs_native
def test_a_forked_child_neither_hangs_nor_copies_with_threads_it_lacks() -> None:
    """After fork the child has the pool but not its threads: closing it, dropping it and
    its tickets, and exiting must not wait for threads that are not there; a copy the
    child starts is refused; a copy still in flight at the fork is not complete there."""
    done = _run_script(
        "import os, sys, numpy as np\n"
        "from prism_gpu import _hostcopy\n"
        "p = _hostcopy.Pool(1)\n"
        "src = np.ones(8 << 20, np.uint8)\n"
        "dst = np.zeros_like(src)\n"
        "p.copy(dst, src, 1).wait()\n"
        "queued = [p.copy(dst, src, 1) for _ in range(32)]\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    in_flight = not queued[-1].done()  # as it was at the fork\n"
        "    try:\n"
        "        queued[-1].wait()\n"
        "        if in_flight:\n"
        "            sys.exit(3)\n"
        "    except RuntimeError:\n"
        "        if not in_flight:\n"
        "            sys.exit(5)\n"
        "    try:\n"
        "        p.copy(np.zeros(10), np.ones(10), 1)\n"
        "        sys.exit(4)\n"
        "    except RuntimeError:\n"
        "        pass\n"
        "    p.close()\n"
        "    sys.exit(0)  # a normal exit: the pool and its tickets are freed here\n"
        "_, status = os.waitpid(pid, 0)\n"
        "for t in queued:\n"
        "    t.wait()\n"
        "p.close()\n"
        "print(os.waitstatus_to_exitcode(status), int(dst.min()))\n")
    assert done.returncode == 0 and done.stdout.split() == ["0", "1"], (done.stdout,
                                                                       done.stderr)


@needs_native
def test_a_forked_child_frees_a_pool_whose_threads_were_idle() -> None:
    """The parent's idle workers wait on the pool's condition at the fork; the child's
    copy of it counts them, and freeing the pool must not wait for them (it did, for
    ever, when every queued copy had finished before the fork)."""
    done = _run_script(
        "import gc, os, time, numpy as np\n"
        "from prism_gpu import _hostcopy\n"
        "p = _hostcopy.Pool(2)\n"
        "t = p.copy(np.zeros(1 << 20), np.ones(1 << 20), 2)\n"
        "t.wait()\n"
        "time.sleep(0.2)  # the workers are asleep on the condition now\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    del p, t\n"
        "    gc.collect()\n"
        "    os._exit(0)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "p.close()\n"
        "print(os.waitstatus_to_exitcode(status))\n")
    assert done.returncode == 0 and done.stdout.split() == ["0"], (done.stdout, done.stderr)


@needs_native
@pytest.mark.skipif(sys.version_info < (3, 12),
                    reason="Python classes export buffers from 3.12 on")
def test_a_pool_closed_while_a_buffer_is_exported_takes_no_copy() -> None:
    """Exporting a buffer may run Python code (a class's __buffer__), which may close the
    pool: the copy is refused then, not queued for threads that are gone."""
    p = _hostcopy.Pool(2)
    p.copy(np.zeros(10), np.ones(10), 1).wait()
    before = _os_threads()

    class Closing:
        def __init__(self) -> None:
            self.data = bytearray(1 << 16)

        def __buffer__(self, flags: int) -> memoryview:
            p.close()
            return memoryview(self.data)

    with pytest.raises(RuntimeError, match="closed"):
        p.copy(Closing(), bytes(1 << 16), 2)
    assert _os_threads() <= before


def test_workers_let_go_of_the_arrays_once_the_copy_is_complete(pool: CopyPool) -> None:
    """A worker kept its last piece's arrays until its next job: the result pool, which
    reuses a buffer only once nothing else refers to it, saw it as still in use."""
    for shape in ((1 << 10,), (1 << 20,), (1 << 11, 2)):
        src = np.ones(shape)
        dst = np.zeros(shape)
        alive = [weakref.ref(src), weakref.ref(dst)]
        pool.copy(dst if len(shape) == 1 else dst[:, :1], src if len(shape) == 1
                  else src[:, :1]).wait()
        del src, dst
        assert [r() for r in alive] == [None, None], shape
