"""A CPU stream: one worker thread draining a FIFO of tasks.

A task that raises puts the stream in a fault; work after it is skipped until
the next closing record, which carries the fault to whoever waits on it and
clears it; ``stamp`` records only timestamp.
Waits with ``propagate=True`` pass a fault that reached the awaited record on
to this stream. That is how a failing kernel fails its dependents here.
"""

from __future__ import annotations

import functools
import queue
import sys
import threading
from typing import Any, Callable, Optional, Sequence, Tuple

import numpy as np

from ._event import CpuEvent, _Record

_WORK, _RECORD, _WAIT, _WAIT_QUIET, _MARK, _STAMP = 0, 1, 2, 3, 4, 5


def _copy(dst: np.ndarray, src: np.ndarray) -> None:
    np.copyto(dst, src.reshape(dst.shape), casting="no")


class CpuStream:
    def __init__(self, device: Any, priority: int = 0) -> None:
        self._device = device
        self.priority = priority
        self._q: "queue.SimpleQueue[Optional[Tuple[int, Any, Any]]]" = queue.SimpleQueue()
        self._fault: Optional[BaseException] = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="prism-gpu-cpu-stream",
                                        daemon=True)
        self._thread.start()

    # worker ---------------------------------------------------------------
    def _run(self) -> None:
        get = self._q.get
        while True:
            task = get()
            if task is None:
                return
            kind, a, b = task
            task = None  # hold no finished work (and the arrays it uses) while idle
            if kind == _WORK:
                if self._fault is None:
                    # called here, not through a closure: a failure's traceback then holds
                    # no function whose closure keeps the work's arrays alive
                    try:
                        if b is None:
                            a()
                        else:
                            a(*b)
                    except BaseException as exc:  # noqa: BLE001 - carried to the waiter
                        self._fault = exc
                        del exc
            elif kind == _RECORD:
                a.complete(self._fault)
                self._fault = None
            elif kind == _MARK:
                a.complete(None)
            elif kind == _STAMP:
                a.complete(self._fault)
            else:
                a.done.wait()
                if kind == _WAIT and a.fault is not None and self._fault is None:
                    self._fault = a.fault
            a = b = None

    def _put(self, kind: int, a: Any, b: Any = None) -> None:
        if self._closed:
            from ..._errors import InvalidOperationError

            raise InvalidOperationError("this stream is closed (its device or context was "
                                        "closed)")
        self._q.put((kind, a, b))

    # protocol -------------------------------------------------------------
    def submit(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the worker, in stream order."""
        self._put(_WORK, fn, None)

    def copy_h2d(self, dst: np.ndarray, src: np.ndarray) -> None:
        if not self._device.is_pinned(src):
            # Pageable memory is snapshot now, as CUDA stages it: the caller may
            # change ``src`` as soon as this returns.
            src = src.copy()
        self._put(_WORK, _copy, (dst, src))

    def copy_d2h(self, dst: np.ndarray, src: np.ndarray) -> None:
        self._put(_WORK, _copy, (dst, src))

    def copy_d2d(self, dst: np.ndarray, src: np.ndarray) -> None:
        self._put(_WORK, _copy, (dst, src))

    def launch(self, kernel: Tuple[Callable[..., Any], bool], config: Any,
               arrays: Sequence[Any], extra: Sequence[Any]) -> None:
        fn, wants_stream = kernel
        if wants_stream:
            self._put(_WORK, functools.partial(fn, stream=self), (*arrays, *extra))
        else:
            self._put(_WORK, fn, (*arrays, *extra))

    def record(self, event: CpuEvent, *, stamp: bool = False) -> None:
        """Record ``event``. A closing record carries the stream's fault to whoever
        waits on it and clears it; a ``stamp`` record only timestamps."""
        rec = _Record()
        event._rec = rec
        self._put(_STAMP if stamp else _RECORD, rec)

    def wait(self, event: CpuEvent, *, propagate: bool = True) -> None:
        rec = event._rec
        if rec is None or (rec.done.is_set() and (rec.fault is None or not propagate)):
            return
        self._put(_WAIT if propagate else _WAIT_QUIET, rec)

    def runs_here(self) -> bool:
        """True on this stream's worker thread (inside one of its kernels)."""
        return threading.current_thread() is self._thread

    def synchronize(self) -> None:
        if sys.is_finalizing():
            return  # worker threads no longer run: waiting would never end
        if self.runs_here():
            return  # from one of its kernels: everything queued before it is done
        rec = _Record()
        self._put(_MARK, rec)
        rec.done.wait()

    def close(self) -> None:
        """Drain what is queued, then stop the worker thread."""
        if self._closed:
            return
        self._closed = True
        self._q.put(None)
        if threading.current_thread() is not self._thread and not sys.is_finalizing():
            self._thread.join()
