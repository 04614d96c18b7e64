"""Memory and threads stay bounded; failures always reach the caller.

Memory is measured with tracemalloc (the peak of a late window against that of
an early one), weak references, or the process RSS for the long soak; threads
with ``threading.active_count()``. Ordering is never left to timing: waits,
``synchronize_all`` or blocking calls decide it.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import weakref
from contextlib import closing
from typing import Any, Iterator, List, Optional

import numpy as np
import pytest

import prism_gpu as pg
from _support import Boom, boom, checked_round, device_view, F32, pipeline_memory_growth, rand

N = 256


_boom = boom


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0xB0D5)


@pytest.fixture
def cpu_device() -> Iterator[Any]:
    dev = pg.open_device("cpu")
    yield dev
    dev.close()


_round = checked_round


def _rss_bytes() -> Optional[int]:
    """Resident set size now (Linux), or None where /proc is not there."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def _leaves(group: BaseException) -> List[BaseException]:
    if isinstance(group, ExceptionGroup):
        return [leaf for e in group.exceptions for leaf in _leaves(e)]
    return [group]


# --- nothing is kept alive ---------------------------------------------------------------------

def test_callable_kernel_is_not_kept_alive_by_the_coordinator(
        coord: pg.AsyncCoordinator, device: Any, rng: np.random.Generator) -> None:
    buf = pg.TripleBuffer(device, N, dtype=F32)
    x, out = rand(rng, N), np.full(N, np.nan, dtype=F32)

    def fn(_a: Any) -> None:
        return None

    ref = weakref.ref(fn)
    up = coord.queue_upload(x, buf)
    coord.queue_compute(fn, [up])
    dn = coord.queue_download(buf, out)
    coord.wait(dn)
    coord.poll()
    del fn
    gc.collect()
    assert ref() is None, "the coordinator keeps a completed op's kernel callable alive"
    np.testing.assert_array_equal(out, x)


def test_step_kernel_callable_is_not_kept_alive(ctx: pg.ManagedGpuContext,
                                                rng: np.random.Generator) -> None:
    x, y = rand(rng, N), np.full(N, np.nan, dtype=F32)

    def fn(_a: Any) -> None:
        return None

    ref = weakref.ref(fn)
    cfg = pg.StepConfig(kernel=fn, input=x, output=y)
    tel = ctx.triple_buffered_step(cfg)
    tel.wait()
    del fn, cfg
    gc.collect()
    assert ref() is None, "the context keeps a completed step's kernel callable alive"
    np.testing.assert_array_equal(y, x)


def test_failed_op_keeps_no_reference_to_its_buffers_or_arrays(
        cpu_device: Any, rng: np.random.Generator) -> None:
    """CPU backend: kernels get numpy arrays, so the array a kernel saw can be followed."""
    size = 1 << 16
    seen: List[weakref.ref] = []

    def boom(a: np.ndarray) -> None:
        seen.append(weakref.ref(a))
        del a  # the kernel's own frame keeps nothing
        raise Boom("kernel exploded")

    coord = pg.AsyncCoordinator(cpu_device)
    try:
        coord.register_kernel("boom", boom)
        buf = pg.TripleBuffer(cpu_device, size, dtype=F32)
        x, out = rand(rng, size), np.full(size, np.nan, dtype=F32)
        up = coord.queue_upload(x, buf)
        bad = coord.queue_compute("boom", [up])
        dn = coord.queue_download(buf, out)
        try:
            coord.wait(bad)
        except pg.KernelError:
            pass
        else:
            pytest.fail("the failing kernel was not reported by wait")
        try:
            coord.wait(dn)
        except pg.PrismGpuError:
            pass
        else:
            pytest.fail("a download of a failed compute was not reported by wait")
        coord.poll()  # retire the rest (the upload) whatever wait retires
        assert len(seen) == 1
        refs = {"TripleBuffer": weakref.ref(buf), "input array": weakref.ref(x),
                "output array": weakref.ref(out), "array the kernel got": seen[0]}
        buf.close()
        del buf, x, out
        gc.collect()
        alive = [name for name, r in refs.items() if r() is not None]
        assert alive == [], f"kept alive after the failure: {alive}"
        assert not coord.closed
        assert isinstance(coord.error(bad), pg.KernelError), "op ids must stay valid"
        _round(coord, pg.TripleBuffer(cpu_device, N, dtype=F32), rng)  # still usable
    finally:
        coord.close()


