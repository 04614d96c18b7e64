"""A short Pattern 1 and a pipeline, for compute-sanitizer (memcheck, racecheck, synccheck)."""

import numpy as np

import prism_gpu as pg

AXPY = r"""
extern "C" __global__ void axpy(float* x, size_t n, float a) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = a * x[i] + 1.0f;
}
"""
COPY2 = r"""
extern "C" __global__ void twice(const float* x, size_t n, float* y, size_t m) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n && i < m) y[i] = 2.0f * x[i];
}
"""
FILL = r"""
extern "C" __global__ void fill(float* y, size_t n, float v) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = v + (float)i;
}
"""

rng = np.random.default_rng(0)
with pg.ManagedGpuContext(backend="cuda") as ctx:
    coord = ctx.async_coordinator()
    coord.register_kernel("axpy", pg.Kernel.from_source(AXPY, "axpy"))
    buf = ctx.create_triple_buffer(10_001)
    pinned_out = pg.pinned_empty(10_001, np.float32, ctx=ctx)
    for i in range(12):
        x = rng.random(10_001 - (i % 3) * 7, dtype=np.float32)   # short batches too
        out = pinned_out[: x.size] if i % 2 else np.empty_like(x)  # pinned and pageable
        up = coord.queue_upload(x, buf)
        coord.queue_compute("axpy", [up], extra=(3.0,))
        coord.wait(coord.queue_download(buf, out))
        buf.advance()
        assert np.allclose(out, 3 * x + 1), i

    pipe = ctx.create_pipeline_manager()
    pc = pipe.coordinator()
    pc.register_kernel("fill", pg.Kernel.from_source(FILL, "fill"))
    pc.register_kernel("twice", pg.Kernel.from_source(COPY2, "twice"))
    b0, b1 = pipe.add_buffer(4096), pipe.add_buffer(4096)
    s0 = pipe.add_stage(pg.GpuPipelineStage("fill", [], [b0], extra=(5.0,)))
    s1 = pipe.add_stage(pg.GpuPipelineStage("twice", [b0], [b1]))
    pipe.set_order([s0, s1])
    for _ in range(20):
        pipe.execute_iteration()
    stats = pipe.get_stats()
    assert stats.iterations == 20
print("sanitize run ok")
