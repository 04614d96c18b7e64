"""The guide's Pattern 2: a three-stage pipeline, fed with real data and checked against numpy.

Preprocess normalises each batch, MainCompute applies a 5-point moving sum, Postprocess
clips it. The stages run on their own streams: batch k's MainCompute overlaps batch
k+1's Preprocess and batch k-1's Postprocess, and the copies overlap all of them.
"""

import numpy as np

import prism_gpu as pg

N = 1 << 16
LOOP = ("size_t stride = (size_t)blockDim.x * gridDim.x; "
        "for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)")

PRE = f"""extern "C" __global__ void pre(const float* x, size_t n, float* y, size_t m) {{
    {LOOP} y[i] = x[i] * 2.0f - 1.0f; }}"""
MAIN = f"""extern "C" __global__ void main_(const float* x, size_t n, float* y, size_t m) {{
    {LOOP} {{ float s = 0.0f;
        for (int d = -2; d <= 2; ++d) {{ long j = (long)i + d; if (j >= 0 && j < (long)n) s += x[j]; }}
        y[i] = s; }} }}"""
POST = f"""extern "C" __global__ void post(const float* x, size_t n, float* y, size_t m) {{
    {LOOP} y[i] = fminf(fmaxf(x[i], -2.0f), 2.0f); }}"""


def pre_np(x, y):
    np.subtract(x * np.float32(2), np.float32(1), out=y[: len(x)])


def main_np(x, y):
    n = len(x)
    s = np.zeros(n, np.float32)
    for d in (-2, -1, 0, 1, 2):   # the same order of additions as the kernel
        lo, hi = max(0, -d), min(n, n - d)
        s[lo:hi] += x[lo + d:hi + d]
    y[:n] = s


def post_np(x, y):
    np.clip(x, np.float32(-2), np.float32(2), out=y[: len(x)])


def reference(x):
    a, b, c = (np.empty_like(x) for _ in range(3))
    pre_np(x, a)
    main_np(a, b)
    post_np(b, c)
    return c


with pg.ManagedGpuContext(backend="auto") as ctx:
    pipe = ctx.create_pipeline_manager()
    coord = pipe.coordinator()
    for name, src, entry, cpu in (("pre", PRE, "pre", pre_np), ("main", MAIN, "main_", main_np),
                                  ("post", POST, "post", post_np)):
        coord.register_kernel(name, pg.Kernel.from_source(src, entry, cpu=cpu))
    b_in, b_pre, b_main, b_out = (pipe.add_buffer(N) for _ in range(4))
    pipe.add_stage(pg.GpuPipelineStage("Preprocess", [b_in], [b_pre], kernel="pre"))
    pipe.add_stage(pg.GpuPipelineStage("MainCompute", [b_pre], [b_main], kernel="main"))
    pipe.add_stage(pg.GpuPipelineStage("Postprocess", [b_main], [b_out], kernel="post"))

    rng = np.random.default_rng(7)
    batches = [rng.random(N, dtype=np.float32) for _ in range(40)] + \
        [rng.random(N // 3, dtype=np.float32)]          # a short last batch
    for x, y in zip(batches, pipe.run(batches, input=b_in, output=b_out)):
        assert np.array_equal(y, reference(x)), "pipeline result differs from numpy"
    stats = pipe.get_stats()
    slowest = max(stats.stage_ms, key=stats.stage_ms.get)
    print(f"pattern 2: {ctx.backend} ok: {stats.iterations} iterations, "
          f"{stats.avg_iteration_ms:.3f} ms each, bound by {slowest}")
