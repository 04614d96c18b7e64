"""A/B: kernel launches packed in C (the _launch module of this commit) vs cuda.core's launch, on the tiny workload, interleaved. Run on a CUDA machine: python benchmarks/launch_ab.py"""
import os, sys, statistics, time
import numpy as np
sys.path.insert(0, "benchmarks")
import prism_gpu as pg
import prism_loops, run
from prism_gpu.bench._peers_cuda import Work

n = (64 << 10) // 4
ctxs = {}
for native in ("1", "0"):
    os.environ["PRISM_GPU_NATIVE_LAUNCH"] = native
    ctxs[native] = pg.ManagedGpuContext(backend="cuda")
res = {}
loops = {"coordinator": prism_loops.coordinator_loop, "stream_map": prism_loops.stream_map_loop,
         "step": prism_loops.triple_buffered_step_loop}
for r in range(6):
    for native in (("1", "0") if r % 2 == 0 else ("0", "1")):
        for name, fn in loops.items():
            w = Work(n, n, 10.0, scale=True, inputs=run._inputs(n, 1))
            res.setdefault((name, native), []).append(fn(ctxs[native], w, 2000) * 1e3)
for (name, native), v in sorted(res.items()):
    print(f"{name:12s} native_launch={native}: median {statistics.median(v):6.1f} us/iteration  {[round(x, 1) for x in v]}")