def test_wait_retires_every_op_known_complete(coord: pg.AsyncCoordinator, device: Any,
                                              rng: np.random.Generator) -> None:
    buf = pg.TripleBuffer(device, N, dtype=F32)
    x, out = rand(rng, N), np.full(N, np.nan, dtype=F32)
    up = coord.queue_upload(x, buf)
    coord.queue_compute("scale", [up])
    dn = coord.queue_download(buf, out)
    coord.wait(dn)
    assert coord.in_flight == 0, "ops the download depended on are still counted in flight"
    np.testing.assert_array_equal(out, x * F32(2))


# --- pipelines ---------------------------------------------------------------------------------

def _two_stage_pipeline(ctx: pg.ManagedGpuContext,
                        timing_sample: int = 8) -> pg.PipelineStageManager:
    pipe = ctx.create_pipeline_manager(timing_sample=timing_sample)
    coord = pipe.coordinator()

    def pre(out: Any) -> None:
        device_view(out)[:1] = F32(1)

    def main(inp: Any, out: Any) -> None:
        device_view(out)[:1] = device_view(inp)[:1]

    coord.register_kernel("pre", pre)
    coord.register_kernel("main", main)
    b0 = pipe.add_buffer(16, dtype=np.float32)
    b1 = pipe.add_buffer(16, dtype=np.float32)
    pipe.add_stage(pg.GpuPipelineStage(name="pre", output_buffers=[b0]))
    pipe.add_stage(pg.GpuPipelineStage(name="main", input_buffers=[b0], output_buffers=[b1]))
    return pipe


@pytest.mark.timeout(120)
@pytest.mark.parametrize("timing_sample", [1, 8])
def test_pipeline_stats_memory_is_constant(ctx: pg.ManagedGpuContext,
                                           timing_sample: int) -> None:
    """Statistics of 3000 iterations take no more memory than those of 1000.

    Bounded structures fill and empty as they go (intervals folded every few
    hundred ops, pooled events), so the peak over iterations 500..1000 is
    compared with the peak over 2500..3000, not two single points. Every op timed, and
    one iteration in 8 (runs folded as they complete).
    """
    pipe = _two_stage_pipeline(ctx, timing_sample)
    pipe.set_order([0, 1])
    for _ in range(300):
        pipe.execute_iteration()
    grown = pipeline_memory_growth(pipe)
    assert pipe.get_stats().iterations == 3000
    assert grown < 64 * 1024, f"{grown} bytes more after 2000 more iterations"


def test_set_order_does_not_leak_threads(ctx: pg.ManagedGpuContext) -> None:
    pipe = _two_stage_pipeline(ctx)
    stages = 2
    before = threading.active_count()
    for i in range(50):
        if i % 3 == 2:
            with pytest.raises((ValueError, IndexError, pg.PrismGpuError)):
                pipe.set_order([0, 7])
        else:
            pipe.set_order([0, 1])
    assert threading.active_count() - before <= stages
    for _ in range(5):
        pipe.execute_iteration()
    assert pipe.get_stats().iterations == 5
    assert threading.active_count() - before <= stages


def _failing_pipeline(ctx: pg.ManagedGpuContext, kernel: Any) -> pg.PipelineStageManager:
    pipe = ctx.create_pipeline_manager(depth=3)
    pipe.coordinator().register_kernel("boom", kernel)
    b0 = pipe.add_buffer(64, dtype=np.float32)
    pipe.set_order([pipe.add_stage(pg.GpuPipelineStage(name="boom", output_buffers=[b0]))])
    return pipe


@pytest.mark.timeout(60)
def test_failing_stage_raises_from_get_stats(ctx: pg.ManagedGpuContext) -> None:
    pipe = _failing_pipeline(ctx, _boom)
    pipe.execute_iteration()
    with pytest.raises(pg.KernelError):
        pipe.get_stats()
    pipe.close()


@pytest.mark.timeout(60)
def test_failing_stage_raises_from_execute_iteration(ctx: pg.ManagedGpuContext) -> None:
    """Depth 3: by iteration 3 the host waits for iteration 0's slot and learns it failed.

    Several iterations may have failed unobserved by then: one KernelError, or an
    ExceptionGroup of them (the rule of ``synchronize_all``), are both accepted.
    """
    pipe = _failing_pipeline(ctx, _boom)
    raised: Optional[BaseException] = None
    for _ in range(10):
        try:
            pipe.execute_iteration()
        except (pg.KernelError, ExceptionGroup) as exc:
            raised = exc
            break
    assert raised is not None, "10 iterations of an always-failing stage completed silently"
    assert all(isinstance(e, pg.KernelError) for e in _leaves(raised)), repr(raised)
    try:
        pipe.close()  # must not hang; later iterations' failures may still be raised here
    except (pg.KernelError, ExceptionGroup):
        pass


