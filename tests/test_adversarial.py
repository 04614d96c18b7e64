"""Rejected calls, wrong types and closed objects.

Every rejected call raises a clear error (a TypeError, ValueError or a
``PrismGpuError``, never an AttributeError or a bare RuntimeError), is checked
before anything is queued, and changes no state: the next correct call behaves
as if it never happened (checked against numpy on fresh data).
"""

from __future__ import annotations

from contextlib import closing
from types import SimpleNamespace
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pytest

import prism_gpu as pg
from _support import checked_round, F32, rand, release_timer, snapshot, square2

UP = pg.BufferState.UPLOADING
N = 256


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0xAD7E)


_round = checked_round


def _issued(ctx: pg.ManagedGpuContext) -> Any:
    return snapshot(ctx.async_coordinator())[0]


def _steps(ctx: pg.ManagedGpuContext, rng: np.random.Generator, count: int) -> None:
    """``count`` checked ``triple_buffered_step`` calls on fresh data, all queued before
    the first wait (so a slot left behind by a rejected call would shift the results)."""
    queued = []
    for _ in range(count):
        x, y = rand(rng, N), np.full(N, np.nan, dtype=F32)
        queued.append((x, y, ctx.triple_buffered_step(
            pg.StepConfig(kernel="scale", input=x, output=y))))
    for i, (x, y, tel) in enumerate(queued):
        tel.wait()
        np.testing.assert_array_equal(y, x * F32(2), err_msg=f"step {i} after the rejection")


def _drain(results: Iterator[np.ndarray]) -> Tuple[List[np.ndarray], Optional[BaseException]]:
    """Copies of what ``results`` yields, and the exception that ended it (or None)."""
    got: List[np.ndarray] = []
    with closing(results) as it:
        try:
            for r in it:
                got.append(np.array(r, copy=True))
        except Exception as exc:
            return got, exc
    return got, None


# --- triple_buffered_step ------------------------------------------------------------------

