"""With a latch holding a stream, queueing never blocks and nothing behind it completes."""

from __future__ import annotations

import threading
from typing import Any, Set

import numpy as np
import pytest

import prism_gpu as pg
from _support import F32, Latch, make_latch, rand


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(2024)


def test_nothing_behind_a_held_compute_stream_completes(
        coord: pg.AsyncCoordinator, device: Any, latch: Latch, rng: np.random.Generator) -> None:
    buf = pg.TripleBuffer(device, 64, dtype=F32)
    held = coord.queue_compute("latch")
    assert latch.wait_entered()

    xs, outs, behind = [], [], [held]
    for _ in range(2):                      # two full rounds queue without blocking
        x, out = rand(rng, 64), np.empty(64, F32)
        up = coord.queue_upload(x, buf)
        behind.append(coord.queue_compute("scale", [up]))
        behind.append(coord.queue_download(buf, out))
        buf.advance()
        xs.append(x)
        outs.append(out)
    assert latch.held

    reported: Set[int] = {int(r.op_id) for r in coord.poll()}
    assert not reported & {int(op) for op in behind}
    assert not any(coord.is_complete(op) for op in behind)
    with pytest.raises(pg.SynchronizationError):
        coord.wait(behind[1], timeout=0.05)
    with pytest.raises(pg.SynchronizationError):
        coord.wait(held, timeout=0.05)
    assert latch.held

    latch.release()
    coord.wait(behind[-1])
    coord.synchronize_all()
    for x, out in zip(xs, outs):
        np.testing.assert_array_equal(out, x * F32(2))
    later = [int(r.op_id) for r in coord.poll()]
    assert set(later) >= {int(op) for op in behind}
    assert not reported & set(later)                # each op reported once
    assert len(later) == len(set(later))
    assert all(coord.is_complete(op) for op in behind)


def test_upload_waits_for_the_slot_download_on_the_device(
        coord: pg.AsyncCoordinator, device: Any, latch: Latch, rng: np.random.Generator) -> None:
    """Re-uploading a slot whose download is held neither blocks nor overwrites it."""
    buf = pg.TripleBuffer(device, 32, dtype=F32, depth=1)
    x0, x1 = rand(rng, 32), rand(rng, 32)
    out0, out1 = np.empty(32, F32), np.empty(32, F32)
    up0 = coord.queue_upload(x0, buf)
    coord.queue_compute("latch", [up0])
    dn0 = coord.queue_download(buf, out0)
    assert buf.advance() is True
    up1 = coord.queue_upload(x1, buf)               # returns while the slot is still held
    expected1 = x1 * F32(2)
    x1[:] = 0                                       # the caller may reuse its array now
    assert latch.held
    assert not coord.is_complete(dn0)

    latch.release()
    coord.wait(dn0)
    np.testing.assert_array_equal(out0, x0)
    coord.queue_compute("scale", [up1])
    coord.wait(coord.queue_download(buf, out1))
    np.testing.assert_array_equal(out1, expected1)


def test_queueing_past_max_in_flight_waits_for_the_oldest(backend: str, device: Any) -> None:
    latch = make_latch(backend)
    timer = threading.Timer(0.2, latch.release)
    with pg.AsyncCoordinator(device, max_in_flight=4) as coord:
        try:
            coord.register_kernel("latch", latch.kernel)
            coord.queue_compute("latch")
            for _ in range(3):
                coord.queue_compute("noop")
            assert coord.statistics().in_flight == 4
            assert latch.held
            timer.start()
            coord.queue_compute("noop")             # blocks until the latch op completes
            assert latch.released
            assert coord.statistics().in_flight <= 4
        finally:
            latch.release()
            timer.cancel()
            if timer.is_alive():
                timer.join()
