"""Host memory the device copies at full speed: new page-locked arrays, and existing
arrays pinned in place for a block."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, List

import numpy as np

from ._args import typed_empty
from ._errors import TransferError

__all__ = ["pinned_empty", "register", "default_device", "context_device"]


def context_device(ctx: Any) -> Any:
    """The device of ``ctx`` (a ManagedGpuContext, checked open), or the default one."""
    if ctx is None:
        return default_device()
    from ._context import ManagedGpuContext

    if not isinstance(ctx, ManagedGpuContext):
        raise TypeError(f"ctx must be a ManagedGpuContext, got {type(ctx).__name__}")
    ctx.check()
    return ctx.device


def pinned_empty(shape: Any, dtype: Any = np.float32, *, ctx: Any = None) -> np.ndarray:
    """An uninitialised numpy array in page-locked memory of ``ctx``'s device.

    Producers that write batches straight into such arrays skip the staging
    copy of :func:`stream_map`. Without ``ctx``, the default device is used.
    """
    device = context_device(ctx)
    return typed_empty(device.allocate_pinned, shape, dtype, "page-locked memory")


_DEFAULT: List[Any] = []


def default_device() -> Any:
    if not _DEFAULT:
        from .backends import open_device

        _DEFAULT.append(open_device("auto"))
    return _DEFAULT[0]


@contextlib.contextmanager
def register(array: Any, *, ctx: Any = None) -> Iterator[np.ndarray]:
    """Pin ``array``'s memory in place for the ``with`` block (``cuMemHostRegister``).

    Yields a view sharing ``array``'s memory that copies go straight to and from
    the device (no staging copy): pass it, or slices of it, as batches, as
    ``out=``, or to any upload or download. Leaving the block waits for the
    device's queued work, then unregisters the memory, also when the block
    raises. A read-only array is registered read-only (downloads into it are
    rejected). Memory that is page-locked already is yielded as it is. On the
    CPU backend the same checks run and nothing else happens.

    Registering costs time per GiB (the pages are locked one by one): it pays
    when the data is copied more than once; for a single pass, staging through
    :func:`stream_map`'s pinned ring is as fast.

    >>> with pg.register(big) as pinned:                  # doctest: +SKIP
    ...     for out in pg.stream_map(kernel, np.array_split(pinned, 64)):
    ...         use(out)
    """
    device = context_device(ctx)
    if not isinstance(array, np.ndarray):
        raise TransferError(f"register takes a numpy array, got {type(array).__name__}")
    if array.dtype.hasobject:
        raise TransferError(f"an array of dtype {array.dtype} holds Python objects; only "
                            "numeric memory can be registered")
    if not array.flags.c_contiguous:
        raise TransferError("register needs C-contiguous memory (a strided view cannot be "
                            "pinned in place); pass np.ascontiguousarray(x), or the array "
                            "the view was taken from")
    view = array.view()
    if array.size == 0 or device.is_pinned(array):
        yield view  # nothing to pin, or pinned already
        return
    try:
        handle = device.register_host(array)
    except ValueError as exc:
        raise TransferError(f"cannot register this array: {exc}") from exc
    try:
        yield view
    finally:
        try:
            device.synchronize()  # no copy may still be reading or writing these pages
        finally:
            device.unregister_host(handle)
