"""Soak on the GPU: 100k Pattern-1 iterations with a source kernel and 20k with a PyTorch
callable (the native driver calls and the CuPy/PyTorch stream switches), watching resident
memory and threads, checking the last result against numpy and that torch's stream is put
back. Usage: python scripts/soak_gpu.py (CuPy and PyTorch installed)."""
import os
import sys
import time
import numpy as np
import torch
import cupy  # noqa: F401 - imported: its stream switch is entered too
import prism_gpu as pg

def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
def threads():
    return len(os.listdir("/proc/self/task"))

dev = pg.open_device("cuda")
coord = pg.AsyncCoordinator(dev)
N = 1 << 14
buf = pg.TripleBuffer(dev, N)
h_in = pg.pinned_empty(N, np.float32); h_in[:] = np.random.default_rng(0).random(N, dtype=np.float32)
h_out = pg.pinned_empty(N, np.float32)
def step(k, extra=None):
    u = coord.queue_upload(h_in, buf)
    coord.queue_compute(k, [u], extra=extra)
    d = coord.queue_download(buf, h_out)
    buf.advance()
    return d
def tadd(x, stream):
    t = torch.from_dlpack(x); t.add_(1.0)
for phase, k, extra, n in (("source kernel", "scale", (2.0,), 100_000), ("torch callable", pg.Kernel.from_callable(tadd), None, 20_000)):
    for i in range(2000): step(k, extra)
    coord.synchronize_all()
    r0, t0 = rss_mb(), threads()
    t = time.perf_counter()
    for i in range(n):
        d = step(k, extra)
    coord.wait(d)
    coord.synchronize_all()
    dt = time.perf_counter() - t
    expect = h_in * np.float32(2) if extra else h_in + np.float32(1)
    ok = np.allclose(h_out, expect)
    print(f"{phase}: {n} iterations {dt / n * 1e6:.1f} us each, RSS {r0:.0f} -> {rss_mb():.0f} MB, threads {t0} -> {threads()}, result ok {ok}")
s = coord.compute_stream()
sw = [c for c in s.interop_contexts(sys.modules) if type(c).__name__ == "TorchCurrent"]
print("torch switch stack left:", [len(getattr(x._local, "saved", [])) for x in sw])
print("torch current stream restored:", torch.cuda.current_stream().cuda_stream == torch.cuda.default_stream().cuda_stream)
coord.close(); dev.close()
