"""ManagedGpuContext: one device, its coordinator, buffers and pipelines."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ._buffers import TripleBuffer
from ._config import StepConfig
from ._coordinator import AsyncCoordinator
from ._errors import InvalidOperationError
from ._validate import host_array

__all__ = ["ManagedGpuContext", "StepTelemetry"]


class StepTelemetry:
    """What :meth:`ManagedGpuContext.triple_buffered_step` queued.

    ``upload_ms``, ``compute_ms`` and ``download_ms`` are the GPU times of the
    three ops, None until they complete (see :meth:`done` and :meth:`wait`).
    """

    __slots__ = ("upload_op", "compute_op", "download_op", "upload_ms", "compute_ms",
                 "download_ms", "error", "_coord")

    def __init__(self, coord: AsyncCoordinator) -> None:
        self._coord = coord
        self.upload_op = self.compute_op = self.download_op = -1
        self.upload_ms: Optional[float] = None
        self.compute_ms: Optional[float] = None
        self.download_ms: Optional[float] = None
        self.error: Optional[BaseException] = None

    def _upload_done(self, op: Any, ms: Optional[float]) -> None:
        self.upload_ms = ms
        self.error = self.error or op.error

    def _compute_done(self, op: Any, ms: Optional[float]) -> None:
        self.compute_ms = ms
        self.error = self.error or op.error

    def _download_done(self, op: Any, ms: Optional[float]) -> None:
        self.download_ms = ms
        self.error = self.error or op.error

    def done(self) -> bool:
        """True once the download completed (never blocks)."""
        return self._coord.is_complete(self.download_op)

    def wait(self, timeout: Optional[float] = None) -> "StepTelemetry":
        """Block until the step's output is in place; raise the step's error if any."""
        for op in (self.upload_op, self.compute_op, self.download_op):
            self._coord.wait(op, timeout)
        return self

    @property
    def total_ms(self) -> Optional[float]:
        parts = (self.upload_ms, self.compute_ms, self.download_ms)
        return None if any(p is None for p in parts) else sum(parts)  # type: ignore[misc]

    def __repr__(self) -> str:
        return (f"StepTelemetry(ops=({self.upload_op}, {self.compute_op}, {self.download_op}), "
                f"upload_ms={self.upload_ms}, compute_ms={self.compute_ms}, "
                f"download_ms={self.download_ms})")


class ManagedGpuContext:
    """A device with its coordinator, buffers and pipelines, freed together.

    >>> with ManagedGpuContext(device=0, backend="cpu") as ctx:   # doctest: +SKIP
    ...     buf = ctx.create_triple_buffer(2048, dtype=np.float32)
    """

    def __init__(self, device: int = 0, enable_streams: bool = True, backend: str = "auto", *,
                 max_in_flight: int = 1024) -> None:
        from .backends import open_device

        self._device = open_device(backend, device)
        self._coord: Optional[AsyncCoordinator] = None
        self._buffers: List[TripleBuffer] = []
        self._pipelines: List[Any] = []
        self._rings: Dict[Tuple[str, int], TripleBuffer] = {}
        self._steps: Dict[int, StepTelemetry] = {}
        self._closed = False
        if enable_streams:
            self._coord = AsyncCoordinator(self._device, max_in_flight=max_in_flight,
                                           timing=True)

    @property
    def device(self) -> Any:
        return self._device

    @property
    def backend(self) -> str:
        return self._device.kind

    def _check(self) -> None:
        if self._closed:
            raise InvalidOperationError("this ManagedGpuContext is closed")

    def async_coordinator(self) -> Optional[AsyncCoordinator]:
        """The context's coordinator, or None when created with ``enable_streams=False``."""
        self._check()
        return self._coord

    def async_coordinator_mut(self) -> Optional[AsyncCoordinator]:
        """Same as :meth:`async_coordinator` (the name ported code uses)."""
        return self.async_coordinator()

    def _require_coord(self) -> AsyncCoordinator:
        coord = self.async_coordinator()
        if coord is None:
            raise InvalidOperationError(
                "this context was created with enable_streams=False; create it with "
                "enable_streams=True to queue asynchronous work")
        return coord

    def create_triple_buffer(self, size: int, dtype: Any = np.float32,
                             depth: int = 3) -> TripleBuffer:
        self._check()
        buf = TripleBuffer(self._device, size, dtype=dtype, depth=depth)
        self._buffers.append(buf)
        return buf

    def create_pipeline_manager(self, *, depth: int = 3) -> Any:
        """A :class:`PipelineStageManager` with its own coordinator on this device."""
        self._check()
        from ._pipeline import PipelineStageManager

        pipe = PipelineStageManager(AsyncCoordinator(self._device, timing=True), depth=depth,
                                    _owns_coordinator=True)
        self._pipelines.append(pipe)
        return pipe

    def triple_buffered_step(self, config: StepConfig) -> StepTelemetry:
        """Upload ``config.input``, run ``config.kernel`` on it, download into ``config.output``.

        Never blocks on the GPU: the ring of the context orders the three ops on
        the device. The returned telemetry fills its GPU times once complete.
        """
        coord = self._require_coord()
        if not isinstance(config, StepConfig):
            raise TypeError(f"expected a StepConfig, got {type(config).__name__}")
        x = host_array(config.input, np.asarray(config.input).dtype, "StepConfig.input")
        host_array(config.output, x.dtype, "StepConfig.output")
        if config.output.size < x.size:
            from ._errors import TransferError

            raise TransferError(f"StepConfig.output holds {config.output.size} elements, the "
                                f"input has {x.size}")
        kernel = config.kernel
        coord._kernel(kernel)  # unknown names fail here, before anything is queued
        ring = self._ring(x.dtype, x.size)
        tel = StepTelemetry(coord)
        tel.upload_op = coord.queue_upload(x, ring, on_done=tel._upload_done)
        tel.compute_op = coord.queue_compute(kernel, [tel.upload_op],
                                             extra=config.extra or None, config=config.config,
                                             on_done=tel._compute_done)
        tel.download_op = coord.queue_download(ring, config.output, on_done=tel._download_done)
        ring.advance()
        return tel

    def _ring(self, dtype: np.dtype, n: int) -> TripleBuffer:
        key = (dtype.str, 0)
        ring = self._rings.get(key)
        if ring is None or ring.size() < n:
            size = max(n, 2 * ring.size() if ring is not None else n)
            ring = TripleBuffer(self._device, size, dtype=dtype)
            self._rings[key] = ring
        return ring

    def close(self) -> None:
        """Wait for in-flight work; free every stream, event and buffer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            for pipe in self._pipelines:
                pipe.close()
            if self._coord is not None:
                self._coord.close()
        finally:
            for buf in self._buffers + list(self._rings.values()):
                buf.close()
            self._buffers.clear()
            self._rings.clear()
            self._device.close()

    def __enter__(self) -> "ManagedGpuContext":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self._device.name
        return f"ManagedGpuContext({state})"
