"""prism-gpu: make GPU work stream from Python.

Triple buffering, event-ordered asynchronous ops, multi-stage pipelines and
honest statistics, on CUDA (through cuda.core) or on a threaded CPU backend.
"""

from ._buffers import BufferState as BufferState
from ._buffers import GpuTripleBuffer as GpuTripleBuffer
from ._buffers import Slot as Slot
from ._buffers import TripleBuffer as TripleBuffer
from ._config import LaunchConfig as LaunchConfig
from ._config import StepConfig as StepConfig
from ._context import ManagedGpuContext as ManagedGpuContext
from ._context import StepTelemetry as StepTelemetry
from ._coordinator import AsyncCoordinator as AsyncCoordinator
from ._errors import BackendUnavailableError as BackendUnavailableError
from ._errors import BufferUnavailableError as BufferUnavailableError
from ._errors import DependencyFailedError as DependencyFailedError
from ._errors import InvalidDependencyError as InvalidDependencyError
from ._errors import InvalidOperationError as InvalidOperationError
from ._errors import KernelError as KernelError
from ._errors import PrismGpuError as PrismGpuError
from ._errors import SynchronizationError as SynchronizationError
from ._errors import TransferError as TransferError
from ._kernels import Kernel as Kernel
from ._ops import CompletedOp as CompletedOp
from ._ops import OpId as OpId
from ._ops import OpType as OpType
from ._pipeline import GpuPipelineStage as GpuPipelineStage
from ._pipeline import PipelineIteration as PipelineIteration
from ._pipeline import PipelineStageManager as PipelineStageManager
from ._pipeline import PipelineStats as PipelineStats
from ._devarray import DeviceArray as DeviceArray
from ._hostmem import pinned_empty as pinned_empty
from ._hostmem import register as register
from ._sync import set_sync_mode as set_sync_mode
from ._sync import sync_mode as sync_mode
from ._trace import Trace as Trace
from ._trace import TraceOp as TraceOp
from ._trace import TraceSummary as TraceSummary
from ._trace import trace as trace
from ._stream_map import stream_map as stream_map
from . import interop as interop
from .backends import open_device as open_device

__version__ = "0.1.0"

__all__ = [
    "AsyncCoordinator",
    "BackendUnavailableError",
    "BufferState",
    "BufferUnavailableError",
    "CompletedOp",
    "DeviceArray",
    "DependencyFailedError",
    "GpuPipelineStage",
    "GpuTripleBuffer",
    "InvalidDependencyError",
    "InvalidOperationError",
    "Kernel",
    "KernelError",
    "LaunchConfig",
    "ManagedGpuContext",
    "OpId",
    "OpType",
    "PipelineIteration",
    "PipelineStageManager",
    "PipelineStats",
    "PrismGpuError",
    "Slot",
    "StepConfig",
    "StepTelemetry",
    "SynchronizationError",
    "Trace",
    "TraceOp",
    "TraceSummary",
    "TransferError",
    "TripleBuffer",
    "interop",
    "open_device",
    "pinned_empty",
    "register",
    "set_sync_mode",
    "stream_map",
    "sync_mode",
    "trace",
]
