"""Interleaved A/B of the host copies behind ``stream_map(out=)`` on pageable data.

Variants run in turn (shuffled), round after round, so drift of the machine (host memory
bandwidth varies from run to run on shared hosts) falls on all of them alike:
native copy threads or Python workers, how many, piece size, non-temporal
stores or memmove, against the threaded hand-written CuPy loops and the
host-copy floor (the faster of ``data_path.host_copies`` and
``host_copies_streaming``, 16 threads). Every output is checked. Run on a
CUDA machine:

    python benchmarks/copy_ab.py [--rounds 6] [--mib 4,16]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
from typing import Any, Callable, Dict, List

import numpy as np

import data_path as dp
import prism_gpu as pg
import prism_loops
from prism_gpu import _staging


SETTINGS = ("NATIVE_WORKERS", "NATIVE_CHUNK", "NATIVE_STREAM", "URGENT_RESULTS")


def _prism(ctx: Any, d: dp.Data, kernel: Any, native: bool, prefetch: int = 4,
           **settings: Any) -> Callable[[], float]:
    def run() -> float:
        os.environ["PRISM_GPU_NATIVE_COPY"] = "1" if native else "0"
        for k, v in settings.items():
            setattr(_staging.Stager, k, v)
        return dp.prism_out(ctx, d, kernel, d.src, d.dst, prefetch=prefetch)
    return run


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--mib", default="4,16")
    args = ap.parse_args()
    defaults = {k: getattr(_staging.Stager, k) for k in SETTINGS}
    ctx = pg.ManagedGpuContext(backend="cuda")
    try:
        for mib in (int(m) for m in args.mib.split(",")):
            d = dp.Data(mib)
            k = prism_loops.kernel(d.n)
            variants: Dict[str, Callable[[], float]] = {
                f"prism native, {w} threads, stream {st}, prefetch {pf}":
                    _prism(ctx, d, k, True, pf, NATIVE_WORKERS=w, NATIVE_CHUNK=256 << 10,
                           NATIVE_STREAM=st, URGENT_RESULTS=True)
                for w, st, pf in ((16, False, 8), (16, True, 8), (16, True, 6),
                                  (16, True, 4), (15, True, 4))}
            variants["prism Python workers"] = _prism(ctx, d, k, False, **defaults)
            variants["CuPy threaded, 8 threads"] = lambda: dp.cupy_threaded(d, 8)
            variants["CuPy threaded, 16 threads"] = lambda: dp.cupy_threaded(d, 16)
            secs: Dict[str, List[float]] = {name: [] for name in variants}
            host: List[float] = []
            for rnd in range(args.rounds + 1):   # the first round warms up
                host.append(min(dp.host_copies(d, 16), dp.host_copies_streaming(d, 16)))
                order = list(variants.items())
                random.Random(rnd).shuffle(order)  # no variant always runs first
                for name, fn in order:
                    d.dst.fill(np.nan)
                    s = fn()
                    if not d.check(d.dst):
                        raise AssertionError(f"{name}: wrong output")
                    if rnd:
                        secs[name].append(s)
            floor = min(host[1:])
            print(f"--- {mib} MiB batches, 1 GiB: host-copy floor {d.gb / floor:.2f} GB/s")
            for name, v in secs.items():
                m = statistics.median(v)
                print(f"{name:48s} {d.gb / m:6.2f} GB/s (best {d.gb / min(v):6.2f}), "
                      f"{m / floor:.3f}x the floor's time", flush=True)
    finally:
        for key, v in defaults.items():
            setattr(_staging.Stager, key, v)
        os.environ.pop("PRISM_GPU_NATIVE_COPY", None)
        ctx.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
