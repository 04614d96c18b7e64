"""DeviceArray: an array that lives on the device, for constants every batch reads."""

from __future__ import annotations

import math
import threading
import weakref
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ._args import typed_empty
from ._errors import InvalidOperationError, TransferError

__all__ = ["DeviceArray", "to_device", "empty_device", "backend_values", "copier"]


class DeviceArray:
    """Device memory with a shape and a dtype, made by :meth:`ManagedGpuContext.to_device`
    or :meth:`ManagedGpuContext.empty_device`.

    Pass it in ``extra=`` / ``args=`` of any kernel (a CUDA C++ kernel gets its
    pointer, a callable gets the device array: a CuPy-compatible array on CUDA,
    numpy on the CPU backend), so a constant is uploaded once and read by every
    batch. Work that reads it is not ordered against writes you make to it with
    your own kernels: write it before queuing the work that reads it.

    Freed by :meth:`close` or when its context closes; work already queued
    keeps the memory alive until it is done.
    """

    __slots__ = ("_data", "_device", "_shape", "_dtype", "_copier", "__weakref__")

    def __init__(self, device: Any, data: Any, shape: Tuple[int, ...], dtype: np.dtype) -> None:
        self._device = device
        self._data = data
        self._shape = shape
        self._dtype = dtype
        self._copier: Optional[_Copier] = None  # the stream of blocking copies, once used

    @property
    def shape(self) -> Tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def closed(self) -> bool:
        return self._data is None

    def backend_array(self, device: Any = None) -> Any:
        """The backend's array (what kernels get); checks it is open and on ``device``."""
        data = self._data
        if data is None:
            raise InvalidOperationError("this DeviceArray is closed")
        if device is not None and device is not self._device:
            raise InvalidOperationError(
                f"this DeviceArray lives on {self._device.name!r} ({self._device.kind} "
                f"device {self._device.ordinal}), not on the device of this call; "
                "make it with to_device() of the same context")
        return data

    def to_host(self) -> np.ndarray:
        """A new numpy array holding the data. Waits for every op queued on the device
        so far (a kernel of yours may be writing this array)."""
        data = self.backend_array()
        out = np.empty(self.shape, self.dtype)
        if self.size:
            self._device.synchronize()
            self._blocking_copy("d2h", out.reshape(-1), _flat(data))
        return out

    def _blocking_copy(self, direction: str, dst: Any, src: Any) -> None:
        if self._copier is None:
            self._copier = copier(self._device)
        self._copier.copy(direction, dst, src)

    @property
    def __cuda_array_interface__(self) -> Dict[str, Any]:
        data = self.backend_array()
        try:
            return data.__cuda_array_interface__
        except AttributeError:
            raise AttributeError(
                f"a DeviceArray of the {self._device.kind} backend lives in host memory and "
                "has no __cuda_array_interface__; use __dlpack__ or to_host()") from None

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self.backend_array().__dlpack__(**kwargs)

    def __dlpack_device__(self) -> Tuple[int, int]:
        return self.backend_array().__dlpack_device__()

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError("a DeviceArray lives on the device: numpy cannot read it in place; "
                        "call to_host() for a copy")

    def __reduce__(self) -> Any:
        raise TypeError("a DeviceArray lives on one device and cannot be pickled or copied; "
                        "send or copy the numpy array (to_host()) and to_device() it there")

    def close(self) -> None:
        """Drop the device memory (ops already queued keep it until they are done).
        Idempotent; any later use raises :class:`InvalidOperationError`."""
        self._data = None
        self._copier = None

    def __repr__(self) -> str:
        state = "closed" if self._data is None else self._device.kind
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, {state})"


def _flat(data: Any) -> Any:
    return data.reshape(-1) if len(data.shape) != 1 else data


def empty_device(device: Any, shape: Any, dtype: Any) -> DeviceArray:
    data = typed_empty(device.allocate, shape, dtype, "device memory")
    return DeviceArray(device, data, tuple(data.shape), np.dtype(data.dtype))


def to_device(device: Any, array: Any) -> DeviceArray:
    if not isinstance(array, np.ndarray):
        raise TransferError(f"to_device takes a numpy array, got {type(array).__name__}")
    if array.dtype.hasobject:
        raise TransferError(f"dtype {array.dtype} cannot go to the device (object array)")
    host = np.asarray(array)  # a subclass (np.matrix) would reshape its own way
    if not host.flags.c_contiguous:
        host = np.ascontiguousarray(host)  # keeps the shape (0-d stays 0-d here)
    out = empty_device(device, host.shape, host.dtype)
    if host.size:
        out._blocking_copy("h2d", _flat(out.backend_array()), host.reshape(-1))
    return out


# One stream per device for these one-off, blocking copies: queued work goes through
# the engine; a constant's upload or a final read-back waits here instead. The entry
# lives while a DeviceArray of its device does (they hold it; the table holds it
# weakly), so a device dropped with its arrays takes its copy stream with it.
class _Copier:
    __slots__ = ("device", "stream", "event", "lock", "__weakref__")

    def __init__(self, device: Any) -> None:
        self.device = device
        self.stream = device.create_stream()
        self.event = device.create_event(False)
        self.lock = threading.Lock()
        # a stream lives until closed (a CPU stream's thread holds it): closed with us
        weakref.finalize(self, _close_quietly, self.stream, self.event)

    def copy(self, direction: str, dst: Any, src: Any) -> None:
        with self.lock:
            if self.device.closed:
                raise InvalidOperationError("the device of this DeviceArray is closed")
            if direction == "h2d":
                self.stream.copy_h2d(dst, src)
            else:
                self.stream.copy_d2h(dst, src)
            self.stream.record(self.event)
            self.event.synchronize()
            err: Optional[BaseException] = self.event.error()
        if err is not None:
            raise err


def _close_quietly(*objs: Any) -> None:
    for obj in objs:
        try:
            obj.close()
        except Exception:  # noqa: BLE001 - its device is gone: nothing left to free
            pass


_COPIERS: "weakref.WeakValueDictionary[int, _Copier]" = weakref.WeakValueDictionary()
_COPIERS_LOCK = threading.Lock()


def copier(device: Any) -> _Copier:
    """The blocking copies of ``device`` (its stream), shared while anything holds it:
    its arrays, and an owner of the device (a context) so that arrays made and dropped
    one after another reuse it."""
    with _COPIERS_LOCK:
        entry = _COPIERS.get(id(device))  # alive: it holds its device, so the id is its
        if entry is None:
            entry = _COPIERS[id(device)] = _Copier(device)
        return entry


def backend_values(values: Sequence[Any], device: Any) -> Sequence[Any]:
    """``values`` with each DeviceArray replaced by its backend array (the same object
    when there is none, so callers' caches keyed by identity keep working)."""
    for v in values:
        if type(v) is DeviceArray:
            break
    else:
        return values
    return tuple(v.backend_array(device) if type(v) is DeviceArray else v for v in values)
