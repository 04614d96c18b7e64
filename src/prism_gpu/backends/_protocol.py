"""The whole surface a backend implements.

The op model above this layer (coordinator, buffers, pipelines) talks to a
backend only through these three protocols. A backend never knows about ops;
it only executes copies, launches, records and waits in stream order.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np

Fault = Tuple[BaseException, Any]
"""An asynchronous failure: the exception and the ``tag`` of the launch that raised it."""


@runtime_checkable
class Event(Protocol):
    timing: bool

    def query(self) -> bool:
        """True when the most recent record has completed (or none was made)."""

    def synchronize(self, timeout: Optional[float] = None) -> bool:
        """Block until done; False if ``timeout`` seconds passed first."""

    def elapsed_ms(self, start: "Event") -> float:
        """Milliseconds from ``start``'s record to this one's (both timing events, both done)."""

    @property
    def fault(self) -> Optional[Fault]:
        """The asynchronous failure that reached this record, if any (CPU backend only)."""


@runtime_checkable
class Stream(Protocol):
    def copy_h2d(self, dst: Any, src: np.ndarray) -> None: ...

    def copy_d2h(self, dst: np.ndarray, src: Any) -> Optional[Callable[[], None]]:
        """Enqueue a device-to-host copy; returns a finisher the caller runs once the
        record after it is complete (pageable destinations are filled then), or None."""

    def copy_d2d(self, dst: Any, src: Any) -> None: ...

    def launch(self, kernel: Any, config: Any, arrays: Sequence[Any], extra: Sequence[Any],
               tag: Any = None) -> None: ...

    def record(self, event: Event, closes_op: bool = True) -> None:
        """Record ``event`` here. ``closes_op=False`` marks a start-of-op timestamp, which
        must not take over a failure reported by the op's closing record."""

    def wait(self, event: Event, propagate: bool = True) -> None:
        """Later work waits for ``event``'s most recent record. With ``propagate``, a
        failure that reached that record fails the work after the wait."""

    def synchronize(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Device(Protocol):
    kind: str
    name: str
    ordinal: int

    @property
    def properties(self) -> dict: ...

    def allocate(self, nbytes: int) -> Any:
        """Device memory as a 1-D uint8 device array (``.view(dtype)``, ``[:n]``)."""

    def allocate_pinned(self, nbytes: int) -> np.ndarray:
        """Page-locked host memory as a 1-D uint8 numpy array."""

    def is_pinned(self, array: np.ndarray) -> bool: ...

    def is_device_array(self, obj: Any) -> bool: ...

    def create_stream(self, priority: int = 0) -> Stream: ...

    def create_event(self, timing: bool = False) -> Event: ...

    def prepare_kernel(self, kernel: Any) -> Any:
        """Whatever ``Stream.launch`` needs for this kernel (compiled code, a callable)."""

    def synchronize(self) -> None: ...

    def close(self) -> None: ...
