"""Device arrays, pinned host memory and the pinned staging pool."""

from __future__ import annotations

import threading
import weakref
from typing import Any, Dict, List, Tuple

import numpy as np

from .._hostranges import HostRanges, host_address

# host memory pinned in place (cuMemHostRegister), for every device of the process
REGISTERED = HostRanges()
_PORTABLE, _READ_ONLY = 0x01, 0x08  # CU_MEMHOSTREGISTER_PORTABLE, _READ_ONLY


class DeviceArray:
    """A typed, C-contiguous view of device memory.

    Implements ``__cuda_array_interface__`` (v3) and DLPack, so CuPy, PyTorch
    and Numba take it without a copy. The interface carries no stream: the
    array is handed over inside stream-ordered work (a kernel callable runs with
    its stream current), so consumers need no host synchronization.
    """

    __slots__ = ("ptr", "shape", "dtype", "_owner", "_device_id", "__weakref__")

    def __init__(self, ptr: int, shape: Tuple[int, ...], dtype: np.dtype, owner: Any,
                 device_id: int) -> None:
        self.ptr = ptr
        self.shape = shape
        self.dtype = dtype
        self._owner = owner
        self._device_id = device_id

    # numpy-like surface ----------------------------------------------------------
    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 1

    def view(self, dtype: Any) -> "DeviceArray":
        dt = np.dtype(dtype)
        nbytes = self.nbytes
        if nbytes % dt.itemsize:
            raise ValueError(f"{nbytes} bytes do not divide into {dt} elements")
        return DeviceArray(self.ptr, (nbytes // dt.itemsize,), dt, self._owner, self._device_id)

    def reshape(self, *shape: Any) -> "DeviceArray":
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(int(s) for s in shape)
        if -1 in shape:
            known = int(np.prod([s for s in shape if s != -1]))
            shape = tuple(self.size // known if s == -1 else s for s in shape)
        if int(np.prod(shape)) != self.size:
            raise ValueError(f"cannot reshape {self.size} elements into {shape}")
        return DeviceArray(self.ptr, shape, self.dtype, self._owner, self._device_id)

    def __getitem__(self, key: Any) -> "DeviceArray":
        if self.ndim != 1 or not isinstance(key, slice):
            raise TypeError("device arrays support 1-D slices only (a[start:stop])")
        start, stop, step = key.indices(self.shape[0])
        if step != 1:
            raise TypeError("device array slices must be contiguous (step 1)")
        n = max(0, stop - start)
        return DeviceArray(self.ptr + start * self.dtype.itemsize, (n,), self.dtype,
                           self._owner, self._device_id)

    # interop ---------------------------------------------------------------------
    @property
    def __cuda_array_interface__(self) -> Dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False),
                "version": 3, "strides": None, "stream": None}

    def __dlpack_device__(self) -> Tuple[int, int]:
        return (2, self._device_id)  # kDLCUDA

    def __dlpack__(self, *, stream: Any = None, max_version: Any = None, dl_device: Any = None,
                   copy: Any = None) -> Any:
        from ._dlpack import to_capsule

        # the DLPack contract: never a silent alias where a copy or another device was asked
        if copy:
            raise BufferError("a device array exports its own memory (copy=True is not "
                              "supported): copy it on the consumer's side")
        if dl_device is not None and tuple(dl_device) != self.__dlpack_device__():
            raise BufferError(f"this array lives on device {self.__dlpack_device__()}, "
                              f"not {tuple(dl_device)}")
        return to_capsule(self)

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, ptr=0x{self.ptr:x})"


