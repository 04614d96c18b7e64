"""Host memory pinned in place: the address ranges registered, shared by the backends."""

from __future__ import annotations

import threading
from typing import List, Tuple

import numpy as np

__all__ = ["HostRanges", "address_range"]


try:  # the native extension reads a buffer's address about 20x faster than numpy
    from .._hostcopy import address as _address  # type: ignore[attr-defined]
except ImportError:  # built without a C compiler
    _address = None


def host_address(array: np.ndarray) -> int:
    """The address of a host array's first element."""
    if _address is not None:
        try:
            return int(_address(array))
        except (TypeError, ValueError, BufferError):
            pass  # not exportable as a buffer: numpy knows
    return int(array.__array_interface__["data"][0])


def address_range(array: np.ndarray) -> Tuple[int, int]:
    """[start, end) of a C-contiguous array's bytes."""
    start = host_address(array)
    return start, start + int(array.nbytes)


class HostRanges:
    """Registered ranges of host memory. Lookups are lock-free reads of an immutable
    tuple (the hot path asks on every copy); changes take the lock and publish a new one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ranges: Tuple[Tuple[int, int], ...] = ()
        self.generation = 0

    def covers(self, array: np.ndarray) -> bool:
        ranges = self.ranges
        if not ranges or not array.flags.c_contiguous:
            return False
        start, end = address_range(array)
        return any(s <= start and end <= e for s, e in ranges)

    def reserve(self, array: np.ndarray) -> Tuple[int, int]:
        """Add ``array``'s range, or raise ValueError if part of it is registered."""
        start, end = address_range(array)
        with self._lock:
            if any(s < end and start < e for s, e in self.ranges):
                raise ValueError("part of this memory is registered already (an overlapping "
                                 "pg.register block is open)")
            self.ranges = self.ranges + ((start, end),)
            self.generation += 1
        return start, end

    def remove(self, start: int, end: int) -> None:
        with self._lock:
            items: List[Tuple[int, int]] = list(self.ranges)
            items.remove((start, end))
            self.ranges = tuple(items)
            self.generation += 1
