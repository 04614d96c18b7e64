"""Findings of a hostile review of the core (coordinator, callbacks, traces, arguments),
each a regression test: failures that could be lost, grow, hang or mask another."""

from __future__ import annotations

import gc
import weakref
from typing import Any, List

import numpy as np
import pytest

import prism_gpu as pg
from prism_gpu import _core
from _support import Boom, affine, boom, doubling_pipeline, refusal_recorder


def _failed_op(coord: pg.AsyncCoordinator) -> Any:
    op = coord.queue_compute(boom, [], args=[])
    with pytest.raises(pg.KernelError):
        coord.wait(op)
    return op


def test_waiting_again_on_a_failed_op_grows_nothing_and_keeps_no_caller_memory(
        coord: pg.AsyncCoordinator) -> None:
    op = _failed_op(coord)

    def waiter() -> "weakref.ref[np.ndarray]":
        big = np.ones(1 << 20, np.float32)
        try:
            coord.wait(op)
        except pg.KernelError:
            pass
        return weakref.ref(big)

    depth = []
    for _ in range(2000):
        try:
            coord.wait(op)
        except pg.KernelError as exc:
            n, tb = 0, exc.__traceback__
            while tb is not None:
                n, tb = n + 1, tb.tb_next
            depth.append(n)
            assert isinstance(exc.__cause__, Boom)  # the kernel's own error stays its cause
            del exc
    assert max(depth) == depth[0]  # every raise starts afresh: no chain that grows
    ref = waiter()
    gc.collect()
    assert ref() is None  # the kept failure holds none of the caller's frames


def test_poll_keeps_a_kernel_failure_when_a_callback_raises(
        coord: pg.AsyncCoordinator) -> None:
    def bad_callback(report: Any, ms: Any) -> None:
        raise ValueError("callback")

    coord.queue_compute(boom, [], args=[])
    coord.queue_compute("noop", [], args=[], on_done=bad_callback)
    coord.compute_stream().synchronize()
    with pytest.raises(ValueError, match="callback"):
        coord.poll()
    with pytest.raises(pg.KernelError):  # the kernel's failure still reaches the caller
        coord.synchronize_all()


def test_a_base_exception_from_on_done_leaves_the_op_recorded(
        coord: pg.AsyncCoordinator) -> None:
    def interrupt(report: Any, ms: Any) -> None:
        raise KeyboardInterrupt

    op = coord.queue_compute(boom, [], args=[], on_done=interrupt)
    coord.compute_stream().synchronize()
    with pytest.raises(KeyboardInterrupt):
        coord.poll()
    assert isinstance(coord.error(op), pg.KernelError)
    with pytest.raises(pg.KernelError):
        coord.wait(op)
    assert coord.statistics().in_flight == 0


def test_close_from_a_callback_or_a_kernel_thread_is_refused(backend: str) -> None:
    coord = pg.AsyncCoordinator(pg.open_device(backend))
    seen: List[BaseException] = []

    op = coord.queue_compute("noop", [], args=[], on_done=refusal_recorder(coord.close, seen))
    coord.wait(op)
    assert len(seen) == 1 and not coord.closed
    if backend == "cpu":  # CPU kernels run on the stream's thread: close from there
        def kernel_closing() -> None:
            coord.close()

        op = coord.queue_compute(kernel_closing, [], args=[])
        with pytest.raises(pg.KernelError, match="thread"):
            coord.wait(op)  # refused (no deadlock), and the op reports it
    assert not coord.closed
    ok = coord.queue_compute("noop", [], args=[])
    coord.wait(ok)
    coord.close()  # its failure was reported by wait: not again
    assert coord.closed


