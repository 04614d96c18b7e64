"""Where a client's host time goes on the GPU: cProfile of the tiny workload's loop for
the coordinator, triple_buffered_step, stream_map and the pipeline (64 KiB batches, the
benchmark's spin_scale kernel at 10 us), the top functions by own time. Run on a CUDA
machine: python benchmarks/client_profile.py [iterations]"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time

import prism_loops
from prism_gpu.bench._peers_cuda import Work

import numpy as np
import prism_gpu as pg


def main() -> int:
    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 1500
    ctx = pg.ManagedGpuContext(backend="cuda")
    n = (64 << 10) // 4
    rng = np.random.default_rng(1)
    variants = prism_loops.variants(ctx)
    for name in ("prism AsyncCoordinator", "prism triple_buffered_step", "prism stream_map",
                 "prism PipelineStageManager"):
        work = Work(n, n, 10.0, scale=True,
                    inputs=[rng.random(n, dtype=np.float32) for _ in range(3)])
        variants[name](work, iters)  # warm
        t = time.perf_counter()
        ms = variants[name](work, iters)
        wall = time.perf_counter() - t
        prof = cProfile.Profile()
        prof.enable()
        variants[name](work, iters)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
        print(f"## {name}: {ms * 1e3:.1f} us per iteration ({wall:.2f} s wall)")
        print("\n".join(out.getvalue().splitlines()[4:30]))
    ctx.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
