"""Multi-stage pipelines: stages on their own streams, ordered by events, fed with data.

A thin client of the core: stage ops go through the coordinator's engine and op table,
buffers are ordinary rings (states and hazards), statistics come from timing events.
"""

from __future__ import annotations

import dataclasses
from threading import get_ident
from types import MappingProxyType
from typing import (Any, Dict, Iterable, Iterator, List, Mapping, Optional, Set,
                    Tuple)

import numpy as np

from . import _sync, _trace
from ._args import MAX_DEPTH, MAX_SAMPLE, TIMING_SAMPLE, int_arg, iterable_arg
from ._buffers import FREE_I, UPLOADING_I, Slot, TripleBuffer
from ._coordinator import AsyncCoordinator
from ._engine import Engine, Lane
from ._failures import refuse_close, refuse_in_callback, refuse_other_thread
from ._errors import BufferUnavailableError, InvalidOperationError
from ._ops import OpType
from ._optable import raise_failures
from ._stage import GpuPipelineStage, PipelineIteration, PipelineStats
from ._stage import indices as _indices
from ._pipefeed import (IoEntry, check_inputs, io_entry, run_pipeline, valid_lengths,
                        written_buffers)
from ._plan import Step as _Step
from ._plan import check_open, make_plan
from ._sink import check_out
from ._pipequeue import StageQueue, checked_io, next_slots
from ._sampling import SampledWindow
from ._stats import Window
from ._validate import download_destination

__all__ = ["GpuPipelineStage", "PipelineStageManager", "PipelineStats", "PipelineIteration"]

_UPLOAD, _COMPUTE, _DOWNLOAD = OpType.UPLOAD, OpType.COMPUTE, OpType.DOWNLOAD
_NOTHING: Mapping[Any, Any] = MappingProxyType({})  # what a plain iteration feeds


