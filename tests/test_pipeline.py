"""PipelineStageManager: overlapped stages keep each iteration's data; stats are sane."""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import pytest

import prism_gpu as pg
from _support import F32, device_view, host_copy, rand, write

N = 256


class ThreeStages:
    """Preprocess writes iteration i's data, MainCompute maps it, Postprocess checks it."""

    def __init__(self, rng: np.random.Generator, iterations: int) -> None:
        self.data = [rand(rng, N) for _ in range(iterations)]
        self.calls: Dict[str, int] = {"pre": 0, "post": 0}
        self.mismatches: List[int] = []

    def pre(self, out: Any) -> None:
        i = self.calls["pre"]
        self.calls["pre"] += 1
        write(out, self.data[i])

    @staticmethod
    def main(inp: Any, out: Any) -> None:
        out = device_view(out)
        np.multiply(device_view(inp), F32(2), out=out)
        np.add(out, F32(1), out=out)

    def post(self, inp: Any) -> None:
        i = self.calls["post"]
        self.calls["post"] += 1
        if not np.array_equal(host_copy(inp), self.data[i] * F32(2) + F32(1)):
            self.mismatches.append(i)

    def build(self, pipe: pg.PipelineStageManager) -> List[int]:
        coord = pipe.coordinator()
        for name in ("pre", "main", "post"):
            coord.register_kernel(name, getattr(self, name))
        b0 = pipe.add_buffer(N, dtype=np.float32)
        b1 = pipe.add_buffer(N, dtype=np.float32)
        stages = [
            pg.GpuPipelineStage(name="Preprocess", input_buffers=[], output_buffers=[b0],
                                kernel="pre"),
            pg.GpuPipelineStage(name="MainCompute", input_buffers=[b0], output_buffers=[b1],
                                kernel="main", config=pg.LaunchConfig(grid=1, block=N)),
            pg.GpuPipelineStage(name="Postprocess", input_buffers=[b1], output_buffers=[],
                                kernel="post"),
        ]
        order = [pipe.add_stage(s) for s in stages]
        pipe.set_order(order)
        return order


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(31337)


def test_three_stages_keep_every_iteration_intact(coord: pg.AsyncCoordinator,
                                                  rng: np.random.Generator) -> None:
    iterations = 200
    stages = ThreeStages(rng, iterations)
    pipe = pg.PipelineStageManager(coord)
    stages.build(pipe)
    numbers = [pipe.execute_iteration().index for _ in range(iterations)]
    stats = pipe.get_stats()
    assert numbers == list(range(iterations))
    assert stages.calls == {"pre": iterations, "post": iterations}
    assert stages.mismatches == []

    assert isinstance(stats, pg.PipelineStats)
    assert stats.iterations == iterations
    assert stats.avg_iteration_ms > 0
    assert 0 < stats.gpu_utilization <= 1
    assert stats.throughput > 0
    assert set(stats.stage_ms) == {"Preprocess", "MainCompute", "Postprocess"}
    assert all(ms >= 0 for ms in stats.stage_ms.values())
    assert pipe.coordinator() is coord
    pipe.close()


def test_reset_stats_starts_a_new_window(coord: pg.AsyncCoordinator,
                                         rng: np.random.Generator) -> None:
    stages = ThreeStages(rng, 70)
    pipe = pg.PipelineStageManager(coord)
    stages.build(pipe)
    for _ in range(40):
        pipe.execute_iteration()
    pipe.reset_stats()                       # iterations of the old window may be in flight
    for _ in range(30):
        pipe.execute_iteration()
    assert pipe.get_stats().iterations == 30
    assert pipe.get_stats().iterations == 30
    pipe.reset_stats()
    assert pipe.get_stats().iterations == 0
    assert stages.mismatches == []
    pipe.close()


def test_builtin_kernel_stage(coord: pg.AsyncCoordinator) -> None:
    """A stage named after a built-in kernel needs no registration."""
    pipe = pg.PipelineStageManager(coord)
    b0 = pipe.add_buffer(64, dtype=np.float32)
    for slot in pipe.buffer(b0).slots:  # (host memory on the CPU backend: not garbage that
        if isinstance(slot.full, np.ndarray):  # doubling overflows, warned as an error)
            slot.full[:] = 1
    pipe.set_order([pipe.add_stage(pg.GpuPipelineStage(name="scale", output_buffers=[b0]))])
    for _ in range(10):
        pipe.execute_iteration()
    assert pipe.get_stats().iterations == 10
    pipe.close()


