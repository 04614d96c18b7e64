"""Real data: 1 GiB of ordinary (pageable) numpy input in 4 or 16 MiB batches, results
written into a preallocated pageable array of the same size.

Measured in one run: the pageable floor (host copies with several threads, both
directions at once, the faster of numpy's copies and native threads writing with
non-temporal stores; PCIe copies; compute; the host and PCIe copies at once are
shown apart, not as a floor term: queued all at once they ran slower than
stream_map itself), the naive CuPy loop, a hand-written
CuPy loop with a pinned ring and three streams, the threaded hand-written CuPy
loop (a pool of threads, each with its own stream and pinned input/output
pair), and prism-gpu's ``stream_map`` with ``out=`` on pageable, pinned and
registered memory (pinned arrays allocated, and copies of the input and output
registered, once per workload: memory a program keeps while it streams; what
registering costs is measured apart). Every variant's whole output is checked
against numpy.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

import prism_gpu as pg
from prism_gpu.bench._measure import measure_bandwidth
from prism_gpu.bench._peers_cuda import SPIN_SCALE_SOURCE, spin_scale_grid

import prism_loops

GIB = 1 << 30


class Data:
    """The input, the expected output and the preallocated output, all pageable."""

    def __init__(self, batch_mib: int, total: int = GIB) -> None:
        self.n = (batch_mib << 20) // 4
        self.count = total // (self.n * 4)
        rng = np.random.default_rng(batch_mib)
        self.src = rng.standard_normal(self.count * self.n, dtype=np.float32)
        self.expect = self.src * np.float32(2)
        self.dst = np.empty((self.count, self.n), np.float32)
        self.dst.fill(np.nan)  # touch every page before anything is timed
        self.gb = self.count * self.n * 4 / 1e9

    def batches(self, src: np.ndarray = None) -> Any:  # type: ignore[assignment]
        s = self.src if src is None else src
        return (s[i * self.n:(i + 1) * self.n] for i in range(self.count))

    def check(self, dst: np.ndarray) -> bool:
        return bool(np.array_equal(dst.reshape(-1), self.expect))


def _cupy_kernel(n: int) -> Callable[[Any, Any], None]:
    import cupy as cp

    k = cp.RawKernel(SPIN_SCALE_SOURCE, "spin_scale")
    grid, nn, us = spin_scale_grid(n), np.uint64(n), np.float64(0.0)
    return lambda ptr, stream: k((grid,), (256,), (ptr, nn, us), stream=stream)


def naive_cupy(d: Data) -> float:
    import cupy as cp

    run = _cupy_kernel(d.n)
    stream = cp.cuda.Stream(non_blocking=True)
    t = time.perf_counter()
    with stream:
        for i, x in enumerate(d.batches()):
            dev = cp.asarray(x)
            run(dev.data.ptr, stream)
            d.dst[i] = dev.get()
    return time.perf_counter() - t


def cupy_ring(d: Data, depth: int = 3) -> float:
    """One host thread, a ring of ``depth`` pinned input/output pairs and streams."""
    import cupy as cp
    import cupyx

    run = _cupy_kernel(d.n)
    streams = [cp.cuda.Stream(non_blocking=True) for _ in range(depth)]
    dev = [cp.empty(d.n, cp.float32) for _ in range(depth)]
    pin_in = [cupyx.empty_pinned((d.n,), np.float32) for _ in range(depth)]
    pin_out = [cupyx.empty_pinned((d.n,), np.float32) for _ in range(depth)]
    t = time.perf_counter()
    for i, x in enumerate(d.batches()):
        k = i % depth
        s = streams[k]
        if i >= depth:
            s.synchronize()
            d.dst[i - depth] = pin_out[k]
        np.copyto(pin_in[k], x)
        dev[k].set(pin_in[k], stream=s)
        run(dev[k].data.ptr, s)
        dev[k].get(out=pin_out[k], stream=s, blocking=False)
    for i in range(max(0, d.count - depth), d.count):
        k = i % depth
        streams[k].synchronize()
        d.dst[i] = pin_out[k]
    return time.perf_counter() - t


def cupy_threaded(d: Data, threads: int) -> float:
    """A pool of threads, each with its own stream and pinned input/output pair: copy
    in, upload, compute, download, synchronize its stream, copy out."""
    import cupy as cp
    import cupyx

    run = _cupy_kernel(d.n)
    local = threading.local()
    device = cp.cuda.Device()

    def work(i: int, x: np.ndarray) -> None:
        st = getattr(local, "st", None)
        if st is None:
            device.use()
            st = local.st = (cp.cuda.Stream(non_blocking=True), cp.empty(d.n, cp.float32),
                             cupyx.empty_pinned((d.n,), np.float32),
                             cupyx.empty_pinned((d.n,), np.float32))
        s, dev, pin_in, pin_out = st
        np.copyto(pin_in, x)
        dev.set(pin_in, stream=s)
        run(dev.data.ptr, s)
        dev.get(out=pin_out, stream=s, blocking=False)
        s.synchronize()
        d.dst[i] = pin_out

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda ix: work(*ix), [(0, d.src[:d.n])] * threads))  # warm threads
        t = time.perf_counter()
        for f in [pool.submit(work, i, x) for i, x in enumerate(d.batches())]:
            f.result()
        return time.perf_counter() - t


def prism_out(ctx: Any, d: Data, kernel: Any, src: np.ndarray, dst: np.ndarray,
              **options: Any) -> float:
    """Seconds for ``stream_map(out=dst)`` over ``src`` (``options`` go to stream_map)."""
    t = time.perf_counter()
    for _ in pg.stream_map(kernel, d.batches(src), ctx=ctx, extra=(0.0,), out=dst,
                           **options):
        pass
    return time.perf_counter() - t


def prism_copy_out(ctx: Any, d: Data, kernel: Any) -> float:
    """What users did before ``out=``: copy each yielded result on the calling thread."""
    t = time.perf_counter()
    for i, r in enumerate(pg.stream_map(kernel, d.batches(), ctx=ctx, extra=(0.0,))):
        d.dst[i] = r
    return time.perf_counter() - t


def host_copies(d: Data, threads: int) -> float:
    """Seconds to copy the input into pinned memory and pinned memory into the output,
    both directions at once on ``threads`` threads (a ring of pinned batches)."""
    ring = [pg.pinned_empty(d.n, np.float32) for _ in range(2 * threads)]
    out = d.dst.reshape(-1)
    jobs: List[Tuple[np.ndarray, np.ndarray]] = []
    for i in range(d.count):
        jobs.append((ring[(2 * i) % len(ring)], d.src[i * d.n:(i + 1) * d.n]))
        jobs.append((out[i * d.n:(i + 1) * d.n], ring[(2 * i + 1) % len(ring)]))
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda j: np.copyto(*j), jobs[:threads]))
        t = time.perf_counter()
        list(pool.map(lambda j: np.copyto(*j), jobs))
        return time.perf_counter() - t


def host_copies_streaming(d: Data, threads: int, with_pcie: bool = False) -> float:
    """As :func:`host_copies`, with the copies cut in 256 KiB pieces on ``threads``
    native threads writing with non-temporal stores (no read of the destination
    first), what staging does; ``inf`` where the native extension is not built.

    ``with_pcie``: the PCIe copies of the same bytes (H2D and D2H of every batch,
    between pinned and device memory, on two streams) run at the same time, as
    they do in any pageable pipeline (host memory serves both). Every copy is
    queued at once, with no pacing, and that ran slower than stream_map: the
    result is shown, not used as a floor."""
    from prism_gpu._copypool import CopyPool, native

    if not native():
        return float("inf")
    ring = [pg.pinned_empty(d.n, np.float32) for _ in range(2 * threads)]
    out = d.dst.reshape(-1)
    pool = CopyPool(1, 1 << 30, native_workers=threads, native_chunk=256 << 10,
                    native_stream=True)
    pcie = _pcie_copies(d) if with_pcie else None
    try:
        pool.copy(ring[0], d.src[:d.n]).wait()  # threads started
        t = time.perf_counter()
        tickets = []
        for i in range(d.count):
            tickets.append(pool.copy(ring[(2 * i) % len(ring)], d.src[i * d.n:(i + 1) * d.n]))
            tickets.append(pool.copy(out[i * d.n:(i + 1) * d.n], ring[(2 * i + 1) % len(ring)]))
        if pcie is not None:
            pcie()
        for tk in tickets:
            tk.wait()
        return time.perf_counter() - t
    finally:
        pool.close()


def _pcie_copies(d: Data) -> Callable[[], None]:
    """Queue and wait for an H2D and a D2H copy of every batch (pinned memory, two
    streams, two device buffers each way)."""
    import cupy as cp

    rt = cp.cuda.runtime
    pin = [pg.pinned_empty(d.n, np.float32) for _ in range(4)]
    dev = [cp.empty(d.n, cp.float32) for _ in range(4)]
    up, down = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    nbytes = d.n * 4

    def run() -> None:
        for i in range(d.count):
            k = i & 1
            rt.memcpyAsync(dev[k].data.ptr, pin[k].ctypes.data, nbytes,
                           rt.memcpyHostToDevice, up.ptr)
            rt.memcpyAsync(pin[2 + k].ctypes.data, dev[2 + k].data.ptr, nbytes,
                           rt.memcpyDeviceToHost, down.ptr)
        up.synchronize()
        down.synchronize()
    return run


def compute_s(d: Data) -> float:
    import cupy as cp

    run = _cupy_kernel(d.n)
    s = cp.cuda.Stream(non_blocking=True)
    x = cp.ones(d.n, cp.float32)
    run(x.data.ptr, s)
    a, b = cp.cuda.Event(), cp.cuda.Event()
    a.record(s)
    for _ in range(d.count):
        run(x.data.ptr, s)
    b.record(s)
    b.synchronize()
    return cp.cuda.get_elapsed_time(a, b) / 1e3


def register_cost(d: Data) -> Dict[str, float]:
    """Seconds per GiB to register and to unregister the input."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        with pg.register(d.src):
            t1 = time.perf_counter()
        times.append((t1 - t0, time.perf_counter() - t1))
    reg = statistics.median(t[0] for t in times)
    unreg = statistics.median(t[1] for t in times)
    scale = GIB / d.src.nbytes
    return {"register_s_per_gib": reg * scale, "unregister_s_per_gib": unreg * scale}


