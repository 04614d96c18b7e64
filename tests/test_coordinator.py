"""AsyncCoordinator: data flow, op ids, completion reports and rejected calls."""

from __future__ import annotations

import threading
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prism_gpu as pg
from _support import F32, add1, join, mul3, rand, recorder, snapshot

FREE, UP, PROC, DOWN = (pg.BufferState.FREE, pg.BufferState.UPLOADING,
                        pg.BufferState.PROCESSING, pg.BufferState.DOWNLOADING)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


# --- data flow -----------------------------------------------------------------------------

def test_pattern1_loop(coord: pg.AsyncCoordinator, device: Any, rng: np.random.Generator) -> None:
    buf = pg.TripleBuffer(device, 1000, dtype=F32)
    inputs, outputs, downloads = [], [], []
    for _ in range(12):
        x = rand(rng, 1000)
        out = np.full(1000, np.nan, dtype=F32)
        up = coord.queue_upload(x, buf)
        coord.queue_compute("scale", [up])
        downloads.append(coord.queue_download(buf, out))
        assert buf.advance() is True
        inputs.append(x.copy())
        outputs.append(out)
    for dn in downloads:
        coord.wait(dn)
    for x, out in zip(inputs, outputs):
        np.testing.assert_array_equal(out, x * F32(2))


def test_host_input_may_change_after_queue_upload(coord: pg.AsyncCoordinator, device: Any,
                                                  rng: np.random.Generator) -> None:
    buf = pg.TripleBuffer(device, 64, dtype=F32)
    x = rand(rng, 64)
    expected = x * F32(2)
    up = coord.queue_upload(x, buf)
    x[:] = 0
    coord.queue_compute("scale", [up])
    out = np.empty(64, F32)
    coord.wait(coord.queue_download(buf, out))
    np.testing.assert_array_equal(out, expected)


def test_short_last_batch(coord: pg.AsyncCoordinator, device: Any,
                          rng: np.random.Generator) -> None:
    """Kernels see the valid length; downloads copy only that; a full batch resets it."""
    seen: List[Tuple[str, List[np.ndarray]]] = []
    coord.register_kernel("rec", recorder(seen, "rec", lambda a: np.multiply(a, F32(2), out=a)))
    buf = pg.TripleBuffer(device, 100, dtype=F32, depth=1)

    short = rand(rng, 37)
    up = coord.queue_upload(short, buf)
    coord.queue_compute("rec", [up])
    out = np.full(100, -7.0, dtype=F32)
    coord.wait(coord.queue_download(buf, out))
    buf.advance()
    assert [len(a) for a in seen[0][1]] == [37]
    np.testing.assert_array_equal(out[:37], short * F32(2))
    np.testing.assert_array_equal(out[37:], np.full(63, -7.0, dtype=F32))

    full = rand(rng, 100)          # the same slot again, at full length
    up = coord.queue_upload(full, buf)
    coord.queue_compute("rec", [up])
    out = np.empty(100, F32)
    coord.wait(coord.queue_download(buf, out))
    assert [len(a) for a in seen[1][1]] == [100]
    np.testing.assert_array_equal(out, full * F32(2))


def test_source_kernels_on_a_2d_upload(coord: pg.AsyncCoordinator, device: Any,
                                       rng: np.random.Generator) -> None:
    buf = pg.TripleBuffer(device, 48, dtype=F32)
    coord.register_kernel("add1", add1())
    x = rand(rng, 48).reshape(6, 8)
    up = coord.queue_upload(x, buf)
    coord.queue_compute("add1", [up])
    out = np.empty((6, 8), F32)
    coord.wait(coord.queue_download(buf, out))
    np.testing.assert_array_equal(out, x + F32(1))


