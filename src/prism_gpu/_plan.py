"""A pipeline's plan: its stages in order, each with its kernel, stream and buffers."""

from __future__ import annotations

from typing import Any, Callable, List, NamedTuple, Sequence, Tuple

from ._config import LaunchConfig
from ._devarray import DeviceArray, backend_values
from ._errors import InvalidOperationError
from ._inflight import Lane
from ._stage import GpuPipelineStage

__all__ = ["Step", "make_plan", "check_open"]


class Step(NamedTuple):
    """A stage as the plan runs it."""

    stage: GpuPipelineStage
    prepared: Any
    config: LaunchConfig
    uses_arrays: bool
    extra: Tuple[Any, ...]
    lane: Lane
    reads: Tuple[int, ...]
    writes: Tuple[int, ...]
    reads_only: Tuple[bool, ...]  # per read: a buffer the stage does not write
    fresh: Tuple[int, ...]        # written, not read: filled anew
    inplace: Tuple[int, ...]      # written and read: rewritten in place
    constants: Tuple[DeviceArray, ...]  # the DeviceArrays of extra: checked open per run


def check_open(plan: Sequence[Step]) -> None:
    """Refuse a plan whose DeviceArrays were closed since it was made (it keeps their
    memory, but a closed array is one the user gave back)."""
    for step in plan:
        for d in step.constants:
            if d.closed:
                raise InvalidOperationError(
                    f"stage {step.stage.name!r} reads a DeviceArray in extra that is closed")


def make_plan(order: List[int], stages: Sequence[GpuPipelineStage], buffers: Sequence[Any],
              resolve: Callable[[Any], Tuple[Any, Any]],
              lane: Callable[[int, str], Lane], device: Any = None) -> List[Step]:
    """The stages at ``order``, checked (indices known and not repeated, buffers that
    exist, kernels that resolve, DeviceArrays in ``extra`` open and on ``device``)
    before any stream is made for them. A plan keeps the device memory of the
    DeviceArrays it was made with."""
    if not order:
        raise ValueError("the pipeline has no stage to run: add_stage() first")
    if len(set(order)) != len(order):
        raise ValueError(f"set_order repeats a stage: {order}; each stage runs once "
                         "per iteration")
    n = len(stages)
    for i in order:
        if not 0 <= i < n:
            raise InvalidOperationError(
                f"no stage {i}: {n} stage(s) were added (indices 0..{n - 1}); "
                "add_stage() returns each index")
    resolved = []
    extras: List[Any] = []
    for i in order:  # (add_stage checked the buffers: stages and buffers are only added)
        st = stages[i]
        resolved.append(resolve(st.kernel))
        extras.append(tuple(backend_values(st.extra, device)) if st.extra else None)
    plan = []
    for i, (kernel, prepared), extra in zip(order, resolved, extras):
        st = stages[i]
        if kernel.check is not None:
            kernel.check(kernel.defaults if extra is None else extra)
        first = (*st.input_buffers, *st.output_buffers)
        config = st.config or kernel.config or LaunchConfig.for_elements(
            buffers[first[0]].capacity if first else 1)
        reads, writes = tuple(st.input_buffers), tuple(st.output_buffers)
        plan.append(Step(st, prepared, config, kernel.uses_arrays,
                         kernel.defaults if extra is None else extra, lane(i, st.name),
                         reads, writes, tuple(b not in writes for b in reads),
                         tuple(b for b in writes if b not in reads),
                         tuple(b for b in writes if b in reads),
                         tuple(v for v in st.extra or () if type(v) is DeviceArray)))
    return plan