@pytest.mark.parametrize("nested", ["queue", "wait", "close", "poll", "synchronize_all"])
def test_a_kernel_cannot_reenter_its_coordinator(backend: str, nested: str) -> None:
    dev = pg.open_device(backend)
    coord = pg.AsyncCoordinator(dev)
    buf = pg.TripleBuffer(dev, 16)
    first = coord.queue_compute("noop", [], args=[])
    coord.wait(first)

    def reenter() -> None:
        if nested == "queue":
            coord.queue_upload(np.ones(16, np.float32), buf)
        elif nested == "wait":
            coord.wait(first)
        elif nested == "close":
            coord.close()
        else:
            getattr(coord, nested)()  # would take the reports of the call running it

    # CUDA runs a callable inside queue_compute, which refuses the nested call there (it
    # would have reused the op id being queued, or closed the streams under it); the CPU
    # backend runs it on the stream's thread, where the thread guard refuses it
    with pytest.raises((pg.InvalidOperationError, pg.KernelError),
                       match="a kernel may not|thread"):
        coord.wait(coord.queue_compute(reenter, [], args=[]))
    assert not coord.closed
    assert buf.get_states() == [pg.BufferState.FREE] * 3  # the nested upload took no slot
    up = coord.queue_upload(np.arange(16, dtype=np.float32), buf)  # still fully usable
    coord.queue_compute("scale", [up], extra=(2.0,))
    out = np.full(16, np.nan, np.float32)
    coord.wait(coord.queue_download(buf, out))
    buf.advance()
    np.testing.assert_array_equal(out, np.arange(16, dtype=np.float32) * 2)
    coord.close()
    dev.close()


def test_leaving_a_trace_keeps_the_exception_of_the_block() -> None:
    ctx = pg.ManagedGpuContext(backend="cpu")
    coord = pg.AsyncCoordinator(ctx)
    with pytest.raises(KeyError, match="the block's own"):
        with pg.trace():
            coord.queue_compute("noop", [], args=[])
            ctx.close()  # the trace cannot finish cleanly now
            raise KeyError("the block's own")
    coord.close_collecting()


@pytest.mark.parametrize("timeout", [1e20, 2.0 ** 64, 1e300, float("inf")])
def test_huge_timeouts_mean_no_limit(coord: pg.AsyncCoordinator, timeout: float) -> None:
    op = coord.queue_compute("noop", [], args=[])
    coord.wait(op, timeout=timeout)
    assert coord.is_complete(op)


def test_launch_config_and_trace_save_check_their_arguments(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="block"):
        pg.LaunchConfig.for_elements(4, block=0)
    with pytest.raises(TypeError, match="n must be an int"):
        pg.LaunchConfig.for_elements(float("inf"))
    assert pg.LaunchConfig.for_elements(np.int64(1000)).grid == (4, 1, 1)
    with pg.trace() as tr:
        pass
    with pytest.raises(TypeError, match="path"):
        tr.save(1)  # type: ignore[arg-type]  # a file descriptor: never written and closed
    tr.save(tmp_path / "t.json")
    assert (tmp_path / "t.json").read_text().startswith("{")


def test_a_closed_ring_refuses_computes_and_downloads_before_queueing(
        backend: str) -> None:
    with pg.ManagedGpuContext(backend=backend) as ctx:
        coord = ctx.async_coordinator()
        assert coord is not None
        buf = ctx.create_triple_buffer(8)
        up = coord.queue_upload(np.arange(8, dtype=np.float32), buf)
        coord.wait(up)
        buf.close()
        issued = coord.statistics().issued
        with pytest.raises(pg.InvalidOperationError, match="closed"):
            coord.queue_compute("scale", [up])
        with pytest.raises(pg.InvalidOperationError, match="closed"):
            coord.queue_download(buf, np.empty(8, np.float32))
        assert coord.statistics().issued == issued  # nothing was queued
        coord.synchronize_all()


