"""A pipeline's statistics timed on one iteration in ``timing_sample``: which iterations
are timed, what each statistic becomes, when a run's clean window counts, and the
pipeline using it (timing events recorded, results, failures of untimed iterations).

The window is driven here as the pipeline drives it, with ops whose device times are
given: the expected figures come from the whole timeline (every op, timed or not).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np
import pytest

import prism_gpu as pg
from _support import F32, ReportedOp, StampEvent, boom, rand
from prism_gpu._sampling import RUN_MIN, Run, SampledWindow
from prism_gpu import _core
from prism_gpu._stats import QUEUED, merge
from prism_gpu.backends.cpu._stream import CpuStream

LANES = ("upload", "s", "download")
# one iteration i of the timeline: each lane's op as (start, end) in ms from i
SHAPE = {"upload": (0.0, 0.2), "s": (0.2, 0.6), "download": (0.6, 0.7)}




def _drive(win: SampledWindow, iterations: int, lag: int = 2,
           lanes_of: Any = None, fail: Set[int] = frozenset()) -> Tuple[
               List[Optional[Run]], List[Tuple[str, float, float]], Set[int]]:
    """Queue ``iterations`` of the timeline as the pipeline does (each iteration's ops
    reported ``lag`` iterations later, as a lagging device); the run of each iteration,
    every op as (lane, start, end), and the failed ids the timers noted."""
    failed: Set[int] = set()
    shapes: Dict[Tuple[str, ...], frozenset] = {}
    runs: List[Optional[Run]] = []
    ops: List[Tuple[str, float, float]] = []
    pending: List[List[Tuple[Any, Any, float, float, bool]]] = []
    win.start(StampEvent(0.0))

    def report(batch: List[Tuple[Any, Any, float, float, bool]]) -> None:
        for timer, op, start, end, timed in batch:
            timer(op, end - start if timed else None)

    for i in range(iterations):
        names = tuple(lanes_of(i)) if lanes_of is not None else LANES
        shape = shapes.setdefault(names, frozenset(names))
        run = win.begin(shape)
        runs.append(run)
        batch = []
        for k, lane in enumerate(names):
            last = k == len(names) - 1
            timer = (run or win).timer(lane, last, failed)
            a, b = SHAPE[lane]
            oid = 10 * i + k
            batch.append((timer, ReportedOp(oid, i + b, RuntimeError("x") if oid in fail else None),
                          i + a, i + b, run is not None))
            win.lane(lane)[QUEUED] += 1
            ops.append((lane, i + a, i + b))
        if run is not None:
            run.queued += len(names)
        pending.append(batch)
        if len(pending) > lag:
            report(pending.pop(0))
    for batch in pending:
        report(batch)
    return runs, ops, failed


def _busy(ops: List[Tuple[str, float, float]], lo: float, hi: float) -> float:
    return sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in merge([(a, b) for _, a, b in ops]))


def _timed_spans(runs: List[Optional[Run]]) -> List[Tuple[int, int]]:
    spans: List[Tuple[int, int]] = []
    for i, run in enumerate(runs):
        if run is not None:
            if spans and spans[-1][1] == i - 1 and runs[i - 1] is run:
                spans[-1] = (spans[-1][0], i)
            else:
                spans.append((i, i))
    return spans


def test_runs_of_consecutive_iterations_one_in_sample() -> None:
    """Runs of RUN_MIN iterations (three lanes need fewer), one run every ``sample`` run
    lengths, the first at the window's first iteration."""
    win = SampledWindow(4)
    runs, _, _ = _drive(win, 200)
    period = RUN_MIN * 4
    assert _timed_spans(runs) == [(s, min(s + RUN_MIN, 200) - 1) for s in range(0, 200, period)]


def test_statistics_of_a_sampled_window_match_the_whole_timeline() -> None:
    win = SampledWindow(4)
    n = 300
    runs, ops, _ = _drive(win, n)
    stats = win.stats()
    spans = _timed_spans(runs)
    last = spans[-1][1]  # the last timed iteration
    assert stats.iterations == n
    # each iteration's download ends at i + 0.7: exact over iterations 0..last
    assert stats.avg_iteration_ms == pytest.approx(1.0)
    assert stats.throughput == pytest.approx((last + 1) / ((last + 0.7) / 1e3))
    assert stats.stage_ms == pytest.approx({k: b - a for k, (a, b) in SHAPE.items()})
    # the clean window of run [b, e]: from its download's first start (the window's first op
    # for the first run) to its upload's last end (its last end if nothing came after)
    busy = span = 0.0
    for b, e in spans:
        lo = 0.0 if b == 0 else b + SHAPE["download"][0]
        hi = e + SHAPE["upload"][1] if e < n - 1 else e + SHAPE["download"][1]
        busy += _busy(ops, lo, hi)  # every op of the timeline, timed or not
        span += hi - lo
    assert stats.gpu_utilization == pytest.approx(busy / span)
    assert stats.gpu_utilization < 0.8  # (0.7 of each period is busy: not the first lane's)