def test_stage_naming_a_missing_buffer(coord: pg.AsyncCoordinator) -> None:
    pipe = pg.PipelineStageManager(coord)
    b0 = pipe.add_buffer(16)
    with pytest.raises(pg.PrismGpuError, match="add_buffer"):  # refused when added
        pipe.add_stage(pg.GpuPipelineStage(name="scale", input_buffers=[b0],
                                           output_buffers=[b0 + 1]))
    with pytest.raises(pg.PrismGpuError, match="stage"):
        pipe.set_order([0])  # nothing was added
    pipe.close()


@pytest.mark.parametrize("order", [[1], [0, 5], [-1]])
def test_set_order_with_an_unknown_stage(coord: pg.AsyncCoordinator, order: List[int]) -> None:
    pipe = pg.PipelineStageManager(coord)
    b0 = pipe.add_buffer(16)
    pipe.add_stage(pg.GpuPipelineStage(name="scale", output_buffers=[b0]))
    with pytest.raises(pg.PrismGpuError, match="stage"):
        pipe.set_order(order)
    # the rejected order changed nothing: stages run in the order they were added
    assert pipe.execute_iteration().index == 0
    pipe.get_stats()
    pipe.close()


def test_context_creates_pipeline_managers(ctx: pg.ManagedGpuContext,
                                           rng: np.random.Generator) -> None:
    pipe = ctx.create_pipeline_manager()
    assert isinstance(pipe, pg.PipelineStageManager)
    assert isinstance(pipe.coordinator(), pg.AsyncCoordinator)
    stages = ThreeStages(rng, 20)
    stages.build(pipe)
    for _ in range(20):
        pipe.execute_iteration()
    assert pipe.get_stats().iterations == 20
    assert stages.mismatches == [] and stages.calls["post"] == 20


def test_stages_overlap_per_timing_events(ctx: pg.ManagedGpuContext) -> None:
    """Three stages of equal length on their own streams: about one stage's time per
    iteration, not three (read from the stages' timing events, not the wall clock)."""
    pipe = ctx.create_pipeline_manager()
    b0, b1 = pipe.add_buffer(16), pipe.add_buffer(16)
    us = (20_000.0,)  # 20 ms each: the built-in spin holds its stream that long
    pipe.add_stage(pg.GpuPipelineStage("a", [], [b0], kernel="spin", extra=us))
    pipe.add_stage(pg.GpuPipelineStage("b", [b0], [b1], kernel="spin", extra=us))
    pipe.add_stage(pg.GpuPipelineStage("c", [b1], [], kernel="spin", extra=us))
    for _ in range(8):
        pipe.execute_iteration()
    stats = pipe.get_stats()
    pipe.close()
    assert stats.iterations == 8
    assert set(stats.stage_ms) == {"a", "b", "c"}
    assert all(ms >= 15.0 for ms in stats.stage_ms.values()), stats
    # sequential stages would take the sum; overlapped ones about the longest
    assert stats.avg_iteration_ms < 0.6 * sum(stats.stage_ms.values()), stats
    assert stats.gpu_utilization > 0.5, stats


def test_other_apis_write_a_pipeline_slot_only_after_its_readers(
        rng: np.random.Generator) -> None:
    """CPU backend (a stage blocks its stream): an upload into a pipeline buffer through
    another coordinator waits on the device for the stage still reading that slot."""
    import threading

    release = threading.Event()
    seen: List[np.ndarray] = []
    first = rand(rng, N)

    def fill(out: np.ndarray) -> None:
        out[:] = first

    def hold(inp: np.ndarray) -> None:
        assert release.wait(30), "not released"
        seen.append(inp.copy())

    with pg.ManagedGpuContext(backend="cpu") as ctx:
        pipe = ctx.create_pipeline_manager(depth=1)
        b0 = pipe.add_buffer(N)
        pipe.add_stage(pg.GpuPipelineStage("fill", [], [b0], kernel=fill))
        pipe.add_stage(pg.GpuPipelineStage("hold", [b0], [], kernel=hold))
        pipe.execute_iteration()
        coord = ctx.async_coordinator()          # not the pipeline's own coordinator
        ring = pipe.buffer(b0)
        x = rand(rng, N)
        up = coord.queue_upload(x, ring)         # the slot "hold" is still reading
        assert not coord.is_complete(up)
        release.set()
        coord.wait(up)
        pipe.get_stats()
        np.testing.assert_array_equal(seen[0], first)   # the stage read its own data
        out = np.empty(N, F32)
        coord.queue_compute("noop", [up])
        coord.queue_download(ring, out)
        coord.synchronize_all()
        np.testing.assert_array_equal(out, x)
        ring.advance()
        pipe.close()
