"""The coordinator's queue calls on both cores: the compiled one (where built) takes the
common cases itself and hands the rest to the Python reference, so both must answer
alike, and neither may keep a reference to what a completed op used."""

from __future__ import annotations

import gc
import sys
from typing import Any

import numpy as np
import pytest

import prism_gpu as pg
from prism_gpu import _core, _queue
from prism_gpu._coordinator import AsyncCoordinator
from _support import mul3, over_reference

# the coordinator over each core (the Python one: the same class over the reference)
PyCoordinator = over_reference(AsyncCoordinator, _queue.PyQueueCore)
CORES = [pytest.param(PyCoordinator, id="python"),
         pytest.param(AsyncCoordinator, id="compiled", marks=pytest.mark.skipif(
             not _core.COMPILED, reason=f"the compiled core is {_core.STATUS}"))]
N = 256


@pytest.fixture(params=CORES)
def make(request: Any, device: Any) -> Any:
    made = []

    def new(**kw: Any) -> Any:
        c = request.param(device, **kw)
        made.append(c)
        return c
    yield new
    for c in made:
        c.close()


def _live_ops() -> int:
    """Ops of either core alive now (both are tracked by the garbage collector)."""
    gc.collect()
    return sum(type(o) in (_core.Op, _core.PyOp) for o in gc.get_objects())


@pytest.mark.parametrize("callbacks", [False, True])
def test_pattern_one_answers_alike_and_holds_no_references(make: Any, device: Any,
                                                           callbacks: bool) -> None:
    """Iterations of upload, compute (by name, on the upload), download and advance give
    the right data, and call each on_done once; afterwards the inputs, outputs, ring,
    kernel and callback are referenced as often as before the iterations."""
    coord = make()
    reports: list = []

    def on_done(report: Any, ms: Any) -> None:
        reports.append(report.op_type)
    kw = {"on_done": on_done} if callbacks else {}
    kernel = mul3()
    coord.register_kernel("mul3", kernel)
    buf = pg.TripleBuffer(device, N)
    rng = np.random.default_rng(7)
    x = rng.random(N, dtype=np.float32)
    out = np.full(N, np.nan, dtype=np.float32)

    def iterate(k: int) -> None:
        for _ in range(k):
            u = coord.queue_upload(x, buf, **kw)
            coord.queue_compute("mul3", [u], **kw)
            d = coord.queue_download(buf, out, **kw)
            buf.advance()
        coord.wait(d)

    iterate(3)
    coord.synchronize_all()
    coord.poll()
    watched = (x, out, buf, kernel, coord, on_done)
    before = [sys.getrefcount(o) for o in watched]
    ops_before = _live_ops()
    reports.clear()
    iterate(300)
    np.testing.assert_allclose(out, 3 * x, rtol=1e-6)
    coord.synchronize_all()
    coord.poll()
    assert [sys.getrefcount(o) for o in watched] == before
    assert _live_ops() == ops_before  # (the slots keep their last writer and readers)
    assert sorted(reports) == (sorted([pg.OpType.UPLOAD, pg.OpType.COMPUTE,
                                       pg.OpType.DOWNLOAD] * 300) if callbacks else [])