class PipelineStageManager:
    """Runs stages in order each iteration, overlapping consecutive iterations.

    Each iteration writes the next slot of every buffer, so stage s of iteration
    i+1 runs while stage s+1 of iteration i does; a write into a slot still read
    by the iteration ``depth`` before waits for it on the device, not the host.
    Queued work is bounded by the coordinator's ``max_in_flight``.
    Statistics come from timing events on one iteration in ``timing_sample`` (runs of
    consecutive iterations; the window's first iterations always): a pair of timing
    events costs more host time than the rest of a small op's submission. With
    ``timing_sample=1`` every op is timed. See :meth:`get_stats`.
    Feed it with :meth:`run` (an iterable in, results out) or
    ``execute_iteration(inputs=..., outputs=...)``. A failing stage raises from
    that iteration's ``wait()``, from :meth:`run` at its turn, and from the next
    :meth:`execute_iteration` or :meth:`get_stats`.
    """

    def __init__(self, coordinator: AsyncCoordinator, *, depth: int = 3,
                 timing_sample: int = TIMING_SAMPLE, _owns_coordinator: bool = False) -> None:
        if not isinstance(coordinator, AsyncCoordinator):
            raise TypeError("PipelineStageManager needs an AsyncCoordinator")
        self.depth = int_arg(depth, "depth", 1, MAX_DEPTH)
        self.timing_sample = int_arg(timing_sample, "timing_sample", 1, MAX_SAMPLE)
        coordinator.check()
        self._coord, self._owner, self._owns = coordinator, get_ident(), _owns_coordinator
        self._device = coordinator.device
        self._engine: Engine = coordinator.engine
        self._buffers: List[TripleBuffer] = []
        self._stages: List[GpuPipelineStage] = []
        self._order: Optional[List[int]] = None
        self._plan: List[_Step] = []
        self._open_checks: List[_Step] = []    # the plan's steps with DeviceArrays in extra
        self._flows: Dict[Tuple[int, ...], Tuple[int, ...]] = {}  # checked input sets
        self._io: Optional[IoEntry] = None  # the last iteration fed or read back, checked
        self._iter = 0
        self._win = self._new_window()
        self._failed: Set[int] = set()          # failed ops not yet raised
        # how an iteration's ops are queued (the plan as it runs, the views it gives, the
        # lanes: stage index or "upload"... -> its stream); it refers to nothing of ours
        # but these (no cycle through us: what a plan holds goes when we do)
        self._queue = StageQueue(self._engine, self._buffers, self._failed,
                                 coordinator.device.read_only)
        self._lanes: Dict[Any, Lane] = self._queue.lanes  # (the queue's, read here)
        self._closed = False

    def coordinator(self) -> AsyncCoordinator:
        return self._coord

    def _new_window(self) -> Window:
        return Window() if self.timing_sample == 1 else SampledWindow(self.timing_sample)

    # building -------------------------------------------------------------------
    def add_buffer(self, size: int, dtype: Any = np.float32) -> int:
        """Add a ring of ``depth`` slots; returns its index for stages to name."""
        self._check()
        self._buffers.append(TripleBuffer(self._coord.device, size, dtype=dtype,
                                          depth=self.depth))
        return len(self._buffers) - 1

    def buffer(self, index: int) -> TripleBuffer:
        if isinstance(index, bool) or not hasattr(index, "__index__"):
            raise TypeError(f"buffer index must be an int, got {type(index).__name__}")
        if not 0 <= index < len(self._buffers):
            raise InvalidOperationError(f"no buffer {index}: {len(self._buffers)} buffer(s); "
                                        "add_buffer() returns each index")
        return self._buffers[index]

    def add_stage(self, stage: GpuPipelineStage) -> int:
        """Add ``stage``; returns its index. Stage names are unique (they key the stats)."""
        self._check()
        if not isinstance(stage, GpuPipelineStage):
            raise TypeError(f"add_stage needs a GpuPipelineStage, got {type(stage).__name__}")
        if any(s.name == stage.name for s in self._stages):
            raise ValueError(f"a stage named {stage.name!r} was already added; give each "
                             "stage its own name")
        for b in (*stage.input_buffers, *stage.output_buffers):
            if not 0 <= b < len(self._buffers):
                raise InvalidOperationError(f"stage {stage.name!r} names buffer {b}, which "
                                            "does not exist: add_buffer() first")
        self._stages.append(dataclasses.replace(stage))  # a copy: later edits stay out
        if self._order is None:  # rebuilt with every stage, in the order added
            self._plan, self._flows, self._io = [], {}, None
        return len(self._stages) - 1

    def set_order(self, indices: Any) -> None:
        """Run the stages at these indices in this order each iteration (without it,
        stages run in the order added).

        Rejected (changing nothing) when an index is unknown or repeated, or a stage
        names a buffer that does not exist. A stage reading a buffer that no earlier
        stage writes needs that buffer fed as an input (``run(input=...)``,
        ``execute_iteration(inputs=...)``); that is checked when the iteration runs.
        """
        self._check()
        order = _indices(indices, "set_order")
        self._set_plan(self._make_plan(order))
        self._order = order
        self._flows.clear()

    def _make_plan(self, order: List[int]) -> List[_Step]:
        return make_plan(order, self._stages, self._buffers, self._coord.resolve_kernel,
                         self._lane, self._coord.device)

    def _set_plan(self, plan: List[_Step]) -> None:
        self._plan = plan
        self._io = None  # (checked against the plan before)
        self._open_checks = [step for step in plan if step.constants]

    def _current_plan(self) -> List[_Step]:
        if not self._plan:
            self._set_plan(self._make_plan(list(range(len(self._stages)))
                                           if self._order is None else self._order))
        elif self._open_checks:
            check_open(self._open_checks)
        return self._plan

    def _lane(self, key: Any, name: str) -> Lane:
        return self._queue.lane(key, name)

    def _flow(self, plan: List[_Step], fed: Tuple[int, ...]) -> Tuple[int, ...]:
        hit = self._flows.get(fed)
        if hit is None:
            hit = written_buffers(plan, fed)
            if len(self._flows) > 64:
                self._flows.clear()
            self._flows[fed] = hit
        return hit

    # running --------------------------------------------------------------------
    def execute_iteration(self, inputs: Optional[Mapping[int, np.ndarray]] = None,
                          outputs: Optional[Mapping[int, np.ndarray]] = None
                          ) -> PipelineIteration:
        """Queue one iteration: upload each ``inputs[b]`` into buffer ``b``, run every
        stage, download buffer ``b`` into each ``outputs[b]``.

        Returns a :class:`PipelineIteration`; the outputs hold their results once its
        ``wait()`` returns. Everything is checked before anything is queued. Raises
        the failure of an op of this pipeline found failed since the last call.
        """
        coord = self._coord
        eng = self._engine
        if self._closed or get_ident() != self._owner or eng.in_callback or eng.closed \
                or self._device.closed:
            self._check()  # raises when closed, called from another thread or a kernel
            if eng.in_callback:  # refused before any slot is taken
                refuse_in_callback(eng.in_callback)
        fed: Mapping[int, np.ndarray]
        valid: Mapping[int, int]
        downs: Mapping[int, np.ndarray]
        if inputs is None and outputs is None:  # nothing fed, nothing read back
            plan = self._plan
            if not plan or self._open_checks:
                plan = self._current_plan()
            fed = valid = downs = _NOTHING
            touched = self._flows.get(())
            if touched is None:
                touched = self._flow(plan, ())
        else:
            plan = self._plan
            entry, hit = self._io, None  # (made with this plan: a new one drops it)
            if entry is not None and (type(inputs) is dict or inputs is None) \
                    and (type(outputs) is dict or outputs is None):
                # the buffers of the last iteration checked, the arrays passing every check
                hit = checked_io(entry, inputs, outputs)
            if hit is None:
                plan, fed, touched, valid, downs = self._check_io(inputs, outputs)
            else:
                if self._open_checks:
                    check_open(self._open_checks)
                fed, downs, touched, valid = hit
        eng.harvest()
        if self._failed:
            self._raise_failures()
        eng.raise_callback_errors()
        # the next FREE slot of each buffer (the older iteration still using it is waited
        # for by the op that writes it, just before it is queued)
        bufs = self._buffers
        got = next_slots(bufs, touched) if next_slots is not None else None
        if got is None:
            slots: Dict[int, Slot] = {}
            try:
                for b in touched:
                    buf = bufs[b]
                    slot = buf.peek(FREE_I)
                    if slot is None or buf.peek(UPLOADING_I) is not None:
                        slot = self._next_free(buf)  # says why not
                    slots[b] = slot
            except InvalidOperationError:  # a ring closed: its views go too
                self._queue.drop_views()
                raise
        else:
            slots = got
        # nothing below is rejected: the iteration is queued whole
        it = self._iter
        tracing = _trace.ACTIVE is not None
        if tracing:
            _trace.set_index(it)
        try:
            ops = self._queue.iteration(plan, self._win, fed, touched, slots, valid, downs)
        finally:
            if tracing:
                _trace.set_index(None)
        self._iter += 1
        done = PipelineIteration(it, coord, ops)
        if _sync._ON:  # (sync_mode())
            done.wait()
        return done

    def _check_io(self, inputs: Any, outputs: Any) -> Tuple[
            List[_Step], Dict[int, np.ndarray], Tuple[int, ...], Mapping[int, int],
            Dict[int, np.ndarray]]:
        """Every check of an iteration fed ``inputs`` and reading back ``outputs``, in
        order: (plan, buffer -> flat input, buffers written, valid lengths, buffer -> flat
        output). Remembered for :func:`fast_io` (the last such iteration)."""
        fed, lengths = check_inputs(self, inputs)
        if outputs is not None and not isinstance(outputs, Mapping):
            raise TypeError(f"outputs must map buffer indices to arrays, got "
                            f"{type(outputs).__name__}")
        plan = self._current_plan()
        touched = self._flow(plan, tuple(sorted(fed)))
        valid = valid_lengths(plan, self._buffers, lengths) if fed else {}
        downs = {}
        for b, y in (outputs or {}).items():
            buf = self.buffer(b)
            if int(b) not in touched:
                raise InvalidOperationError(
                    f"output buffer {b} is not written by any stage of the iteration")
            n = valid.get(int(b), buf.capacity)
            downs[int(b)] = download_destination(y, buf.dtype, n, f"output for buffer {b}")
        entry = io_entry(self._buffers, fed, downs, touched, valid)
        if entry is not None:
            self._io = entry
        return plan, fed, touched, valid, downs

    @staticmethod
    def _next_free(buf: TripleBuffer) -> Slot:
        slot = buf.peek(FREE_I)
        if slot is None:
            raise BufferUnavailableError(
                f"pipeline buffer has no FREE slot (states: {buf.get_states()}); another API "
                "holds its slots: download and advance() them first")
        if buf.peek(UPLOADING_I) is not None:  # an iteration would take it as its own
            raise InvalidOperationError("pipeline buffer holds an upload of another API "
                                        "waiting for a compute: queue that compute first")
        return slot

    def _raise_failures(self) -> None:
        if self._failed:
            ids = set(self._failed)
            self._failed.clear()  # the set timers of ops in flight add to
            raise_failures(self._coord.table.take_unobserved(ids), "pipeline stages")

    def run(self, batches: Iterable[np.ndarray], input: int, output: int, *,
            prefetch: int = 2, out: Any = None) -> Iterator[np.ndarray]:
        """Push every batch through the pipeline; yield results in input order.

        Each batch is uploaded into the next slot of buffer ``input``, the stages
        run, and buffer ``output``'s slot is downloaded into the result (a short
        batch's length flows through stages whose buffers have the input's size).
        Overlapped like :func:`stream_map`, with the same staging of pageable
        batches, the same read-ahead contract (``prefetch``) and the same ``out=``
        (result ``i`` written into ``out[i]``, which is yielded). A failing stage
        raises at its batch's turn, after every earlier result, with
        ``batch_index``.
        """
        self._check()
        iterable_arg(batches, "batches")
        in_buf, out_buf = self.buffer(input), self.buffer(output)
        ahead = int_arg(prefetch, "prefetch", 0)
        check_out(out)
        if int(output) not in self._flow(self._current_plan(), (int(input),)):
            raise InvalidOperationError(f"output buffer {output} is not written by any stage")
        b_in, b_out = int(input), int(output)

        def out_valid(n: int) -> int:  # the elements a batch of n leaves in the output
            if n == in_buf.capacity:  # a full batch fills every buffer it flows into
                return out_buf.capacity
            lengths = valid_lengths(self._current_plan(), self._buffers, {b_in: n})
            return lengths.get(b_out, out_buf.capacity)
        return run_pipeline(self, batches, b_in, b_out, in_buf, out_buf, ahead, out, out_valid)

    def get_stats(self) -> PipelineStats:
        """Statistics of the window; waits for the window's queued iterations first and
        raises a failure not yet raised.

        With ``timing_sample`` > 1, ``stage_ms`` is the mean over the timed iterations,
        ``avg_iteration_ms`` and ``throughput`` are exact over the iterations up to the
        last timed one, and ``gpu_utilization`` is measured in each run's clean window
        (the time in which only its ops can run); ``iterations`` counts every one."""
        self._check()
        self._coord.check()
        self._engine.synchronize(list(self._lanes.values()))
        self._raise_failures()
        self._engine.raise_callback_errors()
        return self._win.stats()

    def reset_stats(self) -> None:
        """Start a new statistics window with the next iteration."""
        self._check()
        old = self._win
        old.end()  # its callbacks of ops in flight record nothing: its ref may be reused
        self._win = self._new_window()
        self._queue.forget_plan()
        if old.ref is not None and old.ref.query():
            self._engine.give_event(old.ref)

    # lifetime -------------------------------------------------------------------
    def _check(self) -> None:
        if self._closed:
            raise InvalidOperationError("this PipelineStageManager is closed")
        refuse_other_thread(self._owner, "PipelineStageManager")
        self._coord.check()  # its coordinator open, not from one of its kernels

    def close(self) -> None:
        """Wait for queued iterations, free the buffers (and an owned coordinator), then
        raise a failure not yet raised."""
        if not self._closed and not self._coord.closed:
            refuse_close(self._engine)  # from its callback or kernel: said as such
            refuse_other_thread(self._owner, "PipelineStageManager", closing=True)
        raise_failures(self.close_collecting(), "closing the pipeline")

    def close_collecting(self) -> List[BaseException]:
        """Close; return (instead of raising) the failures not yet raised."""
        if self._closed:
            return []
        if not self._coord.closed:
            refuse_close(self._engine)  # from a callback or kernel of its: nothing changes
        self._closed = True
        errors: List[BaseException] = []
        try:
            if not self._coord.closed:
                self._engine.synchronize(list(self._lanes.values()))
                errors = self._coord.table.take_unobserved(self._failed)
            if self._owns:
                errors.extend(self._coord.close_collecting())
        finally:
            self._failed.clear()
            self._queue.drop_views()
            self._queue.forget_plan()  # its prepared kernels (callables and what they hold)
            self._io = None
            for buf in self._buffers:
                buf.close()
        return errors

    def __enter__(self) -> "PipelineStageManager":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        errors = self.close_collecting()
        if exc_type is None:
            raise_failures(errors, "leaving the with block")
