"""Benchmark helpers of ``prism-gpu bench`` and ``benchmarks/``: copy-bandwidth and event
measurements, the calibrated upload / compute / download workload, and its hand-written
CuPy and PyTorch peers.

Not part of the library core: ``import prism_gpu`` does not import this package.
"""

from ._measure import Bandwidth as Bandwidth
from ._measure import event_overhead_us as event_overhead_us
from ._measure import measure_bandwidth as measure_bandwidth
from ._peers import run_peers as run_peers
from ._workload import MAX_STAGE_MS as MAX_STAGE_MS
from ._workload import Workload as Workload
from ._workload import WorkloadResult as WorkloadResult
from ._workload import calibrate as calibrate
from ._workload import check_footprint as check_footprint
from ._workload import run_workload as run_workload

__all__ = [
    "Bandwidth",
    "MAX_STAGE_MS",
    "Workload",
    "WorkloadResult",
    "calibrate",
    "check_footprint",
    "event_overhead_us",
    "measure_bandwidth",
    "run_peers",
    "run_workload",
]