def test_fork_join_on_one_upload(coord: pg.AsyncCoordinator, device: Any,
                                 rng: np.random.Generator) -> None:
    """Two computes on one upload, a third on both: it gets the shared slot once."""
    log: List[Tuple[str, List[np.ndarray]]] = []
    coord.register_kernel("a", recorder(log, "a", lambda a: np.add(a, F32(1), out=a)))
    coord.register_kernel("b", recorder(log, "b", lambda a: np.multiply(a, F32(3), out=a)))
    coord.register_kernel("c", recorder(log, "c"))
    buf = pg.TripleBuffer(device, 32, dtype=F32)
    x = rand(rng, 32)
    up = coord.queue_upload(x, buf)
    a = coord.queue_compute("a", [up])
    b = coord.queue_compute("b", [up])
    c = coord.queue_compute("c", [a, b])
    out = np.empty(32, F32)
    dn = coord.queue_download(buf, out)
    coord.wait(dn)
    coord.wait(c)
    assert [name for name, _ in log] == ["a", "b", "c"]
    (_, [a_in]), (_, [b_in]), (_, c_in) = log
    np.testing.assert_array_equal(a_in, x)
    np.testing.assert_array_equal(b_in, x + F32(1))
    assert len(c_in) == 1
    np.testing.assert_array_equal(c_in[0], (x + F32(1)) * F32(3))
    np.testing.assert_array_equal(out, (x + F32(1)) * F32(3))


def test_join_gets_arrays_in_dependency_order(coord: pg.AsyncCoordinator, device: Any,
                                              rng: np.random.Generator) -> None:
    log: List[Tuple[str, List[np.ndarray]]] = []
    coord.register_kernel("add1", add1())
    coord.register_kernel("mul3", mul3())
    coord.register_kernel("join", join())
    coord.register_kernel("rec", recorder(log, "rec"))
    b0 = pg.TripleBuffer(device, 16, dtype=F32)
    b1 = pg.TripleBuffer(device, 16, dtype=F32)
    x, y = rand(rng, 16), rand(rng, 16)
    u0, u1 = coord.queue_upload(x, b0), coord.queue_upload(y, b1)
    a = coord.queue_compute("add1", [u0])
    b = coord.queue_compute("mul3", [u1])
    coord.queue_compute("rec", [b, a])
    coord.queue_compute("join", [b, a])          # b1 += b0
    out0, out1 = np.empty(16, F32), np.empty(16, F32)
    d0, d1 = coord.queue_download(b0, out0), coord.queue_download(b1, out1)
    coord.wait(d0)
    coord.wait(d1)
    [(_, rec_in)] = log
    np.testing.assert_array_equal(rec_in[0], y * F32(3))
    np.testing.assert_array_equal(rec_in[1], x + F32(1))
    np.testing.assert_array_equal(out0, x + F32(1))
    np.testing.assert_array_equal(out1, y * F32(3) + (x + F32(1)))


def test_explicit_args_replace_the_arrays(coord: pg.AsyncCoordinator, device: Any,
                                          rng: np.random.Generator) -> None:
    seen: List[tuple] = []
    coord.register_kernel("rec", pg.Kernel.from_callable(lambda *a: seen.append(a), "rec"))
    buf = pg.TripleBuffer(device, 8, dtype=F32)
    up = coord.queue_upload(rand(rng, 8), buf)
    coord.wait(coord.queue_compute("rec", [up], args=(5, "x")))
    assert seen == [(5, "x")]


def test_callable_with_a_stream_keyword_gets_its_stream(coord: pg.AsyncCoordinator,
                                                        device: Any,
                                                        rng: np.random.Generator) -> None:
    streams: List[Any] = []
    coord.register_kernel("s", lambda a, *, stream: streams.append(stream))
    buf = pg.TripleBuffer(device, 8, dtype=F32)
    coord.wait(coord.queue_compute("s", [coord.queue_upload(rand(rng, 8), buf)]))
    assert len(streams) == 1 and streams[0] is coord.compute_stream()


# --- op ids and completion ---------------------------------------------------------------

def _round(coord: pg.AsyncCoordinator, buf: pg.TripleBuffer, x: np.ndarray,
           out: np.ndarray) -> List[int]:
    ids = [coord.queue_upload(x, buf)]
    ids.append(coord.queue_compute("scale", [ids[0]]))
    ids.append(coord.queue_download(buf, out))
    buf.advance()
    return ids


def test_op_ids_start_at_zero_and_increase(coord: pg.AsyncCoordinator, device: Any,
                                           rng: np.random.Generator) -> None:
    buf = pg.TripleBuffer(device, 8, dtype=F32)
    out = np.empty(8, F32)
    ids = [i for _ in range(5) for i in _round(coord, buf, rand(rng, 8), out)]
    assert all(isinstance(i, int) for i in ids)
    assert [int(i) for i in ids] == list(range(15))


