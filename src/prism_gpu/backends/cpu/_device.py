"""The CPU device: numpy arrays as device and pinned memory, threads as streams."""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Callable, Dict, Tuple

import numpy as np

from ..._errors import InvalidOperationError
from .._hostranges import HostRanges
from ._event import CpuEvent
from ._stream import CpuStream


MAX_DEVICES = 64


def device_count() -> int:
    """Devices ``"all"`` means on the CPU backend: independent devices (own streams,
    own memory) sharing the host's cores, so multi-device code runs anywhere."""
    return max(2, min(8, (os.cpu_count() or 2) // 2))


def _root(array: np.ndarray) -> np.ndarray:
    base = array
    while isinstance(base.base, np.ndarray):
        base = base.base
    return base


class CpuDevice:
    """A device whose memory is host memory and whose streams are threads."""

    kind = "cpu"
    # Page-locked memory is a property of the host, not of one device object.
    _pinned: Dict[int, "weakref.ref[np.ndarray]"] = {}
    _pinned_lock = threading.Lock()
    # the registered ranges; is_pinned's answer for a live array that does not own its
    # memory changes only when their ``state`` does (read by stream_map's staging)
    host_ranges = HostRanges()

    def __init__(self, ordinal: int = 0) -> None:
        if not 0 <= ordinal < MAX_DEVICES:
            from ..._errors import BackendUnavailableError

            raise BackendUnavailableError(
                f"the CPU backend has devices 0..{MAX_DEVICES - 1}; device {ordinal} does "
                "not exist")
        self.ordinal = ordinal
        self.name = f"CPU{ordinal} ({os.cpu_count() or 1} cores, threaded streams)"
        self._device_mem: Dict[int, "weakref.ref[np.ndarray]"] = {}
        self._streams: "weakref.WeakSet[CpuStream]" = weakref.WeakSet()
        self._lock = threading.Lock()
        # True once closed (a plain attribute: the queue calls read it on every op)
        self.closed = False

    @property
    def properties(self) -> dict:
        return {"backend": "cpu", "cores": os.cpu_count() or 1,
                "total_memory": _total_memory()}

    # memory -----------------------------------------------------------------
    def _track(self, table: Dict[int, Any], array: np.ndarray) -> np.ndarray:
        key = id(array)

        def forget(_ref: Any, k: int = key, t: Dict[int, Any] = table) -> None:
            t.pop(k, None)
        with self._pinned_lock:
            table[key] = weakref.ref(array, forget)
        return array

    def allocate(self, nbytes: int) -> np.ndarray:
        return self._track(self._device_mem, np.empty(int(nbytes), dtype=np.uint8))

    def allocate_pinned(self, nbytes: int) -> np.ndarray:
        return self._track(self._pinned, np.empty(int(nbytes), dtype=np.uint8))

    def is_pinned(self, array: np.ndarray) -> bool:
        root = _root(array)
        return id(root) in self._pinned or self.host_ranges.covers(array, root)

    def register_host(self, array: np.ndarray) -> Any:
        """Bookkeeping only (host memory is what this device computes on), so code
        that registers memory runs, and is checked, the same way as on a GPU."""
        return self.host_ranges.reserve(array)

    def unregister_host(self, handle: Any) -> None:
        self.host_ranges.remove(*handle)

    def is_device_array(self, obj: Any) -> bool:
        return isinstance(obj, np.ndarray) and id(_root(obj)) in self._device_mem

    # streams, events, kernels -------------------------------------------------
    def create_stream(self, priority: int = 0) -> CpuStream:
        stream = CpuStream(self, priority)
        self._streams.add(stream)
        return stream

    def create_event(self, timing: bool = False) -> CpuEvent:
        return CpuEvent(timing)

    def read_only(self, array: Any) -> Any:
        view = array.view()
        view.flags.writeable = False
        return view

    def prepare_kernel(self, kernel: Any) -> Tuple[Callable[..., Any], bool]:
        fn = kernel.cpu_callable()
        if fn is None:
            from ..._errors import BackendUnavailableError

            raise BackendUnavailableError(
                f"kernel {kernel.name!r} is CUDA C++ source with no CPU version: pass "
                "cpu=<a callable taking the same arrays> to Kernel.from_source, or use "
                "the CUDA backend")
        return fn, bool(kernel.accepts_stream)

    def synchronize(self) -> None:
        if self.on_own_thread():
            return  # from a kernel: what it depends on is done; the rest may wait for it
        for stream in list(self._streams):
            if not stream._closed:
                try:
                    stream.synchronize()
                except InvalidOperationError:
                    if not stream._closed:
                        raise
                    # closed meanwhile by another thread: a close drains its work first

    def on_own_thread(self) -> bool:
        return any(s.runs_here() for s in list(self._streams))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for stream in list(self._streams):
            stream.close()


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
