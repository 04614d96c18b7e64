"""Driver cost per op of timeline designs: the raw cuda.core Pattern-1 loop with the
events each design records and reads, against the plain raw loop in interleaved pairs
(same process), so the figure is what the driver charges a design, before any Python
of prism-gpu's. Run on a CUDA machine:

    python benchmarks/trace_designs.py
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, Dict, List

from host_overhead import _per_iter, _raw_parts

RING = 64  # iterations whose events are in use; the oldest is read before its reuse


def main() -> None:
    from cuda.core import EventOptions, launch

    dev, (up, comp, down), k, cfg, h_in, h_out, d = _raw_parts()
    timing = EventOptions(timing_enabled=True)
    plain_ev = [[dev.create_event() for _ in range(3)] for _ in range(3)]
    tev = [[[dev.create_event(timing) for _ in range(2)] for _ in range(3)]
           for _ in range(RING)]
    nev = [[dev.create_event() for _ in range(3)] for _ in range(RING)]
    ref = dev.create_event(timing)
    up.record(ref)
    up.sync()
    used = [False] * RING
    sink: List[float] = []

    def works(s: int) -> Any:
        return ((up, lambda: d[s].copy_from(h_in, stream=up)),
                (comp, lambda: launch(comp, cfg, k)),
                (down, lambda: d[s].copy_to(h_out, stream=down)))

    def plain(i: int) -> None:
        ev = plain_ev[i % 3]
        wait_on = ev[2]
        for j, (st, work) in enumerate(works(i % 3)):
            st.wait(wait_on)
            work()
            st.record(ev[j])
            wait_on = ev[j]

    def design(stamp_start: bool, timing_close: bool, reads: int) -> Callable[[int], None]:
        """``stamp_start``: a timing stamp before each op's work; ``timing_close``: the
        closing event others wait on is the timing end (else a timing end stamp and an
        untimed closing event); ``reads``: times read per op (end, then start)."""
        def step(i: int) -> None:
            r = i % RING
            t3, n3 = tev[r], nev[r]
            if used[r]:
                (t3[2][1] if timing_close else n3[2]).sync()
                for j in range(3):
                    if reads >= 1:
                        sink.append(t3[j][1] - ref)
                    if reads >= 2:
                        sink.append(t3[j][0] - ref)
                if len(sink) > 4096:
                    sink.clear()
            used[r] = True
            wait_on = tev[(i - 3) % RING][2][1] if timing_close else nev[(i - 3) % RING][2]
            for j, (st, work) in enumerate(works(i % 3)):
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

    def sync() -> None:
        for s in (up, comp, down):
            s.sync()

    designs = {
        "start stamp + timing closing event, 2 reads (the design in use)": design(True, True, 2),
        "start stamp + timing end stamp + untimed closing event, 2 reads":
            design(True, False, 2),
        "timing closing event only, 1 read (start inferred)": design(False, True, 1),
        "timing closing event only, no reads": design(False, True, 0),
        "start stamp + timing closing event, no reads": design(True, True, 0),
    }
    res: Dict[str, List[float]] = {}
    for _ in range(5):
        for name, fn in designs.items():
            used[:] = [False] * RING
            p = _per_iter(plain, sync, 2000, repeats=1)
            t = _per_iter(fn, sync, 2000, repeats=1)
            res.setdefault(name, []).append((t - p) / 3)
    for name, v in res.items():
        print(f"{statistics.median(v):6.2f} us/op  {name}  {[round(x, 2) for x in v]}")


if __name__ == "__main__":
    main()
