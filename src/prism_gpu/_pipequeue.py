"""How a pipeline iteration's ops are queued: the plan as the loop runs it (each step's
fields and timers unpacked once per plan and statistics window), the read-only views
given to stages, and the ops themselves with their slots' bookkeeping. Owned by one
:class:`prism_gpu.PipelineStageManager`, which checks an iteration before it is queued
here (nothing here is refused).
"""

from __future__ import annotations

from typing import (Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Set,
                    Tuple)

import numpy as np

from ._buffers import FREE_I, UPLOADING_I, Slot, TripleBuffer
from ._engine import D2H, H2D, LAUNCH, Engine, Lane
from ._core import compiled_module
from ._failures import root_of
from ._ops import OpType
from ._pipefeed import fast_io
from ._plan import Step as _Step
from ._stage import RESERVED_NAMES
from ._sampling import Run, SampledWindow
from ._stats import QUEUED, Window

__all__ = ["StageQueue"]

_UPLOAD, _COMPUTE, _DOWNLOAD = OpType.UPLOAD, OpType.COMPUTE, OpType.DOWNLOAD

# a plan as the loop runs it: (plan, window, the steps as the loop unpacks them when the
# last stage ends the iteration, and when downloads do, the copies' timers and accumulators:
# (upload's, its accumulator, download's, download's ending the iteration, its accumulator),
# whether its ops are timed, the run of a sampled window whose timers it has (or None), and
# the lanes an iteration uses by what it copies (index: 1 if fed, plus 2 if read back))
_Run = Tuple[List[_Step], Window, List[Tuple[Any, ...]], List[Tuple[Any, ...]],
             Tuple[Any, List[Any], Any, Any, List[Any]], bool, Optional[Run],
             Tuple[FrozenSet[str], ...]]