def test_poll_reports_each_op_once(coord: pg.AsyncCoordinator, device: Any,
                                   rng: np.random.Generator) -> None:
    buf = pg.TripleBuffer(device, 8, dtype=F32)
    out = np.empty(8, F32)
    types = {}
    reports: List[pg.CompletedOp] = []
    for _ in range(10):
        up, c, dn = _round(coord, buf, rand(rng, 8), out)
        types.update({up: pg.OpType.UPLOAD, c: pg.OpType.COMPUTE, dn: pg.OpType.DOWNLOAD})
        reports += coord.poll()
    coord.synchronize_all()
    reports += coord.poll()
    assert coord.poll() == []
    assert sorted(int(r.op_id) for r in reports) == sorted(int(i) for i in types)
    for r in reports:
        assert isinstance(r, pg.CompletedOp)
        assert r.op_type is types[r.op_id]
        assert r.error is None


def test_timing_gives_durations(device: Any, rng: np.random.Generator) -> None:
    with pg.AsyncCoordinator(device, timing=True) as coord:
        buf = pg.TripleBuffer(device, 8, dtype=F32)
        _round(coord, buf, rand(rng, 8), np.empty(8, F32))
        coord.synchronize_all()
        reports = coord.poll()
    assert len(reports) == 3
    for r in reports:
        assert isinstance(r.duration_ms, float) and r.duration_ms >= 0


def test_wait_on_finished_op(coord: pg.AsyncCoordinator, device: Any,
                             rng: np.random.Generator) -> None:
    buf = pg.TripleBuffer(device, 8, dtype=F32)
    x, out = rand(rng, 8), np.empty(8, F32)
    up, c, dn = _round(coord, buf, x, out)
    coord.wait(dn)
    coord.poll()
    coord.wait(dn)
    coord.wait(up, timeout=0)
    assert coord.is_complete(c)
    np.testing.assert_array_equal(out, x * F32(2))
    # depending on a finished op is fine too
    coord.wait(coord.queue_compute("noop", [up, c, dn]))


# --- rejected calls change nothing -------------------------------------------------------

def _rejects(coord: pg.AsyncCoordinator, bufs: List[pg.TripleBuffer], exc: type,
             call: Callable[[], Any], match: Optional[str] = None) -> pytest.ExceptionInfo:
    before = snapshot(coord, *bufs)
    with pytest.raises(exc, match=match) as info:
        call()
    assert snapshot(coord, *bufs) == before
    return info


def _still_works(coord: pg.AsyncCoordinator, buf: pg.TripleBuffer, rng: np.random.Generator,
                 expect_slot: int) -> None:
    """A full round after a rejection: right next id, right slot, right data."""
    issued = snapshot(coord)[0]
    x, out = rand(rng, buf.size()), np.empty(buf.size(), F32)
    up = coord.queue_upload(x, buf)
    assert int(up) == issued
    assert buf.get_states()[expect_slot] is UP
    coord.queue_compute("scale", [up])
    coord.wait(coord.queue_download(buf, out))
    buf.advance()
    np.testing.assert_array_equal(out, x * F32(2))


@pytest.mark.parametrize("bad", [
    pytest.param(lambda rng: rand(rng, 9), id="too-many-elements"),
    pytest.param(lambda rng: rng.standard_normal(8), id="float64-into-float32"),
    pytest.param(lambda rng: rand(rng, 16)[::2], id="non-contiguous"),
    pytest.param(lambda rng: [1.0] * 8, id="list"),
    pytest.param(lambda rng: np.empty(0, F32), id="empty"),
])
def test_bad_upload_data(coord: pg.AsyncCoordinator, device: Any, rng: np.random.Generator,
                         bad: Callable[[np.random.Generator], Any]) -> None:
    buf = pg.TripleBuffer(device, 8, dtype=F32)
    _round(coord, buf, rand(rng, 8), np.empty(8, F32))
    _rejects(coord, [buf], pg.TransferError, lambda: coord.queue_upload(bad(rng), buf))
    _still_works(coord, buf, rng, expect_slot=1)


