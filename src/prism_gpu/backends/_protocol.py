"""The whole surface a backend implements.

The core above this layer talks to a backend only through these protocols
(the engine is their only caller for streams and events). A backend knows
nothing about ops: it executes copies, launches, records and waits in stream
order, and says whether the work before a record failed.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class Event(Protocol):
    timing: bool

    def query(self) -> bool:
        """True when the most recent record has completed (or none was made)."""
        ...

    def synchronize(self, timeout: Optional[float] = None) -> bool:
        """Block until done; False if ``timeout`` seconds passed first."""
        ...

    def error(self) -> Optional[BaseException]:
        """Called once the most recent record is known complete. Finishes any host
        work that record completes (the host half of a pageable download) and
        returns the failure of the work it closes: work since the previous closing
        record on its stream, or a failure passed on by a
        propagating wait. None when that work succeeded. (Device faults are sticky
        errors, raised by :meth:`query` and :meth:`synchronize` instead.)"""
        ...

    def elapsed_ms(self, start: Any) -> float:
        """Milliseconds from ``start``'s record to this one's (both timing events, both done)."""
        ...

    def close(self) -> None:
        ...


@runtime_checkable
class Stream(Protocol):
    def copy_h2d(self, dst: Any, src: np.ndarray) -> None:
        """Enqueue a host-to-device copy; pageable ``src`` may change once this returns."""
        ...

    def copy_d2h(self, dst: np.ndarray, src: Any) -> None:
        """Enqueue a device-to-host copy. ``dst`` holds the data once the next closing
        record on this stream is complete and its ``error()`` was read."""
        ...

    def copy_d2d(self, dst: Any, src: Any) -> None:
        ...

    def launch(self, kernel: Any, config: Any, arrays: Sequence[Any], extra: Sequence[Any]
               ) -> None:
        """Enqueue ``kernel`` (what :meth:`Device.prepare_kernel` returned)."""
        ...

    def record(self, event: Event, *, stamp: bool = False) -> None:
        """Record ``event`` here. The record closes the work since the previous closing
        record on this stream (see :meth:`Event.error`), unless ``stamp``: then it only
        timestamps (``event`` must be a timing event). A timing event may close work
        too: a traced op's closing record is also its end time."""
        ...

    def wait(self, event: Event, *, propagate: bool = True) -> None:
        """Later work waits for ``event``'s most recent record. With ``propagate``, a
        failure that reached that record fails the work after the wait."""
        ...

    def synchronize(self) -> None:
        ...

    def close(self) -> None:
        ...


@runtime_checkable
class Device(Protocol):
    kind: str
    name: str
    ordinal: int

    @property
    def closed(self) -> bool:
        ...

    @property
    def properties(self) -> dict:
        ...

    def allocate(self, nbytes: int) -> Any:
        """Device memory as a 1-D uint8 device array (``.view(dtype)``, ``[:n]``)."""
        ...

    def allocate_pinned(self, nbytes: int) -> np.ndarray:
        """Page-locked host memory as a 1-D uint8 numpy array."""
        ...

    def is_pinned(self, array: np.ndarray) -> bool:
        """Whether ``array`` lies in page-locked memory. A device may also have a
        ``host_ranges`` attribute (an object whose ``state`` is replaced whenever a host
        registration changes): then the answer for a live array that does not own its
        memory changes only with that ``state``, and callers may remember it so."""
        ...

    def is_device_array(self, obj: Any) -> bool:
        ...

    def read_only(self, array: Any) -> Any:
        """``array`` as a kernel that must not write it gets it: a read-only view where
        the backend can enforce that (the CPU backend), else ``array`` itself."""
        ...

    def register_host(self, array: np.ndarray) -> Any:
        """Page-lock a C-contiguous, non-empty host array in place (ValueError if part
        of it is registered already); returns the handle to unregister it with."""
        ...

    def unregister_host(self, handle: Any) -> None:
        ...

    def create_stream(self, priority: int = 0) -> Stream:
        ...

    def create_event(self, timing: bool = False) -> Event:
        ...

    def prepare_kernel(self, kernel: Any) -> Any:
        """Whatever ``Stream.launch`` needs for this kernel (compiled code, a callable)."""
        ...

    def synchronize(self) -> None:
        ...

    def on_own_thread(self) -> bool:
        """True on a thread of the device's own (where a CPU kernel runs): waiting for
        the device there would wait for itself, so closing is refused."""
        ...

    def close(self) -> None:
        ...
