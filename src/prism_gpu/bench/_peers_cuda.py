"""The bench workload hand-written in CuPy and PyTorch, the way an expert would.

Three non-blocking streams, pinned host memory, a ring of three device slots,
events between the stages, non-blocking copies (``get(blocking=False)`` /
``non_blocking=True``). Same sizes and the same device code as the prism-gpu
loops, so the figures compare like with like.

``work`` says what the compute stage runs: the data-free ``spin`` kernel (the
``bench`` command), or ``spin_scale``, which doubles the slot in place while
spinning, so every output can be checked against numpy (the benchmark runner).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from .._builtins import SPIN_SOURCE

DEPTH = 3

SPIN_SCALE_SOURCE = r"""
extern "C" __global__ void spin_scale(float* x, size_t n, double us) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    size_t stride = (size_t)blockDim.x * gridDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        x[i] *= 2.0f;
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        unsigned long long ns = (unsigned long long)(us * 1000.0);
        do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now)); } while (now - start < ns);
    }
}
"""


def spin_scale_grid(n: int) -> int:
    return max(1, min(-(-n // 256), 132 * 8))


@dataclass
class Work:
    """The compute stage and the data of a peer loop."""

    n_up: int
    n_down: int
    spin_us: float
    scale: bool = False             # spin_scale in place (n_up == n_down) instead of spin
    inputs: Sequence[np.ndarray] = ()  # host inputs used round-robin (default: ones)
    outputs: List[np.ndarray] = field(default_factory=list)  # filled: last DEPTH outputs


def _time(step: Callable[[int], None], sync: Callable[[], None], iterations: int) -> float:
    for i in range(2 * DEPTH):
        step(i)
    sync()
    t = time.perf_counter()
    for i in range(iterations):
        step(i)
    sync()
    return (time.perf_counter() - t) * 1e3 / iterations


def _kernel(cp: Any, work: Work) -> Callable[[Any, Any], None]:
    us = np.float64(work.spin_us)
    if work.scale:
        k = cp.RawKernel(SPIN_SCALE_SOURCE, "spin_scale")
        grid, n = spin_scale_grid(work.n_up), np.uint64(work.n_up)
        return lambda arr_ptr, stream: k((grid,), (256,), (arr_ptr, n, us), stream=stream)
    k = cp.RawKernel(SPIN_SOURCE, "spin")
    return lambda arr_ptr, stream: k((1,), (1,), (us,), stream=stream)


def cupy_loop(work: Work, iterations: int) -> float:
    import cupy as cp
    import cupyx

    run = _kernel(cp, work)
    up, comp, down = (cp.cuda.Stream(non_blocking=True) for _ in range(3))
    d_in = [cp.empty(work.n_up, cp.float32) for _ in range(DEPTH)]
    d_out = d_in if work.scale else [cp.empty(work.n_down, cp.float32) for _ in range(DEPTH)]
    h_in = _pinned_inputs(lambda n: cupyx.empty_pinned((n,), cp.float32), work)
    h_out = [cupyx.empty_pinned((work.n_down,), cp.float32) for _ in range(DEPTH)]
    ev_up = [cp.cuda.Event(disable_timing=True) for _ in range(DEPTH)]
    ev_c = [cp.cuda.Event(disable_timing=True) for _ in range(DEPTH)]
    ev_dn = [cp.cuda.Event(disable_timing=True) for _ in range(DEPTH)]
    count = [0]

    def step(i: int) -> None:
        k = i % DEPTH
        if count[0] >= DEPTH:
            up.wait_event(ev_dn[k] if work.scale else ev_c[k])  # slot free again
            comp.wait_event(ev_dn[k])   # the output slot's previous download is done
        count[0] += 1
        d_in[k].set(h_in[i % len(h_in)], stream=up)
        ev_up[k].record(up)
        comp.wait_event(ev_up[k])
        run(d_in[k].data.ptr, comp)
        ev_c[k].record(comp)
        down.wait_event(ev_c[k])
        d_out[k].get(out=h_out[k], stream=down, blocking=False)
        ev_dn[k].record(down)

    def sync() -> None:
        for s in (up, comp, down):
            s.synchronize()

    ms = _time(step, sync, iterations)
    _collect(work, h_out, count[0])
    return ms


def torch_loop(work: Work, iterations: int) -> float:
    import cupy as cp
    import torch

    run = _kernel(cp, work)  # the same device code as the others, launched on torch streams
    dev = torch.device("cuda")
    up, comp, down = (torch.cuda.Stream() for _ in range(3))
    d_in = [torch.empty(work.n_up, dtype=torch.float32, device=dev) for _ in range(DEPTH)]
    d_out = d_in if work.scale else [torch.empty(work.n_down, dtype=torch.float32, device=dev)
                                     for _ in range(DEPTH)]
    h_in = _pinned_inputs(lambda n: torch.empty(n, dtype=torch.float32).pin_memory(), work)
    h_out = [torch.empty(work.n_down, dtype=torch.float32).pin_memory() for _ in range(DEPTH)]
    ev_up = [torch.cuda.Event() for _ in range(DEPTH)]
    ev_c = [torch.cuda.Event() for _ in range(DEPTH)]
    ev_dn = [torch.cuda.Event() for _ in range(DEPTH)]
    from_external = getattr(cp.cuda.Stream, "from_external", None)
    comp_cp = from_external(comp) if from_external else cp.cuda.ExternalStream(comp.cuda_stream)
    count = [0]

    def step(i: int) -> None:
        k = i % DEPTH
        if count[0] >= DEPTH:
            up.wait_event(ev_dn[k] if work.scale else ev_c[k])
            comp.wait_event(ev_dn[k])
        count[0] += 1
        with torch.cuda.stream(up):
            d_in[k].copy_(h_in[i % len(h_in)], non_blocking=True)
            ev_up[k].record(up)
        comp.wait_event(ev_up[k])
        run(d_in[k].data_ptr(), comp_cp)
        ev_c[k].record(comp)
        down.wait_event(ev_c[k])
        with torch.cuda.stream(down):
            h_out[k].copy_(d_out[k], non_blocking=True)
            ev_dn[k].record(down)

    def sync() -> None:
        for s in (up, comp, down):
            s.synchronize()

    ms = _time(step, sync, iterations)
    _collect(work, [t.numpy() for t in h_out], count[0])
    return ms


def _pinned_inputs(alloc: Callable[[int], Any], work: Work) -> List[Any]:
    if not work.inputs:
        h = alloc(work.n_up)
        h[:] = 1.0
        return [h]
    out = []
    for x in work.inputs:
        h = alloc(work.n_up)
        np.copyto(np.asarray(h) if not hasattr(h, "numpy") else h.numpy(), x)
        out.append(h)
    return out


def _collect(work: Work, h_out: Sequence[Any], count: int) -> None:
    """Keep the last DEPTH outputs in iteration order (oldest first)."""
    work.outputs = [np.array(h_out[i % DEPTH]) for i in range(count - DEPTH, count)]


def run_cuda_peers(device: Any, result: Any, iterations: int,
                   work: Optional[Work] = None) -> List[Dict[str, Any]]:
    if work is None:
        work = Work(result.up_bytes // 4, result.down_bytes // 4,
                    result.workload["compute_ms"] * 1e3)
    out: List[Dict[str, Any]] = []
    for name, fn in (("CuPy (hand-written)", cupy_loop), ("PyTorch (hand-written)", torch_loop)):
        try:
            ms = fn(work, iterations)
        except ImportError as exc:
            out.append({"name": name, "ms": float("nan"), "skipped": str(exc)})
            continue
        out.append({"name": name, "ms": ms})
    return out
