"""The calibrated upload / compute / download workload of ``prism-gpu bench``.

Transfer sizes come from the measured copy bandwidth, so that upload and
download take the asked milliseconds; compute is the ``spin`` kernel. The
floor of one iteration is ``max(compute, up, down, (up + down bytes) / bidir)``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .._buffers import TripleBuffer
from .._coordinator import AsyncCoordinator
from .._ops import OpType
from ._measure import Bandwidth, measure_bandwidth, median

__all__ = ["MAX_STAGE_MS", "Workload", "WorkloadResult", "calibrate", "check_footprint",
           "run_workload"]


MAX_STAGE_MS = 10_000.0
"""Longest upload, compute or download one workload may ask for (10 s)."""

_ALLOWED = (f"each of UP,COMPUTE,DOWN must be a finite number of milliseconds from 0 to "
            f"{MAX_STAGE_MS:g}, not all zero")


@dataclass
class Workload:
    """Milliseconds of upload, compute and download of one iteration."""

    up_ms: float = 2.0
    compute_ms: float = 5.0
    down_ms: float = 2.0

    def __post_init__(self) -> None:
        values = (self.up_ms, self.compute_ms, self.down_ms)
        if not all(math.isfinite(v) and 0 <= v <= MAX_STAGE_MS for v in values) \
                or max(values) <= 0:
            raise ValueError(f"invalid workload {self.label()}: {_ALLOWED}")

    @classmethod
    def parse(cls, text: str) -> "Workload":
        """``"UP,COMPUTE,DOWN"`` in milliseconds, e.g. ``"2,5,2"``."""
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 3:
            raise ValueError(f"invalid workload {text!r}: expected three comma-separated "
                             f"values UP,COMPUTE,DOWN; {_ALLOWED}")
        try:
            up, comp, down = (float(p) for p in parts)
        except ValueError:
            raise ValueError(f"invalid workload {text!r}: {_ALLOWED}") from None
        try:
            return cls(up, comp, down)
        except ValueError:
            raise ValueError(f"invalid workload {text!r}: {_ALLOWED}") from None

    def label(self) -> str:
        return f"{self.up_ms:g}/{self.compute_ms:g}/{self.down_ms:g}"


@dataclass
class WorkloadResult:
    backend: str
    device: str
    workload: Dict[str, float]
    iterations: int
    up_bytes: int
    down_bytes: int
    bandwidth: Dict[str, float]
    op_ms: Dict[str, float]
    sequential_ms: float
    triple_ms: float
    floor_ms: float
    speedup: float
    efficiency: float
    floor_terms: Dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["sequential_its"] = 1e3 / self.sequential_ms
        d["triple_its"] = 1e3 / self.triple_ms
        return d


def calibrate(bw: Bandwidth, work: Workload, itemsize: int = 4) -> Tuple[int, int]:
    """Elements to upload and download so the copies take the asked time."""
    up = int(work.up_ms * 1e-3 * bw.h2d * 1e9) // itemsize
    down = int(work.down_ms * 1e-3 * bw.d2h * 1e9) // itemsize
    return max(up, 1), max(down, 1)


def host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_footprint(device: Any, work: Workload, bw: Bandwidth, n_up: int, n_down: int,
                    itemsize: int = 4, depth: int = 3) -> None:
    """Raise ValueError before allocating if the calibrated copies need more than a
    quarter of the device's memory (``depth`` slots of each ring) or of host memory
    (one pinned input and output)."""
    copy = (n_up + n_down) * itemsize
    checks = (("device", depth * copy, int(device.properties.get("total_memory") or 0)),
              ("host", copy, host_memory()))
    for where, need, total in checks:
        if total > 0 and need > total // 4:
            raise ValueError(
                f"workload {work.label()} ms needs {need / 2**30:.1f} GiB of {where} memory "
                f"at the measured copy bandwidth (H2D {bw.h2d:.1f} GB/s, D2H {bw.d2h:.1f} "
                f"GB/s), more than a quarter of the {total / 2**30:.1f} GiB there: ask for "
                f"shorter upload and download times")


def floor_ms(op_ms: Dict[str, float], up_bytes: int, down_bytes: int, bidir_gbs: float
             ) -> Tuple[float, Dict[str, float]]:
    terms = {"compute": op_ms["compute"], "upload": op_ms["upload"],
             "download": op_ms["download"],
             "both copies": (up_bytes + down_bytes) / (bidir_gbs * 1e9) * 1e3}
    return max(terms.values()), terms


class _Loop:
    """One coordinator and two rings running the workload's iterations."""

    def __init__(self, device: Any, n_up: int, n_down: int, spin_us: float,
                 depth: int = 3) -> None:
        self.coord = AsyncCoordinator(device, timing=True)
        self.n_down = n_down
        self.spin_us = spin_us
        self.src = TripleBuffer(device, n_up, np.float32, depth)
        self.dst = TripleBuffer(device, n_down, np.float32, depth)
        self.host_in = device.allocate_pinned(n_up * 4).view(np.float32)
        self.host_in[:] = np.random.default_rng(0).random(n_up, dtype=np.float32)
        self.host_out = device.allocate_pinned(n_down * 4).view(np.float32)

    def iteration(self) -> int:
        c = self.coord
        up = c.queue_upload(self.host_in, self.src)
        if self.spin_us > 0:
            c.queue_compute("spin", [up], extra=(self.spin_us,),
                            outputs=[(self.dst, self.n_down)])
        else:
            c.queue_compute("noop", [up], outputs=[(self.dst, self.n_down)])
        self.src.retire()  # the input slot is consumed: FREE again without a download
        down = c.queue_download(self.dst, self.host_out)
        self.dst.advance()
        return down

    def close(self) -> None:
        self.coord.close()
        self.src.close()
        self.dst.close()