@pytest.mark.timeout(60)
def test_failing_stage_is_raised_once(ctx: pg.ManagedGpuContext) -> None:
    """A stage failing in iteration 0 only: one KernelError, then the pipeline runs on."""
    calls = []

    def fails_first(*_arrays: Any) -> None:
        calls.append(None)
        if len(calls) == 1:
            raise Boom("first iteration exploded")

    pipe = _failing_pipeline(ctx, fails_first)
    raised = 0
    for _ in range(10):
        try:
            pipe.execute_iteration()
        except pg.KernelError:
            raised += 1
    assert raised == 1, f"iteration 0's failure was raised {raised} times by execute_iteration"
    pipe.get_stats()
    pipe.close()


# --- failures always reach the caller ---------------------------------------------------------

def _pattern1_with_failures(coord: pg.AsyncCoordinator, buf: pg.TripleBuffer,
                            rng: np.random.Generator, failing: set, rounds: int) -> tuple:
    """Pattern-1 rounds with no wait or poll; ``failing`` rounds run "boom"."""
    coord.register_kernel("boom", _boom)
    xs, outs, bad = [], [], []
    for i in range(rounds):
        x, out = rand(rng, buf.size()), np.full(buf.size(), np.nan, dtype=F32)
        up = coord.queue_upload(x, buf)
        c = coord.queue_compute("boom" if i in failing else "scale", [up])
        if i in failing:
            bad.append(int(c))
        coord.queue_download(buf, out)
        assert buf.advance() is True
        xs.append(x)
        outs.append(out)
    return xs, outs, bad


def test_synchronize_all_raises_an_unobserved_failure_once(
        coord: pg.AsyncCoordinator, device: Any, rng: np.random.Generator) -> None:
    buf = pg.TripleBuffer(device, N, dtype=F32)
    xs, outs, bad = _pattern1_with_failures(coord, buf, rng, {2}, 6)
    with pytest.raises(pg.KernelError) as info:
        coord.synchronize_all()
    assert int(info.value.op_id) == bad[0]
    coord.synchronize_all()  # raised once
    for i, (x, out) in enumerate(zip(xs, outs)):
        if i != 2:
            np.testing.assert_array_equal(out, x * F32(2), err_msg=f"round {i}")
    _round(coord, buf, rng)


def test_synchronize_all_groups_several_unobserved_failures(
        coord: pg.AsyncCoordinator, device: Any, rng: np.random.Generator) -> None:
    buf = pg.TripleBuffer(device, N, dtype=F32)
    xs, outs, bad = _pattern1_with_failures(coord, buf, rng, {1, 3}, 5)
    with pytest.raises(ExceptionGroup) as info:
        coord.synchronize_all()
    kernel_errors = [e for e in _leaves(info.value) if isinstance(e, pg.KernelError)]
    assert sorted(int(e.op_id) for e in kernel_errors) == bad
    coord.synchronize_all()
    for i in (0, 2, 4):
        np.testing.assert_array_equal(outs[i], xs[i] * F32(2), err_msg=f"round {i}")


def test_with_block_raises_an_unobserved_failure(device: Any, rng: np.random.Generator) -> None:
    with pytest.raises(pg.KernelError):
        with pg.AsyncCoordinator(device) as coord:
            coord.register_kernel("boom", _boom)
            buf = pg.TripleBuffer(device, N, dtype=F32)
            coord.queue_compute("boom", [coord.queue_upload(rand(rng, N), buf)])
    assert coord.closed


def test_with_block_does_not_mask_the_body_exception(device: Any,
                                                      rng: np.random.Generator) -> None:
    with pytest.raises(KeyError):
        with pg.AsyncCoordinator(device) as coord:
            coord.register_kernel("boom", _boom)
            buf = pg.TripleBuffer(device, N, dtype=F32)
            coord.queue_compute("boom", [coord.queue_upload(rand(rng, N), buf)])
            raise KeyError("the body's own error")
    assert coord.closed


@pytest.mark.parametrize("how", ["wait", "poll", "error"])
def test_observed_failure_is_not_raised_again(coord: pg.AsyncCoordinator, how: str) -> None:
    coord.register_kernel("boom", _boom)
    bad = coord.queue_compute("boom")
    ok = coord.queue_compute("noop")  # same stream, after it: once ok is done, so is bad
    coord.wait(ok)
    if how == "wait":
        with pytest.raises(pg.KernelError):
            coord.wait(bad)
    elif how == "poll":
        reports = {int(r.op_id): r for r in coord.poll()}
        assert isinstance(reports[int(bad)].error, pg.KernelError)
    else:
        assert isinstance(coord.error(bad), pg.KernelError)
    coord.synchronize_all()