def test_an_iteration_refused_in_a_callback_takes_no_slot(backend: str) -> None:
    with pg.ManagedGpuContext(backend=backend) as ctx:
        coord = ctx.async_coordinator()
        assert coord is not None
        pipe = pg.PipelineStageManager(coord, depth=1)
        b0, b1 = pipe.add_buffer(4), pipe.add_buffer(4)
        pipe.add_stage(pg.GpuPipelineStage("s", [b0], [b1], kernel=affine(),
                                           extra=(2.0, 0.0)))
        x = np.random.default_rng().standard_normal(4).astype(np.float32)
        refused: List[BaseException] = []

        def callback(report: Any, ms: Any) -> None:
            try:
                pipe.execute_iteration(inputs={b0: x})
            except pg.InvalidOperationError as exc:
                refused.append(exc)

        coord.wait(coord.queue_compute("noop", [], args=[], on_done=callback))
        assert len(refused) == 1
        assert pipe.buffer(b0).get_states() == [pg.BufferState.FREE]
        for _ in range(3):  # the depth-1 ring still works
            y = np.zeros(4, np.float32)
            pipe.execute_iteration(inputs={b0: x}, outputs={b1: y}).wait()
            np.testing.assert_array_equal(y, x * np.float32(2))
        pipe.close()


def test_every_callback_error_reaches_the_caller(backend: str) -> None:
    def raiser(tag: str) -> Any:
        def callback(report: Any, ms: Any) -> None:
            raise ValueError(tag)
        return callback

    # two in one harvest: both, as a group
    coord = pg.AsyncCoordinator(pg.open_device(backend))
    coord.queue_compute("noop", [], args=[], on_done=raiser("a"))
    coord.queue_compute("noop", [], args=[], on_done=raiser("b"))
    coord.compute_stream().synchronize()
    with pytest.raises(ExceptionGroup) as info:
        coord.poll()
    assert sorted(str(e) for e in info.value.exceptions) == ["a", "b"]
    coord.poll()  # raised once: not again
    # one run by close itself: raised by close
    coord.queue_compute("noop", [], args=[], on_done=raiser("at close"))
    with pytest.raises(ValueError, match="at close"):
        coord.close()
    # behind a kernel failure raised first: still raised, by close
    coord = pg.AsyncCoordinator(pg.open_device(backend))
    coord.queue_compute(boom, [], args=[])
    coord.queue_compute("noop", [], args=[], on_done=raiser("behind"))
    coord.compute_stream().synchronize()
    with pytest.raises(pg.KernelError):
        coord.synchronize_all()
    with pytest.raises(ValueError, match="behind"):
        coord.close()


def test_kernel_defaults_and_report_backlog_are_checked() -> None:
    with pytest.raises(TypeError, match="defaults"):
        pg.Kernel.from_callable(lambda a: None, defaults=5)  # type: ignore[arg-type]
    assert pg.Kernel.from_callable(lambda a: None, defaults=[2.0]).defaults == (2.0,)
    with pytest.raises(ValueError, match="report_backlog"):
        pg.AsyncCoordinator(pg.open_device("cpu"), report_backlog=2 ** 70)


def test_an_absurd_depth_is_refused_before_anything_is_allocated(backend: str) -> None:
    with pg.ManagedGpuContext(backend=backend) as ctx:
        for make in (lambda d: ctx.create_triple_buffer(8, depth=d),
                     lambda d: ctx.create_pipeline_manager(depth=d),
                     lambda d: pg.stream_map("noop", [np.ones(8, np.float32)], ctx=ctx,
                                             depth=d)):
            with pytest.raises(ValueError, match="depth must be <= 1024"):
                make(10 ** 12)
        buf = ctx.create_triple_buffer(8, depth=1024)  # the largest allowed still works
        assert buf.depth == 1024
        buf.close()


def test_a_dependency_failure_raised_again_is_a_fresh_copy(coord: pg.AsyncCoordinator) -> None:
    root = coord.queue_compute(boom, [], args=[])
    dep = coord.queue_compute("noop", [root], args=[])
    with pytest.raises(pg.DependencyFailedError):
        coord.wait(dep)
    kept = coord.error(dep)
    assert isinstance(kept, pg.DependencyFailedError)
    raised = []
    for _ in range(3):
        with pytest.raises(pg.DependencyFailedError) as info:
            coord.wait(dep)
        raised.append(info.value)
    assert all(e is not kept and e.root_op == kept.root_op for e in raised)
    assert all(str(e) == str(kept) for e in raised)
    assert kept.__traceback__ is None  # the kept one never took a caller's frames
    coord.synchronize_all()  # the root counts as reported through its dependent


