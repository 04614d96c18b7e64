"""Regressions found by attacking the core (CPU backend: kernels block on host events)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

import prism_gpu as pg
from _support import F32, affine, rand


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(404)


def test_a_failure_on_a_ring_shared_by_two_coordinators_stays_with_its_owner(
        rng: np.random.Generator) -> None:
    gate = threading.Event()

    def boom(x: np.ndarray) -> None:
        raise ArithmeticError("boom")

    def held(x: np.ndarray) -> None:
        assert gate.wait(30)

    with pg.ManagedGpuContext(backend="cpu", enable_streams=False) as ctx:
        a, b = pg.AsyncCoordinator(ctx.device), pg.AsyncCoordinator(ctx.device)
        a.register_kernel("boom", boom)
        b.register_kernel("held", held)
        shared, other = ctx.create_triple_buffer(4), ctx.create_triple_buffer(4)
        a_bad = a.queue_compute("boom", [a.queue_upload(rand(rng, 4), shared)])
        b_up = b.queue_upload(rand(rng, 4), other)
        b.wait(b_up)                                   # only the held compute stays in flight
        b_held = b.queue_compute("held", [b_up])
        b_down = b.queue_download(shared, np.zeros(4, F32))   # reads what a's op spoiled
        with pytest.raises(pg.DependencyFailedError):
            b.wait(b_down)
        assert not b.is_complete(b_held) and b.in_flight == 1   # b's own op is untouched
        gate.set()
        with pytest.raises(pg.KernelError):
            a.wait(a_bad)                                       # a still reports its failure
        b.wait(b_held)
        assert a.in_flight == 0 and b.in_flight == 0
        a.close()
        b.close()


def test_an_on_done_callback_may_not_queue_or_wait(ctx: pg.ManagedGpuContext,
                                                   rng: np.random.Generator) -> None:
    coord = ctx.async_coordinator()
    buf = ctx.create_triple_buffer(8)
    seen: list = []

    def greedy(report: Any, ms: Any) -> None:
        seen.append(report.op_id)
        coord.queue_compute("noop")        # refused: it would re-enter the harvest

    up = coord.queue_upload(rand(rng, 8), buf, on_done=greedy)
    with pytest.raises(pg.InvalidOperationError, match="on_done"):
        coord.wait(up)
    assert seen == [up]
    assert coord.error(up) is None          # the op itself succeeded and was reported
    out = np.empty(8, F32)
    coord.queue_compute("scale", [up])
    coord.wait(coord.queue_download(buf, out))   # the coordinator works on
    buf.advance()


def test_a_raising_callback_never_breaks_a_pipeline_iteration(rng: np.random.Generator) -> None:
    gate = threading.Event()
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        pipe = ctx.create_pipeline_manager(depth=1)
        b0, b1 = pipe.add_buffer(4), pipe.add_buffer(4)
        coord = pipe.coordinator()
        coord.register_kernel("held", lambda: gate.wait(30))
        coord.register_kernel("affine", affine())
        pipe.add_stage(pg.GpuPipelineStage("s", [b0], [b1], kernel="affine", extra=(2.0, 0.0)))

        def bad(report: Any, ms: Any) -> None:
            raise LookupError("callback bug")

        coord.queue_compute("held", [], args=[], on_done=bad)
        x, y = rand(rng, 4), np.empty(4, F32)
        timer = threading.Timer(0.1, gate.set)
        timer.start()
        it = pipe.execute_iteration(inputs={b0: x}, outputs={b1: y})  # waits in between
        it.wait()
        timer.join()
        coord.compute_stream().synchronize()   # the held op is done, not yet retired
        with pytest.raises(LookupError):     # raised at a safe point: before any change
            pipe.execute_iteration(inputs={b0: x}, outputs={b1: y})
        assert pipe.buffer(b0).get_states() == [pg.BufferState.FREE]
        pipe.execute_iteration(inputs={b0: x}, outputs={b1: y}).wait()
        np.testing.assert_array_equal(y, x * F32(2))
        pipe.close()


def test_a_stage_overwriting_a_fed_buffer_is_rejected(ctx: pg.ManagedGpuContext,
                                                      rng: np.random.Generator) -> None:
    pipe = ctx.create_pipeline_manager()
    b0, b1 = pipe.add_buffer(8), pipe.add_buffer(8)
    pipe.add_stage(pg.GpuPipelineStage("copy", [b0], [b1], kernel="scale"))
    pipe.add_stage(pg.GpuPipelineStage("fill", [], [b0], kernel="noop"))
    with pytest.raises(pg.InvalidOperationError, match="fed as an input"):
        pipe.execute_iteration(inputs={b0: rand(rng, 3)}, outputs={b0: np.empty(8, F32)})
    pipe.close()


def test_waiting_on_an_iteration_after_the_pipeline_closed(ctx: pg.ManagedGpuContext,
                                                           rng: np.random.Generator) -> None:
    pipe = ctx.create_pipeline_manager()
    pipe.coordinator().register_kernel("affine", affine())
    b0, b1 = pipe.add_buffer(8), pipe.add_buffer(8)
    pipe.add_stage(pg.GpuPipelineStage("s", [b0], [b1], kernel="affine", extra=(2.0, 0.0)))
    x, y = rand(rng, 8), np.empty(8, F32)
    it = pipe.execute_iteration(inputs={b0: x}, outputs={b1: y})
    pipe.close()                             # finishes the iteration
    np.testing.assert_array_equal(y, x * F32(2))
    with pytest.raises(pg.InvalidOperationError, match="closed"):
        it.wait()


def test_a_compute_may_list_two_uploads_of_one_buffer_in_any_order(
        coord: pg.AsyncCoordinator, rng: np.random.Generator) -> None:
    """Both uploads are the buffer's oldest: consumed in ring order whatever the order of
    the dependencies, and the kernel gets the arrays in dependency order."""
    got: list = []
    coord.register_kernel("two", pg.Kernel.from_source(
        'extern "C" __global__ void two(float* a, size_t n, float* b, size_t m) {}', "two",
        cpu=lambda a, b: got.append((a.copy(), b.copy()))))
    buf = pg.TripleBuffer(coord.device, 4, depth=4)
    x1, x2 = rand(rng, 4), rand(rng, 4)
    u1, u2 = coord.queue_upload(x1, buf), coord.queue_upload(x2, buf)
    coord.wait(coord.queue_compute("two", [u2, u1]))
    assert buf.get_states()[:2] == [pg.BufferState.PROCESSING] * 2
    if got:  # the CPU backend shows what the kernel saw
        np.testing.assert_array_equal(got[0][0], x2)
        np.testing.assert_array_equal(got[0][1], x1)
    coord.queue_upload(rand(rng, 4), buf)
    u4 = coord.queue_upload(rand(rng, 4), buf)
    with pytest.raises(pg.InvalidDependencyError):   # an older upload is still waiting
        coord.queue_compute("noop", [u4])