def workload(ctx: Any, batch_mib: int, repeats: int, bw: Any) -> Dict[str, Any]:
    d = Data(batch_mib)
    pin_src = pg.pinned_empty(d.src.shape, np.float32, ctx=ctx)
    pin_src[...] = d.src
    pin_dst = pg.pinned_empty(d.dst.shape, np.float32, ctx=ctx)
    # registered once, as the pinned arrays are allocated once: memory a program keeps
    # registered while it streams (registering costs more than one pass of copies:
    # register_cost measures it apart); copies of the input and the output, so the
    # pageable variants stay pageable
    with pg.register(d.src.copy(), ctx=ctx) as reg_src, \
            pg.register(np.full_like(d.dst, np.nan), ctx=ctx) as reg_dst:
        out = _workload(ctx, d, repeats, bw, pin_src, pin_dst, reg_src, reg_dst)
    del reg_src, reg_dst
    reg = register_cost(d)  # with nothing else registered, as in runs before
    out["extra"]["registration"] = ", ".join(f"{k} {v:.3f}" for k, v in reg.items())
    return out


# the variants whose input and output are page-locked: judged against the PCIe and
# compute terms of the floor alone (the others copy ordinary memory, pinned rings or not)
PAGE_LOCKED = ("prism stream_map out= (pinned in and out)",
               "prism stream_map out= (registered in and out)")


