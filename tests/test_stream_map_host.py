"""stream_map's host side: page-locked batches uploaded as they are, the result pool's
reuse, the read-ahead schedule, and the kernel resolved once per call."""

from __future__ import annotations

import warnings

import gc
import itertools
import weakref
from contextlib import closing
from typing import Any, Iterator, List, Tuple

import numpy as np
import pytest

import prism_gpu as pg
from _support import F32, add1, rand
from prism_gpu import _stream_map
from prism_gpu._staging import ResultPool


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(977)


def _pinned(ctx: pg.ManagedGpuContext, data: np.ndarray) -> np.ndarray:
    a = pg.pinned_empty(data.shape, data.dtype, ctx=ctx)
    a[...] = data
    return a


# --- the read-ahead schedule ------------------------------------------------------------

def _pulls_per_result(ctx: pg.ManagedGpuContext, batches: List[np.ndarray], depth: int,
                      prefetch: int) -> List[int]:
    pulled = [0]

    def produce() -> Iterator[np.ndarray]:
        for b in batches:
            pulled[0] += 1
            yield b

    seen = []
    with closing(pg.stream_map("scale", produce(), depth=depth, prefetch=prefetch,
                               ctx=ctx)) as results:
        for y in results:
            seen.append(pulled[0])
            del y
    return seen


@pytest.mark.parametrize("depth, prefetch", [(1, 0), (3, 1), (3, 4), (2, 7)])
def test_page_locked_batches_are_pulled_as_far_ahead_as_pageable_ones(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator, depth: int,
        prefetch: int) -> None:
    """prefetch= is how many batches are pulled beyond the depth, whether or not a batch
    needs staging: holding result k, batches up to k + depth + prefetch were pulled."""
    count = 40
    data = [rand(rng, 64) for _ in range(count)]
    pageable = _pulls_per_result(ctx, data, depth, prefetch)
    pinned = _pulls_per_result(ctx, [_pinned(ctx, d) for d in data], depth, prefetch)
    expected = [min(count, k + depth + prefetch + 1) for k in range(count)]
    assert pinned == pageable == expected


def test_a_mix_of_page_locked_and_pageable_batches(ctx: pg.ManagedGpuContext,
                                                   rng: np.random.Generator) -> None:
    big = _pinned(ctx, rand(rng, 8 * 12).reshape(8, 12))
    batches: List[np.ndarray] = []
    for i in range(30):
        kind = i % 5
        if kind == 0:
            batches.append(_pinned(ctx, rand(rng, 12)))
        elif kind == 1:
            batches.append(rand(rng, 12))
        elif kind == 2:
            batches.append(big[i % 8])               # a contiguous row of pinned memory
        elif kind == 3:
            batches.append(big[:, i % 12])           # pinned, not contiguous: staged
        else:
            batches.append(np.asfortranarray(rand(rng, 12).reshape(3, 4)))
    expected = [b * F32(2) for b in batches]
    got = [y.copy() for y in pg.stream_map("scale", batches, depth=2, prefetch=3, ctx=ctx)]
    assert len(got) == len(expected)
    for e, y in zip(expected, got):
        assert y.shape == e.shape
        np.testing.assert_array_equal(y, e)


@pytest.mark.parametrize("bad", ["empty", "object", "list", "zero-bytes"])
def test_a_bad_batch_among_page_locked_ones_fails_at_its_turn(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator, bad: str) -> None:
    good = [_pinned(ctx, rand(rng, 16)) for _ in range(6)]
    wrong: Any = {"empty": pg.pinned_empty(0, F32, ctx=ctx),
                  "object": np.array([1, "x"], dtype=object),
                  "list": [1.0, 2.0],
                  "zero-bytes": np.zeros(4, dtype=[])}[bad]
    batches = good[:3] + [wrong] + good[3:]
    got: List[np.ndarray] = []
    with closing(pg.stream_map("scale", batches, depth=2, prefetch=2, ctx=ctx)) as results:
        with pytest.raises(pg.TransferError) as info:
            for y in results:
                got.append(y.copy())
    assert info.value.batch_index == 3  # type: ignore[attr-defined]
    assert len(got) == 3
    for x, y in zip(good, got):
        np.testing.assert_array_equal(y, x * F32(2))


