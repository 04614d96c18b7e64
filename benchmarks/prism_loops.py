"""The benchmark workload through each prism-gpu API.

Every loop runs ``spin_scale`` in place on each batch (doubles it while the
device spins for the asked compute time) and keeps its last outputs, which the
runner checks against numpy.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List

import numpy as np

import prism_gpu as pg
from prism_gpu.bench._peers_cuda import DEPTH, SPIN_SCALE_SOURCE, Work, spin_scale_grid


def variants(ctx: Any) -> Dict[str, Callable[[Work, int], float]]:
    """Every prism-gpu API as a benchmark variant on ``ctx``."""
    return {
        "prism AsyncCoordinator": lambda w, it: coordinator_loop(ctx, w, it),
        "prism AsyncCoordinator, CuPy callable": lambda w, it: coordinator_loop(
            ctx, w, it, with_cupy=True),
        "prism PipelineStageManager": lambda w, it: pipeline_loop(ctx, w, it),
        "prism stream_map": lambda w, it: stream_map_loop(ctx, w, it),
        "prism triple_buffered_step": lambda w, it: triple_buffered_step_loop(ctx, w, it),
    }


def tiny_variants(ctx: Any) -> Dict[str, Callable[[Work, int], float]]:
    """More ways through the API for the tiny workload, where host cost is the figure: the
    coordinator timing every op (as the pipeline's does), a pipeline whose copy stages
    are Python callables (each runs with the stage's stream made current in CuPy and
    PyTorch), the pipeline timing every op (timing_sample=1), and the step on a context
    that times every op (for its telemetry's times)."""
    return {
        "prism AsyncCoordinator, timing=True": lambda w, it: coordinator_loop(
            ctx, w, it, timing=True),
        "prism PipelineStageManager, timing_sample=1": lambda w, it: pipeline_loop(
            ctx, w, it, timing_sample=1),
        "prism PipelineStageManager, callable copies": lambda w, it: pipeline_callables_loop(
            ctx, w, it),
        "prism triple_buffered_step, timing=True": lambda w, it: timed_step_loop(
            ctx, w, it),
    }


def kernel(n: int) -> pg.Kernel:
    return pg.Kernel.from_source(SPIN_SCALE_SOURCE, "spin_scale",
                                 config=pg.LaunchConfig(grid=spin_scale_grid(n), block=256),
                                 cpu=_spin_scale_cpu)


SPIN_SCALE2_SOURCE = r"""
extern "C" __global__ void spin_scale2(const float* x, size_t n, float* y, size_t m, double us) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    size_t stride = (size_t)blockDim.x * gridDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        y[i] = 2.0f * x[i];
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        unsigned long long ns = (unsigned long long)(us * 1000.0);
        do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now)); } while (now - start < ns);
    }
}
"""


def _spin_scale2_cpu(x: np.ndarray, y: np.ndarray, us: float) -> None:
    np.multiply(x, np.float32(2), out=y)
    time.sleep(us * 1e-6)


def _spin_scale_cpu(x: np.ndarray, us: float) -> None:
    x *= np.float32(2)
    time.sleep(us * 1e-6)


def _timed(step: Callable[[int], None], sync: Callable[[], None], iterations: int) -> float:
    for i in range(2 * DEPTH):
        step(i)
    sync()
    t = time.perf_counter()
    for i in range(2 * DEPTH, 2 * DEPTH + iterations):
        step(i)
    sync()
    return (time.perf_counter() - t) * 1e3 / iterations


def _pinned_inputs(work: Work, ctx: Any) -> List[np.ndarray]:
    out = []
    for x in work.inputs:
        h = pg.pinned_empty(work.n_up, np.float32, ctx=ctx)
        h[:] = x
        out.append(h)
    return out


def cupy_callable(n: int) -> pg.Kernel:
    """spin_scale as a Python callable written with CuPy: it runs on the host at queue
    time with the compute stream current, so it must overlap like the C++ kernel."""
    import cupy as cp

    raw = cp.RawKernel(SPIN_SCALE_SOURCE, "spin_scale")
    grid = spin_scale_grid(n)

    def spin_scale(x: Any, us: float) -> None:
        a = cp.asarray(x)  # __cuda_array_interface__: no copy, no synchronization
        raw((grid,), (256,), (a, np.uint64(a.size), np.float64(us)))  # current stream
    return pg.Kernel.from_callable(spin_scale)


def coordinator_loop(ctx: Any, work: Work, iterations: int, with_cupy: bool = False,
                     timing: bool = False) -> float:
    """Pattern 1: queue_upload / queue_compute / queue_download / advance."""
    coord = pg.AsyncCoordinator(ctx.device, timing=timing)
    try:
        coord.register_kernel("spin_scale",
                              cupy_callable(work.n_up) if with_cupy else kernel(work.n_up))
        buf = pg.TripleBuffer(ctx.device, work.n_up)
        h_in = _pinned_inputs(work, ctx)
        h_out = [pg.pinned_empty(work.n_up, np.float32, ctx=ctx) for _ in range(DEPTH)]
        us = (work.spin_us,)

        def step(i: int) -> None:
            up = coord.queue_upload(h_in[i % len(h_in)], buf)
            coord.queue_compute("spin_scale", [up], extra=us)
            coord.queue_download(buf, h_out[i % DEPTH])
            buf.advance()

        ms = _timed(step, coord.synchronize_all, iterations)
        last = 2 * DEPTH + iterations
        work.outputs = [h_out[i % DEPTH].copy() for i in range(last - DEPTH, last)]
        return ms
    finally:
        coord.close()


def triple_buffered_step_loop(ctx: Any, work: Work, iterations: int) -> float:
    """ManagedGpuContext.triple_buffered_step, one call per batch."""
    coord = ctx.async_coordinator()
    k = kernel(work.n_up)
    coord.register_kernel("spin_scale_step", k)
    h_in = _pinned_inputs(work, ctx)
    h_out = [pg.pinned_empty(work.n_up, np.float32, ctx=ctx) for _ in range(DEPTH)]
    us = (work.spin_us,)

    def step(i: int) -> None:
        ctx.triple_buffered_step(pg.StepConfig(kernel="spin_scale_step", input=h_in[i % len(h_in)],
                                               output=h_out[i % DEPTH], extra=us))

    ms = _timed(step, coord.synchronize_all, iterations)
    coord.poll()
    last = 2 * DEPTH + iterations
    work.outputs = [h_out[i % DEPTH].copy() for i in range(last - DEPTH, last)]
    return ms


def timed_step_loop(ctx: Any, work: Work, iterations: int) -> float:
    """triple_buffered_step on a context of the same device made with timing=True."""
    with pg.ManagedGpuContext(device=ctx.device.ordinal, backend=ctx.backend,
                              timing=True) as own:
        return triple_buffered_step_loop(own, work, iterations)


def pipeline_loop(ctx: Any, work: Work, iterations: int, timing_sample: int = 8) -> float:
    """PipelineStageManager fed by execute_iteration(inputs=, outputs=): the pipeline's
    upload, its compute stage and its download, each on its own stream."""
    pipe = ctx.create_pipeline_manager(timing_sample=timing_sample)
    pipe.coordinator().register_kernel("spin_scale2", pg.Kernel.from_source(
        SPIN_SCALE2_SOURCE, "spin_scale2", cpu=_spin_scale2_cpu,
        config=pg.LaunchConfig(grid=spin_scale_grid(work.n_up), block=256)))
    h_in = _pinned_inputs(work, ctx)
    h_out = [pg.pinned_empty(work.n_up, np.float32, ctx=ctx) for _ in range(DEPTH)]
    b0 = pipe.add_buffer(work.n_up)
    b1 = pipe.add_buffer(work.n_up)
    pipe.add_stage(pg.GpuPipelineStage("compute", [b0], [b1], kernel="spin_scale2",
                                       extra=(work.spin_us,)))

    def step(i: int) -> None:
        # an output array is rewritten by a later download on the same stream, read at
        # the end (as the hand-written loops do)
        pipe.execute_iteration(inputs={b0: h_in[i % len(h_in)]},
                               outputs={b1: h_out[i % DEPTH]})

    try:
        ms = _timed(step, pipe.get_stats, iterations)
    finally:
        pipe.close()
    last = 2 * DEPTH + iterations
    work.outputs = [h_out[i % DEPTH].copy() for i in range(last - DEPTH, last)]
    return ms


def pipeline_callables_loop(ctx: Any, work: Work, iterations: int) -> float:
    """PipelineStageManager: H2D, compute and D2H stages on their own streams, the copy
    stages Python callables."""
    pipe = ctx.create_pipeline_manager()
    coord = pipe.coordinator()
    h_in = _pinned_inputs(work, ctx)
    h_out = [pg.pinned_empty(work.n_up, np.float32, ctx=ctx) for _ in range(DEPTH)]
    counters = {"h2d": 0, "d2h": 0}

    def h2d(slot: Any, stream: Any) -> None:
        i = counters["h2d"]
        counters["h2d"] += 1
        stream.copy_h2d(slot, h_in[i % len(h_in)])

    def d2h(slot: Any, stream: Any) -> None:
        i = counters["d2h"]
        counters["d2h"] += 1
        stream.copy_d2h(h_out[i % DEPTH], slot)

    coord.register_kernel("h2d", pg.Kernel.from_callable(h2d))
    coord.register_kernel("spin_scale2", pg.Kernel.from_source(
        SPIN_SCALE2_SOURCE, "spin_scale2", cpu=_spin_scale2_cpu,
        config=pg.LaunchConfig(grid=spin_scale_grid(work.n_up), block=256)))
    coord.register_kernel("d2h", pg.Kernel.from_callable(d2h))
    b0 = pipe.add_buffer(work.n_up)
    b1 = pipe.add_buffer(work.n_up)
    s0 = pipe.add_stage(pg.GpuPipelineStage("h2d", [], [b0]))
    s1 = pipe.add_stage(pg.GpuPipelineStage("compute", [b0], [b1], kernel="spin_scale2",
                                            extra=(work.spin_us,)))
    s2 = pipe.add_stage(pg.GpuPipelineStage("d2h", [b1], []))
    pipe.set_order([s0, s1, s2])

    def sync() -> None:
        pipe.get_stats()

    try:
        ms = _timed(lambda i: pipe.execute_iteration(), sync, iterations)
    finally:
        pipe.close()
    last = counters["d2h"]
    work.outputs = [h_out[i % DEPTH].copy() for i in range(last - DEPTH, last)]
    return ms


def stream_map_loop(ctx: Any, work: Work, iterations: int) -> float:
    """stream_map over pinned batches (pinned_empty), results from its pinned pool.

    Timed from the yield of the last warm-up result to the last result: the
    steady-state time per batch (stream_map has no separate queue and sync step).
    """
    h_in = _pinned_inputs(work, ctx)
    k = kernel(work.n_up)
    total = 2 * DEPTH + iterations
    kept: List[np.ndarray] = []
    t0 = 0.0
    batches = (h_in[i % len(h_in)] for i in range(total))
    for i, out in enumerate(pg.stream_map(k, batches, depth=DEPTH, ctx=ctx,
                                          extra=(work.spin_us,))):
        if i == 2 * DEPTH - 1:
            t0 = time.perf_counter()
        if i >= total - DEPTH:
            kept.append(out)  # held, not copied: the pool hands out other buffers meanwhile
    end = time.perf_counter()
    work.outputs = [o.copy() for o in kept]
    return (end - t0) * 1e3 / iterations