def test_the_uncommon_cases_answer_alike(make: Any, device: Any) -> None:
    """What the compiled calls hand to the reference: a full ring, a short batch, a
    2-d array, a read-only or too small destination, another dtype, an on_done, explicit
    args, a dependency that failed. Each answer (or refusal, with its message) is the
    same on both cores, and a refusal changes nothing."""
    coord = make()
    coord.register_kernel("mul3", mul3())
    buf = pg.TripleBuffer(device, N, depth=2)
    x = np.random.default_rng(1).random(N, dtype=np.float32)
    seen: list = []
    u1 = coord.queue_upload(x, buf, on_done=lambda r, ms: seen.append(r.op_type))
    u2 = coord.queue_upload(x[: N // 2].reshape(2, -1), buf)  # short batch, 2-d
    with pytest.raises(pg.BufferUnavailableError, match="no FREE slot"):
        coord.queue_upload(x, buf)
    assert [str(s) for s in buf.get_states()] == ["uploading", "uploading"]
    with pytest.raises(pg.TransferError, match="dtype float64"):
        coord.queue_upload(x.astype(np.float64), pg.TripleBuffer(device, N))
    coord.queue_compute("mul3", [u1])
    coord.queue_compute("mul3", deps=[u2], extra=None, outputs=())
    ro = np.zeros(N, np.float32)
    ro.flags.writeable = False
    with pytest.raises(pg.TransferError, match="read-only"):
        coord.queue_download(buf, ro)
    with pytest.raises(pg.TransferError, match="holds 3 elements"):
        coord.queue_download(buf, np.zeros(3, np.float32))
    assert [str(s) for s in buf.get_states()] == ["processing", "processing"]
    a = np.full(N, np.nan, np.float32)
    b = np.full((2, N // 4), np.nan, np.float32)
    coord.wait(coord.queue_download(buf, a))
    coord.wait(coord.queue_download(buf, b))
    np.testing.assert_allclose(a, 3 * x, rtol=1e-6)
    np.testing.assert_allclose(b.reshape(-1), 3 * x[: N // 2], rtol=1e-6)
    coord.poll()
    assert seen == [pg.OpType.UPLOAD]
    failed = coord.queue_compute(lambda: 1 / 0, [], args=[])
    later = coord.queue_compute("mul3", [failed])
    with pytest.raises(pg.DependencyFailedError, match=f"depends on op {int(failed)}"):
        coord.wait(later)
    assert isinstance(coord.error(failed), pg.KernelError)
    coord.synchronize_all()  # both were reported (the dependant's error names its root)


def test_extra_values_reach_the_kernel_on_both_cores(make: Any, device: Any) -> None:
    """A tuple of extra values (the compiled calls take it themselves), a list (the
    reference's) and none (the kernel's defaults) reach the kernel after its arrays."""
    coord = make()
    got: list = []

    def record(a: Any, v: Any = 7.0) -> None:
        got.append((len(a), float(v)))

    coord.register_kernel("record", record)
    buf = pg.TripleBuffer(device, N)
    x = np.random.default_rng(3).random(N, dtype=np.float32)
    for extra in ((2.5,), [4.5], None):
        u = coord.queue_upload(x, buf)
        coord.wait(coord.queue_compute("record", [u], extra=extra))
        buf.retire()
    assert got == [(N, 2.5), (N, 4.5), (N, 7.0)]


def _outcome(fn: Any) -> Any:
    try:
        r = fn()
    except Exception as exc:  # noqa: BLE001 - compared between the cores
        return type(exc).__name__, str(exc)
    return "ok", None if r is None else int(r)


def test_wrong_calls_are_refused_alike_and_change_nothing(device: Any) -> None:
    """Hostile calls on both cores: the same outcome (the error's type and message, or the
    id issued), and the rings in the same states afterwards."""
    if not _core.COMPILED:
        pytest.skip(f"the compiled core is {_core.STATUS}")
    x = np.random.default_rng(5).random(N, dtype=np.float32)
    ro = x.copy()
    ro.flags.writeable = False
    calls = [
        lambda c, b: c.queue_upload(x, b, on_done=123),
        lambda c, b: c.queue_upload(x, b, bogus=1),
        lambda c, b: c.queue_upload(x, "ring"),
        lambda c, b: c.queue_upload(list(x), b),
        lambda c, b: c.queue_upload(x[::2], b),
        lambda c, b: c.queue_upload(np.zeros(0, np.float32), b),
        lambda c, b: c.queue_upload(np.zeros(N + 1, np.float32), b),
        lambda c, b: c.queue_upload(x),
        lambda c, b: c.queue_compute("mul3", 10 ** 6),
        lambda c, b: c.queue_compute("nope", []),
        lambda c, b: c.queue_compute("mul3", [0], deps=[0]),
        lambda c, b: c.queue_compute("mul3", [0], extra=5),
        lambda c, b: c.queue_compute("mul3", [0], on_done="no"),
        lambda c, b: c.queue_compute("mul3", "0"),
        lambda c, b: c.queue_download(b, x),
        lambda c, b: c.queue_upload(x, b),
        lambda c, b: c.queue_compute("mul3", [0], extra=(1.0,)),
        lambda c, b: c.queue_download(b, ro),
        lambda c, b: c.queue_download(b, x[:3]),
        lambda c, b: c.queue_download(b, x.reshape(4, -1)[:, :8]),
        lambda c, b: c.queue_download(b, x, on_done=print, extra=1),
        lambda c, b: c.queue_upload(x.astype(np.float64), b),
    ]
    results = []
    for cls in (PyCoordinator, AsyncCoordinator):
        coord = cls(device)
        try:
            coord.register_kernel("mul3", mul3())
            buf = pg.TripleBuffer(device, N)
            outcomes = [_outcome(lambda: call(coord, buf)) for call in calls]
            results.append((outcomes, [str(s) for s in buf.get_states()]))
        finally:
            coord.close_collecting()
    assert results[0] == results[1]


def test_a_callback_that_rebinds_the_engine_mid_call_is_survived(make: Any,
                                                                 device: Any) -> None:
    """A throttled queue call runs earlier ops' callbacks inside it; one that rebinds the
    coordinator's engine must not free the engine the call is using (the compiled calls
    borrowed it). Both cores queue the op on the engine they started with."""
    coord = make(max_in_flight=1)
    engine = coord._engine
    buf = pg.TripleBuffer(device, N)
    x = np.random.default_rng(9).random(N, dtype=np.float32)

    def rebind(report: Any, ms: Any) -> None:
        coord._engine = None

    coord.queue_upload(x, buf, on_done=rebind)
    second = coord.queue_upload(x, buf)
    assert int(second) == 1 and coord._engine is None
    coord._engine = engine  # (to close it)


def test_sync_mode_turned_on_by_a_callback_settles_the_call(make: Any, device: Any) -> None:
    coord = make(max_in_flight=1)
    buf = pg.TripleBuffer(device, N)
    x = np.random.default_rng(11).random(N, dtype=np.float32)

    def turn_on(report: Any, ms: Any) -> None:
        pg.set_sync_mode(True)

    try:
        coord.queue_upload(x, buf, on_done=turn_on)
        second = coord.queue_upload(x, buf)
        assert coord.in_flight == 0 and coord.is_complete(second)
    finally:
        pg.set_sync_mode(False)


def test_a_dependency_failure_names_its_root_as_a_number(make: Any, device: Any) -> None:
    """The root of a dependency failure is named "op 5" (an OpId was formatted as
    "OpId(5)" where the id came back from the caller), and root_op is a plain int."""
    coord = make()
    failed = coord.queue_compute(lambda: 1 / 0, [], args=[])
    with pytest.raises(pg.KernelError):
        coord.wait(failed)  # complete (and reported) before the dependant is queued
    later = coord.queue_compute(lambda: None, [failed], args=[])
    with pytest.raises(pg.DependencyFailedError) as info:
        coord.wait(later)
    assert f"depends on op {int(failed)}," in str(info.value)
    assert "OpId" not in str(info.value) and type(info.value.root_op) is int