def test_step_into_read_only_output_is_rejected_before_queueing(
        ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    """Today the download is refused only after the upload and compute were queued: the
    slot stays PROCESSING and every later step returns the previous step's result."""
    _steps(ctx, rng, 2)
    issued = _issued(ctx)
    x, y = rand(rng, N), np.zeros(N, dtype=F32)
    y.flags.writeable = False
    with pytest.raises(pg.TransferError):
        ctx.triple_buffered_step(pg.StepConfig(kernel="scale", input=x, output=y))
    assert _issued(ctx) == issued, "ops were queued for a step that was rejected"
    _steps(ctx, rng, 4)


def test_step_extra_must_be_a_sequence(ctx: pg.ManagedGpuContext,
                                       rng: np.random.Generator) -> None:
    _steps(ctx, rng, 1)
    issued = _issued(ctx)
    with pytest.raises(TypeError, match="extra"):
        # StepConfig may refuse it already; triple_buffered_step must at the latest
        ctx.triple_buffered_step(pg.StepConfig(kernel="scale", input=rand(rng, N),
                                               output=np.empty(N, F32), extra=5))
    assert _issued(ctx) == issued, "ops were queued for a step that was rejected"
    _steps(ctx, rng, 4)


def test_step_of_wrong_type(ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    with pytest.raises(TypeError):
        ctx.triple_buffered_step("x")  # type: ignore[arg-type]
    _steps(ctx, rng, 2)


# --- stream_map: every batch error carries batch_index --------------------------------------

def test_stream_map_bad_output_spec_of_one_batch(ctx: pg.ManagedGpuContext,
                                                 rng: np.random.Generator) -> None:
    """Batch 3's ``output`` spec is bad: batches 0..2 are yielded, then an error naming 3."""
    n = 64
    batches = [rand(rng, n) for _ in range(6)]
    batches[3] = rand(rng, n - 5)  # told apart by its length, however often spec is called

    def spec(b: np.ndarray) -> Any:
        return "bad" if b.size == n - 5 else ((2 * b.size,), np.float32)

    got, err = _drain(pg.stream_map(square2(), batches, ctx=ctx, output=spec))
    assert len(got) == 3, f"{len(got)} results before the error {err!r}"
    for x, y in zip(batches, got):
        np.testing.assert_array_equal(y, np.concatenate([x, x * x]))
    assert isinstance(err, (TypeError, pg.PrismGpuError)), repr(err)
    assert getattr(err, "batch_index", None) == 3, repr(err)


def test_stream_map_object_batch(ctx: pg.ManagedGpuContext, rng: np.random.Generator) -> None:
    batches: List[Any] = [rand(rng, 32) for _ in range(5)]
    batches[2] = np.array([1.0, "a", None], dtype=object)
    got, err = _drain(pg.stream_map("scale", batches, ctx=ctx))
    assert len(got) == 2, f"{len(got)} results before the error {err!r}"
    for x, y in zip(batches, got):
        np.testing.assert_array_equal(y, x * F32(2))
    assert isinstance(err, pg.TransferError), repr(err)
    assert getattr(err, "batch_index", None) == 2, repr(err)


def test_stream_map_empty_first_batch(ctx: pg.ManagedGpuContext,
                                      rng: np.random.Generator) -> None:
    batches = [np.empty(0, F32)] + [rand(rng, 32) for _ in range(3)]
    got, err = _drain(pg.stream_map("scale", batches, ctx=ctx))
    assert got == []
    assert isinstance(err, pg.TransferError), repr(err)
    assert getattr(err, "batch_index", None) == 0, repr(err)


@pytest.mark.parametrize("prefetch, error", [(-1, ValueError), ("x", TypeError)],
                         ids=["negative", "str"])
def test_stream_map_rejects_bad_prefetch(ctx: pg.ManagedGpuContext, rng: np.random.Generator,
                                         prefetch: Any, error: type) -> None:
    with pytest.raises(error):
        with closing(pg.stream_map("scale", [rand(rng, 16)], ctx=ctx,
                                   prefetch=prefetch)) as results:
            next(results)


# --- closed objects -------------------------------------------------------------------------

def test_closing_the_context_closes_its_coordinator(ctx: pg.ManagedGpuContext,
                                                    rng: np.random.Generator) -> None:
    coord = ctx.async_coordinator()
    buf = ctx.create_triple_buffer(16, dtype=np.float32)
    ctx.close()
    assert coord.closed is True
    with pytest.raises(pg.InvalidOperationError):
        coord.queue_upload(rand(rng, 16), buf)
    with pytest.raises(pg.InvalidOperationError):
        coord.poll()


def test_stream_map_on_a_closed_context(ctx: pg.ManagedGpuContext,
                                        rng: np.random.Generator) -> None:
    ctx.close()
    with pytest.raises(pg.InvalidOperationError):
        with closing(pg.stream_map(lambda a: None, [rand(rng, 16)], ctx=ctx)) as results:
            next(results)


# --- wait(timeout=...) ------------------------------------------------------------------------

def test_wait_with_an_infinite_timeout(coord: pg.AsyncCoordinator, device: Any,
                                       latch: Any, rng: np.random.Generator) -> None:
    """``timeout=inf`` is no timeout (the latch keeps the op in flight while wait starts)."""
    buf = pg.TripleBuffer(device, N, dtype=F32)
    x, out = rand(rng, N), np.full(N, np.nan, dtype=F32)
    coord.queue_compute("latch")
    up = coord.queue_upload(x, buf)
    coord.queue_compute("scale", [up])
    dn = coord.queue_download(buf, out)
    assert latch.held
    with release_timer(latch, delay=0.2) as timer:
        timer.start()
        coord.wait(dn, timeout=float("inf"))
    np.testing.assert_array_equal(out, x * F32(2))
    assert buf.advance() is True
    _round(coord, buf, rng)


@pytest.mark.parametrize("timeout, error", [("1", TypeError), (-1, ValueError),
                                            (float("nan"), ValueError)],
                         ids=["str", "negative", "nan"])
def test_wait_rejects_bad_timeouts_even_when_complete(
        coord: pg.AsyncCoordinator, device: Any, rng: np.random.Generator,
        timeout: Any, error: type) -> None:
    buf = pg.TripleBuffer(device, N, dtype=F32)
    x, out = rand(rng, N), np.full(N, np.nan, dtype=F32)
    up = coord.queue_upload(x, buf)
    coord.queue_compute("scale", [up])
    dn = coord.queue_download(buf, out)
    coord.wait(dn)
    with pytest.raises(error):
        coord.wait(dn, timeout=timeout)
    coord.wait(dn, timeout=0)
    np.testing.assert_array_equal(out, x * F32(2))


# --- launch configs ---------------------------------------------------------------------------

@pytest.mark.parametrize("config", ["bad", {"grid": 1}], ids=["str", "dict"])
def test_queue_compute_rejects_a_config_that_is_not_a_launch_config(
        coord: pg.AsyncCoordinator, device: Any, rng: np.random.Generator, config: Any) -> None:
    buf = pg.TripleBuffer(device, N, dtype=F32)
    _round(coord, buf, rng)
    x, out = rand(rng, N), np.full(N, np.nan, dtype=F32)
    up = coord.queue_upload(x, buf)
    before = snapshot(coord, buf)
    with pytest.raises(TypeError):
        coord.queue_compute("scale", [up], config=config)
    assert snapshot(coord, buf) == before
    assert buf.get_states().count(UP) == 1, "the upload no longer waits for a compute"
    coord.queue_compute("scale", [up])
    coord.wait(coord.queue_download(buf, out))
    assert buf.advance() is True
    np.testing.assert_array_equal(out, x * F32(2))
    _round(coord, buf, rng)


def test_pipeline_stage_rejects_a_bad_config() -> None:
    with pytest.raises(TypeError):
        pg.GpuPipelineStage(name="a", config="bad")  # type: ignore[arg-type]


def test_step_config_rejects_a_bad_config(rng: np.random.Generator) -> None:
    with pytest.raises(TypeError):
        pg.StepConfig(kernel="scale", input=rand(rng, 8), output=np.empty(8, F32),
                      config="bad")  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [{"grid": "12"}, {"grid": (1.5,)}, {"block": True},
                                    {"shared_mem_bytes": 1.9}],
                         ids=["grid-str", "grid-float", "block-bool", "smem-float"])
def test_launch_config_rejects_wrong_types(kwargs: Dict[str, Any]) -> None:
    with pytest.raises(TypeError):
        pg.LaunchConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"grid": 0}, {"grid": (1, -1)}], ids=["zero", "negative"])
