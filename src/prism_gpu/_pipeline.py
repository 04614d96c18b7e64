"""Multi-stage pipelines: stages on their own streams, ordered by events.

A thin client of the core: stage ops go through the coordinator's engine and
op table, buffers are ordinary rings whose slots go through the ring states
and hazards, and statistics come from timing events, in constant memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import numpy as np

from ._buffers import FREE_I, Slot, TripleBuffer
from ._config import LaunchConfig
from ._coordinator import AsyncCoordinator
from ._engine import LAUNCH, Engine, Lane, Op
from ._errors import BufferUnavailableError, InvalidOperationError
from ._ops import OpType
from ._optable import raise_failures
from ._stats import Window

__all__ = ["GpuPipelineStage", "PipelineStageManager", "PipelineStats"]


def _indices(values: Any, what: str) -> List[int]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{what} must be a list of buffer indices, got {type(values).__name__}")
    out = []
    for v in values:
        if isinstance(v, bool) or not hasattr(v, "__index__"):
            raise TypeError(f"{what} must hold int buffer indices, got {v!r}")
        out.append(v.__index__())
    return out


@dataclass
class GpuPipelineStage:
    """One stage: a kernel that reads ``input_buffers`` and writes ``output_buffers``.

    Buffers are indices returned by :meth:`PipelineStageManager.add_buffer`. The
    kernel (default: the stage's name) gets the current slot of each input
    buffer, then of each output buffer, then ``extra``.
    """

    name: str
    input_buffers: Sequence[int] = field(default_factory=list)
    output_buffers: Sequence[int] = field(default_factory=list)
    config: Optional[LaunchConfig] = None
    kernel: Any = None
    extra: Tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"a stage needs a non-empty str name, got {self.name!r}")
        self.input_buffers = _indices(self.input_buffers, "input_buffers")
        self.output_buffers = _indices(self.output_buffers, "output_buffers")
        if self.config is not None and not isinstance(self.config, LaunchConfig):
            raise TypeError(f"config must be a prism_gpu.LaunchConfig or None, got "
                            f"{type(self.config).__name__}")
        if not isinstance(self.extra, (tuple, list)):
            raise TypeError(f"extra must be a tuple, got {type(self.extra).__name__}")
        self.extra = tuple(self.extra)
        if self.kernel is None:
            self.kernel = self.name


class PipelineStats(NamedTuple):
    """Statistics of the window since the last :meth:`PipelineStageManager.reset_stats`.

    ``avg_iteration_ms`` is the steady-state time between iteration completions,
    ``throughput`` iterations per second over the window, ``gpu_utilization`` the
    fraction of the window in which any stage was running (0..1), and
    ``stage_ms`` each stage's mean device time (from its start and end events).
    On the CPU backend, stages share the host's cores, so concurrent stages can
    each take longer than they would alone.
    """

    iterations: int
    avg_iteration_ms: float
    throughput: float
    gpu_utilization: float
    stage_ms: Dict[str, float]


class _Step(NamedTuple):
    """A stage as the plan runs it."""

    stage: GpuPipelineStage
    prepared: Any
    config: LaunchConfig
    uses_arrays: bool
    extra: Tuple[Any, ...]
    lane: Lane
    reads: Tuple[int, ...]
    writes: Tuple[int, ...]


class PipelineStageManager:
    """Runs stages in order each iteration, overlapping consecutive iterations.

    Each iteration writes the next slot of every buffer, so stage s of iteration
    i+1 runs while stage s+1 of iteration i does. The host blocks only when the
    slot an iteration writes is still used by the iteration ``depth`` before.
    A failing stage raises from the next :meth:`execute_iteration` or
    :meth:`get_stats`.
    """

    def __init__(self, coordinator: AsyncCoordinator, *, depth: int = 3,
                 _owns_coordinator: bool = False) -> None:
        if not isinstance(coordinator, AsyncCoordinator):
            raise TypeError("PipelineStageManager needs an AsyncCoordinator")
        if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)):
            raise TypeError(f"depth must be an int, got {type(depth).__name__}")
        if int(depth) < 1:
            raise ValueError("depth must be >= 1")
        coordinator.check()
        self._coord = coordinator
        self._engine: Engine = coordinator.engine
        self._owns = _owns_coordinator
        self.depth = int(depth)
        self._buffers: List[TripleBuffer] = []
        self._stages: List[GpuPipelineStage] = []
        self._lanes: Dict[int, Lane] = {}       # stage index -> its stream, made once
        self._order: Optional[List[int]] = None
        self._plan: List[_Step] = []
        self._iter = 0
        self._win = Window()
        self._failed: Set[int] = set()          # failed stage ops not yet raised
        self._closed = False

    def coordinator(self) -> AsyncCoordinator:
        return self._coord

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
            raise InvalidOperationError(f"no buffer {index}: {len(self._buffers)} buffer(s)")
        return self._buffers[index]

    def add_stage(self, stage: GpuPipelineStage) -> int:
        """Add ``stage``; returns its index. Stage names are unique (they key the stats)."""
        self._check()
        if not isinstance(stage, GpuPipelineStage):
            raise TypeError(f"add_stage needs a GpuPipelineStage, got {type(stage).__name__}")
        if any(s.name == stage.name for s in self._stages):
            raise ValueError(f"a stage named {stage.name!r} was already added; give each "
                             "stage its own name")
        self._stages.append(stage)
        if self._order is None:
            self._plan = []  # rebuilt with every stage, in the order added
        return len(self._stages) - 1

    def set_order(self, indices: Sequence[int]) -> None:
        """Run the stages at ``indices`` in this order each iteration.

        Rejected (changing nothing) when an index is unknown or repeated, a stage
        names a buffer that does not exist, or reads a buffer no earlier stage of
        the order writes.
        """
        self._check()
        order = _indices(indices, "set_order")
        self._plan = self._make_plan(order)
        self._order = order

    def _make_plan(self, order: List[int]) -> List[_Step]:
        if not order:
            raise ValueError("set_order needs at least one stage index")
        if len(set(order)) != len(order):
            raise ValueError(f"set_order repeats a stage: {order}; each stage runs once "
                             "per iteration")
        n = len(self._stages)
        for i in order:
            if not 0 <= i < n:
                raise InvalidOperationError(
                    f"no stage {i}: {n} stage(s) were added (indices 0..{n - 1}); "
                    "add_stage() returns each index")
        written: Set[int] = set()
        resolved = []
        for i in order:
            st = self._stages[i]
            for b in (*st.input_buffers, *st.output_buffers):
                if not 0 <= b < len(self._buffers):
                    raise InvalidOperationError(
                        f"stage {st.name!r} names buffer {b}, but only {len(self._buffers)} "
                        "buffer(s) exist; create it first with "
                        "pipe.add_buffer(size, dtype=...) and use the index it returns")
            for b in st.input_buffers:
                if b not in written:
                    raise InvalidOperationError(
                        f"stage {st.name!r} reads buffer {b} before any stage writes it; "
                        "order a stage that writes it first")
            written.update(st.output_buffers)
            resolved.append(self._coord.resolve_kernel(st.kernel))
        plan = []
        for i, (kernel, prepared) in zip(order, resolved):
            st = self._stages[i]
            lane = self._lanes.get(i)
            if lane is None:
                lane = self._lanes[i] = self._engine.lane(st.name)
            first = (*st.input_buffers, *st.output_buffers)
            config = st.config or kernel.config or LaunchConfig.for_elements(
                self._buffers[first[0]].capacity if first else 1)
            plan.append(_Step(st, prepared, config, kernel.uses_arrays,
                              st.extra or kernel.defaults, lane, tuple(st.input_buffers),
                              tuple(st.output_buffers)))
        return plan

    # running --------------------------------------------------------------------
    def execute_iteration(self) -> int:
        """Queue one iteration of every stage; returns the iteration number.

        Raises the failure of a stage op found failed since the last call.
        """
        self._check()
        coord = self._coord
        coord.check()
        if not self._plan:
            self._plan = self._make_plan(list(range(len(self._stages))) if self._order is None
                                         else self._order)
        eng = self._engine
        eng.harvest()
        self._raise_failures()
        plan = self._plan
        buffers = self._buffers
        written = sorted({b for step in plan for b in step.writes})
        slots: Dict[int, Slot] = {}
        for b in written:
            slots[b] = self._reclaim(buffers[b])
        for b in written:
            if buffers[b].produce() is not slots[b]:
                raise InvalidOperationError("a pipeline buffer changed while queueing")
        it = self._iter
        win = self._win
        if win.ref is None:
            win.start(eng.mark(plan[0].lane), it, [s.stage.name for s in plan])
        last = len(plan) - 1
        for pos, step in enumerate(plan):
            ins = [slots[b] for b in step.reads]
            outs = [slots[b] for b in step.writes]
            waits = [s.writer for s in ins if s.writer is not None]
            quiet = [o for s in outs if s not in ins for o in s.write_hazards()]
            arrays = [s.full for s in ins] + [s.full for s in outs]
            op = eng.submit(step.lane, OpType.COMPUTE, step.stage.name, waits, quiet, LAUNCH,
                            step.prepared, step.config, arrays if step.uses_arrays else (),
                            step.extra, keep=arrays,
                            on_done=self._timer(step.stage.name, it, pos == last), timing=True)
            failed = eng.root_of(op) if op.error is not None else None
            for s in ins:
                if s in outs:
                    s.updated(op, failed)
                else:
                    s.read(op)
            for s in outs:
                if s not in ins:
                    s.filled(op, s.capacity)
                    if failed is not None:
                        s.failed = failed
        for b in written:
            buffers[b].retire()  # FREE again on the host; the GPU orders the next write
            #                      into the slot after this iteration's readers
        self._iter += 1
        return it

    def _reclaim(self, buf: TripleBuffer) -> Slot:
        """The slot ``buf`` hands out next, once no older iteration uses it (host wait)."""
        slot = buf.peek(FREE_I)
        if slot is None:
            raise BufferUnavailableError(
                f"pipeline buffer has no FREE slot (states: {buf.get_states()}); another API "
                "holds its slots: download and advance() them first")
        eng = self._engine
        for op in slot.write_hazards():
            if op.event is not None:
                if op.lane in eng.lanes:
                    eng.wait(op.id)
                else:  # an op of another coordinator: its event is enough
                    op.event.synchronize()
        return slot

    def _timer(self, stage: str, it: int, last: bool) -> Any:
        win = self._win
        failed = self._failed

        def done(op: Op, _ms: Optional[float]) -> None:
            if op.error is not None:
                failed.add(op.id)
            if win is self._win and it >= win.first_iter and op.start is not None:
                start, end = op.times_since(win.ref)
                win.add(stage, start, end, last)
        return done

    def _raise_failures(self) -> None:
        if self._failed:
            ids = set(self._failed)
            self._failed.clear()  # the set timers of ops in flight add to
            raise_failures(self._coord.table.take_unobserved(ids), "pipeline stages")

    def get_stats(self) -> PipelineStats:
        """Statistics of the window; waits for the window's queued iterations first and
        raises a stage failure not yet raised."""
        self._check()
        self._coord.check()
        self._engine.synchronize([s.lane for s in self._plan])
        self._raise_failures()
        win = self._win
        n, first, last_end, t0, busy = win.summary()
        if n == 0:
            return PipelineStats(0, 0.0, 0.0, 0.0, {})
        span = last_end - t0
        avg = (last_end - first) / (n - 1) if n > 1 else span
        return PipelineStats(
            iterations=n,
            avg_iteration_ms=avg,
            throughput=n / (span / 1e3) if span > 0 else 0.0,
            gpu_utilization=min(1.0, busy / span) if span > 0 else 0.0,
            stage_ms=win.stage_means(),
        )

    def reset_stats(self) -> None:
        """Start a new statistics window with the next iteration."""
        self._check()
        old = self._win
        self._win = Window()
        if old.ref is not None and old.ref.query():
            self._engine.give_event(old.ref)

    # lifetime -------------------------------------------------------------------
    def _check(self) -> None:
        if self._closed:
            raise InvalidOperationError("this PipelineStageManager is closed")

    def close(self) -> None:
        """Wait for queued iterations, free the buffers (and an owned coordinator), then
        raise a stage failure not yet raised."""
        raise_failures(self.close_collecting(), "closing the pipeline")

    def close_collecting(self) -> List[BaseException]:
        """Close; return (instead of raising) the failures not yet raised."""
        if self._closed:
            return []
        self._closed = True
        errors: List[BaseException] = []
        try:
            if not self._coord.closed:
                self._engine.synchronize([s.lane for s in self._plan])
                errors = self._coord.table.take_unobserved(self._failed)
            if self._owns:
                errors.extend(self._coord.close_collecting())
        finally:
            self._failed.clear()
            for buf in self._buffers:
                buf.close()
        return errors

    def __enter__(self) -> "PipelineStageManager":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        errors = self.close_collecting()
        if exc_type is None:
            raise_failures(errors, "leaving the with block")