@pytest.mark.parametrize("dtype", [np.int32, np.float64])
def test_builtin_scale_takes_float32_on_every_backend(backend: str, dtype: Any) -> None:
    # the CPU version multiplied any dtype (int32 by 2.5 gave x2); CUDA's kernel is
    # float*: both refuse now (CUDA at the queue call, the CPU when the op runs)
    dev = pg.open_device(backend)
    coord = pg.AsyncCoordinator(dev)
    buf = pg.TripleBuffer(dev, 8, dtype=dtype)
    up = coord.queue_upload(np.arange(8, dtype=dtype), buf)
    with pytest.raises(pg.KernelError, match="float"):
        coord.wait(coord.queue_compute("scale", [up], extra=(2.5,)))
    coord.close_collecting()
    dev.close()


@pytest.mark.parametrize("us, error", [(float("inf"), ValueError), (float("nan"), ValueError),
                                       (-1.0, ValueError), (1e12, ValueError),
                                       pytest.param(10 ** 400, ValueError, id="huge-int"),
                                       ("5", TypeError),
                                       (True, TypeError), (None, TypeError)])
def test_spin_refuses_a_duration_the_device_could_not_end(backend: str, us: Any,
                                                           error: Any) -> None:
    # an infinite, NaN or negative spin ran the CUDA kernel for ever (the device cannot
    # be interrupted); each is refused when queued, on every backend, queueing nothing
    dev = pg.open_device(backend)
    coord = pg.AsyncCoordinator(dev)
    with pytest.raises(error, match="spin"):
        coord.queue_compute("spin", [], extra=(us,))
    with pytest.raises(error, match="spin"):
        coord.queue_compute("spin", [], args=[us])
    pipe = pg.PipelineStageManager(coord)
    b = pipe.add_buffer(8)
    pipe.add_stage(pg.GpuPipelineStage("s", [], [b], kernel="spin", extra=(us,)))
    with pytest.raises(error, match="spin"):
        pipe.execute_iteration()
    assert coord.in_flight == 0
    coord.wait(coord.queue_compute("spin", [], extra=(1.0,)))  # a finite spin runs
    from fractions import Fraction

    for ok in (Fraction(1, 2), np.float32(3), 0):  # real numbers, as before
        coord.wait(coord.queue_compute("spin", [], extra=(ok,)))
    pipe.close()
    coord.close_collecting()
    dev.close()


def test_a_kernel_check_sees_the_values_after_the_arrays(coord: pg.AsyncCoordinator) -> None:
    seen: List[Any] = []
    k = pg.Kernel("k", fn=lambda *a: None, defaults=(3,), check=seen.append)
    buf = pg.TripleBuffer(coord.device, 4)
    up = coord.queue_upload(np.ones(4, np.float32), buf)
    coord.wait(coord.queue_compute(k, [up]))
    coord.wait(coord.queue_compute(k, [], args=[7, 8]))
    assert [tuple(v) for v in seen] == [(3,), (7, 8)]
    with pytest.raises(TypeError, match="check"):
        pg.Kernel("k", fn=lambda: None, check=5)  # type: ignore[arg-type]


def test_shapes_and_dtypes_are_checked_by_name() -> None:
    # an integer array shape, a sub-array dtype and 100 dimensions gave numpy's own
    # errors naming neither argument; an output spec of floats or bools was truncated
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        assert ctx.empty_device(np.array([2, 3]), np.float32).shape == (2, 3)
        assert pg.pinned_empty(np.array([4]), np.float32, ctx=ctx).shape == (4,)
        with pytest.raises(TypeError, match="sub-array"):
            ctx.empty_device(3, "(2,)f4")
        with pytest.raises(ValueError, match="dimensions"):
            ctx.empty_device((1,) * 100, np.float32)
        with pytest.raises(TypeError, match="not a numpy dtype"):
            ctx.empty_device(3, "float32 ")
        x = np.arange(16, dtype=np.float32)
        for spec in [((2.9,), np.float32), ((4.0, 2.5), np.float32), ((True,), np.float32),
                     ("16", np.float32), ((16,), "float32 "), (16,)]:
            with pytest.raises(TypeError, match="output"):
                pg.stream_map(lambda a, b: None, [x], ctx=ctx, output=spec)
        with pytest.raises(ValueError, match="output"):
            pg.stream_map(lambda a, b: None, [x], ctx=ctx, output=((-1,), np.float32))


