"""triple_buffered_step's common path: its one-pass checks refuse what the step by step
checks refuse (nothing queued), the telemetry is the ops' callback (times, the first
error, on_complete once), the last ring is reused, and ``extra`` given as a list."""

from __future__ import annotations

from typing import Any, Callable, Dict, List

import numpy as np
import pytest

import prism_gpu as pg
from _support import F32, Boom, boom, device_view, in_threads, rand

N = 256


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(2026)


def _issued(ctx: pg.ManagedGpuContext) -> int:
    return ctx.async_coordinator().statistics().issued


def _add(a: Any, k: Any) -> None:
    v = device_view(a)
    np.add(v, v.dtype.type(k), out=v)


def _double(a: Any) -> None:
    v = device_view(a)
    np.multiply(v, v.dtype.type(2), out=v)


def _steps(ctx: pg.ManagedGpuContext, rng: np.random.Generator, count: int,
           n: int = N) -> None:
    """``count`` steps of "scale" on fresh data, all queued before the first wait (a slot
    left behind by a rejected step would shift the results)."""
    queued = []
    for _ in range(count):
        x, y = rand(rng, n), np.full(n, np.nan, dtype=F32)
        queued.append((x, y, ctx.triple_buffered_step(
            pg.StepConfig(kernel="scale", input=x, output=y))))
    for i, (x, y, tel) in enumerate(queued):
        tel.wait()
        np.testing.assert_array_equal(y, x * F32(2), err_msg=f"step {i}")


# --- the telemetry: times, errors, on_complete ----------------------------------------------

def test_on_complete_is_called_once_with_the_three_times(timed_ctx: pg.ManagedGpuContext,
                                                         rng: np.random.Generator) -> None:
    _steps(timed_ctx, rng, 1)  # "scale" registered and the ring made: the common path
    seen: List[Dict[str, Any]] = []

    def on_complete(tel: pg.StepTelemetry) -> None:
        seen.append({"tel": tel, "error": tel.error, "upload": tel.upload_ms,
                     "compute": tel.compute_ms, "download": tel.download_ms})

    x, y = rand(rng, N), np.full(N, np.nan, dtype=F32)
    tel = timed_ctx.triple_buffered_step(pg.StepConfig(kernel="scale", input=x, output=y,
                                                 on_complete=on_complete))
    assert tel.wait() is tel
    timed_ctx.async_coordinator().synchronize_all()
    _steps(timed_ctx, rng, 4)
    assert len(seen) == 1, f"on_complete called {len(seen)} times"
    got = seen[0]
    assert got["tel"] is tel and got["error"] is None and tel.error is None
    for what in ("upload", "compute", "download"):
        assert isinstance(got[what], float) and got[what] >= 0, what
    assert (tel.upload_ms, tel.compute_ms, tel.download_ms) == \
        (got["upload"], got["compute"], got["download"])
    assert tel.total_ms == pytest.approx(got["upload"] + got["compute"] + got["download"])
    assert (tel.upload_op, tel.compute_op, tel.download_op) == \
        (tel.upload_op, tel.upload_op + 1, tel.upload_op + 2)
    np.testing.assert_array_equal(y, x * F32(2))


def test_a_failing_kernel_is_the_step_error(timed_ctx: pg.ManagedGpuContext,
                                            rng: np.random.Generator) -> None:
    coord = timed_ctx.async_coordinator()
    coord.register_kernel("boom", pg.Kernel.from_callable(boom))
    _steps(timed_ctx, rng, 2)
    calls: List[Any] = []
    x, y = rand(rng, N), np.full(N, np.nan, dtype=F32)
    tel = timed_ctx.triple_buffered_step(pg.StepConfig(kernel="boom", input=x, output=y,
                                                 on_complete=lambda t: calls.append(t.error)))
    with pytest.raises(Exception) as raised:
        tel.wait()
    with pytest.raises(pg.PrismGpuError):  # the download depended on it
        coord.wait(tel.download_op)
    kept = coord.error(tel.compute_op)
    assert kept is not None and "kernel exploded" in str(kept)
    assert tel.error is kept, "the step's error is its first failed op's (the compute)"
    assert type(raised.value) is type(kept)
    assert isinstance(raised.value, Boom) or isinstance(raised.value.__cause__, Boom) \
        or "kernel exploded" in str(raised.value)
    assert calls == [kept], "on_complete: once, after the download, with the error"
    assert coord.error(tel.upload_op) is None and isinstance(tel.upload_ms, float)
    assert np.isnan(y).all(), "a failed step's output is left alone"
    _steps(timed_ctx, rng, 4)  # the ring goes on


