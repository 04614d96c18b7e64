"""Host copies on worker threads, with as little Python per copy as possible.

Every bit of Python a worker runs needs the GIL, which the thread queuing
device work also needs: a general executor (a Future, a condition and a few
locks per task) made the workers and the queuing thread take turns. Where the
native extension is built, plain copies (same dtype and shape, C-contiguous,
not overlapping) run on native threads that never take the GIL (arrays of Python objects,
numpy's strings included, are not plain bytes: never there); the rest, and
everything where the extension is missing, on Python workers: a worker takes a
piece from a queue, copies it with the GIL released (numpy does that for plain
copies), and counts it done; the last piece of a copy releases one lock the
waiter blocks on. ``PRISM_GPU_NATIVE_COPY=0`` turns the native threads off.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from typing import Any, List, Optional, Protocol

import numpy as np

try:
    from . import _hostcopy  # type: ignore[attr-defined]
except ImportError:  # built without a C compiler: Python workers only
    _hostcopy = None

__all__ = ["CopyPool", "Ticket", "native"]


def native() -> bool:
    """Whether plain copies run on native threads (the extension is built and not
    turned off with ``PRISM_GPU_NATIVE_COPY=0``)."""
    return _hostcopy is not None and os.environ.get("PRISM_GPU_NATIVE_COPY", "1") != "0"


class Ticket(Protocol):
    """One copy in flight: :meth:`wait` blocks until it is complete and raises its error."""

    def wait(self) -> None:
        ...


class _PyTicket:
    """One copy in flight, in ``pieces`` pieces. :meth:`wait` blocks until all are done
    and raises the first piece's error."""

    __slots__ = ("_pieces", "_count", "_lock", "_error")

    def __init__(self, pieces: int) -> None:
        self._pieces = pieces
        self._count = itertools.count(1)    # next() is atomic: no lock per piece
        self._lock = threading.Lock()
        self._lock.acquire()
        self._error: Optional[BaseException] = None

    def _piece_done(self, error: Optional[BaseException]) -> None:
        if error is not None and self._error is None:
            self._error = error
        if next(self._count) == self._pieces:
            self._lock.release()

    def wait(self) -> None:
        self._lock.acquire()
        self._lock.release()
        if self._error is not None:
            raise self._error


DONE = _PyTicket(1)
DONE._piece_done(None)


def _work(jobs: "queue.SimpleQueue[Any]") -> None:
    copyto = np.copyto
    while True:
        job = jobs.get()
        if job is None:
            return
        ticket, dst, src = job
        error = None
        try:
            copyto(dst, src)
        except BaseException as exc:  # noqa: BLE001 - reported by the ticket's wait
            error = exc
        # let go of the arrays before the waiter wakes (the result pool reuses a
        # buffer only once nothing else refers to it), not at the next job
        del job, dst, src
        ticket._piece_done(error)
        del ticket, error


class CopyPool:
    """``workers`` threads, started on first use, copying pieces of at least ``chunk``
    bytes (``native_workers`` native threads and pieces of ``native_chunk`` bytes for
    plain copies; with ``native_stream``, pieces of 64 KiB and more are written with
    non-temporal stores on x86-64); :meth:`close`
    waits for every queued copy and stops them, and copies after it raise RuntimeError."""

    def __init__(self, workers: int, chunk: int, native_workers: int = 0,
                 native_chunk: int = 1 << 20, native_stream: bool = False) -> None:
        self.workers = workers
        self.chunk = chunk
        self._jobs: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._threads: List[threading.Thread] = []
        self._native = _hostcopy.Pool(native_workers, native_stream) \
            if native_workers and native() else None
        self._native_pieces = (native_workers, native_chunk)
        self._lock = threading.Lock()  # closing against queuing on the Python workers
        self._closed = False

    def copy(self, dst: np.ndarray, src: np.ndarray, urgent: bool = False) -> Ticket:
        """Start copying ``src`` into ``dst`` (same shape). ``urgent``: taken before the
        other queued copies (native threads only), for one someone waits for next."""
        fast = self._native
        if fast is not None and dst.dtype == src.dtype and dst.shape == src.shape \
                and not dst.dtype.hasobject \
                and dst.flags.c_contiguous and src.flags.c_contiguous:
            workers, chunk = self._native_pieces
            try:
                return fast.copy(  # type: ignore[no-any-return]
                    dst, src, max(1, min(workers, dst.nbytes // chunk)), urgent)
            except (ValueError, TypeError, BufferError):
                # refused there (read-only or overlapping memory, which the native side
                # checks itself, or a dtype without a buffer format): numpy copies it
                pass
        with self._lock:
            if self._closed:
                raise RuntimeError("the copy pool is closed")
            if not self._threads:
                for i in range(self.workers):
                    t = threading.Thread(target=_work, args=(self._jobs,), daemon=True,
                                         name=f"prism-gpu-copy-{i}")
                    t.start()
                    self._threads.append(t)
            pieces = min(self.workers, dst.nbytes // self.chunk)
            if pieces < 2 or dst.shape != src.shape \
                    or not (dst.flags.c_contiguous and src.flags.c_contiguous):
                ticket = _PyTicket(1)
                self._jobs.put((ticket, dst, src))
                return ticket
            d, s = dst.reshape(-1), src.reshape(-1)
            step = -(-len(s) // pieces)
            starts = range(0, len(s), step)
            ticket = _PyTicket(len(starts))
            put = self._jobs.put
            for i in starts:
                put((ticket, d[i:i + step], s[i:i + step]))
            return ticket

    def close(self) -> None:
        with self._lock:  # no copy is queued on the Python workers after this
            first, self._closed = not self._closed, True
        if self._native is not None:
            self._native.close()  # after every queued piece: those finish first
        if first:
            for _ in self._threads:
                self._jobs.put(None)  # after every queued piece: those finish first
        for t in self._threads:  # a second close, from another thread, waits too
            t.join()
