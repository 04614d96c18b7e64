"""Kernels registered on every coordinator: ``noop``, ``spin`` and ``scale``."""

from __future__ import annotations

import time
from typing import Any, Dict, Sequence

import numpy as np

from ._config import LaunchConfig
from ._kernels import Kernel

__all__ = ["builtin_kernels", "SPIN_SOURCE", "SCALE_SOURCE", "NOOP_SOURCE"]

NOOP_SOURCE = r"""
extern "C" __global__ void noop() {}
"""

# Busy-wait on the device's global nanosecond timer: wall time, whatever the SM clock.
SPIN_SOURCE = r"""
extern "C" __global__ void spin(double us) {
    unsigned long long ns = (unsigned long long)(us * 1000.0);
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}
"""

SCALE_SOURCE = r"""
extern "C" __global__ void scale(float* x, size_t n, float factor) {
    size_t stride = (size_t)blockDim.x * gridDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        x[i] *= factor;
    }
}
"""


def _noop_cpu(*_args: Any) -> None:
    return None


def _spin_cpu(us: float) -> None:
    # Sleeping releases the GIL, so a spinning stream models device time.
    deadline = time.perf_counter() + float(us) * 1e-6
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            return
        time.sleep(left)


SPIN_MAX_US = 60e6


def _check_spin(values: Sequence[Any]) -> None:
    """``spin`` takes one duration: finite, 0 to a minute (the device cannot be
    interrupted, so an infinite or huge spin would hold it for ever)."""
    if len(values) != 1:
        raise TypeError(f"kernel 'spin' takes one duration in microseconds, got "
                        f"{len(values)} values")
    us = values[0]
    if isinstance(us, (bool, np.bool_, str, bytes)) or not hasattr(us, "__float__"):
        raise TypeError(f"kernel 'spin' takes a duration in microseconds (a real number), "
                        f"got {type(us).__name__}")
    try:
        t = float(us)  # (a 0-d array, a Fraction)
    except (TypeError, ValueError, OverflowError):
        t = float("inf")
    if not 0 <= t <= SPIN_MAX_US:  # NaN fails this too
        raise ValueError(f"kernel 'spin' takes 0 to {SPIN_MAX_US:.0f} microseconds, "
                         f"got {t:.6g}")


def _scale_cpu(*args: Any) -> None:
    # the CUDA kernel's contract exactly: one float32 array, a float factor
    *arrays, factor = args
    if len(arrays) != 1 or getattr(arrays[0], "dtype", None) != np.float32:
        got = ", ".join(str(getattr(a, "dtype", type(a).__name__)) for a in arrays) or "none"
        raise TypeError(f"kernel 'scale' takes one float32 array (float* x), got {got}")
    np.multiply(arrays[0], np.float32(factor), out=arrays[0])


def builtin_kernels() -> Dict[str, Kernel]:
    """Fresh built-in kernels.

    ``spin`` takes microseconds (``extra=(us,)``, 0 to a minute: other values are
    refused when queued, as the device cannot be interrupted) and ignores data; ``scale``
    multiplies its one float32 array in place by ``factor`` (default 2), on every
    backend (the CPU version refuses what the CUDA kernel cannot take).
    """
    one = LaunchConfig(grid=1, block=1)
    return {
        "noop": Kernel("noop", source=NOOP_SOURCE, entry="noop", cpu=_noop_cpu,
                       uses_arrays=False, config=one),
        "spin": Kernel("spin", source=SPIN_SOURCE, entry="spin", cpu=_spin_cpu,
                       uses_arrays=False, config=one, defaults=(0,),
                       check=_check_spin),
        "scale": Kernel("scale", source=SCALE_SOURCE, entry="scale", cpu=_scale_cpu,
                        defaults=(2.0,)),
    }
