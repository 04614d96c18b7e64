"""The calibrated upload / compute / download workload of ``prism-gpu bench``.

Transfer sizes come from the measured copy bandwidth, so that upload and
download take the asked milliseconds; compute is the ``spin`` kernel. The
floor of one iteration is ``max(compute, up, down, (up + down bytes) / bidir)``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ._buffers import TripleBuffer
from ._coordinator import AsyncCoordinator
from ._measure import Bandwidth, measure_bandwidth, median
from ._ops import OpType

__all__ = ["Workload", "WorkloadResult", "calibrate", "run_workload"]


@dataclass
class Workload:
    up_ms: float = 2.0
    compute_ms: float = 5.0
    down_ms: float = 2.0

    @classmethod
    def parse(cls, text: str) -> "Workload":
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 3:
            raise ValueError(f"workload is UP,COMPUTE,DOWN in milliseconds, got {text!r}")
        try:
            up, comp, down = (float(p) for p in parts)
        except ValueError:
            raise ValueError(f"workload values must be numbers, got {text!r}") from None
        if min(up, comp, down) < 0 or max(up, comp, down) <= 0:
            raise ValueError("workload times must be >= 0 and not all zero")
        return cls(up, comp, down)

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
        self.src.get_download_buffer()
        self.src.advance()
        down = c.queue_download(self.dst, self.host_out)
        self.dst.advance()
        return down

    def close(self) -> None:
        self.coord.close()
        self.src.close()
        self.dst.close()


def run_workload(device: Any, work: Workload, iterations: int = 50,
                 bw: Optional[Bandwidth] = None) -> WorkloadResult:
    """Measure the workload sequentially and triple-buffered on ``device``."""
    if bw is None:
        bw = measure_bandwidth(device, 32 << 20)
        n_up, n_down = calibrate(bw, work)
        # bandwidth depends on the copy size: measure again at the calibrated size
        bw = measure_bandwidth(device, max(n_up, n_down, 1024) * 4)
    n_up, n_down = calibrate(bw, work)
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
