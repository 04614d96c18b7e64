"""Small option records of the public API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Tuple, Union

import numpy as np

__all__ = ["LaunchConfig", "StepConfig", "Dim3"]

Dim3 = Tuple[int, int, int]


def _dim3(value: Union[int, Sequence[int]], what: str) -> Dim3:
    if isinstance(value, (int, np.integer)):
        dims = (int(value), 1, 1)
    else:
        seq = tuple(int(v) for v in value)
        if not 1 <= len(seq) <= 3:
            raise ValueError(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
        dims = seq + (1,) * (3 - len(seq))  # type: ignore[assignment]
    if any(d < 1 for d in dims):
        raise ValueError(f"{what} dimensions must be >= 1, got {dims}")
    return dims  # type: ignore[return-value]


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
        if int(self.shared_mem_bytes) < 0:
            raise ValueError("shared_mem_bytes must be >= 0")
        object.__setattr__(self, "shared_mem_bytes", int(self.shared_mem_bytes))

    @classmethod
    def for_elements(cls, n: int, block: int = 256) -> "LaunchConfig":
        """One thread per element (at least one block)."""
        return cls(grid=max(1, -(-int(n) // block)), block=block)


@dataclass
class StepConfig:
    """One batch for :meth:`ManagedGpuContext.triple_buffered_step`.

    ``input`` is uploaded, ``kernel`` (a registered name, a :class:`Kernel` or a
    callable) runs on it in place, and the result is downloaded into ``output``.
    """

    kernel: Any
    input: np.ndarray
    output: np.ndarray
    extra: Tuple[Any, ...] = field(default_factory=tuple)
    config: "LaunchConfig | None" = None
    on_complete: "Callable[[Any], None] | None" = None
