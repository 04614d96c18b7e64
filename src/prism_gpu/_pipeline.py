"""Multi-stage pipelines: stages on their own streams, ordered by events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ._buffers import TripleBuffer
from ._config import LaunchConfig
from ._coordinator import AsyncCoordinator
from ._errors import InvalidOperationError

__all__ = ["GpuPipelineStage", "PipelineStageManager", "PipelineStats"]


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
            raise ValueError("a stage needs a non-empty name")
        self.input_buffers = [int(b) for b in self.input_buffers]
        self.output_buffers = [int(b) for b in self.output_buffers]
        if self.kernel is None:
            self.kernel = self.name


class PipelineStats(NamedTuple):
    """Statistics of the window since the last :meth:`PipelineStageManager.reset_stats`.

    ``avg_iteration_ms`` is the steady-state time between iteration completions,
    ``throughput`` iterations per second over the window, ``gpu_utilization`` the
    fraction of the window in which any stage was running (0..1), and
    ``stage_ms`` each stage's mean GPU time.
    """

    iterations: int
    avg_iteration_ms: float
    throughput: float
    gpu_utilization: float
    stage_ms: Dict[str, float]


class _Window:
    """Timings of one stats window, kept as merged busy intervals and running sums."""

    def __init__(self) -> None:
        self.ref: Any = None
        self.first_iter = 0
        self.busy: List[Tuple[float, float]] = []
        self.merge_at = 4096
        self.stage_sum: Dict[str, float] = {}
        self.stage_n: Dict[str, int] = {}
        self.ends: List[float] = []     # completion time of each iteration (last stage)
        self.t0 = float("inf")

    def add(self, stage: str, start: float, end: float, last: bool) -> None:
        self.busy.append((start, end))
        if len(self.busy) > self.merge_at:
            # merging is exact (a union of intervals); the threshold doubles past the
            # merged size so a run with idle gaps stays amortised O(1) per op
            self.busy = _merge(self.busy)
            self.merge_at = max(4096, 2 * len(self.busy))
        self.stage_sum[stage] = self.stage_sum.get(stage, 0.0) + (end - start)
        self.stage_n[stage] = self.stage_n.get(stage, 0) + 1
        self.t0 = min(self.t0, start)
        if last:
            self.ends.append(end)


def _merge(intervals: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    out: List[Tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


class PipelineStageManager:
    """Runs stages in a set order each iteration, overlapping consecutive iterations.

    Each iteration writes the next slot of every buffer, so stage s of iteration
    i+1 runs while stage s+1 of iteration i does. The host blocks only when the
    slot an iteration needs is still used by the iteration ``depth`` before.
    """

    def __init__(self, coordinator: AsyncCoordinator, *, depth: int = 3,
                 _owns_coordinator: bool = False) -> None:
        if not isinstance(coordinator, AsyncCoordinator):
            raise TypeError("PipelineStageManager needs an AsyncCoordinator")
        if int(depth) < 1:
            raise ValueError("depth must be >= 1")
        self._coord = coordinator
        self._owns = _owns_coordinator
        self.depth = int(depth)
        self._buffers: List[TripleBuffer] = []
        self._stages: List[GpuPipelineStage] = []
        self._order: Optional[List[int]] = None
        self._plan: List[Tuple[GpuPipelineStage, Any, Any, Any]] = []
        # per buffer, per slot: last writer op and readers since
        self._writer: List[List[int]] = []
        self._readers: List[List[List[int]]] = []
        self._iter = 0
        self._win = _Window()
        self._closed = False

    def coordinator(self) -> AsyncCoordinator:
        return self._coord

    def add_buffer(self, size: int, dtype: Any = np.float32) -> int:
        """Add a ring of ``depth`` slots; returns its index for stages to name."""
        self._check()
        self._buffers.append(TripleBuffer(self._coord.device, size, dtype=dtype,
                                          depth=self.depth))
        self._writer.append([-1] * self.depth)
        self._readers.append([[] for _ in range(self.depth)])
        return len(self._buffers) - 1

    def buffer(self, index: int) -> TripleBuffer:
        return self._buffers[index]

    def add_stage(self, stage: GpuPipelineStage) -> int:
        self._check()
        if not isinstance(stage, GpuPipelineStage):
            raise TypeError(f"add_stage needs a GpuPipelineStage, got {type(stage).__name__}")
        self._stages.append(stage)
        self._order = None
        return len(self._stages) - 1

    def set_order(self, indices: Sequence[int]) -> None:
        """Run the stages at ``indices`` in this order each iteration."""
        self._check()
        order = [int(i) for i in indices]
        if not order:
            raise ValueError("set_order needs at least one stage index")
        for i in order:
            if not 0 <= i < len(self._stages):
                raise InvalidOperationError(
                    f"no stage {i}: {len(self._stages)} stage(s) were added (indices "
                    f"0..{len(self._stages) - 1}); add_stage() returns each index")
        plan = []
        for i in order:
            st = self._stages[i]
            for b in (*st.input_buffers, *st.output_buffers):
                if not 0 <= b < len(self._buffers):
                    raise InvalidOperationError(
                        f"stage {st.name!r} names buffer {b}, but only {len(self._buffers)} "
                        "buffer(s) exist; create it first with "
                        "pipe.add_buffer(size, dtype=...) and use the index it returns")
            kernel, prepared = self._coord._kernel(st.kernel)
            stream = self._coord._new_stream()
            plan.append((st, kernel, prepared, stream))
        self._order = order
        self._plan = plan

    def execute_iteration(self) -> int:
        """Queue one iteration of every stage; returns the iteration number."""
        self._check()
        if not self._plan:
            raise InvalidOperationError("call set_order([...]) before execute_iteration()")
        coord = self._coord
        coord._check()
        k = self._iter % self.depth
        it = self._iter
        if self._win.ref is None:
            self._win.ref = coord._event(True)
            self._plan[0][3].record(self._win.ref, False)
            self._win.first_iter = it
        last = len(self._plan) - 1
        for pos, (st, kernel, prepared, stream) in enumerate(self._plan):
            self._reclaim(st.output_buffers, k)
            waits = [self._writer[b][k] for b in st.input_buffers]
            hazards = [op for b in st.output_buffers
                       for op in (self._writer[b][k], *self._readers[b][k])]
            arrays = [self._buffers[b]._slots[k].full
                      for b in (*st.input_buffers, *st.output_buffers)]
            config = st.config or kernel.config or (
                LaunchConfig.for_elements(len(arrays[0])) if arrays else LaunchConfig())
            op = coord._launch_op(stream, kernel, prepared, waits, hazards,
                                  arrays if kernel.uses_arrays else (),
                                  st.extra or kernel.defaults, config, timing=True)
            op.keep = arrays
            op.on_done = self._timer(st.name, it, pos == last)
            oid = int(coord._commit(op, stream))
            for b in st.input_buffers:
                self._readers[b][k].append(oid)
            for b in st.output_buffers:
                self._writer[b][k] = oid
                self._readers[b][k] = []
        self._iter += 1
        return it

    def _reclaim(self, buffers: Sequence[int], k: int) -> None:
        """Block until slot ``k`` of each buffer is no longer used by an older iteration."""
        coord = self._coord
        for b in buffers:
            for oid in (self._writer[b][k], *self._readers[b][k]):
                op = coord._inflight.get(oid)
                if op is not None:
                    op.event.synchronize()
                    coord._harvest_lane(op.lane, op)

    def _timer(self, stage: str, it: int, last: bool) -> Any:
        win = self._win

        def done(op: Any, _ms: Optional[float]) -> None:
            if win is not self._win or it < win.first_iter or op.start is None:
                return
            win.add(stage, op.start.elapsed_ms(win.ref), op.end.elapsed_ms(win.ref), last)
        return done

    def get_stats(self) -> PipelineStats:
        """Statistics of the window; waits for the window's queued iterations first."""
        self._check()
        coord = self._coord
        for _, _, _, stream in self._plan:
            stream.synchronize()
        coord._harvest()
        win = self._win
        n = len(win.ends)
        if n == 0:
            return PipelineStats(0, 0.0, 0.0, 0.0, {})
        ends = sorted(win.ends)
        span = ends[-1] - win.t0
        avg = (ends[-1] - ends[0]) / (n - 1) if n > 1 else span
        busy = sum(b - a for a, b in _merge(win.busy))
        return PipelineStats(
            iterations=n,
            avg_iteration_ms=avg,
            throughput=n / (span / 1e3) if span > 0 else 0.0,
            gpu_utilization=min(1.0, busy / span) if span > 0 else 0.0,
            stage_ms={s: win.stage_sum[s] / win.stage_n[s] for s in win.stage_sum},
        )

    def reset_stats(self) -> None:
        """Start a new statistics window with the next iteration."""
        self._check()
        old = self._win
        self._win = _Window()
        if old.ref is not None and old.ref.query():
            self._coord._tpool.append(old.ref)

    def _check(self) -> None:
        if self._closed:
            raise InvalidOperationError("this PipelineStageManager is closed")

    def close(self) -> None:
        """Wait for queued iterations and free the buffers (and an owned coordinator)."""
        if self._closed:
            return
        self._closed = True
        try:
            for _, _, _, stream in self._plan:
                stream.synchronize()
            if self._owns:
                self._coord.close()
        finally:
            for buf in self._buffers:
                buf.close()

    def __enter__(self) -> "PipelineStageManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
