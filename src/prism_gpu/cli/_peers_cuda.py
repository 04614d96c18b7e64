"""The bench workload hand-written in CuPy and PyTorch, the way an expert would.

Three non-blocking streams, pinned host memory, a ring of three device slots,
events between the stages, non-blocking copies (``get(blocking=False)`` /
``non_blocking=True``). Same sizes and the same ``spin`` device code as the
prism-gpu loop, so the figures compare like with like.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List

from .._builtins import SPIN_SOURCE

DEPTH = 3


def _time(step: Callable[[int], None], sync: Callable[[], None], iterations: int) -> float:
    for i in range(2 * DEPTH):
        step(i)
    sync()
    t = time.perf_counter()
    for i in range(iterations):
        step(i)
    sync()
    return (time.perf_counter() - t) * 1e3 / iterations


def cupy_loop(n_up: int, n_down: int, spin_us: float, iterations: int) -> float:
    import cupy as cp
    import cupyx

    spin = cp.RawKernel(SPIN_SOURCE, "spin")
    up, comp, down = (cp.cuda.Stream(non_blocking=True) for _ in range(3))
    d_in = [cp.empty(n_up, cp.float32) for _ in range(DEPTH)]
    d_out = [cp.empty(n_down, cp.float32) for _ in range(DEPTH)]
    h_in = cupyx.empty_pinned((n_up,), cp.float32)
    h_in[:] = 1.0
    h_out = [cupyx.empty_pinned((n_down,), cp.float32) for _ in range(DEPTH)]
    ev_up = [cp.cuda.Event(disable_timing=True) for _ in range(DEPTH)]
    ev_c = [cp.cuda.Event(disable_timing=True) for _ in range(DEPTH)]
    ev_dn = [cp.cuda.Event(disable_timing=True) for _ in range(DEPTH)]
    import numpy as np

    us = np.float64(spin_us)

    def step(i: int) -> None:
        k = i % DEPTH
        if i >= DEPTH:
            up.wait_event(ev_c[k])      # the slot's previous compute has read it
            comp.wait_event(ev_dn[k])   # the output slot's previous download is done
        d_in[k].set(h_in, stream=up)
        ev_up[k].record(up)
        comp.wait_event(ev_up[k])
        spin((1,), (1,), (us,), stream=comp)
        ev_c[k].record(comp)
        down.wait_event(ev_c[k])
        d_out[k].get(out=h_out[k], stream=down, blocking=False)
        ev_dn[k].record(down)

    def sync() -> None:
        for s in (up, comp, down):
            s.synchronize()

    return _time(step, sync, iterations)


def torch_loop(n_up: int, n_down: int, spin_us: float, iterations: int) -> float:
    import cupy as cp
    import numpy as np
    import torch

    spin = cp.RawKernel(SPIN_SOURCE, "spin")  # same device code as the others
    dev = torch.device("cuda")
    up, comp, down = (torch.cuda.Stream() for _ in range(3))
    d_in = [torch.empty(n_up, dtype=torch.float32, device=dev) for _ in range(DEPTH)]
    d_out = [torch.empty(n_down, dtype=torch.float32, device=dev) for _ in range(DEPTH)]
    h_in = torch.ones(n_up, dtype=torch.float32).pin_memory()
    h_out = [torch.empty(n_down, dtype=torch.float32).pin_memory() for _ in range(DEPTH)]
    ev_up = [torch.cuda.Event() for _ in range(DEPTH)]
    ev_c = [torch.cuda.Event() for _ in range(DEPTH)]
    ev_dn = [torch.cuda.Event() for _ in range(DEPTH)]
    us = np.float64(spin_us)
    comp_cp = (cp.cuda.Stream.from_external(comp) if hasattr(cp.cuda.Stream, "from_external")
               else cp.cuda.ExternalStream(comp.cuda_stream))

    def step(i: int) -> None:
        k = i % DEPTH
        if i >= DEPTH:
            up.wait_event(ev_c[k])
            comp.wait_event(ev_dn[k])
        with torch.cuda.stream(up):
            d_in[k].copy_(h_in, non_blocking=True)
            ev_up[k].record(up)
        comp.wait_event(ev_up[k])
        spin((1,), (1,), (us,), stream=comp_cp)
        ev_c[k].record(comp)
        down.wait_event(ev_c[k])
        with torch.cuda.stream(down):
            h_out[k].copy_(d_out[k], non_blocking=True)
            ev_dn[k].record(down)

    def sync() -> None:
        for s in (up, comp, down):
            s.synchronize()

    return _time(step, sync, iterations)


def run_cuda_peers(device: Any, result: Any, iterations: int) -> List[Dict[str, Any]]:
    n_up, n_down = result.up_bytes // 4, result.down_bytes // 4
    spin_us = result.workload["compute_ms"] * 1e3
    out: List[Dict[str, Any]] = []
    for name, fn in (("CuPy (hand-written)", cupy_loop), ("PyTorch (hand-written)", torch_loop)):
        try:
            ms = fn(n_up, n_down, spin_us, iterations)
        except ImportError as exc:
            out.append({"name": name, "ms": float("nan"), "skipped": str(exc)})
            continue
        out.append({"name": name, "ms": ms})
    return out