class StageQueue:
    """Queues a pipeline's iterations on ``engine``: ``buffers`` (the pipeline's list),
    ``failed`` (the set its stage timers add failed op ids to), ``read_only(array)`` (the
    device's read-only view). Owns the pipeline's lanes (:meth:`lane`, :attr:`lanes`)."""

    def __init__(self, engine: Engine, buffers: List[TripleBuffer], failed: Set[int],
                 read_only: Callable[[Any], Any]) -> None:
        self._engine = engine
        self._buffers = buffers
        self._failed = failed
        self._read_only = read_only
        self.lanes: Dict[Any, Lane] = {}  # stage index (or "upload"...) -> its stream
        self._up: Optional[Lane] = None    # lanes["upload"], lanes["download"] once made
        self._down: Optional[Lane] = None
        # the plan as the loop runs it, with the window's timers (and with a sampled
        # window's current run's, for its timed iterations), made again when one changes
        self._run: Optional[_Run] = None
        self._timed: Optional[_Run] = None
        # read-only views given to stages, made once per slot: slot -> (its full array,
        # valid length, the view); one entry per slot read, dropped when a ring closes
        self._views: Dict[Any, Tuple[Any, int, Any]] = {}

    def lane(self, key: Any, name: str) -> Lane:
        """The lane of stage ``key`` (or "upload", "download"), made on first use."""
        lane = self.lanes.get(key)
        if lane is None:
            lane = self.lanes[key] = self._engine.lane(name)
        return lane

    def _copy_lane(self, name: str) -> Lane:
        """The lane of the pipeline's uploads or downloads, made on first use."""
        lane = self.lane(name, name)
        if name == "upload":
            self._up = lane
        else:
            self._down = lane
        return lane

    def _rewrite(self, step: Tuple[Any, ...], slots: Dict[int, Slot], timed: bool) -> Any:
        """Queue a stage rewriting a buffer it reads (in place), as :meth:`iteration` runs
        the others, its reads as (buffer, only read) pairs; the op."""
        (lane, name, prepared, config, uses_arrays, extra, reads, writes, fresh, _, inplace,
         timer, acc) = step
        arrays: List[Any] = []
        waits: List[Any] = []
        only_read: List[Slot] = []
        rewritten: List[Slot] = []
        views = self._views
        for b, only in reads:
            s = slots[b]
            w = s.writer
            if w is not None:
                waits.append(w)
            if only:
                only_read.append(s)
                hit = views.get(s)
                if hit is None or hit[0] is not s.full or hit[1] != s.valid:
                    hit = views[s] = (s.full, s.valid, self._read_only(s.array))
                arrays.append(hit[2])
            else:
                rewritten.append(s)
                arrays.append(s.array)
        for b in writes:
            arrays.append(slots[b].array)
        quiet: Sequence[Any] = [o for b in fresh for o in slots[b].write_hazards()]
        for o in quiet:
            if o.event is not None:
                self._engine.wait_ops(quiet)
                break
        # it also follows the stages reading the buffer since its last write (on the
        # device: they are this iteration's, queued already)
        quiet = [*quiet, *(o for b in inplace for o in slots[b].readers)]
        op = self._engine.submit(lane, _COMPUTE, name, waits, quiet, LAUNCH, prepared, config,
                                 arrays if uses_arrays else (), extra, arrays, timer, timed)
        acc[QUEUED] += 1
        for s in only_read:
            s.read(op)
        failed = None if op.error is None else root_of(op)
        for s in rewritten:
            s.updated(op, failed)
        for b in fresh:
            s = slots[b]
            s.filled(op, s.valid)
            if failed is not None:
                s.failed = failed
        return op

    def forget_plan(self) -> None:
        """The statistics window changed: the timers are made again."""
        self._run = self._timed = None

    def drop_views(self) -> None:
        """A ring closed (or the pipeline): the views of its slots go."""
        self._views.clear()

    def compile(self, plan: List[_Step], win: Window, run: Optional[Run] = None) -> _Run:
        """The plan's steps as the loop unpacks them, with the timers of window ``win`` (or
        of ``run``, a run of timed iterations of a sampled window), and the timers of the
        copies (made once per plan and window, and per run)."""
        failed = self._failed
        src: Any = win if run is None else run
        ends, goes_on = [], []  # the last step's timer ends an iteration, or not
        for pos, step in enumerate(plan):
            name = step.stage.name
            fresh, inplace = step.fresh, step.inplace
            # the one buffer filled anew, whose hazards are the slot's own list, or None
            single = fresh[0] if len(fresh) == 1 and not inplace else None
            # its reads, as (buffer, only read) pairs where it rewrites one in place
            reads = tuple(zip(step.reads, step.reads_only)) if inplace else step.reads
            head = (step.lane, name, step.prepared, step.config, step.uses_arrays, step.extra,
                    reads, step.writes, fresh, single, inplace)
            acc = win.lane(name)
            mid = src.timer(name, False, failed)
            goes_on.append((*head, mid, acc))
            ends.append((*head, src.timer(name, True, failed) if pos == len(plan) - 1
                         else mid, acc))
        up, down = RESERVED_NAMES
        copies = (src.timer(up, False, failed), win.lane(up), src.timer(down, False, failed),
                  src.timer(down, True, failed), win.lane(down))
        out: _Run
        if run is None:
            names = frozenset(step.stage.name for step in plan)
            shapes = (names, names | {up}, names | {down}, names | {up, down})
            out = self._run = (plan, win, ends, goes_on, copies,
                               not isinstance(win, SampledWindow), None, shapes)
        else:
            out = self._timed = (plan, win, ends, goes_on, copies, True, run, ())
        return out

    def iteration(self, plan: List[_Step], win: Window,
                  fed: Mapping[int, np.ndarray], touched: Tuple[int, ...],
                  slots: Dict[int, Slot], valid: Mapping[int, int],
                  downs: Mapping[int, np.ndarray]) -> List[int]:
        """Queue one iteration of ``plan`` (checked: nothing here is refused) on the slots
        taken for it, its stage times going to ``win``: upload each ``fed[b]`` (its length
        ``valid[b]``), run the steps, download buffer ``b`` into each ``downs[b]``; the ids
        of its ops."""
        eng = self._engine
        if win.ref is None:
            win.start(eng.mark(plan[0].lane))
        run = self._run
        if run is None or run[0] is not plan or run[1] is not win:
            run = self.compile(plan, win)
        sampled = None
        if isinstance(win, SampledWindow):  # (is this iteration timed?)
            sampled = win.begin(run[7][(2 if downs else 0) + (1 if fed else 0)])
            if sampled is not None:
                timed_run = self._timed
                if timed_run is None or timed_run[6] is not sampled or timed_run[0] is not plan:
                    timed_run = self.compile(plan, win, sampled)
                run = timed_run
        steps, copies, timed = run[3] if downs else run[2], run[4], run[5]
        up = (self._up or self._copy_lane("upload")) if fed else None
        down = (self._down or self._copy_lane("download")) if downs else None
        ops = _queue_ops(self, eng, self._buffers, self._views, self._read_only, steps, copies,
                         timed, fed, touched, slots, valid, downs, up, down)
        if sampled is not None:
            sampled.queued += len(ops)
        return ops


