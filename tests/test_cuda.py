"""GPU-only behaviour: numpy-reference checks, compile errors, interop, staging."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import prism_gpu as pg
from prism_gpu.backends import cuda_unavailable_reason

_REASON = cuda_unavailable_reason()
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(_REASON is not None, reason=f"CUDA not usable: {_REASON}")]

AXPY = r"""
extern "C" __global__ void axpy(float* x, size_t n, float a, float b) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = a * x[i] + b;
}
"""


@pytest.fixture
def cuda_coord():
    dev = pg.open_device("cuda")
    coord = pg.AsyncCoordinator(dev)
    yield coord
    coord.close()
    dev.close()


def _roundtrip(coord, kernel, x, extra=()):
    buf = pg.TripleBuffer(coord.device, x.size, dtype=x.dtype)
    out = np.full_like(x, np.nan)  # poisoned: every element must be written
    up = coord.queue_upload(x, buf)
    coord.queue_compute(kernel, [up], extra=extra)
    down = coord.queue_download(buf, out)
    buf.advance()
    coord.wait(down)
    return out


@pytest.mark.parametrize("n", [1, 3, 1023, 1 << 16, 100_003])
def test_source_kernel_matches_numpy(cuda_coord, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    k = pg.Kernel.from_source(AXPY, "axpy")
    a, b = float(rng.uniform(0.5, 2)), float(rng.uniform(-1, 1))
    out = _roundtrip(cuda_coord, k, x, extra=(a, b))  # Python floats: converted to float
    np.testing.assert_allclose(out, np.float32(a) * x + np.float32(b), rtol=1e-6, atol=1e-6)


def test_256_mib_batch(cuda_coord):
    n = (256 << 20) // 4
    x = np.random.default_rng(7).random(n, dtype=np.float32)
    out = _roundtrip(cuda_coord, "scale", x, extra=(3.0,))
    np.testing.assert_array_equal(out, x * np.float32(3.0))


def test_pageable_input_changed_after_queue(cuda_coord):
    """The device must see the values at queue time (pageable input is staged)."""
    rng = np.random.default_rng(11)
    n = 1 << 22
    x = rng.random(n, dtype=np.float32)
    expected = x * np.float32(2.0)
    buf = pg.TripleBuffer(cuda_coord.device, n)
    out = np.empty_like(x)
    up = cuda_coord.queue_upload(x, buf)
    cuda_coord.queue_compute("spin", [up], extra=(2000.0,))  # keep the GPU busy a while
    x[:] = -1.0  # changed right after queueing
    cuda_coord.queue_compute("scale", [up])
    down = cuda_coord.queue_download(buf, out)
    buf.advance()
    cuda_coord.wait(down)
    np.testing.assert_array_equal(out, expected)


def test_pinned_download_destination(cuda_coord):
    n = 4097
    x = np.random.default_rng(3).random(n, dtype=np.float32)
    buf = pg.TripleBuffer(cuda_coord.device, n)
    out = pg.pinned_empty(n, np.float32)
    out[:] = np.nan
    up = cuda_coord.queue_upload(x, buf)
    cuda_coord.queue_compute("scale", [up])
    down = cuda_coord.queue_download(buf, out)
    buf.advance()
    cuda_coord.wait(down)
    np.testing.assert_array_equal(out, x * 2)


def test_compile_error_carries_log(cuda_coord):
    k = pg.Kernel.from_source('extern "C" __global__ void bad(float* x, size_t n) { oops; }',
                              "bad")
    with pytest.raises(pg.KernelError) as info:
        cuda_coord.register_kernel("bad", k)
    assert "oops" in str(info.value)
    assert info.value.log


def test_out_of_range_launch_config_rejected_before_enqueue(cuda_coord):
    buf = pg.TripleBuffer(cuda_coord.device, 16)
    up = cuda_coord.queue_upload(np.ones(16, np.float32), buf)
    k = pg.Kernel.from_source(AXPY, "axpy")
    before = cuda_coord.statistics().issued
    with pytest.raises(ValueError, match="block"):  # past every device: refused when made
        pg.LaunchConfig(grid=1, block=2048)
    # past this device only (1 MiB of dynamic shared memory): refused by the launch
    with pytest.raises(pg.KernelError):
        cuda_coord.queue_compute(k, [up], extra=(1.0, 0.0),
                                 config=pg.LaunchConfig(grid=1, block=32,
                                                        shared_mem_bytes=1 << 20))
    assert cuda_coord.statistics().issued == before
    assert buf.get_states()[0] is pg.BufferState.UPLOADING


def test_wrong_argument_count_rejected(cuda_coord):
    buf = pg.TripleBuffer(cuda_coord.device, 16)
    up = cuda_coord.queue_upload(np.ones(16, np.float32), buf)
    with pytest.raises(pg.KernelError, match="takes 4 parameters"):
        cuda_coord.queue_compute(pg.Kernel.from_source(AXPY, "axpy"), [up], extra=(1.0,))


def test_pointer_dtype_checked(cuda_coord):
    buf = pg.TripleBuffer(cuda_coord.device, 16, dtype=np.float64)
    up = cuda_coord.queue_upload(np.ones(16, np.float64), buf)
    with pytest.raises(pg.KernelError, match="float64"):
        cuda_coord.queue_compute(pg.Kernel.from_source(AXPY, "axpy"), [up], extra=(1.0, 0.0))


def test_cupy_callable_is_stream_ordered(cuda_coord):
    cupy = pytest.importorskip("cupy")
    n = 1 << 20
    x = np.random.default_rng(5).random(n, dtype=np.float32)
    seen = {}

    def double(a, stream):
        arr = cupy.asarray(a)  # through __cuda_array_interface__, no copy
        seen["same_memory"] = arr.data.ptr == a.ptr
        seen["current"] = cupy.cuda.get_current_stream().ptr == stream.handle
        arr *= 2

    out = _roundtrip(cuda_coord, pg.Kernel.from_callable(double), x)
    assert seen == {"same_memory": True, "current": True}
    np.testing.assert_array_equal(out, x * 2)


def test_torch_callable_and_dlpack(cuda_coord):
    torch = pytest.importorskip("torch")
    n = 4099
    x = np.random.default_rng(6).random(n, dtype=np.float32)
    seen = {}

    def add_one(a, stream):
        t = torch.from_dlpack(a)
        seen["ptr"] = t.data_ptr() == a.ptr
        seen["current"] = torch.cuda.current_stream().cuda_stream == stream.handle
        t.add_(1.0)

    out = _roundtrip(cuda_coord, pg.Kernel.from_callable(add_one), x)
    assert seen == {"ptr": True, "current": True}
    np.testing.assert_array_equal(out, x + 1)


def test_streams_wrap_into_cupy_and_torch(cuda_coord):
    cupy = pytest.importorskip("cupy")
    torch = pytest.importorskip("torch")
    s = cuda_coord.compute_stream()
    assert cupy.cuda.Stream.from_external(s).ptr == s.handle
    assert torch.cuda.ExternalStream(s.handle).cuda_stream == s.handle
    with pg.interop.use_stream(s):
        assert cupy.cuda.get_current_stream().ptr == s.handle
        assert torch.cuda.current_stream().cuda_stream == s.handle


@pytest.mark.parametrize("torch_calls", ["raw", "public"])
def test_a_callable_switches_cupy_and_torch_streams_and_puts_them_back(cuda_coord,
                                                                      monkeypatch, torch_calls):
    cupy = pytest.importorskip("cupy")
    torch = pytest.importorskip("torch")
    from prism_gpu.backends.cuda import _interop

    if torch_calls == "public":  # a torch without the raw stream calls
        monkeypatch.setattr(_interop, "_raw_stream_calls", lambda torch, ordinal: (None, None))
    else:
        assert _interop._raw_stream_calls(torch, 0)[0] is not None
    s = cuda_coord.compute_stream()
    mine = torch.cuda.Stream()  # the caller's own current streams, to be restored
    cp_mine = cupy.cuda.Stream(non_blocking=True)
    seen = []

    def body(a, stream):
        seen.append((torch.cuda.current_stream().cuda_stream,
                     cupy.cuda.get_current_stream().ptr))
        with pg.interop.use_stream(stream):  # nested on the same stream
            seen.append((torch.cuda.current_stream().cuda_stream,
                         cupy.cuda.get_current_stream().ptr))
        seen.append((torch.cuda.current_stream().cuda_stream,
                     cupy.cuda.get_current_stream().ptr))
        if len(seen) > 3:
            raise ValueError("the second launch fails")

    k = pg.Kernel.from_callable(body)
    buf = pg.TripleBuffer(cuda_coord.device, 16)
    with torch.cuda.stream(mine), cp_mine:
        up = cuda_coord.queue_upload(np.ones(16, np.float32), buf)
        cuda_coord.queue_compute(k, [up])
        assert torch.cuda.current_stream().cuda_stream == mine.cuda_stream
        assert cupy.cuda.get_current_stream().ptr == cp_mine.ptr
        failed = cuda_coord.queue_compute(k, [up])   # raises inside: still put back
        assert torch.cuda.current_stream().cuda_stream == mine.cuda_stream
        assert cupy.cuda.get_current_stream().ptr == cp_mine.ptr
    with pytest.raises(pg.PrismGpuError):
        cuda_coord.wait(failed)
    buf.advance()
    assert seen[:3] == [(s.handle, s.handle)] * 3


def test_dlpack_capsule_lifetime(cuda_coord):
    cupy = pytest.importorskip("cupy")
    dev = cuda_coord.device
    arr = dev.allocate(64 * 4).view(np.float32)
    c = cupy.from_dlpack(arr)
    c[:] = cupy.arange(64, dtype=cupy.float32)
    del arr
    gc.collect()
    np.testing.assert_array_equal(cupy.asnumpy(c), np.arange(64, dtype=np.float32))


def test_stream_map_on_gpu_random_sizes():
    rng = np.random.default_rng(9)
    batches = [rng.random(int(n), dtype=np.float32) for n in rng.integers(1, 300_000, 12)]
    with pg.ManagedGpuContext(backend="cuda") as ctx:
        results = list(pg.stream_map("scale", batches, ctx=ctx, extra=(5.0,)))
    for r, b in zip(results, batches):
        np.testing.assert_array_equal(r, b * np.float32(5.0))


EVERY_TYPE = r"""
extern "C" __global__ void every_type(double* out, size_t n, float f, double d, int i,
                                      unsigned int u, long long q, unsigned long long Q,
                                      short h, unsigned short H, signed char b,
                                      unsigned char B, bool t, long l) {
    if (threadIdx.x == 0 && blockIdx.x == 0 && n >= 12) {
        out[0] = f; out[1] = d; out[2] = i; out[3] = u; out[4] = (double)q;
        out[5] = (double)Q; out[6] = h; out[7] = H; out[8] = b; out[9] = B; out[10] = t;
        out[11] = (double)l;
    }
}
"""


def test_every_scalar_parameter_type_reaches_the_kernel():
    # each C type passed exactly: negative values, values past 32 bits, a float's rounding
    rng = np.random.default_rng(5)
    vals = [np.float32(rng.standard_normal()), float(rng.standard_normal()) * 1e10,
            -int(rng.integers(1, 2**31)), int(rng.integers(2**31, 2**32)),
            -int(rng.integers(2**40, 2**52)), int(rng.integers(2**52, 2**53)),
            -int(rng.integers(1, 2**15)), int(rng.integers(2**15, 2**16)),
            -int(rng.integers(1, 128)), int(rng.integers(128, 256)), True,
            -int(rng.integers(2**40, 2**53))]
    dev = pg.open_device("cuda")
    try:
        with pg.AsyncCoordinator(dev) as coord:
            k = pg.Kernel.from_source(EVERY_TYPE, "every_type",
                                      config=pg.LaunchConfig(grid=1, block=32))
            buf = pg.TripleBuffer(dev, 12, dtype=np.float64)
            out = np.full(12, np.nan)
            up = coord.queue_upload(np.zeros(12), buf)
            coord.queue_compute(k, [up], extra=tuple(vals))
            coord.wait(coord.queue_download(buf, out))
            buf.advance()
    finally:
        dev.close()
    expect = [float(np.float32(vals[0])), vals[1]] + [float(v) for v in vals[2:]]
    assert out.tolist() == expect


BOUNDED = r"""
extern "C" __global__ void __launch_bounds__(32) bounded(float* x, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += 1.0f;
}
"""


def test_a_launch_the_driver_rejects_raises_from_the_queue_call():
    # 1024 threads pass the device's limits but not the kernel's launch bounds: the
    # driver refuses the launch itself, and the queue call raises, the ring unchanged
    dev = pg.open_device("cuda")
    try:
        with pg.AsyncCoordinator(dev) as coord:
            k = pg.Kernel.from_source(BOUNDED, "bounded", config=pg.LaunchConfig(block=1024))
            buf = pg.TripleBuffer(dev, 64)
            up = coord.queue_upload(np.ones(64, np.float32), buf)
            with pytest.raises(pg.KernelError, match="launching kernel 'bounded'"):
                coord.queue_compute(k, [up])
            fine = pg.Kernel.from_source(BOUNDED, "bounded", config=pg.LaunchConfig(block=32,
                                                                                     grid=2))
            coord.queue_compute(fine, [up])  # the upload is still there to compute on
            out = np.full(64, np.nan, np.float32)
            coord.wait(coord.queue_download(buf, out))
            buf.advance()
    finally:
        dev.close()
    np.testing.assert_array_equal(out, np.full(64, 2.0, np.float32))


def test_the_hot_path_calls_the_driver_from_c():
    # the native driver calls are built, loaded and wired in wherever the CUDA backend runs
    # (the suite runs test_cuda.py once more with PRISM_GPU_NATIVE_DRIVER=0, the other path)
    import os

    from prism_gpu.backends.cuda import _driver, _stream

    native = _driver.NATIVE
    dev = pg.open_device("cuda")
    try:
        said = dev.properties["native_driver_calls"]  # what prism-gpu info shows
    finally:
        dev.close()
    if os.environ.get("PRISM_GPU_NATIVE_DRIVER", "1").strip().lower() in ("0", "false", "no",
                                                                        "off"):
        assert native is None and _stream._record is None
        assert said.startswith("off: PRISM_GPU_NATIVE_DRIVER")
    else:
        assert said == "on"
        assert native is not None, "the native driver calls are not in use"
        assert (_stream._memcpy, _stream._record, _stream._wait, _stream._query) == (
            native.memcpy, native.record, native.wait, native.query)


MANY = r"""
extern "C" __global__ void many(float* x, size_t n, PARAMS) {
    if (threadIdx.x == 0 && blockIdx.x == 0) x[0] = (float)(SUM);
}
"""


def test_a_kernel_of_more_parameters_than_the_native_launch_takes():
    # 302 parameters: past the native call's 256, so this launch goes through cuda.core
    rng = np.random.default_rng(11)
    vals = [int(v) for v in rng.integers(-1000, 1000, 300)]
    src = MANY.replace("PARAMS", ", ".join(f"int a{i}" for i in range(300))).replace(
        "SUM", " + ".join(f"a{i}" for i in range(0, 300, 7)))
    dev = pg.open_device("cuda")
    try:
        with pg.AsyncCoordinator(dev) as coord:
            k = pg.Kernel.from_source(src, "many", config=pg.LaunchConfig(grid=1, block=32))
            buf = pg.TripleBuffer(dev, 4)
            out = np.full(4, np.nan, np.float32)
            up = coord.queue_upload(np.zeros(4, np.float32), buf)
            coord.queue_compute(k, [up], extra=tuple(vals))
            coord.wait(coord.queue_download(buf, out))
            buf.advance()
    finally:
        dev.close()
    assert out[0] == np.float32(sum(vals[0:300:7]))

def test_a_closed_stream_refuses_work_by_name(monkeypatch):
    # a closed stream's work must never reach the driver: not the default stream, not a
    # freed handle, not a callable running CuPy on it
    from prism_gpu.backends.cuda import _kernels, _stream

    dev = pg.open_device("cuda")
    try:
        s = dev.create_stream()
        ev = dev.create_event()
        d = dev.allocate(64).view(np.float32)
        d2 = dev.allocate(64).view(np.float32)
        host = pg.pinned_empty(16, np.float32)
        host[:] = np.random.default_rng(3).random(16, dtype=np.float32)
        k = dev.prepare_kernel(pg.Kernel.from_source(AXPY, "axpy",
                                                     config=pg.LaunchConfig(block=32)))
        ran = []
        fn = dev.prepare_kernel(pg.Kernel.from_callable(lambda x: ran.append(x)))
        s.copy_h2d(d, host)  # open: fine
        s.record(ev)         # its last record is on s: a wait there would be a no-op
        s.synchronize()
        s.close()

        def reached(*a):
            raise AssertionError("a closed stream's work reached the driver")
        monkeypatch.setattr(_stream, "_memcpy", reached)
        for name in ("_record", "_wait"):
            if getattr(_stream, name) is not None:
                monkeypatch.setattr(_stream, name, reached)
        monkeypatch.setattr(_kernels, "NATIVE", type("N", (), {"launch": reached}))
        def staging():  # pinned staging buffers taken and free, per size class
            return dict(dev.staging._count), {c: len(v) for c, v in dev.staging._free.items()}
        before = staging()
        for call in (lambda: s.copy_h2d(d, host), lambda: s.copy_d2h(host, d),
                     lambda: s.copy_h2d(d, np.ones(16, np.float32)),  # pageable: staged
                     lambda: s.copy_d2h(np.empty(16, np.float32), d),
                     lambda: s.copy_d2d(d2, d), lambda: s.record(ev), lambda: s.wait(ev),
                     lambda: s.launch(k, pg.LaunchConfig(block=32), [d],
                                      (np.float32(1), np.float32(0))),
                     lambda: s.launch(fn, None, [d], ()),
                     lambda: s.handle, lambda: s.__cuda_stream__()):
            with pytest.raises(pg.InvalidOperationError, match="closed"):
                call()
        assert ran == []
        assert staging() == before  # a refused pageable copy took no staging buffer
        monkeypatch.undo()
        other = dev.create_stream()
        other.record(ev)
        ev.close()
        with pytest.raises(pg.InvalidOperationError, match="closed event"):
            other.record(ev)
        with pytest.raises(pg.InvalidOperationError, match="closed event"):
            other.wait(ev)
        with pytest.raises(pg.InvalidOperationError, match="closed event"):
            ev.query()
        back = pg.pinned_empty(16, np.float32)
        back[:] = np.nan
        other.copy_d2h(back, d)  # the memory still holds the one copy made while open
        other.synchronize()
        np.testing.assert_array_equal(back, host)
    finally:
        dev.close()


def test_queue_calls_go_on_after_other_code_changes_the_current_context():
    """Other code on the thread (a library, the driver API) leaves no context current,
    or a context of its own, between iterations: the native stream calls see it and make
    their own current again, and every result is right. (The Python stream trusts the
    device's thread-local: this is for the native calls.)"""
    from cuda.bindings import driver

    from prism_gpu.backends.cuda import _driver

    if _driver.NATIVE is None:
        pytest.skip("the native driver calls are off: the Python stream's context check "
                    "trusts its thread-local")
    dev = pg.open_device("cuda")
    coord = pg.AsyncCoordinator(dev)
    own = None
    try:
        rng = np.random.default_rng(21)
        k = pg.Kernel.from_source(AXPY, "axpy")
        err, cu_dev = driver.cuDeviceGet(0)
        assert err == driver.CUresult.CUDA_SUCCESS
        err, own = driver.cuCtxCreate(None, 0, cu_dev)  # a context of its own
        assert err == driver.CUresult.CUDA_SUCCESS
        n = 4096  # (everything made first: only the queue calls run after the change)
        buf = pg.TripleBuffer(dev, n)
        x, out = pg.pinned_empty(n, np.float32), pg.pinned_empty(n, np.float32)
        coord.register_kernel("axpy", k)
        for i, other in enumerate([driver.CUcontext(0), own] * 3):
            x[:] = rng.standard_normal(n).astype(np.float32)
            out[:] = np.nan
            assert driver.cuCtxSetCurrent(other)[0] == driver.CUresult.CUDA_SUCCESS
            up = coord.queue_upload(x, buf)
            coord.queue_compute("axpy", [up], extra=(2.0, float(i)))
            down = coord.queue_download(buf, out)
            buf.advance()
            coord.wait(down)
            np.testing.assert_allclose(out, 2 * x + i, rtol=1e-6, atol=1e-6)
        # the device's own calls (a new ring's memory) after another context was made
        # current, where its thread-local still names the device
        assert driver.cuCtxSetCurrent(own)[0] == driver.CUresult.CUDA_SUCCESS
        y = rng.standard_normal(1000).astype(np.float32)
        np.testing.assert_allclose(_roundtrip(coord, "axpy", y, extra=(3.0, 1.0)), 3 * y + 1,
                                   rtol=1e-6, atol=1e-6)
    finally:
        coord.close()
        dev.close()
        if own is not None:
            driver.cuCtxDestroy(own)
