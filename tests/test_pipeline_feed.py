"""Feeding pipelines: run() and execute_iteration(inputs=, outputs=) on every backend."""

from __future__ import annotations

from typing import Any, Iterator, List

import numpy as np
import pytest

import prism_gpu as pg
from _support import F32, affine, doubling_pipeline, rand

N = 1000
# exact in float32 whatever the compiler fuses: the products are powers of two
STAGES = (("pre", 2.0, 1.0), ("main", 0.5, -3.0), ("post", 4.0, 2.0))


def expected(x: np.ndarray) -> np.ndarray:
    y = x.astype(F32).reshape(-1)
    for _, a, b in STAGES:
        y = y * F32(a) + F32(b)
    return y


def three_stages(ctx: pg.ManagedGpuContext, **kw: Any) -> pg.PipelineStageManager:
    """b0 -> pre -> b1 -> main -> b2 -> post -> b3; feed b0, read b3."""
    pipe = ctx.create_pipeline_manager(**kw)
    pipe.coordinator().register_kernel(
        "affine", affine())
    bufs = [pipe.add_buffer(N) for _ in range(4)]
    for i, (name, a, b) in enumerate(STAGES):
        pipe.add_stage(pg.GpuPipelineStage(name, [bufs[i]], [bufs[i + 1]], kernel="affine",
                                           extra=(a, b)))
    return pipe


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(2024)


def test_run_gives_numpy_exact_results_in_order(ctx: pg.ManagedGpuContext,
                                                rng: np.random.Generator) -> None:
    pipe = three_stages(ctx)
    batches = [rand(rng, N) for _ in range(11)] + [rand(rng, 317)]  # a short last batch
    got = [y.copy() for y in pipe.run(iter(batches), input=0, output=3)]
    assert len(got) == len(batches)
    for x, y in zip(batches, got):
        assert y.shape == x.shape
        np.testing.assert_array_equal(y, expected(x))
    stats = pipe.get_stats()
    assert stats.iterations == len(batches)
    assert {"upload", "pre", "main", "post", "download"} <= set(stats.stage_ms)
    pipe.close()


def test_run_takes_2d_pinned_and_pageable_batches(ctx: pg.ManagedGpuContext,
                                                  rng: np.random.Generator) -> None:
    pipe = three_stages(ctx)
    pinned = pg.pinned_empty((10, 100), np.float32, ctx=ctx)
    pinned[:] = rng.random((10, 100), dtype=np.float32)
    batches = [pinned, rng.random((20, 50), dtype=np.float32), pinned[:3]]
    got = [y.copy() for y in pipe.run(batches, input=0, output=3, prefetch=0)]
    for x, y in zip(batches, got):
        assert y.shape == x.shape
        np.testing.assert_array_equal(y.reshape(-1), expected(x))
    pipe.close()


def test_execute_iteration_with_inputs_and_outputs(ctx: pg.ManagedGpuContext,
                                                   rng: np.random.Generator) -> None:
    pipe = three_stages(ctx)
    xs = [rand(rng, N) for _ in range(7)] + [rand(rng, 5)]
    ys = [np.full(x.size, np.nan, F32) for x in xs]
    its = [pipe.execute_iteration(inputs={0: x}, outputs={3: y}) for x, y in zip(xs, ys)]
    assert [it.index for it in its] == list(range(len(xs)))
    for it, x, y in zip(its, xs, ys):
        assert it.wait() is it
        assert it.done()
        np.testing.assert_array_equal(y, expected(x))
    pipe.close()


