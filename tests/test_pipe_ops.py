"""A pipeline iteration's ops on both cores: the compiled ``pipe_ops`` (where built) queues
what the reference ``queue_ops`` does, or hands the call to it. The same scripted runs on
each must give the same results, failures, statistics counts and ring states, and neither
may keep a reference to an iteration's arrays."""

from __future__ import annotations

import gc
import sys
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest

import prism_gpu as pg
from prism_gpu import _core, _pipequeue
from _support import F32, device_view, doubling_pipeline, rand

COMPILED = pytest.mark.skipif(not _core.COMPILED, reason=f"the compiled core is {_core.STATUS}")
CORES = [pytest.param("python", id="python"),
         pytest.param("compiled", id="compiled", marks=COMPILED)]
N = 96


@pytest.fixture(params=CORES)
def core(request: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "python":
        monkeypatch.setattr(_pipequeue, "_queue_ops", _pipequeue.queue_ops)
    return request.param


def _double(x: Any, y: Any) -> None:
    np.multiply(device_view(x), 2, out=device_view(y))


def _split(x: Any, lo: Any, hi: Any) -> None:  # one stage writing two buffers
    np.subtract(device_view(x), 1, out=device_view(lo))
    np.add(device_view(x), 1, out=device_view(hi))


def _join(lo: Any, hi: Any, out: Any) -> None:
    np.add(device_view(lo), device_view(hi), out=device_view(out))


def _bump(x: Any, y: Any) -> None:  # rewrites the buffer it reads (x and y: one slot)
    np.add(device_view(x), 10, out=device_view(y))


def _run(ctx: pg.ManagedGpuContext, script: List[Tuple[str, Any]],
         fail_at: int = -1) -> Dict[str, Any]:
    """A pipeline x -> double -> a -> split -> (lo, hi) -> bump(lo) -> join -> out, driven
    by ``script`` (fed and read back, plain, short); what it gave."""
    calls = [0]

    def join(lo: Any, hi: Any, out: Any) -> None:
        calls[0] += 1
        if calls[0] == fail_at:
            raise RuntimeError("join failed on purpose")
        _join(lo, hi, out)

    pipe = ctx.create_pipeline_manager(timing_sample=2)
    x, a, lo, hi, out = (pipe.add_buffer(N) for _ in range(5))
    pipe.add_stage(pg.GpuPipelineStage("double", [x], [a], kernel=_double))
    pipe.add_stage(pg.GpuPipelineStage("split", [a], [lo, hi], kernel=_split))
    pipe.add_stage(pg.GpuPipelineStage("bump", [lo], [lo], kernel=_bump))
    pipe.add_stage(pg.GpuPipelineStage("join", [lo, hi], [out], kernel=join))
    got: Dict[str, Any] = {"results": [], "errors": []}
    rng = np.random.default_rng(0xB0B)
    for kind, arg in script:
        try:
            if kind == "fed":
                inp = rand(rng, arg)
                y = np.full(arg, np.nan, F32)
                it = pipe.execute_iteration(inputs={x: inp}, outputs={out: y})
                it.wait()
                got["results"].append((inp, y))
            else:
                pipe.execute_iteration()
        except (pg.PrismGpuError, RuntimeError) as exc:
            got["errors"].append(type(exc).__name__)
            # the slots of hi marked spoilt (by the failed op that wrote them)
            got.setdefault("spoilt", sum(s.failed is not None for s in pipe.buffer(hi).slots))
    try:
        stats = pipe.get_stats()
        got["iterations"], got["stages"] = stats.iterations, sorted(stats.stage_ms)
    except (pg.PrismGpuError, RuntimeError) as exc:
        got["errors"].append(type(exc).__name__)
    got["states"] = [[s.name for s in pipe.buffer(b).get_states()] for b in (x, a, lo, out)]
    pipe.close()
    return got


SCRIPT = [("fed", N)] * 3 + [("fed", N - 30)] + [("fed", N)] * 36


def _expect(inp: np.ndarray) -> np.ndarray:
    a = inp * F32(2)
    return (a - F32(1) + F32(10)) + (a + F32(1))


def test_both_cores_give_the_reference_results(core: str) -> None:
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        got = _run(ctx, SCRIPT)
    assert got["errors"] == []
    assert got["iterations"] == len(SCRIPT)
    assert got["stages"] == ["bump", "double", "download", "join", "split", "upload"]
    for inp, y in got["results"]:
        np.testing.assert_allclose(y, _expect(inp), rtol=1e-6)
    assert all(state == ["FREE"] * 3 for state in got["states"])


def test_both_cores_answer_alike_with_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same script, the join failing in iteration 5, on each core: the same errors,
    counts and ring states; results before the failure right, after it too."""
    answers = []
    for which in ("python", "compiled") if _core.COMPILED else ("python",):
        with monkeypatch.context() as m:
            if which == "python":
                m.setattr(_pipequeue, "_queue_ops", _pipequeue.queue_ops)
            with pg.ManagedGpuContext(backend="cpu") as ctx:
                answers.append(_run(ctx, SCRIPT, fail_at=5))
    for got in answers:
        assert "KernelError" in got["errors"]
        good = [(i, y) for i, y in got["results"] if not np.isnan(y).any()]
        for inp, y in good:
            np.testing.assert_allclose(y, _expect(inp), rtol=1e-6)
    first = answers[0]
    for got in answers[1:]:
        assert got["errors"] == first["errors"]
        assert got["states"] == first["states"]
        assert got.get("iterations") == first.get("iterations")
        assert len(got["results"]) == len(first["results"])


def test_plain_iterations_on_both_cores(core: str) -> None:
    """Nothing fed, nothing read back: gen writes the iteration's number, double doubles
    it, keep copies what it reads; 40 iterations, each seen once, in order."""
    seen: List[np.ndarray] = []
    count = [0]

    def gen(out: Any) -> None:
        count[0] += 1
        device_view(out)[:] = count[0]

    def keep(x: Any) -> None:
        seen.append(np.array(device_view(x)))

    with pg.ManagedGpuContext(backend="cpu") as ctx:
        pipe = ctx.create_pipeline_manager(timing_sample=2)
        a, b = pipe.add_buffer(N), pipe.add_buffer(N)
        pipe.add_stage(pg.GpuPipelineStage("gen", [], [a], kernel=gen))
        pipe.add_stage(pg.GpuPipelineStage("double", [a], [b], kernel=_double))
        pipe.add_stage(pg.GpuPipelineStage("keep", [b], [], kernel=keep))
        for _ in range(40):
            pipe.execute_iteration()
        stats = pipe.get_stats()
        pipe.close()
    assert stats.iterations == 40 and sorted(stats.stage_ms) == ["double", "gen", "keep"]
    assert [float(v[0]) for v in seen] == [2.0 * (i + 1) for i in range(40)]
    assert all((v == v[0]).all() for v in seen)


def test_a_stage_refused_as_it_is_queued_spoils_its_outputs(core: str,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """The split's launch raises as it is queued in iteration 4 (the op fails then, as a
    CUDA launch with a bad configuration does): both buffers it writes carry that failure,
    so the join and the download of that iteration fail with it, and iteration 4's wait
    raises; the iterations around it are right."""
    from prism_gpu.backends.cpu._stream import CpuStream

    launch = CpuStream.launch
    count = [0]

    def refusing(self: Any, kernel: Any, config: Any, arrays: Any, extra: Any) -> None:
        if kernel[0] is _split:
            count[0] += 1
            if count[0] == 4:
                raise RuntimeError("launch refused on purpose")
        launch(self, kernel, config, arrays, extra)
    monkeypatch.setattr(CpuStream, "launch", refusing)
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        got = _run(ctx, [("fed", N)] * 8)
    assert got["errors"] == ["KernelError"], got["errors"]
    assert got["spoilt"] == 1  # (hi, as lo: written by the split alone)
    assert len(got["results"]) == 7
    for inp, y in got["results"]:
        np.testing.assert_allclose(y, _expect(inp), rtol=1e-6)


@COMPILED
def test_the_compiled_core_queues_the_ops() -> None:
    assert _pipequeue._queue_ops is not _pipequeue.queue_ops


@COMPILED
def test_a_ring_not_exactly_ours_is_handed_to_the_reference(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """A subclass of TripleBuffer among the pipeline's buffers (it may change take or
    retire): the reference queues that iteration; exact rings are queued in C."""
    calls: List[int] = []
    reference = _pipequeue.queue_ops

    def spy(*args: Any) -> Any:
        calls.append(1)
        return reference(*args)
    c = _core.compiled_module()
    setup: Callable[[Any], None] = c.setup_pipe
    helpers = {"queue_ops": spy, "fast_io": _pipequeue.fast_io, "UPLOAD": _pipequeue._UPLOAD,
               "COMPUTE": _pipequeue._COMPUTE,
               "DOWNLOAD": _pipequeue._DOWNLOAD, "H2D": _pipequeue.H2D,
               "D2H": _pipequeue.D2H, "LAUNCH": _pipequeue.LAUNCH, "QUEUED": _pipequeue.QUEUED}
    setup(helpers)
    try:
        with pg.ManagedGpuContext(backend="cpu") as ctx:
            pipe, a, b = doubling_pipeline(ctx, N)
            rng = np.random.default_rng(3)
            inp, y = rand(rng, N), np.empty(N, F32)
            pipe.execute_iteration(inputs={a: inp}, outputs={b: y}).wait()
            assert calls == []
            np.testing.assert_array_equal(y, inp * 2)

            class Ring(pg.TripleBuffer):
                pass
            pipe.buffer(b).__class__ = Ring  # (the same layout: the class alone differs)
            inp = rand(rng, N)
            pipe.execute_iteration(inputs={a: inp}, outputs={b: y}).wait()
            assert calls == [1]
            np.testing.assert_array_equal(y, inp * 2)
            pipe.buffer(b).__class__ = pg.TripleBuffer
            pipe.close()
    finally:
        helpers["queue_ops"] = reference
        setup(helpers)


def test_an_iteration_keeps_no_reference_to_its_arrays(core: str) -> None:
    """Fed and read-back arrays are referenced as often after 50 iterations as before."""
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        pipe, a, b = doubling_pipeline(ctx, N)
        rng = np.random.default_rng(4)
        inp, y = rand(rng, N), np.empty(N, F32)
        pipe.execute_iteration(inputs={a: inp}, outputs={b: y}).wait()
        pipe.get_stats()
        gc.collect()
        before = (sys.getrefcount(inp), sys.getrefcount(y))
        for _ in range(50):
            pipe.execute_iteration(inputs={a: inp}, outputs={b: y})
        pipe.get_stats()
        pipe.coordinator().synchronize_all()
        gc.collect()
        assert (sys.getrefcount(inp), sys.getrefcount(y)) == before
        np.testing.assert_array_equal(y, inp * 2)
        pipe.close()


def _io_cases() -> List[Tuple[str, Any, Any]]:
    """(what, inputs, outputs) against an entry feeding buffer 0 (float32, N) and reading
    back buffer 1 (float32, N)."""
    rng = np.random.default_rng(9)
    x, y = rand(rng, N), np.empty(N, F32)
    ro = np.empty(N, F32)
    ro.flags.writeable = False

    class Sub(np.ndarray):
        pass
    return [
        ("plain", {0: x}, {1: y}), ("no outputs", {0: x}, None), ("empty outputs", {0: x}, {}),
        ("2-d", {0: x.reshape(8, -1)}, {1: y.reshape(-1, 8)}),
        ("numpy int key", {np.int64(0): x}, {1: y}), ("bool key", {True: x}, {1: y}),
        ("float64", {0: x.astype(np.float64)}, {1: y}),
        ("strided", {0: rand(rng, 2 * N)[::2]}, {1: y}),
        ("short", {0: x[:-1]}, {1: y}), ("long", {0: rand(rng, N + 1)}, {1: y}),
        ("read-only output", {0: x}, {1: ro}), ("read-only input", {0: ro}, {1: y}),
        ("subclass", {0: x.view(Sub)}, {1: y}), ("list", {0: list(x)}, {1: y}),
        ("byte-swapped", {0: x.astype(">f4")}, {1: y}), ("0-d", {0: np.float32(1)}, {1: y}),
        ("empty", {0: np.empty(0, F32)}, {1: y}), ("unknown buffer", {5: x}, {1: y}),
        ("unknown output", {0: x}, {7: y}), ("two inputs", {0: x, 1: x}, {1: y}),
        ("nothing fed", None, {1: y}), ("empty inputs", {}, {1: y}),
        ("output not C-contiguous", {0: x}, {1: np.empty((N, 2), F32)[:, 0]}),
        ("NaN and inf", {0: np.full(N, np.nan, F32)}, {1: np.full(N, np.inf, F32)}),
    ]


@COMPILED
@pytest.mark.parametrize("what, inputs, outputs", _io_cases())
def test_the_compiled_io_check_answers_as_the_reference(what: str, inputs: Any,
                                                        outputs: Any) -> None:
    from prism_gpu._pipefeed import fast_io

    entry = ({0: (np.dtype(F32), N)}, {1: (np.dtype(F32), N)}, (0, 1), {0: N, 1: N})
    want = fast_io(entry, inputs, outputs)
    got = _pipequeue.checked_io(entry, inputs, outputs)
    passing = ("plain", "no outputs", "empty outputs", "2-d", "NaN and inf", "read-only input")
    assert (want is not None) is (what in passing), what
    if want is None:
        assert got is None, what
        return
    assert got is not None, what
    assert got[2:] == want[2:]
    for w, g in zip(want[:2], got[:2]):
        assert list(w) == list(g)
        for k in w:
            assert g[k].shape == w[k].shape and g[k].base is w[k].base or g[k] is w[k]
            assert np.shares_memory(g[k], w[k])


@COMPILED
def test_a_buffer_replaced_while_an_iteration_is_queued_is_refused() -> None:
    """Code run while the compiled core queues an iteration (here the read-only view of a
    stage's input) puts a non-ring where a buffer was: each later use of that buffer is
    refused with a TypeError (before, its struct was read as a ring's)."""
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        pipe, a, b = doubling_pipeline(ctx, N)
        queue, bufs = pipe._queue, pipe._buffers
        keep = bufs[b]
        make_view = queue._read_only

        def replacing(arr: Any) -> Any:
            bufs[b] = bytes(64)
            return make_view(arr)
        queue._read_only = replacing
        queue.drop_views()
        rng = np.random.default_rng(5)
        with pytest.raises(TypeError, match="no longer a TripleBuffer"):
            pipe.execute_iteration(inputs={a: rand(rng, N)}, outputs={b: np.empty(N, F32)})
        bufs[b] = keep
        queue._read_only = make_view
        pipe.coordinator().synchronize_all()
