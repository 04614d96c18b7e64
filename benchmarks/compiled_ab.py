"""The compiled parts against their Python references, on the same machine in turn:
host microseconds per Pattern-1 iteration of tiny batches (the coordinator's queue
calls, a no-op kernel), with the engine and queue calls compiled or not
(``PRISM_GPU_COMPILED``) and the CUDA backend's native calls and types on or not
(``PRISM_GPU_NATIVE_DRIVER``). Each variant runs in its own process (the switches are
read at import); the variants alternate, so a drift of the machine's speed falls on all.

    python benchmarks/compiled_ab.py [--backend cuda] [--rounds 7] [--iterations 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List

VARIANTS = {  # name -> (PRISM_GPU_COMPILED, PRISM_GPU_NATIVE_DRIVER)
    "compiled core, native calls": ("1", "1"),
    "Python core, native calls": ("0", "1"),
    "Python core, cuda.core calls": ("0", "0"),
}


def _measure(backend: str, iterations: int) -> float:
    """One process's figure: the best of 5 timed runs (us per iteration)."""
    import prism_gpu as pg
    from host_overhead import pattern1

    dev = pg.open_device(backend)
    coord, _, _, _, step = pattern1(dev, "noop")
    if backend == "cuda":
        coord.register_kernel("noop", pg.Kernel.from_source(
            'extern "C" __global__ void noop(float* a, size_t n) {}', "noop",
            config=pg.LaunchConfig(grid=1, block=1)))
    else:
        coord.register_kernel("noop", lambda a: None)
    for i in range(300):
        step(i)
    coord.synchronize_all()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for i in range(iterations):
            step(i)
        best = min(best, (time.perf_counter() - t) / iterations * 1e6)
        coord.synchronize_all()
    coord.close()
    return best


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(_measure(args.backend, args.iterations))
        return 0
    variants = dict(VARIANTS) if args.backend == "cuda" else {
        k: v for k, v in VARIANTS.items() if v[1] == "1"}
    got: Dict[str, List[float]] = {k: [] for k in variants}
    here = os.path.dirname(os.path.abspath(__file__))
    for _ in range(args.rounds):
        for name, (compiled, native) in variants.items():
            env = dict(os.environ, PRISM_GPU_COMPILED=compiled, PRISM_GPU_NATIVE_DRIVER=native,
                       PYTHONPATH=os.pathsep.join(filter(None, [here,
                                                                os.environ.get("PYTHONPATH")])))
            out = subprocess.run([sys.executable, __file__, "--child", "--backend",
                                  args.backend, "--iterations", str(args.iterations)],
                                 env=env, capture_output=True, text=True, check=True)
            got[name].append(float(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({name: {"median_us_per_iteration": statistics.median(v),
                             "min": min(v), "max": max(v)} for name, v in got.items()},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
