"""Host microseconds per queued op: prism-gpu vs the raw cuda.core calls underneath,
with two points between them: the same calls through prism-gpu's backend objects
alone, and a lean model of the least bookkeeping a pure-Python engine does.

Tiny (64 KiB) batches with a no-op kernel: the GPU is never the bottleneck, so
the figures are what the host pays per op. ``ratio`` divides two figures measured
one after the other; ``paired_ratio`` is the median of five raw/prism-gpu pairs run
in turn (a drift of the host's speed falls on both sides of a pair). Run on a CUDA
machine:

    python benchmarks/host_overhead.py [--iterations N] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from typing import Any, Callable, Dict

import numpy as np

import prism_gpu as pg

N = (64 << 10) // 4


def _per_iter(fn: Callable[[int], None], sync: Callable[[], None], iters: int,
              repeats: int = 5) -> float:
    fn(0)
    sync()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(iters):
            fn(i)
        samples.append((time.perf_counter() - t) / iters * 1e6)
        sync()
    return statistics.median(samples)


def _raw_parts() -> Any:
    from cuda.core import Device, LaunchConfig, LegacyPinnedMemoryResource, Program, \
        ProgramOptions

    dev = Device(0)
    dev.set_current()
    streams = [dev.create_stream() for _ in range(3)]
    prog = Program('extern "C" __global__ void noop() {}', "c++",
                   ProgramOptions(arch=f"sm_{dev.arch}"))
    k = prog.compile("cubin").get_kernel("noop")
    mr = LegacyPinnedMemoryResource()
    h_in, h_out = mr.allocate(N * 4), mr.allocate(N * 4)
    d = [dev.allocate(N * 4, stream=streams[0]) for _ in range(3)]
    streams[0].sync()
    return dev, streams, k, LaunchConfig(grid=1, block=1), h_in, h_out, d


def _raw_step(parts: Any) -> Callable[[int], None]:
    """The nine raw calls of a Pattern-1 iteration (a wait, the work and a record per
    op), on ``parts`` from :func:`_raw_parts`, with untimed events."""
    from cuda.core import launch

    dev, (up, comp, down), k, cfg, h_in, h_out, d = parts
    ev = [[dev.create_event() for _ in range(3)] for _ in range(3)]

    def step(i: int) -> None:
        s = i % 3
        e_up, e_c, e_dn = ev[s]
        up.wait(e_dn)
        d[s].copy_from(h_in, stream=up)
        up.record(e_up)
        comp.wait(e_up)
        launch(comp, cfg, k)
        comp.record(e_c)
        down.wait(e_c)
        d[s].copy_to(h_out, stream=down)
        down.record(e_dn)
    return step


def _raw_sync(parts: Any) -> Callable[[], None]:
    def sync() -> None:
        for s in parts[1]:
            s.sync()
    return sync


def raw_cuda_core(iters: int) -> Dict[str, float]:
    parts = _raw_parts()
    return {"raw_cuda_core_us_per_iteration":
            _per_iter(_raw_step(parts), _raw_sync(parts), iters)}


def timeline_step(parts: Any, stamp_start: bool, timing_close: bool, reads: int
                  ) -> Callable[[int], None]:
    """The raw Pattern-1 iteration on ``parts`` with the events of one timeline design:
    ``stamp_start``, a timing stamp before each op's work; ``timing_close``, the
    closing event others wait on is the timing end (else a timing end stamp and an
    untimed closing event); ``reads``, times read per op once it is done (end, start).
    Events cycle through a ring of 64 iterations; the oldest is read before reuse."""
    from cuda.core import EventOptions, launch

    dev, (up, comp, down), k, cfg, h_in, h_out, d = parts
    timing = EventOptions(timing_enabled=True)
    ring = 64
    tev = [[[dev.create_event(timing) for _ in range(2)] for _ in range(3)]
           for _ in range(ring)]
    nev = [[dev.create_event() for _ in range(3)] for _ in range(ring)]
    ref = dev.create_event(timing)
    up.record(ref)
    used = [False] * ring
    sink: list = []

    def step(i: int) -> None:
        r = i % ring
        t3, n3 = tev[r], nev[r]
        if used[r]:
            (t3[2][1] if timing_close else n3[2]).sync()  # long done
            for j in range(3):
                if reads >= 1:
                    sink.append(t3[j][1] - ref)
                if reads >= 2:
                    sink.append(t3[j][0] - ref)
            if len(sink) > 4096:
                sink.clear()
        used[r] = True
        s = i % 3
        works = ((up, lambda: d[s].copy_from(h_in, stream=up)),
                 (comp, lambda: launch(comp, cfg, k)),
                 (down, lambda: d[s].copy_to(h_out, stream=down)))
        wait_on = tev[(i - 3) % ring][2][1] if timing_close else nev[(i - 3) % ring][2]
        for j, (st, work) in enumerate(works):
            st.wait(wait_on)
            if stamp_start:
                st.record(t3[j][0])
            work()
            st.record(t3[j][1])
            if timing_close:
                wait_on = t3[j][1]
            else:
                st.record(n3[j])
                wait_on = n3[j]
    return step


def raw_cuda_core_traced(iters: int) -> Dict[str, float]:
    """The raw loop with what a timeline needs from the driver: each op between a
    start stamp and a closing timing event, both read (against a reference event)
    once the op is done. Against the plain raw loop, in pairs: the driver's share of
    tracing, per op."""
    parts = _raw_parts()
    plain, traced = _raw_step(parts), timeline_step(parts, True, True, 2)
    sync = _raw_sync(parts)
    plains, traceds = [], []
    for _ in range(7):
        plains.append(_per_iter(plain, sync, iters, repeats=1))
        traceds.append(_per_iter(traced, sync, iters, repeats=1))
    return {"raw_traced_us_per_iteration": statistics.median(traceds),
            "raw_tracing_us_per_op":
                statistics.median(t - p for t, p in zip(traceds, plains)) / 3}


def _backend_parts() -> Any:
    dev = pg.open_device("cuda")
    streams = [dev.create_stream() for _ in range(3)]
    noop = dev.prepare_kernel(pg.Kernel.from_source(
        'extern "C" __global__ void noop() {}', "noop", config=pg.LaunchConfig(grid=1, block=1)))
    d = [dev.allocate(N * 4).view(np.float32) for _ in range(3)]
    h_in = pg.pinned_empty(N, np.float32)
    h_in[:] = 1
    h_out = pg.pinned_empty(N, np.float32)
    return dev, streams, noop, d, h_in, h_out


def backend_only(iters: int) -> Dict[str, float]:
    """The same nine calls through prism-gpu's CUDA backend objects, no bookkeeping:
    what the backend's wrappers add to the raw calls."""
    dev, (up, comp, down), noop, d, h_in, h_out = _backend_parts()
    ev = [[dev.create_event() for _ in range(3)] for _ in range(3)]
    cfg = pg.LaunchConfig(grid=1, block=1)

    def step(i: int) -> None:
        s = i % 3
        e_up, e_c, e_dn = ev[s]
        up.wait(e_dn)
        up.copy_h2d(d[s], h_in)
        up.record(e_up)
        comp.wait(e_up)
        comp.launch(noop, cfg, (), ())
        comp.record(e_c)
        down.wait(e_c)
        down.copy_d2h(h_out, d[s])
        down.record(e_dn)

    def sync() -> None:
        for st in (up, comp, down):
            st.synchronize()
    out = {"backend_calls_us_per_iteration": _per_iter(step, sync, iters)}
    dev.close()
    return out