def test_failure_at_iteration_k_yields_k_results_then_raises(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    k = 5
    calls = {"n": 0}

    def flaky(x: Any, y: Any) -> None:
        i = calls["n"]
        calls["n"] += 1
        if i == k:
            raise ArithmeticError(f"stage failed on iteration {i}")

    pipe = ctx.create_pipeline_manager()
    b0, b1 = pipe.add_buffer(N), pipe.add_buffer(N)
    pipe.add_stage(pg.GpuPipelineStage("flaky", [b0], [b1], kernel=flaky))
    batches = [rand(rng, N) for _ in range(12)]
    got: List[np.ndarray] = []
    with pytest.raises(pg.KernelError) as info:
        for y in pipe.run(batches, input=b0, output=b1):
            got.append(y)
    assert len(got) == k
    assert info.value.batch_index == k  # type: ignore[attr-defined]
    assert "ArithmeticError" in str(info.value)
    pipe.close()  # later iterations' outcomes were settled by run: nothing left to raise


def test_rejected_inputs_change_nothing(ctx: pg.ManagedGpuContext,
                                        rng: np.random.Generator) -> None:
    pipe = three_stages(ctx)
    x, y = rand(rng, N), np.empty(N, F32)
    states = [pipe.buffer(b).get_states() for b in range(4)]
    bad_calls = [
        (pg.TransferError, dict(inputs={0: x.astype(np.float64)}, outputs={3: y})),
        (pg.TransferError, dict(inputs={0: rand(rng, N + 1)}, outputs={3: y})),
        (pg.TransferError, dict(inputs={0: x}, outputs={3: np.empty(N - 1, F32)})),
        (pg.InvalidOperationError, dict(inputs={7: x}, outputs={3: y})),
        (pg.InvalidOperationError, dict(outputs={3: y})),          # b0 is never written
        (TypeError, dict(inputs=[x], outputs={3: y})),
        (pg.TransferError, dict(inputs={0: x}, outputs={3: y[::2]})),
    ]
    for err, kw in bad_calls:
        with pytest.raises(err):
            pipe.execute_iteration(**kw)
        assert [pipe.buffer(b).get_states() for b in range(4)] == states
    it = pipe.execute_iteration(inputs={0: x}, outputs={3: y})
    assert it.index == 0
    it.wait()
    np.testing.assert_array_equal(y, expected(x))
    with pytest.raises(pg.TransferError) as info:
        list(pipe.run([x, x.astype(np.float64)], input=0, output=3))
    assert info.value.batch_index == 1  # type: ignore[attr-defined]
    pipe.close()


def test_run_rejects_bad_arguments_before_pulling(ctx: pg.ManagedGpuContext) -> None:
    pipe = three_stages(ctx)
    pulled = {"n": 0}

    def batches() -> Iterator[np.ndarray]:
        pulled["n"] += 1
        yield np.ones(N, F32)

    for kw, err in ((dict(input=9, output=3), pg.InvalidOperationError),
                    (dict(input="0", output=3), TypeError),
                    (dict(input=0, output=3, prefetch=-1), ValueError)):
        with pytest.raises(err):
            pipe.run(batches(), **kw)  # type: ignore[arg-type]
    assert pulled["n"] == 0
    pipe.close()


def test_stage_names_of_the_copies_are_reserved() -> None:
    for name in ("upload", "download"):
        with pytest.raises(ValueError):
            pg.GpuPipelineStage(name)


def test_stats_window_reference_behind_a_busy_stage_is_waited_for() -> None:
    """After reset_stats() the window's reference is recorded on the first stage's
    stream, which may still be busy while the next upload (on its own stream) lands:
    reporting that upload must wait for the reference, not fail."""
    import threading

    from _support import Latch

    latch = Latch()
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        pipe = ctx.create_pipeline_manager()
        b0, b1 = pipe.add_buffer(64), pipe.add_buffer(64)
        first = {"held": True}

        def stage(x: Any, y: Any) -> None:
            if first["held"]:
                first["held"] = False
                latch.kernel.fn(x, y)        # the first iteration holds the stage stream
            y[...] = x
        pipe.add_stage(pg.GpuPipelineStage("s", [b0], [b1], kernel=stage))
        x = np.ones(64, F32)
        outs = [np.empty(64, F32) for _ in range(3)]
        it0 = pipe.execute_iteration(inputs={b0: x}, outputs={b1: outs[0]})
        pipe.reset_stats()
        it1 = pipe.execute_iteration(inputs={b0: x}, outputs={b1: outs[1]})
        timer = threading.Timer(0.2, latch.release)
        timer.start()
        it2 = pipe.execute_iteration(inputs={b0: x}, outputs={b1: outs[2]})
        for it in (it0, it1, it2):
            it.wait(timeout=10)
        timer.join()
        stats = pipe.get_stats()
        assert stats is not None
        for o in outs:
            np.testing.assert_array_equal(o, x)


def test_run_sizes_a_short_batch_by_what_reaches_the_output() -> None:
    # in(16) -> mid(8) -> out(16): the short length stops at the 8-element buffer, so
    # the output holds 16 valid elements, as execute_iteration says (run sized it 4)
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        pipe = ctx.create_pipeline_manager()
        bi, bm, bo = pipe.add_buffer(16), pipe.add_buffer(8), pipe.add_buffer(16)

        def down(x: np.ndarray, y: np.ndarray) -> None:
            y[:] = np.pad(x, (0, len(y) - len(x))) if len(x) < len(y) else x[:len(y)]

        def up(x: np.ndarray, y: np.ndarray) -> None:
            y[:len(x)] = x
            y[len(x):] = -1

        pipe.add_stage(pg.GpuPipelineStage("down", [bi], [bm],
                                           kernel=pg.Kernel.from_callable(down, "down")))
        pipe.add_stage(pg.GpuPipelineStage("up", [bm], [bo],
                                           kernel=pg.Kernel.from_callable(up, "up")))
        x = np.arange(1, 5, dtype=np.float32)
        (got,) = [r.copy() for r in pipe.run([x], input=bi, output=bo)]
    expect = np.concatenate([x, np.zeros(4, np.float32), np.full(8, -1, np.float32)])
    np.testing.assert_array_equal(got, expect)


def test_a_stage_rewriting_a_buffer_in_place_waits_for_its_earlier_readers() -> None:
    # the in-place stage waited only for the buffer's writer: it overwrote the input while
    # an earlier stage still read it (b came out x*20 instead of x*2, no error)
    import time

    with pg.ManagedGpuContext(backend="cpu") as ctx:
        pipe = ctx.create_pipeline_manager()
        a, b = pipe.add_buffer(4), pipe.add_buffer(4)

        def reader(x: Any, y: Any) -> None:
            time.sleep(0.05)
            np.multiply(x, 2, out=y)

        pipe.add_stage(pg.GpuPipelineStage("reader", [a], [b], kernel=reader))
        pipe.add_stage(pg.GpuPipelineStage("inplace", [a], [a],
                                           kernel=lambda x, y: np.multiply(x, 10, out=y)))
        x = np.random.default_rng().random(4, dtype=np.float32)
        yb, ya = np.zeros(4, np.float32), np.zeros(4, np.float32)
        pipe.execute_iteration(inputs={a: x}, outputs={b: yb, a: ya}).wait()
        np.testing.assert_array_equal(yb, x * np.float32(2))
        np.testing.assert_array_equal(ya, x * np.float32(10))


def test_an_upload_of_another_api_into_a_pipeline_buffer_is_refused_before_queueing() -> None:
    # an iteration queued its upload, then failed in produce(): each refused call left
    # slots stuck in processing and the pipeline never recovered; on an input ring it took
    # the other API's upload as its own
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        pipe, a, b = doubling_pipeline(ctx, 16)
        coord = pipe.coordinator()
        x = np.random.default_rng().random(16, dtype=np.float32)
        y = np.empty(16, np.float32)
        pipe.execute_iteration(inputs={a: x}, outputs={b: y}).wait()
        for ring in (b, a):
            up = coord.queue_upload(np.ones(16, np.float32), pipe.buffer(ring))
            states = [pipe.buffer(i).get_states() for i in (a, b)]
            issued = coord.statistics().issued
            for _ in range(3):
                with pytest.raises(pg.InvalidOperationError, match="another API"):
                    pipe.execute_iteration(inputs={a: x}, outputs={b: y})
            assert [pipe.buffer(i).get_states() for i in (a, b)] == states
            assert coord.statistics().issued == issued  # nothing was queued
            coord.queue_compute("noop", [up], args=[])  # the other API finishes its use
            coord.queue_download(pipe.buffer(ring), np.empty(16, np.float32))
            pipe.buffer(ring).advance()
            y[:] = 0
            pipe.execute_iteration(inputs={a: x}, outputs={b: y}).wait()
            np.testing.assert_array_equal(y, x * np.float32(2))


def test_stage_and_launch_records_are_checked_when_made() -> None:
    # a stage naming a missing buffer or kernel=3 was accepted and broke every later
    # iteration; a stage edited after add_stage changed the pipeline unchecked; launch
    # sizes no GPU takes ran on the CPU backend
    with pytest.raises(TypeError, match="kernel"):
        pg.GpuPipelineStage("s", [0], [], kernel=3)
    for bad in (dict(grid=2**31), dict(grid=(1, 65536)), dict(block=1025),
                dict(block=(32, 32, 2)), dict(block=(1, 1, 65)), dict(shared_mem_bytes=2**32)):
        with pytest.raises(ValueError):
            pg.LaunchConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grid"):
        pg.LaunchConfig.for_elements(2**80)
    assert pg.LaunchConfig(grid=(2**31 - 1, 65535, 65535), block=(1024, 1, 1)).block[0] == 1024
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        pipe = ctx.create_pipeline_manager()
        a, b = pipe.add_buffer(8), pipe.add_buffer(8)
        with pytest.raises(pg.InvalidOperationError, match="add_buffer"):
            pipe.add_stage(pg.GpuPipelineStage("bad", [a], [7]))
        st = pg.GpuPipelineStage("s", [a], [b], kernel=lambda x, y: np.multiply(x, 2, out=y))
        pipe.add_stage(st)
        st.name, st.input_buffers = "upload", [5]  # edits of the caller's object
        x = np.random.default_rng().random(8, dtype=np.float32)
        (r,) = [y.copy() for y in pipe.run([x], input=a, output=b)]
        np.testing.assert_array_equal(r, x * np.float32(2))
        assert set(pipe.get_stats().stage_ms) >= {"s"}
        with pytest.raises(MemoryError, match="float32"):
            pipe.add_buffer(2**44)


def test_a_step_wait_timeout_bounds_the_whole_wait() -> None:
    # each of the three ops got the whole timeout: up to three times as long
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        x = np.ones(8, np.float32)
        tels = [ctx.triple_buffered_step(pg.StepConfig(kernel="spin", input=x,
                                                       output=np.empty(8, np.float32),
                                                       extra=(100_000.0,)))
                for _ in range(3)]
        calls: List[Any] = []
        coord = ctx.async_coordinator()
        real = coord.wait

        def recording(op: Any, timeout: Any = None) -> None:
            calls.append(timeout)
            real(op, timeout)

        coord.wait = recording  # type: ignore[method-assign]
        with pytest.raises(pg.SynchronizationError):
            tels[2].wait(timeout=0.05)
        assert calls and all(t is not None and t <= 0.05 for t in calls)
        assert len(calls) == 1 or calls[-1] < calls[0]  # what is left, not 0.05 again
        coord.wait = real  # type: ignore[method-assign]
        ctx.async_coordinator().synchronize_all()


def test_a_cpu_stage_writing_a_buffer_it_only_reads_fails_loudly() -> None:
    # a stage declared ([a], []) that scaled a in place raced the download of a: the
    # result was sometimes scaled, sometimes not (about 1 run in 10), with no error; on
    # the CPU backend an input-only buffer now reaches the kernel read-only
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        pipe = ctx.create_pipeline_manager()
        a = pipe.add_buffer(8)
        pipe.add_stage(pg.GpuPipelineStage("s", [a], [], kernel="scale"))
        x = np.arange(8, dtype=np.float32)
        with pytest.raises(pg.KernelError, match="read-only"):
            list(pipe.run([x], input=a, output=a))
    with pg.ManagedGpuContext(backend="cpu") as ctx:  # declared in place: it may write
        pipe = ctx.create_pipeline_manager()
        a = pipe.add_buffer(8)
        pipe.add_stage(pg.GpuPipelineStage("s", [a], [a],
                                           kernel=lambda x, y: np.multiply(x, 2, out=y)))
        (r,) = [y.copy() for y in pipe.run([x], input=a, output=a)]
        np.testing.assert_array_equal(r, x * 2)