def queue_ops(queue: StageQueue, eng: Engine, bufs: List[TripleBuffer],
              views: Dict[Any, Tuple[Any, int, Any]], read_only: Callable[[Any], Any],
              steps: List[Tuple[Any, ...]], copies: Tuple[Any, ...], timed: bool,
              fed: Mapping[int, np.ndarray], touched: Tuple[int, ...], slots: Dict[int, Slot],
              valid: Mapping[int, int], downs: Mapping[int, np.ndarray], up: Any,
              down: Any) -> List[int]:
    """The ops of one iteration of ``queue`` (see :meth:`StageQueue.iteration`), queued:
    the steps as compiled, the copies' timers, whether timed, and the copy lanes (None
    where nothing is fed, or read back). The reference: ``_ccore.pipe_ops`` (C, where
    built) does the same."""
    submit = eng.submit
    ops: List[int] = []
    if fed:
        timer, acc = copies[0], copies[1]
        lane = up
        for b, x in fed.items():
            n = valid[b]
            buf = bufs[b]
            slot = buf.take(FREE_I)
            assert slot is not None
            view = slot.head(n)
            op = submit(lane, _UPLOAD, None, (), slot.write_hazards(), H2D, view, x, None,
                        None, view, timer, timed)
            acc[QUEUED] += 1
            slot.filled(op, n)
            buf.take(UPLOADING_I)
            slots[b] = slot
            ops.append(op.id)
        for b in touched:
            if b not in fed:
                bufs[b].produce()
                slot = slots[b]
                slot.valid = valid.get(b, slot.capacity)
    else:  # (nothing fed: every buffer's length is its capacity)
        for b in touched:
            bufs[b].produce()
            slot = slots[b]
            slot.valid = slot.capacity
    for step in steps:
        (lane, name, prepared, config, uses_arrays, extra, reads, writes, fresh, single,
         inplace, timer, acc) = step
        if inplace:  # (a stage rewriting a buffer it reads)
            ops.append(queue._rewrite(step, slots, timed).id)
            continue
        # every buffer it reads is only read: a read-only view (a CPU kernel writing it
        # fails); every buffer it writes is filled anew
        # (loops, not comprehensions: each of those is a call on Python 3.11)
        arrays: List[Any] = []
        waits: List[Any] = []
        for b in reads:
            s = slots[b]
            w = s.writer
            if w is not None:
                waits.append(w)
            hit = views.get(s)
            if hit is None or hit[0] is not s.full or hit[1] != s.valid:
                # (a closed ring's slot has no full array: s.array refuses it)
                hit = views[s] = (s.full, s.valid, read_only(s.array))
            arrays.append(hit[2])
        # the host waits only here, for the iteration ``depth`` before that still uses
        # this stage's output slots: earlier stages of this iteration are queued already
        quiet: Sequence[Any] = ()
        if single is not None:  # (the one buffer written)
            out = slots[single]
            arrays.append(out.array)
            quiet = out.write_hazards()  # (read before the slot changes)
        elif writes:
            for b in writes:
                arrays.append(slots[b].array)
            quiet = [o for b in writes for o in slots[b].write_hazards()]
        for o in quiet:
            if o.event is not None:  # one in flight: wait for them
                eng.wait_ops(quiet)
                break
        op = submit(lane, _COMPUTE, name, waits, quiet, LAUNCH, prepared, config,
                    arrays if uses_arrays else (), extra, arrays, timer, timed)
        acc[QUEUED] += 1
        ops.append(op.id)
        for b in reads:
            slots[b].read(op)
        if op.error is None:
            if single is not None:
                out.filled(op, out.valid)
            else:
                for b in writes:
                    s = slots[b]
                    s.filled(op, s.valid)
        else:  # failed as it was queued, or a dependency had: the data it makes is spoilt
            failed = root_of(op)
            for b in writes:
                s = slots[b]
                s.filled(op, s.valid)
                s.failed = failed
    if downs:
        left = len(downs)
        acc = copies[4]
        lane = down
        for b, dst in downs.items():
            slot = slots[b]
            w, src = slot.writer, slot.array
            left -= 1
            timer = copies[2] if left else copies[3]  # the last ends the iteration
            op = submit(lane, _DOWNLOAD, None, (w,) if w is not None else (), (), D2H, dst,
                        src, None, None, (src, dst), timer, timed, slot.failed)
            acc[QUEUED] += 1
            slot.read(op)
            ops.append(op.id)
    for b in touched:  # FREE again on the host; the GPU orders the next write into the
        bufs[b].retire()  # slot after this iteration's readers
    return ops


_C = compiled_module()
if _C is not None:
    _C.setup_pipe({"queue_ops": queue_ops, "fast_io": fast_io, "UPLOAD": _UPLOAD,
                   "COMPUTE": _COMPUTE, "DOWNLOAD": _DOWNLOAD, "H2D": H2D, "D2H": D2H,
                   "LAUNCH": LAUNCH, "QUEUED": QUEUED})
_queue_ops = queue_ops if _C is None else _C.pipe_ops
checked_io = fast_io if _C is None else _C.pipe_fast_io  # (fast_io, compiled where built)
# (bufs, touched) -> {buffer: its next FREE slot}, or None where the pipeline's own loop
# must look (and say why): compiled only
next_slots: Optional[Callable[[List[TripleBuffer], Tuple[int, ...]], Optional[Dict[int, Slot]]]]
next_slots = None if _C is None else _C.pipe_slots
