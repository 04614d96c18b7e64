"""Feeding a pipeline: input checks, valid lengths, and the generator behind ``run``."""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np

from ._buffers import TripleBuffer
from ._errors import InvalidOperationError, TransferError
from ._feed import Pulled, read_ahead
from ._stage import PipelineIteration
from ._sink import Sink
from ._staging import Stager, cache_of
from ._validate import host_array

__all__ = ["check_inputs", "valid_lengths", "written_buffers", "run_pipeline", "io_entry",
           "fast_io"]

_ndarray = np.ndarray
# an iteration checked once, for the pipeline's plan then: (buffer fed -> (dtype, capacity),
# buffer read back -> (dtype, valid elements), the buffers it writes, the valid lengths)
IoEntry = Tuple[Dict[int, Tuple[Any, int]], Dict[int, Tuple[Any, int]], Tuple[int, ...],
                Mapping[int, int]]


def written_buffers(plan: Sequence[Any], fed: Tuple[int, ...]) -> Tuple[int, ...]:
    """The buffers an iteration with inputs ``fed`` writes; rejects a stage reading a
    buffer nothing wrote before it."""
    written = set(fed)
    for step in plan:
        for b in step.reads:
            if b not in written:
                raise InvalidOperationError(
                    f"stage {step.stage.name!r} reads buffer {b} before any stage writes "
                    f"it; order a stage that writes it first, or feed it: "
                    f"execute_iteration(inputs={{{b}: array}}) or run(batches, input={b})")
        for b in step.writes:
            if b in fed and b not in step.reads:
                raise InvalidOperationError(
                    f"stage {step.stage.name!r} overwrites buffer {b}, which is fed as an "
                    "input; feed another buffer, or have the stage read it too (in place)")
        written.update(step.writes)
    return tuple(sorted(written))


def check_inputs(pipe: Any, inputs: Any) -> Tuple[Dict[int, np.ndarray], Dict[int, int]]:
    """``inputs`` checked against the pipeline's buffers: buffer -> flat array, and
    buffer -> its length."""
    if inputs is None:
        return {}, {}
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must map buffer indices to arrays, got "
                        f"{type(inputs).__name__}")
    out, lengths = {}, {}
    for b, x in inputs.items():
        buf = pipe.buffer(b)
        host_array(x, buf.dtype, f"input for buffer {b}")
        if x.size > buf.capacity:
            raise TransferError(f"input for buffer {b} has {x.size} elements, its slots "
                                f"hold {buf.capacity}; add a larger buffer or split it")
        i = int(b)
        out[i] = x if x.ndim == 1 else x.reshape(-1)
        lengths[i] = int(x.size)
    return out, lengths


def valid_lengths(plan: Sequence[Any], bufs: Sequence[TripleBuffer],
                  fed: Mapping[int, int]) -> Dict[int, int]:
    """Valid elements per buffer this iteration, given the length of each buffer fed: a
    short input's length flows to every buffer a stage writes from buffers of the same
    size."""
    valid = dict(fed)
    for step in plan:
        for w in step.writes:
            cap = bufs[w].capacity
            short = [valid[r] for r in step.reads
                     if bufs[r].capacity == cap and valid.get(r, cap) < cap]
            if w not in valid or w not in step.reads:
                valid[w] = min(short) if short else cap
    return valid


def io_entry(bufs: Sequence[TripleBuffer], fed: Mapping[int, Any], downs: Mapping[int, Any],
             touched: Tuple[int, ...], valid: Mapping[int, int]) -> Optional[IoEntry]:
    """What :func:`fast_io` needs to check the next iteration of the same plan feeding and
    reading back the same buffers (this one passed every check), or None unless every
    input fills its buffer (no short length flows anywhere: the valid lengths are the
    same each time)."""
    for b in fed:
        if valid[b] != bufs[b].capacity:
            return None
    return ({b: (bufs[b].dtype, bufs[b].capacity) for b in fed},
            {b: (bufs[b].dtype, valid.get(b, bufs[b].capacity)) for b in downs}, touched, valid)