def _trace_loops(loop: "_Loop", traces: Dict[str, Any], n: int) -> None:
    from .._trace import trace

    coord = loop.coord
    with trace() as seq:
        for _ in range(n):
            coord.wait(loop.iteration())
    with trace() as tri:
        for _ in range(n + 2):
            loop.iteration()
        coord.synchronize_all()
    traces["sequential"], traces["triple-buffered"] = seq, tri


def run_workload(device: Any, work: Workload, iterations: int = 50,
                 bw: Optional[Bandwidth] = None,
                 traces: Optional[Dict[str, Any]] = None) -> WorkloadResult:
    """Measure the workload sequentially and triple-buffered on ``device``.

    With a ``traces`` dict, a few more iterations of each loop run under
    ``pg.trace()`` after the timed ones, stored as ``traces["sequential"]`` and
    ``traces["triple-buffered"]``.
    """
    if bw is None:
        bw = measure_bandwidth(device, 32 << 20)
        n_up, n_down = calibrate(bw, work)
        check_footprint(device, work, bw, n_up, n_down)
        # bandwidth depends on the copy size: measure again at the calibrated size
        bw = measure_bandwidth(device, max(n_up, n_down, 1024) * 4)
    n_up, n_down = calibrate(bw, work)
    check_footprint(device, work, bw, n_up, n_down)
    loop = _Loop(device, n_up, n_down, work.compute_ms * 1e3)
    clock = time.perf_counter
    try:
        coord = loop.coord
        for _ in range(3):
            coord.wait(loop.iteration())
        coord.poll()
        t = clock()
        for _ in range(iterations):
            coord.wait(loop.iteration())
        sequential = (clock() - t) * 1e3 / iterations
        per_type: Dict[OpType, List[float]] = {t: [] for t in OpType}
        for done in coord.poll():
            if done.duration_ms is not None:
                per_type[done.op_type].append(done.duration_ms)
        op_ms = {"upload": median(per_type[OpType.UPLOAD]),
                 "compute": median(per_type[OpType.COMPUTE]),
                 "download": median(per_type[OpType.DOWNLOAD])}
        for _ in range(6):
            loop.iteration()
        coord.synchronize_all()
        t = clock()
        for _ in range(iterations):
            loop.iteration()
        coord.synchronize_all()
        triple = (clock() - t) * 1e3 / iterations
        if traces is not None:
            _trace_loops(loop, traces, min(iterations, 8))
    finally:
        loop.close()
    floor, terms = floor_ms(op_ms, n_up * 4, n_down * 4, bw.bidirectional)
    return WorkloadResult(
        backend=device.kind, device=device.name,
        workload={"up_ms": work.up_ms, "compute_ms": work.compute_ms, "down_ms": work.down_ms},
        iterations=iterations, up_bytes=n_up * 4, down_bytes=n_down * 4,
        bandwidth=bw.as_dict(), op_ms=op_ms, sequential_ms=sequential, triple_ms=triple,
        floor_ms=floor, speedup=sequential / triple, efficiency=floor / triple,
        floor_terms=terms)