def test_each_step_has_its_own_telemetry(timed_ctx: pg.ManagedGpuContext,
                                         rng: np.random.Generator) -> None:
    """Each step's telemetry gets its own three ops only (one callback object per step)."""
    tels = []
    for _ in range(5):
        x, y = rand(rng, N), np.full(N, np.nan, dtype=F32)
        tels.append(timed_ctx.triple_buffered_step(
            pg.StepConfig(kernel="scale", input=x, output=y)))
    timed_ctx.async_coordinator().synchronize_all()
    ids = [(t.upload_op, t.compute_op, t.download_op) for t in tels]
    assert len({i for trio in ids for i in trio}) == 15
    for t in tels:
        assert t.error is None and t.done()
        assert all(isinstance(ms, float) for ms in (t.upload_ms, t.compute_ms, t.download_ms))


# --- extra as a list ---------------------------------------------------------------------------

@pytest.mark.parametrize("named", [True, False], ids=["registered-name", "callable"])
def test_extra_as_a_list_reaches_the_queue_as_a_tuple(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch,
        named: bool) -> None:
    coord = ctx.async_coordinator()
    coord.register_kernel("add", pg.Kernel.from_callable(_add))
    given: List[Any] = []
    queue_compute = coord.queue_compute

    def spy(*args: Any, **kwargs: Any) -> Any:
        given.append(kwargs.get("extra"))
        return queue_compute(*args, **kwargs)

    monkeypatch.setattr(coord, "queue_compute", spy)
    kernel: Any = "add" if named else _add
    for extra, expected in (([5], (5,)), ((7,), (7,)), ([3.0], (3.0,))):
        x, y = rand(rng, N), np.full(N, np.nan, dtype=F32)
        ctx.triple_buffered_step(pg.StepConfig(kernel=kernel, input=x, output=y,
                                               extra=extra)).wait()
        np.testing.assert_array_equal(y, x + F32(expected[0]))
        assert type(given[-1]) is tuple and given[-1] == expected
    # an empty list is no extra at all (the kernel's defaults), as an empty tuple is
    x, y = rand(rng, N), np.full(N, np.nan, dtype=F32)
    ctx.triple_buffered_step(pg.StepConfig(kernel="scale", input=x, output=y,
                                           extra=[])).wait()
    assert given[-1] is None
    np.testing.assert_array_equal(y, x * F32(2))


# --- the ring: grown, reused, one per dtype ---------------------------------------------------

def test_rings_per_dtype_grow_and_are_reused(ctx: pg.ManagedGpuContext,
                                             rng: np.random.Generator) -> None:
    ctx.async_coordinator().register_kernel("double", pg.Kernel.from_callable(_double))
    jobs = []
    for dtype, n in [(np.float32, 100), (np.float64, 100), (np.float32, 300), (np.float32, 50),
                     (np.int32, 64), (np.float64, 1000), (np.float32, 300), (np.float64, 7),
                     (np.dtype("<f4"), 301), (np.float32, 1), (np.float32, 700),
                     (np.float32, 2000), (np.float32, 3)]:  # (grown from the cached ring)
        x = (rng.standard_normal(n) * 100).astype(dtype)
        y = np.zeros(n, dtype=dtype)
        jobs.append((x.copy(), y, ctx.triple_buffered_step(
            pg.StepConfig(kernel="double", input=x, output=y))))
        x[:] = 0  # staged at the call: changing it afterwards changes nothing
    for i, (x, y, tel) in enumerate(jobs):
        tel.wait()
        np.testing.assert_array_equal(y, x * x.dtype.type(2), err_msg=f"step {i}")
    for dtype, n in [(np.float32, 2000), (np.float64, 1000), (np.int32, 64)]:
        assert ctx._rings[np.dtype(dtype).str].capacity >= n


