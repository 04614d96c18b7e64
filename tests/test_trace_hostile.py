"""Findings of a hostile review of tracing and closing (CPU backend), each a regression
test: traces shared by threads, traces whose end fails, reference events behind busy
lanes, two device objects of one device, closes refused from callbacks and kernels."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, List

import numpy as np
import pytest

import prism_gpu as pg


def test_a_trace_shared_by_threads_loses_nothing() -> None:
    # each thread joins the trace with its own coordinator while others' batches of
    # completed ops are being read: no "dictionary changed size", no op lost
    dev = pg.open_device("cpu")
    errors: List[BaseException] = []
    n, threads = 600, 6

    def worker() -> None:
        try:
            coord = pg.AsyncCoordinator(dev)
            for i in range(n):
                coord.queue_compute("noop", [], args=[])
                if i % 16 == 0:
                    coord.poll()
            coord.synchronize_all()
            coord.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the assert
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: the race shows every run
    try:
        with pg.trace() as tr:
            ts = [threading.Thread(target=worker) for _ in range(threads)]
            for t in ts:
                t.start()
                time.sleep(0.005)
            for t in ts:
                t.join()
    finally:
        sys.setswitchinterval(old)
        dev.close()
    assert errors == []
    assert len(tr.ops) == n * threads and tr.lost == 0


def test_ops_of_a_trace_whose_end_failed_stay_out_of_the_next() -> None:
    ctx = pg.ManagedGpuContext(backend="cpu")
    other = pg.AsyncCoordinator(pg.open_device("cpu"))
    mine = pg.AsyncCoordinator(ctx)
    with pytest.raises(pg.InvalidOperationError):
        with pg.trace() as tr1:
            mine.queue_compute("noop", [], args=[])
            other.queue_compute(lambda: time.sleep(0.2), [], args=[], )  # still running
            ctx.close()  # the trace cannot wait for `mine` now: leaving it raises
    with pg.trace() as tr2:
        other.queue_compute("noop", [], args=[])
    assert [o.name for o in tr2.ops] == ["noop"]   # not the lambda of the first trace
    assert [o.name for o in tr1.ops] == ["<lambda>"]  # which the first trace kept
    other.close()


def test_a_reference_event_behind_a_busy_lane_delays_reading_never_fails() -> None:
    # the trace's clock starts on the lane of its first op, still running work queued
    # before the trace; ops completing on other lanes wait to be read, none is lost
    dev = pg.open_device("cpu")
    coord = pg.AsyncCoordinator(dev)
    coord.queue_compute(lambda: time.sleep(0.3), [], args=[])  # before the trace
    x = np.ones(16, np.float32)
    with pg.trace() as tr:
        coord.queue_compute("noop", [], args=[])  # the first traced op, behind it
        ups = []
        for _ in range(300):  # more than a trace holds before reading
            buf = pg.TripleBuffer(dev, 16, depth=1)
            ups.append(coord.queue_upload(x, buf))
            coord.wait(ups[-1])
    assert len(tr.ops) == 301 and tr.lost == 0
    assert len(coord.poll()) == 302  # every op reported, the one before the trace too
    assert coord.statistics().in_flight == 0
    coord.close()
    dev.close()


def test_two_objects_of_one_device_share_its_clock() -> None:
    d1, d2 = pg.open_device("cpu"), pg.open_device("cpu")
    a, b = pg.AsyncCoordinator(d1), pg.AsyncCoordinator(d2)
    with pg.trace() as tr:
        a.wait(a.queue_compute(lambda: time.sleep(0.05), [], args=[]))
        time.sleep(0.2)
        b.wait(b.queue_compute("noop", [], args=[]))
    first, second = tr.ops
    assert second.start_ms >= first.end_ms + 150  # not both drawn at 0
    for c in (a, b):
        c.close()
    d1.close()
    d2.close()


def test_closing_a_context_from_its_callback_is_refused_and_changes_nothing() -> None:
    ctx = pg.ManagedGpuContext(backend="cpu")
    coord = ctx.async_coordinator()
    assert coord is not None
    seen: List[BaseException] = []

    def closer(report: Any, ms: Any) -> None:
        try:
            ctx.close()
        except pg.InvalidOperationError as exc:
            seen.append(exc)

    coord.wait(coord.queue_compute("noop", [], args=[], on_done=closer))
    assert len(seen) == 1 and "close" in str(seen[0])
    assert not ctx.closed and not ctx.device.closed and not coord.closed
    coord.wait(coord.queue_compute("noop", [], args=[]))  # still usable
    ctx.close()
    assert ctx.closed and coord.closed


def test_closing_a_context_from_a_cpu_kernel_is_refused_not_a_hang() -> None:
    ctx = pg.ManagedGpuContext(backend="cpu")
    coord = ctx.async_coordinator()
    assert coord is not None

    def kernel() -> None:
        ctx.close()  # runs on the compute stream's thread: closing waits for that stream

    op = coord.queue_compute(kernel, [], args=[])
    with pytest.raises(pg.KernelError, match="may not close its context"):
        coord.wait(op, timeout=30)
    assert not ctx.closed
    coord.wait(coord.queue_compute("noop", [], args=[]))
    ctx.close()
