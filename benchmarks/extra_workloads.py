"""Host-bound tiny batches, pageable input, and the launch cost of the floor."""

from __future__ import annotations

import statistics
import time
import timeit
from typing import Any, Callable, Dict, List

import numpy as np

import prism_gpu as pg
from prism_gpu.bench._peers_cuda import DEPTH, SPIN_SCALE_SOURCE, Work, cupy_loop, torch_loop

import prism_loops


def launch_cost_us() -> float:
    """Host microseconds of one cuda.core launch of an empty kernel."""
    from cuda.core import Device, LaunchConfig, Program, ProgramOptions, launch

    dev = Device(0)
    dev.set_current()
    s = dev.create_stream()
    k = Program('extern "C" __global__ void noop() {}', "c++",
                ProgramOptions(arch=f"sm_{dev.arch}")).compile("cubin").get_kernel("noop")
    cfg = LaunchConfig(grid=1, block=1)
    t = min(timeit.repeat(lambda: launch(s, cfg, k), number=5000, repeat=3)) / 5000 * 1e6
    s.sync()
    s.close()
    return t


def tiny(ctx: Any, iterations: int, repeats: int, run_variants: Callable[..., Any],
         ratios: Callable[..., Any], inputs: Callable[[int, int], List[np.ndarray]],
         host_overhead: Any) -> Dict[str, Any]:
    n = (64 << 10) // 4
    us = 10.0
    variants = {
        "CuPy (hand-written)": cupy_loop,
        "PyTorch (hand-written)": torch_loop,
        **prism_loops.variants(ctx),
        **prism_loops.tiny_variants(ctx),
    }
    rows = run_variants(variants, lambda seed: Work(n, n, us, scale=True,
                                                    inputs=inputs(n, seed)), iterations, repeats)
    ratios(rows, None)
    raw: List[float] = []
    ours: List[float] = []
    for _ in range(5):  # in pairs, so that drift of the host's speed falls on both
        raw.append(host_overhead.raw_cuda_core(2000)["raw_cuda_core_us_per_iteration"])
        ours.append(host_overhead.prism(2000, False)["prism_us_per_iteration"])
    host = {"raw cuda.core calls, us per iteration": statistics.median(raw),
            "prism AsyncCoordinator, us per iteration": statistics.median(ours)}
    host["ratio"] = statistics.median(o / r for o, r in zip(ours, raw))
    return {"workload": "tiny (64 KiB batches, 10 us kernel)", "kind": "tiny",
            "iterations": iterations, "repeats": repeats, "rows": rows,
            "note": "Host-overhead bound: iterations/s is the figure. Below the table: "
                    "iterations/s as ratios within each repeat (a repeat runs every "
                    "variant in turn, so a drift of the host's speed falls on both sides "
                    "of a ratio; the median repeat's ratio), and host time per iteration "
                    "(upload + compute + download queued) vs the raw cuda.core calls of "
                    "the same loop, measured in the same run (five pairs; the ratio is "
                    "the median pair's):",
            "extra": {"iterations/s, paired within each repeat": json_line(paired(rows)),
                      "host overhead": json_line(host)}}


def paired(rows: List[Dict[str, Any]]) -> Dict[str, float]:
    """Iterations/s ratios within each repeat, the median repeat's: the coordinator's
    against hand-written CuPy's, and each other prism-gpu variant's against the
    coordinator's."""
    got = {r["name"]: r["samples"] for r in rows if r.get("samples")}
    coord, cupy = got.get("prism AsyncCoordinator"), got.get("CuPy (hand-written)")
    out: Dict[str, float] = {}
    if coord and cupy:
        out["prism AsyncCoordinator vs CuPy"] = statistics.median(
            p / c for p, c in zip(cupy, coord))
    for name, ms in got.items():
        if coord and name.startswith("prism") and name != "prism AsyncCoordinator":
            out[f"{name} vs the coordinator"] = statistics.median(
                c / v for c, v in zip(coord, ms))
    return out


def json_line(d: Dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in d.items())


def pageable(ctx: Any, batches: int, repeats: int) -> Dict[str, Any]:
    """64 MiB pageable numpy batches: stream_map vs the naive pageable CuPy loop."""
    import cupy as cp

    n = (64 << 20) // 4
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal(n).astype(np.float32) for _ in range(DEPTH)]
    expect = [x * np.float32(2) for x in xs]
    gb = n * 4 / 1e9
    k = prism_loops.kernel(n)
    raw_k = cp.RawKernel(SPIN_SCALE_SOURCE, "spin_scale")

    def naive() -> tuple:
        outs = []
        t = time.perf_counter()
        for i in range(batches):
            d = cp.asarray(xs[i % DEPTH])
            raw_k((1024,), (256,), (d.data.ptr, np.uint64(n), np.float64(0.0)))
            outs.append(d.get())
            outs = outs[-DEPTH:]
        dt = time.perf_counter() - t
        return batches * gb / dt, outs

    def h2d_only() -> tuple:
        t = time.perf_counter()
        for i in range(batches):
            cp.asarray(xs[i % DEPTH])
        cp.cuda.Device().synchronize()
        return batches * gb / (time.perf_counter() - t), None

    def ours() -> tuple:
        outs: List[np.ndarray] = []
        t = time.perf_counter()
        for out in pg.stream_map(k, (xs[i % DEPTH] for i in range(batches)), ctx=ctx,
                                 extra=(0.0,)):
            outs.append(out)
            outs = outs[-DEPTH:]
        dt = time.perf_counter() - t
        return batches * gb / dt, [o.copy() for o in outs]

    rows = []
    for name, fn in (("pageable H2D copies alone (cupy.asarray)", h2d_only),
                     ("naive pageable loop (CuPy asarray/get)", naive),
                     ("prism stream_map (pageable batches)", ours)):
        fn()  # warm-up
        samples, ok = [], True
        for _ in range(repeats):
            rate, outs = fn()
            samples.append(rate)
            if outs is not None:
                first = (batches - DEPTH) % DEPTH
                ok = ok and all(np.array_equal(o, expect[(first + m) % DEPTH])
                                for m, o in enumerate(outs))
        rows.append({"name": name, "median": statistics.median(samples), "min": min(samples),
                     "max": max(samples), "verified": ok, "its": 0.0})
        print(f"  {name:45s} {rows[-1]['median']:.2f} GB/s verified={ok}", flush=True)
    base = rows[1]["median"]
    for r in rows:
        r["vs_best_peer"] = r["median"] / base
    return {"workload": "pageable 64 MiB batches", "kind": "pageable", "unit": "GB/s",
            "iterations": batches, "repeats": repeats, "rows": rows,
            "note": "End-to-end GB/s of input processed (higher is better); 'vs best peer' "
                    "here is the ratio to the naive pageable loop."}
