"""Tracing (timeline, Chrome JSON, Gantt PNG, summary) and sync mode, on every backend."""

from __future__ import annotations

import json
from typing import Any, Iterator

import numpy as np
import pytest

import prism_gpu as pg
from _support import F32, add1, affine, rand


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(77)


@pytest.fixture
def sync_off() -> Iterator[None]:
    previous = pg.set_sync_mode(False)
    yield
    pg.set_sync_mode(previous)


def _pattern1(coord: pg.AsyncCoordinator, buf: pg.TripleBuffer, xs: Any, outs: Any) -> None:
    for x, out in zip(xs, outs):
        up = coord.queue_upload(x, buf)
        coord.queue_compute("spin", [up], extra=(2000.0,))   # 2 ms: copies overlap it
        coord.queue_download(buf, out)
        buf.advance()


def test_pattern1_under_trace(device: Any, rng: np.random.Generator, tmp_path: Any) -> None:
    n, iters = 1 << 20, 8   # 4 MiB copies: long enough to overlap a 2 ms kernel
    xs = [rand(rng, n) for _ in range(iters)]
    outs = [np.empty(n, F32) for _ in range(iters)]
    with pg.AsyncCoordinator(device) as coord:
        buf = pg.TripleBuffer(device, n)
        with pg.trace() as tr:
            _pattern1(coord, buf, xs, outs)
        coord.synchronize_all()
    for x, out in zip(xs, outs):
        np.testing.assert_array_equal(out, x)    # spin leaves the data alone
    ops = tr.ops
    assert len(ops) == 3 * iters
    assert {o.lane for o in ops} == {"upload", "compute", "download"}
    assert min(o.start_ms for o in ops) == 0.0
    by = {t: sorted((o for o in ops if o.op_type == t), key=lambda o: o.op_id)
          for t in ("upload", "compute", "download")}
    assert all(len(v) == iters for v in by.values())
    for up, comp, down in zip(by["upload"], by["compute"], by["download"]):
        assert up.end_ms <= comp.start_ms + 1e-3          # compute k after upload k
        assert comp.end_ms <= down.start_ms + 1e-3        # download k after compute k
        assert up.nbytes == down.nbytes == n * 4
    def overlap(a: Any, b: Any) -> bool:
        return a.start_ms < b.end_ms and a.end_ms > b.start_ms

    # a later batch's upload runs under an earlier batch's kernel: upload k+1 under
    # compute k on the GPU; the CPU backend's threads may start a little later under load
    assert any(overlap(up, comp) for up, comp in zip(by["upload"][1:], by["compute"])) or (
        device.kind == "cpu" and any(overlap(up, comp) for j, up in enumerate(by["upload"])
                                     for comp in by["compute"][:j]))
    s = tr.summary()
    assert s.ops == 3 * iters and s.iterations == iters
    assert 0 < s.floor_ms <= s.achieved_ms and 0 < s.efficiency <= 1
    assert s.overlap > 0 and set(s.busy) == {"upload", "compute", "download"}

    path = tmp_path / "run.json"
    tr.save(str(path))
    doc = json.loads(path.read_text())
    xs_events = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert len(xs_events) == 3 * iters
    names = {e["args"]["name"] for e in doc["traceEvents"] if e.get("name") == "thread_name"}
    assert names == {"upload", "compute", "download"}
    assert all("GB/s" in e["args"] for e in xs_events if e["cat"] != "compute")


def test_nothing_recorded_outside_a_trace(coord: pg.AsyncCoordinator,
                                          rng: np.random.Generator) -> None:
    buf = pg.TripleBuffer(coord.device, 64)
    with pg.trace() as tr:
        pass
    _pattern1(coord, buf, [rand(rng, 64)], [np.empty(64, F32)])
    coord.synchronize_all()
    assert tr.ops == [] and len(tr) == 0
    with pg.trace():
        with pytest.raises(pg.InvalidOperationError):
            with pg.trace():
                pass


