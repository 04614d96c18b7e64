"""A pipeline's statistics window, in constant memory however long it runs."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

__all__ = ["Window", "merge"]

Interval = Tuple[float, float]


def merge(intervals: List[Interval]) -> List[Interval]:
    """The union of ``intervals`` as sorted, disjoint intervals."""
    out: List[Interval] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


class Window:
    """Timings of one stats window: running sums, and busy time as a union of intervals.

    Intervals are folded into a running total once no interval still to come can
    overlap them: a stream runs its ops in order, so an op reported later on a
    lane starts after that lane's last reported end, and nothing still to come
    starts before the smallest such end over the lanes seen (a pipeline's lanes
    all report in its first iteration).
    """

    FOLD_AT = 512

    def __init__(self) -> None:
        self.ref: Any = None
        self.first_iter = 0
        self._ref_done = False
        self._pending: List[Interval] = []
        self._busy_folded = 0.0
        self._lane_end: Dict[str, float] = {}
        self._sum: Dict[str, float] = {}
        self._n: Dict[str, int] = {}
        self._ends = 0
        self._first_end = float("inf")
        self._last_end = float("-inf")
        self._t0 = float("inf")

    def start(self, ref: Any, first_iter: int) -> None:
        self.ref = ref
        self.first_iter = first_iter
        self._ref_done = False

    def settled_ref(self) -> Any:
        """The reference event, known complete (asked of the device once per window):
        it is recorded on one stream, and an op of another can land before it."""
        if not self._ref_done:
            if not self.ref.query():
                self.ref.synchronize()
            self._ref_done = True
        return self.ref

    def add(self, lane: str, start: float, end: float, last: bool) -> None:
        self._pending.append((start, end))
        self._sum[lane] = self._sum.get(lane, 0.0) + (end - start)
        self._n[lane] = self._n.get(lane, 0) + 1
        if end > self._lane_end.get(lane, float("-inf")):
            self._lane_end[lane] = end
        if start < self._t0:
            self._t0 = start
        if last:
            self._ends += 1
            self._first_end = min(self._first_end, end)
            self._last_end = max(self._last_end, end)
        if len(self._pending) > self.FOLD_AT:
            self._fold()

    def _fold(self) -> None:
        merged = merge(self._pending)
        mark = min(self._lane_end.values())
        keep: List[Interval] = []
        for a, b in merged:
            if b <= mark:
                self._busy_folded += b - a
            else:
                keep.append((a, b))
        self._pending = keep

    def stats(self) -> Any:
        """The window as :class:`PipelineStats`."""
        from ._stage import PipelineStats

        n = self._ends
        if n == 0:
            return PipelineStats(0, 0.0, 0.0, 0.0, {})
        busy = self._busy_folded + sum(b - a for a, b in merge(self._pending))
        span = self._last_end - self._t0
        return PipelineStats(
            iterations=n,
            avg_iteration_ms=(self._last_end - self._first_end) / (n - 1) if n > 1 else span,
            throughput=n / (span / 1e3) if span > 0 else 0.0,
            gpu_utilization=min(1.0, busy / span) if span > 0 else 0.0,
            stage_ms={s: self._sum[s] / self._n[s] for s in self._sum})
