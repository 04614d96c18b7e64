"""Soak on the GPU: 100k Pattern-1 iterations with a source kernel and 20k with a PyTorch
callable (the native driver calls and the CuPy/PyTorch stream switches), watching resident
memory and threads, checking the last result against numpy and that torch's stream is put
back. Usage: python scripts/soak_gpu.py (CuPy and PyTorch installed)."""

import os
import sys
import time

import cupy  # noqa: F401 - imported: its stream switch is entered too
import numpy as np
import torch

import prism_gpu as pg


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def tadd(x, stream):
    torch.from_dlpack(x).add_(1.0)


def main() -> None:
    dev = pg.open_device("cuda")
    coord = pg.AsyncCoordinator(dev)
    n = 1 << 14
    buf = pg.TripleBuffer(dev, n)
    h_in = pg.pinned_empty(n, np.float32)
    h_in[:] = np.random.default_rng(0).random(n, dtype=np.float32)
    h_out = pg.pinned_empty(n, np.float32)

    def step(k, extra):
        u = coord.queue_upload(h_in, buf)
        coord.queue_compute(k, [u], extra=extra)
        d = coord.queue_download(buf, h_out)
        buf.advance()
        return d

    phases = (("source kernel", "scale", (2.0,), 100_000),
              ("torch callable", pg.Kernel.from_callable(tadd), None, 20_000))
    for phase, k, extra, count in phases:
        for _ in range(2000):
            step(k, extra)
        coord.synchronize_all()
        r0, t0 = rss_mb(), threads()
        t = time.perf_counter()
        for _ in range(count - 1):
            step(k, extra)
        coord.synchronize_all()
        per = (time.perf_counter() - t) / (count - 1) * 1e6
        h_out.fill(np.nan)  # the last result must land for the check to pass
        coord.wait(step(k, extra))
        expect = h_in * np.float32(2) if extra else h_in + np.float32(1)
        print(f"{phase}: {count} iterations {per:.1f} us each, RSS {r0:.0f} -> {rss_mb():.0f} "
              f"MB, threads {t0} -> {threads()}, result ok {np.allclose(h_out, expect)}")
    s = coord.compute_stream()
    switches = [c for c in s.interop_contexts(sys.modules) if type(c).__name__ == "TorchCurrent"]
    print("torch switch stack left:", [len(getattr(x._local, "saved", [])) for x in switches])
    print("torch current stream restored:",
          torch.cuda.current_stream().cuda_stream == torch.cuda.default_stream().cuda_stream)
    coord.close()
    dev.close()


if __name__ == "__main__":
    main()