def test_launch_config_rejects_bad_values(kwargs: Dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        pg.LaunchConfig(**kwargs)


def test_launch_config_accepts_numpy_ints() -> None:
    cfg = pg.LaunchConfig(grid=np.int64(4), block=(np.int32(128), np.int64(1)),
                          shared_mem_bytes=np.int64(0))
    assert tuple(cfg.grid) == (4, 1, 1)
    assert tuple(cfg.block) == (128, 1, 1)
    assert cfg.shared_mem_bytes == 0


# --- pipelines --------------------------------------------------------------------------------

def test_two_stages_with_one_name_are_rejected(ctx: pg.ManagedGpuContext) -> None:
    pipe = ctx.create_pipeline_manager()
    coord = pipe.coordinator()
    calls = {"first": 0, "second": 0}

    def first(_out: Any) -> None:
        calls["first"] += 1

    def second(_out: Any) -> None:
        calls["second"] += 1

    coord.register_kernel("first", first)
    coord.register_kernel("second", second)
    b0 = pipe.add_buffer(16, dtype=np.float32)
    pipe.add_stage(pg.GpuPipelineStage(name="s", output_buffers=[b0], kernel="first"))
    with pytest.raises(ValueError):
        pipe.add_stage(pg.GpuPipelineStage(name="s", output_buffers=[b0], kernel="second"))
    for _ in range(3):  # no set_order: the stages run in the order they were added
        pipe.execute_iteration()
    pipe.get_stats()
    assert calls == {"first": 3, "second": 0}


# --- pinned memory ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [-1, (2, -1), (-2, -2)], ids=["neg", "neg-2d", "neg-neg"])
def test_pinned_empty_rejects_negative_sizes(ctx: pg.ManagedGpuContext, shape: Any) -> None:
    with pytest.raises(ValueError):
        pg.pinned_empty(shape, np.float32, ctx=ctx)


def test_pinned_empty_of_zero_elements(ctx: pg.ManagedGpuContext) -> None:
    a = pg.pinned_empty(0, np.float32, ctx=ctx)
    assert a.shape == (0,) and a.dtype == np.float32


# --- op ids -----------------------------------------------------------------------------------

def test_numpy_integer_op_ids(coord: pg.AsyncCoordinator, device: Any,
                              rng: np.random.Generator) -> None:
    buf = pg.TripleBuffer(device, N, dtype=F32)
    x, out = rand(rng, N), np.full(N, np.nan, dtype=F32)
    up = coord.queue_upload(x, buf)
    c = coord.queue_compute("scale", [np.int64(int(up))])
    dn = coord.queue_download(buf, out)
    coord.wait(np.int64(int(dn)))
    assert coord.error(np.int32(int(c))) is None
    np.testing.assert_array_equal(out, x * F32(2))


def test_bool_is_not_an_op_id(coord: pg.AsyncCoordinator) -> None:
    coord.wait(coord.queue_compute("noop"))
    coord.wait(coord.queue_compute("noop"))  # op 1 exists: True must not name it
    with pytest.raises((TypeError, pg.InvalidOperationError)):
        coord.wait(True)


def test_op_id_of_another_coordinator(coord: pg.AsyncCoordinator, device: Any) -> None:
    with pg.AsyncCoordinator(device) as other:
        foreign = other.queue_compute("noop")
        other.wait(foreign)
        coord.wait(coord.queue_compute("noop"))  # the same number, issued here
        before = snapshot(coord)
        with pytest.raises(pg.InvalidOperationError):
            coord.wait(foreign)
        with pytest.raises(pg.InvalidDependencyError):
            coord.queue_compute("noop", [foreign])
        assert snapshot(coord) == before


# --- wrong types: TypeError or a PrismGpuError, never AttributeError -------------------------

_WRONG_TYPES: Dict[str, Callable[[Any], Any]] = {
    "upload-into-a-str": lambda e: e.coord.queue_upload(e.x, "notabuffer"),
    "download-from-None": lambda e: e.coord.queue_download(None, e.y),
    "compute-int-kernel": lambda e: e.coord.queue_compute(123, []),
    "compute-str-deps": lambda e: e.coord.queue_compute("scale", "abc"),
    "step-of-a-str": lambda e: e.ctx.triple_buffered_step("x"),
    "ring-size-str": lambda e: pg.TripleBuffer(e.device, "10"),
    "stream-map-int-kernel": lambda e: next(pg.stream_map(5, [e.x], ctx=e.ctx)),
}


@pytest.mark.parametrize("call", list(_WRONG_TYPES), ids=list(_WRONG_TYPES))
def test_wrong_types_are_type_errors(call: str, coord: pg.AsyncCoordinator, device: Any,
                                     ctx: pg.ManagedGpuContext,
                                     rng: np.random.Generator) -> None:
    env = SimpleNamespace(coord=coord, device=device, ctx=ctx, x=rand(rng, 16),
                          y=np.empty(16, F32))
    buf = pg.TripleBuffer(device, 16, dtype=F32)
    before = snapshot(coord, buf)
    with pytest.raises((TypeError, pg.PrismGpuError)):
        _WRONG_TYPES[call](env)
    assert snapshot(coord, buf) == before
    _round(coord, buf, rng)


def test_register_kernel_with_a_non_str_name(coord: pg.AsyncCoordinator) -> None:
    with pytest.raises((TypeError, ValueError)):
        coord.register_kernel(5, lambda a: None)  # type: ignore[arg-type]


# --- rejected transfers change nothing --------------------------------------------------------

_BAD_UPLOADS: Dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "too-big": lambda rng: rand(rng, N + 1),
    "float64": lambda rng: rand(rng, N).astype(np.float64),
    "strided": lambda rng: rand(rng, 2 * N)[::2],
}