class PinnedAllocator:
    """Page-locked host memory as numpy arrays, recognised wherever they are viewed.

    A pinned array is found by walking ``.base`` to its root array, so views
    and reshapes of it count as pinned too. Freed when the root array dies.
    """

    _roots: Dict[int, Any] = {}
    _lock = threading.Lock()

    def __init__(self) -> None:
        from cuda.core import LegacyPinnedMemoryResource

        self._mr = LegacyPinnedMemoryResource()

    def allocate(self, nbytes: int) -> np.ndarray:
        buf = self._mr.allocate(max(1, int(nbytes)))
        view = np.from_dlpack(buf).view(np.uint8)[: int(nbytes)]
        root = view
        while isinstance(root.base, np.ndarray):
            root = root.base
        key = id(root)
        with self._lock:
            self._roots[key] = buf
        weakref.finalize(root, self._release, key)
        return view

    @classmethod
    def _release(cls, key: int) -> None:
        with cls._lock:
            buf = cls._roots.pop(key, None)
        if buf is not None:
            try:
                buf.close()
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    @classmethod
    def is_pinned(cls, array: np.ndarray) -> bool:
        base = array
        while isinstance(base.base, np.ndarray):
            base = base.base
        return id(base) in cls._roots or REGISTERED.covers(array, base)

    # (weakref, address, pinned, registration generation) per array id: loops reuse arrays
    _info: Dict[int, Tuple[Any, int, bool, int]] = {}

    @classmethod
    def host_info(cls, array: np.ndarray) -> Tuple[int, bool]:
        """(address, pinned?) of a host array; cached until a registration changes."""
        key = id(array)
        generation = REGISTERED.state[1]  # before the answer: a change meanwhile misses
        hit = cls._info.get(key)
        if hit is not None and hit[0]() is array and hit[3] == generation:
            return hit[1], hit[2]
        info = (host_address(array), cls.is_pinned(array))
        cache = cls._info
        if len(cache) > 4096:
            cache.clear()
        cache[key] = (weakref.ref(array), info[0], info[1], generation)
        return info


def register_host(driver: Any, check: Any, array: np.ndarray) -> Tuple[int, int]:
    """Page-lock ``array``'s memory in place (for every device); returns its range."""
    start, end = REGISTERED.reserve(array)
    flags = _PORTABLE if array.flags.writeable else _PORTABLE | _READ_ONLY
    try:
        check(driver.cuMemHostRegister(start, end - start, flags), "registering host memory")
    except BaseException:
        REGISTERED.remove(start, end)
        raise
    return start, end


def unregister_host(driver: Any, check: Any, span: Tuple[int, int]) -> None:
    REGISTERED.remove(*span)
    check(driver.cuMemHostUnregister(span[0]), "unregistering host memory")


class StagingPool:
    """Pinned buffers that pageable copies go through, reused once their copy is done.

    At most ``limit`` buffers per size class: past that, taking one waits for the
    oldest copy, which bounds pinned memory however fast the host queues.
    """

    def __init__(self, allocator: PinnedAllocator, make_event: Any, limit: int = 8) -> None:
        self._alloc = allocator
        self._make_event = make_event
        self._limit = limit
        self._free: Dict[int, List[np.ndarray]] = {}
        self._busy: Dict[int, List[Tuple[np.ndarray, Any]]] = {}
        self._count: Dict[int, int] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _class(nbytes: int) -> int:
        return max(1 << 16, 1 << (max(1, nbytes) - 1).bit_length())

    def take(self, nbytes: int) -> Tuple[int, np.ndarray]:
        cls = self._class(nbytes)
        with self._lock:
            free = self._free.setdefault(cls, [])
            busy = self._busy.setdefault(cls, [])
            while busy and busy[0][1].query():
                free.append(busy.pop(0)[0])
            if free:
                return cls, free.pop()
            if self._count.get(cls, 0) < self._limit or not busy:
                self._count[cls] = self._count.get(cls, 0) + 1
                return cls, self._alloc.allocate(cls)
            buf, ev = busy.pop(0)
        ev.synchronize()
        return cls, buf

    def give_back_after(self, cls: int, buf: np.ndarray, event: Any) -> None:
        """Return ``buf`` once ``event`` (recorded after its copy) completes."""
        with self._lock:
            self._busy.setdefault(cls, []).append((buf, event))

    def give_back(self, cls: int, buf: np.ndarray) -> None:
        with self._lock:
            self._free.setdefault(cls, []).append(buf)


def device_alloc(dev: Any, stream: Any, nbytes: int, device_id: int) -> DeviceArray:
    buf = dev.allocate(max(1, int(nbytes)), stream=stream)
    stream.sync()  # the memory is used on other streams next
    return DeviceArray(int(buf.handle), (int(nbytes),), np.dtype(np.uint8), buf, device_id)


__all__ = ["DeviceArray", "PinnedAllocator", "StagingPool", "device_alloc"]
