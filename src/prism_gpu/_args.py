"""Checks of public arguments shared by the core's clients (types named in errors), and
the coordinators still open at exit."""

from __future__ import annotations

import atexit
import math
import sys
import weakref
from typing import Any, List, Optional, Tuple

import numpy as np

from ._errors import BackendUnavailableError, InvalidOperationError

__all__ = ["MAX_DEPTH", "MAX_SAMPLE", "TIMING_SAMPLE", "check_timeout", "resolve_device", "int_arg",
           "sequence_arg", "shape_arg", "dtype_arg", "typed_empty", "allocate_named",
           "iterable_arg", "device_ids", "LIVE"]

LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()
"""Coordinators not closed yet: at interpreter exit their queued work is finished while
their threads still run (an unclosed coordinator must not hang the exit)."""


@atexit.register
def _close_live() -> None:
    for coord in list(LIVE):
        try:
            coord.close_collecting()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


def check_timeout(timeout: Any) -> Optional[float]:
    """A wait timeout in seconds as a float, or None for no limit."""
    if timeout is None:
        return None
    if isinstance(timeout, (bool, str, bytes)) or not hasattr(timeout, "__float__"):
        raise TypeError(f"timeout must be a number of seconds or None, got "
                        f"{type(timeout).__name__}")
    t = float(timeout)
    if math.isnan(t) or t < 0:
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout!r}")
    return None if t > _FOREVER else t  # past a century: no limit (and no clock overflow)


_FOREVER = 100 * 365.25 * 86400.0


def resolve_device(device: Any) -> Tuple[Any, bool]:
    if device is None:
        from .backends import open_device

        return open_device("auto"), True
    if hasattr(device, "create_stream") and hasattr(device, "allocate"):
        dev = device
    else:
        dev = getattr(device, "device", None)  # a ManagedGpuContext
        if dev is None or not hasattr(dev, "create_stream"):
            raise TypeError(f"expected a prism-gpu device or context, got "
                            f"{type(device).__name__}")
    if dev.closed:
        raise InvalidOperationError("the device (or the context) is closed")
    return dev, False


MAX_DIMS = 64  # numpy's limit on an array's dimensions
MAX_DEPTH = 1024  # device slots of one ring: each is allocated up front
MAX_SAMPLE = 1 << 20  # a pipeline's timing_sample, at most
TIMING_SAMPLE = 8  # a pipeline's timed iterations by default: one in 8


def int_arg(value: Any, what: str, minimum: int, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    v = value.__index__()
    if v < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{what} must be <= {maximum}, got {v}")
    return v


def sequence_arg(value: Any, what: str) -> Optional[Tuple[Any, ...]]:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise TypeError(f"{what} must be a tuple or list (e.g. {what}=(2.0,)), got "
                    f"{type(value).__name__}")


def shape_arg(shape: Any) -> Tuple[int, ...]:
    """An array shape: an int or an iterable of non-negative ints."""
    if isinstance(shape, np.ndarray):  # np.empty takes an integer array as a shape too
        shape = shape.tolist()
    dims = (shape,) if isinstance(shape, int) or hasattr(shape, "__index__") else shape
    if isinstance(dims, (str, bytes)) or not hasattr(dims, "__iter__"):
        raise TypeError(f"shape must be an int or a tuple of ints, got {shape!r}")
    dims = tuple(dims)
    if len(dims) > MAX_DIMS:
        raise ValueError(f"shape has {len(dims)} dimensions; arrays have at most {MAX_DIMS}")
    for d in dims:
        if isinstance(d, bool) or not hasattr(d, "__index__"):
            raise TypeError(f"shape must hold ints, got {shape!r}")
        if d.__index__() < 0:
            raise ValueError(f"shape must not be negative, got {shape!r}")
    return tuple(d.__index__() for d in dims)


def dtype_arg(dtype: Any) -> np.dtype:
    """A numpy dtype of plain elements (not a sub-array dtype such as ``'(2,)f4'``,
    which would change the shape)."""
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"dtype {dtype!r} is not a numpy dtype: {exc}") from None
    if dt.subdtype is not None:
        raise TypeError(f"dtype {dtype!r} is a sub-array dtype; give its element type and "
                        "put the sub-array in the shape")
    return dt


def iterable_arg(value: Any, what: str) -> Any:
    """``value`` if it is an iterable (not a string), else a TypeError naming ``what``."""
    if not hasattr(value, "__iter__") or isinstance(value, (str, bytes)):
        raise TypeError(f"{what} must be an iterable of numpy arrays, got "
                        f"{type(value).__name__}")
    return value


def typed_empty(allocate: Any, shape: Any, dtype: Any, where: str) -> Any:
    """An uninitialised array of ``shape`` and ``dtype`` carved from ``allocate(nbytes)``
    (1-D uint8 memory: host or device), checked first."""
    dims = shape_arg(shape)
    dt = dtype_arg(dtype)
    if dt.hasobject:
        raise TypeError(f"object dtypes cannot live in {where}")
    if dt.itemsize == 0:
        raise TypeError(f"dtype {dt!r} has elements of no bytes: nothing can live in {where}")
    nbytes = math.prod(dims) * dt.itemsize  # Python ints: a huge shape cannot wrap around
    memory = allocate_named(allocate, max(1, nbytes), f"shape {dims} of {dt} in {where}")
    return memory[:nbytes].view(dt).reshape(dims)


def allocate_named(allocate: Any, nbytes: int, what: str) -> Any:
    """``allocate(nbytes)``, sizes past any memory refused and a failure named in the
    caller's terms (``what``), not as bytes of uint8."""
    if nbytes > sys.maxsize:
        raise ValueError(f"{what} needs {nbytes} bytes, more than any memory")
    try:
        return allocate(nbytes)
    except MemoryError as exc:
        raise MemoryError(f"no memory for {what} ({nbytes} bytes): {exc}") from None


def device_ids(devices: Any, backend: str) -> Optional[List[int]]:
    """``devices=`` (a count, a list of ids, ``"all"`` or None) as a list of device ids."""
    if devices is None:
        return None
    if isinstance(devices, str):
        if devices != "all":
            raise ValueError(f'devices must be a count, a list of device ids or "all", '
                             f"got {devices!r}")
        from .backends import device_count

        n = device_count(backend)
        if n == 0:
            raise BackendUnavailableError(f'devices="all": backend {backend!r} has no device')
        return list(range(n))
    if isinstance(devices, (list, tuple)):
        ids = [int_arg(d, "a device id", 0) for d in devices]
        if not ids:
            raise ValueError("devices is empty: name at least one device")
        if len(set(ids)) != len(ids):
            raise ValueError(f"devices repeats a device: {list(devices)}")
        return ids
    return list(range(int_arg(devices, "devices", 1)))
