"""CUDA backend on NVIDIA's cuda.core. Imported only when CUDA is asked for."""

from __future__ import annotations

from typing import Optional

__all__ = ["unavailable_reason", "CudaDevice"]

_FIX = 'install the CUDA extra: pip install "prism-gpu[cuda]"'


def unavailable_reason(ordinal: int = 0) -> Optional[str]:
    """Why CUDA device ``ordinal`` cannot be used, or None when it can."""
    try:
        import cuda.core  # noqa: F401
        from cuda.bindings import driver
    except ImportError as exc:
        return f"the CUDA backend needs cuda.core, which does not import ({exc}); {_FIX}"
    except Exception as exc:  # noqa: BLE001 - a broken install must not crash 'auto'
        return f"cuda.core failed to import ({type(exc).__name__}: {exc}); {_FIX}"
    try:
        (err,) = driver.cuInit(0)
        if err != driver.CUresult.CUDA_SUCCESS:
            return (f"the CUDA driver did not initialise ({err.name}): is an NVIDIA driver "
                    "installed and a GPU visible (nvidia-smi)?")
        err, count = driver.cuDeviceGetCount()
    except Exception as exc:  # noqa: BLE001 - e.g. no libcuda.so on this machine
        return (f"no usable CUDA driver ({type(exc).__name__}: {exc}); install the NVIDIA "
                "driver on a machine with a GPU")
    if err != driver.CUresult.CUDA_SUCCESS or count == 0:
        return "no CUDA device is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
    if not 0 <= ordinal < count:
        return f"there is no CUDA device {ordinal}: {count} device(s) visible (0..{count - 1})"
    return None


def __getattr__(name: str):
    if name == "CudaDevice":
        from ._device import CudaDevice

        return CudaDevice
    raise AttributeError(name)