def fast_io(entry: IoEntry, inputs: Optional[Dict[Any, Any]],
            outputs: Optional[Dict[Any, Any]]) -> Optional[Tuple[
                Dict[int, np.ndarray], Dict[int, np.ndarray], Tuple[int, ...], Mapping[int, int]]]:
    """``(fed, downloads, buffers written, valid lengths)`` of an iteration feeding the
    buffers of ``entry`` (:func:`io_entry`; in any order) and reading back some of those it
    read back, when its inputs and outputs pass every check without a word: int indices,
    numpy arrays (not subclasses) of the buffer's dtype, C-contiguous, of the full length
    (an output also writable); else None, and the general checks run (and say what is
    wrong, in their order)."""
    specs, out_specs = entry[0], entry[1]
    fed: Dict[int, np.ndarray] = {}  # (ours: the caller's may change before it is queued)
    if inputs:
        if len(inputs) != len(specs):  # (the buffers read back may be fewer: all written)
            return None
        for b, x in inputs.items():
            if type(b) is not int:  # (before the look-up, which compares it)
                return None
            spec = specs.get(b)
            if spec is None or type(x) is not _ndarray or x.dtype is not spec[0] \
                    or x.size != spec[1] or not x.flags.c_contiguous:
                return None
            fed[b] = x if x.ndim == 1 else x.reshape(-1)
    elif specs:
        return None
    downs: Dict[int, np.ndarray] = {}
    if outputs:
        for b, y in outputs.items():
            if type(b) is not int:
                return None
            spec = out_specs.get(b)
            if spec is None or type(y) is not _ndarray or y.dtype is not spec[0] \
                    or y.size != spec[1]:
                return None
            flags = y.flags
            if not flags.c_contiguous or not flags.writeable:
                return None
            downs[b] = y if y.ndim == 1 else y.reshape(-1)
    return fed, downs, entry[2], entry[3]


def run_pipeline(pipe: Any, batches: Iterable[np.ndarray], b_in: int, b_out: int,
                 in_buf: TripleBuffer, out_buf: TripleBuffer, prefetch: int, out: Any,
                 out_valid: Callable[[int], int]) -> Iterator[np.ndarray]:
    """The generator behind :meth:`PipelineStageManager.run` (arguments checked);
    ``out_valid(n)``: the elements a batch of ``n`` leaves in buffer ``b_out``."""
    device = pipe.coordinator().device
    cache = cache_of(device)
    stager = Stager(device, cache)
    sink = Sink(out, device, stager, cache.results)
    queued: Dict[int, PipelineIteration] = {}

    def prepare(batch: np.ndarray, pos: int) -> Tuple[Tuple[int, ...], Optional[np.ndarray]]:
        if batch.dtype != in_buf.dtype:
            raise TransferError(f"batch {pos} has dtype {batch.dtype}, buffer {b_in} holds "
                                f"{in_buf.dtype}; convert it with .astype(...)")
        if batch.size > in_buf.capacity:
            raise TransferError(f"batch {pos} has {batch.size} elements, buffer {b_in}'s "
                                f"slots hold {in_buf.capacity}")
        n = out_valid(batch.size)  # a short batch's length flows through equal sizes
        shape = batch.shape if n == batch.size and batch.dtype == out_buf.dtype else (n,)
        return shape, sink.claim(pos, shape, out_buf.dtype)

    def submit(entry: Pulled) -> Tuple[PipelineIteration, np.ndarray, Any, Any]:
        entry.wait_staged()
        shape, final = entry.info
        result = sink.destination(final, shape, out_buf.dtype)
        staged = entry.staged if entry.staged.ndim == 1 else entry.staged.reshape(-1)
        try:
            it = pipe.execute_iteration(inputs={b_in: staged}, outputs={b_out: result})
        except BaseException:
            stager.recycle(entry.raw)
            raise
        queued[it.index] = it
        return it, result, final, entry.raw

    def finish(handle: Tuple[PipelineIteration, np.ndarray, Any, Any]) -> np.ndarray:
        it, result, final, raw = handle
        del queued[it.index]
        try:
            it.wait()
        finally:
            stager.recycle(raw)
        return sink.deliver(result, final)

    try:
        yield from read_ahead(batches, pipe.depth, prefetch, stager, prepare, submit,
                              finish, "pipeline: batch")
    finally:
        for it in queued.values():  # iterations behind a raised one: their outcome is moot
            try:
                it.wait()
            except Exception:  # noqa: BLE001
                pass
        stager.close()
