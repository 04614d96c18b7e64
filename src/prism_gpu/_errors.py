"""The exception tree.

Every error derives from :class:`PrismGpuError` and from the builtin it
resembles, so ``except ValueError`` keeps working for callers that do not know
prism-gpu.
"""

from __future__ import annotations

__all__ = [
    "PrismGpuError",
    "BackendUnavailableError",
    "BufferUnavailableError",
    "InvalidDependencyError",
    "InvalidOperationError",
    "TransferError",
    "KernelError",
    "DependencyFailedError",
    "SynchronizationError",
]


class PrismGpuError(Exception):
    """Base class of every prism-gpu error."""


class BackendUnavailableError(PrismGpuError, RuntimeError):
    """The requested backend (or a feature of it) cannot be used here."""


class BufferUnavailableError(PrismGpuError, RuntimeError):
    """No slot of a TripleBuffer is in the state the call needs."""


class InvalidDependencyError(PrismGpuError, ValueError):
    """A dependency names an op that was never issued here, or breaks the ring order."""


class InvalidOperationError(PrismGpuError, RuntimeError):
    """The call is not valid now: unknown op id, closed object, wrong thread."""


class TransferError(PrismGpuError, ValueError):
    """A copy was rejected before anything was enqueued (size, dtype, layout, memory kind)."""


class KernelError(PrismGpuError, RuntimeError):
    """A kernel failed (or failed to compile). Carries the op id and the kernel name."""

    def __init__(self, message: str, *, op_id: int | None = None, kernel: str | None = None,
                 log: str | None = None) -> None:
        super().__init__(message)
        self.op_id = op_id
        self.kernel = kernel
        self.log = log


class DependencyFailedError(PrismGpuError, RuntimeError):
    """An op did not run because an op it depends on failed. ``root_op`` names that op."""

    def __init__(self, message: str, *, op_id: int, root_op: int,
                 root_error: BaseException | None = None) -> None:
        super().__init__(message)
        self.op_id = op_id
        self.root_op = root_op
        self.root_error = root_error


class SynchronizationError(PrismGpuError, TimeoutError):
    """A wait did not complete in time, or the device reported a lost context."""