def test_output_larger_than_the_input_gets_its_head(ctx: pg.ManagedGpuContext,
                                                    rng: np.random.Generator) -> None:
    _steps(ctx, rng, 1)
    x, y = rand(rng, N), np.full(2 * N, np.nan, dtype=F32)
    ctx.triple_buffered_step(pg.StepConfig(kernel="scale", input=x, output=y)).wait()
    np.testing.assert_array_equal(y[:N], x * F32(2))
    assert np.isnan(y[N:]).all()
    x2d, y2d = rand(rng, N).reshape(16, -1), np.full((16, N // 16), np.nan, dtype=F32)
    ctx.triple_buffered_step(pg.StepConfig(kernel="scale", input=x2d, output=y2d)).wait()
    np.testing.assert_array_equal(y2d, x2d * F32(2))


# --- refusals: nothing queued, nothing left behind ---------------------------------------------

def _ro(n: int) -> np.ndarray:
    y = np.zeros(n, dtype=F32)
    y.flags.writeable = False
    return y


BAD: Dict[str, Callable[[np.ndarray], Dict[str, Any]]] = {
    "strided-input": lambda x: {"input": np.repeat(x, 2)[::2]},
    "empty-input": lambda x: {"input": x[:0]},
    "list-input": lambda x: {"input": list(x)},
    "read-only-output": lambda x: {"output": _ro(N)},
    "short-output": lambda x: {"output": np.empty(N - 1, F32)},
    "strided-output": lambda x: {"output": np.empty(2 * N, F32)[::2]},
    "float64-output": lambda x: {"output": np.empty(N, np.float64)},
    "list-output": lambda x: {"output": [0.0] * N},
    "unknown-kernel": lambda x: {"kernel": "nope"},
}
MESSAGE = {"strided-input": "StepConfig.input", "empty-input": "StepConfig.input",
           "list-input": "StepConfig.input", "read-only-output": "StepConfig.output",
           "short-output": "StepConfig.output", "strided-output": "StepConfig.output",
           "float64-output": "StepConfig.output", "list-output": "StepConfig.output",
           "unknown-kernel": "nope"}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_step_is_refused_before_anything_is_queued(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator, case: str) -> None:
    _steps(ctx, rng, 2)  # the common path is warm: kernel registered, ring cached
    fields: Dict[str, Any] = {"kernel": "scale", "input": rand(rng, N),
                              "output": np.full(N, np.nan, dtype=F32)}
    fields.update(BAD[case](fields["input"]))
    issued = _issued(ctx)
    ring = ctx._rings[np.dtype(F32).str]
    states = ring.get_states()
    with pytest.raises(pg.PrismGpuError, match=MESSAGE[case]):
        ctx.triple_buffered_step(pg.StepConfig(**fields))
    assert _issued(ctx) == issued, "ops were queued for a step that was refused"
    assert ctx._rings[np.dtype(F32).str] is ring and ring.get_states() == states
    _steps(ctx, rng, 4)


@pytest.mark.parametrize("field, value", [("extra", 5), ("config", "bad"),
                                          ("on_complete", 5), ("kernel", 5)])
def test_a_record_changed_after_it_was_made_is_checked_again(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator, field: str, value: Any) -> None:
    _steps(ctx, rng, 2)
    cfg = pg.StepConfig(kernel="scale", input=rand(rng, N), output=np.empty(N, F32))
    setattr(cfg, field, value)
    issued = _issued(ctx)
    with pytest.raises(TypeError, match=field):
        ctx.triple_buffered_step(cfg)
    assert _issued(ctx) == issued
    _steps(ctx, rng, 4)


def test_a_larger_bad_input_does_not_grow_the_ring(ctx: pg.ManagedGpuContext,
                                                   rng: np.random.Generator) -> None:
    _steps(ctx, rng, 1)
    ring = ctx._rings[np.dtype(F32).str]
    capacity = ring.capacity
    big = rand(rng, 8 * capacity + 8)
    for cfg in (pg.StepConfig(kernel="scale", input=big[::2], output=np.empty(big.size, F32)),
                pg.StepConfig(kernel="scale", input=big, output=_ro(big.size)),
                pg.StepConfig(kernel="nope", input=big, output=np.empty(big.size, F32))):
        with pytest.raises(pg.PrismGpuError):
            ctx.triple_buffered_step(cfg)
        assert ctx._rings[np.dtype(F32).str] is ring and ring.capacity == capacity
    _steps(ctx, rng, 4)


@pytest.mark.parametrize("bigger", [False, True], ids=["cached-ring", "ring-to-grow"])
def test_a_step_from_another_thread_is_refused_and_changes_nothing(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator, bigger: bool) -> None:
    _steps(ctx, rng, 2)
    ring = ctx._rings[np.dtype(F32).str]
    states, capacity = ring.get_states(), ring.capacity
    n = 4 * capacity if bigger else N
    x, y = rand(rng, n), np.full(n, np.nan, dtype=F32)
    issued = _issued(ctx)
    errors = in_threads(lambda: ctx.triple_buffered_step(
        pg.StepConfig(kernel="scale", input=x, output=y)), [()])
    assert len(errors) == 1 and isinstance(errors[0], pg.InvalidOperationError), errors
    assert "thread" in str(errors[0])
    assert _issued(ctx) == issued
    assert ctx._rings[np.dtype(F32).str] is ring
    assert ring.get_states() == states and ring.capacity == capacity
    assert np.isnan(y).all()
    _steps(ctx, rng, 4)


def test_a_step_on_a_closed_coordinator_is_refused(ctx: pg.ManagedGpuContext,
                                                   rng: np.random.Generator) -> None:
    _steps(ctx, rng, 2)
    coord = ctx.async_coordinator()
    coord.close()
    x, y = rand(rng, N), np.full(N, np.nan, dtype=F32)
    with pytest.raises(pg.InvalidOperationError, match="closed"):
        ctx.triple_buffered_step(pg.StepConfig(kernel="scale", input=x, output=y))
    assert np.isnan(y).all()


def test_a_step_from_an_on_done_callback_is_refused(ctx: pg.ManagedGpuContext,
                                                    rng: np.random.Generator) -> None:
    _steps(ctx, rng, 2)
    coord = ctx.async_coordinator()
    seen: List[BaseException] = []
    x, y = rand(rng, N), np.full(N, np.nan, dtype=F32)

    def step_in_callback(tel: pg.StepTelemetry) -> None:
        try:
            ctx.triple_buffered_step(pg.StepConfig(kernel="scale", input=x, output=y))
        except pg.InvalidOperationError as exc:
            seen.append(exc)

    ctx.triple_buffered_step(pg.StepConfig(kernel="scale", input=rand(rng, N),
                                           output=np.empty(N, F32),
                                           on_complete=step_in_callback)).wait()
    coord.synchronize_all()
    assert len(seen) == 1
    assert np.isnan(y).all()
    _steps(ctx, rng, 4)


def test_a_context_closed_refuses_steps(backend: str, rng: np.random.Generator) -> None:
    ctx = pg.ManagedGpuContext(backend=backend)
    _steps(ctx, rng, 2)
    ctx.close()
    with pytest.raises(pg.InvalidOperationError, match="closed"):
        ctx.triple_buffered_step(pg.StepConfig(kernel="scale", input=rand(rng, N),
                                               output=np.empty(N, F32)))


# --- StepConfig -------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("extra", 5), ("config", "bad"), ("on_complete", 5),
                                          ("kernel", 5), ("extra", "ab"), ("kernel", None)])
