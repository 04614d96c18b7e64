"""TripleBuffer: a ring of device slots, their memory and the guide's API.

The state machine (slots, cursors, take/untake) is ``RingCore`` (``_ring.py``), the
base class; this module adds the device memory and the names users call.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from ._args import MAX_DEPTH, allocate_named, int_arg, resolve_device
from ._ring import (DOWNLOADING_I, FREE_I, PROCESSING_I, UPLOADING_I, BufferState, RingCore,
                    Slot)

__all__ = ["BufferState", "Slot", "TripleBuffer", "GpuTripleBuffer", "ring_for",
           "FREE_I", "UPLOADING_I", "PROCESSING_I", "DOWNLOADING_I"]


class TripleBuffer(RingCore):
    """A ring of ``depth`` (1 to 1024) device slots of ``size`` elements of ``dtype``.

    Slots move ``FREE -> UPLOADING -> PROCESSING -> DOWNLOADING -> FREE``, each
    role in ring order (its own FIFO cursor), so iteration k of an upload /
    compute / download / advance loop uses slot ``k % depth``. Thread-safe: three
    threads may each drive one role.

    >>> buf = TripleBuffer(device, 1024, dtype=np.float32)   # doctest: +SKIP
    >>> slot = buf.get_upload_buffer()                       # doctest: +SKIP
    """

    def __init__(self, device: Any, size: int, dtype: Any = np.float32, depth: int = 3) -> None:
        size, depth = int_arg(size, "size", 1), int_arg(depth, "depth", 1, MAX_DEPTH)
        if device is None:
            raise TypeError("device must be a prism-gpu device (ctx.device) or a context")
        self.device = device = resolve_device(device)[0]
        self.dtype = np.dtype(dtype)
        if self.dtype.hasobject:
            raise TypeError("object dtypes cannot live in device memory")
        self._size = int(size)
        nbytes = self._size * self.dtype.itemsize
        slot = f"a slot of {size} elements of {self.dtype}"
        self._ring_init([Slot(self, i, allocate_named(device.allocate, nbytes, slot)
                              .view(self.dtype)) for i in range(depth)])

    # the guide's API (and advance, retire, get_states: RingCore's) -----------------
    def size(self) -> int:
        """Elements per slot."""
        return self._size

    def get_upload_buffer(self) -> Optional[Slot]:
        """Oldest FREE slot -> UPLOADING, or None if no slot is FREE."""
        return self.take(FREE_I)

    def get_process_buffer(self) -> Optional[Slot]:
        """Oldest UPLOADING slot -> PROCESSING, or None."""
        return self.take(UPLOADING_I)

    def get_download_buffer(self) -> Optional[Slot]:
        """Oldest PROCESSING slot -> DOWNLOADING, or None."""
        return self.take(PROCESSING_I)

    @property
    def capacity(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        return self._size * self.dtype.itemsize

    def __enter__(self) -> "TripleBuffer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        states = ", ".join(s.state.name for s in self.slots)
        return f"TripleBuffer(size={self._size}, dtype={self.dtype}, depth={self.depth}: {states})"


GpuTripleBuffer = TripleBuffer


def ring_for(rings: Dict[Any, "TripleBuffer"], key: Any, device: Any, dtype: np.dtype, n: int,
             depth: int = 3) -> "TripleBuffer":
    """The ring ``rings[key]``, replaced by one twice as large (at least ``n``) when its
    slots hold fewer than ``n`` elements; the old one is closed (ops in flight keep what
    they use alive)."""
    ring = rings.get(key)
    if ring is None or ring.capacity < n:
        size = n if ring is None else max(n, 2 * ring.capacity)
        new = TripleBuffer(device, size, dtype=dtype, depth=depth)
        if ring is not None:
            ring.close()
        ring = rings[key] = new
    return ring