# --- completion callbacks ----------------------------------------------------------------------

def test_on_done_that_raises_loses_no_report(coord: pg.AsyncCoordinator, device: Any,
                                             rng: np.random.Generator) -> None:
    calls: List[Any] = []

    def cb(op: Any, _ms: Optional[float]) -> None:
        calls.append(op)
        raise Boom("callback exploded")

    buf = pg.TripleBuffer(device, N, dtype=F32)
    x, out = rand(rng, N), np.full(N, np.nan, dtype=F32)
    up = coord.queue_upload(x, buf, on_done=cb)
    c = coord.queue_compute("scale", [up])
    dn = coord.queue_download(buf, out)
    assert buf.advance() is True
    try:
        coord.wait(up)
    except Exception as exc:
        assert isinstance(exc, Boom) or isinstance(exc.__cause__, Boom), repr(exc)
    else:
        pytest.fail("the callback's exception did not reach the wait that ran it")
    coord.wait(dn)
    reported = [int(r.op_id) for r in coord.poll() + coord.poll()]
    assert int(up) in reported, f"the upload's report was lost (reported: {reported})"
    assert {int(c), int(dn)} <= set(reported)
    assert len(calls) == 1
    np.testing.assert_array_equal(out, x * F32(2))


def test_on_done_that_polls(coord: pg.AsyncCoordinator, device: Any,
                            rng: np.random.Generator) -> None:
    polled: List[Any] = []

    def cb(_op: Any, _ms: Optional[float]) -> None:
        polled.extend(coord.poll())

    buf = pg.TripleBuffer(device, N, dtype=F32)
    rounds = []
    for _ in range(3):
        x, out = rand(rng, N), np.full(N, np.nan, dtype=F32)
        up = coord.queue_upload(x, buf, on_done=cb)
        coord.queue_compute("scale", [up])
        rounds.append((x, out, coord.queue_download(buf, out)))
        assert buf.advance() is True
    try:
        coord.synchronize_all()
    except IndexError as exc:
        pytest.fail(f"a callback that polls broke synchronize_all: {exc!r}")
    except pg.PrismGpuError:
        pass  # a clear refusal of a re-entrant poll is acceptable
    for x, out, dn in rounds:
        coord.wait(dn)
        np.testing.assert_array_equal(out, x * F32(2))


