"""The pipeline's fed iterations on their fast path: an iteration feeding and reading back
the buffers of the last one checked, with plain arrays (numpy arrays of the buffer's
dtype, C-contiguous, full length), skips to the result of that check; anything else takes
the general checks, in their order. Each test here would fail if the fast path gave
another result than the general path or skipped a check it makes.

The general path is taken on purpose by passing read-only mappings (not dicts).
"""

from __future__ import annotations

import threading
from types import MappingProxyType
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest

import prism_gpu as pg
from _support import F32, affine, device_view, rand
from prism_gpu._pipeline import PipelineStageManager
from prism_gpu._pipequeue import StageQueue
from prism_gpu._stats import QUEUED, Window

N = 64


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0xFA57)


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> List[int]:
    """Counts the iterations that took the general checks (the rest took the fast path)."""
    calls: List[int] = []
    general = PipelineStageManager._check_io

    def counted(self: Any, inputs: Any, outputs: Any) -> Any:
        calls.append(1)
        return general(self, inputs, outputs)
    monkeypatch.setattr(PipelineStageManager, "_check_io", counted)
    return calls


def _pipe(ctx: pg.ManagedGpuContext, wide: bool = False) -> Tuple[Any, int, int, int]:
    """b0 -> "s" (2x + 1) -> b1, and b0 -> "t" (3x) -> b2 (of 2N elements when
    ``wide``: its own length, not the input's)."""
    pipe = ctx.create_pipeline_manager()
    pipe.coordinator().register_kernel("affine", affine())
    b0, b1, b2 = pipe.add_buffer(N), pipe.add_buffer(N), pipe.add_buffer(2 * N if wide else N)
    pipe.add_stage(pg.GpuPipelineStage("s", [b0], [b1], kernel="affine", extra=(2.0, 1.0)))
    pipe.add_stage(pg.GpuPipelineStage("t", [b0], [b2], kernel="affine", extra=(3.0, 0.0)))
    return pipe, b0, b1, b2


def _general(mapping: Any) -> Any:
    return None if mapping is None else MappingProxyType(mapping)


