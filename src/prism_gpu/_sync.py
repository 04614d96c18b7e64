"""Sync mode: every queue call waits for its op and raises the op's error at the call.

The library's ``CUDA_LAUNCH_BLOCKING``, for debugging: ``PRISM_GPU_SYNC=1`` in the
environment, or ``pg.set_sync_mode(True)``. It serialises everything, so it is
for finding which call's work failed, not for measuring.
"""

from __future__ import annotations

import os

__all__ = ["set_sync_mode", "sync_mode"]

_ON = os.environ.get("PRISM_GPU_SYNC", "").strip().lower() in ("1", "true", "yes", "on")


def set_sync_mode(enabled: bool) -> bool:
    """Turn sync mode on or off for the process; returns the previous setting."""
    global _ON
    if not isinstance(enabled, bool):
        raise TypeError(f"set_sync_mode takes a bool, got {type(enabled).__name__}")
    previous, _ON = _ON, enabled
    return previous


def sync_mode() -> bool:
    """Whether queue calls wait for their op and raise its error at the call."""
    return _ON