def _workload(ctx: Any, d: Data, repeats: int, bw: Any, pin_src: np.ndarray,
              pin_dst: np.ndarray, reg_src: np.ndarray, reg_dst: np.ndarray
              ) -> Dict[str, Any]:
    batch_mib = (d.n * 4) >> 20
    kernel = prism_loops.kernel(d.n)
    cores = os.cpu_count() or 1
    variants: Dict[str, Callable[[], Tuple[float, np.ndarray]]] = {
        "naive CuPy loop (asarray, get)": lambda: (naive_cupy(d), d.dst),
        "CuPy pinned ring, 3 streams (hand-written)": lambda: (cupy_ring(d), d.dst),
        "CuPy threaded, 8 threads (hand-written)": lambda: (cupy_threaded(d, 8), d.dst),
        f"CuPy threaded, {min(16, cores)} threads (hand-written)":
            lambda: (cupy_threaded(d, min(16, cores)), d.dst),
        "prism stream_map, copying each result out": lambda: (prism_copy_out(ctx, d, kernel),
                                                             d.dst),
        "prism stream_map out= (pageable)": lambda: (prism_out(ctx, d, kernel, d.src, d.dst),
                                                     d.dst),
        "prism stream_map out= (pinned in and out)": lambda: (
            prism_out(ctx, d, kernel, pin_src, pin_dst), pin_dst),
        "prism stream_map out= (registered in and out)": lambda: (
            prism_out(ctx, d, kernel, reg_src, reg_dst), reg_dst),
    }
    samples: Dict[str, List[float]] = {k: [] for k in variants}
    ok = {k: True for k in samples}
    host = {t: [] for t in (1, 8, min(16, cores))}  # type: Dict[int, List[float]]
    streaming = {t: [] for t in (8, min(16, cores))}  # type: Dict[int, List[float]]
    joint: List[float] = []
    comp: List[float] = []
    bws = [bw]  # PCIe bandwidth, measured again each round: the best is the floor's
    for rep in range(repeats + 1):  # the first round warms up
        bws.append(measure_bandwidth(ctx.device, 256 << 20, 5))
        for t in host:
            host[t].append(host_copies(d, t))
        for t in streaming:
            streaming[t].append(host_copies_streaming(d, t))
        joint.append(host_copies_streaming(d, min(16, cores), with_pcie=True))
        comp.append(compute_s(d))
        # every other round in reverse: no variant always runs first or last in a round
        for name in (list(variants) if rep % 2 else list(variants)[::-1]):
            for dst in (d.dst, pin_dst, reg_dst):
                dst.fill(np.nan)
            took, out = variants[name]()
            if rep:
                samples[name].append(took)
            ok[name] = ok[name] and d.check(out)
    best_host = {t: min(v[1:]) for t, v in host.items()}
    h2d, d2h = max(b.h2d for b in bws), max(b.d2h for b in bws)
    bidirectional = max(b.bidirectional for b in bws)
    best_streaming = min(min(v[1:]) for v in streaming.values())
    floor_terms = {
        "host copies both ways, best of threads and copy kinds (s)": min(
            min(best_host.values()), best_streaming),
        "PCIe H2D (s)": d.gb / h2d,
        "PCIe D2H (s)": d.gb / d2h,
        "PCIe both directions (s)": 2 * d.gb / bidirectional,
        "compute (s)": statistics.median(comp[1:]),
    }
    floor_s = max(floor_terms.values())
    pinned_terms = {k: v for k, v in floor_terms.items() if not k.startswith("host")}
    rows = []
    for name, secs in samples.items():
        gbs = [d.gb / s for s in secs]
        floor = max(pinned_terms.values()) if name in PAGE_LOCKED else floor_s
        rows.append({"name": name, "median": statistics.median(gbs), "min": min(gbs),
                     "max": max(gbs), "verified": ok[name], "its": d.count / statistics.median(
                         secs), "vs_floor": statistics.median(secs) / floor})
    peers = [r["median"] for r in rows if "hand-written" in r["name"]]
    for r in rows:
        r["vs_best_peer"] = max(peers) / r["median"]
    return {
        "workload": f"pageable {batch_mib} MiB batches, out= (1 GiB)", "kind": "data-path",
        "unit": "GB/s", "iterations": d.count, "repeats": repeats, "rows": rows,
        "floor_gbs": d.gb / floor_s, "floor_terms_s": floor_terms,
        "note": (f"End-to-end GB/s of input (higher is better; 1 GiB in {d.count} batches, "
                 "results written into a preallocated pageable array). 'vs floor' and 'vs "
                 "best peer' are time ratios (1.0 = as fast; above 1 = slower). The pageable "
                 f"floor is {d.gb / floor_s:.2f} GB/s: the largest of "
                 + ", ".join(f"{k} {v:.4f}" for k, v in floor_terms.items())
                 + "; pinned and registered rows are judged against the PCIe/compute terms "
                 f"alone ({d.gb / max(pinned_terms.values()):.2f} GB/s)."),
        "extra": {"host copies both ways (GB/s of input, by threads)": ", ".join(
            f"{t}: {d.gb / s:.2f}" for t, s in best_host.items()) + (
            "; native threads, non-temporal stores: " + ", ".join(
                f"{t}: {d.gb / min(v[1:]):.2f}" for t, v in streaming.items())
            + " (the floor takes the fastest)"),
                  "host and PCIe copies at once (GB/s of input)": (
                      f"{d.gb / min(joint[1:]):.2f} (every copy queued at once: not a floor, "
                      "stream_map beat it at 16 MiB; shown for the memory traffic DMA adds)")},
    }
