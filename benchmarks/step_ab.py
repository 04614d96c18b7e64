"""Why triple_buffered_step falls behind the coordinator on large batches (run.py's 3/3/3:
1.53x the floor after its first repeat): the hand-written peers, the step, the pipeline
on the same context and the step after it, the step with the engine's event reclaim off,
the coordinator, and the coordinator with timing on, alternating, with run.py's
bandwidth measure between rounds, on 3/3/3-sized batches (about 165 MB, a 3 ms kernel).
Run on a CUDA machine: python benchmarks/step_ab.py [iterations] [rounds]"""

from __future__ import annotations

import statistics
import sys
from typing import Any, Callable, Dict, List

import numpy as np

import prism_gpu as pg
import prism_loops
from prism_gpu.bench._measure import measure_bandwidth
from prism_gpu.bench._peers_cuda import Work, cupy_loop, torch_loop


def coordinator_timed(ctx: Any, work: Work, iterations: int) -> float:
    real = pg.AsyncCoordinator

    def timed(device: Any, **kw: Any) -> Any:
        return real(device, timing=True, **kw)
    prism_loops.pg.AsyncCoordinator = timed  # type: ignore[misc]
    try:
        return prism_loops.coordinator_loop(ctx, work, iterations)
    finally:
        prism_loops.pg.AsyncCoordinator = real  # type: ignore[misc]


def step_no_reclaim(ctx: Any, work: Work, iterations: int) -> float:
    eng = ctx.async_coordinator().engine
    eng._reclaim_at = 1 << 40
    try:
        return prism_loops.triple_buffered_step_loop(ctx, work, iterations)
    finally:
        eng._reclaim_at = 64


def main() -> int:
    iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    n = (165 << 20) // 4
    rng = np.random.default_rng(3)
    inputs = [rng.random(n, dtype=np.float32) for _ in range(3)]
    variants: Dict[str, Callable[[Any, Work, int], float]] = {
        "CuPy (as run.py runs it first)": lambda ctx, w, it: cupy_loop(w, it),
        "PyTorch": lambda ctx, w, it: torch_loop(w, it),
        "step": prism_loops.triple_buffered_step_loop,
        "pipeline (on the context's coordinator)": prism_loops.pipeline_loop,
        "step after the pipeline": prism_loops.triple_buffered_step_loop,
        "step, reclaim off": step_no_reclaim,
        "coordinator": prism_loops.coordinator_loop,
        "coordinator, timing on": coordinator_timed,
    }
    times: Dict[str, List[float]] = {k: [] for k in variants}
    with pg.ManagedGpuContext(backend="cuda") as ctx:
        for _ in range(rounds):
            for name, fn in variants.items():
                times[name].append(fn(ctx, Work(n, n, 3000.0, scale=True, inputs=inputs),
                                      iterations))
            measure_bandwidth(ctx.device, n * 4, 5)  # as run.py does between repeats
    for name, ts in times.items():
        print(f"{name:28s} median {statistics.median(ts):.3f} ms  all "
              + " ".join(f"{t:.3f}" for t in ts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
