"""Failures, their propagation, close with work in flight, and long runs on bounded pools."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref
from typing import Any, List

import numpy as np
import pytest

import prism_gpu as pg
from _support import Boom, boom, F32, make_latch, rand, release_timer


_boom = boom


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(99)


def _clean_round(coord: pg.AsyncCoordinator, buf: pg.TripleBuffer,
                 rng: np.random.Generator) -> None:
    x, out = rand(rng, buf.size()), np.empty(buf.size(), F32)
    up = coord.queue_upload(x, buf)
    coord.queue_compute("scale", [up])
    coord.wait(coord.queue_download(buf, out))
    assert buf.advance() is True
    np.testing.assert_array_equal(out, x * F32(2))


@pytest.mark.parametrize("timing", [False, True], ids=["plain", "timing"])
@pytest.mark.parametrize("in_flight", [False, True], ids=["failed-before", "in-flight"])
def test_failing_kernel_and_its_dependents(backend: str, device: Any, rng: np.random.Generator,
                                           timing: bool, in_flight: bool) -> None:
    """KernelError at wait; dependents fail with the root op; the coordinator keeps working.

    ``in_flight``: the dependents are queued while the failing kernel has not run yet
    (a latch holds the compute stream), so the failure must travel on the device.
    """
    raised: List[BaseException] = []

    def boom(a: Any) -> None:
        raised.append(Boom("kernel exploded"))
        raise raised[-1]

    latch = make_latch(backend) if in_flight else None
    with pg.AsyncCoordinator(device, timing=timing) as coord:
        try:
            coord.register_kernel("boom", boom)
            buf = pg.TripleBuffer(device, 16, dtype=F32)
            if latch is not None:
                coord.register_kernel("latch", latch.kernel)
                coord.queue_compute("latch")
            up = coord.queue_upload(rand(rng, 16), buf)
            bad = coord.queue_compute("boom", [up])
            if latch is None:
                with pytest.raises(pg.KernelError):
                    coord.wait(bad)
            after = coord.queue_compute("scale", [bad])
            after2 = coord.queue_compute("scale", [after])
            out = np.full(16, np.nan, dtype=F32)
            dn = coord.queue_download(buf, out)
            if latch is not None:
                assert latch.held
                latch.release()

            with pytest.raises(pg.KernelError) as info:
                coord.wait(bad)
            err = info.value
            assert err.kernel == "boom" and err.op_id == bad
            assert "boom" in str(err) and str(int(bad)) in str(err)
            assert err.__cause__ is raised[0]
            for dep in (after, after2, dn):
                with pytest.raises(pg.DependencyFailedError) as dinfo:
                    coord.wait(dep)
                assert dinfo.value.root_op == bad, dep
            reports = {int(r.op_id): r for r in coord.poll()}
            assert isinstance(reports[int(bad)].error, pg.KernelError)
            assert isinstance(reports[int(dn)].error, pg.DependencyFailedError)

            assert buf.advance() is True                # no slot is stuck
            for _ in range(4):
                _clean_round(coord, buf, rng)
        finally:
            if latch is not None:
                latch.release()


def test_dependents_fail_under_backpressure(device: Any, rng: np.random.Generator) -> None:
    """With max_in_flight=1 queueing retires the failing op first: dependents still fail."""
    with pg.AsyncCoordinator(device, max_in_flight=1) as coord:
        coord.register_kernel("boom", _boom)
        buf = pg.TripleBuffer(device, 16, dtype=F32)
        up = coord.queue_upload(rand(rng, 16), buf)
        bad = coord.queue_compute("boom", [up])
        after = coord.queue_compute("scale", [bad])
        dn = coord.queue_download(buf, np.empty(16, F32))
        for dep in (after, dn):
            with pytest.raises(pg.DependencyFailedError) as info:
                coord.wait(dep)
            assert info.value.root_op == bad
        buf.advance()
        _clean_round(coord, buf, rng)


def test_close_waits_for_ops_in_flight(backend: str, device: Any, rng: np.random.Generator,
                                       no_thread_leaks: None) -> None:
    latch = make_latch(backend)
    coord = pg.AsyncCoordinator(device)
    with release_timer(latch) as timer:
        try:
            coord.register_kernel("latch", latch.kernel)
            buf = pg.TripleBuffer(device, 64, dtype=F32)
            x, out = rand(rng, 64), np.full(64, np.nan, dtype=F32)
            coord.queue_compute("latch")
            up = coord.queue_upload(x, buf)
            coord.queue_compute("scale", [up])
            coord.queue_download(buf, out)
            assert latch.held
            timer.start()
            coord.close()
            assert latch.finished
            assert coord.closed
            np.testing.assert_array_equal(out, x * F32(2))
        finally:
            latch.release()
            coord.close()


def _slot_arrays_of_rounds(coord: pg.AsyncCoordinator, buf: pg.TripleBuffer,
                           rng: np.random.Generator) -> List[weakref.ref]:
    """Run one clean round per slot; weak references to the device arrays kernels got."""
    refs: List[weakref.ref] = []
    coord.register_kernel("grab", lambda a: refs.append(weakref.ref(a)))
    for _ in range(buf.depth):
        up = coord.queue_upload(rand(rng, buf.size()), buf)
        coord.queue_compute("grab", [up])
        coord.wait(coord.queue_download(buf, np.empty(buf.size(), F32)))
        assert buf.advance() is True
    coord.synchronize_all()
    coord.poll()
    return refs


def test_close_frees_device_memory(backend: str, device: Any,
                                   rng: np.random.Generator) -> None:
    if backend != "cpu":
        pytest.skip("weak references to device arrays: CPU backend only")
    coord = pg.AsyncCoordinator(device)
    buf = pg.TripleBuffer(device, 256, dtype=F32)
    refs = _slot_arrays_of_rounds(coord, buf, rng)
    coord.close()
    buf.close()
    gc.collect()
    assert [r() is None for r in refs] == [True] * buf.depth


def test_dropped_buffer_is_freed_while_the_coordinator_lives(
        backend: str, coord: pg.AsyncCoordinator, device: Any,
        rng: np.random.Generator) -> None:
    """A long-lived coordinator must not keep the memory of buffers the caller dropped."""
    if backend != "cpu":
        pytest.skip("weak references to device arrays: CPU backend only")
    buf = pg.TripleBuffer(device, 256, dtype=F32)
    refs = _slot_arrays_of_rounds(coord, buf, rng)
    del buf
    gc.collect()
    assert [r() is None for r in refs] == [True] * 3


def test_100k_ops_on_a_bounded_event_pool(device: Any, rng: np.random.Generator) -> None:
    max_in_flight = 64
    x, out = rand(rng, 4), np.empty(4, F32)
    worst_in_flight = worst_pooled = 0
    with pg.AsyncCoordinator(device, max_in_flight=max_in_flight) as coord:
        buf = pg.TripleBuffer(device, 4, dtype=F32)
        rounds = 33_334
        for i in range(rounds):
            up = coord.queue_upload(x, buf)
            coord.queue_compute("noop", [up])
            coord.queue_download(buf, out)
            buf.advance()
            stats = coord.statistics()
            worst_in_flight = max(worst_in_flight, stats.in_flight)
            worst_pooled = max(worst_pooled, stats.events_pooled)
            if i % 1000 == 0:
                assert all(r.error is None for r in coord.poll())
        coord.synchronize_all()
        final = coord.statistics()
        assert all(r.error is None for r in coord.poll())
    assert final.issued == 3 * rounds >= 100_000
    assert final.in_flight == 0
    assert worst_in_flight <= max_in_flight
    assert worst_pooled <= max_in_flight + 4
    assert final.events_pooled <= max_in_flight + 4
    np.testing.assert_array_equal(out, x)


_LEFT_OPEN = r"""
import faulthandler, sys
faulthandler.dump_traceback_later(15, exit=True)   # a hang at exit dumps its stack and ends
import numpy as np, prism_gpu as pg
backend = sys.argv[1]
dev = pg.open_device(backend)
coord = pg.AsyncCoordinator(dev)
buf = pg.TripleBuffer(dev, 8)
coord.queue_compute("scale", [coord.queue_upload(np.ones(8, np.float32), buf)])
ctx = pg.ManagedGpuContext(backend=backend)
results = pg.stream_map("scale", [np.ones(4, np.float32)] * 5, ctx=ctx)
next(results)
print("left open")
"""


def test_interpreter_exits_with_objects_left_open(backend: str) -> None:
    """close() is the mechanism, __del__ only a safety net: it must not hang the exit."""
    proc = subprocess.run([sys.executable, "-c", _LEFT_OPEN, backend], capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.strip() == "left open", proc.stderr
    assert proc.returncode == 0, f"exit failed or hung (rc {proc.returncode}):\n{proc.stderr}"
