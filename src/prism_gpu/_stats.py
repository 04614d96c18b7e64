"""A pipeline's statistics window, in constant memory however long it runs."""

from __future__ import annotations

from operator import itemgetter
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

__all__ = ["Window", "merge", "fold", "SUM", "UNTIMED", "END", "QUEUED", "REPORTED"]

Interval = Tuple[float, float]
_start = itemgetter(0)


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


def fold(intervals: List[Interval], mark: float) -> Tuple[float, List[Interval], float]:
    """The union of ``intervals``: the length of its parts that end by ``mark``, the
    rest as sorted, disjoint intervals (one sweep, as :func:`merge` then a split), and
    the earliest start (inf if none)."""
    done = 0.0
    keep: List[Interval] = []
    if not intervals:
        return done, keep, float("inf")
    ordered = sorted(intervals, key=_start)  # (float keys: the fast comparison)
    lo, hi = ordered[0]
    for a, b in ordered:
        if a <= hi:
            if b > hi:
                hi = b
            continue
        if hi <= mark:
            done += hi - lo
        else:
            keep.append((lo, hi))
        lo, hi = a, b
    if hi <= mark:
        done += hi - lo
    else:
        keep.append((lo, hi))
    return done, keep, ordered[0][0]


# a lane's accumulator: [sum of op times (ms), ops reported untimed, last end, ops queued,
# ops reported] (those timed: reported less untimed, one count fewer per report)
SUM, UNTIMED, END, QUEUED, REPORTED = range(5)


