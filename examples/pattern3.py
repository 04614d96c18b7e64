"""The guide's Pattern 3: custom event dependencies (fork, then join)."""

import numpy as np

import prism_gpu as pg

LOOP = "size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; if (i < n) "


def kernel(name: str, body: str, cpu):
    src = f'extern "C" __global__ void {name}(float* x, size_t n) {{ {LOOP} {body}; }}'
    return pg.Kernel.from_source(src, name, cpu=cpu)


with pg.ManagedGpuContext(backend="auto") as ctx:
    coord = ctx.async_coordinator()
    coord.register_kernel("kernel_a", kernel("add1", "x[i] += 1.0f",
                                             lambda x: np.add(x, np.float32(1), out=x)))
    coord.register_kernel("kernel_b", kernel("mul3", "x[i] *= 3.0f",
                                             lambda x: np.multiply(x, np.float32(3), out=x)))
    coord.register_kernel("merge", kernel("half", "x[i] *= 0.5f",
                                          lambda x: np.multiply(x, np.float32(0.5), out=x)))
    buf = ctx.create_triple_buffer(4096, dtype=np.float32)
    data = np.random.default_rng(1).random(4096, dtype=np.float32)

    upload_id = coord.queue_upload(data, buf)
    compute_a = coord.queue_compute("kernel_a", [upload_id])   # fork: both depend
    compute_b = coord.queue_compute("kernel_b", [upload_id])   # on the upload
    merged = coord.queue_compute("merge", [compute_a, compute_b])  # join
    out = np.empty_like(data)
    coord.queue_download(buf, out)
    coord.wait(merged)
    coord.synchronize_all()
    expected = (data + np.float32(1)) * np.float32(3) * np.float32(0.5)
    assert np.allclose(out, expected), "fork/join result"
    print("pattern 3:", ctx.backend, "ok")
