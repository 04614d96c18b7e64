"""The records of pipelines: a stage, an iteration in flight, the statistics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

from ._config import LaunchConfig
from ._args import check_timeout
from ._errors import DependencyFailedError, InvalidOperationError, SynchronizationError
from ._optable import raise_failures

if TYPE_CHECKING:
    from ._coordinator import AsyncCoordinator

__all__ = ["GpuPipelineStage", "PipelineStats", "PipelineIteration", "RESERVED_NAMES"]

RESERVED_NAMES = ("upload", "download")
"""Names of the copy lanes in the statistics; no stage may take them."""


def indices(values: Any, what: str) -> List[int]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{what} must be a list of indices, got {type(values).__name__}")
    out = []
    for v in values:
        if isinstance(v, bool) or not hasattr(v, "__index__"):
            raise TypeError(f"{what} must hold int indices, got {v!r}")
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
        if self.name in RESERVED_NAMES:
            raise ValueError(f"the stage name {self.name!r} is taken by the pipeline's copies "
                             "in its statistics; choose another")
        self.input_buffers = indices(self.input_buffers, "input_buffers")
        self.output_buffers = indices(self.output_buffers, "output_buffers")
        if self.config is not None and not isinstance(self.config, LaunchConfig):
            raise TypeError(f"config must be a prism_gpu.LaunchConfig or None, got "
                            f"{type(self.config).__name__}")
        if not isinstance(self.extra, (tuple, list)):
            raise TypeError(f"extra must be a tuple, got {type(self.extra).__name__}")
        self.extra = tuple(self.extra)
        if self.kernel is None:
            self.kernel = self.name
        elif not isinstance(self.kernel, str) and not callable(self.kernel) \
                and not hasattr(self.kernel, "cpu_callable"):
            raise TypeError(f"kernel must be a kernel name, a Kernel or a callable, got "
                            f"{type(self.kernel).__name__}")


class PipelineStats(NamedTuple):
    """Statistics of the window since the last :meth:`PipelineStageManager.reset_stats`.

    ``iterations``: iterations completed in the window. ``avg_iteration_ms``: the
    steady-state time between iteration completions. ``throughput``: iterations
    per second over the window. ``gpu_utilization``: the fraction of the window
    in which any stage or copy of the pipeline was running (0..1). ``stage_ms``:
    each stage's mean device time, from its start and end events, with the
    pipeline's own copies as ``"upload"`` and ``"download"`` when it was fed data;
    the largest entry is the stage that bounds the pipeline. On the CPU backend
    stages share the host's cores, so concurrent stages can each take longer than
    they would alone.
    """

    iterations: int
    avg_iteration_ms: float
    throughput: float
    gpu_utilization: float
    stage_ms: Dict[str, float]


class PipelineIteration:
    """One queued iteration of a pipeline: ``index``, :meth:`done`, :meth:`wait`.

    Output arrays passed to ``execute_iteration(outputs=...)`` hold their results
    once :meth:`wait` returns.
    """

    __slots__ = ("index", "_coord", "_ops")

    def __init__(self, index: int, coord: "AsyncCoordinator", ops: List[int]) -> None:
        self.index = index
        self._coord = coord
        self._ops = ops  # (the pipeline's own list, never changed)

    def done(self) -> bool:
        """True once every op of the iteration completed (never blocks)."""
        return all(self._coord.is_complete(op) for op in self._ops)

    def wait(self, timeout: Optional[float] = None) -> "PipelineIteration":
        """Block until the iteration completed; raise its failure (the stage that
        failed; several independent ones as an ExceptionGroup)."""
        limit = check_timeout(timeout)
        deadline = None if limit is None else time.perf_counter() + limit
        errors: List[BaseException] = []
        roots = set()
        for op in self._ops:
            left = None if deadline is None else max(0.0, deadline - time.perf_counter())
            try:
                self._coord.wait(op, left)
            except (SynchronizationError, InvalidOperationError):
                raise  # timed out, or the pipeline (its coordinator) is closed
            except Exception as exc:  # noqa: BLE001 - reported together below
                if isinstance(exc, DependencyFailedError):
                    if exc.root_op in roots or exc.root_op in self._ops:
                        continue
                roots.add(int(op))
                errors.append(exc)
        raise_failures(errors, f"pipeline iteration {self.index}")
        return self

    def __repr__(self) -> str:
        return f"PipelineIteration(index={self.index}, ops={list(self._ops)})"
