"""Pinned host memory for streaming: user-facing pinned arrays, the staging of
pageable batches on worker threads, and the pool results are downloaded into."""

from __future__ import annotations

import collections
import math
import os
import sys
import threading
import weakref
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import numpy as np

from ._copypool import CopyPool, Ticket

__all__ = ["Stager", "ResultPool", "ResultLease", "cache_of"]


def _cores() -> int:
    """The cores this process may run on (its affinity, where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class Stager:
    """Host copies between pageable and pinned memory on worker threads.

    The caller's iterable is read on the calling thread (a Python iterator is
    not moved to another thread); only the copies run elsewhere, cut into
    pieces spread over the workers (native threads that never take the GIL
    where the extension is built; else Python threads, numpy releasing the GIL
    while it copies), so one batch's copy uses several cores and the copies of
    several batches, in and out, overlap each other and the device.
    """

    CHUNK_BYTES = 4 << 20
    WORKERS = 12  # past this, the workers' turns at the GIL slow the thread queuing work
    NATIVE_WORKERS = 16  # native threads take no GIL: as many as memory bandwidth rewards
    # ... but not every core: the thread queuing device work and the driver's need theirs
    # (on a 16-core H100 host 14 threads beat 16 at 4 and 16 MiB pageable batches)
    FREE_CORES = 2
    NATIVE_CHUNK = 256 << 10  # small pieces: one batch's copy spreads over all the threads
    URGENT_RESULTS = True     # results (waited for in order) go ahead of staging copies
    NATIVE_STREAM = True      # non-temporal stores: no read of the destination first

    KNOWN = 256  # page-locked batches remembered (a loop cycles through a few)

    def __init__(self, device: Any, cache: "PinnedCache") -> None:
        self._device = device
        self._cache = cache
        # whether an array lies in page-locked memory (the device's answer)
        self.is_pinned: Callable[[np.ndarray], bool] = device.is_pinned
        # id -> (weak reference, ranges.state) of batches page_locked found so: see there
        self.known: Dict[int, Tuple[Any, Any]] = {}
        self.ranges: Any = _registrations(device)
        cores = _cores()
        free = self.FREE_CORES if cores > 4 * self.FREE_CORES else 0
        self._pool = CopyPool(max(1, min(self.WORKERS, cores)), self.CHUNK_BYTES,
                              native_workers=max(1, min(self.NATIVE_WORKERS, cores - free)),
                              native_chunk=self.NATIVE_CHUNK,
                              native_stream=self.NATIVE_STREAM)

    def needs_staging(self, batch: np.ndarray) -> bool:
        return bool(batch.size) and (not batch.flags.c_contiguous
                                     or not self.is_pinned(batch))

    def page_locked(self, batch: np.ndarray) -> bool:
        """``is_pinned(batch)`` for a numpy array (not a subclass), remembered in
        :attr:`known` when the answer is yes and can change only with a registration:
        the batch does not own its memory (so it is never resized: its address and size
        are fixed, and so is the base array it views, which is pinned while it lives),
        on a device whose answer is that base array's or a registered range's. (One that
        owns its memory is not remembered: numpy refuses to resize an array anything
        refers to weakly, and its owner may resize it, which moves it.)

        ``known`` answers for ``batch`` only if ``known[id(batch)]`` is ``(ref, state)``
        with ``ref() is batch`` (the very array, alive: a new array at a dead one's
        address is not it) and ``state is ranges.state`` (no registration changed since:
        every change publishes a new state, and the old one, held here, is not reused),
        and ``batch.flags.c_contiguous`` still (strides can be set in place). A dtype or
        shape set in place keeps the bytes, so the size is never 0 and no object dtype
        comes."""
        ranges = self.ranges
        if ranges is None:
            return self.is_pinned(batch)
        state = ranges.state  # before the answer: a change meanwhile is seen next time
        if not self.is_pinned(batch):
            return False
        if not batch.flags.owndata:
            known = self.known
            if len(known) >= self.KNOWN:
                known.clear()
            known[id(batch)] = (weakref.ref(batch), state)
        return True

    def copy(self, dst: np.ndarray, src: np.ndarray, urgent: bool = False) -> Ticket:
        """Start copying ``src`` into ``dst`` (same shape); ``urgent`` goes first."""
        return self._pool.copy(dst, src, urgent)

    def start(self, batch: np.ndarray) -> Tuple[np.ndarray, np.ndarray, Ticket]:
        """Begin copying ``batch`` into pinned memory: (staged view, raw buffer, ticket)."""
        raw = self._cache.take(self._device, batch.nbytes)
        staged = raw[: batch.nbytes].view(batch.dtype).reshape(batch.shape)
        return staged, raw, self._pool.copy(staged, batch)

    def recycle(self, raw: Optional[np.ndarray]) -> None:
        if raw is not None:
            self._cache.give(raw)

    def close(self) -> None:
        """Wait for every copy started, then stop the workers."""
        self._pool.close()


def _registrations(device: Any) -> Any:
    """The device's registered host ranges (their ``state``), which alone change its
    is_pinned answer for a live array that does not own its memory (the backend
    protocol's ``host_ranges``); None where a device has none (always asked)."""
    ranges = getattr(device, "host_ranges", None)
    return ranges if ranges is not None and hasattr(ranges, "state") else None


_refcount = sys.getrefcount


def _root(array: np.ndarray) -> np.ndarray:
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


class _Pooled:
    """One pinned buffer of the pool, and a view of it of the shape and dtype last asked
    for: what is handed out are new views of that one (one numpy call, not three),
    which never leaves the pool, so nothing a consumer does to a result changes it.

    ``idle``: the buffer's reference count with nothing outside the pool holding a view
    of it, taken as it is checked later (the same expression, no other name bound to
    the buffer), so references held inside the array machinery (DLPack owners) are
    counted in."""

    __slots__ = ("root", "idle", "view", "shape", "dtype")

    def __init__(self, root: np.ndarray) -> None:
        self.root = root
        self.idle = 0
        self.view: Optional[np.ndarray] = None
        self.shape: Tuple[int, ...] = ()
        self.dtype: Optional[np.dtype] = None

    def reshape(self, nbytes: int, shape: Tuple[int, ...], dtype: np.dtype) -> None:
        """Make ``view`` one of ``shape`` and ``dtype`` (the buffer is idle)."""
        self.view = self.root[:nbytes].view(dtype).reshape(shape)
        self.shape, self.dtype = shape, dtype
        self.idle = _refcount(self.root)


class ResultPool:
    """Pinned memory for results, so downloads go straight into what is yielded.

    A buffer is reused only once nothing but the pool refers to it: every view
    of a yielded result keeps its buffer's reference count up, so results the
    consumer keeps are never overwritten. Buffers are looked at least recently
    handed out first. Shared by the threads using one device (a lock); one
    stream_map takes what it needs out of it as a :meth:`lease`.
    """

    KEEP = 16  # idle buffers kept per size class

    def __init__(self) -> None:
        self._pool: Dict[int, List[_Pooled]] = {}
        self._lock = threading.Lock()
        self._last = (-1, 0)  # (bytes, their size class) of the last call
        self.allocations = 0

    def empty(self, device: Any, shape: Tuple[int, ...], dtype: np.dtype,
              nbytes: Optional[int] = None) -> np.ndarray:
        """A pinned array of ``shape`` and ``dtype`` (``nbytes``: its size, if known)."""
        return self.empty_and_target(device, shape, dtype, nbytes)[0]

    def empty_and_target(self, device: Any, shape: Tuple[int, ...], dtype: np.dtype,
                         nbytes: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """:meth:`empty`'s array, and the pool's own view of the same memory, the one
        object a download into the buffer should write (the same object for as long as
        the buffer keeps its shape: a copy's host-memory checks are kept by object).
        Only the array handed out keeps the buffer from reuse: hold it while the
        download runs."""
        if nbytes is None:
            nbytes = math.prod(shape) * dtype.itemsize
        last = self._last
        if last[0] == nbytes:
            size = last[1]
        else:
            size = max(4096, 1 << (max(1, nbytes) - 1).bit_length())
            self._last = (nbytes, size)
        with self._lock:
            entries = self._pool.get(size)
            if entries is None:
                entries = self._pool[size] = []
            for entry in entries:
                if _refcount(entry.root) == entry.idle:
                    if entry is not entries[-1]:
                        entries.remove(entry)
                        entries.append(entry)
                    break
            else:
                entry = self._new(device, size)
                if len(entries) < self.KEEP:
                    entries.append(entry)
            if entry.shape != shape or entry.dtype is not dtype:
                entry.reshape(nbytes, shape, dtype)
            view = entry.view
            return view.view(), view  # type: ignore[union-attr, return-value]

    def _new(self, device: Any, size: int) -> _Pooled:
        entry = _Pooled(_root(device.allocate_pinned(size)))
        self.allocations += 1
        return entry

    def lease(self) -> "ResultLease":
        """Buffers lent to one stream_map, used on one thread (see :class:`ResultLease`)."""
        return ResultLease(self)

    def lend(self, device: Any, size: int) -> _Pooled:
        """A buffer of ``size`` bytes that nothing refers to, out of the pool (the least
        recently handed out), else a new one: the caller's alone until given back."""
        with self._lock:
            entries = self._pool.get(size)
            for entry in entries or ():
                if _refcount(entry.root) == entry.idle:
                    entries.remove(entry)  # type: ignore[union-attr]
                    return entry
            return self._new(device, size)

    def give_back(self, size: int, lent: Any) -> None:
        """Buffers of ``size`` bytes lent, back into the pool (up to ``KEEP`` of them)."""
        with self._lock:
            entries = self._pool.setdefault(size, [])
            for entry in lent:
                if len(entries) >= self.KEEP:
                    break
                entries.append(entry)


class ResultLease:
    """Buffers of a :class:`ResultPool` lent to one stream_map, whose calls all come
    from one thread, so they go without the pool's lock: handed out as the pool does
    (a buffer once nothing outside refers to it, the least recently handed out first,
    a new view each time), at most ``KEEP`` kept per size class, taken from the pool
    as needed (:meth:`ResultPool.lend`) and given back to it by :meth:`close`."""

    def __init__(self, pool: ResultPool) -> None:
        self._pool = pool
        self._classes: Dict[int, Deque[_Pooled]] = {}
        # the bytes of the last call, their size class and its buffers
        self._nbytes, self._size = -1, 0
        self._entries: Deque[_Pooled] = collections.deque()

    @property
    def allocations(self) -> int:
        return self._pool.allocations

    def empty(self, device: Any, shape: Tuple[int, ...], dtype: np.dtype,
              nbytes: Optional[int] = None) -> np.ndarray:
        """A pinned array of ``shape`` and ``dtype`` (``nbytes``: its size, if known)."""
        return self.empty_and_target(device, shape, dtype, nbytes)[0]

    def empty_and_target(self, device: Any, shape: Tuple[int, ...], dtype: np.dtype,
                         nbytes: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """As :meth:`ResultPool.empty_and_target`."""
        if nbytes != self._nbytes:
            if nbytes is None:
                nbytes = math.prod(shape) * dtype.itemsize
            if nbytes != self._nbytes:
                self._size_class(nbytes)
        entries = self._entries
        entry = entries[0] if entries else None
        if entry is not None and _refcount(entry.root) == entry.idle:
            entries.rotate(-1)  # (the least recently handed out: the common case)
        else:
            entry = self._other(device, entries)
        if entry.shape != shape or entry.dtype is not dtype:
            entry.reshape(nbytes, shape, dtype)  # type: ignore[arg-type]
        view = entry.view
        return view.view(), view  # type: ignore[union-attr, return-value]

    def _other(self, device: Any, entries: Deque[_Pooled]) -> _Pooled:
        """A buffer nothing refers to but the first, moved last; else one from the pool."""
        for entry in entries:
            if _refcount(entry.root) == entry.idle:
                if entry is not entries[-1]:
                    entries.remove(entry)
                    entries.append(entry)
                return entry
        entry = self._pool.lend(device, self._size)
        if len(entries) < self._pool.KEEP:
            entries.append(entry)
        return entry

    def _size_class(self, nbytes: int) -> None:
        size = max(4096, 1 << (max(1, nbytes) - 1).bit_length())
        self._entries = self._classes.setdefault(size, collections.deque())
        self._nbytes, self._size = nbytes, size

    def close(self) -> None:
        """Give every buffer back to the pool (held results stay valid: a buffer is
        handed out again only once nothing refers to it)."""
        classes, self._classes = self._classes, {}
        self._nbytes, self._entries = -1, collections.deque()
        for size, entries in classes.items():
            self._pool.give_back(size, entries)


class PinnedCache:
    """Pinned staging buffers of one device, kept across stream_map calls (pinning
    memory is slow; a loop that calls stream_map per epoch should pay it once)."""

    KEEP = 16  # buffers kept per size class

    def __init__(self) -> None:
        # no reference to the device: this is the value of a weak-keyed table
        self._free: dict = {}
        self._lock = threading.Lock()
        self.results = ResultPool()

    def take(self, device: Any, nbytes: int) -> np.ndarray:
        size = max(4096, 1 << (max(1, nbytes) - 1).bit_length())
        with self._lock:
            free = self._free.get(size)
            if free:
                return free.pop()
        return device.allocate_pinned(size)

    def give(self, raw: np.ndarray) -> None:
        with self._lock:
            free = self._free.setdefault(raw.nbytes, [])
            if len(free) < self.KEEP:
                free.append(raw)


_CACHES: "weakref.WeakKeyDictionary[Any, PinnedCache]" = weakref.WeakKeyDictionary()


def cache_of(device: Any) -> PinnedCache:
    cache = _CACHES.get(device)
    if cache is None:
        cache = _CACHES[device] = PinnedCache()
    return cache


