"""Seeing the GPU work: a timeline of every op queued inside ``with pg.trace()``.

While a trace is active the engine gives every op timing events and reports
it here when it completes; outside a trace nothing is recorded (the engine
reads one module global per op). Times are device times on one clock per
device, starting at 0 at the first traced op.
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from typing import Any, Dict, List, NamedTuple, Optional, Set, Tuple

__all__ = ["Trace", "TraceOp", "TraceSummary", "trace", "active", "set_index"]


class _State(threading.local):
    index: Optional[int] = None  # the batch or iteration index of this thread's next ops


STATE = _State()  # read by the engine on every traced submit
ACTIVE: Optional["Trace"] = None   # read by the engine on every submit
_lock = threading.Lock()


class TraceOp(NamedTuple):
    """One traced op. ``lane`` names the stream ("upload", "compute", "download", a
    pipeline stage's name; with the device when several are traced);
    ``batch_index`` is the stream_map batch or pipeline iteration, where there is one."""

    op_id: int
    op_type: str
    lane: str
    name: str
    start_ms: float
    end_ms: float
    nbytes: int
    batch_index: Optional[int]
    device: str
    error: Optional[str]

    @property
    def duration_ms(self) -> float:
        return self.end_ms - self.start_ms


class TraceSummary(NamedTuple):
    """What :meth:`Trace.summary` reports.

    ``span_ms``: first start to last end. ``iterations``: ops on the busiest lane
    (one per iteration in a triple-buffered loop). ``achieved_ms``: span per
    iteration. ``floor_ms``: the busiest lane's busy time per iteration, the time
    if everything else overlapped it perfectly. ``efficiency``: floor / achieved.
    ``busy``: each lane's busy fraction of the span. ``overlap``: the fraction of
    the span in which a copy and a kernel ran at the same time.
    """

    ops: int
    span_ms: float
    iterations: int
    achieved_ms: float
    floor_ms: float
    efficiency: float
    busy: Dict[str, float]
    overlap: float


def _union(intervals: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    out: List[Tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _length(intervals: List[Tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _intersect(xs: List[Tuple[float, float]], ys: List[Tuple[float, float]]) -> float:
    i = j = 0
    total = 0.0
    while i < len(xs) and j < len(ys):
        lo, hi = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if hi > lo:
            total += hi - lo
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


class Trace:
    """The ops queued while the trace was active, once they completed."""

    HELD_EVENTS = 256  # completed ops whose events are held before their times are read

    def __init__(self) -> None:
        self._ops: List[TraceOp] = []
        self._timed: List[Tuple[Any, ...]] = []  # ops with times, not yet TraceOps
        self.lost = 0                             # ops whose device closed before the end
        # id(engine) -> (engine, reference event, device name, its completed ops whose
        # times are unread: the engine appends to that list)
        self._refs: Dict[int, Tuple[Any, Any, str, List[Any]]] = {}
        # (kind, ordinal) -> (reference event, device name): one clock per device, kept
        # when the engines that used it close and leave
        self._clocks: Dict[Tuple[str, int], Tuple[Any, str]] = {}
        self._reading = threading.Lock()  # one reader of the lists at a time (threads)
        # lane -> its unique name (weakly: a lane of a closed engine may go, and its id
        # be reused by a new lane), and every name given, so that none is given twice
        self._lanes: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
        self._names: Set[str] = set()
        self.closed = False

    # called by the engine -------------------------------------------------------
    def begin(self, engine: Any, lane: Any) -> List[Any]:
        """Start recording ``engine``'s ops: returns the list it appends its completed
        traced ops to (their timing events are the trace's until it reads their times).
        The device's reference event is recorded on ``lane`` when first needed; device
        objects of one kind and ordinal share it (one clock)."""
        key = id(engine)
        hit = self._refs.get(key)
        if hit is None:
            dev = engine.device
            clock = self._clocks.get((dev.kind, dev.ordinal))
            if clock is None:
                clock = self._clocks[(dev.kind, dev.ordinal)] = (
                    engine.mark(lane), f"{dev.kind}:{dev.ordinal}")
            hit = self._refs[key] = (engine, clock[0], clock[1], [])
        return hit[3]

    def read_times(self, force: bool = True) -> None:
        """Read the times of completed ops and give their events back to their engines
        (the records are built when someone reads ``ops``). Unless ``force``, ops whose
        reference event has not completed yet (its lane still runs work queued before
        the trace) are left for a later call, which never blocks."""
        if not self._reading.acquire(blocking=force):
            return  # another thread reads now: these ops wait for the next batch
        try:
            for key, (engine, ref, dev, held) in list(self._refs.items()):  # threads add
                if held:
                    self._read(engine, ref, dev, held, force)
                if engine.closed and not held:  # it adds nothing more: let it go
                    self._refs.pop(key, None)
        finally:
            self._reading.release()

    def _read(self, engine: Any, ref: Any, dev: str, held: List[Any], force: bool) -> None:
        try:
            if not force and not ref.query():
                return
        except Exception:  # noqa: BLE001 - a lost context: the read below counts the loss
            pass
        ops = held[:]
        del held[:len(ops)]  # in place: the engine appends to this list, maybe now
        for op in ops:  # the op (a ring slot may keep it) lets go of the trace
            op.trace = op.trace[:2]
        try:
            if engine.closed:  # its device is gone: the times went with it
                raise LookupError
            ref.synchronize()  # done already unless forced
            self._timed.extend([(op, op.start.elapsed_ms(ref), op.end.elapsed_ms(ref), dev)
                                for op in ops])
        except Exception:  # noqa: BLE001 - unreadable (a closed device, a lost
            self.lost += len(ops)  # context): counted, the events closed
            for op in ops:
                op.start.close()
                op.end.close()
            return
        back = [op.start for op in ops]
        back.extend([op.end for op in ops])
        engine.give_timing_events(back)

    def _records(self) -> List[TraceOp]:
        self.read_times()
        timed, self._timed = self._timed, []
        for op, t0, t1, dev in timed:
            index, nbytes = op.trace[0], op.trace[1]
            error = op.error
            err = None if error is None else f"{type(error).__name__}: {error}"
            self._ops.append(TraceOp(op.id, op.type.value, self._lane_name(op.lane),
                                     op.name or op.type.value, t0, t1, nbytes, index, dev, err))
        return self._ops

    def _lane_name(self, lane: Any) -> str:
        name = self._lanes.get(lane)
        if name is None:
            name, k = lane.name, 2
            while name in self._names:
                name, k = f"{lane.name}#{k}", k + 1
            self._lanes[lane] = name
            self._names.add(name)
        return name

    def finish(self) -> None:
        """Wait for the traced ops still in flight and read every op's times; the
        engines are told the trace ended even if waiting fails (the error is raised)."""
        errors: List[BaseException] = []
        here = threading.get_ident()
        try:
            for engine, _, _, _ in list(self._refs.values()):
                if engine.device.closed or engine.owner != here:
                    # its traced ops in flight: never complete (a closed device), or are
                    # another thread's to complete (an engine is not thread-safe)
                    self.lost += sum(1 for op in list(engine.inflight.values())
                                     if op.trace is not None and op.trace[3] is self)
                elif not engine.closed:
                    try:
                        engine.synchronize()
                    except Exception as exc:  # noqa: BLE001 - the others still finish
                        errors.append(exc)
            self.read_times()
        finally:
            for engine, _, _, _ in list(self._refs.values()):
                engine.trace_ended()
            self.closed = True
        if errors:
            raise errors[0]

    # the timeline ---------------------------------------------------------------
    @property
    def ops(self) -> List[TraceOp]:
        """Every traced op, by start time, the clock shifted so the first starts at 0."""
        ops = sorted(self._records(), key=lambda o: o.start_ms)
        if not ops:
            return []
        t0: Dict[str, float] = {}
        for o in ops:
            t0.setdefault(o.device, o.start_ms)
        several = len(t0) > 1
        return [o._replace(start_ms=o.start_ms - t0[o.device], end_ms=o.end_ms - t0[o.device],
                           lane=f"{o.device}/{o.lane}" if several else o.lane) for o in ops]

    def lanes(self) -> List[str]:
        seen: Dict[str, None] = {}
        for o in self.ops:
            seen.setdefault(o.lane, None)
        return list(seen)

    def summary(self) -> TraceSummary:
        ops = self.ops
        if not ops:
            return TraceSummary(0, 0.0, 0, 0.0, 0.0, 0.0, {}, 0.0)
        span = max(o.end_ms for o in ops) - min(o.start_ms for o in ops)
        per_lane: Dict[str, List[Tuple[float, float]]] = {}
        for o in ops:
            per_lane.setdefault(o.lane, []).append((o.start_ms, o.end_ms))
        busy_ms = {lane: _length(_union(iv)) for lane, iv in per_lane.items()}
        iterations = max(len(iv) for iv in per_lane.values())
        floor = max(busy_ms.values()) / iterations
        achieved = span / iterations
        copies = _union([(o.start_ms, o.end_ms) for o in ops if o.op_type != "compute"])
        kernels = _union([(o.start_ms, o.end_ms) for o in ops if o.op_type == "compute"])
        return TraceSummary(
            ops=len(ops), span_ms=span, iterations=iterations, achieved_ms=achieved,
            floor_ms=floor, efficiency=floor / achieved if achieved > 0 else 0.0,
            busy={k: v / span if span > 0 else 0.0 for k, v in busy_ms.items()},
            overlap=_intersect(copies, kernels) / span if span > 0 else 0.0)

    def chrome(self) -> Dict[str, Any]:
        """The timeline as a Chrome trace (opens in Perfetto): an "X" event per op,
        a track per lane, bytes and GB/s in ``args``."""
        lanes = self.lanes()
        tid = {lane: i + 1 for i, lane in enumerate(lanes)}
        events: List[Dict[str, Any]] = [
            {"ph": "M", "name": "process_name", "pid": 1, "tid": 0,
             "args": {"name": "prism-gpu (device time)"}}]
        events += [{"ph": "M", "name": "thread_name", "pid": 1, "tid": tid[lane],
                    "args": {"name": lane}} for lane in lanes]
        for o in self.ops:
            args: Dict[str, Any] = {"op_id": o.op_id, "device": o.device}
            if o.nbytes:
                args["bytes"] = o.nbytes
                if o.duration_ms > 0:
                    args["GB/s"] = round(o.nbytes / (o.duration_ms * 1e6), 3)
            if o.batch_index is not None:
                args["index"] = o.batch_index
            if o.error:
                args["error"] = o.error
            events.append({"name": o.name, "cat": o.op_type, "ph": "X", "pid": 1,
                           "tid": tid[o.lane], "ts": round(o.start_ms * 1e3, 3),
                           "dur": round(max(0.0, o.duration_ms) * 1e3, 3), "args": args})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def save(self, path: str) -> None:
        """Write the Chrome trace JSON to ``path``."""
        if not isinstance(path, (str, os.PathLike)):  # an int would be a file descriptor
            raise TypeError(f"path must be a str or a path, got {type(path).__name__}")
        with open(path, "w") as f:
            json.dump(self.chrome(), f)

    def plot(self, path: str, title: Optional[str] = None) -> None:
        """A Gantt chart of the timeline as a PNG (needs the ``plot`` extra)."""
        from ._gantt import plot

        plot([(title or "", self)], path)

    def __len__(self) -> int:
        held = sum(len(h[3]) for h in list(self._refs.values()))
        return len(self._ops) + len(self._timed) + held

    def __repr__(self) -> str:
        return f"Trace({len(self)} ops)"


class trace:
    """``with pg.trace() as tr:`` records every op queued in the block, by any API.

    On leaving the block it waits for the traced ops still in flight, so ``tr.ops``,
    ``tr.save(path)``, ``tr.plot(path)`` and ``tr.summary()`` see all of them.
    Traces do not nest.
    """

    def __init__(self) -> None:
        self._trace = Trace()

    def __enter__(self) -> Trace:
        global ACTIVE
        with _lock:
            if ACTIVE is not None:
                from ._errors import InvalidOperationError

                raise InvalidOperationError("a trace is already active; traces do not nest")
            ACTIVE = self._trace
        return self._trace

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        global ACTIVE
        with _lock:
            ACTIVE = None
        try:
            self._trace.finish()
        except Exception:
            if exc_type is None:
                raise
            # the block's own exception is what the caller needs to see
            self._trace.closed = True


def active() -> Optional[Trace]:
    return ACTIVE


def set_index(index: Optional[int]) -> None:
    """The batch or iteration index that ops queued next on this thread belong to."""
    STATE.index = index
