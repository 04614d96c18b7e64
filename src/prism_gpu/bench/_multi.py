"""The calibrated workload on several devices at once, through ``stream_map(devices=)``:
iterations/s of each device alone and of all together, and the host's copy bandwidth
with every device copying at once (the bound when host memory or PCIe saturates)."""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, List

import numpy as np

from ._measure import measure_bandwidth
from ._workload import Workload, calibrate, check_footprint

__all__ = ["run_multi", "concurrent_bandwidth"]


def concurrent_bandwidth(devices: List[Any], nbytes: int = 256 << 20, repeats: int = 3
                         ) -> float:
    """GB/s moved in total while every device uploads and downloads ``nbytes`` at once
    (pinned memory, one thread per device)."""
    from .._buffers import TripleBuffer
    from .._coordinator import AsyncCoordinator
    from ._workload import host_memory

    host = host_memory()  # four buffers per device (rings are host memory on the CPU):
    if host > 0:           # a quarter of the host's memory at most, however many devices
        nbytes = min(nbytes, max(1 << 20, host // (16 * len(devices))))
    n = nbytes // 4
    nbytes = n * 4
    setups = []
    for dev in devices:
        up, down = TripleBuffer(dev, n, np.float32, 1), TripleBuffer(dev, n, np.float32, 1)
        src = dev.allocate_pinned(nbytes).view(np.float32)
        dst = dev.allocate_pinned(nbytes).view(np.float32)
        setups.append((dev, up, down, src, dst))
    best = 0.0
    try:
        for _ in range(repeats + 1):  # the first round warms up
            barrier = threading.Barrier(len(setups) + 1)

            def run(s: Any) -> None:
                dev, up, down, src, dst = s
                coord = AsyncCoordinator(dev)  # a coordinator belongs to its thread
                try:
                    barrier.wait()
                    a = coord.queue_upload(src, up)
                    coord.queue_compute("noop", [a], outputs=[(down, n)])
                    up.retire()
                    b = coord.queue_download(down, dst)
                    down.advance()
                    coord.wait(b)
                finally:
                    coord.close()
            threads = [threading.Thread(target=run, args=(s,)) for s in setups]
            for t in threads:
                t.start()
            barrier.wait()
            t0 = time.perf_counter()
            for t in threads:
                t.join()
            best = max(best, 2 * nbytes * len(setups) / (time.perf_counter() - t0) / 1e9)
    finally:
        for _, up, down, _, _ in setups:
            up.close()
            down.close()
    return best


def run_multi(ids: List[int], backend: str, work: Workload, iterations: int) -> Dict[str, Any]:
    """The workload through ``stream_map`` on each device alone, then on all at once."""
    from .._stream_map import stream_map
    from ..backends import open_device

    if iterations < 4:
        raise ValueError(f"iterations must be >= 4, got {iterations}")
    first = open_device(backend, ids[0])
    try:
        bw = measure_bandwidth(first, 32 << 20)
        n_up, n_down = calibrate(bw, work)
        check_footprint(first, work, bw, n_up, n_down)
        bw = measure_bandwidth(first, max(n_up, n_down, 1024) * 4)
        n_up, n_down = calibrate(bw, work)
        name, kind = first.name, first.kind
        inputs = [first.allocate_pinned(n_up * 4).view(np.float32) for _ in range(4)]
    finally:
        first.close()
    for x in inputs:
        x[:] = 1.0
    us = work.compute_ms * 1e3

    def rate(devs: List[int], count: int) -> float:
        batches = (inputs[i % len(inputs)] for i in range(count))
        t = 0.0
        for i, _ in enumerate(stream_map("spin", batches, devices=devs, backend=backend,
                                         output=(n_down, np.float32), extra=(us,))):
            if i == 2 * len(devs):  # start the clock once every device is running
                t = time.perf_counter()
        return (count - 2 * len(devs) - 1) / (time.perf_counter() - t)

    rate(ids, 4 * len(ids) + 4)  # warm-up: contexts, kernels and pinned pools on each device
    per_device = {str(d): rate([d], iterations) for d in ids}
    together = rate(ids, iterations * len(ids))
    devs = [open_device(backend, d) for d in ids]
    try:
        host = concurrent_bandwidth(devs) if len(ids) > 1 else bw.bidirectional
    finally:
        for d in devs:
            d.close()
    single = per_device[str(ids[0])]
    per_iter_bytes = (n_up + n_down) * 4
    floor_its = min(len(ids) * 1e3 / max(work.compute_ms, work.up_ms, work.down_ms),
                    host * 1e9 / per_iter_bytes)
    return {"backend": kind, "device": name, "devices": ids, "iterations": iterations,
            "workload": {"up_ms": work.up_ms, "compute_ms": work.compute_ms,
                         "down_ms": work.down_ms},
            "per_device_its": per_device, "aggregate_its": together,
            "scaling": together / single, "host_bidirectional_gbs_all_devices": host,
            "floor_its": floor_its, "vs_floor": together / floor_its}
