"""The CUDA device: cuda.core Device, memory, streams, events and kernels."""

from __future__ import annotations

import weakref
from typing import Any, Dict, Tuple

import numpy as np

from ..._errors import BackendUnavailableError, KernelError
from ._driver import (CURRENT as _CURRENT, NATIVE, NATIVE_STATUS, check, driver,
                      from_cuda_exception)
from ._kernels import prepare
from ._memory import (REGISTERED, DeviceArray, PinnedAllocator, StagingPool, device_alloc,
                      register_host, unregister_host)
from ._stream import EVENT, STREAM, CudaEvent, CudaStream



class CudaDevice:
    """One CUDA device through cuda.core."""

    kind = "cuda"
    # the registered ranges; is_pinned's answer for a live array that does not own its
    # memory changes only when their ``state`` does (read by stream_map's staging)
    host_ranges = REGISTERED

    def __init__(self, ordinal: int = 0) -> None:
        from cuda.core import Device, EventOptions, StreamOptions

        try:
            self._dev = Device(ordinal)
            self._dev.set_current()
        except Exception as exc:  # noqa: BLE001
            raise BackendUnavailableError(f"CUDA device {ordinal} could not be opened: {exc}"
                                          ) from exc
        self._EventOptions = EventOptions
        self._StreamOptions = StreamOptions
        self.ordinal = ordinal
        self.name = self._dev.name
        self.arch = self._dev.arch
        _CURRENT.ordinal = ordinal  # Device(ordinal).set_current() above
        # its context, where the driver tells which is current (the native calls): then
        # _current asks the driver, not the thread-local, which other code never updates
        self._ctx = NATIVE.current_context() if NATIVE is not None else None
        self._alloc_stream = self._dev.create_stream()
        self.pinned = PinnedAllocator()
        self.staging = StagingPool(self.pinned, self.create_event)
        self._streams: "weakref.WeakSet[CudaStream]" = weakref.WeakSet()
        self._limits: Dict[str, int] = {}
        # True once closed (a plain attribute: the queue calls read it on every op)
        self.closed = False

    def _current(self) -> None:
        """Make this device's context current on the calling thread: a thread may drive
        several devices, and a stream's work must be issued in its own context."""
        ctx = self._ctx
        if ctx:  # (the driver says: a library may have made another context current)
            if NATIVE.current_context() != ctx:
                self._dev.set_current()
                _CURRENT.ordinal = self.ordinal
        elif getattr(_CURRENT, "ordinal", None) != self.ordinal:
            self._dev.set_current()
            _CURRENT.ordinal = self.ordinal

    @property
    def properties(self) -> dict:
        self._current()
        p = self._dev.properties
        total = check(driver.cuDeviceTotalMem(self._dev.device_id), "reading device memory")
        return {"backend": "cuda", "name": self.name, "compute_capability": f"sm_{self.arch}",
                "multiprocessors": p.multiprocessor_count, "total_memory": int(total),
                "driver_version": check(driver.cuDriverGetVersion(), "driver version"),
                "native_driver_calls": NATIVE_STATUS}

    def _limit(self, attr: str) -> int:
        v = self._limits.get(attr)
        if v is None:
            v = self._limits[attr] = int(getattr(self._dev.properties, attr))
        return v

    def check_launch_config(self, config: Any, name: str) -> None:
        """Reject a launch configuration the device cannot run, before launching."""
        bx, by, bz = config.block
        gx, gy, gz = config.grid
        max_threads = self._limit("max_threads_per_block")
        problems = []
        if bx * by * bz > max_threads:
            problems.append(f"block {config.block} has {bx * by * bz} threads, the device "
                            f"allows {max_threads}")
        if bx > self._limit("max_block_dim_x") or by > self._limit("max_block_dim_y") \
                or bz > self._limit("max_block_dim_z"):
            problems.append(f"block {config.block} exceeds the per-dimension limits")
        if gx > self._limit("max_grid_dim_x") or gy > self._limit("max_grid_dim_y") \
                or gz > self._limit("max_grid_dim_z"):
            problems.append(f"grid {config.grid} exceeds the device's grid limits")
        smem = self._limit("max_shared_memory_per_block")
        if config.shared_mem_bytes > smem:
            problems.append(f"{config.shared_mem_bytes} bytes of shared memory, the device "
                            f"allows {smem} per block")
        if problems:
            raise KernelError(f"launch configuration of kernel {name!r} is out of range: "
                              + "; ".join(problems), kernel=name)

    # memory -----------------------------------------------------------------------
    def allocate(self, nbytes: int) -> DeviceArray:
        self._current()
        try:
            return device_alloc(self._dev, self._alloc_stream, nbytes, self.ordinal)
        except Exception as exc:  # noqa: BLE001 - CUDAError (out of memory, ...)
            raise from_cuda_exception(exc, f"allocating {nbytes} bytes of device memory"
                                      ) from exc

    def allocate_pinned(self, nbytes: int) -> np.ndarray:
        self._current()
        return self.pinned.allocate(nbytes)

    def is_pinned(self, array: np.ndarray) -> bool:
        return PinnedAllocator.is_pinned(array)

    def host_info(self, array: np.ndarray) -> Tuple[int, bool]:
        """(address, pinned?) of a host array."""
        return PinnedAllocator.host_info(array)

    def register_host(self, array: np.ndarray) -> Any:
        self._current()
        return register_host(driver, check, array)

    def unregister_host(self, handle: Any) -> None:
        self._current()
        unregister_host(driver, check, handle)

    def is_device_array(self, obj: Any) -> bool:
        return isinstance(obj, DeviceArray)

    # streams, events, kernels --------------------------------------------------------
    def create_stream(self, priority: int = 0) -> CudaStream:
        self._current()
        opts = self._StreamOptions(nonblocking=True, priority=priority) if priority else None
        s = self._dev.create_stream(options=opts) if opts else self._dev.create_stream()
        stream = STREAM(self, s, priority)
        self._streams.add(stream)
        return stream

    def create_event(self, timing: bool = False) -> CudaEvent:
        self._current()
        ev = self._dev.create_event(self._EventOptions(timing_enabled=bool(timing)))
        return EVENT(ev, bool(timing))

    def prepare_kernel(self, kernel: Any) -> Any:
        self._current()
        return prepare(self, kernel)

    def on_own_thread(self) -> bool:
        return False  # kernels (callables too) run on the thread that queues them

    def read_only(self, array: Any) -> Any:
        return array  # device memory has no read-only views

    def synchronize(self) -> None:
        self._current()
        try:
            self._dev.sync()
        except Exception as exc:  # noqa: BLE001
            raise from_cuda_exception(exc, "device synchronize") from exc

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for s in list(self._streams):
            try:
                s.close()
            except Exception:  # noqa: BLE001 - closing after a sticky error
                pass
        self._streams.clear()
