"""The engine's hot path: submitting an op and completing it.

:class:`PyEngineCore` is the reference, in Python. ``_ccore`` (C, built where a
compiler is present) does the same statement for statement, about a fifth of the
host time per op; it is used unless ``PRISM_GPU_COMPILED=0`` (or it is not built),
and the test suite runs against both. :class:`EngineCore` and :class:`Op` are the
ones in use. The rest of the engine (lanes, events, waits, close) is
:class:`prism_gpu._engine.Engine`, a subclass.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import _nvtx, _trace
from ._errors import PrismGpuError
from ._failures import KERNEL, dependency_error, own_error, refuse_in_callback, root_of
from ._inflight import D2H, H2D, LAUNCH, Lane, Op as PyOp, Root
from ._ops import OpType
from .backends._protocol import Device, Event

__all__ = ["EngineCore", "Op", "PyEngineCore", "PyOp", "COMPILED", "STATUS"]

Op = PyOp
RECLAIM = 64  # ops in flight between two looks for events to take back (see submit)


class PyEngineCore:
    """Submission and completion of ops; the state is set by the subclass."""

    device: Device
    table: Any
    inflight: Dict[int, Op]
    lanes: List[Lane]
    _pool: List[Event]
    _tpool: List[Event]
    in_callback: Any
    _tracer: Any
    _traced: Any
    _callback_errors: List[BaseException]
    max_in_flight: int
    timing: bool
    _reclaim_at: int
    _pool_cap: int
    _roots: "OrderedDict[int, Tuple[BaseException, Root]]"
    # the subclass's
    throttle: Callable[[], None]
    _drop_start: Callable[..., None]
    _note_root: Callable[[BaseException, Root], None]
    _attribute: Callable[[Op, BaseException], BaseException]

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
        elif len(inflight) >= self._reclaim_at and not (
                self._tpool if timing or (timing is None and self.timing)
                or _trace.ACTIVE is not None else self._pool):
            # no pooled event for this op and RECLAIM ops in flight since the last look:
            # take back the events of those complete (a few queries) rather than make one
            # (a driver call costing about 13 queries); a GPU that keeps up is then served
            # by about RECLAIM events, not max_in_flight
            self.harvest()
            self._reclaim_at = len(inflight) + RECLAIM
        op = PyOp(op_type, lane, name)
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

    def give_event(self, ev: Event) -> None:
        """An event back to its pool (closed past the pool's cap)."""
        pool = self._tpool if ev.timing else self._pool
        if len(pool) < self._pool_cap:
            pool.append(ev)
        else:
            ev.close()

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


def _compiled() -> Tuple[Any, str]:
    """The compiled core or None, and a word on which (what ``prism-gpu info`` says)."""
    if os.environ.get("PRISM_GPU_COMPILED", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "off: PRISM_GPU_COMPILED turns it off"
    try:
        from . import _ccore  # type: ignore[attr-defined]
    except ImportError:  # built without a C compiler
        return None, "off: not built (no C compiler at install)"
    _ccore.setup({"root_of": root_of, "dependency_error": dependency_error,
                  "own_error": own_error, "refuse_in_callback": refuse_in_callback,
                  "KERNEL": KERNEL, "PrismGpuError": PrismGpuError, "trace": _trace,
                  "nvtx": _nvtx})
    return _ccore, "on"


_C, STATUS = _compiled()


def compiled_module() -> Any:
    """The compiled module (also the queue calls'), or None."""
    return _C
COMPILED = _C is not None
if TYPE_CHECKING:
    EngineCore = PyEngineCore
else:
    EngineCore = _C.EngineCore if COMPILED else PyEngineCore
    if COMPILED:
        Op = _C.Op
