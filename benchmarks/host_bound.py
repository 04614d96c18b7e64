"""Is the tiny workload bound by the host or by the GPU? For hand-written CuPy and the
prism-gpu coordinator: the steady rate of the benchmark loop, and the host time of
queuing 300 iterations without waiting (below the coordinator's throttle, the GPU
idle at the start). Where the two agree, the host is the bound. Also the raw
cuda.core calls of the same iteration, queued the same way. Run on a CUDA machine:

    python benchmarks/host_bound.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, Tuple

sys.path.insert(0, os.path.dirname(__file__))

import host_overhead  # noqa: E402
import prism_loops  # noqa: E402
import run  # noqa: E402

import prism_gpu as pg  # noqa: E402
from prism_gpu.bench import _peers_cuda as peers  # noqa: E402

N = (64 << 10) // 4


def host_only(step: Callable[[int], None], sync: Callable[[], None], iters: int = 300,
              repeats: int = 9) -> Tuple[float, float]:
    """(min, median) us per iteration of queuing ``iters`` iterations from an idle GPU."""
    out = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        for i in range(iters):
            step(i)
        out.append((time.perf_counter() - t) / iters * 1e6)
        sync()
    return min(out), statistics.median(out)


def _cupy_step(spin_us: float) -> Tuple[Callable[[int], None], Callable[[], None]]:
    """The hand-written CuPy loop's own step and sync (its timer swapped for a grab)."""
    grabbed: Dict[str, Any] = {}

    def grab(step: Callable[[int], None], sync: Callable[[], None], iterations: int) -> float:
        grabbed["step"], grabbed["sync"] = step, sync
        return 0.0
    timer, peers._time = peers._time, grab
    try:
        peers.cupy_loop(peers.Work(N, N, spin_us, scale=True, inputs=run._inputs(N, 1)), 1)
    finally:
        peers._time = timer
    return grabbed["step"], grabbed["sync"]


def main() -> int:
    ctx = pg.ManagedGpuContext(backend="cuda")
    work = lambda: peers.Work(N, N, 10.0, scale=True, inputs=run._inputs(N, 1))  # noqa: E731
    cupy = min(peers.cupy_loop(work(), 3000) for _ in range(3)) * 1e3
    print(f"CuPy, 10 us kernel: steady {cupy:.1f} us/iteration; queuing alone "
          f"(min, median) {host_only(*_cupy_step(10.0))}", flush=True)
    coord_ms = min(prism_loops.coordinator_loop(ctx, work(), 3000) for _ in range(3)) * 1e3
    coord, buf, h_in, h_out, _ = host_overhead.pattern1(ctx.device, "k")
    coord.register_kernel("k", prism_loops.kernel(N))

    def step(i: int) -> None:
        u = coord.queue_upload(h_in, buf)
        coord.queue_compute("k", [u], extra=(10.0,))
        coord.queue_download(buf, h_out)
        buf.advance()
    print(f"prism coordinator, 10 us kernel: steady {coord_ms:.1f} us/iteration; queuing "
          f"alone {host_only(step, coord.synchronize_all)}", flush=True)
    parts = host_overhead._raw_parts()
    print("raw cuda.core calls, no-op kernel: queuing alone",
          host_only(host_overhead._raw_step(parts), host_overhead._raw_sync(parts)), flush=True)
    coord.close()
    ctx.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
