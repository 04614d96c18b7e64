"""Where stream_map and the pipeline lose time against the coordinator loop (CUDA)."""

from __future__ import annotations

import cProfile
import os
import pstats
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import prism_gpu as pg  # noqa: E402
from prism_gpu.bench._peers_cuda import Work  # noqa: E402

import prism_loops  # noqa: E402


def work(n: int, us: float) -> Work:
    rng = np.random.default_rng(0)
    return Work(n, n, us, scale=True, inputs=[rng.random(n, dtype=np.float32) for _ in range(3)])


def gil_check(ctx: pg.ManagedGpuContext) -> None:
    """Does a host wait on an op let other Python threads run?"""
    import threading
    import time

    coord = pg.AsyncCoordinator(ctx.device)
    try:
        for label, wait in (("AsyncCoordinator.wait", coord.wait),
                            ("AsyncCoordinator.synchronize_all",
                             lambda _op: coord.synchronize_all())):
            op = coord.queue_compute("spin", extra=(200_000.0,))
            count, stop = [0], threading.Event()

            def spin() -> None:
                while not stop.is_set():
                    count[0] += 1

            t = threading.Thread(target=spin)
            t.start()
            time.sleep(0.01)
            c0 = count[0]
            wait(op)
            c1 = count[0]
            stop.set()
            t.join()
            print(f"{label}: other thread ran {c1 - c0} loops during a 200 ms wait", flush=True)
    finally:
        coord.close()


def main() -> None:
    ctx = pg.ManagedGpuContext(backend="cuda")
    gil_check(ctx)
    n = int(3e-3 * 53e9) // 4
    for label, fn in (("coordinator", prism_loops.coordinator_loop),
                      ("stream_map", prism_loops.stream_map_loop)):
        print(label, "3/3/3", round(fn(ctx, work(n, 3000.0), 60), 3), flush=True)
    sys.setswitchinterval(0.0002)
    print("stream_map, switch interval 0.2 ms", round(prism_loops.stream_map_loop(
        ctx, work(n, 3000.0), 60), 3), flush=True)
    sys.setswitchinterval(0.005)
    for label, fn in (("stream_map tiny", prism_loops.stream_map_loop),
                      ("pipeline tiny", prism_loops.pipeline_loop)):
        prof = cProfile.Profile()
        prof.enable()
        ms = fn(ctx, work(16384, 10.0), 600)
        prof.disable()
        print(label, round(ms, 4), flush=True)
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    ctx.close()


if __name__ == "__main__":
    main()
