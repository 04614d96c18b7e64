"""The three-stage pipeline workload: the guide's Pattern 2 with real data.

Stages of about 1, 3 and 2 ms (each maps its input to its output exactly and
holds one block for the asked time), 2 ms copies each way. Measured through
``PipelineStageManager.run`` and ``execute_iteration(inputs=, outputs=)``
against a hand-written CuPy loop with one stream per stage and per copy and
events between them, and against the floor: the slowest stage or copy (both
copies together at the concurrent bidirectional bandwidth). Every output is
checked against numpy.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

import prism_gpu as pg

DEPTH = 3
STAGES = (("pre", 2.0, 1.0, 1.0), ("main", 0.5, -3.0, 3.0), ("post", 4.0, 2.0, 2.0))  # a, b, ms

SRC = r"""
extern "C" __global__ void spin_affine(const float* x, size_t n, float* y, size_t m, float a,
                                       float b, double us) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    size_t k = n < m ? n : m;
    size_t stride = (size_t)blockDim.x * gridDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < k; i += stride)
        y[i] = a * x[i] + b;
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        unsigned long long ns = (unsigned long long)(us * 1000.0);
        do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now)); } while (now - start < ns);
    }
}
"""


def _grid(n: int) -> int:
    return max(1, min(-(-n // 256), 132 * 8))


def expected(x: np.ndarray) -> np.ndarray:
    y = x
    for _, a, b, _ms in STAGES:
        y = y * np.float32(a) + np.float32(b)  # powers of two: exact whatever is fused
    return y


def _cpu(x: np.ndarray, y: np.ndarray, a: float, b: float, us: float) -> None:
    np.multiply(x, np.float32(a), out=y)
    y += np.float32(b)
    time.sleep(us * 1e-6)


def _pipe(ctx: Any, n: int) -> Tuple[pg.PipelineStageManager, List[int]]:
    pipe = ctx.create_pipeline_manager(depth=DEPTH)
    pipe.coordinator().register_kernel("spin_affine", pg.Kernel.from_source(
        SRC, "spin_affine", cpu=_cpu, config=pg.LaunchConfig(grid=_grid(n), block=256)))
    bufs = [pipe.add_buffer(n) for _ in range(4)]
    for i, (name, a, b, ms) in enumerate(STAGES):
        pipe.add_stage(pg.GpuPipelineStage(name, [bufs[i]], [bufs[i + 1]],
                                           kernel="spin_affine", extra=(a, b, ms * 1e3)))
    return pipe, bufs


def prism_run(ctx: Any, xs: List[np.ndarray], iterations: int) -> Tuple[float, List[Any]]:
    """PipelineStageManager.run over pinned batches; steady-state time per batch."""
    pipe, bufs = _pipe(ctx, xs[0].size)
    total = 2 * DEPTH + iterations
    kept: List[Tuple[int, np.ndarray]] = []
    t0 = 0.0
    try:
        for i, y in enumerate(pipe.run((xs[i % len(xs)] for i in range(total)),
                                       input=bufs[0], output=bufs[3])):
            if i == 2 * DEPTH - 1:
                t0 = time.perf_counter()
            if i >= total - DEPTH:
                kept.append((i, y))  # held, not copied: the pool hands out other buffers
        end = time.perf_counter()
    finally:
        pipe.close()
    return (end - t0) * 1e3 / iterations, [(i, y.copy()) for i, y in kept]


def prism_iterations(ctx: Any, xs: List[np.ndarray], iterations: int
                     ) -> Tuple[float, List[Any]]:
    """execute_iteration(inputs=, outputs=) into a ring of pinned outputs."""
    pipe, bufs = _pipe(ctx, xs[0].size)
    outs = [pg.pinned_empty(xs[0].size, np.float32, ctx=ctx) for _ in range(DEPTH)]
    its: List[Any] = []

    def step(i: int) -> None:
        # like the hand-written loop: an output array is rewritten by a later download
        # on the same stream, read only at the end
        its.append(pipe.execute_iteration(inputs={bufs[0]: xs[i % len(xs)]},
                                          outputs={bufs[3]: outs[i % DEPTH]}))
        del its[:-DEPTH]

    try:
        for i in range(2 * DEPTH):
            step(i)
        t = time.perf_counter()
        last = 2 * DEPTH + iterations
        for i in range(2 * DEPTH, last):
            step(i)
        pipe.get_stats()  # waits for every queued iteration
        ms = (time.perf_counter() - t) * 1e3 / iterations
    finally:
        pipe.close()
    return ms, [(i, outs[i % DEPTH].copy()) for i in range(last - DEPTH, last)]


def cupy_streams(ctx: Any, xs: List[np.ndarray], iterations: int) -> Tuple[float, List[Any]]:
    """Hand-written CuPy: a stream per copy and per stage, a ring of DEPTH slots per
    buffer, events between them, non-blocking copies from and to pinned memory."""
    import cupy as cp
    import cupyx

    n = xs[0].size
    k = cp.RawKernel(SRC, "spin_affine")
    grid = _grid(n)
    streams = [cp.cuda.Stream(non_blocking=True) for _ in range(5)]  # up, 3 stages, down
    d = [[cp.empty(n, cp.float32) for _ in range(DEPTH)] for _ in range(4)]
    h_in = []
    for x in xs:
        h = cupyx.empty_pinned((n,), cp.float32)
        h[:] = x
        h_in.append(h)
    h_out = [cupyx.empty_pinned((n,), cp.float32) for _ in range(DEPTH)]
    ev = [[cp.cuda.Event(disable_timing=True) for _ in range(DEPTH)] for _ in range(5)]
    count = [0]

    def step(i: int) -> None:
        s = i % DEPTH
        reuse = count[0] >= DEPTH
        count[0] += 1
        up = streams[0]
        if reuse:
            up.wait_event(ev[1][s])           # stage 1 of iteration i - DEPTH read d[0][s]
        d[0][s].set(h_in[i % len(h_in)], stream=up)
        ev[0][s].record(up)
        for j, (_, a, b, ms) in enumerate(STAGES):
            st = streams[j + 1]
            st.wait_event(ev[j][s])          # its input is written
            if reuse:
                st.wait_event(ev[j + 2][s])  # its output slot was read by the next step
            k((grid,), (256,), (d[j][s].data.ptr, np.uint64(n), d[j + 1][s].data.ptr,
                                 np.uint64(n), np.float32(a), np.float32(b),
                                 np.float64(ms * 1e3)), stream=st)
            ev[j + 1][s].record(st)
        down = streams[4]
        down.wait_event(ev[3][s])
        d[3][s].get(out=h_out[s], stream=down, blocking=False)
        ev[4][s].record(down)

    def sync() -> None:
        for st in streams:
            st.synchronize()

    for i in range(2 * DEPTH):
        step(i)
    sync()
    t = time.perf_counter()
    last = 2 * DEPTH + iterations
    for i in range(2 * DEPTH, last):
        step(i)
    sync()
    ms = (time.perf_counter() - t) * 1e3 / iterations
    return ms, [(i, np.array(h_out[i % DEPTH])) for i in range(last - DEPTH, last)]


def stage_ms(n: int) -> Dict[str, float]:
    """Device time of each stage kernel alone (CuPy events, median of 10)."""
    import cupy as cp

    k = cp.RawKernel(SRC, "spin_affine")
    x, y = cp.ones(n, cp.float32), cp.empty(n, cp.float32)
    out = {}
    for name, a, b, ms in STAGES:
        times = []
        for _ in range(11):
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record()
            k((_grid(n),), (256,), (x.data.ptr, np.uint64(n), y.data.ptr, np.uint64(n),
                                    np.float32(a), np.float32(b), np.float64(ms * 1e3)))
            e1.record()
            e1.synchronize()
            times.append(cp.cuda.get_elapsed_time(e0, e1))
        out[name] = statistics.median(times[1:])
    return out


def pipeline(ctx: Any, bw: Any, measure_bandwidth: Callable[..., Any], iterations: int,
             repeats: int) -> Dict[str, Any]:
    n = int(2e-3 * min(bw.h2d, bw.d2h) * 1e9) // 4      # 2 ms copies each way
    nbytes = n * 4
    rng = np.random.default_rng(9)
    xs = []
    for _ in range(DEPTH + 1):
        h = pg.pinned_empty(n, np.float32, ctx=ctx)
        h[:] = rng.standard_normal(n).astype(np.float32)
        xs.append(h)
    variants = {"CuPy (hand-written, a stream per stage)": cupy_streams,
                "prism PipelineStageManager.run": prism_run,
                "prism execute_iteration(inputs=, outputs=)": prism_iterations}
    samples: Dict[str, List[float]] = {v: [] for v in variants}
    ok = {v: True for v in variants}
    bws = [measure_bandwidth(ctx.device, nbytes, repeats=10)]
    for _ in range(repeats):
        for name, fn in variants.items():
            ms, kept = fn(ctx, xs, iterations)
            samples[name].append(ms)
            ok[name] = ok[name] and all(np.array_equal(y, expected(xs[i % len(xs)]))
                                        for i, y in kept)
        bws.append(measure_bandwidth(ctx.device, nbytes, 5))
    stages = stage_ms(n)
    best = max(bws, key=lambda b: b.bidirectional)
    terms = dict(stages)
    terms["upload"] = nbytes / max(b.h2d for b in bws) / 1e6
    terms["download"] = nbytes / max(b.d2h for b in bws) / 1e6
    terms["both copies"] = 2 * nbytes / best.bidirectional / 1e6
    floor = max(terms.values())
    rows = []
    peer = statistics.median(samples["CuPy (hand-written, a stream per stage)"])
    for name in variants:
        med = statistics.median(samples[name])
        rows.append({"name": name, "median": med, "min": min(samples[name]),
                     "max": max(samples[name]), "its": 1e3 / med, "verified": ok[name],
                     "vs_floor": med / floor, "vs_best_peer": med / peer})
        print(f"  {name:45s} {med:9.4f} ms verified={ok[name]}", flush=True)
    return {"workload": "pipeline 3 stages (1/3/2 ms, 2 ms copies)", "kind": "pipeline",
            "bytes_per_copy": nbytes, "iterations": iterations, "repeats": repeats,
            "floor_ms": floor, "floor_terms": terms, "bandwidth": best.as_dict(),
            "rows": rows,
            "note": "Three stages on their own streams fed with real data; the floor is "
                    "the slowest stage or copy (both copies at once at the bidirectional "
                    "bandwidth)."}
