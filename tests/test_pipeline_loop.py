"""The pipeline's iteration loop: the plain iteration (nothing fed, nothing read back),
its statistics window, the views stages read, and what it refuses.

Ordering is never left to timing: waits, ``get_stats`` or blocking calls decide it.
"""

from __future__ import annotations

import gc
import random
import weakref
from typing import Any, List

import numpy as np
import pytest

import prism_gpu as pg
from _support import F32, ReportedOp, StampEvent, affine, pipeline_memory_growth, rand
from prism_gpu._stats import QUEUED, Window, fold, merge


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0x1007)


def _gen_use(ctx: pg.ManagedGpuContext, n: int = 16, timing_sample: int = 8) -> Any:
    """gen writes b1, use reads it: a plain iteration queues two stages."""
    pipe = ctx.create_pipeline_manager(timing_sample=timing_sample)
    b0, b1 = pipe.add_buffer(n), pipe.add_buffer(n)
    pipe.add_stage(pg.GpuPipelineStage("gen", [], [b1], kernel="noop"))
    pipe.add_stage(pg.GpuPipelineStage("use", [b1], [], kernel="noop"))
    return pipe, b0, b1


@pytest.mark.timeout(240)
@pytest.mark.parametrize("timing_sample", [1, 8])
def test_stats_stay_bounded_after_a_copy_lane_goes_quiet(timing_sample: int) -> None:
    """One iteration downloads (the download lane reports once), then none does: the
    window must keep folding its intervals. It held back everything after that one
    download, so its intervals grew by two per iteration (and each report sorted them
    all). Every op timed, and one iteration in 8."""
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        pipe, _, b1 = _gen_use(ctx, timing_sample=timing_sample)
        y = np.empty(16, F32)
        pipe.execute_iteration(outputs={b1: y}).wait()
        for _ in range(300):
            pipe.execute_iteration()
        grown = pipeline_memory_growth(pipe)
        stats = pipe.get_stats()
        assert stats.iterations == 3001
        assert set(stats.stage_ms) == {"gen", "use", "download"}
        assert 0 < stats.gpu_utilization <= 1
        assert grown < 64 * 1024, f"{grown} bytes more after 2000 more iterations"
        pipe.close()


def test_stats_of_fed_and_plain_iterations(ctx: pg.ManagedGpuContext,
                                           rng: np.random.Generator) -> None:
    """Fed iterations report their copies, plain ones only their stages; a new window
    has only what ran in it, and counts only its own iterations."""
    pipe = ctx.create_pipeline_manager()
    pipe.coordinator().register_kernel("affine", affine())
    b0, b1 = pipe.add_buffer(8), pipe.add_buffer(8)
    pipe.add_stage(pg.GpuPipelineStage("fill", [], [b0], kernel="noop"))
    pipe.add_stage(pg.GpuPipelineStage("s", [b0], [b1], kernel="affine", extra=(2.0, 0.0)))
    for i in range(10):
        if i % 2:
            pipe.execute_iteration()
        else:
            y = np.empty(8, F32)
            pipe.execute_iteration(outputs={b1: y})
    stats = pipe.get_stats()
    assert stats.iterations == 10
    assert set(stats.stage_ms) == {"fill", "s", "download"}
    assert all(ms >= 0 for ms in stats.stage_ms.values())
    assert 0 < stats.gpu_utilization <= 1 and stats.throughput > 0
    pipe.reset_stats()
    for _ in range(4):
        pipe.execute_iteration()
    stats = pipe.get_stats()
    assert stats.iterations == 4
    assert set(stats.stage_ms) == {"fill", "s"}   # no copy ran in this window
    pipe.close()


def test_stage_times_are_the_stages_own() -> None:
    """Each stage's mean time is its own (a 5 ms spin, a no-op), the plain loop's
    iterations are all counted, and they overlap (CPU backend: spins hold their
    streams)."""
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        pipe = ctx.create_pipeline_manager()
        b0 = pipe.add_buffer(4)
        pipe.add_stage(pg.GpuPipelineStage("slow", [], [b0], kernel="spin", extra=(5000.0,)))
        pipe.add_stage(pg.GpuPipelineStage("quick", [b0], [], kernel="noop"))
        for _ in range(6):
            pipe.execute_iteration()
        stats = pipe.get_stats()
        pipe.close()
    assert stats.iterations == 6
    assert stats.stage_ms["slow"] >= 4.0, stats
    assert stats.stage_ms["quick"] < stats.stage_ms["slow"], stats
    assert stats.avg_iteration_ms >= 4.0, stats