@pytest.mark.parametrize("bad", list(_BAD_UPLOADS), ids=list(_BAD_UPLOADS))
def test_rejected_upload_changes_nothing(coord: pg.AsyncCoordinator, device: Any,
                                         rng: np.random.Generator, bad: str) -> None:
    buf = pg.TripleBuffer(device, N, dtype=F32)
    _round(coord, buf, rng)
    x0, out0 = rand(rng, N), np.full(N, np.nan, dtype=F32)
    coord.queue_compute("scale", [coord.queue_upload(x0, buf)])  # one batch in flight
    before = snapshot(coord, buf)
    with pytest.raises(pg.TransferError):
        coord.queue_upload(_BAD_UPLOADS[bad](rng), buf)
    assert snapshot(coord, buf) == before
    coord.wait(coord.queue_download(buf, out0))
    assert buf.advance() is True
    np.testing.assert_array_equal(out0, x0 * F32(2))
    for _ in range(4):
        _round(coord, buf, rng)


def _read_only(n: int) -> np.ndarray:
    a = np.empty(n, F32)
    a.flags.writeable = False
    return a


_BAD_DESTINATIONS: Dict[str, Callable[[], np.ndarray]] = {
    "too-small": lambda: np.empty(N - 1, F32),
    "float64": lambda: np.empty(N, np.float64),
    "read-only": lambda: _read_only(N),
}


@pytest.mark.parametrize("bad", list(_BAD_DESTINATIONS), ids=list(_BAD_DESTINATIONS))
def test_rejected_download_changes_nothing(coord: pg.AsyncCoordinator, device: Any,
                                           rng: np.random.Generator, bad: str) -> None:
    buf = pg.TripleBuffer(device, N, dtype=F32)
    _round(coord, buf, rng)
    x, out = rand(rng, N), np.full(N, np.nan, dtype=F32)
    coord.queue_compute("scale", [coord.queue_upload(x, buf)])
    before = snapshot(coord, buf)
    with pytest.raises(pg.TransferError):
        coord.queue_download(buf, _BAD_DESTINATIONS[bad]())
    assert snapshot(coord, buf) == before
    coord.wait(coord.queue_download(buf, out))
    assert buf.advance() is True
    np.testing.assert_array_equal(out, x * F32(2))
    for _ in range(4):
        _round(coord, buf, rng)