def test_pipeline_stages_and_stream_map_batches_appear_by_name(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator, tmp_path: Any) -> None:
    pipe = ctx.create_pipeline_manager()
    pipe.coordinator().register_kernel("affine", affine())
    b0, b1 = pipe.add_buffer(256), pipe.add_buffer(256)
    pipe.add_stage(pg.GpuPipelineStage("Preprocess", [b0], [b1], kernel="affine",
                                       extra=(2.0, 0.0)))
    batches = [rand(rng, 256) for _ in range(4)]
    with pg.trace() as tr:
        got = [y.copy() for y in pipe.run(batches, input=b0, output=b1)]
        maps = [y.copy() for y in pg.stream_map("scale", batches, ctx=ctx)]
    pipe.close()
    for x, y, z in zip(batches, got, maps):
        np.testing.assert_array_equal(y, x * F32(2))
        np.testing.assert_array_equal(z, x * F32(2))
    stages = [o for o in tr.ops if o.lane == "Preprocess"]
    assert sorted(o.batch_index for o in stages) == [0, 1, 2, 3]
    assert all(o.name == "Preprocess" for o in stages)
    mapped = [o for o in tr.ops if o.lane.startswith("compute")]
    assert sorted(o.batch_index for o in mapped) == [0, 1, 2, 3]
    assert all(o.name == "scale" for o in mapped)
    assert {"upload", "download"} <= {o.lane for o in tr.ops}