def test_step_on_complete_is_called_once_after_the_download(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    calls: List[Any] = []
    x, y = rand(rng, N), np.full(N, np.nan, dtype=F32)

    def cb(tel: Any) -> None:
        calls.append((tel, y.copy()))

    tel = ctx.triple_buffered_step(pg.StepConfig(kernel="scale", input=x, output=y,
                                                 on_complete=cb))
    tel.wait()
    assert len(calls) == 1, f"on_complete called {len(calls)} times"
    assert calls[0][0] is tel
    np.testing.assert_array_equal(calls[0][1], x * F32(2))  # the output was in place
    x2, y2 = rand(rng, N), np.full(N, np.nan, dtype=F32)
    ctx.triple_buffered_step(pg.StepConfig(kernel="scale", input=x2, output=y2)).wait()
    ctx.async_coordinator().poll()
    assert len(calls) == 1
    np.testing.assert_array_equal(y2, x2 * F32(2))


# --- stream_map read-ahead ----------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_stream_map_read_ahead_allows_a_ring_of_reused_pinned_inputs(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    """While the loop holds result k, at most batches up to k + depth + prefetch were
    pulled, so a producer reusing ``depth + prefetch + 1`` pinned arrays is safe."""
    depth, prefetch, n, count = 3, 1, 1000, 200
    ring = [pg.pinned_empty(n, np.float32, ctx=ctx) for _ in range(depth + prefetch + 1)]
    expected: List[np.ndarray] = []

    def produce() -> Iterator[np.ndarray]:
        for i in range(count):
            data = rand(rng, n)
            a = ring[i % len(ring)]
            a[:] = data
            expected.append(data)
            yield a

    seen = 0
    with closing(pg.stream_map("scale", produce(), depth=depth, prefetch=prefetch,
                               ctx=ctx)) as results:
        for k, y in enumerate(results):
            assert len(expected) <= k + depth + prefetch + 1, \
                f"holding result {k}, {len(expected)} batches were pulled"
            np.testing.assert_array_equal(y, expected[k] * F32(2), err_msg=f"result {k}")
            seen += 1
    assert seen == count


# --- a long run ------------------------------------------------------------------------------

SOAK_ITERATIONS = 100_000
SOAK_HALF = SOAK_ITERATIONS // 2
SOAK_RSS_LIMIT = 8 << 20  # bytes the second half may add (a non-leaking loop adds ~2 MiB)


def _memory_now() -> Optional[int]:
    """Resident set size in bytes (Linux), else the peak RSS; None where neither is known."""
    rss = _rss_bytes()
    if rss is not None:
        return rss
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_soak_fresh_kernels_failures_and_rings_stay_bounded(
        backend: str, device: Any, rng: np.random.Generator) -> None:
    """100k iterations: each a fresh callable kernel, every 10th a failing one (observed
    by wait), every 1000th a fresh ring (the old one closed). The second half adds
    less than SOAK_RSS_LIMIT of memory and no thread."""
    size = 64
    x = rand(rng, size)
    out = np.full(size, np.nan, dtype=F32)
    mem_half = threads_half = None
    with pg.AsyncCoordinator(device) as coord:
        buf = pg.TripleBuffer(device, size, dtype=F32)
        for i in range(SOAK_ITERATIONS):
            if i % 1000 == 0 and i:
                coord.synchronize_all()  # every failure was observed: nothing to raise
                buf.close()
                buf = pg.TripleBuffer(device, size, dtype=F32)
                coord.poll()
                if i % 10_000 == 0 and i >= SOAK_HALF:
                    gc.collect()
                    mem, threads = _memory_now(), threading.active_count()
                    if i == SOAK_HALF:
                        mem_half, threads_half = mem, threads
                    else:  # checked as it goes: a leak fails early
                        assert threads == threads_half, f"threads: {threads_half} -> {threads}"
                        if mem is not None and mem_half is not None:
                            assert mem - mem_half < SOAK_RSS_LIMIT, \
                                f"memory grew by {(mem - mem_half) >> 20} MiB from " \
                                f"iteration {SOAK_HALF} to {i}"
            check = i % 100 == 50
            if check:
                x, out = rand(rng, size), np.full(size, np.nan, dtype=F32)
            up = coord.queue_upload(x, buf)
            if i % 10 == 9:
                def failing(_a: Any) -> None:
                    raise Boom("kernel exploded")

                c = coord.queue_compute(failing, [up])
                dn = coord.queue_download(buf, out)
                with pytest.raises(pg.KernelError):
                    coord.wait(c)
                with pytest.raises(pg.PrismGpuError):
                    coord.wait(dn)
            else:
                def double(a: Any) -> None:
                    m = device_view(a)
                    np.multiply(m, F32(2), out=m)

                coord.queue_compute(double, [up])
                dn = coord.queue_download(buf, out)
                if check:
                    coord.wait(dn)
                    np.testing.assert_array_equal(out, x * F32(2), err_msg=f"iteration {i}")
            assert buf.advance() is True
        coord.synchronize_all()
        gc.collect()
        mem_end, threads_end = _memory_now(), threading.active_count()
    assert threads_end == threads_half, f"threads: {threads_half} -> {threads_end}"
    if mem_end is not None and mem_half is not None:
        grown = mem_end - mem_half
        assert grown < SOAK_RSS_LIMIT, \
            f"memory grew by {grown >> 20} MiB in the second {SOAK_HALF} iterations"


def test_unobserved_failures_stay_bounded_and_the_dropped_are_counted(
        coord: pg.AsyncCoordinator, monkeypatch: Any) -> None:
    # past 4096 unobserved failures every new one rescanned them all (quadratic) and
    # they were kept without bound; now a pass per quarter of the limit drops the oldest
    # unobserved ones and the raise counts them
    from prism_gpu import _optable

    passes = []
    forget = _optable.OpTable._forget
    monkeypatch.setattr(_optable.OpTable, "_forget",
                        lambda self: (passes.append(1), forget(self))[1])
    n = 10000
    for _ in range(n):
        coord.queue_compute(boom, [], args=[])
    with pytest.raises(ExceptionGroup) as info:
        coord.synchronize_all()
    kept = len(info.value.exceptions)
    assert kept <= 4096 and len(passes) <= n // 1024 + 1
    notes = " ".join(getattr(info.value.exceptions[0], "__notes__", []))
    assert f"and {n - kept} older failures, not kept" in notes
    coord.synchronize_all()  # told once
    # a dropped failure still fails its waits, said as such, and its dependents
    with pytest.raises(pg.KernelError, match="not kept"):
        coord.wait(0)
    assert coord.error(0) is not None
    with pytest.raises(pg.DependencyFailedError):
        coord.wait(coord.queue_compute("noop", [0], args=[]))