def test_download_destination_too_small(coord: pg.AsyncCoordinator, device: Any,
                                        rng: np.random.Generator) -> None:
    buf = pg.TripleBuffer(device, 8, dtype=F32)
    up = coord.queue_upload(rand(rng, 8), buf)
    coord.queue_compute("scale", [up])
    _rejects(coord, [buf], pg.TransferError,
             lambda: coord.queue_download(buf, np.empty(7, F32)))
    _rejects(coord, [buf], pg.TransferError,
             lambda: coord.queue_download(buf, np.empty(8, np.float64)))
    assert buf.get_states() == [PROC, FREE, FREE]


def test_unknown_kernel_name(coord: pg.AsyncCoordinator, device: Any,
                             rng: np.random.Generator) -> None:
    buf = pg.TripleBuffer(device, 8, dtype=F32)
    up = coord.queue_upload(rand(rng, 8), buf)
    _rejects(coord, [buf], pg.PrismGpuError, lambda: coord.queue_compute("nope", [up]),
             match="nope")
    assert buf.get_states() == [UP, FREE, FREE]


@pytest.mark.parametrize("bad_id", [3, 1000, -1])
def test_op_id_never_issued(coord: pg.AsyncCoordinator, device: Any, rng: np.random.Generator,
                            bad_id: int) -> None:
    buf = pg.TripleBuffer(device, 8, dtype=F32)
    up = coord.queue_upload(rand(rng, 8), buf)
    coord.queue_upload(rand(rng, 8), buf)
    coord.queue_upload(rand(rng, 8), buf)          # ids 0..2 issued
    _rejects(coord, [buf], pg.InvalidDependencyError,
             lambda: coord.queue_compute("scale", [up, bad_id]))
    _rejects(coord, [buf], pg.InvalidOperationError, lambda: coord.wait(bad_id))
    assert buf.get_states() == [UP, UP, UP]


def test_op_id_from_another_coordinator(coord: pg.AsyncCoordinator, device: Any,
                                        rng: np.random.Generator) -> None:
    buf = pg.TripleBuffer(device, 8, dtype=F32)
    other_buf = pg.TripleBuffer(device, 8, dtype=F32)
    with pg.AsyncCoordinator(device) as other:
        foreign = other.queue_upload(rand(rng, 8), other_buf)      # id 0 there
        up = coord.queue_upload(rand(rng, 8), buf)                 # id 0 here too
        assert int(foreign) == int(up)
        _rejects(coord, [buf], pg.InvalidDependencyError,
                 lambda: coord.queue_compute("scale", [foreign]))
        _rejects(coord, [buf], pg.InvalidOperationError, lambda: coord.wait(foreign))
        other.wait(foreign)
    assert buf.get_states() == [UP, FREE, FREE]


def test_compute_must_consume_uploads_in_ring_order(coord: pg.AsyncCoordinator, device: Any,
                                                    rng: np.random.Generator) -> None:
    buf = pg.TripleBuffer(device, 8, dtype=F32)
    x0, x1 = rand(rng, 8), rand(rng, 8)
    u0, u1 = coord.queue_upload(x0, buf), coord.queue_upload(x1, buf)
    err = _rejects(coord, [buf], pg.InvalidDependencyError,
                   lambda: coord.queue_compute("scale", [u1]))
    assert "order" in str(err.value)
    assert buf.get_states() == [UP, UP, FREE]
    coord.queue_compute("scale", [u0])
    coord.queue_compute("scale", [u1])
    outs = [np.empty(8, F32), np.empty(8, F32)]
    dns = [coord.queue_download(buf, o) for o in outs]
    for dn in dns:
        coord.wait(dn)
    np.testing.assert_array_equal(outs[0], x0 * F32(2))
    np.testing.assert_array_equal(outs[1], x1 * F32(2))


def test_no_free_slot(coord: pg.AsyncCoordinator, device: Any, rng: np.random.Generator) -> None:
    buf = pg.TripleBuffer(device, 8, dtype=F32)
    for _ in range(3):
        coord.queue_upload(rand(rng, 8), buf)
    _rejects(coord, [buf], pg.BufferUnavailableError,
             lambda: coord.queue_upload(rand(rng, 8), buf))
    assert buf.get_states() == [UP, UP, UP]