def test_a_page_locked_batch_rejected_when_queued_fails_at_its_turn(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    calls = itertools.count()

    def check(extra: Any) -> None:  # refuses the launch of the fifth batch
        if next(calls) == 4:
            raise ValueError("not this one")

    kernel = pg.Kernel.from_callable(lambda x: None, name="picky", check=check)
    batches = [_pinned(ctx, rand(rng, 8)) for _ in range(8)]
    got: List[np.ndarray] = []
    with closing(pg.stream_map(kernel, batches, depth=2, ctx=ctx)) as results:
        with pytest.raises(ValueError, match="not this one") as info:
            for y in results:
                got.append(y.copy())
    assert info.value.batch_index == 4  # type: ignore[attr-defined]
    assert [g.tolist() for g in got] == [b.tolist() for b in batches[:4]]
    # the rejected batch left the ring consistent: the context still streams
    assert [r[0] for r in pg.stream_map("scale", batches[:2], ctx=ctx)] == \
        [batches[0][0] * 2, batches[1][0] * 2]


# --- the result pool -----------------------------------------------------------------

def test_results_held_or_viewed_are_never_overwritten(ctx: pg.ManagedGpuContext,
                                                      rng: np.random.Generator) -> None:
    ring = [_pinned(ctx, rand(rng, 256)) for _ in range(3 + 4 + 1)]  # the read-ahead's
    kept: List[Tuple[int, Any]] = []

    def produce() -> Iterator[np.ndarray]:
        for i in range(60):
            b = ring[i % len(ring)]
            b[:] = F32(i)
            yield b

    for i, y in enumerate(pg.stream_map("scale", produce(), depth=3, prefetch=4, ctx=ctx)):
        assert y.shape == (256,) and (y == F32(2 * i)).all(), i
        if i % 9 == 0:
            kept.append((i, y))                  # the result itself
        elif i % 9 == 4:
            kept.append((i, y[10:20]))           # a view of it
        elif i % 9 == 5:
            kept.append((i, memoryview(y)))      # something else holding it
        elif i % 9 == 7:
            with warnings.catch_warnings():      # (deprecated from NumPy 2.5 on)
                warnings.simplefilter("ignore", DeprecationWarning)
                y.shape = (16, 16)               # changed in place, then dropped
            y.flags.writeable = False
    for i, v in kept:
        assert (np.asarray(v) == F32(2 * i)).all(), i


def test_pooled_results_are_reused_once_dropped(ctx: pg.ManagedGpuContext,
                                                rng: np.random.Generator) -> None:
    pool = ResultPool()
    f = np.dtype(F32)
    a = pool.empty(ctx.device, (64,), f)
    a[:] = 1
    del a
    b = pool.empty(ctx.device, (64,), f)
    assert pool.allocations == 1                 # the same buffer again
    held = b[5:9]
    del b
    c = pool.empty(ctx.device, (8, 8), f)        # the held view's buffer is not it
    assert pool.allocations == 2 and c.shape == (8, 8)
    c[:] = 7
    held[:] = 3
    assert (c == 7).all()
    ref = weakref.ref(c)
    with warnings.catch_warnings():  # (deprecated from NumPy 2.5 on; users still do it)
        warnings.simplefilter("ignore", DeprecationWarning)
        c.shape = (64,)
    c.flags.writeable = False
    del c
    assert ref() is None                         # a new view each time: none comes back
    d = pool.empty(ctx.device, (8, 8), f)
    assert d.shape == (8, 8) and d.flags.writeable and d.flags.c_contiguous
    assert pool.allocations == 2


def test_a_long_run_reuses_a_bounded_number_of_result_buffers(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    from prism_gpu._staging import cache_of

    pool = cache_of(ctx.device).results
    x = _pinned(ctx, rand(rng, 1000))
    before = pool.allocations
    for y in pg.stream_map("scale", itertools.repeat(x, 400), depth=3, prefetch=4,
                           ctx=ctx):
        assert y[0] == x[0] * 2
    assert pool.allocations - before <= ResultPool.KEEP  # not one per batch


# --- the kernel and the rest of the call ---------------------------------------------

def test_a_plain_callable_is_wrapped_once_and_keeps_its_name(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator,
        monkeypatch: pytest.MonkeyPatch) -> None:
    wrapped = []
    from_callable = pg.Kernel.from_callable.__func__  # type: ignore[attr-defined]

    def counting(cls: Any, fn: Any, *args: Any, **kwargs: Any) -> pg.Kernel:
        wrapped.append(fn)
        return from_callable(cls, fn, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(pg.Kernel, "from_callable", classmethod(counting))
    calls = itertools.count()

    def flaky(x: Any) -> None:
        if next(calls) == 15:
            raise ArithmeticError("fifteen")

    batches = [_pinned(ctx, rand(rng, 8)) for _ in range(20)]
    with closing(pg.stream_map(flaky, batches, ctx=ctx)) as results:
        with pytest.raises(pg.KernelError) as info:
            for _ in results:
                pass
    assert info.value.batch_index == 15  # type: ignore[attr-defined]
    assert info.value.kernel == "flaky" and "'flaky'" in str(info.value)
    assert len(wrapped) <= 2  # the call's check, the lane's: not one per batch


def test_page_locked_batches_are_traced_with_their_index(ctx: pg.ManagedGpuContext,
                                                         rng: np.random.Generator) -> None:
    batches = [_pinned(ctx, rand(rng, 16)) for _ in range(3)] + [rand(rng, 16)]
    kernel = pg.Kernel.from_callable(lambda x: None, name="quiet")
    with pg.trace() as tr:
        assert len(list(pg.stream_map(kernel, batches, ctx=ctx))) == 4
    seen = sorted((op.batch_index, op.lane, op.name) for op in tr.ops)
    assert [s for s in seen if s[1] == "compute"] == [(i, "compute", "quiet")
                                                      for i in range(4)]
    assert sorted(s[0] for s in seen) == sorted(list(range(4)) * 3)


def test_progress_counts_page_locked_batches(ctx: pg.ManagedGpuContext,
                                             rng: np.random.Generator,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    shown: List[str] = []

    class Bar:
        def __init__(self, batches: Any) -> None:
            shown.append("start")

        def advance(self) -> None:
            shown.append("advance")

        def close(self) -> None:
            shown.append("close")

    monkeypatch.setattr(_stream_map, "_Progress", Bar)
    batches = [_pinned(ctx, rand(rng, 8)) for _ in range(5)]
    assert len(list(pg.stream_map("scale", batches, ctx=ctx, progress=True))) == 5
    assert shown == ["start"] + ["advance"] * 5 + ["close"]


def test_two_devices_with_page_locked_batches(rng: np.random.Generator) -> None:
    ctx = pg.ManagedGpuContext(backend="cpu")
    try:
        batches = [_pinned(ctx, rand(rng, 32)) for _ in range(25)]
        got = [y.copy() for y in pg.stream_map("scale", batches, devices=2, backend="cpu")]
        assert len(got) == 25
        for x, y in zip(batches, got):
            np.testing.assert_array_equal(y, x * F32(2))
    finally:
        ctx.close()


@pytest.mark.parametrize("how", ["close", "gc"])
def test_early_exit_with_page_locked_batches_releases_everything(
        backend: str, rng: np.random.Generator, how: str, no_thread_leaks: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRISM_GPU_BACKEND", backend)
    ctx = pg.ManagedGpuContext(backend=backend)
    try:
        x = _pinned(ctx, rand(rng, 128))
        gen = pg.stream_map(add1(), itertools.repeat(x))
        for _ in range(5):
            np.testing.assert_array_equal(next(gen), x + F32(1))
        lanes = gen.gi_frame.f_locals["lanes"]  # type: ignore[union-attr]
        if how == "close":
            gen.close()
        del gen
        gc.collect()
        assert all(lane.coord.closed for lane in lanes)
        assert all(lane.ctx.closed for lane in lanes)
    finally:
        ctx.close()


def test_a_context_closed_mid_loop_fails_the_next_result(backend: str,
                                                         rng: np.random.Generator) -> None:
    ctx = pg.ManagedGpuContext(backend=backend)
    batches = [_pinned(ctx, rand(rng, 16)) for _ in range(10)]
    got: List[np.ndarray] = []
    with closing(pg.stream_map("scale", batches, depth=2, ctx=ctx)) as results:
        with pytest.raises(pg.InvalidOperationError, match="closed") as info:
            for i, y in enumerate(results):
                got.append(y.copy())
                if i == 3:
                    ctx.close()
    assert info.value.batch_index == 4  # type: ignore[attr-defined]
    assert len(got) == 4