def test_a_window_of_one_run_is_the_whole_window() -> None:
    """Fewer iterations than a run: every op timed, the statistics of the whole window."""
    win = SampledWindow(8)
    runs, ops, _ = _drive(win, 10)
    assert all(r is runs[0] for r in runs)
    stats = win.stats()
    assert stats.iterations == 10
    assert stats.gpu_utilization == pytest.approx(_busy(ops, 0.0, 9.7) / 9.7)
    assert stats.throughput == pytest.approx(10 / 9.7e-3)


def test_untimed_failures_are_noted_and_counted_iterations_too() -> None:
    win = SampledWindow(4)
    runs, _, failed = _drive(win, 100, fail={10 * 30 + 1, 10 * 5 + 2})
    assert runs[30] is None and runs[5] is not None
    assert failed == {301, 52}
    assert win.stats().iterations == 100


def _run_starts(runs: List[Optional[Run]]) -> List[Run]:
    return [r for i, r in enumerate(runs) if r is not None and (i == 0 or runs[i - 1] is not r)]


@pytest.mark.parametrize("lag", [2, 20])
def test_a_lane_used_between_runs_counts_only_once_quiet(lag: int) -> None:
    """Iterations 20..25 read back, the others do not. The first run (0..15) lacks the
    download lane: it counts if its ops all ended before iteration 20 (the device 2
    iterations behind), not if they may run with those downloads (20 behind); so does
    the run begun at 32 (the downloads may still be in flight when it begins); the run
    begun at 64 counts either way."""
    win = SampledWindow(2)
    runs, _, _ = _drive(win, 120, lag=lag,
                        lanes_of=lambda i: LANES if 20 <= i < 26 else LANES[:2])
    starts = _run_starts(runs)
    assert [r.first for r in starts] == [0, 2 * RUN_MIN, 4 * RUN_MIN, 6 * RUN_MIN]
    assert [r.valid for r in starts] == [lag == 2, lag == 2, True, True]
    assert all(r is None for r in runs[20:26])
    assert win.stats().iterations == 120


def test_a_lane_a_run_starts_using_is_its_own() -> None:
    """Iteration 10 starts reading back, inside the first run: its downloads are the run's
    (timed, in its window), so the run still counts; the statistics have the download."""
    win = SampledWindow(2)
    runs, _, _ = _drive(win, 60, lanes_of=lambda i: LANES if i >= 10 else LANES[:2])
    first = runs[0]
    assert first is not None and all(r is first for r in runs[:RUN_MIN])
    assert first.valid and first.lanes == frozenset(LANES)
    stats = win.stats()
    assert stats.iterations == 60 and set(stats.stage_ms) == set(LANES)


def test_a_lane_used_after_a_run_in_flight_spoils_it() -> None:
    """Iteration 16 (just after the first run) starts reading back while the run's ops
    are in flight (the device 20 iterations behind): its downloads may overlap the run's
    window, so the run does not count."""
    win = SampledWindow(2)
    runs, _, _ = _drive(win, 80, lag=20, lanes_of=lambda i: LANES if i >= 16 else LANES[:2])
    assert runs[0] is not None and runs[16] is None and not runs[0].valid


def _counting_stamps(monkeypatch: pytest.MonkeyPatch) -> List[int]:
    count = [0]
    record = CpuStream.record

    def counted(self: Any, event: Any, *, stamp: bool = False) -> None:
        count[0] += stamp
        record(self, event, stamp=stamp)
    monkeypatch.setattr(CpuStream, "record", counted)
    return count