def test_download_with_nothing_processing(coord: pg.AsyncCoordinator, device: Any,
                                          rng: np.random.Generator) -> None:
    buf = pg.TripleBuffer(device, 8, dtype=F32)
    _rejects(coord, [buf], pg.BufferUnavailableError,
             lambda: coord.queue_download(buf, np.empty(8, F32)))
    coord.queue_upload(rand(rng, 8), buf)
    _rejects(coord, [buf], pg.BufferUnavailableError,
             lambda: coord.queue_download(buf, np.empty(8, F32)))
    assert buf.get_states() == [UP, FREE, FREE]


def test_call_from_another_thread(coord: pg.AsyncCoordinator, device: Any,
                                  rng: np.random.Generator) -> None:
    buf = pg.TripleBuffer(device, 8, dtype=F32)
    up = coord.queue_upload(rand(rng, 8), buf)
    before = snapshot(coord, buf)
    calls = {
        "queue_upload": lambda: coord.queue_upload(rand(rng, 8), buf),
        "queue_compute": lambda: coord.queue_compute("scale", [up]),
        "poll": coord.poll,
        "wait": lambda: coord.wait(up),
    }
    caught = {}

    def run() -> None:
        for name, call in calls.items():
            try:
                call()
            except BaseException as exc:  # noqa: BLE001 - inspected below
                caught[name] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert set(caught) == set(calls)
    assert all(isinstance(e, pg.InvalidOperationError) for e in caught.values()), caught
    assert snapshot(coord, buf) == before
    _ = coord.queue_compute("scale", [up])   # the owner thread still works


def test_closed_coordinator(device: Any, rng: np.random.Generator) -> None:
    coord = pg.AsyncCoordinator(device)
    buf = pg.TripleBuffer(device, 8, dtype=F32)
    up = coord.queue_upload(rand(rng, 8), buf)
    coord.close()
    coord.close()  # idempotent
    for call in (lambda: coord.queue_upload(rand(rng, 8), buf),
                 lambda: coord.queue_compute("scale", [up]),
                 lambda: coord.queue_download(buf, np.empty(8, F32)),
                 coord.poll, lambda: coord.wait(up), coord.synchronize_all,
                 lambda: coord.register_kernel("k", lambda a: None)):
        with pytest.raises(pg.InvalidOperationError):
            call()
    assert buf.get_states() == [UP, FREE, FREE]


def test_source_kernel_without_cpu_version(backend: str, coord: pg.AsyncCoordinator,
                                           device: Any, rng: np.random.Generator) -> None:
    if backend != "cpu":
        pytest.skip("only the CPU backend needs a cpu= version")
    k = pg.Kernel.from_source(
        'extern "C" __global__ void k(float* a, size_t n) {}', "k")
    buf = pg.TripleBuffer(device, 8, dtype=F32)
    up = coord.queue_upload(rand(rng, 8), buf)
    _rejects(coord, [buf], pg.BackendUnavailableError, lambda: coord.register_kernel("k", k),
             match="cpu=")
    _rejects(coord, [buf], pg.BackendUnavailableError, lambda: coord.queue_compute(k, [up]),
             match="cpu=")
    assert buf.get_states() == [UP, FREE, FREE]


# --- GPU only ------------------------------------------------------------------------------

@pytest.mark.cuda
def test_source_kernel_without_cpu_version_runs_on_cuda() -> None:
    rng = np.random.default_rng(7)
    dev = pg.open_device("cuda")
    try:
        with pg.AsyncCoordinator(dev) as coord:
            k = pg.Kernel.from_source(add1().source, "add1")
            buf = pg.TripleBuffer(dev, 256, dtype=F32)
            x, out = rand(rng, 256), np.empty(256, F32)
            up = coord.queue_upload(x, buf)
            coord.queue_compute(k, [up])
            coord.wait(coord.queue_download(buf, out))
            np.testing.assert_array_equal(out, x + F32(1))
    finally:
        dev.close()


@pytest.mark.cuda
def test_streams_implement_cuda_stream_protocol() -> None:
    dev = pg.open_device("cuda")
    try:
        with pg.AsyncCoordinator(dev) as coord:
            for s in (coord.upload_stream(), coord.compute_stream(), coord.download_stream()):
                assert hasattr(s, "__cuda_stream__")
    finally:
        dev.close()


