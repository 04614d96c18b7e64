"""stream_map: results in order, any batch lengths, failures at their index, nothing leaked."""

from __future__ import annotations

import gc
import itertools
from contextlib import closing
from typing import Any, Iterator, List

import numpy as np
import pytest

import prism_gpu as pg
from _support import F32, add1, device_view, pairsum, rand, square2


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(4242)


@pytest.fixture
def own_backend(backend: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """stream_map without ctx= opens its own context on this backend."""
    monkeypatch.setenv("PRISM_GPU_BACKEND", backend)
    return backend


def _run(kernel: Any, batches: Any, **kwargs: Any) -> List[np.ndarray]:
    with closing(pg.stream_map(kernel, batches, **kwargs)) as results:
        return [r.copy() for r in results]


def test_results_in_order(ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    batches = [rand(rng, 100) for _ in range(20)]
    results = _run("scale", batches, ctx=ctx)
    assert len(results) == len(batches)
    for x, y in zip(batches, results):
        assert y.shape == x.shape and y.dtype == x.dtype
        np.testing.assert_array_equal(y, x * F32(2))


def test_consumer_that_drops_each_result(ctx: pg.ManagedGpuContext,
                                         rng: np.random.Generator) -> None:
    """Results the consumer lets go may be recycled; the ones it holds stay intact."""
    batches = [rand(rng, 500) for _ in range(30)]
    kept = []
    with closing(pg.stream_map("scale", batches, ctx=ctx)) as results:
        for i, y in enumerate(results):
            np.testing.assert_array_equal(y, batches[i] * F32(2))
            if i % 7 == 0:
                kept.append((i, y))
    for i, y in kept:
        np.testing.assert_array_equal(y, batches[i] * F32(2))


def test_multidimensional_batches_keep_their_shape(ctx: pg.ManagedGpuContext,
                                                   rng: np.random.Generator) -> None:
    batches = [rand(rng, 70).reshape(10, 7) for _ in range(5)]
    for x, y in zip(batches, _run("scale", batches, ctx=ctx)):
        assert y.shape == (10, 7)
        np.testing.assert_array_equal(y, x * F32(2))


@pytest.mark.parametrize("lengths", [
    pytest.param([64, 64, 64, 17], id="short-last"),
    pytest.param([64, 1, 64, 1, 1], id="length-1"),
    pytest.param([8, 8, 8, 1000, 3, 5000, 8, 8], id="ring-grows"),
])
@pytest.mark.parametrize("depth", [1, 3, 5])
def test_varying_lengths(ctx: pg.ManagedGpuContext, rng: np.random.Generator,
                         lengths: List[int], depth: int) -> None:
    batches = [rand(rng, n) for n in lengths]
    results = _run(add1(), batches, ctx=ctx, depth=depth)
    assert [len(y) for y in results] == lengths
    for x, y in zip(batches, results):
        np.testing.assert_array_equal(y, x + F32(1))


def test_plain_callable(ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    def negate(x: Any) -> None:
        v = device_view(x)
        np.negative(v, out=v)

    batches = [rand(rng, 33) for _ in range(6)]
    results = _run(negate, batches, ctx=ctx)
    for x, y in zip(batches, results):
        np.testing.assert_array_equal(y, -x)


def test_output_shape_and_dtype(ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    batches = [rand(rng, 50) for _ in range(7)]
    results = _run(square2(), batches, ctx=ctx, output=((2, 50), np.float32))
    for x, y in zip(batches, results):
        assert y.shape == (2, 50) and y.dtype == np.float32
        np.testing.assert_array_equal(y, np.stack([x, x * x]))


def test_output_as_a_callable_of_the_batch(ctx: pg.ManagedGpuContext,
                                           rng: np.random.Generator) -> None:
    batches = [rand(rng, n) for n in (10, 4, 100, 2, 64)]
    results = _run(pairsum(), batches, ctx=ctx,
                   output=lambda b: ((b.size // 2,), np.float32))
    for x, y in zip(batches, results):
        assert y.shape == (x.size // 2,)
        np.testing.assert_array_equal(y, x[0::2] + x[1::2])


def test_pinned_input_arrays(ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    def produce() -> Iterator[np.ndarray]:
        for _ in range(8):
            a = pg.pinned_empty((12, 5), np.float32, ctx=ctx)
            assert a.shape == (12, 5) and a.dtype == np.float32
            a[...] = rand(rng, 60).reshape(12, 5)
            expected.append(a.copy())
            yield a

    expected: List[np.ndarray] = []
    results = _run("scale", produce(), ctx=ctx)
    assert len(results) == 8
    for x, y in zip(expected, results):
        np.testing.assert_array_equal(y, x * F32(2))


def test_failing_batch_raises_at_its_index(own_backend: str, rng: np.random.Generator,
                                           no_thread_leaks: None) -> None:
    calls = itertools.count()

    def fragile(x: Any) -> None:            # identity, except on the fourth batch
        if next(calls) == 3:
            raise ArithmeticError("batch three is cursed")

    batches = [rand(rng, 40) for _ in range(8)]
    got: List[np.ndarray] = []
    with closing(pg.stream_map(fragile, batches)) as results:
        with pytest.raises(pg.KernelError) as info:
            for y in results:
                got.append(y.copy())
    assert info.value.batch_index == 3
    assert len(got) == 3
    for x, y in zip(batches, got):
        np.testing.assert_array_equal(y, x)


def test_producer_error_reaches_the_consumer_after_earlier_results(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    boom = LookupError("the producer ran dry")
    batches = [rand(rng, 16) for _ in range(4)]

    def produce() -> Iterator[np.ndarray]:
        yield from batches
        raise boom

    got: List[np.ndarray] = []
    with closing(pg.stream_map("scale", produce(), ctx=ctx)) as results:
        with pytest.raises(LookupError) as info:
            for y in results:
                got.append(y.copy())
    assert info.value is boom
    assert len(got) == 4
    for x, y in zip(batches, got):
        np.testing.assert_array_equal(y, x * F32(2))


def test_empty_batch_does_not_lose_earlier_results(ctx: pg.ManagedGpuContext,
                                                   rng: np.random.Generator) -> None:
    """A zero-length batch either yields an empty result or fails at its own index."""
    batches = [rand(rng, 16), rand(rng, 16), np.empty(0, F32), rand(rng, 16)]
    got: List[np.ndarray] = []
    with closing(pg.stream_map("scale", batches, ctx=ctx)) as results:
        try:
            for y in results:
                got.append(y.copy())
        except pg.PrismGpuError as exc:
            assert getattr(exc, "batch_index", None) == 2, repr(exc)
            assert len(got) == 2
        else:
            assert [len(y) for y in got] == [16, 16, 0, 16]
    for x, y in zip(batches[:2], got):
        np.testing.assert_array_equal(y, x * F32(2))


@pytest.mark.parametrize("how", ["break", "close", "gc"])
def test_early_exit_releases_everything(own_backend: str, rng: np.random.Generator,
                                        how: str, no_thread_leaks: None) -> None:
    x = rand(rng, 256)
    endless = (x.copy() for _ in itertools.count())
    if how == "break":
        for i, _ in enumerate(pg.stream_map("scale", endless)):
            if i == 4:
                break
    else:
        gen = pg.stream_map("scale", endless)
        for _ in range(5):
            np.testing.assert_array_equal(next(gen), x * F32(2))
        if how == "close":
            gen.close()
        del gen
    gc.collect()


def test_unknown_kernel_name_fails_before_pulling_batches(ctx: pg.ManagedGpuContext) -> None:
    pulled: List[int] = []

    def produce() -> Iterator[np.ndarray]:
        pulled.append(1)
        yield np.ones(4, F32)

    with closing(pg.stream_map("no-such-kernel", produce(), ctx=ctx)) as results:
        with pytest.raises(pg.PrismGpuError, match="no-such-kernel"):
            next(results)
    assert pulled == []


def test_progress_bar(ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    batches = [rand(rng, 8) for _ in range(5)]
    assert len(_run("scale", batches, ctx=ctx, progress=True)) == 5
