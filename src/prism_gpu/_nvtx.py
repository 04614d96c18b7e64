"""NVTX ranges around queued ops, when the ``nvtx`` package is importable and a tool
(Nsight Systems, Nsight Compute) is attached to the process.

Each op's enqueue is a range named after its lane and op (a pipeline stage's
range is the stage's name), so Nsight shows what the host queued and
``ncu --nvtx --nvtx-include "prism-gpu@<range>/"`` profiles only the kernels of a
stage (the ranges live in the ``prism-gpu`` domain).
Without a tool the ranges would go nowhere but still cost the Python calls that
open them (about a fifth of the host time of a tiny op): they are not opened then.
``PRISM_GPU_NVTX=0`` turns them off even under a tool.
"""

from __future__ import annotations

import os
from typing import Any, Optional

__all__ = ["ON", "range_start", "range_end", "tool_attached"]

_COLORS = {"upload": "blue", "compute": "green", "download": "orange"}
DOMAIN = "prism-gpu"


def tool_attached(module: Any) -> bool:
    """Whether NVTX calls through ``module`` (the ``nvtx`` package) reach a tool: its
    domains are placeholders (``DummyDomain``) when none is attached. Versions
    without placeholders are taken as attached (their ranges were always opened)."""
    try:
        domain = module.get_domain(DOMAIN)
    except Exception:  # noqa: BLE001 - an nvtx that cannot make domains: no ranges
        return False
    return type(domain).__name__ != "DummyDomain"


try:
    if os.environ.get("PRISM_GPU_NVTX", "1").strip().lower() in ("0", "false", "no", "off"):
        raise ImportError("turned off")
    import nvtx as _nvtx_mod

    ON = tool_attached(_nvtx_mod)
except Exception:  # noqa: BLE001 - no nvtx package: no ranges
    ON = False
    _nvtx_mod = None


def range_start(lane: str, op_type: str, name: Optional[str]) -> Any:
    """Open the range of one op's enqueue: a compute is named after its kernel or stage."""
    if op_type == "compute":
        message = lane if lane not in ("compute",) else (name or "compute")
    else:
        message = f"{op_type} ({lane})" if lane != op_type else op_type
    # push/pop ranges (what ncu's --nvtx-include matches); the enqueue is on one thread
    _nvtx_mod.push_range(message=message, color=_COLORS.get(op_type, "grey"),
                         domain=DOMAIN)
    return True


def range_end(mark: Any) -> None:
    _nvtx_mod.pop_range(domain=DOMAIN)
