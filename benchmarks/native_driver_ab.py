"""The native driver calls against cuda.core, interleaved in one process, and what a
callable kernel's CuPy/PyTorch stream switches cost. Run on a CUDA machine with CuPy and
PyTorch:

    python benchmarks/native_driver_ab.py [--rounds 9]

Part 1 switches the CUDA backend's driver calls between the native module and cuda.core /
cuda.bindings between rounds (the same switch ``PRISM_GPU_NATIVE_DRIVER=0`` makes at import),
timing a Pattern-1 loop of 64 KiB batches and one op's wait + copy + record, medians (min)
of the rounds in us. Part 2 times a callable kernel's launch and its parts, min of 5.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

import numpy as np

import prism_gpu as pg
from host_overhead import N, pattern1

INC = ('extern "C" __global__ void inc(float* x, size_t n) { size_t i = blockIdx.x * '
       'blockDim.x + threadIdx.x; if (i < n) x[i] += 1.0f; }')


def _per(fn: Callable[[int], None], sync: Callable[[], None], iters: int = 2000) -> float:
    t = time.perf_counter()
    for i in range(iters):
        fn(i)
    took = (time.perf_counter() - t) / iters * 1e6
    sync()
    return took


def ab(rounds: int) -> None:
    from prism_gpu.backends.cuda import _driver, _kernels, _stream

    native = dict(_memcpy=_stream._memcpy, _record=_stream._record, _wait=_stream._wait,
                  _query=_stream._query)
    if _driver.NATIVE is None:
        raise SystemExit("the native driver calls are not in use here")
    off = dict(_memcpy=_driver.bindings_memcpy, _record=None, _wait=None, _query=None)
    dev = pg.open_device("cuda")
    coord, buf, h_in, _, step = pattern1(dev, "inc", seed=1)
    coord.register_kernel("inc", pg.Kernel.from_source(INC, "inc",
                                                       config=pg.LaunchConfig(grid=64)))
    step(0)
    coord.synchronize_all()
    kernels = [o for o in gc.get_objects() if isinstance(o, _kernels.SourceKernel)]
    funcs = {id(k): k._func for k in kernels}

    def mode(on: bool) -> None:
        for name, value in (native if on else off).items():
            setattr(_stream, name, value)
        for k in kernels:
            k._func = funcs[id(k)] if on else 0
            k._configs.clear()

    s1, s2 = dev.create_stream(), dev.create_stream()
    other, mine = dev.create_event(), dev.create_event()
    s2.record(other)  # recorded on another stream: every wait below reaches the driver
    d = dev.allocate(N * 4).view(np.float32)

    def one_op(i: int) -> None:
        s1.wait(other)
        s1.copy_h2d(d, h_in)
        s1.record(mine)
    res: Dict[str, List[float]] = {}
    for r in range(rounds):
        for on in ((True, False) if r % 2 == 0 else (False, True)):  # neither always first
            mode(on)
            tag = "native" if on else "cuda.core"
            res.setdefault(f"{tag} Pattern-1 iteration", []).append(
                _per(step, coord.synchronize_all))
            res.setdefault(f"{tag} wait+copy+record", []).append(_per(one_op, s2.synchronize))
            s1.synchronize()
    mode(True)
    x = np.random.default_rng(2).random(N, dtype=np.float32)
    out = np.full(N, np.nan, np.float32)
    u = coord.queue_upload(x, buf)
    coord.queue_compute("inc", [u])
    coord.wait(coord.queue_download(buf, out))
    buf.advance()
    assert np.array_equal(out, x + np.float32(1)), "wrong result after switching back"
    for k, v in res.items():
        print(f"{k}: median {statistics.median(v):.2f} (min {min(v):.2f}) us")
    coord.close()
    dev.close()


def callable_launch() -> None:
    import cupy  # noqa: F401 - imported: its switch is entered too
    import torch

    dev = pg.open_device("cuda")
    s = dev.create_stream()
    th = torch.cuda.ExternalStream(s.handle)

    def best(fn: Callable[[], Any], n: int = 20000) -> float:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                fn()
            times.append((time.perf_counter() - t) / n * 1e6)
        return min(times)

    def torch_block() -> None:
        with torch.cuda.stream(th):
            pass

    def switches() -> None:
        for c in s.interop_contexts(sys.modules):
            c.__enter__()
        for c in reversed(s.interop_contexts(sys.modules)):
            c.__exit__(None, None, None)
    k = dev.prepare_kernel(pg.Kernel.from_callable(lambda x, stream=None: None))
    d = dev.allocate(64)
    print(f"torch.cuda.stream block: {best(torch_block):.2f} us")
    print(f"prism-gpu's switches entered and left: {best(switches):.2f} us")
    print(f"callable kernel launch: {best(lambda: s.launch(k, None, [d], ())):.2f} us")
    s.synchronize()
    dev.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    ab(args.rounds)
    callable_launch()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
