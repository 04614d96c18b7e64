"""Driver cost per op of timeline designs: the raw cuda.core Pattern-1 loop with the
events each design records and reads, against the plain raw loop in interleaved pairs
(same process), so the figure is what the driver charges a design, before any Python
of prism-gpu's. Run on a CUDA machine:

    python benchmarks/trace_designs.py
"""

from __future__ import annotations

import statistics
from typing import Dict, List

from host_overhead import _per_iter, _raw_parts, _raw_step, _raw_sync, timeline_step


def main() -> None:
    parts = _raw_parts()
    plain, sync = _raw_step(parts), _raw_sync(parts)
    designs = {
        "start stamp + timing closing event, 2 reads (the design in use)": (True, True, 2),
        "start stamp + timing end stamp + untimed closing event, 2 reads": (True, False, 2),
        "timing closing event only, 1 read (start inferred)": (False, True, 1),
        "timing closing event only, no reads": (False, True, 0),
        "start stamp + timing closing event, no reads": (True, True, 0),
    }
    steps = {name: timeline_step(parts, *design) for name, design in designs.items()}
    res: Dict[str, List[float]] = {}
    for _ in range(5):
        for name, fn in steps.items():
            p = _per_iter(plain, sync, 2000, repeats=1)
            t = _per_iter(fn, sync, 2000, repeats=1)
            res.setdefault(name, []).append((t - p) / 3)
    for name, v in res.items():
        print(f"{statistics.median(v):6.2f} us/op  {name}  {[round(x, 2) for x in v]}")


if __name__ == "__main__":
    main()
