"""Host memory pinned in place: the address ranges registered, shared by the backends."""

from __future__ import annotations

import threading
import weakref
from typing import Any, Dict, List, Optional, Tuple

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
    (ranges, generation) pair (the hot path asks on every copy); changes take the lock
    and publish a new pair, and forget the base arrays found wholly registered."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state: Tuple[Tuple[Tuple[int, int], ...], int] = ((), 0)
        # id(root) -> (weak reference to it, generation): base arrays lying wholly in a
        # registered range, so that the batches sliced from them are found at once
        self._whole: Dict[int, Tuple[Any, int]] = {}

    @property
    def ranges(self) -> Tuple[Tuple[int, int], ...]:
        return self.state[0]

    @property
    def generation(self) -> int:
        """Changes whenever a range is added or removed."""
        return self.state[1]

    def covers(self, array: np.ndarray, root: Optional[np.ndarray] = None) -> bool:
        """Whether C-contiguous ``array`` lies in a registered range; ``root``, the base
        array it views (if the caller knows it), lets slices of one be found quickly."""
        ranges, generation = self.state  # one snapshot: what is remembered is of it
        if not ranges or not array.flags.c_contiguous:
            return False
        whole = self._whole
        if root is not None:
            hit = whole.get(id(root))
            if hit is not None and hit[0]() is root and hit[1] == generation \
                    and root.flags.c_contiguous:  # (strides can be set on a base)
                return True
        start, end = address_range(array)
        for s, e in ranges:
            if s <= start and end <= e:
                if root is not None and root.flags.c_contiguous:
                    rs, re = address_range(root)
                    if s <= rs and re <= e:
                        if len(whole) > 256:
                            whole.clear()
                        whole[id(root)] = (weakref.ref(root), generation)
                return True
        return False

    def reserve(self, array: np.ndarray) -> Tuple[int, int]:
        """Add ``array``'s range, or raise ValueError if part of it is registered."""
        start, end = address_range(array)
        with self._lock:
            ranges, generation = self.state
            if any(s < end and start < e for s, e in ranges):
                raise ValueError("part of this memory is registered already (an overlapping "
                                 "pg.register block is open)")
            self.state = (ranges + ((start, end),), generation + 1)
            self._whole = {}
        return start, end

    def remove(self, start: int, end: int) -> None:
        with self._lock:
            ranges, generation = self.state
            items: List[Tuple[int, int]] = list(ranges)
            items.remove((start, end))
            self.state = (tuple(items), generation + 1)
            # (weak references kept would stop numpy resizing the arrays afterwards)
            self._whole = {}