def test_step_config_refuses_bad_fields_when_made(field: str, value: Any) -> None:
    fields: Dict[str, Any] = {"kernel": "scale", "input": np.ones(4, F32),
                              "output": np.empty(4, F32), field: value}
    with pytest.raises(TypeError, match=field):
        pg.StepConfig(**fields)


def test_step_config_takes_every_documented_form() -> None:
    x, y = np.ones(4, F32), np.empty(4, F32)
    common = pg.StepConfig("scale", x, y)
    assert common.extra == () and common.config is None and common.on_complete is None
    assert common == pg.StepConfig(kernel="scale", input=x, output=y, extra=())
    others = [pg.StepConfig(kernel=_double, input=x, output=y),
              pg.StepConfig(kernel=pg.Kernel.from_callable(_double), input=x, output=y),
              pg.StepConfig(kernel="add", input=x, output=y, extra=[1]),
              pg.StepConfig(kernel="scale", input=x, output=y, config=pg.LaunchConfig(1, 4)),
              pg.StepConfig(kernel="scale", input=x, output=y, on_complete=print)]
    assert [o.kernel for o in others][2:] == ["add", "scale", "scale"]
    assert "StepConfig(kernel='scale'" in repr(common)


def test_has_kernel_tells_registered_names_and_never_raises() -> None:
    coord = pg.AsyncCoordinator(pg.open_device("cpu"))
    try:
        assert not coord.has_kernel("mine") and not coord.has_kernel("")
        coord.register_kernel("mine", lambda x: None)
        assert coord.has_kernel("mine")
        assert not coord.has_kernel(5) and not coord.has_kernel([])  # type: ignore[arg-type]
    finally:
        coord.close()


