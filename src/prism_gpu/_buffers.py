"""TripleBuffer: a ring of device slots and their state machine.

The state machine is host-side plain data; GPU ordering is carried by each
slot's last event (set by the coordinator), so state changes never block.
"""

from __future__ import annotations

import threading
import weakref
from enum import Enum
from typing import Any, List, Optional

import numpy as np

from ._errors import InvalidOperationError

__all__ = ["BufferState", "Slot", "TripleBuffer", "GpuTripleBuffer"]


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


class Slot:
    """One device slot of a ring.

    ``array`` is the device array holding the slot's valid elements (all of
    them until an upload sets a shorter length); ``capacity`` is the full size.
    """

    __slots__ = ("buffer", "index", "state", "full", "valid", "capacity", "op", "ops",
                 "failed", "ref", "__weakref__")

    def __init__(self, buffer: "TripleBuffer", index: int, full: Any) -> None:
        self.buffer = buffer
        self.index = index
        self.state = BufferState.FREE
        self.full = full
        self.valid = self.capacity = len(full)
        self.op: int = -1            # id of the last op that touched the slot
        self.ops: List[int] = []     # ops that touched the slot since its last upload
        self.failed: Optional[int] = None  # root op of a failure known on the host
        self.ref = weakref.ref(self)

    @property
    def array(self) -> Any:
        return self.full if self.valid == self.capacity else self.full[: self.valid]

    def __repr__(self) -> str:
        return f"Slot(index={self.index}, state={self.state.name}, valid={self.valid})"


class TripleBuffer:
    """A ring of ``depth`` device slots of ``size`` elements of ``dtype``.

    Slots move ``FREE -> UPLOADING -> PROCESSING -> DOWNLOADING -> FREE``, each
    role in ring order (its own FIFO cursor), so iteration k of an upload /
    compute / download / advance loop uses slot ``k % depth``. Thread-safe: three
    threads may each drive one role.

    >>> buf = TripleBuffer(device, 1024, dtype=np.float32)   # doctest: +SKIP
    >>> slot = buf.get_upload_buffer()                       # doctest: +SKIP
    """

    def __init__(self, device: Any, size: int, dtype: Any = np.float32, depth: int = 3) -> None:
        if not isinstance(size, (int, np.integer)) or int(size) < 1:
            raise ValueError(f"size must be a positive number of elements, got {size!r}")
        if not isinstance(depth, (int, np.integer)) or int(depth) < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        self.device = device
        self.dtype = np.dtype(dtype)
        if self.dtype.hasobject:
            raise ValueError("object dtypes cannot live in device memory")
        self._size = int(size)
        self.depth = int(depth)
        nbytes = self._size * self.dtype.itemsize
        self._slots = [Slot(self, i, device.allocate(nbytes).view(self.dtype))
                       for i in range(self.depth)]
        self._lock = threading.Lock()
        # next slot index for each transition, indexed by the state it leaves
        self._cursor = [0, 0, 0, 0]
        self._closed = False

    # the guide's API ---------------------------------------------------------
    def size(self) -> int:
        """Elements per slot."""
        return self._size

    def get_states(self) -> List[BufferState]:
        with self._lock:
            return [s.state for s in self._slots]

    def get_upload_buffer(self) -> Optional[Slot]:
        """Oldest FREE slot -> UPLOADING, or None if no slot is FREE."""
        return self._take(FREE_I)

    def get_process_buffer(self) -> Optional[Slot]:
        """Oldest UPLOADING slot -> PROCESSING, or None."""
        return self._take(UPLOADING_I)

    def get_download_buffer(self) -> Optional[Slot]:
        """Oldest PROCESSING slot -> DOWNLOADING, or None."""
        return self._take(PROCESSING_I)

    def advance(self) -> bool:
        """Oldest DOWNLOADING slot -> FREE. True if a slot was freed."""
        return self._take(DOWNLOADING_I) is not None

    # internals ---------------------------------------------------------------
    def _take(self, which: int) -> Optional[Slot]:
        """Move the slot at cursor ``which`` (a state's position in the cycle) on."""
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

    def _produce(self) -> Optional[Slot]:
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

    def _peek(self, which: int, ahead: int = 0) -> Optional[Slot]:
        """The slot the ``ahead``-th next take at cursor ``which`` would return, or None."""
        slot = self._slots[(self._cursor[which] + ahead) % self.depth]
        return slot if slot.state is _CYCLE[which] else None

    def _untake(self, slot: Slot, which: int) -> None:
        """Undo the last take at cursor ``which`` (a rejected call changes no state)."""
        with self._lock:
            slot.state = _CYCLE[which]
            self._cursor[which] = (self._cursor[which] - 1) % self.depth

    @property
    def slots(self) -> List[Slot]:
        return list(self._slots)

    @property
    def nbytes(self) -> int:
        return self._size * self.dtype.itemsize

    def close(self) -> None:
        """Drop the device memory. Ops still in flight keep what they use alive."""
        with self._lock:
            self._closed = True
            for s in self._slots:
                s.full = None

    def __enter__(self) -> "TripleBuffer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        states = ", ".join(s.state.name for s in self._slots)
        return f"TripleBuffer(size={self._size}, dtype={self.dtype}, depth={self.depth}: {states})"


GpuTripleBuffer = TripleBuffer
