"""Small option records of the public API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Tuple, Union

import numpy as np

from ._args import int_arg

__all__ = ["LaunchConfig", "StepConfig", "Dim3"]

Dim3 = Tuple[int, int, int]


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {value!r}")
    return int(value)


def _dim3(value: Union[int, Sequence[int]], what: str) -> Dim3:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        dims: Tuple[int, ...] = (int(value), 1, 1)
    elif isinstance(value, (tuple, list)):
        if not 1 <= len(value) <= 3:
            raise ValueError(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
        dims = tuple(_int(v, f"each {what} dimension") for v in value)
        dims = dims + (1,) * (3 - len(dims))
    else:
        raise TypeError(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
    if any(d < 1 for d in dims):
        raise ValueError(f"{what} dimensions must be >= 1, got {dims}")
    top = _LIMITS[what]
    if any(d > t for d, t in zip(dims, top)) or (what == "block" and dims[0] * dims[1]
                                                 * dims[2] > 1024):
        raise ValueError(f"{what} {dims} is past what any CUDA device launches (at most "
                         f"{top}{', 1024 threads in all' if what == 'block' else ''})")
    return dims  # type: ignore[return-value]


# every CUDA device since compute capability 3.0: the CPU backend refuses the same
_LIMITS = {"grid": (2**31 - 1, 65535, 65535), "block": (1024, 1024, 64)}


@dataclass(frozen=True)
class LaunchConfig:
    """Grid, block and dynamic shared memory of a kernel launch.

    ``grid`` and ``block`` take an int or a tuple of up to three ints.

    >>> LaunchConfig(grid=16, block=(256, 1, 1)).grid
    (16, 1, 1)
    """

    grid: Union[int, Sequence[int]] = 1
    block: Union[int, Sequence[int]] = 256
    shared_mem_bytes: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", _dim3(self.grid, "grid"))
        object.__setattr__(self, "block", _dim3(self.block, "block"))
        smem = _int(self.shared_mem_bytes, "shared_mem_bytes")
        if not 0 <= smem < 2**32:
            raise ValueError(f"shared_mem_bytes must be 0 to 2**32 - 1, got {smem}")
        object.__setattr__(self, "shared_mem_bytes", smem)

    @classmethod
    def for_elements(cls, n: int, block: int = 256) -> "LaunchConfig":
        """One thread per element (at least one block)."""
        n, block = int_arg(n, "n", 0), int_arg(block, "block", 1)
        return cls(grid=max(1, -(-n // block)), block=block)


@dataclass
class StepConfig:
    """One batch for :meth:`ManagedGpuContext.triple_buffered_step`.

    ``input`` is uploaded, ``kernel`` (a registered name, a :class:`Kernel` or a
    callable) runs on it in place with ``extra`` after the arrays, and the
    result is downloaded into ``output``. ``on_complete(telemetry)`` is called
    once the download is complete (by the call that finds it complete).
    """

    kernel: Any
    input: np.ndarray
    output: np.ndarray
    extra: Tuple[Any, ...] = field(default_factory=tuple)
    config: "LaunchConfig | None" = None
    on_complete: "Callable[[Any], None] | None" = None

    def __post_init__(self) -> None:
        # the common record (a kernel name, a tuple of extra values, no launch config and
        # no callback) passes every check of validate: skip the call
        if type(self.kernel) is str and type(self.extra) is tuple and self.config is None \
                and self.on_complete is None:
            return
        self.validate()

    def validate(self) -> None:
        """Check the fields' types (again before each step: the record is mutable)."""
        if self.config is not None and not isinstance(self.config, LaunchConfig):
            raise TypeError(f"StepConfig.config must be a LaunchConfig or None, got "
                            f"{type(self.config).__name__}")
        if not isinstance(self.extra, (tuple, list)):
            raise TypeError(f"StepConfig.extra must be a tuple of extra kernel arguments, "
                            f"got {type(self.extra).__name__} (write extra=(value,))")
        if self.on_complete is not None and not callable(self.on_complete):
            raise TypeError("StepConfig.on_complete must be callable or None")
        k = self.kernel
        if not isinstance(k, str) and not callable(k) and not hasattr(k, "cpu_callable"):
            raise TypeError(f"StepConfig.kernel must be a kernel name, a Kernel or a "
                            f"callable, got {type(k).__name__}")
