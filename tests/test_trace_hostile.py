"""Findings of a hostile review of tracing and closing (CPU backend), each a regression
test: traces shared by threads, traces whose end fails, reference events behind busy
lanes, two device objects of one device, closes refused from callbacks and kernels."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, List

import numpy as np
import pytest

import prism_gpu as pg
from _support import refusal_recorder


def _traced_threads(threads: int, n: int, stagger: float = 0.0) -> Any:
    """``threads`` threads, each queuing ``n`` ops on a coordinator of its own (polling
    now and then), inside one trace: (the trace, what the threads raised)."""
    dev = pg.open_device("cpu")
    errors: List[BaseException] = []

    def worker() -> None:
        try:
            coord = pg.AsyncCoordinator(dev)
            for i in range(n):
                coord.queue_compute("noop", [], args=[])
                if i % 16 == 0:
                    coord.poll()
            coord.synchronize_all()
            coord.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller's assert
            errors.append(exc)

    try:
        with pg.trace() as tr:
            ts = [threading.Thread(target=worker) for _ in range(threads)]
            for t in ts:
                t.start()
                time.sleep(stagger)
            for t in ts:
                t.join()
    finally:
        dev.close()
    return tr, errors


def test_a_trace_shared_by_threads_loses_nothing() -> None:
    # each thread joins the trace with its own coordinator while others' batches of
    # completed ops are being read: no "dictionary changed size", no op lost
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: the race shows every run
    try:
        tr, errors = _traced_threads(6, 600, stagger=0.005)
    finally:
        sys.setswitchinterval(old)
    assert errors == []
    assert len(tr.ops) == 6 * 600 and tr.lost == 0


def test_ops_of_an_ended_trace_stay_out_of_the_next() -> None:
    # a device closed inside the block: its op in flight is counted lost (not waited
    # for, not an error), the other device's op is waited for and recorded, and an op
    # of the first trace never lands in the second
    dev_a, dev_b = pg.open_device("cpu"), pg.open_device("cpu")
    a, b = pg.AsyncCoordinator(dev_a), pg.AsyncCoordinator(dev_b)
    with pg.trace() as tr1:
        b.queue_compute(lambda: time.sleep(0.2), [], args=[])  # still running at the end
        a.queue_compute(lambda: time.sleep(0.2), [], args=[])
        dev_a.close()  # a's op will never complete
    with pg.trace() as tr2:
        b.queue_compute("noop", [], args=[])
    assert [o.name for o in tr1.ops] == ["<lambda>"] and tr1.lost == 1
    assert [o.name for o in tr2.ops] == ["noop"]
    b.close()
    dev_b.close()


def test_closing_a_pipeline_from_its_callback_or_kernel_is_refused() -> None:
    ctx = pg.ManagedGpuContext(backend="cpu")
    pipe = ctx.create_pipeline_manager()
    b0 = pipe.add_buffer(16)
    coord = pipe.coordinator()
    seen: List[BaseException] = []

    def stage(out: Any) -> None:
        if seen == ["kernel"]:
            seen.clear()
            pipe.close()  # from the stage's kernel, on its stream's thread
        out[:] = 1

    coord.register_kernel("s", stage)
    pipe.set_order([pipe.add_stage(pg.GpuPipelineStage(name="S", output_buffers=[b0],
                                                       kernel="s"))])
    pipe.execute_iteration().wait()

    closer = refusal_recorder(pipe.close, seen)
    coord.wait(coord.queue_compute("noop", [], args=[], on_done=closer))
    assert len(seen) == 1 and "callback" in str(seen[0])
    seen[:] = ["kernel"]
    with pytest.raises(pg.KernelError, match="may not close"):
        pipe.execute_iteration().wait()
    pipe.execute_iteration().wait()  # neither refusal changed anything
    ctx.close()
    assert coord.closed


def test_a_reference_event_behind_a_busy_lane_delays_reading_never_fails() -> None:
    # the trace's clock starts on the lane of its first op, still running work queued
    # before the trace; ops completing on other lanes wait to be read, none is lost
    dev = pg.open_device("cpu")
    coord = pg.AsyncCoordinator(dev)
    coord.queue_compute(lambda: time.sleep(0.3), [], args=[])  # before the trace
    x = np.ones(16, np.float32)
    with pg.trace() as tr:
        coord.queue_compute("noop", [], args=[])  # the first traced op, behind it
        ups = []
        for _ in range(300):  # more than a trace holds before reading
            buf = pg.TripleBuffer(dev, 16, depth=1)
            ups.append(coord.queue_upload(x, buf))
            coord.wait(ups[-1])
    assert len(tr.ops) == 301 and tr.lost == 0
    assert len(coord.poll()) == 302  # every op reported, the one before the trace too
    assert coord.statistics().in_flight == 0
    coord.close()
    dev.close()


def test_two_objects_of_one_device_share_its_clock() -> None:
    d1, d2 = pg.open_device("cpu"), pg.open_device("cpu")
    a, b = pg.AsyncCoordinator(d1), pg.AsyncCoordinator(d2)
    with pg.trace() as tr:
        a.wait(a.queue_compute(lambda: time.sleep(0.05), [], args=[]))
        time.sleep(0.2)
        b.wait(b.queue_compute("noop", [], args=[]))
    first, second = tr.ops
    assert second.start_ms >= first.end_ms + 150  # not both drawn at 0
    for c in (a, b):
        c.close()
    d1.close()
    d2.close()


def test_closing_a_context_from_its_callback_is_refused_and_changes_nothing() -> None:
    ctx = pg.ManagedGpuContext(backend="cpu")
    coord = ctx.async_coordinator()
    assert coord is not None
    seen: List[BaseException] = []

    closer = refusal_recorder(ctx.close, seen)
    coord.wait(coord.queue_compute("noop", [], args=[], on_done=closer))
    assert len(seen) == 1 and "close" in str(seen[0])
    assert not ctx.closed and not ctx.device.closed and not coord.closed
    coord.wait(coord.queue_compute("noop", [], args=[]))  # still usable
    ctx.close()
    assert ctx.closed and coord.closed


def test_closing_a_context_from_a_cpu_kernel_is_refused_not_a_hang() -> None:
    ctx = pg.ManagedGpuContext(backend="cpu")
    coord = ctx.async_coordinator()
    assert coord is not None

    def kernel() -> None:
        ctx.close()  # runs on the compute stream's thread: closing waits for that stream

    op = coord.queue_compute(kernel, [], args=[])
    with pytest.raises(pg.KernelError, match="may not close its context"):
        coord.wait(op, timeout=30)
    assert not ctx.closed
    coord.wait(coord.queue_compute("noop", [], args=[]))
    ctx.close()


def test_threads_reading_one_trace_at_once_read_each_op_once() -> None:
    # widen the window in which a batch is taken off an engine's list (a profile hook
    # sleeps there): two threads reading at once must not both take the same ops
    import collections

    def hook(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and arg is len and frame.f_code.co_name in ("read_times",
                                                                          "_read"):
            time.sleep(0.002)

    threading.setprofile(hook)
    try:
        tr, errors = _traced_threads(4, 600)
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
    ops = tr.ops
    assert errors == []
    copies = collections.Counter((o.lane, o.op_id) for o in ops)
    assert len(ops) == 4 * 600 and max(copies.values()) == 1 and tr.lost == 0


def test_a_cpu_kernel_may_synchronize_its_own_stream() -> None:
    # on CUDA a callable runs inside queue_compute and may wait for earlier work; on the
    # CPU backend that work is done when the kernel runs: the wait returns (no hang)
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        coord = ctx.async_coordinator()
        assert coord is not None
        c = ctx.to_device(np.float32([3.0]))
        got: List[Any] = []

        def syncs(stream: Any) -> None:
            stream.synchronize()
            got.append(c.to_host())

        coord.wait(coord.queue_compute(pg.Kernel.from_callable(syncs), [], args=[]),
                   timeout=30)
        assert len(got) == 1 and got[0].tolist() == [3.0]


def test_a_cpu_kernel_reading_a_constant_or_pinning_memory_does_not_hang() -> None:
    # the kernel waits for "the device" (to_host, leaving pg.register): from its own
    # stream's thread that wait returned never (the download queued behind it waits for
    # the kernel); now what it depends on is done and the rest is not waited for
    got: List[np.ndarray] = []

    def run() -> None:
        with pg.ManagedGpuContext(backend="cpu") as ctx:
            w = ctx.to_device(np.float32([2.0]))
            scratch = np.zeros(16)

            def scale(x: np.ndarray) -> None:
                with pg.register(scratch, ctx=ctx):
                    x *= w.to_host()[0]

            xs = [np.full(8, i, np.float32) for i in range(6)]
            got.extend(r.copy() for r in pg.stream_map(pg.Kernel.from_callable(scale), xs,
                                                       ctx=ctx))

    t = threading.Thread(target=run, daemon=True)  # a hang fails the test, not the run
    t.start()
    t.join(60)
    assert not t.is_alive() and len(got) == 6
    for i, r in enumerate(got):
        np.testing.assert_array_equal(r, np.full(8, 2 * i, np.float32))


@pytest.mark.parametrize("close", [True, False])
def test_device_arrays_of_many_contexts_leave_nothing_behind(close: bool) -> None:
    # the one-off copy stream of each device was kept for ever in a module table (its
    # stream held the device): a thread per context dropped without close()
    import gc

    def one(i: int) -> None:
        ctx = pg.ManagedGpuContext(backend="cpu", enable_streams=False)
        a = ctx.to_device(np.float32([i]))
        assert a.to_host()[0] == i
        if close:
            ctx.close()

    one(-1)
    gc.collect()
    before = threading.active_count()
    for i in range(60):
        one(i)
    gc.collect()
    assert threading.active_count() <= before


@pytest.mark.parametrize("make", [
    lambda ctx: ctx.empty_device((2**62, 4), np.float64),
    lambda ctx: ctx.empty_device((2**64,), np.uint8),
    lambda ctx: pg.pinned_empty((2**61, 8), np.float64, ctx=ctx),
    lambda ctx: ctx.create_triple_buffer(2**62, np.float64),
])
def test_sizes_past_any_memory_are_refused_by_name(make: Any) -> None:
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        with pytest.raises(ValueError, match="more than any memory"):
            make(ctx)


@pytest.mark.parametrize("make", [lambda ctx: ctx.empty_device(3, "V0"),
                                  lambda ctx: ctx.to_device(np.zeros(3, "V0"))])
def test_elements_of_no_bytes_are_refused(make: Any) -> None:
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        with pytest.raises(TypeError, match="no bytes"):
            make(ctx)


@pytest.mark.parametrize("bad", [None, 5, "batches"])
def test_batches_that_are_not_an_iterable_are_named(bad: Any) -> None:
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        with pytest.raises(TypeError, match="batches must be an iterable"):
            pg.stream_map("scale", bad, ctx=ctx)
        pipe = ctx.create_pipeline_manager()
        b = pipe.add_buffer(8)
        pipe.add_stage(pg.GpuPipelineStage("s", [b], [b], kernel="scale"))
        with pytest.raises(TypeError, match="batches must be an iterable"):
            pipe.run(bad, input=b, output=b)


def test_ending_a_trace_leaves_another_threads_coordinator_alone() -> None:
    # the trace's end harvested other threads' engines from the tracing thread: bogus
    # refusals in their queue calls, KeyError from their tables; it waited for their work
    gate, queued, ended = threading.Event(), threading.Event(), threading.Event()
    errors: List[BaseException] = []

    def worker() -> None:
        coord = pg.AsyncCoordinator(pg.open_device("cpu"))
        try:
            op = coord.queue_compute(lambda: gate.wait(5), [], args=[])
            queued.set()
            ended.wait(10)
            gate.set()
            coord.wait(op)
            coord.wait(coord.queue_compute("noop", [], args=[]))
            coord.close()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    t = threading.Thread(target=worker)
    with pg.trace() as tr:
        t.start()
        assert queued.wait(10)
    assert not gate.is_set()  # the end did not wait for the other thread's op
    ended.set()
    t.join(30)
    assert not t.is_alive() and not errors
    assert tr.lost == 1  # in flight on another thread at the end


def test_a_trace_lets_closed_coordinators_go() -> None:
    # a trace held every engine it ever saw: 3000 short-lived stream_map calls in one
    # trace kept about 14 KB each
    import gc
    import weakref

    with pg.trace() as tr:
        refs = []
        for i in range(20):
            ctx = pg.ManagedGpuContext(backend="cpu")
            coord = ctx.async_coordinator()
            refs.append(weakref.ref(coord.engine))
            buf = ctx.create_triple_buffer(4)
            coord.wait(coord.queue_upload(np.full(4, i, np.float32), buf))
            ctx.close()
            del ctx, coord, buf
        assert len(tr.ops) == 20
        gc.collect()
        assert sum(r() is not None for r in refs) <= 1  # the last one is let go at the end
    assert len(tr.ops) == 20 and {o.device for o in tr.ops} == {"cpu:0"}


def test_lanes_keep_their_names_when_closed_engines_go() -> None:
    # lane names were keyed by id(lane): once closed engines were let go, a new lane
    # could take a dead one's id, and its name, mixing two lanes' ops in the timeline
    import gc

    with pg.trace() as tr:
        for i in range(30):
            list(pg.stream_map("scale", [np.ones(64, np.float32)] * 2, backend="cpu"))
            tr.ops  # a read in between lets the closed engines go
            gc.collect()
    by_lane: dict = {}
    for o in tr.ops:
        by_lane.setdefault(o.lane, set()).add(o.op_type)
    assert len(by_lane) == 90  # three lanes per call, each its own
    assert all(len(kinds) == 1 for kinds in by_lane.values())


def test_a_stream_closed_by_another_thread_during_a_device_synchronize() -> None:
    # the device checked a stream open, then synchronized it: closed in between (a dropped
    # DeviceArray's copy stream, by the garbage collector on another thread), the wait
    # raised "this stream is closed" at a caller who closed nothing
    dev = pg.open_device("cpu")
    s = dev.create_stream()
    real = s.synchronize

    def closed_in_between() -> None:
        s.close()
        real()

    s.synchronize = closed_in_between  # type: ignore[method-assign]
    dev.synchronize()
    dev.close()


def test_device_arrays_of_a_context_share_one_copy_stream() -> None:
    # each array made and dropped in turn started (and joined) a stream of its own
    with pg.ManagedGpuContext(backend="cpu", enable_streams=False) as ctx:
        made = []
        real = ctx.device.create_stream

        def counting(*args: Any, **kwargs: Any) -> Any:
            made.append(1)
            return real(*args, **kwargs)

        ctx.device.create_stream = counting  # type: ignore[method-assign]
        x = np.arange(8, dtype=np.float32)
        for _ in range(20):
            a = ctx.to_device(x)
            np.testing.assert_array_equal(a.to_host(), x)
            del a
        assert len(made) <= 1