def test_fast_iterations_give_what_the_general_path_gives(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator, checks: List[int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same calls through the fast path (dicts) and the general path (read-only
    mappings): the same results, iterations, op ids and statistics; 2-D arrays, calls
    feeding or reading back only, and a short input (its length flows: general)
    between them."""
    fast, b0, b1, b2 = _pipe(ctx)
    slow, *_ = _pipe(ctx)
    given: Dict[Any, List[Any]] = {fast._queue: [], slow._queue: []}
    queue = StageQueue.iteration

    def spied(self: Any, plan: Any, win: Any, fed: Any, touched: Any, slots: Any,
              valid: Any, downs: Any) -> Any:
        # what the queue is given: the arrays as shaped, the buffers, the lengths
        given[self].append(([(b, x.shape) for b, x in fed.items()], touched, dict(valid),
                            [(b, y.shape) for b, y in downs.items()]))
        return queue(self, plan, win, fed, touched, slots, valid, downs)
    monkeypatch.setattr(StageQueue, "iteration", spied)
    xs = [rand(rng, N) for _ in range(6)]
    calls: List[Tuple[Any, Any]] = []
    for i, x in enumerate(xs):
        calls.append(({b0: x}, {b1: np.empty(N, F32), b2: np.empty(N, F32)}))
        if i == 2:
            calls.append(({b0: x.reshape(8, 8)}, {b2: np.empty((8, 8), F32)}))
            calls.append(({b0: x}, None))
            calls.append(({b0: x[:5].copy()}, {b1: np.empty(5, F32)}))
            calls.append(({b0: x.reshape(8, 8)}, {b2: np.empty((8, 8), F32)}))
    its = []
    slow_outputs = []
    for inputs, outputs in calls:
        copies = None if outputs is None else {b: y.copy() for b, y in outputs.items()}
        slow_outputs.append(copies)
        its.append((fast.execute_iteration(inputs=inputs, outputs=outputs),
                    slow.execute_iteration(inputs=_general(inputs), outputs=_general(copies))))
    for (inputs, outputs), (f, s), copies in zip(calls, its, slow_outputs):
        f.wait()
        s.wait()
        assert repr(f) == repr(s)
        (x,) = inputs.values()
        for b, y in (outputs or {}).items():
            a, c = (2.0, 1.0) if b == b1 else (3.0, 0.0)
            np.testing.assert_array_equal(y, x * F32(a) + F32(c))
            np.testing.assert_array_equal(copies[b], y)
    assert given[fast._queue] == given[slow._queue]
    assert all(len(shape) == 1 for fed, _, _, downs in given[fast._queue]
               for _, shape in fed + downs)
    fs, ss = fast.get_stats(), slow.get_stats()
    assert fs.iterations == ss.iterations == len(calls)
    assert set(fs.stage_ms) == set(ss.stage_ms) == {"s", "t", "upload", "download"}
    # every slow call took the general path, and two fast ones: the first and the short
    # one (the others feed b0 in full and read back some of what the first read back)
    assert len(checks) == len(calls) + 2
    fast.close()
    slow.close()


def _refused(pipe: Any, inputs: Any, outputs: Any) -> Tuple[type, str]:
    with pytest.raises(Exception) as info:
        pipe.execute_iteration(inputs=inputs, outputs=outputs)
    return type(info.value), str(info.value)


def test_the_fast_path_refuses_what_the_general_path_refuses(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator, checks: List[int]) -> None:
    """Once an iteration is remembered, every wrong call is refused as the general path
    refuses it (type and message), changing nothing; the next good call is fast."""
    fast, b0, b1, b2 = _pipe(ctx)
    slow, *_ = _pipe(ctx)
    x, y = rand(rng, N), np.empty(N, F32)
    fast.execute_iteration(inputs={b0: x}, outputs={b1: y}).wait()
    read_only = np.empty(N, F32)
    read_only.flags.writeable = False
    strided = np.empty(2 * N, F32)[::2]
    bad: List[Tuple[Dict[Any, Any], Dict[Any, Any]]] = [
        ({b0: x.astype(np.float64)}, {b1: y}),
        ({b0: rand(rng, 2 * N)[::2]}, {b1: y}),         # not C-contiguous
        ({b0: rand(rng, N + 1)}, {b1: y}),
        ({b0: np.empty(0, F32)}, {b1: y}),
        ({b0: x.tolist()}, {b1: y}),
        ({True: x}, {b1: y}),                          # a bool is no index
        ({0.0: x}, {b1: y}),
        ({-1: x}, {b1: y}),
        ({b0 + 7: x}, {b1: y}),
        ({b2: x}, {b1: y}),                            # b0 read, never written
        ({b0: x, b1: x}, {b1: y}),                     # b1 written by a stage
        ({b0: x}, {b1: read_only}),
        ({b0: x}, {b1: y[:N - 1]}),
        ({b0: x}, {b1: y.astype(np.float64)}),
        ({b0: x}, {b1: strided}),
        ({b0: x}, {True: y}),
        ({b0: x}, {b1: y.tolist()}),
        ({b0: x}, {b1: y, 9: y}),
        ({b0: x}, {b1: y, -2: y}),
    ]
    states = [fast.buffer(b).get_states() for b in (b0, b1, b2)]
    in_flight = fast.coordinator().in_flight
    for inputs, outputs in bad:
        before = len(checks)
        want = _refused(slow, _general(inputs), _general(outputs))
        assert len(checks) == before + 1
        assert _refused(fast, inputs, outputs) == want, (inputs, outputs)
        assert [fast.buffer(b).get_states() for b in (b0, b1, b2)] == states
        assert fast.coordinator().in_flight == in_flight
    before = len(checks)
    it = fast.execute_iteration(inputs={b0: x}, outputs={b1: y})
    assert len(checks) == before and it.index == 1
    it.wait()
    np.testing.assert_array_equal(y, x * F32(2) + F32(1))
    fast.close()
    slow.close()


def test_other_plain_enough_calls_take_the_general_path_and_agree(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator, checks: List[int]) -> None:
    """An ndarray subclass, an index of another int type, a dict subclass, a longer
    output: each accepted as the general path accepts it, with its result."""

    class Sub(np.ndarray):
        pass

    class Dict2(dict):  # type: ignore[type-arg]
        pass

    pipe, b0, b1, _ = _pipe(ctx)
    x = rand(rng, N)
    pipe.execute_iteration(inputs={b0: x}, outputs={b1: np.empty(N, F32)}).wait()
    before = len(checks)
    outs = [np.full(N, np.nan, F32) for _ in range(4)]
    longer = np.full(N + 3, np.nan, F32)
    its = [pipe.execute_iteration(inputs={b0: x.view(Sub)}, outputs={b1: outs[0]}),
           pipe.execute_iteration(inputs={np.int64(b0): x}, outputs={b1: outs[1]}),
           pipe.execute_iteration(inputs=Dict2({b0: x}), outputs={b1: outs[2]}),
           pipe.execute_iteration(inputs={b0: x}, outputs={b1: longer}),
           pipe.execute_iteration(inputs={b0: x}, outputs={np.int32(b1): outs[3]})]
    assert len(checks) == before + len(its)
    for it in its:
        it.wait()
    for y in outs + [longer[:N]]:
        np.testing.assert_array_equal(y, x * F32(2) + F32(1))
    assert np.isnan(longer[N:]).all()
    pipe.close()


def test_a_plan_change_forgets_the_checked_iteration(ctx: pg.ManagedGpuContext,
                                                    rng: np.random.Generator) -> None:
    """What an iteration was checked against goes with its plan: a new order that no
    longer writes the output, or a stage added that reads a buffer nothing writes, is
    refused by the next call with the same arrays."""
    pipe, b0, b1, b2 = _pipe(ctx)
    x, y = rand(rng, N), np.empty(N, F32)
    for _ in range(2):
        pipe.execute_iteration(inputs={b0: x}, outputs={b1: y})
    pipe.set_order([1])                                 # only "t": b1 is written by none
    with pytest.raises(pg.InvalidOperationError, match="output buffer 1 is not written"):
        pipe.execute_iteration(inputs={b0: x}, outputs={b1: y})
    pipe.set_order([0, 1])
    pipe.execute_iteration(inputs={b0: x}, outputs={b1: y}).wait()
    np.testing.assert_array_equal(y, x * F32(2) + F32(1))

    plain, c0, c1, _ = _pipe(ctx)
    plain.execute_iteration(inputs={c0: x}, outputs={c1: y})
    c3 = plain.add_buffer(N)
    plain.execute_iteration(inputs={c0: x}, outputs={c1: y})  # a new buffer: still fine
    plain.add_stage(pg.GpuPipelineStage("u", [c3], [], kernel="noop"))
    with pytest.raises(pg.InvalidOperationError, match="reads buffer 3 before"):
        plain.execute_iteration(inputs={c0: x}, outputs={c1: y})
    pipe.close()
    plain.close()


def test_the_callers_mappings_may_change_once_checked(ctx: pg.ManagedGpuContext,
                                                     rng: np.random.Generator) -> None:
    """A callback run by the call (it retires the ops found complete) puts other arrays
    in the caller's dicts: the iteration still uploads and downloads the arrays checked."""
    pipe, b0, b1, _ = _pipe(ctx)
    x, y = rand(rng, N), np.full(N, np.nan, F32)
    other_x, other_y = rand(rng, N), np.full(N, np.nan, F32)
    inputs, outputs = {b0: x}, {b1: y}
    pipe.execute_iteration(inputs=inputs, outputs=outputs).wait()
    y[:] = np.nan
    coord = pipe.coordinator()

    def swap(report: Any, ms: Any) -> None:
        inputs[b0], outputs[b1] = other_x, other_y
    coord.queue_compute("noop", [], args=[], on_done=swap)
    coord.compute_stream().synchronize()  # done, not yet retired: the next call does
    pipe.execute_iteration(inputs=inputs, outputs=outputs).wait()
    assert inputs[b0] is other_x                   # the callback ran in the call
    np.testing.assert_array_equal(y, x * F32(2) + F32(1))
    assert np.isnan(other_y).all()
    pipe.close()


def test_downloads_follow_the_callers_order_and_the_last_ends_the_iteration(
        rng: np.random.Generator, checks: List[int]) -> None:
    """The remembered iteration stands for its buffers in any order: reading back b2
    then b1 downloads b2 first, as the general path does, and each iteration's last
    download (whichever buffer) ends it once in the statistics."""
    with pg.ManagedGpuContext(backend="cpu") as ctx:
        pipe, b0, b1, b2 = _pipe(ctx, wide=True)
        x = rand(rng, N)
        y1, y2 = np.empty(N, F32), np.empty(2 * N, F32)
        pipe.execute_iteration(inputs={b0: x}, outputs={b1: y1, b2: y2}).wait()
        before = len(checks)
        with pg.trace() as tr:
            for outputs in ({b2: y2, b1: y1}, {b1: y1, b2: y2}, {b2: y2, b1: y1}):
                pipe.execute_iteration(inputs={b0: x}, outputs=outputs).wait()
        assert len(checks) == before  # all three on the fast path
        downs = [op.nbytes for op in sorted(tr.ops, key=lambda op: op.op_id)
                 if op.lane == "download"]
        assert downs == [8 * N, 4 * N, 4 * N, 8 * N, 8 * N, 4 * N]
        np.testing.assert_array_equal(y1, x * F32(2) + F32(1))
        np.testing.assert_array_equal(y2[:N], x * F32(3))
        assert pipe.get_stats().iterations == 4
        pipe.close()


def test_a_closed_device_array_in_extra_is_refused_on_the_fast_path(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator, checks: List[int]) -> None:
    w = ctx.to_device(np.ones(4, F32))
    pipe = ctx.create_pipeline_manager()
    b0, b1 = pipe.add_buffer(N), pipe.add_buffer(N)
    pipe.add_stage(pg.GpuPipelineStage("s", [b0], [b1], kernel=affine(), extra=(2.0, 1.0)))
    def ignore(*args: Any) -> None:  # (reads its slot and the constant: any backend)
        pass
    pipe.add_stage(pg.GpuPipelineStage("c", [b1], [], kernel=ignore, extra=(w,)))
    x, y = rand(rng, N), np.empty(N, F32)
    for _ in range(2):
        pipe.execute_iteration(inputs={b0: x}, outputs={b1: y})
    assert len(checks) == 1
    w.close()
    for _ in range(2):
        with pytest.raises(pg.InvalidOperationError, match="DeviceArray in extra that is closed"):
            pipe.execute_iteration(inputs={b0: x}, outputs={b1: y})
    pipe.close()


def test_the_fast_path_checks_the_pipeline_its_thread_and_its_device() -> None:
    """Closed, called from another thread, from a callback, its device closed, a
    callback's error pending: each raised by a fed call as the general path raises it,
    before anything is queued."""
    dev = pg.open_device("cpu")
    coord = pg.AsyncCoordinator(dev)
    pipe = pg.PipelineStageManager(coord)
    coord.register_kernel("affine", affine())
    b0, b1 = pipe.add_buffer(N), pipe.add_buffer(N)
    pipe.add_stage(pg.GpuPipelineStage("s", [b0], [b1], kernel="affine", extra=(2.0, 1.0)))
    x, y = np.ones(N, F32), np.empty(N, F32)
    pipe.execute_iteration(inputs={b0: x}, outputs={b1: y}).wait()

    caught: List[BaseException] = []

    def other() -> None:
        try:
            pipe.execute_iteration(inputs={b0: x}, outputs={b1: y})
        except BaseException as exc:  # noqa: BLE001
            caught.append(exc)
    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(caught) == 1 and isinstance(caught[0], pg.InvalidOperationError)
    assert "thread" in str(caught[0])

    def from_callback(report: Any, ms: Any) -> None:
        try:
            pipe.execute_iteration(inputs={b0: x}, outputs={b1: y})
        except BaseException as exc:  # noqa: BLE001
            caught.append(exc)
    coord.wait(coord.queue_compute("noop", [], args=[], on_done=from_callback))
    assert len(caught) == 2 and isinstance(caught[1], pg.InvalidOperationError)

    def bad(report: Any, ms: Any) -> None:
        raise LookupError("callback bug")
    coord.queue_compute("noop", [], args=[], on_done=bad)
    coord.compute_stream().synchronize()  # done, not yet retired
    states = [pipe.buffer(b).get_states() for b in (b0, b1)]
    with pytest.raises(LookupError):
        pipe.execute_iteration(inputs={b0: x}, outputs={b1: y})
    assert [pipe.buffer(b).get_states() for b in (b0, b1)] == states
    assert pipe.execute_iteration(inputs={b0: x}, outputs={b1: y}).wait().index == 1

    pipe.get_stats()
    dev.close()
    with pytest.raises(pg.InvalidOperationError, match="device .* is closed"):
        pipe.execute_iteration(inputs={b0: x}, outputs={b1: y})
    pipe.close()
    coord.close()
    with pytest.raises(pg.InvalidOperationError, match="PipelineStageManager is closed"):
        pipe.execute_iteration(inputs={b0: x}, outputs={b1: y})


def test_sync_mode_raises_a_failing_stage_from_a_fast_call(rng: np.random.Generator,
                                                          checks: List[int]) -> None:
    calls = {"n": 0}

    def flaky(x: Any, y: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise ArithmeticError("third")
        y[:] = x

    with pg.ManagedGpuContext(backend="cpu") as ctx:
        pipe = ctx.create_pipeline_manager()
        b0, b1 = pipe.add_buffer(N), pipe.add_buffer(N)
        pipe.add_stage(pg.GpuPipelineStage("flaky", [b0], [b1], kernel=flaky))
        x, y = rand(rng, N), np.empty(N, F32)
        previous = pg.set_sync_mode(True)
        try:
            for _ in range(2):
                pipe.execute_iteration(inputs={b0: x}, outputs={b1: y})
                np.testing.assert_array_equal(y, x)   # waited for by the call
                y[:] = 0
            with pytest.raises(pg.KernelError, match="third"):
                pipe.execute_iteration(inputs={b0: x}, outputs={b1: y})
        finally:
            pg.set_sync_mode(previous)
        assert len(checks) == 1
        pipe.close()


def test_a_stage_reading_one_buffer_and_rewriting_another_in_place(
        rng: np.random.Generator) -> None:
    """A stage rewriting a buffer it reads (queued on its own path) beside buffers it
    only reads (read-only views there too), after and before stages filling buffers
    anew."""
    seen: List[bool] = []

    def mix(x: np.ndarray, acc: np.ndarray, out: np.ndarray) -> None:
        seen.append(x.flags.writeable)
        out += x  # (acc and out are the one slot)

    with pg.ManagedGpuContext(backend="cpu") as ctx:
        pipe = ctx.create_pipeline_manager()
        pipe.coordinator().register_kernel("affine", affine())
        b0, b1, b2 = pipe.add_buffer(N), pipe.add_buffer(N), pipe.add_buffer(N)
        pipe.add_stage(pg.GpuPipelineStage("s", [b0], [b1], kernel="affine",
                                           extra=(2.0, 0.0)))
        pipe.add_stage(pg.GpuPipelineStage("mix", [b0, b1], [b1], kernel=mix))
        pipe.add_stage(pg.GpuPipelineStage("t", [b1], [b2], kernel="affine",
                                           extra=(1.0, 1.0)))
        xs = [rand(rng, N) for _ in range(5)]
        ys = [(np.empty(N, F32), np.empty(N, F32)) for _ in xs]
        its = [pipe.execute_iteration(inputs={b0: x}, outputs={b1: y1, b2: y2})
               for x, (y1, y2) in zip(xs, ys)]
        for it in its:
            it.wait()
        for x, (y1, y2) in zip(xs, ys):
            np.testing.assert_array_equal(y1, x * F32(2) + x)
            np.testing.assert_array_equal(y2, y1 + F32(1))
        assert seen == [False] * len(xs)
        assert set(pipe.get_stats().stage_ms) == {"s", "mix", "t", "upload", "download"}
        pipe.close()


def test_a_window_counts_untimed_reports_apart() -> None:
    """An untimed report counts as reported (its lane has nothing in flight) but not in
    its lane's mean time."""

    class _Ev:
        def elapsed_ms(self, ref: Any) -> float:
            return 4.0

        def query(self) -> bool:
            return True

    class _Op:
        id, end, error = 1, _Ev(), None

    win = Window()
    win.start(_Ev())
    failed: set = set()
    timed, untimed = win.timer("a", True, failed), win.timer("b", False, failed)
    assert win.timer("a", True, failed) is timed
    for ms in (2.0, None, 4.0, None):
        win.lane("a")[QUEUED] += 1
        timed(_Op(), ms)
        win.lane("b")[QUEUED] += 1
        untimed(_Op(), None)
    stats = win.stats()
    assert stats.stage_ms == {"a": 3.0}
    assert stats.iterations == 2
    with pytest.raises(ValueError, match="another set"):  # (a lane's timers share its sums)
        win.timer("a", False, set())


def test_feeding_fewer_buffers_is_checked_again(ctx: pg.ManagedGpuContext,
                                               rng: np.random.Generator,
                                               checks: List[int]) -> None:
    """Feeding fewer buffers than the iteration remembered changes what is written: a
    stage reading the one no longer fed is refused; reading back fewer is fine."""

    def add(x: Any, z: Any, y: Any) -> None:
        np.add(device_view(x), device_view(z), out=device_view(y))

    pipe = ctx.create_pipeline_manager()
    b0, b1, b2 = pipe.add_buffer(N), pipe.add_buffer(N), pipe.add_buffer(N)
    pipe.add_stage(pg.GpuPipelineStage("add", [b0, b2], [b1], kernel=add))
    x, z = rand(rng, N), rand(rng, N)
    y, y0 = np.empty(N, F32), np.empty(N, F32)
    pipe.execute_iteration(inputs={b0: x, b2: z}, outputs={b1: y, b0: y0}).wait()
    pipe.execute_iteration(inputs={b2: z, b0: x}, outputs={b1: y}).wait()
    assert len(checks) == 1
    np.testing.assert_array_equal(y, x + z)
    np.testing.assert_array_equal(y0, x)
    with pytest.raises(pg.InvalidOperationError, match="reads buffer 2 before"):
        pipe.execute_iteration(inputs={b0: x}, outputs={b1: y})
    pipe.close()
