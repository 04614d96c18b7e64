"""Checks made before anything is enqueued: a rejected call changes no state."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._errors import TransferError


def host_array(data: Any, dtype: np.dtype, what: str) -> np.ndarray:
    """``data`` as a C-contiguous numpy array of ``dtype``, or a TransferError."""
    if type(data) is not np.ndarray and not isinstance(data, np.ndarray):
        raise TransferError(
            f"{what} must be a numpy array, got {type(data).__name__}; convert it with "
            f"np.ascontiguousarray(x, dtype=np.{dtype.name})")
    if data.dtype is not dtype and data.dtype != dtype:
        raise TransferError(
            f"{what} has dtype {data.dtype}, the buffer holds {dtype}; convert it with "
            f".astype(np.{dtype.name}) (prism-gpu never converts silently)")
    if not data.flags.c_contiguous:
        raise TransferError(
            f"{what} is not C-contiguous (a strided view?); pass np.ascontiguousarray(x)")
    if data.size == 0:
        raise TransferError(f"{what} is empty: there is nothing to transfer")
    return data


def upload_source(data: Any, dtype: np.dtype, capacity: int) -> int:
    host_array(data, dtype, "upload data")
    n = data.size
    if n > capacity:
        raise TransferError(
            f"upload data has {n} elements, a slot holds {capacity}; use a larger buffer "
            "or split the batch")
    return n


def download_destination(dst: Any, dtype: np.dtype, valid: int,
                         what: str = "download destination") -> np.ndarray:
    host_array(dst, dtype, what)
    if not dst.flags.writeable:
        raise TransferError(f"{what} is read-only; pass a writable array")
    if dst.size < valid:
        raise TransferError(
            f"{what} holds {dst.size} elements, there are {valid} valid "
            "elements to copy; pass a destination of at least that size")
    flat = dst if dst.ndim == 1 else dst.reshape(-1)
    return flat if dst.size == valid else flat[:valid]