class Window:
    """Timings of one stats window: running sums, and busy time as a union of intervals.

    Ops report through :meth:`timer` callbacks, one per (lane, last), made once and
    shared by every op of the lane (they keep the lane's sums, which reach its
    accumulator when the window reads them: a fold, the stats); whoever queues an op
    with one adds 1 to its lane's ``QUEUED`` count (:meth:`lane`) once the op is queued.
    A window is live until :meth:`end`: a callback of an ended window records nothing
    (its reference event may be in use again).

    Intervals are folded into a running total once no interval still to come can
    overlap them: a stream runs its ops in order, so an op of a lane with ops in
    flight starts after that lane's last reported end, and an op queued later starts
    after every end reported so far. Nothing still to come starts before the smallest
    last end over the lanes with ops in flight (a lane used once and never again holds
    nothing back).
    """

    FOLD_AT = 512

    __slots__ = ("ref", "live", "_settled", "_pending", "_busy_folded", "_lanes", "_count",
                 "_first_end", "_last_end", "_t0", "_timers", "_syncs")

    def __init__(self) -> None:
        self.ref: Any = None
        self.live = True
        self._settled: Any = None  # ref, once known complete
        # intervals not folded yet; changed in place only (the callbacks hold it)
        self._pending: List[Interval] = []
        self._busy_folded = 0.0
        self._lanes: Dict[str, List[Any]] = {}  # lane -> its accumulator (SUM, ...)
        self._count = 0  # iterations ended
        self._first_end = float("inf")
        self._last_end = float("-inf")
        self._t0 = float("inf")  # the earliest start folded
        self._timers: Dict[str, Tuple[Any, ...]] = {}  # lane -> (failed, its two timers)
        self._syncs: List[Callable[[], None]] = []  # each writes a lane's sums into acc

    def start(self, ref: Any) -> None:
        """Times are measured from timing event ``ref``, recorded before the window's
        first op."""
        self.ref = ref
        self._settled = None

    def end(self) -> None:
        """No more reports: callbacks of ops still in flight record nothing."""
        self.live = False

    def settled_ref(self) -> Any:
        """The reference event, known complete (asked of the device once per window):
        it is recorded on one stream, and an op of another can land before it."""
        ref = self._settled
        if ref is None:
            ref = self.ref
            if not ref.query():
                ref.synchronize()
            self._settled = ref
        return ref

    def lane(self, name: str) -> List[Any]:
        """The accumulator of lane ``name`` (indexed by ``SUM``, ``UNTIMED``, ``END``,
        ``QUEUED``, ``REPORTED``)."""
        acc = self._lanes.get(name)
        if acc is None:
            acc = self._lanes[name] = [0.0, 0, float("-inf"), 0, 0]
        return acc

    def timer(self, lane: str, last: bool,
              failed: Set[int]) -> Callable[[Any, Optional[float]], None]:
        """An engine ``on_done`` for the timed ops of ``lane`` (``last``: each ends an
        iteration): adds a failed op's id to ``failed`` (whatever the window; one set per
        lane) and, while the window is live, records the op's start and end."""
        timers = self._timers.get(lane)
        if timers is None:
            timers = self._timers[lane] = self._make_timers(lane, failed)
        elif timers[0] is not failed:
            raise ValueError(f"the timers of lane {lane!r} add failed ops to another set")
        return timers[2] if last else timers[1]

    def _make_timers(self, lane: str, failed: Set[int]) -> Tuple[Any, ...]:
        """(failed, the timer of ops going on, of ops ending an iteration) of ``lane``. They
        keep the lane's running sums in their closure (cheaper to add to than a list's),
        which ``sync`` writes into its accumulator whenever the window reads them."""
        acc = self.lane(lane)
        pending = self._pending
        push = pending.append
        fold_at = self.FOLD_AT
        total, end_, reported, untimed = acc[SUM], acc[END], acc[REPORTED], acc[UNTIMED]

        def sync() -> None:
            acc[SUM], acc[END], acc[REPORTED], acc[UNTIMED] = total, end_, reported, untimed

        def make(last: bool) -> Callable[[Any, Optional[float]], None]:
            def done(op: Any, ms: Optional[float]) -> None:
                nonlocal total, end_, reported, untimed
                if op.error is not None:
                    failed.add(op.id)
                if not self.live:
                    return
                reported += 1
                if ms is None:  # untimed (a pipeline's ops are timed: its copies and stages)
                    untimed += 1
                    return
                # its end since the reference, and its start as end - ms: one event read
                # fewer, and the op's own time exact (not a difference of two times since
                # the ref)
                ref = self._settled
                if ref is None:
                    ref = self.settled_ref()
                end = op.end.elapsed_ms(ref)
                push((end - ms, end))
                total += ms
                end_ = end  # (a lane reports in stream order: its ends grow)
                if last:
                    self._count += 1
                    if end < self._first_end:
                        self._first_end = end
                    if end > self._last_end:
                        self._last_end = end
                if len(pending) > fold_at:
                    self._fold()
            return done
        self._syncs.append(sync)
        return failed, make(False), make(True)

    def _fold(self) -> None:
        for sync in self._syncs:
            sync()
        mark = min((acc[END] for acc in self._lanes.values() if acc[QUEUED] > acc[REPORTED]),
                   default=float("inf"))
        done, keep, first = fold(self._pending, mark)
        self._busy_folded += done
        self._pending[:] = keep
        if first < self._t0:  # (every interval passes through a fold or the last stats)
            self._t0 = first

    def stats(self) -> Any:
        """The window as :class:`PipelineStats`."""
        from ._stage import PipelineStats

        for sync in self._syncs:
            sync()
        n = self._count
        if n == 0:
            return PipelineStats(0, 0.0, 0.0, 0.0, {})
        done, _, first = fold(self._pending, float("inf"))
        busy = self._busy_folded + done
        span = self._last_end - min(self._t0, first)
        return PipelineStats(
            iterations=n,
            avg_iteration_ms=(self._last_end - self._first_end) / (n - 1) if n > 1 else span,
            throughput=n / (span / 1e3) if span > 0 else 0.0,
            gpu_utilization=min(1.0, busy / span) if span > 0 else 0.0,
            stage_ms={s: acc[SUM] / (acc[REPORTED] - acc[UNTIMED])
                      for s, acc in self._lanes.items() if acc[REPORTED] - acc[UNTIMED]})
