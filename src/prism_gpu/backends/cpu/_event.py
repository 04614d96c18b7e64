"""CPU events.

Each ``record`` makes a new record token; a ``wait`` captures the token that is
current when the wait is enqueued. That is CUDA's rule: a wait refers to the
record most recently enqueued before it, even if the event is re-recorded
before the wait runs.
"""

from __future__ import annotations

import threading
import time
from typing import Optional


class _Record:
    __slots__ = ("done", "t", "fault")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.t = 0.0
        self.fault: Optional[BaseException] = None

    def complete(self, fault: Optional[BaseException]) -> None:
        self.t = time.perf_counter()
        self.fault = fault
        self.done.set()


class CpuEvent:
    __slots__ = ("timing", "_rec", "__weakref__")

    def __init__(self, timing: bool = False) -> None:
        self.timing = timing
        self._rec: Optional[_Record] = None

    def query(self) -> bool:
        rec = self._rec
        return rec is None or rec.done.is_set()

    def synchronize(self, timeout: Optional[float] = None) -> bool:
        rec = self._rec
        return True if rec is None else rec.done.wait(timeout)

    def error(self) -> Optional[BaseException]:
        """The failure that reached the most recent record (a kernel that raised
        before it on its stream, or a failure passed on by a wait), if any."""
        rec = self._rec
        return None if rec is None else rec.fault

    @property
    def timestamp(self) -> float:
        """perf_counter seconds at which the most recent record completed."""
        rec = self._rec
        if rec is None or not rec.done.is_set():
            raise RuntimeError("event has not completed a record")
        return rec.t

    def elapsed_ms(self, start: "CpuEvent") -> float:
        if not (self.timing and start.timing):
            raise ValueError("elapsed_ms needs two events created with timing=True")
        return (self.timestamp - start.timestamp) * 1e3

    def close(self) -> None:
        self._rec = None