# --- timing off, and the kernel name remembered ------------------------------------------

def test_a_context_without_timing_steps_with_no_times(backend: str,
                                                      rng: np.random.Generator) -> None:
    """``timing=False``: the coordinator times nothing, each step's result is right and
    its telemetry's times stay None (on_complete still called once, error None)."""
    with pg.ManagedGpuContext(backend=backend, timing=False) as ctx:
        assert ctx.async_coordinator().timing is False
        seen: List[pg.StepTelemetry] = []
        for _ in range(5):
            x, y = rand(rng, N), np.full(N, np.nan, dtype=F32)
            tel = ctx.triple_buffered_step(pg.StepConfig(kernel="scale", input=x, output=y,
                                                         on_complete=seen.append))
            tel.wait()
            np.testing.assert_array_equal(y, x * F32(2))
            assert (tel.upload_ms, tel.compute_ms, tel.download_ms, tel.total_ms) == \
                (None, None, None, None)
        ctx.async_coordinator().poll()
        assert len(seen) == 5 and all(t.error is None for t in seen)
    with pg.ManagedGpuContext(backend=backend, timing=True) as ctx:  # times every op
        x, y = rand(rng, N), np.full(N, np.nan, dtype=F32)
        tel = ctx.triple_buffered_step(pg.StepConfig(kernel="scale", input=x, output=y))
        tel.wait()
        ctx.async_coordinator().poll()
        assert all(isinstance(t, float) and t >= 0 for t in
                   (tel.upload_ms, tel.compute_ms, tel.download_ms))


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_timing_must_be_a_bool(bad: Any) -> None:
    with pytest.raises(TypeError, match="timing must be True or False"):
        pg.ManagedGpuContext(backend="cpu", timing=bad)


def test_timing_takes_a_numpy_bool() -> None:
    with pg.ManagedGpuContext(backend="cpu", timing=np.bool_(False)) as ctx:
        assert ctx.async_coordinator().timing is False


def test_a_name_after_the_remembered_one_is_still_checked(ctx: pg.ManagedGpuContext,
                                                          rng: np.random.Generator) -> None:
    """The step remembers the last kernel name it found registered; another name is
    checked again: an unknown one is refused before anything is queued, a registered
    one runs."""
    _steps(ctx, rng, 2)  # "scale" remembered
    before = _issued(ctx)
    x, y = rand(rng, N), np.full(N, np.nan, dtype=F32)
    with pytest.raises(pg.InvalidOperationError, match="no kernel named 'scal'"):
        ctx.triple_buffered_step(pg.StepConfig(kernel="scal", input=x, output=y))
    assert _issued(ctx) == before
    ctx.async_coordinator().register_kernel("double", _double)
    tel = ctx.triple_buffered_step(pg.StepConfig(kernel="double", input=x, output=y))
    tel.wait()
    np.testing.assert_array_equal(y, x * F32(2))
    _steps(ctx, rng, 2)
