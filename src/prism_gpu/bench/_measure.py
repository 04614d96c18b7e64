"""Measurements of the device at hand: copy bandwidths and event costs.

Everything here goes through the backend protocol, so the same code measures
the CUDA and the CPU backend. Device times come from timing events.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List

import numpy as np

__all__ = ["Bandwidth", "measure_bandwidth", "event_overhead_us", "median"]


def median(values: List[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


@dataclass
class Bandwidth:
    """Copy bandwidths in GB/s (1e9 bytes per second), measured at ``nbytes`` per copy."""

    h2d: float
    d2h: float
    bidirectional: float
    nbytes: int

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


class _Bench:
    """Pinned host and device memory plus timing events for copy measurements."""

    def __init__(self, device: Any, nbytes: int) -> None:
        self.device = device
        self.nbytes = nbytes
        self.host_in = device.allocate_pinned(nbytes)
        self.host_out = device.allocate_pinned(nbytes)
        self.host_in[:] = np.random.default_rng(1).integers(0, 255, nbytes, dtype=np.uint8)
        self.dev_a = device.allocate(nbytes)
        self.dev_b = device.allocate(nbytes)
        self.s1 = device.create_stream()
        self.s2 = device.create_stream()
        self.ev = [device.create_event(timing=True) for _ in range(4)]

    def timed(self, enqueue: Callable[[], None], repeats: int) -> float:
        e0, e1 = self.ev[0], self.ev[1]
        enqueue()  # warm-up
        self.s1.synchronize()
        times = []
        for _ in range(repeats):
            self.s1.record(e0)
            enqueue()
            self.s1.record(e1)
            e1.synchronize()
            times.append(e1.elapsed_ms(e0))
        return median(times)

    def bidirectional_ms(self, repeats: int) -> float:
        e0, e1, e2, e3 = self.ev
        s1, s2 = self.s1, self.s2
        times = []
        for _ in range(repeats + 1):
            s1.record(e0)
            s2.wait(e0)
            s1.copy_h2d(self.dev_a, self.host_in)
            s2.copy_d2h(self.host_out, self.dev_b)
            s2.record(e2)
            s1.wait(e2)
            s1.record(e3)
            e3.synchronize()
            times.append(e3.elapsed_ms(e0))
        return median(times[1:])

    def close(self) -> None:
        self.s1.synchronize()
        self.s2.synchronize()
        self.s1.close()
        self.s2.close()


def measure_bandwidth(device: Any, nbytes: int = 64 << 20, repeats: int = 5) -> Bandwidth:
    """Pinned H2D, D2H and concurrent bidirectional bandwidth of ``device``."""
    b = _Bench(device, int(nbytes))
    try:
        h2d = b.timed(lambda: b.s1.copy_h2d(b.dev_a, b.host_in), repeats)
        d2h = b.timed(lambda: b.s1.copy_d2h(b.host_out, b.dev_b), repeats)
        bidi = b.bidirectional_ms(repeats)
    finally:
        b.close()
    gb = nbytes / 1e9
    return Bandwidth(h2d=gb / (h2d / 1e3), d2h=gb / (d2h / 1e3),
                     bidirectional=2 * gb / (bidi / 1e3), nbytes=int(nbytes))


def event_overhead_us(device: Any, n: int = 2000) -> Dict[str, float]:
    """Host microseconds per event create, record, query and stream wait."""
    stream = device.create_stream()
    other = device.create_stream()
    clock = time.perf_counter
    try:
        t = clock()
        events = [device.create_event() for _ in range(n)]
        create = (clock() - t) / n
        stream.synchronize()
        t = clock()
        for ev in events:
            stream.record(ev)
        record = (clock() - t) / n
        stream.synchronize()
        t = clock()
        for ev in events:
            ev.query()
        query = (clock() - t) / n
        t = clock()
        for ev in events:
            other.wait(ev)
        wait = (clock() - t) / n
        other.synchronize()
        for ev in events:
            close = getattr(ev, "close", None)
            if close is not None:
                close()
    finally:
        stream.close()
        other.close()
    return {"create": create * 1e6, "record": record * 1e6, "query": query * 1e6,
            "wait": wait * 1e6}
