"""Hand-written peers of the bench workload (CuPy, PyTorch), where installed."""

from __future__ import annotations

from typing import Any, Dict, List


def run_peers(device: Any, result: Any, iterations: int) -> List[Dict[str, Any]]:
    if device.kind != "cuda":
        return []
    from ._peers_cuda import run_cuda_peers

    return run_cuda_peers(device, result, iterations)
