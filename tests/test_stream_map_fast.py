"""stream_map's common path, done inside read_ahead (page-locked batches of a lane alone,
their results from the call's lease of the result pool), against the general path it
stands for: the same pulls, ops, staging, results and errors, batch by batch; and the
page-locked answers it remembers stay exact when registrations, strides or the arrays
themselves change."""

from __future__ import annotations

import itertools
import threading
import warnings
import weakref
from contextlib import closing
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pytest

import prism_gpu as pg
from _support import F32, rand
from prism_gpu import _staging, _stream_map
from prism_gpu._staging import cache_of


def _general(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch by the general path: read_ahead without the lane (as_is is the lane's
    queue, finish its finish), and the device asked about every batch."""
    real = _stream_map.read_ahead

    def without_lane(*args: Any, lane: Any = None, **kwargs: Any) -> Any:
        return real(*args, **kwargs)

    monkeypatch.setattr(_stream_map, "read_ahead", without_lane)
    monkeypatch.setattr(_staging, "_registrations", lambda device: None)


def _staged(monkeypatch: pytest.MonkeyPatch) -> Dict[str, Any]:
    """Counts the batches staged (copied into pinned memory first); keeps the stagers."""
    seen: Dict[str, Any] = {"staged": 0, "stagers": []}
    start, init = _staging.Stager.start, _staging.Stager.__init__

    def counting(self: Any, batch: np.ndarray) -> Any:
        seen["staged"] += 1
        return start(self, batch)

    def keeping(self: Any, *args: Any) -> None:
        init(self, *args)
        seen["stagers"].append(self)

    monkeypatch.setattr(_staging.Stager, "start", counting)
    monkeypatch.setattr(_staging.Stager, "__init__", keeping)
    return seen


def _run(ctx: pg.ManagedGpuContext, kernel: Any, batches: List[Any], depth: int,
         prefetch: int) -> Tuple[List[Any], Optional[Tuple[str, str, Any]]]:
    """Per result: (batches pulled, ops issued, the result); then the error raised."""
    pulled = [0]

    def produce() -> Iterator[Any]:
        for b in batches:
            pulled[0] += 1
            if isinstance(b, Exception):
                raise b
            yield b

    seen: List[Any] = []
    gen = pg.stream_map(kernel, produce(), depth=depth, prefetch=prefetch, ctx=ctx)
    error = None
    with closing(gen):
        try:
            for y in gen:
                lanes = gen.gi_frame.f_locals["lanes"]  # type: ignore[union-attr]
                seen.append((pulled[0], lanes[0].coord.statistics().issued, y.shape,
                             y.dtype.str, y.tobytes()))
        except Exception as exc:  # noqa: BLE001 - compared below
            error = (type(exc).__name__, str(exc), getattr(exc, "batch_index", None))
    return seen, error


def _scenario(ctx: pg.ManagedGpuContext, seed: int) -> Tuple[List[Any], Any, int, int]:
    """Batches of every kind the path tells apart, in a random order; a failing kernel
    call or a refused launch somewhere; the kernel, depth and prefetch."""
    rng = np.random.default_rng(seed)
    ring = [pg.pinned_empty(48, F32, ctx=ctx) for _ in range(3)]
    for r in ring:
        r[:] = rand(rng, 48)
    big = pg.pinned_empty((8, 64), F32, ctx=ctx)
    big[:] = rand(rng, 512).reshape(8, 64)
    ints = pg.pinned_empty(48, np.int16, ctx=ctx)
    ints[:] = np.arange(48, dtype=np.int16)
    def fresh() -> np.ndarray:
        b = pg.pinned_empty(48, F32, ctx=ctx)
        b[:] = rand(rng, 48)
        return b

    make = {
        "ring": lambda: ring[int(rng.integers(3))],
        "row": lambda: big[int(rng.integers(8))],               # a new view each time
        "fresh": fresh,
        "pageable": lambda: rand(rng, 48),
        "column": lambda: big[:, int(rng.integers(64))],       # pinned, not contiguous
        "ints": lambda: ints,
        "long": lambda: big.reshape(-1)[: int(rng.integers(49, 512))],
        "fortran": lambda: np.asfortranarray(rand(rng, 48).reshape(6, 8)),
    }
    kinds = ["ring"] * 7 + list(make)
    batches: List[Any] = [make[kinds[int(rng.integers(len(kinds)))]]()
                          for _ in range(int(rng.integers(20, 60)))]
    end = seed % 4  # to the end, a bad batch, a failing kernel call, a refused launch
    if end == 1:   # a bad batch, or the iterable's own error
        bad = [pg.pinned_empty(0, F32, ctx=ctx), np.array([1, "x"], dtype=object), [1.0],
               KeyError("the producer's")][int(rng.integers(4))]
        batches.insert(int(rng.integers(len(batches))), bad)
    fail, refuse = (int(rng.integers(len(batches))) if end == 2 else -1,
                    int(rng.integers(len(batches))) if end == 3 else -1)
    calls, checks = itertools.count(), itertools.count()

    def twice(x: np.ndarray) -> None:
        if next(calls) == fail:
            raise ArithmeticError("this one")
        np.multiply(x, x.dtype.type(2), out=x)

    def check(extra: Any) -> None:
        if next(checks) == refuse:
            raise ValueError("not this one")

    kernel = pg.Kernel.from_callable(twice, name="twice", check=check)
    return batches, kernel, int(rng.integers(1, 5)), int(rng.integers(0, 6))


@pytest.mark.parametrize("seed", range(12))
def test_the_common_path_does_what_the_general_one_does(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = []
    for general in (False, True):
        with monkeypatch.context() as m:
            if general:
                _general(m)
            seen = _staged(m)
            ctx = pg.ManagedGpuContext(backend="cpu")
            try:
                batches, kernel, depth, prefetch = _scenario(ctx, seed)
                runs.append((_run(ctx, kernel, batches, depth, prefetch), seen["staged"]))
            finally:
                ctx.close()
    (fast, fast_staged), (ref, ref_staged) = runs
    assert fast == ref and fast_staged == ref_staged


def test_page_locked_batches_take_the_common_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # (else the comparisons here compare the general path with itself)
    from prism_gpu._devlane import DeviceLane

    queued = []
    queue = DeviceLane.queue

    def counting(self: Any, staged: np.ndarray, pos: int, *args: Any) -> Any:
        queued.append(pos)
        return queue(self, staged, pos, *args)

    monkeypatch.setattr(DeviceLane, "queue", counting)
    ctx = pg.ManagedGpuContext(backend="cpu")
    try:
        ring = [pg.pinned_empty(64, F32, ctx=ctx) for _ in range(3)]
        for i, r in enumerate(ring):
            r[:] = i
        got = [float(y[0]) for y in pg.stream_map("scale", ring * 7, ctx=ctx)]
        assert got == [0.0, 2.0, 4.0] * 7
        assert queued == [0]                 # the first makes the ring; the rest go here
        with pg.trace():
            assert len(list(pg.stream_map("scale", ring * 2, ctx=ctx))) == 6
        assert queued == [0] + list(range(6))  # traced: each by the lane (its index set)
    finally:
        ctx.close()


@pytest.mark.parametrize("general", [False, True])
def test_a_batch_whose_registration_ended_is_staged(general: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    if general:
        _general(monkeypatch)
    seen = _staged(monkeypatch)
    ctx = pg.ManagedGpuContext(backend="cpu")
    try:
        data = rand(np.random.default_rng(5), 4 * 32).reshape(4, 32)
        expected = [r * F32(2) for r in data] * 3
        with pg.register(data, ctx=ctx) as pinned:
            rows = [pinned[i] for i in range(4)]              # pinned while registered
            gen = pg.stream_map("scale", rows * 3, depth=1, prefetch=0, ctx=ctx)
            got = [next(gen).copy() for _ in range(5)]
            before = seen["staged"]
        got += [y.copy() for y in gen]                       # the same row objects
        # holding result 4, batches up to 4 + depth + prefetch were pulled: 6 before
        # the block ended, the other 6 (the same objects) after it, so staged
        assert before == 0 and seen["staged"] == 12 - 6
        for e, y in zip(expected, got, strict=True):
            np.testing.assert_array_equal(y, e)
    finally:
        ctx.close()


def test_a_batch_whose_strides_were_set_is_staged(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _staged(monkeypatch)
    ctx = pg.ManagedGpuContext(backend="cpu")
    try:
        big = pg.pinned_empty(64, F32, ctx=ctx)
        big[:] = np.arange(64, dtype=F32)
        view, other = big[:32], pg.pinned_empty(32, F32, ctx=ctx)
        other[:] = 1

        def produce() -> Iterator[np.ndarray]:
            for _ in range(4):
                yield view
            yield other                                      # the views' uses are done:
            yield other                                      # (depth + prefetch + 1 later)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # (numpy 2.4 on)
                view.strides = (8,)                          # every other element now
            for _ in range(3):
                yield view

        got = [y.copy() for y in pg.stream_map("scale", produce(), depth=1, prefetch=0,
                                               ctx=ctx)]
        assert seen["staged"] == 3
        expected = [np.arange(32, dtype=F32) * 2] * 4 + [np.full(32, 2, F32)] * 2 + \
            [np.arange(0, 64, 2, dtype=F32) * 2] * 3
        for e, y in zip(expected, got, strict=True):
            np.testing.assert_array_equal(y, e)
    finally:
        ctx.close()


def test_a_remembered_answer_of_another_array_answers_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a dead array's entry at a new array's id, a live other array's, and this array's
    # from before a registration changed: none may send pageable memory as it is
    seen = _staged(monkeypatch)
    ctx = pg.ManagedGpuContext(backend="cpu")
    try:
        pinned = pg.pinned_empty(16, F32, ctx=ctx)
        pinned[:] = 1
        batches = [rand(np.random.default_rng(i), 16) for i in range(3)]
        dead = np.zeros(4)
        gone = weakref.ref(dead)
        del dead

        def produce() -> Iterator[np.ndarray]:
            yield pinned
            stager = seen["stagers"][-1]
            state = stager.ranges.state
            old = (state[0], state[1] - 1)
            for b, ref, st in zip(batches, (gone, weakref.ref(pinned), weakref.ref(batches[2])),
                                  (state, state, old)):
                stager.known[id(b)] = (ref, st)
                yield b

        got = [y.copy() for y in pg.stream_map("scale", produce(), depth=1, prefetch=0,
                                               ctx=ctx)]
        assert seen["staged"] == 3
        for b, y in zip([pinned] + batches, got, strict=True):
            np.testing.assert_array_equal(y, b * F32(2))
    finally:
        ctx.close()


@pytest.mark.parametrize("general", [False, True])
@pytest.mark.parametrize("closed_at", [0, 1, 3])
def test_a_context_closed_before_the_last_results_fails_them(
        ctx: pg.ManagedGpuContext, monkeypatch: pytest.MonkeyPatch, general: bool,
        closed_at: int) -> None:
    # six batches, depth 2: all pulled at once, the last queued while result 0 is held;
    # after that no queue call checks the context, the wait for the result must
    if general:
        _general(monkeypatch)
    batches = [pg.pinned_empty(32, F32, ctx=ctx) for _ in range(6)]
    for i, b in enumerate(batches):
        b[:] = i
    got: List[float] = []
    with closing(pg.stream_map("scale", batches, depth=2, ctx=ctx)) as results:
        with pytest.raises(pg.InvalidOperationError, match="closed") as info:
            for i, y in enumerate(results):
                got.append(float(y[0]))
                if i == closed_at:
                    ctx.close()
    assert info.value.batch_index == closed_at + 1  # type: ignore[attr-defined]
    assert got == [2.0 * i for i in range(closed_at + 1)]


def test_result_buffers_go_back_to_the_pool_at_the_end(ctx: pg.ManagedGpuContext) -> None:
    x = pg.pinned_empty(256, F32, ctx=ctx)
    x[:] = 3
    pool = cache_of(ctx.device).results
    kept = list(pg.stream_map("scale", [x] * 3, ctx=ctx))[-1]   # held past the call
    before = pool.allocations
    for _ in range(3):
        for y in pg.stream_map("scale", itertools.repeat(x, 40), depth=3, ctx=ctx):
            assert y[0] == 6
    assert pool.allocations - before <= pool.KEEP     # lent again, not made per call
    grown = pool.allocations
    for y in pg.stream_map("scale", itertools.repeat(x, 40), depth=3, ctx=ctx):
        assert y[0] == 6
    assert pool.allocations == grown                   # every buffer came back
    assert (kept == 6).all()                           # never handed out meanwhile


def test_stream_maps_on_two_threads_share_the_pool(ctx: pg.ManagedGpuContext) -> None:
    def run(value: float, out: List[bool]) -> None:
        x = pg.pinned_empty(512, F32, ctx=ctx)
        x[:] = value
        held = []
        for i, y in enumerate(pg.stream_map("scale", itertools.repeat(x, 200), ctx=ctx)):
            out.append(bool((y == 2 * value).all()))
            if i % 17 == 0:
                held.append(y)                         # kept: never overwritten
        out.append(all(bool((h == 2 * value).all()) for h in held))

    outs: List[List[bool]] = [[], []]
    threads = [threading.Thread(target=run, args=(v, o)) for v, o in zip((1.0, 5.0), outs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(o) == 201 and all(o) for o in outs)


@pytest.mark.parametrize("general", [False, True])
def test_a_failed_upload_is_the_batch_error(general: bool,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from prism_gpu.backends.cpu import _stream as cpu_stream

    if general:
        _general(monkeypatch)
    real = cpu_stream._copy

    def copy(dst: np.ndarray, src: np.ndarray) -> None:
        if src.reshape(-1)[0] == -7:                       # batch 5, on its way up
            raise OSError("the upload broke")
        real(dst, src)

    monkeypatch.setattr(cpu_stream, "_copy", copy)
    ctx = pg.ManagedGpuContext(backend="cpu")
    try:
        batches = [pg.pinned_empty(32, F32, ctx=ctx) for _ in range(8)]
        for i, b in enumerate(batches):
            b[:] = -7 if i == 5 else i
        got, error = _run(ctx, "scale", batches, 2, 1)
    finally:
        ctx.close()
    assert [g[-1] for g in got] == [(np.full(32, 2 * i, F32)).tobytes() for i in range(5)]
    assert error is not None and error[0] == "TransferError" and error[2] == 5  # its own
    assert error[1].startswith("stream_map: batch 5 failed: upload op")   # not the compute's


@pytest.mark.parametrize("general", [False, True])
def test_a_refused_launch_gives_its_slot_back(general: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    if general:
        _general(monkeypatch)
    calls = itertools.count()

    def check(extra: Any) -> None:  # refuses the launch of the fifth batch
        if next(calls) == 4:
            raise ValueError("not this one")

    ctx = pg.ManagedGpuContext(backend="cpu")
    try:
        kernel = pg.Kernel.from_callable(lambda x: None, name="picky", check=check)
        batches = [pg.pinned_empty(8, F32, ctx=ctx) for _ in range(8)]
        gen = pg.stream_map(kernel, batches, depth=2, ctx=ctx)
        next(gen)
        ring = gen.gi_frame.f_locals["lanes"][0].rings[("in", "<f4")]  # type: ignore
        with pytest.raises(ValueError, match="not this one"):
            list(gen)
        assert ring.get_states() == [pg.BufferState.FREE] * 2
    finally:
        ctx.close()


@pytest.mark.parametrize("general", [False, True])
def test_an_array_owning_its_memory_can_be_resized_meanwhile(
        general: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # numpy refuses to resize an array anything refers to weakly: what is remembered of
    # page-locked batches must not be such a reference to one that owns its memory
    if general:
        _general(monkeypatch)
    ctx = pg.ManagedGpuContext(backend="cpu")
    try:
        a, other = np.ones(64, F32), pg.pinned_empty(64, F32, ctx=ctx)
        other[:] = 3
        with pg.register(a, ctx=ctx):                       # a itself is page-locked now
            gen = pg.stream_map("scale", [a, a] + [other] * 4, depth=1, prefetch=0,
                                ctx=ctx)
            got = [float(next(gen)[0]) for _ in range(2)]
        got += [float(next(gen)[0]) for _ in range(2)]       # (a's uses are done)
        a.resize(1 << 16, refcheck=False)
        got += [float(y[0]) for y in gen]
        assert got == [2, 2, 6, 6, 6, 6] and a.size == 1 << 16
    finally:
        ctx.close()