def test_use_stream_takes_only_a_prism_gpu_stream(coord: pg.AsyncCoordinator) -> None:
    # anything was accepted and silently switched nothing (a CuPy or PyTorch stream too)
    for wrong in (5, None, object(), "stream"):
        with pytest.raises(TypeError, match="prism-gpu stream"):
            with pg.interop.use_stream(wrong):
                pass
    with pg.interop.use_stream(coord.compute_stream()) as s:
        assert s is coord.compute_stream()


@pytest.mark.parametrize("second", ["callback", "kernel"])
def test_an_interrupt_from_a_callback_is_raised_with_the_other_failures(second: str) -> None:
    # close() raised ValueError (an empty group) for two SystemExits, and dropped a
    # KeyboardInterrupt grouped with a kernel failure
    coord = pg.AsyncCoordinator(pg.open_device("cpu"))

    def stop(report: Any, ms: Any) -> None:
        raise KeyboardInterrupt("from on_done")

    coord.queue_compute("noop", [], args=[], on_done=stop)
    if second == "kernel":
        coord.queue_compute(boom, [], args=[])
    else:
        coord.queue_compute("noop", [], args=[], on_done=stop)
    with pytest.raises(BaseExceptionGroup) as info:
        coord.close()
    kinds = {type(e) for e in info.value.exceptions}
    assert KeyboardInterrupt in kinds and len(info.value.exceptions) == 2
    assert not isinstance(info.value, ExceptionGroup)  # an interrupt is not an Exception


def test_an_interrupt_while_closing_one_stream_still_closes_the_others() -> None:
    # a second Ctrl-C landing in one stream's join skipped the other streams' stop: their
    # threads ran for good
    import threading

    dev = pg.open_device("cpu")
    before = threading.active_count()
    coord = pg.AsyncCoordinator(dev)
    coord.wait(coord.queue_compute("noop", [], args=[]))
    lanes = coord._engine.lanes
    assert len(lanes) >= 3
    first = lanes[0].stream
    real_close = first.close

    def interrupted_close() -> None:
        real_close()
        raise KeyboardInterrupt

    first.close = interrupted_close  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            coord.close()
    finally:
        first.close = real_close  # type: ignore[method-assign]
    assert coord.closed
    assert threading.active_count() <= before  # every stream's thread stopped
    dev.close()


def test_an_op_torn_out_of_the_table_by_an_interrupt_does_not_break_completion() -> None:
    # a Ctrl-C between an op's two table entries in submit made synchronize_all raise
    # KeyError for ever
    coord = pg.AsyncCoordinator(pg.open_device("cpu"))
    op = coord.queue_compute("noop", [], args=[])
    del coord._engine.inflight[int(op)]  # the state such an interrupt leaves
    coord.synchronize_all()
    coord.wait(coord.queue_compute("noop", [], args=[]))
    coord.close()


def test_generator_and_async_kernels_are_refused(coord: pg.AsyncCoordinator) -> None:
    # they "ran" and did nothing (the async one only warned that it was never awaited)
    def gen(x: Any) -> Any:
        yield x

    async def coro(x: Any) -> None:
        x += 1

    class GenCall:
        def __call__(self, x: Any) -> Any:
            yield x

    for k in (gen, coro, GenCall()):
        with pytest.raises(TypeError, match="generator or async"):
            coord.queue_compute(k, [], args=[np.ones(2, np.float32)])
        with pytest.raises(TypeError, match="generator or async"):
            pg.stream_map(k, [np.ones(2, np.float32)])
    assert coord.in_flight == 0