def lean_python(iters: int) -> Dict[str, float]:
    """A model of the least a pure-Python engine does per Pattern-1 iteration on top
    of the backend calls: check the arrays, take pooled events, wait on the slot's
    last op, record each op (id, event, lane FIFO, table of ops in flight), and
    retire completed ops by querying the oldest. The lower bound of a Python design."""
    dev, (up, comp, down), noop, d, h_in, h_out = _backend_parts()
    cfg = pg.LaunchConfig(grid=1, block=1)
    pool = [dev.create_event() for _ in range(64)]
    lanes = ([], [], [])
    inflight: Dict[int, Any] = {}
    last = [None, None, None]
    state = {"next": 0}
    f32 = np.dtype(np.float32)

    def op(lane: int, stream: Any) -> Any:
        if len(inflight) > 48:  # retire the oldest ops once their events are done
            for q in lanes:
                while q and q[0][1].query():
                    oid, e = q.pop(0)
                    del inflight[oid]
                    pool.append(e)
        e = pool.pop()
        stream.record(e)
        oid = state["next"]
        state["next"] = oid + 1
        lanes[lane].append((oid, e))
        inflight[oid] = e
        return e

    def step(i: int) -> None:
        for a in (h_in, h_out):
            if type(a) is not np.ndarray or a.dtype is not f32 or not a.flags.c_contiguous \
                    or a.size > N:
                raise ValueError
        s = i % 3
        if last[s] is not None:
            up.wait(last[s])
        up.copy_h2d(d[s], h_in)
        e = op(0, up)
        comp.wait(e)
        comp.launch(noop, cfg, (), ())
        e = op(1, comp)
        down.wait(e)
        down.copy_d2h(h_out, d[s])
        last[s] = op(2, down)

    def sync() -> None:
        for st in (up, comp, down):
            st.synchronize()
    out = {"lean_python_us_per_iteration": _per_iter(step, sync, iters)}
    dev.close()
    return out


