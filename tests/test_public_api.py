"""The public names are a contract (DESIGN.md section 2)."""

from __future__ import annotations

import types

import pytest

import prism_gpu as pg

ERRORS = {
    # error class -> the builtin it resembles
    "BackendUnavailableError": RuntimeError,
    "BufferUnavailableError": RuntimeError,
    "InvalidDependencyError": ValueError,
    "InvalidOperationError": RuntimeError,
    "TransferError": ValueError,
    "KernelError": RuntimeError,
    "DependencyFailedError": RuntimeError,
    "SynchronizationError": TimeoutError,
}

DESIGN_PUBLIC = {
    "TripleBuffer", "GpuTripleBuffer", "BufferState", "AsyncCoordinator", "Kernel",
    "LaunchConfig", "ManagedGpuContext", "StepConfig", "StepTelemetry", "GpuPipelineStage",
    "PipelineStageManager", "PipelineStats", "PipelineIteration", "stream_map",
    "pinned_empty", "register", "DeviceArray", "interop", "trace", "TraceOp", "set_sync_mode",
    "OpType", "CompletedOp", "PrismGpuError", *ERRORS,
}

# Exported beyond DESIGN.md's list: the slot type buffers hand out, the op id type,
# and the device factory used "wherever a device is created".
EXTRAS = {"Slot", "OpId", "open_device", "Trace", "TraceSummary", "sync_mode"}


def test_all_lists_the_design_names() -> None:
    missing = DESIGN_PUBLIC - set(pg.__all__)
    assert not missing, f"public names missing from __all__: {sorted(missing)}"
    unexpected = set(pg.__all__) - DESIGN_PUBLIC - EXTRAS
    assert not unexpected, f"names in __all__ that DESIGN.md does not list: {sorted(unexpected)}"
    assert len(pg.__all__) == len(set(pg.__all__)), "duplicates in __all__"


@pytest.mark.parametrize("name", sorted(pg.__all__))
def test_every_name_in_all_exists(name: str) -> None:
    assert getattr(pg, name, None) is not None


def test_star_import() -> None:
    ns: dict = {}
    exec("from prism_gpu import *", ns)
    assert DESIGN_PUBLIC <= set(ns)


def test_aliases_and_module() -> None:
    assert pg.GpuTripleBuffer is pg.TripleBuffer
    assert isinstance(pg.interop, types.ModuleType)
    assert callable(pg.interop.use_stream)


@pytest.mark.parametrize("name, builtin", sorted(ERRORS.items()))
def test_errors_derive_from_base_and_builtin(name: str, builtin: type) -> None:
    cls = getattr(pg, name)
    assert issubclass(cls, pg.PrismGpuError)
    assert issubclass(cls, builtin)


def test_base_error_is_an_exception() -> None:
    assert issubclass(pg.PrismGpuError, Exception)


def test_op_type_is_a_str_enum() -> None:
    assert {t.name for t in pg.OpType} == {"UPLOAD", "COMPUTE", "DOWNLOAD"}
    assert all(isinstance(t, str) for t in pg.OpType)


def test_buffer_states() -> None:
    assert {s.name for s in pg.BufferState} == {"FREE", "UPLOADING", "PROCESSING",
                                                "DOWNLOADING"}


def test_completed_op_fields() -> None:
    op = pg.CompletedOp(op_id=3, op_type=pg.OpType.COMPUTE, duration_ms=None, error=None)
    assert (op.op_id, op.op_type, op.duration_ms, op.error) == (3, pg.OpType.COMPUTE, None, None)


@pytest.mark.parametrize("grid, block, expect_grid, expect_block", [
    (16, 256, (16, 1, 1), (256, 1, 1)),
    ((4, 2, 1), (32, 8, 1), (4, 2, 1), (32, 8, 1)),
])
def test_launch_config_takes_ints_or_3_tuples(grid, block, expect_grid, expect_block) -> None:
    cfg = pg.LaunchConfig(grid=grid, block=block, shared_mem_bytes=0)
    assert (cfg.grid, cfg.block, cfg.shared_mem_bytes) == (expect_grid, expect_block, 0)
