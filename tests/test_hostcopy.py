"""Host copies: the native threads (when the extension is built) and the Python workers
behind them, through the copy pool stream_map and pipelines stage with."""

from __future__ import annotations

import gc
import os
import threading
from typing import Any, Iterator

import numpy as np
import pytest

import prism_gpu as pg
from prism_gpu import _copypool
from prism_gpu._copypool import CopyPool

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
    errors = []

    def run(k: int) -> None:
        try:
            for _ in range(20):
                p.copy(outs[k], srcs[k], 3).wait()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    ts = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
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
