"""Real data: results written into the caller's arrays (``out=``), memory pinned in
place (``pg.register``), and constants kept on the device (``DeviceArray``)."""

from __future__ import annotations

import warnings
from typing import Any, List

import numpy as np
import pytest

import prism_gpu as pg
from _support import add1, in_threads

F32 = np.float32

WEIGHTED_SRC = r"""
extern "C" __global__ void weighted(float* x, size_t n, const float* w, unsigned int m) {
    size_t stride = (size_t)blockDim.x * gridDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        x[i] = x[i] * w[i % m] + 1.0f;
}
"""


WEIGHTED_TO_SRC = r"""
extern "C" __global__ void weighted_to(const float* x, size_t n, float* y, size_t k,
                                       const float* w, unsigned int m) {
    size_t stride = (size_t)blockDim.x * gridDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        y[i] = x[i] * w[i % m] + 1.0f;
}
"""


def _weighted_to_cpu(x: np.ndarray, y: np.ndarray, w: np.ndarray, m: Any) -> None:
    y[...] = x
    _weighted_cpu(y, w, m)


def _weighted_cpu(x: np.ndarray, w: np.ndarray, m: Any) -> None:
    idx = np.arange(len(x)) % int(m)
    x[...] = x * w[idx] + F32(1)


def weighted() -> pg.Kernel:
    """``x[i] = x[i] * w[i % m] + 1`` with ``w`` a device array passed in ``extra``."""
    return pg.Kernel.from_source(WEIGHTED_SRC, "weighted", cpu=_weighted_cpu)