def test_an_input_is_read_only_and_its_own_length_every_iteration(
        rng: np.random.Generator) -> None:
    """A stage that only reads a buffer gets it read-only in every iteration, of the
    length fed in that iteration, with that iteration's data (the views are made once
    per slot and length)."""
    seen: List[Any] = []

    def look(x: np.ndarray) -> None:
        try:
            x[:1] = 0
            wrote = True
        except ValueError:
            wrote = False
        seen.append((wrote, x.copy()))

    with pg.ManagedGpuContext(backend="cpu") as ctx:
        pipe = ctx.create_pipeline_manager()
        b0 = pipe.add_buffer(8)
        pipe.add_stage(pg.GpuPipelineStage("look", [b0], [], kernel=look))
        xs = [rand(rng, n) for n in (3, 8, 5, 8, 8, 8, 2, 8, 3)]
        for x in xs:
            pipe.execute_iteration(inputs={b0: x}).wait()
        pipe.close()
    assert [wrote for wrote, _ in seen] == [False] * len(xs)
    for (_, got), x in zip(seen, xs):
        np.testing.assert_array_equal(got, x)


def test_a_closed_buffer_is_refused_and_its_memory_let_go() -> None:
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        pipe = ctx.create_pipeline_manager()
        b0 = pipe.add_buffer(64)
        pipe.add_stage(pg.GpuPipelineStage("fill", [], [b0], kernel="noop"))
        pipe.add_stage(pg.GpuPipelineStage("read", [b0], [], kernel="noop"))
        for _ in range(4):
            pipe.execute_iteration()
        pipe.get_stats()
        ring = pipe.buffer(b0)
        memory = [weakref.ref(s.full) for s in ring.slots]
        ring.close()
        with pytest.raises(pg.InvalidOperationError, match="closed"):
            pipe.execute_iteration()
        gc.collect()
        assert all(ref() is None for ref in memory), "a closed ring's memory is still held"
        with pytest.raises(pg.InvalidOperationError, match="closed"):
            pipe.execute_iteration()
        pipe.close()


def test_a_callback_error_is_raised_by_a_plain_iteration_before_any_change() -> None:
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        pipe, _, b1 = _gen_use(ctx)
        coord = pipe.coordinator()

        def bad(report: Any, ms: Any) -> None:
            raise LookupError("callback bug")

        before = [pipe.buffer(b).get_states() for b in (0, 1)]
        coord.queue_compute("noop", [], args=[], on_done=bad)
        coord.compute_stream().synchronize()   # done, not yet retired
        with pytest.raises(LookupError):
            pipe.execute_iteration()
        assert [pipe.buffer(b).get_states() for b in (0, 1)] == before
        assert pipe.execute_iteration().wait().index == 0   # the refused call took none
        pipe.close()


def test_a_refused_plain_iteration_changes_nothing(ctx: pg.ManagedGpuContext) -> None:
    """The second buffer's slot is held by another API: refused before any slot of
    either buffer moves, and the next iteration, once it is given back, runs."""
    pipe = ctx.create_pipeline_manager()
    pipe.coordinator().register_kernel("affine", affine())
    b0, b1 = pipe.add_buffer(8), pipe.add_buffer(8)
    pipe.add_stage(pg.GpuPipelineStage("a", [], [b0], kernel="noop"))
    pipe.add_stage(pg.GpuPipelineStage("b", [b0], [b1], kernel="affine", extra=(2.0, 0.0)))
    pipe.execute_iteration().wait()
    held = pipe.buffer(b1).get_upload_buffer()
    assert held is not None
    states = [pipe.buffer(b).get_states() for b in (b0, b1)]
    in_flight = pipe.coordinator().in_flight
    for _ in range(2):
        with pytest.raises(pg.PrismGpuError):
            pipe.execute_iteration()
    assert [pipe.buffer(b).get_states() for b in (b0, b1)] == states
    assert pipe.coordinator().in_flight == in_flight
    pipe.close()


def test_plain_iterations_follow_plan_changes(ctx: pg.ManagedGpuContext) -> None:
    """What a plain iteration writes is remembered per plan: a stage added later that
    reads a buffer nothing writes is refused, and a new order is followed."""
    pipe = ctx.create_pipeline_manager()
    pipe.coordinator().register_kernel("affine", affine())
    b0, b1, b2 = pipe.add_buffer(8), pipe.add_buffer(8), pipe.add_buffer(8)
    pipe.add_stage(pg.GpuPipelineStage("w0", [], [b0], kernel="noop"))
    pipe.execute_iteration()
    pipe.add_stage(pg.GpuPipelineStage("r1", [b1], [b2], kernel="affine", extra=(2.0, 0.0)))
    for _ in range(2):
        with pytest.raises(pg.InvalidOperationError, match="reads buffer"):
            pipe.execute_iteration()
    pipe.set_order([0])
    pipe.execute_iteration()
    pipe.add_stage(pg.GpuPipelineStage("w1", [], [b1], kernel="noop"))
    pipe.set_order([2, 1, 0])                 # w1 before r1: b1 is written first
    pipe.execute_iteration()
    assert pipe.get_stats().iterations == 3
    assert set(pipe.get_stats().stage_ms) == {"w0", "r1", "w1"}
    pipe.close()


