"""Host copies on worker threads, with as little Python per copy as possible.

Every bit of Python a worker runs needs the GIL, which the thread queuing
device work also needs: a general executor (a Future, a condition and a few
locks per task) made the workers and the queuing thread take turns. Here a
worker takes a piece from a queue, copies it with the GIL released (numpy does
that for plain copies), and counts it done; the last piece of a copy releases
one lock the waiter blocks on.
"""

from __future__ import annotations

import itertools
import queue
import threading
from typing import Any, List, Optional

import numpy as np

__all__ = ["CopyPool", "Ticket"]


class Ticket:
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


DONE = Ticket(1)
DONE._piece_done(None)


def _work(jobs: "queue.SimpleQueue[Any]") -> None:
    copyto = np.copyto
    while True:
        job = jobs.get()
        if job is None:
            return
        ticket, dst, src = job
        try:
            copyto(dst, src)
        except BaseException as exc:  # noqa: BLE001 - reported by the ticket's wait
            ticket._piece_done(exc)
        else:
            ticket._piece_done(None)


class CopyPool:
    """``workers`` threads, started on first use, copying pieces of at least ``chunk``
    bytes; :meth:`close` waits for every queued copy and stops them."""

    def __init__(self, workers: int, chunk: int) -> None:
        self.workers = workers
        self.chunk = chunk
        self._jobs: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._threads: List[threading.Thread] = []

    def copy(self, dst: np.ndarray, src: np.ndarray) -> Ticket:
        """Start copying ``src`` into ``dst`` (same shape)."""
        if not self._threads:
            for i in range(self.workers):
                t = threading.Thread(target=_work, args=(self._jobs,), daemon=True,
                                     name=f"prism-gpu-copy-{i}")
                t.start()
                self._threads.append(t)
        pieces = min(self.workers, dst.nbytes // self.chunk)
        if pieces < 2 or not (dst.flags.c_contiguous and src.flags.c_contiguous):
            ticket = Ticket(1)
            self._jobs.put((ticket, dst, src))
            return ticket
        d, s = dst.reshape(-1), src.reshape(-1)
        step = -(-len(s) // pieces)
        starts = range(0, len(s), step)
        ticket = Ticket(len(starts))
        put = self._jobs.put
        for i in starts:
            put((ticket, d[i:i + step], s[i:i + step]))
        return ticket

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)  # after every queued piece: those finish first
        for t in self._threads:
            t.join()
        self._threads.clear()
