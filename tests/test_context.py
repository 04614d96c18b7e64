"""ManagedGpuContext: what it owns, triple_buffered_step, close, and backend selection."""

from __future__ import annotations

from typing import Any, List

import numpy as np
import pytest

import prism_gpu as pg
from _support import F32, device_view, make_latch, rand, release_timer
from prism_gpu.backends import cuda_unavailable_reason


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(77)


def test_coordinator_accessors(ctx: pg.ManagedGpuContext) -> None:
    coord = ctx.async_coordinator()
    assert isinstance(coord, pg.AsyncCoordinator)
    assert ctx.async_coordinator_mut() is coord
    assert ctx.async_coordinator() is coord
    assert ctx.device is not None


def test_enable_streams_false(backend: str) -> None:
    with pg.ManagedGpuContext(enable_streams=False, backend=backend) as ctx:
        assert ctx.async_coordinator() is None
        assert ctx.async_coordinator_mut() is None
        x = np.ones(4, F32)
        with pytest.raises(pg.InvalidOperationError, match="enable_streams"):
            ctx.triple_buffered_step(pg.StepConfig(kernel="scale", input=x, output=x.copy()))


def test_create_triple_buffer(ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    buf = ctx.create_triple_buffer(2048, dtype=np.float32)
    assert isinstance(buf, pg.TripleBuffer)
    assert buf.size() == 2048
    assert buf.get_states() == [pg.BufferState.FREE] * 3
    coord = ctx.async_coordinator()
    x, out = rand(rng, 2048), np.empty(2048, F32)
    up = coord.queue_upload(x, buf)
    coord.queue_compute("scale", [up])
    coord.wait(coord.queue_download(buf, out))
    np.testing.assert_array_equal(out, x * F32(2))


def test_triple_buffered_step(timed_ctx: pg.ManagedGpuContext,
                              rng: np.random.Generator) -> None:
    x = rand(rng, 1000)
    y = np.full(1000, np.nan, dtype=F32)
    tel = timed_ctx.triple_buffered_step(pg.StepConfig(kernel="scale", input=x, output=y))
    assert isinstance(tel, pg.StepTelemetry)
    assert tel.wait() is tel
    assert tel.done()
    np.testing.assert_array_equal(y, x * F32(2))
    for ms in (tel.upload_ms, tel.compute_ms, tel.download_ms):
        assert isinstance(ms, float) and ms >= 0


def test_a_context_times_nothing_by_default(ctx: pg.ManagedGpuContext,
                                            rng: np.random.Generator) -> None:
    """As a coordinator of its own: untimed unless made with ``timing=True``."""
    assert ctx.async_coordinator().timing is False
    x, y = rand(rng, 1000), np.full(1000, np.nan, dtype=F32)
    tel = ctx.triple_buffered_step(pg.StepConfig(kernel="scale", input=x, output=y)).wait()
    np.testing.assert_array_equal(y, x * F32(2))
    assert (tel.upload_ms, tel.compute_ms, tel.download_ms) == (None, None, None)


def test_many_steps_of_varying_size(ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    """More steps than ring slots, without waiting in between; a larger batch grows the ring."""
    sizes = [100, 100, 100, 100, 37, 300, 1, 300, 100]
    jobs = []
    for n in sizes:
        x, y = rand(rng, n), np.full(n, np.nan, dtype=F32)
        jobs.append((x.copy(), y, ctx.triple_buffered_step(
            pg.StepConfig(kernel="scale", input=x, output=y))))
    for x, y, tel in jobs:
        tel.wait()
        np.testing.assert_array_equal(y, x * F32(2))


def test_step_with_a_callable_kernel(ctx: pg.ManagedGpuContext,
                                     rng: np.random.Generator) -> None:
    def add(a: Any, k: int) -> None:
        v = device_view(a)
        np.add(v, F32(k), out=v)

    x, y = rand(rng, 64), np.empty(64, F32)
    ctx.triple_buffered_step(pg.StepConfig(kernel=add, input=x, output=y, extra=(5,))).wait()
    np.testing.assert_array_equal(y, x + F32(5))


def test_step_rejects_bad_input_before_queueing(ctx: pg.ManagedGpuContext,
                                                rng: np.random.Generator) -> None:
    x = rand(rng, 64)
    coord = ctx.async_coordinator()
    issued = coord.statistics().issued
    with pytest.raises(pg.TransferError):
        ctx.triple_buffered_step(pg.StepConfig(kernel="scale", input=x, output=np.empty(63, F32)))
    with pytest.raises(pg.PrismGpuError, match="nope"):
        ctx.triple_buffered_step(pg.StepConfig(kernel="nope", input=x, output=np.empty(64, F32)))
    assert coord.statistics().issued == issued


def test_close_waits_for_work_in_flight(backend: str, rng: np.random.Generator,
                                        no_thread_leaks: None) -> None:
    latch = make_latch(backend)
    ctx = pg.ManagedGpuContext(backend=backend)
    with release_timer(latch) as timer:
        try:
            ctx.async_coordinator().register_kernel("latch", latch.kernel)
            ctx.async_coordinator().queue_compute("latch")
            x, y = rand(rng, 256), np.full(256, np.nan, dtype=F32)
            ctx.triple_buffered_step(pg.StepConfig(kernel="scale", input=x, output=y))
            assert latch.held
            timer.start()
            ctx.close()
            assert latch.finished
            np.testing.assert_array_equal(y, x * F32(2))
        finally:
            latch.release()
            ctx.close()


def test_close_is_idempotent_and_final(backend: str, no_thread_leaks: None) -> None:
    ctx = pg.ManagedGpuContext(backend=backend)
    ctx.create_triple_buffer(16)
    ctx.create_pipeline_manager()
    ctx.close()
    ctx.close()
    x = np.ones(4, F32)
    calls: List[Any] = [
        ctx.async_coordinator, ctx.async_coordinator_mut, lambda: ctx.create_triple_buffer(16),
        ctx.create_pipeline_manager,
        lambda: ctx.triple_buffered_step(pg.StepConfig(kernel="scale", input=x, output=x.copy())),
    ]
    for call in calls:
        with pytest.raises(pg.InvalidOperationError):
            call()


def test_context_manager_closes(backend: str, no_thread_leaks: None) -> None:
    with pg.ManagedGpuContext(backend=backend) as ctx:
        ctx.create_triple_buffer(16)
    with pytest.raises(pg.InvalidOperationError):
        ctx.async_coordinator()


# --- backend selection -------------------------------------------------------------------

def test_backend_cpu() -> None:
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        assert ctx.backend == "cpu"


def test_env_var_overrides_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRISM_GPU_BACKEND", "cpu")
    with pg.ManagedGpuContext(backend="auto") as ctx:
        assert ctx.backend == "cpu"
    monkeypatch.setenv("PRISM_GPU_BACKEND", "tpu")
    with pytest.raises(ValueError, match="PRISM_GPU_BACKEND"):
        pg.ManagedGpuContext(backend="auto")


def test_env_var_cuda_where_cuda_is_unusable(monkeypatch: pytest.MonkeyPatch) -> None:
    if cuda_unavailable_reason() is None:
        pytest.skip("CUDA is usable here")
    monkeypatch.setenv("PRISM_GPU_BACKEND", "cuda")
    with pytest.raises(pg.BackendUnavailableError):
        pg.ManagedGpuContext(backend="auto")


@pytest.mark.parametrize("name", ["gpu", "CUDA", "", None])
def test_invalid_backend_name(name: Any) -> None:
    with pytest.raises(ValueError):
        pg.ManagedGpuContext(backend=name)


def test_cuda_unusable_says_why_and_how_to_fix() -> None:
    reason = cuda_unavailable_reason()
    if reason is None:
        pytest.skip("CUDA is usable here")
    with pytest.raises(pg.BackendUnavailableError) as info:
        pg.ManagedGpuContext(backend="cuda")
    msg = str(info.value)
    assert reason in msg
    assert any(fix in msg for fix in ('pip install "prism-gpu[cuda]"', "driver", "nvidia-smi",
                                      "CUDA_VISIBLE_DEVICES")), msg


def test_device_that_does_not_exist(backend: str) -> None:
    with pytest.raises(pg.BackendUnavailableError, match="99"):
        pg.ManagedGpuContext(device=99, backend=backend)
