"""A ring's slots and its state machine, the part on every queued op's path.

:class:`PySlot` and :class:`PyRingCore` are the reference, in Python; ``_ccore``
(C, where built) has the same as ``Slot`` and ``RingCore``, statement for statement,
and the test suite runs against both (``PRISM_GPU_COMPILED=0`` selects Python).
:class:`Slot` and :class:`RingCore` are the ones in use; :class:`TripleBuffer`
(``_buffers.py``) derives from ``RingCore`` and adds the memory and the guide's API.

The state machine is host-side plain data; GPU ordering is carried by each slot's
last op (set by the coordinator), so state changes never block.
"""

from __future__ import annotations

import threading
from operator import index
import weakref
from enum import Enum
from typing import TYPE_CHECKING, Any, List, Optional, Sequence

from . import _core
from ._errors import BufferUnavailableError, InvalidOperationError

__all__ = ["BufferState", "Slot", "RingCore", "PySlot", "PyRingCore",
           "FREE_I", "UPLOADING_I", "PROCESSING_I", "DOWNLOADING_I"]


class BufferState(str, Enum):
    FREE = "free"
    UPLOADING = "uploading"
    PROCESSING = "processing"
    DOWNLOADING = "downloading"

    def __str__(self) -> str:
        return self.value


# States in cycle order; transitions and cursors are indexed by position (enum
# hashing is slow, and these are on every queued op's path).
_CYCLE = (BufferState.FREE, BufferState.UPLOADING, BufferState.PROCESSING,
          BufferState.DOWNLOADING)
FREE_I, UPLOADING_I, PROCESSING_I, DOWNLOADING_I = range(4)


class PySlot:
    """One device slot of a ring, with the hazards of its memory.

    ``array`` is the device array holding the slot's valid elements (all of
    them until an upload sets a shorter length); ``capacity`` is the full size.
    The ring records, per slot, the last op that wrote it and the ops that read
    it since: a new writer is ordered after all of them on the GPU, a reader
    after the writer. ``failed`` is the root op of a failure known to have
    spoiled the slot's data.
    """

    __slots__ = ("buffer", "index", "state", "full", "valid", "capacity", "writer", "readers",
                 "ops", "failed", "ref", "__weakref__")

    def __init__(self, buffer: Any, index: int, full: Any) -> None:
        self.buffer = buffer
        self.index = index
        self.state = BufferState.FREE
        self.full = full
        self.valid = self.capacity = len(full)
        self.writer: Any = None         # the last op that wrote the slot (an engine op)
        self.readers: List[Any] = []    # ops that read it since
        self.ops: List[int] = []        # ids of the ops on the slot's current data
        self.failed: Any = None         # (root op id, its error) of spoiled data
        self.ref = weakref.ref(self)

    @property
    def array(self) -> Any:
        """The slot's valid elements (refused once its ring is closed: read it once)."""
        full = self.full
        if full is None:
            raise InvalidOperationError("this TripleBuffer is closed")
        return full if self.valid == self.capacity else full[:self.valid]

    def head(self, n: int) -> Any:
        """The slot's first ``n`` elements; refused once its ring is closed (another
        thread may close it: the memory is read once, and then kept by the op)."""
        full = self.full
        if full is None:
            raise InvalidOperationError("this TripleBuffer is closed")
        return full if n == self.capacity else full[:n]

    def write_hazards(self) -> Sequence[Any]:
        """Ops a new write must follow on the device: every reader since the last write
        (each followed the writer), or else the writer."""
        if self.readers:
            return self.readers
        return (self.writer,) if self.writer is not None else ()

    def filled(self, op: Any, valid: int) -> List[int]:
        """``op`` writes fresh data of ``valid`` elements; returns the ids of the ops
        on the old data (no longer the slot's)."""
        valid = index(valid)
        old = self.ops
        self.ops = [op.id]
        self.writer = op
        self.readers = []
        self.valid = valid
        self.failed = None
        return old

    def updated(self, op: Any, failed: Any = None) -> None:
        """``op`` read and rewrote the slot's data in place."""
        self.ops.append(op.id)
        self.writer = op
        self.readers = []
        if failed is not None and self.failed is None:
            self.failed = failed

    def read(self, op: Any) -> None:
        """``op`` reads the slot's data."""
        self.ops.append(op.id)
        self.readers.append(op)

    def __repr__(self) -> str:
        return f"Slot(index={self.index}, state={self.state.name}, valid={self.valid})"


