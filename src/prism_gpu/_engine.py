"""The engine: streams, pooled events, submission with waits, harvest and throttle. The
only caller of a backend's stream and event protocol. Every op ends with a pooled event,
pooled again only once the op is known complete, so depending on op N always waits for
op N. Past ``max_in_flight`` ops in flight a submit blocks on the oldest. Submission and
completion, the hot path, are :mod:`prism_gpu._core`'s (compiled where built)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import _nvtx
from ._core import RECLAIM, EngineCore, Op
from ._errors import InvalidOperationError
from ._failures import dependency_error, own_error, refuse_in_callback
from ._inflight import D2H, H2D, LAUNCH, Lane, Root
from ._optable import OpTable, scrub
from .backends._protocol import Device, Event

__all__ = ["Engine", "Lane", "Op", "Root", "H2D", "D2H", "LAUNCH"]


class Engine(EngineCore):
    """Submits ops to streams in order, and completes them.

    Parameters
    ----------
    device:
        The backend device (the engine is the only caller of its streams and events).
    table:
        Where ids come from and completions go.
    max_in_flight:
        Ops submitted and not known complete; past it, submitting waits for the oldest.
    timing:
        Default for whether ops carry start/end timing events."""

    def __init__(self, device: Device, table: OpTable, *, max_in_flight: int = 1024,
                 timing: bool = False) -> None:
        self.device = device
        self.table = table
        self.max_in_flight = int(max_in_flight)
        self.timing = bool(timing)
        self.inflight: Dict[int, Op] = {}
        self.lanes: List[Lane] = []
        self._pool: List[Event] = []
        self._tpool: List[Event] = []
        self._pool_cap = min(2 * self.max_in_flight + 64, 1 << 62)  # (events kept per pool)
        self._reclaim_at = RECLAIM  # ops in flight at which a submit short of events looks
        # id(exception) -> (exception, root): attributes a failure carried to a
        # dependent op (CPU streams pass it through waits) to its root op
        self._roots: "OrderedDict[int, Tuple[BaseException, Root]]" = OrderedDict()
        self.in_callback: Any = False  # True in callbacks and close, KERNEL in a launch
        self._tracer: Any = None  # the trace recording our ops, and the list of completed
        self._traced: Any = None  # ones it reads their times from
        self._callback_errors: List[BaseException] = []
        self.closed = False
        self.owner = threading.get_ident()  # the thread whose calls drive it

    # lanes and events -----------------------------------------------------------
    def lane(self, name: str, priority: int = 0) -> Lane:
        lane = Lane(self.device.create_stream(priority), name)
        self.lanes.append(lane)
        return lane

    def give_timing_events(self, events: List[Event]) -> None:
        """Give back timing events (a trace's, once it read their times)."""
        keep = max(0, self._pool_cap - len(self._tpool))
        self._tpool.extend(events[:keep])
        for ev in events[keep:]:
            ev.close()

    def trace_ended(self) -> None:
        """The trace recording this engine's ops ended: later completions are not its."""
        self._tracer = self._traced = None

    pooled_events = property(lambda self: len(self._pool) + len(self._tpool))

    def mark(self, lane: Lane) -> Event:
        """A timing event recorded now on ``lane`` (a stats window's reference)."""
        ev = self._tpool.pop() if self._tpool else self.device.create_event(True)
        lane.stream.record(ev, stamp=True)
        return ev

    def _drop_start(self, op: Op, mark: Any = None) -> None:
        if mark is not None:
            _nvtx.range_end(mark)
        if op.start is not None:
            self.give_event(op.start)
            op.start = None

    def _note_root(self, exc: BaseException, root: Root) -> None:
        roots = self._roots
        roots[id(exc)] = (exc, root)
        if len(roots) > 1024:
            roots.popitem(last=False)

    def _attribute(self, op: Op, exc: BaseException) -> BaseException:
        """The error of ``op`` whose record carries the failure ``exc``."""
        hit = self._roots.get(id(exc))
        if hit is None:
            # the op that raised it may sit on a lane not harvested yet: complete it first
            for dep in op.deps:
                ev = dep.event
                if ev is None or ev.error() is not exc:
                    continue
                if dep.lane in self.lanes:
                    self._harvest_lane(dep.lane, dep)
                    hit = self._roots.get(id(exc))
                else:  # an op of another coordinator (a shared ring): it is the root
                    return dependency_error(op, (dep.id, exc))
                break
        if hit is not None and hit[0] is exc and hit[1][0] != op.id:
            return dependency_error(op, hit[1])
        scrub(exc)
        err = own_error(op, exc)
        self._note_root(exc, (op.id, err))
        return err

    def raise_callback_errors(self) -> None:
        """Raise (once) what ``on_done`` callbacks raised since the last call (public calls)."""
        if not self._callback_errors:  # (the common case: nothing to take)
            return
        errs = self.take_callback_errors()
        if errs:
            raise errs[0] if len(errs) == 1 else BaseExceptionGroup("on_done raised", errs)

    def take_callback_errors(self) -> List[BaseException]:
        errs, self._callback_errors = self._callback_errors, []
        return errs

    def throttle(self) -> None:
        """Bring ops in flight under ``max_in_flight``, blocking on the oldest if need be."""
        self.harvest()
        while len(self.inflight) >= self.max_in_flight:
            oldest = next(iter(self.inflight.values()))
            oldest.event.synchronize()
            self.harvest(oldest)

    def wait_ops(self, ops: Sequence[Op]) -> None:
        """Block until ``ops`` completed (another engine's, of a shared ring, by events)."""
        for op in ops:
            ev = op.event
            if ev is not None:
                if op.lane in self.lanes:
                    self.wait(op.id)
                else:
                    ev.synchronize()

    def is_done(self, oid: int) -> bool:
        if self.in_callback:
            refuse_in_callback(self.in_callback)
        op = self.inflight.get(oid)
        if op is None:
            return True
        if op.event.query():
            self.harvest(op)
            return True
        return False

    def synchronize(self, lanes: Optional[Sequence[Lane]] = None) -> None:
        for lane in self.lanes if lanes is None else lanes:
            lane.stream.synchronize()
        self.harvest()

    # lifetime -------------------------------------------------------------------
    def check_open(self) -> None:
        if self.closed:
            raise InvalidOperationError("this coordinator is closed")
        if self.device.closed:
            raise InvalidOperationError("the device (or context) of this coordinator is closed")

    def close(self, wait: bool = True) -> None:
        """Finish what is queued (when ``wait``), then free streams and events."""
        if self.closed:
            return
        try:
            if wait and not self.device.closed:
                for lane in self.lanes:
                    lane.stream.synchronize()
            self.in_callback = True  # callbacks during close do not re-enter
            for lane in self.lanes:
                while lane.ops:
                    self._complete(lane.ops.popleft())
            if self._tracer is not None:  # it holds timing events of ours: read them now
                self._tracer.read_times()
        finally:
            self.in_callback = False
            self.closed = True
            interrupted = None  # a second Ctrl-C in one stream's close: the rest close first
            for lane in self.lanes:
                try:
                    lane.stream.close()
                except BaseException as exc:  # noqa: BLE001 - raised below
                    interrupted = interrupted or exc
            for ev in self._pool + self._tpool:
                ev.close()
            self._pool, self._tpool = [], []
            self._roots.clear()
        if interrupted is not None:
            raise interrupted
