"""A pipeline's statistics window that times one iteration in ``sample``: runs of
consecutive timed iterations, the rest untimed (a timing event pair costs about 3 us of
host time per op on an H100 host, more than the rest of a tiny op's submission).

What each statistic becomes (:class:`SampledWindow`):

- ``iterations``: every iteration of the window (timed or not).
- ``stage_ms``: the mean over the timed ops of each stage.
- ``avg_iteration_ms`` and ``throughput``: exact, over the iterations from the window's
  first to its last timed one (both ends are timing events).
- ``gpu_utilization``: the busy fraction inside each run's *clean window*, the time in
  which only that run's ops can be running: from the latest first start over the run's
  lanes (a stream runs its ops in order: every earlier op of the lane has ended) to the
  earliest last end (every later op of a lane starts after it). The window's first run
  reaches back to its first op and the last run, with nothing queued after it, to its
  last end. A run counts only where no other lane had ops in flight when it began, and
  no iteration used another lane while its ops were in flight.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, FrozenSet, List, Optional, Set, Tuple

from ._core import compiled_module
from ._stats import QUEUED, REPORTED, Window, merge

__all__ = ["SampledWindow", "Run"]

RUN_MIN = 16  # iterations of a run, at least (and twice its lanes, plus four)
_C = compiled_module()  # (its Tally: the untimed timers, compiled)
_INF = float("inf")


class Run:
    """The timed ops of iterations ``first`` to ``last`` of a window, on ``lanes``."""

    __slots__ = ("first", "last", "stop", "lanes", "queued", "reported", "closed", "valid",
                 "intervals", "bounds", "end_lo", "end_hi", "_win", "_timers")

    def __init__(self, win: "SampledWindow", first: int, lanes: FrozenSet[str],
                 valid: bool) -> None:
        self._win = win
        self.first = self.last = first
        self.stop = first + max(RUN_MIN, 2 * len(lanes) + 4) - 1  # its last iteration
        self.lanes = lanes
        self.queued = 0     # ops queued, reported (a closed run with both equal is complete)
        self.reported = 0
        self.closed = False
        self.valid = valid  # counts towards the utilization (see the module's doc)
        self.intervals: List[Tuple[float, float]] = []
        self.bounds: Dict[str, List[float]] = {}  # lane -> [its first start, its last end]
        self.end_lo = _INF   # the earliest and latest end of an iteration's last op
        self.end_hi = -_INF
        self._timers: Dict[Tuple[str, bool], Callable[[Any, Optional[float]], None]] = {}

    def timer(self, lane: str, last: bool,
              failed: Set[int]) -> Callable[[Any, Optional[float]], None]:
        """The ``on_done`` of this run's ops of ``lane`` (``last``: each ends an iteration)."""
        hit = self._timers.get((lane, last))
        if hit is None:
            hit = self._timers[(lane, last)] = self._make(lane, last, failed)
        return hit

    def _make(self, lane: str, last: bool,
              failed: Set[int]) -> Callable[[Any, Optional[float]], None]:
        win = self._win
        sums = win.timed_sums(lane)
        acc = win.lane(lane)
        intervals, bounds = self.intervals, self.bounds

        def done(op: Any, ms: Optional[float]) -> None:
            acc[REPORTED] += 1
            if op.error is not None:
                failed.add(op.id)
            if not win.live:
                return
            self.reported += 1
            if last:
                win.ended += 1
            if ms is None:  # (not timed after all)
                return
            end = op.end.elapsed_ms(win.settled_ref())
            start = end - ms
            intervals.append((start, end))
            b = bounds.get(lane)
            if b is None:
                bounds[lane] = [start, end]
            else:
                b[1] = end  # (a lane reports in stream order)
            sums[0] += ms
            sums[1] += 1
            if last:
                if end < self.end_lo:
                    self.end_lo = end
                if end > self.end_hi:
                    self.end_hi = end
        return done

    def clean(self, queued_after: bool) -> Tuple[float, float, float]:
        """(start, end, busy time) of the clean window (busy 0 when it is empty)."""
        if not self.intervals:
            return 0.0, 0.0, 0.0
        starts = [b[0] for b in self.bounds.values()]
        ends = [b[1] for b in self.bounds.values()]
        lo = min(a for a, _ in self.intervals) if self.first == 0 else max(starts)
        hi = min(ends) if queued_after else max(b for _, b in self.intervals)
        busy = 0.0
        if hi > lo:
            for a, b in merge(self.intervals):
                a, b = max(a, lo), min(b, hi)
                if b > a:
                    busy += b - a
        return lo, hi, busy