def test_a_stage_rewriting_its_input_in_place_every_iteration(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    """twice rewrites b0 in place, fed and read back each iteration, several in flight:
    each iteration's data is its own."""
    pipe = ctx.create_pipeline_manager()
    pipe.coordinator().register_kernel("affine", affine())
    b0 = pipe.add_buffer(16)
    pipe.add_stage(pg.GpuPipelineStage("twice", [b0], [b0], kernel="affine",
                                       extra=(2.0, 0.0)))
    xs = [rand(rng, 16) for _ in range(7)]
    ys = [np.empty(16, F32) for _ in xs]
    its = [pipe.execute_iteration(inputs={b0: x}, outputs={b0: y}) for x, y in zip(xs, ys)]
    for it in its:
        it.wait()
    for x, y in zip(xs, ys):
        np.testing.assert_array_equal(y, x * F32(2))
    pipe.close()


def test_fold_is_merge_then_a_split() -> None:
    """The window's one-sweep fold gives what the union (merge) gives, split at a mark."""
    r = random.Random(7)
    for _ in range(3000):
        intervals = []
        for _ in range(r.randint(0, 30)):
            a = r.choice([r.random(), round(r.random(), 1)])
            intervals.append((a, a + r.choice([0.0, 0.1, r.random() * 0.3])))
        mark = r.choice([r.random(), float("inf"), -1.0])
        union = merge(intervals)
        done, keep, first = fold(list(intervals), mark)
        assert keep == [iv for iv in union if iv[1] > mark]
        assert first == min((a for a, _ in intervals), default=float("inf"))
        assert done == pytest.approx(sum(b - a for a, b in union if b <= mark), abs=1e-12)




class _SmallWindow(Window):
    __slots__ = ()
    FOLD_AT = 2  # folds at every third report


def test_a_window_folds_nothing_a_busy_lane_may_still_overlap() -> None:
    """Lane a's op [0, 10] is in flight while lane b reports [1, 2] .. [7, 8]: folding
    b's intervals then would count them again under a's. A lane used once long ago
    (c) holds nothing back. Busy time is the union: [0, 10] and [20, 21] of 21 ms."""
    failed: set = set()
    win = _SmallWindow()
    win.start(StampEvent(0.0))
    lanes = {name: (win.timer(name, False, failed), win.timer(name, True, failed),
                    win.lane(name)) for name in "abc"}

    def queue(name: str) -> None:
        lanes[name][2][QUEUED] += 1

    def report(name: str, oid: int, start: float, end: float, last: bool = False,
               error: Any = None) -> None:
        lanes[name][1 if last else 0](ReportedOp(oid, end, error), end - start)

    queue("c")
    report("c", 0, -5.0, -4.0)       # long done: its lane has nothing in flight
    queue("a")
    for i in range(4):
        queue("b")
    for i, t in enumerate((1.0, 3.0, 5.0, 7.0)):
        report("b", 1 + i, t, t + 1.0, last=True)
    report("a", 5, 0.0, 10.0, error=RuntimeError("x"))
    queue("b")
    report("b", 6, 20.0, 21.0, last=True)
    stats = win.stats()
    assert failed == {5}
    assert stats.iterations == 5
    assert stats.stage_ms == {"a": 10.0, "b": 1.0, "c": 1.0}
    assert stats.gpu_utilization == pytest.approx((1.0 + 10.0 + 1.0) / (21.0 + 5.0))
    win.end()                             # an ended window records nothing more
    queue("b")
    report("b", 7, 30.0, 31.0, last=True)
    assert win.stats() == stats


def test_a_closed_pipeline_lets_go_of_what_its_plan_held_without_the_collector() -> None:
    """A closed pipeline dropped its plan's prepared kernels (a callable stage and what it
    captured) and is freed by reference counting alone: its queuing held a bound method
    of it (a cycle), so its memory went only when the collector ran, in the middle of
    whatever ran next (on the GPU, a stall of the next loop)."""

    coord = pg.AsyncCoordinator(pg.open_device("cpu"))
    box = [np.ones(1024, np.float32)]  # what the stage's callable captures
    held = weakref.ref(box[0])

    def fill(slot: Any) -> None:
        slot[:] = box[0][:slot.size]
    coord.register_kernel("fill", pg.Kernel.from_callable(fill))
    gc.disable()
    try:
        pipe = pg.PipelineStageManager(coord)
        b0 = pipe.add_buffer(64)
        pipe.set_order([pipe.add_stage(pg.GpuPipelineStage("fill", [], [b0]))])
        for _ in range(3):
            pipe.execute_iteration()
        pipe.close()
        coord.register_kernel("fill", pg.Kernel.from_callable(lambda slot: None))
        del fill
        box.clear()
        assert held() is None, "the closed pipeline's plan kept the stage's callable"
        gone = weakref.ref(pipe)
        del pipe
        assert gone() is None, "the pipeline is in a reference cycle"
    finally:
        gc.enable()
        coord.close()
