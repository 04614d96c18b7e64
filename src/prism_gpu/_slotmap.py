"""Which slots an op's data lives in: the data flow along dependencies.

One owner (:class:`SlotMap`, one per coordinator) maps op ids to the slots they
touched, weakly, so dropped buffers are not kept alive; an id leaves when its
slot is refilled. The checks here pick the slots a compute consumes (in ring
order) and the slots it writes.

:class:`PySlotMap` is the reference; ``_ccore`` has the same in C (``SlotMap``, used
unless ``PRISM_GPU_COMPILED=0``), statement for statement.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Sequence, Tuple

from . import _core
from ._buffers import FREE_I, UPLOADING_I, BufferState, Slot, TripleBuffer
from ._errors import BufferUnavailableError, InvalidDependencyError, InvalidOperationError, \
    TransferError
from ._args import int_arg

__all__ = ["SlotMap", "PySlotMap", "pending_uploads", "output_slots"]

_UPLOADING = BufferState.UPLOADING
_PROCESSING = BufferState.PROCESSING


class PySlotMap:
    """op id -> the slot(s) it touched: a weakref, or a tuple of them."""

    def __init__(self) -> None:
        self._map: Dict[int, Any] = {}
        self._sweep_at = 4096

    def filled(self, slot: Slot, op: Any, n: int) -> None:
        """``op`` put fresh data of ``n`` elements in ``slot``."""
        m = self._map
        for old in slot.filled(op, n):
            m.pop(old, None)
        m[op.id] = slot.ref
        if len(m) > self._sweep_at:
            self._sweep()

    def touched(self, oid: int, slots: Sequence[Slot]) -> None:
        self._map[oid] = slots[0].ref if len(slots) == 1 else tuple(s.ref for s in slots)

    def data_slots(self, dep_ids: Sequence[int]) -> List[Slot]:
        """The slots holding data of ops ``dep_ids`` (each once, in order) that a
        compute can still consume (UPLOADING or PROCESSING); refused if a slot's ring
        was closed (its memory is gone)."""
        slots: List[Slot] = []
        m = self._map
        for d in dep_ids:
            refs = m.get(d, ())
            for r in (refs if type(refs) is tuple else (refs,)):
                s = r()
                if s is not None and s not in slots and (s.state is _UPLOADING
                                                         or s.state is _PROCESSING):
                    if s.full is None:  # set by TripleBuffer.close, nothing else
                        raise InvalidOperationError(
                            "a dependency's TripleBuffer is closed: its data is gone")
                    slots.append(s)
        return slots

    def clear(self) -> None:
        self._map.clear()

    def _sweep(self) -> None:
        """Drop the entries of dropped buffers."""
        slots_of = self._map
        for k in [k for k, refs in slots_of.items()
                  if all(r() is None for r in (refs if type(refs) is tuple else (refs,)))]:
            del slots_of[k]
        self._sweep_at = 2 * len(slots_of) + 4096


_C = _core.compiled_module()
if TYPE_CHECKING:
    SlotMap = PySlotMap
else:
    SlotMap = _C.SlotMap if _C is not None else PySlotMap


def output_slots(outputs: Sequence[Any], device: Any) -> List[Tuple[Slot, int]]:
    """The next FREE slot of each output buffer, with the length the kernel writes."""
    if isinstance(outputs, (str, bytes, TripleBuffer)) or not hasattr(outputs, "__iter__"):
        raise TypeError("outputs must be a list of TripleBuffers or (buffer, n) pairs")
    outs: List[Tuple[Slot, int]] = []
    for entry in outputs:
        buf, n = entry if isinstance(entry, tuple) and len(entry) == 2 else (entry, None)
        if not isinstance(buf, TripleBuffer):
            raise TypeError(f"outputs takes TripleBuffers, got {type(buf).__name__}")
        if buf.device is not device:
            raise TransferError("an output buffer lives on another device")
        n = buf.capacity if n is None else int_arg(n, "output length", 1)
        if n > buf.capacity:
            raise TransferError(f"output length {n} does not fit a slot of {buf.capacity}")
        slot = buf.peek(FREE_I)
        if slot is None or any(s.buffer is buf for s, _ in outs):
            raise BufferUnavailableError(
                f"output buffer has no FREE slot (states: {buf.get_states()}); download "
                "and advance() first")
        if buf.peek(UPLOADING_I) is not None:
            raise InvalidOperationError(
                "an output buffer must not hold uploads waiting for a compute")
        outs.append((slot, n))
    return outs


def pending_uploads(slots: List[Slot]) -> List[Slot]:
    """Slots still UPLOADING, checked to be the oldest uploads of their buffers (computes
    consume uploads in ring order; the order of the dependencies does not matter)."""
    if len(slots) == 1:  # the common case: one upload, its buffer's oldest
        s = slots[0]
        if s.state is not _UPLOADING:
            return []
        if s.buffer.peek(UPLOADING_I) is s:
            return slots
    pending = [s for s in slots if s.state is _UPLOADING]
    by_buffer: Dict[int, List[Slot]] = {}
    for s in pending:
        by_buffer.setdefault(id(s.buffer), []).append(s)
    for group in by_buffer.values():
        buf = group[0].buffer
        oldest = [buf.peek(UPLOADING_I, k) for k in range(len(group))]
        if any(s not in oldest for s in group):
            first = oldest[0]
            late = next(s for s in group if s not in oldest)
            raise InvalidDependencyError(
                f"slot {late.index} is computed on before the older upload in slot "
                f"{first.index if first else '?'} of the same buffer; computes consume "
                "uploads in ring order: queue a compute on the older upload first")
    return pending  # each is taken at its buffer's UPLOADING cursor: the set is what counts
