"""How many native copy threads a stream_map should start: pageable ``out=`` batches of 4
and 16 MiB (1 GiB), each thread count in turn per round, medians of the rounds after the
first, against the streaming host-copy floor on 16 threads. Run on a CUDA machine:

    python benchmarks/copy_threads.py 16,14,12 ROUNDS
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any, Dict, List

import numpy as np

import data_path as dp
import prism_gpu as pg
import prism_loops
from prism_gpu import _staging


def _run(ctx: Any, d: Any, k: Any) -> float:
    t = time.perf_counter()
    for _ in pg.stream_map(k, d.batches(), ctx=ctx, extra=(0.0,), out=d.dst):
        pass
    return time.perf_counter() - t


def main() -> int:
    counts = tuple(int(x) for x in sys.argv[1].split(","))
    rounds = int(sys.argv[2])
    ctx = pg.ManagedGpuContext(backend="cuda")
    print("cores", os.cpu_count(), "affinity", len(os.sched_getaffinity(0)))
    for mib in (4, 16):
        d = dp.Data(mib)
        k = prism_loops.kernel(d.n)
        res: Dict[int, List[float]] = {w: [] for w in counts}
        host = []
        for rnd in range(rounds):
            host.append(dp.host_copies_streaming(d, 16))
            for w in counts:
                _staging.Stager.NATIVE_WORKERS = w
                _staging.Stager.FREE_CORES = 0
                d.dst.fill(np.nan)
                s = _run(ctx, d, k)
                assert d.check(d.dst), w
                if rnd:
                    res[w].append(s)
        floor = min(host[1:])
        print(f"--- {mib} MiB host-copy floor {d.gb / floor:.2f} GB/s", flush=True)
        for w, v in res.items():
            m = statistics.median(v)
            print(f"threads {w:2d}: {d.gb / m:6.2f} GB/s median (best {d.gb / min(v):6.2f}, "
                  f"worst {d.gb / max(v):6.2f}) vs floor {m / floor:.3f}", flush=True)
    ctx.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
