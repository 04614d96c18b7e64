"""Several devices in one process: ``stream_map(devices=...)``."""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import numpy as np
import pytest

import prism_gpu as pg
from _support import add1
from prism_gpu.backends import device_count

F32 = np.float32


@pytest.fixture
def multi(backend: str) -> str:
    """A backend with at least two devices (CUDA skips on a one-GPU machine)."""
    if device_count(backend) < 2:
        pytest.skip(f"the {backend} backend has fewer than 2 devices here")
    return backend


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng()


def test_two_devices_give_exact_results_in_order(multi: str, rng: np.random.Generator) -> None:
    sizes = [int(n) for n in rng.integers(1, 5000, size=40)]
    xs = [rng.standard_normal(n).astype(F32) for n in sizes]
    got = [r.copy() for r in pg.stream_map(add1(), xs, devices=2, backend=multi)]
    assert len(got) == len(xs)
    for x, r in zip(xs, got):
        np.testing.assert_array_equal(r, x + F32(1))


def test_devices_as_a_list_and_all_with_out(multi: str, rng: np.random.Generator) -> None:
    xs = [rng.standard_normal(777).astype(F32) for _ in range(12)]
    out = np.full((12, 777), np.nan, F32)
    for i, r in enumerate(pg.stream_map(add1(), xs, devices=[1, 0], backend=multi, out=out)):
        assert np.shares_memory(r, out[i])
    np.testing.assert_array_equal(out, np.stack(xs) + F32(1))
    got = [r.copy() for r in pg.stream_map(add1(), xs, devices="all", backend=multi)]
    np.testing.assert_array_equal(np.stack(got), np.stack(xs) + F32(1))


def test_a_slower_device_gets_fewer_batches(rng: np.random.Generator) -> None:
    seen: "collections.Counter[int]" = collections.Counter()
    lock = threading.Lock()

    def work(x: np.ndarray, stream: Any = None) -> None:
        ordinal = stream._device.ordinal        # noqa: SLF001 - which CPU device runs it
        with lock:
            seen[ordinal] += 1
        time.sleep(0.02 if ordinal == 1 else 0.001)
        x += F32(1)

    xs = [rng.standard_normal(64).astype(F32) for _ in range(60)]
    got = [r.copy() for r in pg.stream_map(work, xs, devices=2, backend="cpu", depth=2,
                                           prefetch=0)]
    np.testing.assert_array_equal(np.stack(got), np.stack(xs) + F32(1))
    assert seen[0] + seen[1] == 60
    assert seen[1] < seen[0] / 2, seen            # device 1 is 20x slower


def test_a_failure_on_one_device_raises_at_its_turn(multi: str,
                                                    rng: np.random.Generator) -> None:
    xs = [np.full(16, i, F32) for i in range(10)]

    def fail_at_5(x: Any) -> None:
        host = x if isinstance(x, np.ndarray) else None
        if host is None:
            import cupy

            v = cupy.asarray(x)
            if float(v[0]) == 5.0:
                raise ArithmeticError("batch 5")
            v += 1
            return
        if host[0] == 5:
            raise ArithmeticError("batch 5")
        host += F32(1)

    got = []
    with pytest.raises(pg.KernelError) as info:
        for r in pg.stream_map(fail_at_5, xs, devices=2, backend=multi):
            got.append(r.copy())
    assert info.value.batch_index == 5
    assert [float(r[0]) for r in got] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_bad_devices_are_rejected_before_anything_runs(no_thread_leaks: None) -> None:
    xs = [np.ones(8, F32)]
    for bad, err in ((0, ValueError), ([], ValueError), ([0, 0], ValueError),
                     ("most", ValueError), (-1, ValueError), ([0, "1"], TypeError),
                     (1.5, TypeError)):
        with pytest.raises(err):
            pg.stream_map(add1(), xs, devices=bad, backend="cpu")
    with pytest.raises(pg.BackendUnavailableError, match="99"):
        list(pg.stream_map(add1(), xs, devices=[0, 99], backend="cpu"))
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        with pytest.raises(ValueError, match="not both"):
            pg.stream_map(add1(), xs, devices=2, ctx=ctx)
        w = ctx.to_device(np.ones(4, F32))
        with pytest.raises(ValueError, match="one device"):
            pg.stream_map(add1(), xs, devices=2, extra=(w,))


def test_breaking_out_early_releases_every_device(no_thread_leaks: None) -> None:
    xs = [np.full(256, i, F32) for i in range(50)]
    for i, r in enumerate(pg.stream_map(add1(), xs, devices=3, backend="cpu")):
        np.testing.assert_array_equal(r, xs[i] + F32(1))
        if i == 3:
            break


def test_unknown_kernel_fails_before_any_batch_is_pulled() -> None:
    pulled = []

    def gen() -> Any:
        for i in range(5):
            pulled.append(i)
            yield np.ones(8, F32)
    with pytest.raises(Exception, match="nope"):
        list(pg.stream_map("nope", gen(), devices=2, backend="cpu"))
    assert pulled == []


def test_many_batches_over_two_devices_stay_bounded(rng: np.random.Generator) -> None:
    import tracemalloc

    xs = [rng.standard_normal(64).astype(F32) for _ in range(8)]
    out = np.empty((1, 64), F32)
    threads = threading.active_count()
    tracemalloc.start()
    try:
        for round_ in range(3):
            n = 0
            for i, r in enumerate(pg.stream_map(add1(), (xs[j % 8] for j in range(1500)),
                                                devices=2, backend="cpu")):
                if i % 500 == 0:
                    np.testing.assert_array_equal(r, xs[i % 8] + F32(1))
                n += 1
            assert n == 1500
            if round_ == 0:
                base = tracemalloc.get_traced_memory()[0]
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 4 << 20, grown
    assert threading.active_count() <= threads + 1
    del out
