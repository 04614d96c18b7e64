"""The engine: streams, pooled events, submission with waits, harvest and throttle. The
only caller of a backend's stream and event protocol. Every op ends with a pooled event,
pooled again only once the op is known complete, so depending on op N always waits for
op N. Past ``max_in_flight`` ops in flight a submit blocks on the oldest."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import _nvtx, _trace
from ._errors import InvalidOperationError, PrismGpuError
from ._ops import OpType
from ._failures import KERNEL, dependency_error, own_error, refuse_in_callback, root_of
from ._inflight import D2H, H2D, LAUNCH, Lane, Op, Root
from ._optable import OpTable, scrub
from .backends._protocol import Device, Event

__all__ = ["Engine", "Lane", "Op", "Root", "H2D", "D2H", "LAUNCH"]


class Engine:
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
        self._pool_cap = 2 * self.max_in_flight + 64
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

    def give_event(self, ev: Event) -> None:
        pool = self._tpool if ev.timing else self._pool
        if len(pool) < self._pool_cap:
            pool.append(ev)
        else:
            ev.close()

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

    # submission -----------------------------------------------------------------
    def submit(self, lane: Lane, op_type: OpType, name: Optional[str], deps: Sequence[Op],
               quiet: Sequence[Op], kind: int, a: Any, b: Any, c: Any = None, d: Any = None,
               keep: Any = None, on_done: Optional[Callable[[Op, Optional[float]], None]] = None,
               timing: Optional[bool] = None, root: Optional[Root] = None) -> Op:
        """Queue one op on ``lane`` and return it, in flight, with its id.

        ``lane`` first waits for ops ``deps`` (data dependencies: a failure of
        theirs fails this op) and ``quiet`` (ordering only: write-after-read
        hazards), those still in flight, whichever coordinator queued them. Then
        the work: ``kind`` H2D copies ``b`` into ``a``, D2H copies ``b`` into
        ``a``, LAUNCH launches prepared kernel ``a`` with config ``b``, arrays
        ``c`` and extra ``d``. If a dependency is known to have failed (or
        ``root`` names such a failure), nothing runs and the op fails with
        DependencyFailedError. A launch rejected while queueing raises (after waits that
        only order); a callable raising while queued (CUDA runs them here) fails the
        op, and may not re-enter the engine. ``keep`` lives until the op completes;
        ``on_done(op, ms)`` runs then."""
        if self.in_callback:
            refuse_in_callback(self.in_callback)
        inflight = self.inflight
        if len(inflight) >= self.max_in_flight:
            self.throttle()
        op = Op(op_type, lane, name)
        stream = lane.stream
        op.deps = deps
        for dep in deps:
            ev = dep.event
            if ev is not None:
                stream.wait(ev)
            if root is None and dep.error is not None:
                root = root_of(dep)
        for dep in quiet:
            ev = dep.event
            if ev is not None:
                stream.wait(ev, propagate=False)
        timed = self.timing if timing is None else timing  # asked for, apart from tracing
        tracer = _trace.ACTIVE
        if tracer is not None:
            # a traced op: a start stamp, and its closing record (a timing event) is its end
            if self._tracer is not tracer:
                self._traced = tracer.begin(self, lane)  # where completed ops go
                self._tracer = tracer
            op.trace = (_trace.STATE.index,
                        b.nbytes if kind == H2D else a.nbytes if kind == D2H else 0, timed,
                        tracer)
        mark = _nvtx.range_start(lane.name, op_type.value, name) if _nvtx.ON else None
        start = None
        if timed or tracer is not None:
            pool = self._tpool
            start = op.start = pool.pop() if pool else self.device.create_event(True)
            stream.record(start, stamp=True)
        table = self.table
        oid = table.next
        if root is not None:
            op.error = dependency_error(op, root, oid=oid)
        else:
            try:
                if kind == LAUNCH:
                    self.in_callback = KERNEL  # a callable runs here on CUDA: no re-entry
                    try:
                        stream.launch(a, b, c, d)
                    finally:
                        self.in_callback = False
                elif kind == H2D:
                    stream.copy_h2d(a, b)
                else:
                    stream.copy_d2h(a, b)
            except Exception as exc:
                if kind != LAUNCH or isinstance(exc, PrismGpuError):  # refused: raised here
                    self._drop_start(op, mark)
                    raise
                op.error = own_error(op, exc, oid)
                self._note_root(exc, (oid, op.error))
        if start is not None:
            # a timed or traced op's closing event is its end stamp: one record fewer than
            # an end stamp and an untimed closing event, and less driver time in all,
            # waits on it included (benchmarks/trace_designs.py)
            pool = self._tpool
            ev = op.event = op.end = pool.pop() if pool else self.device.create_event(True)
        else:
            pool = self._pool
            ev = op.event = pool.pop() if pool else self.device.create_event(False)
        stream.record(ev)
        op.keep = keep
        op.on_done = on_done
        op.id = oid
        table.next = oid + 1
        lane.ops.append(op)
        inflight[oid] = op
        if mark is not None:
            _nvtx.range_end(mark)
        return op

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

    def _complete(self, op: Op) -> None:
        self.inflight.pop(op.id, None)  # (absent if a Ctrl-C cut its submit short)
        ev = op.event
        err = op.error
        if err is None:
            fault = ev.error()
            if fault is not None:
                err = op.error = self._attribute(op, fault)
            elif op.deps:
                for dep in op.deps:
                    if dep.error is not None:
                        err = op.error = dependency_error(op, root_of(dep))
                        break
        start = op.start
        duration = None
        tr = op.trace
        if start is None:  # an untimed op's closing event (a timed op's is its end)
            self._pool.append(ev)
        if start is not None and (tr is None or tr[2]):
            duration = op.end.elapsed_ms(start)
        cb = op.on_done
        if cb is not None:
            try:
                cb(op, duration)
            except BaseException as exc:  # noqa: BLE001 - raised by the call that harvested,
                self._callback_errors.append(exc)  # after the bookkeeping (Ctrl-C too)
            op.on_done = None
        held = None
        if tr is not None and tr[3] is self._tracer:
            held = self._traced  # the trace reads the times later (in batches), gives back
            held.append(op)
        elif start is not None:  # (an op whose trace ended: its times are not wanted)
            self.give_event(start)
            self.give_event(op.end)  # its closing event
            op.start = op.end = op.trace = None
        self.table.complete(op.id, op.type, duration, err)
        op.keep = op.event = None
        op.deps = ()  # completed ops keep no chain of earlier ops alive
        if held is not None and len(held) >= _trace.Trace.HELD_EVENTS:
            tr[3].read_times(force=False)  # its trace (which may end meanwhile)

    def _harvest_lane(self, lane: Lane, upto: Optional[Op] = None) -> None:
        """Complete the done ops at the head of ``lane`` (through ``upto``, known done).

        A lane is one stream, so its ops complete in order: when the newest is done all
        are (asked first: a GPU that keeps up with the host is retired in one query), and
        otherwise the boundary is found by bisection, a few queries however many.
        """
        ops = lane.ops
        complete = self._complete
        if upto is not None:
            while ops:
                head = ops.popleft()
                complete(head)
                if head is upto:
                    return
            return
        if not ops:
            return
        if ops[-1].event.query():
            count = len(ops)
        elif len(ops) == 1 or not ops[0].event.query():
            return
        else:
            lo, hi = 0, len(ops) - 1  # ops[lo] done, ops[hi] not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if ops[mid].event.query():
                    lo = mid
                else:
                    hi = mid
            count = hi
        for _ in range(count):
            complete(ops.popleft())

    def harvest(self, upto: Optional[Op] = None) -> None:
        """Complete every op known done (through ``upto`` on its lane, known done).
        Re-entrant calls (from an ``on_done`` callback) do nothing."""
        if self.in_callback:
            return
        self.in_callback = True
        try:
            if upto is not None:
                self._harvest_lane(upto.lane, upto)
            for lane in self.lanes:
                if lane.ops:
                    self._harvest_lane(lane)
        finally:
            self.in_callback = False

    def raise_callback_errors(self) -> None:
        """Raise (once) what ``on_done`` callbacks raised since the last call (public calls)."""
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

    def wait(self, oid: int, timeout: Optional[float] = None) -> bool:
        """Block until op ``oid`` completes (False if ``timeout`` passed first)."""
        if self.in_callback:
            refuse_in_callback(self.in_callback)
        op = self.inflight.get(oid)
        if op is None:
            return True
        if not op.event.synchronize(timeout):
            return False
        self.harvest(op)
        return True

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