@pytest.mark.parametrize("sample", [1, 4])
def test_a_pipeline_times_one_iteration_in_sample(monkeypatch: pytest.MonkeyPatch,
                                                  sample: int) -> None:
    """100 fed and read-back iterations: every op stamped, or the runs' only (iterations
    0..15 and 64..79 with sample 4), plus the window's reference; every result right."""
    stamps = _counting_stamps(monkeypatch)
    rng = np.random.default_rng(0x5A3)
    n = 256
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        pipe = ctx.create_pipeline_manager(timing_sample=sample)
        assert pipe.timing_sample == sample
        a, b = pipe.add_buffer(n), pipe.add_buffer(n)
        pipe.add_stage(pg.GpuPipelineStage("s", [a], [b],
                                           kernel=lambda x, y: np.multiply(x, 3, out=y)))
        xs = [rand(rng, n) for _ in range(100)]
        ys = [np.empty(n, F32) for _ in range(100)]
        its = [pipe.execute_iteration(inputs={a: x}, outputs={b: y}) for x, y in zip(xs, ys)]
        for it in its:
            it.wait()
        stats = pipe.get_stats()
        pipe.close()
    for x, y in zip(xs, ys):
        np.testing.assert_array_equal(y, x * F32(3))
    timed = 100 if sample == 1 else 2 * RUN_MIN
    assert stamps[0] == 3 * timed + 1
    assert stats.iterations == 100
    assert set(stats.stage_ms) == {"upload", "s", "download"}
    assert 0 < stats.gpu_utilization <= 1 and stats.avg_iteration_ms > 0


@pytest.mark.timeout(60)
def test_an_untimed_iteration_failing_is_raised(ctx: pg.ManagedGpuContext) -> None:
    """Iteration 40 (untimed: runs are 0..15 and 128..143) fails: raised by a later call."""
    calls = []

    def fails_at_40(*_arrays: Any) -> None:
        calls.append(None)
        if len(calls) == 41:
            boom()

    pipe = ctx.create_pipeline_manager(timing_sample=8)
    b0 = pipe.add_buffer(64)
    pipe.add_stage(pg.GpuPipelineStage("s", [], [b0], kernel=fails_at_40))
    raised, queued = [], 0
    for _ in range(60):
        try:
            pipe.execute_iteration()
            queued += 1
        except pg.KernelError as exc:  # (refused: not queued)
            raised.append(exc)
    try:
        pipe.get_stats()
    except pg.KernelError as exc:
        raised.append(exc)
    assert len(raised) == 1, raised
    assert "s" in str(raised[0])
    assert pipe.get_stats().iterations == queued >= 59
    pipe.close()


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-1, ValueError), ("8", TypeError),
                                        (True, TypeError), (2.0, TypeError), (None, TypeError),
                                        (1 << 21, ValueError)])
def test_a_bad_timing_sample_is_refused(bad: Any, error: type) -> None:
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        with pytest.raises(error, match="timing_sample"):
            ctx.create_pipeline_manager(timing_sample=bad)
        with pytest.raises(error, match="timing_sample"):
            pg.PipelineStageManager(ctx.async_coordinator(), timing_sample=bad)
        pipe = ctx.create_pipeline_manager(timing_sample=np.int64(3))
        assert pipe.timing_sample == 3 and type(pipe.timing_sample) is int


def test_reset_stats_starts_sampling_again(ctx: pg.ManagedGpuContext) -> None:
    """A new window's first iterations are timed: its statistics never come up empty."""
    pipe = ctx.create_pipeline_manager(timing_sample=16)
    b0 = pipe.add_buffer(64)
    pipe.add_stage(pg.GpuPipelineStage("s", [], [b0], kernel="noop"))
    for _ in range(40):
        pipe.execute_iteration()
    pipe.reset_stats()
    for _ in range(3):
        pipe.execute_iteration()
    stats = pipe.get_stats()
    assert stats.iterations == 3 and set(stats.stage_ms) == {"s"}
    assert stats.throughput > 0
    pipe.close()


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.skipif(
    not _core.COMPILED, reason=f"the compiled core is {_core.STATUS}"))])
def test_untimed_timers_count_reports_failures_and_live_iterations(
        monkeypatch: pytest.MonkeyPatch, compiled: bool) -> None:
    """The timers of untimed ops (Python closures, or the compiled Tally): every report
    counts towards the lane's REPORTED, a failed op's id is noted whatever the window,
    and an op ending an iteration counts one only while the window is live."""
    from prism_gpu import _sampling
    from prism_gpu._stats import REPORTED

    if not compiled:
        monkeypatch.setattr(_sampling, "_C", None)
    win = SampledWindow(4)
    win.start(StampEvent(0.0))
    failed: Set[int] = set()
    mid, last = win.timer("s", False, failed), win.timer("s", True, failed)
    mid(ReportedOp(1, 1.0), None)
    last(ReportedOp(2, 2.0, RuntimeError("x")), None)
    last(ReportedOp(3, 3.0), None)
    assert win.lane("s")[REPORTED] == 3 and failed == {2}
    win.end()
    last(ReportedOp(4, 4.0, RuntimeError("y")), None)
    assert failed == {2, 4} and win.lane("s")[REPORTED] == 4
    assert win.stats().iterations == 2