def test_plot_writes_a_png(device: Any, rng: np.random.Generator, tmp_path: Any) -> None:
    pytest.importorskip("matplotlib")
    with pg.AsyncCoordinator(device) as coord:
        buf = pg.TripleBuffer(device, 1024)
        with pg.trace() as tr:
            _pattern1(coord, buf, [rand(rng, 1024) for _ in range(4)],
                      [np.empty(1024, F32) for _ in range(4)])
    path = tmp_path / "run.png"
    tr.plot(str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_failures_inside_a_trace_reach_the_caller_and_the_timeline(
        device: Any, rng: np.random.Generator) -> None:
    """A traced op's closing record is its end time too: it must still carry a kernel's
    failure to its dependents (and clear it for the work after), and still finish the
    host half of pageable downloads."""
    def boom(a: Any) -> None:
        raise FloatingPointError("bad input")

    n = 256
    xs = [rand(rng, n) for _ in range(4)]
    outs = [np.full(n, np.nan, F32) for _ in range(4)]
    with pg.AsyncCoordinator(device) as coord:
        coord.register_kernel("boom", boom)
        buf = pg.TripleBuffer(device, n)
        ids = []
        with pg.trace() as tr:
            for k, (x, out) in enumerate(zip(xs, outs)):
                up = coord.queue_upload(x, buf)
                comp = coord.queue_compute("boom" if k == 1 else "scale", [up])
                ids.append((up, comp, coord.queue_download(buf, out)))
                buf.advance()
            for k in (0, 2, 3):
                coord.wait(ids[k][2])
            with pytest.raises(pg.KernelError) as info:
                coord.wait(ids[1][1])
            assert isinstance(info.value.__cause__, FloatingPointError)
            with pytest.raises(pg.DependencyFailedError):
                coord.wait(ids[1][2])
        reports = coord.poll()
        coord.synchronize_all()   # both failures were reported: nothing left to raise
    for k in (0, 2, 3):
        np.testing.assert_array_equal(outs[k], xs[k] * F32(2))
    assert np.isnan(outs[1]).all()
    assert reports and all(r.duration_ms is None for r in reports)  # timing not asked for
    errors = {o.op_id: o.error for o in tr.ops}
    assert len(errors) == 12
    assert (errors[int(ids[1][1])] or "").startswith("KernelError")
    assert (errors[int(ids[1][2])] or "").startswith("DependencyFailedError")
    assert all(errors[int(i)] is None for k in (0, 2, 3) for i in ids[k])


def test_a_timed_coordinator_inside_a_trace_keeps_its_durations(
        device: Any, rng: np.random.Generator) -> None:
    n = 1 << 16
    with pg.AsyncCoordinator(device, timing=True) as coord:
        buf = pg.TripleBuffer(device, n)
        out = np.empty(n, F32)
        x = rand(rng, n)
        with pg.trace() as tr:
            up = coord.queue_upload(x, buf)
            comp = coord.queue_compute("spin", [up], extra=(500.0,))
            coord.wait(coord.queue_download(buf, out))
            buf.advance()
        reports = {r.op_id: r for r in coord.poll()}
    np.testing.assert_array_equal(out, x)
    ops = {o.op_id: o for o in tr.ops}
    assert set(ops) == set(reports) and len(ops) == 3
    for oid, r in reports.items():
        assert r.duration_ms is not None and r.duration_ms >= 0
        assert r.duration_ms == pytest.approx(ops[oid].duration_ms, abs=1e-3)
    assert reports[int(comp)].duration_ms >= 0.4   # the kernel spins 500 us


def test_sync_mode_raises_from_the_queue_call(device: Any, rng: np.random.Generator,
                                              sync_off: None) -> None:
    def boom(a: Any) -> None:
        raise FloatingPointError("bad input")

    with pg.AsyncCoordinator(device) as coord:
        coord.register_kernel("boom", boom)
        buf = pg.TripleBuffer(device, 64)
        x = rand(rng, 64)
        pg.set_sync_mode(True)
        up = coord.queue_upload(x, buf)
        assert coord.is_complete(up)                  # waited for by the call itself
        with pytest.raises(pg.KernelError) as info:
            coord.queue_compute("boom", [up])
        assert isinstance(info.value.__cause__, FloatingPointError)
        assert buf.get_states()[0] is pg.BufferState.PROCESSING
        with pytest.raises(pg.DependencyFailedError):
            coord.queue_download(buf, np.empty(64, F32))
        buf.advance()
        pg.set_sync_mode(False)
        out = np.empty(64, F32)
        up = coord.queue_upload(x, buf)
        coord.queue_compute("scale", [up])
        coord.wait(coord.queue_download(buf, out))
        buf.advance()
        np.testing.assert_array_equal(out, x * F32(2))
    with pytest.raises(TypeError):
        pg.set_sync_mode(1)  # type: ignore[arg-type]


def test_every_op_is_an_nvtx_range(ctx: pg.ManagedGpuContext, rng: np.random.Generator,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine opens and closes one range per queued op, named after its kernel,
    copy or pipeline stage (checked through the range hooks, with or without nvtx)."""
    from prism_gpu import _nvtx

    opened: list = []
    closed: list = []
    monkeypatch.setattr(_nvtx, "ON", True)
    monkeypatch.setattr(_nvtx, "range_start",
                        lambda lane, op_type, name: opened.append((lane, op_type, name))
                        or len(opened))
    monkeypatch.setattr(_nvtx, "range_end", closed.append)
    coord = ctx.async_coordinator()
    buf = ctx.create_triple_buffer(64)
    _pattern1(coord, buf, [rand(rng, 64)], [np.empty(64, F32)])
    pipe = ctx.create_pipeline_manager()
    pipe.coordinator().register_kernel("affine", affine())
    b0, b1 = pipe.add_buffer(64), pipe.add_buffer(64)
    pipe.add_stage(pg.GpuPipelineStage("MainCompute", [b0], [b1], kernel="affine",
                                       extra=(2.0, 1.0)))
    list(pipe.run([rand(rng, 64)], input=b0, output=b1))
    pipe.close()
    coord.synchronize_all()
    assert ("upload", "upload", None) in opened and ("compute", "compute", "spin") in opened
    assert ("MainCompute", "compute", "MainCompute") in opened
    assert sorted(closed) == list(range(1, len(opened) + 1))


def test_nvtx_range_names() -> None:
    pytest.importorskip("nvtx")
    from prism_gpu import _nvtx

    if _nvtx._nvtx_mod is None:
        pytest.skip("PRISM_GPU_NVTX=0")
    # the real nvtx calls (no tool attached: they reach nothing, but must not raise)
    mark = _nvtx.range_start("MainCompute", "compute", "affine")
    _nvtx.range_end(mark)


def test_nvtx_ranges_only_under_a_tool() -> None:
    """Ranges are opened only when a tool receives them: the nvtx package hands out
    placeholder domains (``DummyDomain``) when none is attached."""
    from prism_gpu import _nvtx

    class DummyDomain:
        pass

    class Domain:
        pass

    class Mod:
        def __init__(self, domain: object) -> None:
            self.domain = domain
            self.asked: list = []

        def get_domain(self, name: str) -> object:
            self.asked.append(name)
            if isinstance(self.domain, Exception):
                raise self.domain
            return self.domain

    no_tool, tool = Mod(DummyDomain()), Mod(Domain())
    assert not _nvtx.tool_attached(no_tool) and no_tool.asked == ["prism-gpu"]
    assert _nvtx.tool_attached(tool)
    assert not _nvtx.tool_attached(Mod(RuntimeError("no NVTX library")))
    nvtx = pytest.importorskip("nvtx")
    # this process runs under no tool: the installed package says so, and no range opens
    assert not _nvtx.tool_attached(nvtx)
    assert not _nvtx.ON


def test_a_dropped_trace_is_not_kept_alive_by_the_coordinators_it_saw(
        device: Any, rng: np.random.Generator) -> None:
    import gc
    import weakref

    with pg.AsyncCoordinator(device) as coord:
        buf = pg.TripleBuffer(device, 64)
        with pg.trace() as tr:
            _pattern1(coord, buf, [rand(rng, 64)], [np.empty(64, F32)])
        assert len(tr.ops) == 3
        ref = weakref.ref(tr)
        del tr
        gc.collect()
        assert ref() is None
        with pg.trace() as tr2:   # the same coordinator, recorded by the next trace
            _pattern1(coord, buf, [rand(rng, 64)], [np.empty(64, F32)])
        assert len(tr2.ops) == 3


def test_a_long_trace_reads_every_op_and_gives_its_events_back(
        device: Any, rng: np.random.Generator) -> None:
    # more ops than a trace holds before it reads their times, on every lane
    n, rounds = 256, 400
    with pg.AsyncCoordinator(device) as coord:
        coord.register_kernel("add1", add1())
        buf = pg.TripleBuffer(device, n)
        xs = [rand(rng, n) for _ in range(rounds)]
        outs = [np.empty(n, F32) for _ in range(rounds)]
        with pg.trace() as tr:
            for x, out in zip(xs, outs):
                coord.queue_compute("add1", [coord.queue_upload(x, buf)])
                coord.queue_download(buf, out)
                buf.advance()
        ops = tr.ops
        assert len(ops) == 3 * rounds and tr.lost == 0
        assert sorted(o.op_id for o in ops) == list(range(ops[0].op_id,
                                                          ops[0].op_id + 3 * rounds))
        assert all(0 <= o.start_ms <= o.end_ms for o in ops)
        for x, out in zip(xs, outs):
            np.testing.assert_array_equal(out, x + 1)
        # the trace read its ops' times in batches of 256 and gave both events of each
        # back to the coordinator's pool (had it kept them, the pool would hold only
        # the few untimed events of the ops in flight)
        assert coord.statistics().events_pooled >= 2 * 256
        # a later trace on the same coordinator starts from an empty timeline
        with pg.trace() as tr2:
            coord.queue_compute("add1", [coord.queue_upload(xs[0], buf)])
            coord.queue_download(buf, outs[0])
            buf.advance()
        assert len(tr2.ops) == 3 and len(tr) == 3 * rounds