def expect_weighted(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    flat = x.reshape(-1)
    return (flat * w[np.arange(flat.size) % w.size] + F32(1)).reshape(x.shape)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng()   # fresh data every run


def batches_of(rng: np.random.Generator, sizes: List[int]) -> List[np.ndarray]:
    return [rng.standard_normal(n).astype(F32) for n in sizes]


# ---------------------------------------------------------------------------- out=
def test_out_rows_of_a_preallocated_array_are_written_and_yielded(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    xs = batches_of(rng, [4096] * 7)
    out = np.full((7, 4096), np.nan, F32)
    got = list(pg.stream_map(add1(), xs, ctx=ctx, out=out))
    assert len(got) == 7
    for i, r in enumerate(got):
        assert np.shares_memory(r, out) and r.base is not None
        np.testing.assert_array_equal(r, xs[i] + F32(1))
    np.testing.assert_array_equal(out, np.stack(xs) + F32(1))


def test_out_takes_uneven_batches_a_list_and_strided_entries(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    sizes = [1000, 3000, 17, 2500]
    xs = batches_of(rng, sizes)
    outs = [np.empty(n, F32) for n in sizes]
    got = list(pg.stream_map(add1(), xs, ctx=ctx, out=outs))
    for x, o, r in zip(xs, outs, got):
        assert r is o
        np.testing.assert_array_equal(o, x + F32(1))
    cols = np.zeros((512, 5), F32).T            # out[i] is a strided column
    xs = batches_of(rng, [512] * 5)
    for x, r in zip(xs, pg.stream_map(add1(), xs, ctx=ctx, out=cols)):
        assert not r.flags.c_contiguous
        np.testing.assert_array_equal(r, x + F32(1))


def test_out_into_pinned_and_registered_memory_goes_straight_there(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    xs = batches_of(rng, [2048] * 6)
    pinned = pg.pinned_empty((6, 2048), F32, ctx=ctx)
    pinned.fill(np.nan)
    for i, r in enumerate(pg.stream_map(add1(), xs, ctx=ctx, out=pinned)):
        assert np.shares_memory(r, pinned[i])
    np.testing.assert_array_equal(pinned, np.stack(xs) + F32(1))
    plain = np.full((6, 2048), np.nan, F32)
    with pg.register(plain, ctx=ctx) as reg:
        list(pg.stream_map(add1(), xs, ctx=ctx, out=reg))
    np.testing.assert_array_equal(plain, np.stack(xs) + F32(1))


def test_out_with_an_output_spec_and_big_batches_copied_by_several_threads(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    from _support import affine

    n = (5 << 20) // 4                          # 5 MiB batches: chunked host copies
    xs = batches_of(rng, [n, n, n - 12345, n])
    out = [np.empty((n // 2, 2), F32) if x.size == n else np.empty(x.size, F32) for x in xs]
    spec = lambda x: (x.size, F32)              # noqa: E731
    got = list(pg.stream_map(affine(), xs, ctx=ctx, output=spec, out=out,
                             extra=(F32(3), F32(-2))))
    for x, o, r in zip(xs, out, got):
        assert r is o
        # the GPU fuses a * x + b (one rounding): equal to a few ulp
        np.testing.assert_allclose(r.reshape(-1), F32(3) * x + F32(-2), rtol=1e-6, atol=1e-6)


def test_nan_and_inf_pass_through_out_unchanged(ctx: pg.ManagedGpuContext) -> None:
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e38], F32)
    out = np.zeros((1, 6), F32)
    (r,) = pg.stream_map(add1(), [x], ctx=ctx, out=out)
    np.testing.assert_array_equal(r, x + F32(1))


@pytest.mark.parametrize("bad, kind", [
    (lambda: np.zeros((2, 64), np.float64), "dtype"),
    (lambda: np.zeros((2, 65), F32), "elements"),
    (lambda: [np.zeros(64, F32), [0.0] * 64], "not a numpy array"),
    (lambda: np.zeros((1, 64), F32), "no element 1"),
])
def test_a_bad_out_entry_raises_at_its_batch_after_earlier_results(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator, bad: Any, kind: str) -> None:
    xs = batches_of(rng, [64, 64])
    out = bad()
    got = []
    with pytest.raises(pg.TransferError, match=kind) as info:
        for r in pg.stream_map(add1(), xs, ctx=ctx, out=out):
            got.append(r.copy())
    first_bad = 0 if kind in ("dtype", "elements") else 1
    assert info.value.batch_index == first_bad
    assert len(got) == first_bad
    for r, x in zip(got, xs):
        np.testing.assert_array_equal(r, x + F32(1))


def test_read_only_out_and_out_without_indexing_are_rejected(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    xs = batches_of(rng, [32])
    ro = np.zeros((1, 32), F32)
    ro.flags.writeable = False
    with pytest.raises(pg.TransferError, match="read-only") as info:
        list(pg.stream_map(add1(), xs, ctx=ctx, out=ro))
    assert info.value.batch_index == 0
    with pytest.raises(TypeError, match="out must be"):
        pg.stream_map(add1(), xs, ctx=ctx, out=5)


def test_a_failing_batch_with_out_keeps_the_earlier_rows(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    xs = batches_of(rng, [128] * 6)

    def fail_on_4(x: Any) -> None:
        host = x if isinstance(x, np.ndarray) else None
        if host is not None and host[0] == xs[4][0]:
            raise ArithmeticError("batch 4")
        if host is not None:
            host += F32(1)
        else:
            import cupy

            v = cupy.asarray(x)
            if float(v[0]) == float(xs[4][0]):
                raise ArithmeticError("batch 4")
            v += 1
    out = np.full((6, 128), np.nan, F32)
    seen = 0
    with pytest.raises(pg.KernelError) as info:
        for _ in pg.stream_map(fail_on_4, xs, ctx=ctx, out=out):
            seen += 1
    assert info.value.batch_index == 4 and seen == 4
    np.testing.assert_array_equal(out[:4], np.stack(xs[:4]) + F32(1))


def test_pipeline_run_writes_out(ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    pipe = ctx.create_pipeline_manager()
    b_in, b_out = pipe.add_buffer(1024, dtype=F32), pipe.add_buffer(1024, dtype=F32)
    from _support import affine

    pipe.add_stage(pg.GpuPipelineStage("affine", [b_in], [b_out], kernel=affine(),
                                       extra=(F32(2), F32(0.5))))
    xs = batches_of(rng, [1024, 1024, 1024, 1024, 1024])
    out = np.full((5, 1024), np.nan, F32)
    got = list(pipe.run(xs, b_in, b_out, out=out))
    for i, r in enumerate(got):
        assert np.shares_memory(r, out[i])
    np.testing.assert_array_equal(out, F32(2) * np.stack(xs) + F32(0.5))
    with pytest.raises(pg.TransferError, match="dtype") as info:
        list(pipe.run(xs[:1], b_in, b_out, out=np.zeros((1, 1024), np.float64)))
    assert info.value.batch_index == 0


# ---------------------------------------------------------------------------- register
def test_register_streams_a_big_array_in_place(ctx: pg.ManagedGpuContext,
                                               rng: np.random.Generator) -> None:
    big = rng.standard_normal(8 << 20).astype(F32)          # 32 MiB
    expect = big + F32(1)
    res = np.full((8, 1 << 20), np.nan, F32)
    with pg.register(big, ctx=ctx) as pinned, pg.register(res, ctx=ctx) as out:
        assert np.shares_memory(pinned, big) and ctx.device.is_pinned(pinned)
        assert ctx.device.is_pinned(pinned[1 << 20: 2 << 20])
        parts = [pinned[i << 20:(i + 1) << 20] for i in range(8)]
        list(pg.stream_map(add1(), parts, ctx=ctx, out=out))
    assert not ctx.device.is_pinned(pinned) and not ctx.device.is_pinned(big)
    np.testing.assert_array_equal(res.reshape(-1), expect)


def test_registered_memory_is_found_exactly_however_often_asked(
        ctx: pg.ManagedGpuContext) -> None:
    # slices of a registered array are found quickly (remembered by their base array):
    # the answer must stay exact for part-registered bases, across blocks and after them
    dev = ctx.device
    big = np.zeros((64, 1024), F32)
    flat = big.reshape(-1)
    with pg.register(flat[:16 * 1024], ctx=ctx):           # the first 16 rows only
        for _ in range(3):                                  # asked again: the same answers
            assert dev.is_pinned(big[3]) and dev.is_pinned(flat[1024:2048])
            assert not dev.is_pinned(big[20]) and not dev.is_pinned(big[10:20])
            assert not dev.is_pinned(big[:, :8])            # not contiguous
    assert not dev.is_pinned(big[3])                         # released
    with pg.register(big, ctx=ctx) as whole:                 # all of it
        for _ in range(3):
            assert all(dev.is_pinned(whole[i]) for i in range(64))
            assert dev.is_pinned(big[40]) and not dev.is_pinned(whole[:, ::2])
    for _ in range(3):
        assert not dev.is_pinned(big[40]) and not dev.is_pinned(big)
    other = np.zeros((64, 1024), F32)                        # same shape, other memory
    with pg.register(big, ctx=ctx):
        assert not dev.is_pinned(other[5]) and dev.is_pinned(big[5])


def test_an_unregister_racing_a_lookup_leaves_no_stale_answer() -> None:
    # another thread's unregister lands just after a lookup read the registered ranges:
    # what the lookup remembers must not outlive the registration (a later pg.register
    # would then skip registering the memory)
    from prism_gpu.backends import _hostranges as hr

    class Racing(hr.HostRanges):
        def __init__(self) -> None:
            self.race: Any = None
            super().__init__()

        @property  # type: ignore[override]
        def state(self) -> Any:
            snap = self._st
            race, self.race = self.race, None
            if race is not None:
                race()                           # after the read, before anything else
            return snap

        @state.setter
        def state(self, value: Any) -> None:
            self._st = value

    ranges = Racing()
    ranges.reserve(np.zeros(16))                 # an unrelated block stays open
    big = np.zeros(1 << 16)
    span = ranges.reserve(big)
    ranges.race = lambda: ranges.remove(*span)
    assert ranges.covers(big[5:6], big)          # true when asked: it was registered
    for _ in range(3):
        assert not ranges.covers(big[5:6], big) and not ranges.covers(big[5:6])


def test_a_registered_array_can_be_resized_after_its_block(
        ctx: pg.ManagedGpuContext) -> None:
    a = np.zeros(1 << 16, F32)
    with pg.register(a, ctx=ctx) as p:
        assert ctx.device.is_pinned(p[10:20])    # remembered while registered
        del p
    a.resize(1 << 17, refcheck=False)            # nothing of ours still refers to it
    assert a.size == 1 << 17


def test_a_base_whose_strides_changed_is_searched_again() -> None:
    from prism_gpu.backends import _hostranges as hr

    ranges = hr.HostRanges()
    root = np.frombuffer(bytearray(8000), dtype=np.float64, count=10)
    ranges.reserve(root)                          # its 80 bytes
    assert ranges.covers(root[3:4], root)        # remembered
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (numpy 2.4 deprecates it)
        root.strides = (800,)                    # its elements now lie past the range
    assert not ranges.covers(root[3:4], root) and not ranges.covers(root[3:4])


def test_register_rejects_what_cannot_be_pinned(ctx: pg.ManagedGpuContext) -> None:
    a = np.zeros((64, 64), F32)
    with pytest.raises(pg.TransferError, match="C-contiguous"):
        with pg.register(a[:, ::2], ctx=ctx):
            pass
    with pytest.raises(pg.TransferError, match="numpy array"):
        with pg.register([1.0, 2.0], ctx=ctx):
            pass
    with pytest.raises(pg.TransferError, match="objects"):
        with pg.register(np.array([object()] * 4), ctx=ctx):
            pass
    flat = a.reshape(-1)
    with pg.register(flat[:2048], ctx=ctx):
        with pytest.raises(pg.TransferError, match="registered already"):
            with pg.register(flat[1024:3072], ctx=ctx):        # overlaps part of it
                pass
        with pg.register(flat[100:200], ctx=ctx) as inner:     # inside it: pinned already
            assert ctx.device.is_pinned(inner)
        assert ctx.device.is_pinned(flat[:2048])               # the inner block let it be
    with pg.register(a, ctx=ctx) as again:             # released: registering again works
        assert ctx.device.is_pinned(again)


def test_register_unregisters_when_the_block_raises(ctx: pg.ManagedGpuContext) -> None:
    a = np.ones(1 << 16, F32)
    with pytest.raises(KeyError):
        with pg.register(a, ctx=ctx) as p:
            assert ctx.device.is_pinned(p)
            raise KeyError("inside")
    assert not ctx.device.is_pinned(a)
    with pg.register(a, ctx=ctx):
        pass


def test_register_of_pinned_or_empty_memory_is_a_no_op(ctx: pg.ManagedGpuContext) -> None:
    p = pg.pinned_empty(1024, F32, ctx=ctx)
    with pg.register(p, ctx=ctx) as v:
        assert np.shares_memory(v, p)
    assert ctx.device.is_pinned(p)                     # still the allocator's pinned memory
    with pg.register(np.zeros(0, F32), ctx=ctx) as e:
        assert e.size == 0


def test_read_only_registered_memory_is_no_download_destination(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    src = rng.standard_normal(256).astype(F32)
    src.flags.writeable = False
    coord = ctx.async_coordinator()
    buf = ctx.create_triple_buffer(256)
    with pg.register(src, ctx=ctx) as view:
        assert not view.flags.writeable
        up = coord.queue_upload(view, buf)               # reading it is fine
        coord.queue_compute(add1(), [up])
        with pytest.raises(pg.TransferError, match="read-only"):
            coord.queue_download(buf, view)
        out = np.empty(256, F32)
        coord.wait(coord.queue_download(buf, out))
    np.testing.assert_array_equal(out, src + F32(1))


def test_register_on_a_closed_context_is_refused() -> None:
    ctx = pg.ManagedGpuContext(backend="cpu")
    ctx.close()
    with pytest.raises(pg.InvalidOperationError):
        with pg.register(np.zeros(8, F32), ctx=ctx):
            pass


# ---------------------------------------------------------------------------- DeviceArray
def test_a_device_constant_is_read_by_every_batch(ctx: pg.ManagedGpuContext,
                                                  rng: np.random.Generator) -> None:
    w = rng.standard_normal(7).astype(F32)
    dw = ctx.to_device(w)
    assert isinstance(dw, pg.DeviceArray) and dw.shape == (7,) and dw.dtype == F32
    xs = batches_of(rng, [1000, 513, 2048])
    got = [r.copy() for r in pg.stream_map(weighted(), xs, ctx=ctx,
                                            extra=(dw, np.uint32(7)))]
    for x, r in zip(xs, got):
        np.testing.assert_allclose(r, expect_weighted(x, w), rtol=1e-6, atol=1e-6)


def test_a_device_constant_in_every_kernel_kind(ctx: pg.ManagedGpuContext,
                                                rng: np.random.Generator) -> None:
    w = rng.standard_normal(5).astype(F32)
    dw = ctx.to_device(w)
    x = rng.standard_normal(640).astype(F32)
    want = expect_weighted(x, w)
    # a coordinator: extra= after the slot's array, and args= replacing the list
    coord = ctx.async_coordinator()
    buf = ctx.create_triple_buffer(640)
    up = coord.queue_upload(x, buf)
    coord.queue_compute(weighted(), [up], extra=(dw, np.uint32(5)))
    out = np.empty(640, F32)
    coord.wait(coord.queue_download(buf, out))
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    scratch = ctx.empty_device(4, F32)

    def fill(c: Any) -> None:
        if isinstance(c, np.ndarray):
            c[...] = F32(3)
        else:
            import cupy

            cupy.asarray(c).fill(3)
    coord.wait(coord.queue_compute(fill, args=(scratch,)))
    np.testing.assert_array_equal(scratch.to_host(), np.full(4, 3, F32))
    # triple_buffered_step
    out2 = np.empty(640, F32)
    ctx.triple_buffered_step(pg.StepConfig(input=x, output=out2, kernel=weighted(),
                                           extra=(dw, np.uint32(5)))).wait()
    np.testing.assert_allclose(out2, want, rtol=1e-6, atol=1e-6)
    # a pipeline stage
    pipe = ctx.create_pipeline_manager()
    b0, b1 = pipe.add_buffer(640, dtype=F32), pipe.add_buffer(640, dtype=F32)
    kernel = pg.Kernel.from_source(WEIGHTED_TO_SRC, "weighted_to", cpu=_weighted_to_cpu)
    pipe.add_stage(pg.GpuPipelineStage("w", [b0], [b1], kernel=kernel,
                                       extra=(dw, np.uint32(5))))
    (r,) = pipe.run([x], b0, b1)
    np.testing.assert_allclose(r, want, rtol=1e-6, atol=1e-6)
    # a callable gets the device array itself
    seen: list = []

    def look(a: Any, c: Any) -> None:
        seen.append(type(c))
        if isinstance(c, np.ndarray):
            a += c[:1]
        else:
            import cupy

            cupy.asarray(a)[...] += cupy.asarray(c)[:1]
    (r,) = pg.stream_map(look, [x], ctx=ctx, extra=(dw,))
    np.testing.assert_allclose(r, x + w[0], rtol=1e-6, atol=1e-6)
    assert seen and not issubclass(seen[0], pg.DeviceArray)   # the backend's array


def test_device_array_round_trip_and_interop(ctx: pg.ManagedGpuContext,
                                             rng: np.random.Generator) -> None:
    a = rng.standard_normal((3, 5)).astype(np.float64)
    d = ctx.to_device(a)
    assert (d.shape, d.dtype, d.size, d.nbytes, d.ndim) == ((3, 5), np.float64, 15, 120, 2)
    np.testing.assert_array_equal(d.to_host(), a)
    t = ctx.to_device(a.T)                             # non-contiguous input is copied
    np.testing.assert_array_equal(t.to_host(), a.T)
    e = ctx.empty_device((4, 2), np.int32)
    assert e.to_host().shape == (4, 2) and e.dtype == np.int32
    if ctx.backend == "cpu":
        with pytest.raises(AttributeError, match="host memory"):
            d.__cuda_array_interface__
        np.testing.assert_array_equal(np.from_dlpack(d), a)
    else:
        import cupy

        np.testing.assert_array_equal(cupy.asarray(d).get(), a)
        np.testing.assert_array_equal(cupy.from_dlpack(d).get(), a)
        # DLPack: a copy or another device asked for is refused, never a silent alias
        with pytest.raises(BufferError, match="copy"):
            d.__dlpack__(copy=True)
        with pytest.raises(BufferError, match="device"):
            d.__dlpack__(dl_device=(1, 0))
        d.__dlpack__(copy=False, dl_device=d.__dlpack_device__())


def test_device_array_bad_input_closed_and_foreign(ctx: pg.ManagedGpuContext,
                                                   rng: np.random.Generator) -> None:
    with pytest.raises(pg.TransferError):
        ctx.to_device([1, 2, 3])
    with pytest.raises(pg.TransferError):
        ctx.to_device(np.array([object()]))
    with pytest.raises(ValueError):
        ctx.empty_device((-1,), F32)
    with pytest.raises(TypeError):
        ctx.empty_device("big", F32)
    w = ctx.to_device(np.ones(4, F32))
    coord = ctx.async_coordinator()
    buf = ctx.create_triple_buffer(64)
    up = coord.queue_upload(rand64(rng), buf)
    w.close()
    assert w.closed
    before = coord.in_flight
    with pytest.raises(pg.InvalidOperationError, match="closed"):
        coord.queue_compute(weighted(), [up], extra=(w, np.uint32(4)))
    assert coord.in_flight == before                   # nothing was queued
    with pytest.raises(pg.InvalidOperationError, match="closed"):
        w.to_host()
    with pg.ManagedGpuContext(backend=ctx.backend) as other:
        foreign = other.to_device(np.ones(4, F32))
        with pytest.raises(pg.InvalidOperationError, match="not on the device"):
            coord.queue_compute(weighted(), [up], extra=(foreign, np.uint32(4)))
        kept = other.to_device(np.ones(4, F32))
    assert foreign.closed and kept.closed              # the context closed its arrays
    coord.queue_compute(add1(), [up])                  # the rejected calls changed nothing
    out = np.empty(64, F32)
    coord.wait(coord.queue_download(buf, out))


def test_a_device_array_is_a_handle_not_host_data(ctx: pg.ManagedGpuContext) -> None:
    # a copy escaped the context's close (and on CUDA would read freed memory); pickle
    # failed on an internal weakref; np.asarray wrapped it in an object array; shape
    # could be rebound so to_host() failed
    import copy
    import pickle

    d = ctx.to_device(np.arange(6, dtype=F32))
    for attempt in (lambda: copy.copy(d), lambda: copy.deepcopy(d),
                    lambda: pickle.dumps(d), lambda: np.asarray(d)):
        with pytest.raises(TypeError, match="DeviceArray"):
            attempt()
    with pytest.raises(AttributeError):
        d.shape = (3,)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        d.dtype = np.dtype(np.int32)  # type: ignore[misc]
    np.testing.assert_array_equal(d.to_host(), np.arange(6, dtype=F32))


def test_a_pipeline_refuses_a_device_array_closed_after_its_first_run(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    w = rng.standard_normal(64).astype(F32)
    dw = ctx.to_device(w)
    pipe = ctx.create_pipeline_manager()
    a, b = pipe.add_buffer(64), pipe.add_buffer(64)

    def mul(x: Any, y: Any, w: Any) -> None:
        if ctx.backend == "cpu":
            np.multiply(x, w, out=y)
        else:  # a callable gets device arrays: CuPy computes on them
            import cupy as cp

            cp.multiply(cp.asarray(x), cp.asarray(w), out=cp.asarray(y))

    pipe.add_stage(pg.GpuPipelineStage("w", [a], [b], extra=(dw,), kernel=mul))
    x = rand64(rng)
    (r,) = [y.copy() for y in pipe.run([x], input=a, output=b)]
    np.testing.assert_array_equal(r, x * w)
    dw.close()  # the plan made at the first run keeps the memory: it ran on before
    with pytest.raises(pg.InvalidOperationError, match="closed"):
        list(pipe.run([x], input=a, output=b))
    with pytest.raises(pg.InvalidOperationError, match="closed"):
        pipe.execute_iteration({a: x})


def rand64(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(64).astype(F32)


# ---------------------------------------------------------------------------- bounds
def test_out_register_and_device_arrays_stay_bounded(backend: str, rng: np.random.Generator,
                                                     no_thread_leaks: None) -> None:
    import threading

    from prism_gpu.backends.cpu import CpuDevice

    x = rng.standard_normal(256).astype(F32)
    out = np.empty((1, 256), F32)
    with pg.ManagedGpuContext(backend=backend) as ctx:
        threads = threading.active_count()
        for _ in range(200):                     # a stream_map per request, with out=
            list(pg.stream_map(add1(), [x], ctx=ctx, out=out))
        assert threading.active_count() <= threads + 1
        np.testing.assert_array_equal(out[0], x + F32(1))
        for _ in range(2000):                    # register blocks leave nothing behind
            with pg.register(x, ctx=ctx):
                pass
        assert not ctx.device.is_pinned(x)
        if backend == "cpu":
            assert CpuDevice.host_ranges.ranges == ()
        for _ in range(2000):                    # device arrays made and dropped per batch
            ctx.to_device(x).close()
        assert len(ctx._arrays) < 50             # noqa: SLF001 - tracked weakly
    # closing the context stopped every thread it started (the fixture checks)


def test_out_may_be_the_input_batches_themselves(ctx: pg.ManagedGpuContext,
                                                 rng: np.random.Generator) -> None:
    xs = [rng.standard_normal(3000).astype(F32) for _ in range(9)]
    want = [x + F32(1) for x in xs]
    for r, x in zip(pg.stream_map(add1(), xs, ctx=ctx, out=xs), xs):
        assert r is x
    for x, w in zip(xs, want):
        np.testing.assert_array_equal(x, w)


def test_out_as_a_mapping_and_a_device_array_batch_is_refused(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    xs = [rng.standard_normal(10).astype(F32) for _ in range(3)]
    out = {i: np.empty(10, F32) for i in range(3)}
    list(pg.stream_map(add1(), xs, ctx=ctx, out=out))
    for i in range(3):
        np.testing.assert_array_equal(out[i], xs[i] + F32(1))
    d = ctx.to_device(xs[0])
    with pytest.raises(pg.TransferError, match="numpy arrays") as info:
        list(pg.stream_map(add1(), [xs[0], d], ctx=ctx))
    assert info.value.batch_index == 1


@pytest.mark.parametrize("k", [0, 3, 5])
def test_a_kernel_failing_at_any_position_with_out(k: int, rng: np.random.Generator,
                                                   no_thread_leaks: None) -> None:
    xs = [np.full(300, i, F32) for i in range(6)]
    out = np.full((6, 300), np.nan, F32)

    def fail_at_k(x: Any) -> None:
        if x[0] == k:
            raise ArithmeticError(f"batch {k}")
        x += F32(1)
    seen = 0
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        with pytest.raises(pg.KernelError) as info:
            for _ in pg.stream_map(fail_at_k, xs, ctx=ctx, out=out):
                seen += 1
        assert info.value.batch_index == k and seen == k
        for i in range(k):                       # the earlier rows are written
            np.testing.assert_array_equal(out[i], xs[i] + F32(1))
        # the context is still fine for the next call
        (r,) = pg.stream_map(add1(), xs[:1], ctx=ctx, out=out[:1])
        np.testing.assert_array_equal(r, xs[0] + F32(1))


def test_two_threads_stream_into_their_own_out_on_one_context(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    xs = [[rng.standard_normal(2048).astype(F32) for _ in range(20)] for _ in range(2)]
    outs = [np.full((20, 2048), np.nan, F32) for _ in range(2)]

    def work(t: int) -> None:
        with pg.register(outs[t], ctx=ctx) as pinned:   # each thread pins its own
            list(pg.stream_map(add1(), xs[t], ctx=ctx, out=pinned))
    errors = in_threads(work, [(0,), (1,)])
    assert not errors, errors
    for t in range(2):
        np.testing.assert_array_equal(outs[t], np.stack(xs[t]) + F32(1))


# ---------------------------------------------------------------------------- hostile review
def test_a_batch_whose_staging_fails_raises_at_its_turn(ctx: pg.ManagedGpuContext,
                                                        backend: str) -> None:
    bads = [np.zeros(4, dtype=[])]  # elements of no bytes
    if backend == "cpu":  # a staging buffer of 4 EiB: no address space holds it, whatever
        bads.append(np.broadcast_to(F32(1), (1 << 60,)))  # the machine's overcommit policy
    for bad in bads:
        xs = [np.full(8, i, F32) for i in range(2)] + [bad, np.ones(8, F32)]
        got = []
        with pytest.raises(Exception) as info:
            for r in pg.stream_map(add1(), xs, ctx=ctx, prefetch=4):
                got.append(r.copy())
        assert info.value.batch_index == 2  # type: ignore[attr-defined]
        assert [r[0] for r in got] == [1, 2]  # the earlier results first
    xs = [np.full(8, 3, F32)]
    assert [r[0] for r in pg.stream_map(add1(), xs, ctx=ctx)] == [4]  # still usable


def test_the_read_ahead_cap_counts_the_staging_buffers(ctx: pg.ManagedGpuContext,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from prism_gpu import _stream_map

    monkeypatch.setattr(_stream_map, "_READ_AHEAD_BYTES", 64 << 10)
    pulled = [0]

    def tiny() -> Any:
        while pulled[0] < 5000:
            pulled[0] += 1
            yield np.ones(4, F32)  # 16 bytes of data, a staging buffer of 4 KiB or more

    it = pg.stream_map(add1(), tiny(), ctx=ctx, depth=2, prefetch=1000)
    np.testing.assert_array_equal(next(it), np.full(4, 2, F32))
    it.close()
    assert pulled[0] <= 2 + 1 + (64 << 10) // 4096 + 2  # not the 1000 of prefetch


def test_host_memory_takes_only_an_open_context(backend: str) -> None:
    ctx = pg.ManagedGpuContext(backend=backend)
    coord = pg.AsyncCoordinator(ctx.device)
    try:
        for bad in ("x", ctx.device, coord):
            with pytest.raises(TypeError, match="ctx"):
                pg.pinned_empty(4, ctx=bad)
            with pytest.raises(TypeError, match="ctx"):
                with pg.register(np.zeros(4, F32), ctx=bad):
                    pass
            with pytest.raises(TypeError, match="ctx"):
                pg.stream_map(add1(), [np.ones(4, F32)], ctx=bad)
    finally:
        coord.close()
        ctx.close()
    with pytest.raises(pg.InvalidOperationError):
        pg.pinned_empty(4, ctx=ctx)


def test_to_device_keeps_the_shape_of_0d_and_matrix_input(ctx: pg.ManagedGpuContext) -> None:
    x = np.array(3.5, F32)
    d = ctx.to_device(x)
    assert d.shape == () and d.to_host().shape == ()
    assert d.to_host() == x
    with pytest.warns(PendingDeprecationWarning):
        m = np.matrix([[1.0, 2.0], [3.0, 4.0]], dtype=F32)
    dm = ctx.to_device(m)
    assert dm.shape == (2, 2)
    np.testing.assert_array_equal(dm.to_host(), np.asarray(m))
    d.close()
    dm.close()