def pattern1(dev: Any, kernel: str, seed: int = 0) -> Any:
    """A coordinator on ``dev``, a ring, pinned input (random) and output of tiny batches,
    and one Pattern-1 iteration on them, queuing kernel ``kernel`` (a name registered on
    the coordinator before the first iteration): (coord, buf, h_in, h_out, step)."""
    coord = pg.AsyncCoordinator(dev)
    buf = pg.TripleBuffer(dev, N)
    h_in = pg.pinned_empty(N, np.float32)
    h_in[:] = np.random.default_rng(seed).random(N, dtype=np.float32)
    h_out = pg.pinned_empty(N, np.float32)

    def step(i: int) -> None:
        u = coord.queue_upload(h_in, buf)
        coord.queue_compute(kernel, [u])
        coord.queue_download(buf, h_out)
        buf.advance()
    return coord, buf, h_in, h_out, step


def prism(iters: int, profile: bool) -> Dict[str, float]:
    dev = pg.open_device("cuda")
    coord, _, _, _, step = pattern1(dev, "noop")
    out = {"prism_us_per_iteration": _per_iter(step, coord.synchronize_all, iters)}
    # the same loop recorded (each op gets timing events), in pairs with the plain loop
    # so that drift of the machine's speed falls on both: the median pair's difference
    plain, traced, ops = [], [], 0
    for _ in range(7):
        plain.append(_per_iter(step, coord.synchronize_all, iters, repeats=1))
        with pg.trace() as tr:
            traced.append(_per_iter(step, coord.synchronize_all, iters, repeats=1))
        ops = len(tr)
    out["prism_traced_us_per_iteration"] = statistics.median(traced)
    out["traced_ops"] = ops
    out["tracing_us_per_op"] = statistics.median(t - p for t, p in zip(traced, plain)) / 3
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for i in range(iters):
            step(i)
        prof.disable()
        coord.synchronize_all()
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    coord.close()
    return out


def paired(iters: int, pairs: int = 5) -> Dict[str, float]:
    """The raw loop and prism-gpu's in turn, ``pairs`` times, in one process: a drift of
    the host's speed falls on both sides of each pair; the median pair's ratio."""
    parts = _raw_parts()
    raw_step, raw_sync = _raw_step(parts), _raw_sync(parts)
    dev = pg.open_device("cuda")
    coord, _, _, _, step = pattern1(dev, "noop")
    ratios = []
    try:
        for _ in range(pairs):
            r = _per_iter(raw_step, raw_sync, iters, repeats=1)
            p = _per_iter(step, coord.synchronize_all, iters, repeats=1)
            ratios.append(p / r)
    finally:
        coord.close()
        dev.close()
    return {"paired_ratio": statistics.median(ratios),
            "paired_ratios": [round(x, 3) for x in ratios]}


def main() -> int:
    ap = argparse.ArgumentParser()
    # (2000 iterations, about 30 ms a figure, proved too short a window on a busy host)
    ap.add_argument("--iterations", type=int, default=20000)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    res: Dict[str, Any] = {}
    res.update(raw_cuda_core(args.iterations))
    res.update(raw_cuda_core_traced(args.iterations))
    res.update(backend_only(args.iterations))
    res.update(lean_python(args.iterations))
    res.update(prism(args.iterations, args.profile))
    res.update(paired(args.iterations))
    raw = res["raw_cuda_core_us_per_iteration"]
    res["ratio"] = res["prism_us_per_iteration"] / raw
    res["backend_calls_ratio"] = res["backend_calls_us_per_iteration"] / raw
    res["lean_python_ratio"] = res["lean_python_us_per_iteration"] / raw
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