class SampledWindow(Window):
    """A statistics window timing runs of consecutive iterations, one iteration in
    ``sample`` (``sample`` > 1); the pipeline asks :meth:`begin` before each iteration."""

    __slots__ = ("sample", "queued", "ended", "_open", "_closed", "_next", "_shape", "_sums",
                 "_folded", "_tallies")

    def __init__(self, sample: int) -> None:
        super().__init__()
        self.sample = sample
        self.queued = 0   # iterations begun
        self.ended = 0    # iterations whose last op reported (while live), but those the
        self._tallies: List[Any] = []  # compiled timers of untimed iterations count
        self._open: Optional[Run] = None      # the run taking iterations
        self._closed: List[Run] = []          # closed runs not yet folded
        self._next = 0                        # the iteration the next run starts at
        self._shape: Optional[FrozenSet[str]] = None  # the lanes of the last iteration
        self._sums: Dict[str, List[float]] = {}  # lane -> [timed ms, timed ops]
        # the runs folded: busy time and length of the clean windows that count, and of
        # every one; the first run's first start; the earliest and latest end of a timed
        # iteration, and the index of the latest
        self._folded = [0.0, 0.0, 0.0, 0.0, _INF, _INF, -_INF, -1.0]

    def timed_sums(self, lane: str) -> List[float]:
        hit = self._sums.get(lane)
        if hit is None:
            hit = self._sums[lane] = [0.0, 0]
        return hit

    def _make_timers(self, lane: str, failed: Set[int]) -> Tuple[Any, ...]:
        """The timers of the untimed iterations: they note failures, count the lane's
        reports (a lane with none in flight holds no run back) and iterations."""
        acc = self.lane(lane)
        if _C is not None:
            tallies = [_C.Tally(acc, REPORTED, failed, ends) for ends in (False, True)]
            self._tallies.append(tallies[1])
            return failed, tallies[0], tallies[1]

        def mid(op: Any, ms: Optional[float]) -> None:
            acc[REPORTED] += 1
            if op.error is not None:
                failed.add(op.id)

        def last(op: Any, ms: Optional[float]) -> None:
            acc[REPORTED] += 1
            if op.error is not None:
                failed.add(op.id)
            if self.live:
                self.ended += 1
        return failed, mid, last

    def _quiet_but(self, lanes: FrozenSet[str]) -> bool:
        """Whether every lane of the window but ``lanes`` has no op in flight."""
        return all(acc[QUEUED] <= acc[REPORTED] for name, acc in self._lanes.items()
                   if name not in lanes)

    def end(self) -> None:
        super().end()
        for t in self._tallies:
            t.live = False

    def begin(self, lanes: FrozenSet[str]) -> Optional[Run]:
        """Iteration ``queued`` begins, using ``lanes``: the run timing it, or None."""
        i = self.queued
        self.queued = i + 1
        run = self._open
        if run is not None and i > run.stop:
            self._close(run)
            run = None
        if lanes is not self._shape and self._reshape(lanes):  # (identical while it stays)
            self._fold()  # (a run whose ops all ended is safe)
            for r in self._closed:
                if not lanes <= r.lanes:  # its ops may overlap those of a lane it lacks
                    r.valid = False
            if run is not None:  # the lanes' ops are its own from now: timed, in its window
                run.lanes = run.lanes | lanes
        if run is not None:
            run.last = i
            return run
        if i < self._next:
            return None
        self._fold()
        run = self._open = Run(self, i, lanes, self._quiet_but(lanes))
        self._next = i + (run.stop - i + 1) * self.sample
        return run

    def _reshape(self, lanes: FrozenSet[str]) -> bool:
        """Iterations now use ``lanes``: whether that changes the lanes used."""
        changed = lanes != self._shape
        self._shape = lanes
        return changed

    def _close(self, run: Run) -> None:
        run.closed = True
        self._closed.append(run)
        self._open = None

    def _fold(self) -> None:
        """Fold the closed runs whose ops all reported (every one, once stats are read)."""
        keep: List[Run] = []
        for run in self._closed:
            if run.reported < run.queued:
                keep.append(run)
                continue
            _add(run, run.last + 1 < self.queued, self._folded)
        self._closed = keep

    def stats(self) -> Any:
        """The window as :class:`PipelineStats` (its ops all reported: the pipeline waits
        for them first)."""
        from ._stage import PipelineStats

        n = self.ended + sum(t.ended for t in self._tallies)
        if n == 0:
            return PipelineStats(0, 0.0, 0.0, 0.0, {})
        t = list(self._folded)  # (with the runs not folded yet)
        for run in [*self._closed, *([self._open] if self._open is not None else [])]:
            _add(run, run.last + 1 < self.queued, t)
        busy, span, any_busy, any_span, t0, end_lo, end_hi, last = t
        if end_hi == -_INF:  # (no timed iteration ended)
            return PipelineStats(n, 0.0, 0.0, 0.0, {})
        whole = end_hi - t0
        if span <= 0:  # no run counts: every clean window, whatever the lanes
            busy, span = any_busy, any_span
        return PipelineStats(
            iterations=n,
            avg_iteration_ms=(end_hi - end_lo) / last if last > 0 else whole,
            throughput=(last + 1) / (whole / 1e3) if whole > 0 else 0.0,
            gpu_utilization=min(1.0, busy / span) if span > 0 else 0.0,
            stage_ms={s: v[0] / v[1] for s, v in self._sums.items() if v[1]})


def _add(run: Run, queued_after: bool, t: List[float]) -> None:
    """Add run ``run``'s clean window and timed ends to totals ``t`` (as ``_folded``)."""
    lo, hi, busy = run.clean(queued_after)
    if hi > lo:
        t[2] += busy
        t[3] += hi - lo
        if run.valid:
            t[0] += busy
            t[1] += hi - lo
    if run.first == 0 and run.intervals:
        t[4] = min(t[4], min(a for a, _ in run.intervals))
    if run.end_hi > -_INF:
        t[5] = min(t[5], run.end_lo)
        if run.end_hi >= t[6]:
            t[6], t[7] = run.end_hi, max(t[7], run.last)