def _in_thread(fn: Any) -> BaseException:
    import threading

    got: List[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            got.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert not t.is_alive() and got, "the call from another thread was not refused"
    return got[0]


def test_a_context_or_pipeline_is_changed_only_from_its_own_thread() -> None:
    # ctx.close() from another thread raced the owner (a bare RuntimeError from deep in
    # the engine in half the trials); a stage added from another thread mid-run changed
    # the results silently
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        pipe, a, b = doubling_pipeline(ctx, 8)
        for call in (ctx.close, pipe.close, pipe.reset_stats, pipe.get_stats,
                     lambda: pipe.add_buffer(8),
                     lambda: pipe.add_stage(pg.GpuPipelineStage("t", [a], [], kernel="noop")),
                     lambda: pipe.set_order([0])):
            err = _in_thread(call)
            assert isinstance(err, pg.InvalidOperationError) and "thread" in str(err)
        assert not ctx.closed
        x = np.arange(8, dtype=np.float32)
        (r,) = [y.copy() for y in pipe.run([x], input=a, output=b)]
        np.testing.assert_array_equal(r, x * 2)  # one stage: nothing was added


@pytest.mark.parametrize("call", ["upload", "download"])
@pytest.mark.skipif(_core.COMPILED, reason="the compiled queue calls reserve the slot and read "
                    "its memory in one hold of the interpreter lock: no other thread can close "
                    "the ring between them (this runs with PRISM_GPU_COMPILED=0)")
def test_a_ring_closed_by_another_thread_mid_call_is_refused_cleanly(call: str) -> None:
    # the ring is thread-safe, but a close landing between a call's reservation and its
    # read of the slot's memory gave a TypeError, or an op queued on no memory that
    # failed later with an AttributeError; the window is forced here
    coord = pg.AsyncCoordinator(pg.open_device("cpu"))
    buf = pg.TripleBuffer(coord.device, 64)
    x = np.random.default_rng().random(64, dtype=np.float32)
    if call == "download":
        coord.queue_compute("noop", [coord.queue_upload(x, buf)])
    name = "take" if call == "upload" else "peek"
    real = getattr(buf, name)

    def then_closed(*args: Any) -> Any:
        slot = real(*args)
        buf.close()
        return slot

    setattr(buf, name, then_closed)
    before = coord.in_flight
    with pytest.raises(pg.InvalidOperationError, match="closed"):
        if call == "upload":
            coord.queue_upload(x, buf)
        else:
            coord.queue_download(buf, np.empty(64, np.float32))
    coord.synchronize_all()
    assert coord.in_flight <= before
    coord.close()


def test_a_stream_map_iterator_moved_to_another_thread_says_so() -> None:
    # it failed as "batch 1 failed: AsyncCoordinator is not thread-safe ..." (a batch
    # blamed, a coordinator the user never made)
    it = pg.stream_map("scale", [np.ones(4, np.float32) for _ in range(6)], backend="cpu")
    np.testing.assert_array_equal(next(it), np.full(4, 2, np.float32))
    err = _in_thread(lambda: next(it))
    assert isinstance(err, pg.InvalidOperationError) and "started on another thread" in \
        str(err) and not hasattr(err, "batch_index")


def test_objects_whose_thread_ended_may_be_closed_from_another() -> None:
    # made in a set-up thread that has finished: their close was refused for ever
    import threading

    made: List[Any] = []

    def setup() -> None:
        ctx = pg.ManagedGpuContext(backend="cpu")
        made.extend([ctx, ctx.create_pipeline_manager(),
                     pg.AsyncCoordinator(pg.open_device("cpu"))])

    t = threading.Thread(target=setup)
    t.start()
    t.join(30)
    ctx, pipe, coord = made
    with pytest.raises(pg.InvalidOperationError, match="PipelineStageManager is not"):
        pipe.add_buffer(8)  # use is still refused: only closing is safe
    pipe.close()
    coord.close()
    ctx.close()
    assert ctx.closed and coord.closed
