"""DLPack export of device arrays (a DLManagedTensor in a "dltensor" capsule)."""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Dict, Tuple

import numpy as np


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                             ("deleter", _DELETER)]

_CODES = {"i": 0, "u": 1, "f": 2, "c": 5, "b": 6}
_live: Dict[int, Tuple[Any, ...]] = {}
_lock = threading.Lock()

_api = ctypes.pythonapi
_api.PyCapsule_New.restype = ctypes.py_object
_api.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_api.PyCapsule_IsValid.restype = ctypes.c_int
# The destructor runs while the capsule is being freed: it must see a raw pointer,
# never a py_object (that would take a new reference to a dying object).
_IsValid = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)(
    ("PyCapsule_IsValid", _api))
_GetPointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", _api))


@_DELETER
def _deleter(managed: Any) -> None:
    with _lock:
        _live.pop(ctypes.addressof(managed.contents), None)


_CAPSULE_DESTRUCTOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


@_CAPSULE_DESTRUCTOR
def _capsule_destructor(capsule: Any) -> None:
    # Unconsumed capsules still own the tensor; consumed ones were renamed.
    if _IsValid(capsule, b"dltensor"):
        ptr = _GetPointer(capsule, b"dltensor")
        with _lock:
            _live.pop(ptr, None)


def to_capsule(array: Any) -> Any:
    dt = np.dtype(array.dtype)
    code = _CODES.get(dt.kind)
    if code is None:
        raise TypeError(f"dtype {dt} has no DLPack equivalent")
    ndim = len(array.shape)
    shape = (ctypes.c_int64 * max(1, ndim))(*array.shape)
    managed = _DLManagedTensor()
    t = managed.dl_tensor
    t.data = array.ptr
    t.device = _DLDevice(2, array._device_id)
    t.ndim = ndim
    t.dtype = _DLDataType(code, dt.itemsize * 8, 1)
    t.shape = shape
    t.strides = None
    t.byte_offset = 0
    managed.deleter = _deleter
    addr = ctypes.addressof(managed)
    with _lock:
        _live[addr] = (managed, shape, array)  # keeps the memory alive until deleted
    return _api.PyCapsule_New(addr, b"dltensor",
                              ctypes.cast(_capsule_destructor, ctypes.c_void_p))