class PyRingCore:
    """The ring's state machine: slots in cycle order, a cursor per transition.

    Each role moves slots in ring order (its own FIFO cursor). Thread-safe: three
    threads may each drive one role.
    """

    depth: int

    def _ring_init(self, slots: List[Any]) -> None:
        """Start the ring on ``slots`` (all FREE), once."""
        self._slots = list(slots)
        self.depth = len(self._slots)
        self._lock = threading.Lock()
        # next slot index for each transition, indexed by the state it leaves
        self._cursor = [0, 0, 0, 0]
        self._closed = False

    def get_states(self) -> List[BufferState]:
        with self._lock:
            return [s.state for s in self._slots]

    def take(self, which: int) -> Optional[Any]:
        """Move the slot at cursor ``which`` (a state's position in the cycle) on.
        Undo with :meth:`untake` if what the move was for is rejected."""
        # (a with block: an interrupt between an acquire and a try would leave it held)
        with self._lock:
            if self._closed:
                raise InvalidOperationError("this TripleBuffer is closed")
            cursor = self._cursor
            i = cursor[which]
            slot = self._slots[i]
            if slot.state is not _CYCLE[which]:
                return None
            slot.state = _CYCLE[(which + 1) & 3]
            cursor[which] = (i + 1) % self.depth
            return slot

    def untake(self, slot: Any, which: int) -> None:
        """Undo the last take at cursor ``which`` (a rejected call changes no state)."""
        with self._lock:
            slot.state = _CYCLE[which]
            self._cursor[which] = (self._cursor[which] - 1) % self.depth

    def peek(self, which: int, ahead: int = 0) -> Optional[Any]:
        """The slot the ``ahead``-th next take at cursor ``which`` would return, or None."""
        if self._closed:
            raise InvalidOperationError("this TripleBuffer is closed")
        slot = self._slots[(self._cursor[which] + ahead) % self.depth]
        return slot if slot.state is _CYCLE[which] else None

    def produce(self) -> Optional[Any]:
        """Oldest FREE slot straight to PROCESSING: a compute writes it, no upload."""
        with self._lock:
            if self._closed:
                raise InvalidOperationError("this TripleBuffer is closed")
            i = self._cursor[FREE_I]
            slot = self._slots[i]
            if slot.state is not BufferState.FREE:
                return None
            if self._cursor[UPLOADING_I] != i:
                raise InvalidOperationError(
                    "a compute output buffer must not have uploads waiting for a compute")
            slot.state = BufferState.PROCESSING
            self._cursor[FREE_I] = self._cursor[UPLOADING_I] = (i + 1) % self.depth
            return slot

    def retire(self) -> bool:
        """Oldest PROCESSING slot -> FREE without a download (its data is not needed).

        The GPU still orders the next write into the slot after every op that
        used it. True if a slot was retired.
        """
        with self._lock:
            if self._closed:
                raise InvalidOperationError("this TripleBuffer is closed")
            cursor = self._cursor
            i = cursor[PROCESSING_I]
            slot = self._slots[i]
            if slot.state is not BufferState.PROCESSING:
                return False
            if cursor[DOWNLOADING_I] != i:
                raise BufferUnavailableError(
                    "retire() needs every downloaded slot advanced first (ring order); "
                    "call advance()")
            slot.state = BufferState.FREE
            cursor[PROCESSING_I] = cursor[DOWNLOADING_I] = (i + 1) % self.depth
            return True

    def advance(self) -> bool:
        """Oldest DOWNLOADING slot -> FREE. True if a slot was freed."""
        return self.take(DOWNLOADING_I) is not None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def slots(self) -> List[Any]:
        return list(self._slots)

    def close(self) -> None:
        """Drop the device memory. Ops still in flight keep what they use alive."""
        with self._lock:
            self._closed = True
            for s in self._slots:
                s.full = None


def _compiled() -> Any:
    c = _core.compiled_module()
    if c is not None:
        c.setup_ring({"cycle": _CYCLE, "InvalidOperationError": InvalidOperationError,
                      "BufferUnavailableError": BufferUnavailableError})
    return c


_C = _compiled()
if TYPE_CHECKING:
    Slot = PySlot
    RingCore = PyRingCore
else:
    Slot = _C.Slot if _C is not None else PySlot
    RingCore = _C.RingCore if _C is not None else PyRingCore