# --- random op DAGs against a sequential numpy reference ---------------------------------

class _Inst:
    """One upload's data while it is in the ring: its model value and the ops touching it alone."""

    def __init__(self, buf: int, value: np.ndarray, op: int) -> None:
        self.buf = buf
        self.value = value
        self.solo = [op]
        self.state = UP


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_dags_match_numpy(device: Any, data: st.DataObject) -> None:
    n_bufs = data.draw(st.integers(1, 2), label="buffers")
    size = data.draw(st.integers(1, 16), label="size")
    depths = [data.draw(st.integers(1, 4), label="depth") for _ in range(n_bufs)]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    unary = {"add1": lambda a: a + F32(1), "mul3": lambda a: a * F32(3)}

    with pg.AsyncCoordinator(device) as coord:
        coord.register_kernel("add1", add1())
        coord.register_kernel("mul3", mul3())
        coord.register_kernel("join", join())
        bufs = [pg.TripleBuffer(device, size, dtype=F32, depth=d) for d in depths]
        rings: List[List[_Inst]] = [[] for _ in bufs]   # non-FREE slots, oldest first
        checks: List[Tuple[int, np.ndarray, np.ndarray]] = []

        def eligible() -> List[_Inst]:
            out = []
            for ring in rings:
                out += [i for i in ring if i.state is PROC]
                out += [i for i in ring if i.state is UP][:1]   # only the oldest upload
            return out

        for _ in range(data.draw(st.integers(1, 40), label="steps")):
            actions = [a for a, ok in (
                ("upload", any(len(r) < len(b.get_states()) for r, b in zip(rings, bufs))),
                ("unary", bool(eligible())),
                ("join", len(eligible()) >= 2),
                ("download", any(next((i.state for i in r if i.state is not DOWN), None)
                                 is PROC for r in rings)),
                ("advance", any(r and r[0].state is DOWN for r in rings)),
            ) if ok]
            action = data.draw(st.sampled_from(actions))
            if action == "upload":
                b = data.draw(st.sampled_from(
                    [k for k, r in enumerate(rings) if len(r) < depths[k]]))
                x = rand(rng, data.draw(st.integers(1, size), label="length"))
                rings[b].append(_Inst(b, x.copy(), coord.queue_upload(x, bufs[b])))
            elif action == "unary":
                inst = data.draw(st.sampled_from(eligible()))
                name = data.draw(st.sampled_from(sorted(unary)))
                deps = data.draw(st.lists(st.sampled_from(inst.solo), min_size=1, max_size=3))
                inst.solo.append(coord.queue_compute(name, deps))
                inst.value = unary[name](inst.value)
                inst.state = PROC
            elif action == "join":
                el = eligible()
                i, j = data.draw(st.lists(st.integers(0, len(el) - 1), min_size=2, max_size=2,
                                          unique=True))
                a, b = el[i], el[j]
                coord.queue_compute("join", [data.draw(st.sampled_from(a.solo)),
                                             data.draw(st.sampled_from(b.solo))])
                n = min(len(a.value), len(b.value))
                a.value[:n] += b.value[:n]
                a.state = b.state = PROC
            elif action == "download":
                b = data.draw(st.sampled_from([
                    k for k, r in enumerate(rings)
                    if next((i.state for i in r if i.state is not DOWN), None) is PROC]))
                inst = next(i for i in rings[b] if i.state is not DOWN)
                out = np.full(len(inst.value), np.nan, dtype=F32)
                checks.append((coord.queue_download(bufs[b], out), out, inst.value.copy()))
                inst.state = DOWN
            else:
                b = data.draw(st.sampled_from(
                    [k for k, r in enumerate(rings) if r and r[0].state is DOWN]))
                assert bufs[b].advance() is True
                rings[b].pop(0)
            for ring, buf in zip(rings, bufs):
                states = [i.state for i in ring]
                assert sorted(buf.get_states()) == sorted(states + [FREE] * (
                    len(buf.get_states()) - len(states)))

        for dn, out, expected in checks:
            coord.wait(dn)
            np.testing.assert_array_equal(out, expected)
        coord.synchronize_all()
        assert all(r.error is None for r in coord.poll())
