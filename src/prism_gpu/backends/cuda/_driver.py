"""Thin, checked access to the CUDA driver API for the hot paths."""

from __future__ import annotations

import os
import threading
from typing import Any, Optional, Tuple

import numpy as np
from cuda.bindings import driver

from ..._errors import KernelError, PrismGpuError, SynchronizationError

CUresult = driver.CUresult
SUCCESS = CUresult.CUDA_SUCCESS

# Errors after which the context is unusable: every later call fails too.
STICKY = {
    "CUDA_ERROR_ILLEGAL_ADDRESS", "CUDA_ERROR_LAUNCH_FAILED", "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    "CUDA_ERROR_MISALIGNED_ADDRESS", "CUDA_ERROR_INVALID_ADDRESS_SPACE", "CUDA_ERROR_INVALID_PC",
    "CUDA_ERROR_HARDWARE_STACK_ERROR", "CUDA_ERROR_ASSERT", "CUDA_ERROR_LAUNCH_TIMEOUT",
    "CUDA_ERROR_ECC_UNCORRECTABLE", "CUDA_ERROR_CONTEXT_IS_DESTROYED",
}


# the numpy scalars a native launch passes by value, by exact type (cuda.core's set, with
# numpy's C-named aliases); anything else is refused
SCALAR_TYPES = tuple(dict.fromkeys((
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
    np.uint64, np.float16, np.float32, np.float64, np.complex64, np.complex128, np.byte,
    np.ubyte, np.short, np.ushort, np.intc, np.uintc, np.int_, np.uint, np.longlong,
    np.ulonglong)))
MAX_NATIVE_ARGS = 256  # a launch of more parameters goes through cuda.core


def _load_native() -> Tuple[Any, str]:
    """The native driver calls (``_native``) or None, and a word on which: not built, no
    driver library, or turned off with ``PRISM_GPU_NATIVE_DRIVER=0``."""
    if os.environ.get("PRISM_GPU_NATIVE_DRIVER", "1").strip().lower() in ("0", "false", "no",
                                                                          "off"):
        return None, "off: PRISM_GPU_NATIVE_DRIVER turns them off"
    try:
        from . import _native  # type: ignore[attr-defined]
    except ImportError:  # built without a C compiler
        return None, "off: not built (no C compiler at install)"
    why: Optional[str] = _native.load(SCALAR_TYPES)
    return (_native, "on") if why is None else (None, f"off: {why}")


# the native calls, and what ``prism-gpu info`` says of them
NATIVE, NATIVE_STATUS = _load_native()
CURRENT = threading.local()  # .ordinal: the device whose context is current, per thread
NOT_READY = 600  # CUDA_ERROR_NOT_READY: an event query of work still running
INVALID_HANDLE = 400  # CUDA_ERROR_INVALID_HANDLE


def bindings_memcpy(dst: int, src: int, nbytes: int, stream: int) -> int:
    """cuMemcpyAsync through cuda.bindings, as the native call: the CUresult as an int, and
    a null stream (a closed one's) refused rather than taken for the default stream."""
    if not stream:
        return INVALID_HANDLE
    return int(driver.cuMemcpyAsync(dst, src, nbytes, stream)[0])


def error(err: Any, what: str) -> PrismGpuError:
    """A prism-gpu error for CUDA result ``err`` (a CUresult or its int) raised while doing
    ``what``."""
    if isinstance(err, int) and not hasattr(err, "name"):
        try:
            err = CUresult(err)
        except Exception:  # noqa: BLE001 - a code this cuda.bindings does not know
            pass
    name = getattr(err, "name", str(err))
    if name in STICKY:
        exc: PrismGpuError = SynchronizationError(
            f"{what} failed with {name}: a sticky CUDA error, the CUDA context is lost. "
            "Every later CUDA call in this process fails; recreate the process (run with "
            "PRISM_GPU_SYNC=1 or compute-sanitizer to find the faulting kernel)")
        exc.sticky = True  # type: ignore[attr-defined]
    else:
        exc = KernelError(f"{what} failed with {name}")
        exc.sticky = False  # type: ignore[attr-defined]
    exc.cuda_error = name  # type: ignore[attr-defined]
    return exc


def check(result: Any, what: str) -> Any:
    """Unpack a cuda.bindings result tuple, raising a prism-gpu error on failure."""
    err = result[0]
    if err != SUCCESS:
        raise error(err, what)
    return result[1] if len(result) == 2 else result[1:]


def from_cuda_exception(exc: BaseException, what: str) -> PrismGpuError:
    """Map a cuda.core exception (CUDAError, NVRTCError) to a prism-gpu error."""
    text = str(exc)
    for name in STICKY:
        if name in text:
            e = error(type("E", (), {"name": name})(), what)
            e.__cause__ = exc
            return e
    e = KernelError(f"{what} failed: {text}")
    e.__cause__ = exc
    return e
