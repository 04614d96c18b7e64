"""Backend selection. The only place that knows which backends exist.

``auto`` picks CUDA when ``cuda.core`` imports and a device is present, the CPU
otherwise; ``PRISM_GPU_BACKEND`` overrides ``auto``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .._errors import BackendUnavailableError

__all__ = ["open_device", "cuda_unavailable_reason", "device_count", "resolve_backend",
           "BACKENDS"]

BACKENDS = ("auto", "cpu", "cuda")
_log = logging.getLogger("prism_gpu")
_logged_auto = False


def cuda_unavailable_reason(ordinal: int = 0) -> "str | None":
    """Why the CUDA backend cannot open device ``ordinal``, or None if it can."""
    from .cuda import unavailable_reason

    return unavailable_reason(ordinal)


def _asked(backend: str) -> str:
    """``backend`` checked, with ``auto`` replaced by ``PRISM_GPU_BACKEND`` when set."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("PRISM_GPU_BACKEND", "").strip().lower()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(
                    f"PRISM_GPU_BACKEND must be one of {BACKENDS}, got {env!r}")
            return env
    return backend


def resolve_backend(backend: str = "auto") -> str:
    """``cpu`` or ``cuda``: what ``backend`` (``auto`` honouring ``PRISM_GPU_BACKEND``)
    opens on this machine."""
    backend = _asked(backend)
    if backend == "auto":
        return "cuda" if cuda_unavailable_reason(0) is None else "cpu"
    return backend


def device_count(backend: str = "auto") -> int:
    """How many devices ``backend`` has here (what ``devices="all"`` means)."""
    if resolve_backend(backend) == "cuda":
        if cuda_unavailable_reason(0) is not None:  # also initialises the driver
            return 0
        from cuda.bindings import driver

        err, count = driver.cuDeviceGetCount()
        return int(count) if err == driver.CUresult.CUDA_SUCCESS else 0
    from .cpu import device_count as cpu_count

    return cpu_count()


def open_device(backend: str = "auto", device: int = 0) -> Any:
    """Open ``device`` on ``backend`` (``auto``, ``cpu`` or ``cuda``)."""
    global _logged_auto
    if isinstance(device, str) or not isinstance(device, int) or device < 0:
        raise ValueError(f"device must be a non-negative int, got {device!r}")
    backend = _asked(backend)
    if backend == "cpu":
        from .cpu import CpuDevice

        return CpuDevice(device)
    if backend == "cuda":
        reason = cuda_unavailable_reason(device)
        if reason is not None:
            raise BackendUnavailableError(reason)
        from .cuda import CudaDevice

        return CudaDevice(device)
    reason = cuda_unavailable_reason(device)
    if reason is None:
        from .cuda import CudaDevice

        dev = CudaDevice(device)
    else:
        from .cpu import CpuDevice

        dev = CpuDevice(0)
    if not _logged_auto:
        _logged_auto = True
        if reason is None:
            _log.info("prism-gpu: backend auto -> cuda (%s)", dev.name)
        else:
            _log.info("prism-gpu: backend auto -> cpu (%s)", reason)
    return dev
