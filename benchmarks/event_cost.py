"""What exact per-op device timing costs the host, in the driver alone.

The raw cuda.core Pattern-1 loop of ``host_overhead.py`` (tiny batches, nine calls per
iteration) in five forms, interleaved round after round: closing records on plain
events; on timing events; plain closing records plus a timing stamp before each op's
work; both (what a traced op needs for an exact start and end); and timing closing
records plus an event query per op instead of a stamp. Run on a CUDA machine:

    python benchmarks/event_cost.py [--rounds 7] [--iterations 3000]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any, Callable, Dict, List

import host_overhead as ho


def main() -> int:
    from cuda.core import (Device, EventOptions, LaunchConfig, LegacyPinnedMemoryResource,
                           Program, ProgramOptions, launch)

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iterations", type=int, default=3000)
    args = ap.parse_args()
    dev = Device(0)
    dev.set_current()
    up, comp, down = (dev.create_stream() for _ in range(3))
    k = Program('extern "C" __global__ void noop() {}', "c++",
                ProgramOptions(arch=f"sm_{dev.arch}")).compile("cubin").get_kernel("noop")
    cfg = LaunchConfig(grid=1, block=1)
    mr = LegacyPinnedMemoryResource()
    h_in, h_out = mr.allocate(ho.N * 4), mr.allocate(ho.N * 4)
    d = [dev.allocate(ho.N * 4, stream=up) for _ in range(3)]
    up.sync()
    timing, plain = EventOptions(timing_enabled=True), EventOptions(timing_enabled=False)
    closing = {t: [[dev.create_event(timing if t else plain) for _ in range(3)]
                   for _ in range(3)] for t in (False, True)}
    stamps = [[dev.create_event(timing) for _ in range(3)] for _ in range(3)]

    def make(timed: bool, stamp: bool, query: bool) -> Callable[[int], None]:
        ev = closing[timed]

        def step(i: int) -> None:
            s = i % 3
            e_up, e_c, e_dn = ev[s]
            s_up, s_c, s_dn = stamps[s]
            prev = ev[(i - 1) % 3]
            up.wait(e_dn)
            if stamp:
                up.record(s_up)
            if query:
                prev[0].is_done
            d[s].copy_from(h_in, stream=up)
            up.record(e_up)
            comp.wait(e_up)
            if stamp:
                comp.record(s_c)
            if query:
                prev[1].is_done
            launch(comp, cfg, k)
            comp.record(e_c)
            down.wait(e_c)
            if stamp:
                down.record(s_dn)
            if query:
                prev[2].is_done
            d[s].copy_to(h_out, stream=down)
            down.record(e_dn)
        return step

    def sync() -> None:
        for st in (up, comp, down):
            st.sync()

    variants: Dict[str, Any] = {
        "closing records plain": make(False, False, False),
        "closing records timing": make(True, False, False),
        "plain closing + timing stamp per op": make(False, True, False),
        "timing closing + timing stamp per op": make(True, True, False),
        "timing closing + event query per op": make(True, False, True),
    }
    res: Dict[str, List[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in variants.items():
            res[name].append(ho._per_iter(step, sync, args.iterations, repeats=1))
    base = statistics.median(res["closing records plain"])
    for name, v in res.items():
        m = statistics.median(v)
        print(f"{name:40s} {m:6.2f} us per iteration ({(m - base) / 3:+.2f} us per op)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
