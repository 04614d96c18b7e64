"""ManagedGpuContext: one device, its coordinator, buffers and pipelines."""

from __future__ import annotations

import time
import weakref
from threading import get_ident
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ._args import MAX_DEPTH, MAX_SAMPLE, TIMING_SAMPLE, check_timeout, int_arg
from ._buffers import TripleBuffer, ring_for
from ._config import LaunchConfig, StepConfig
from ._coordinator import AsyncCoordinator
from ._devarray import DeviceArray, copier, empty_device, to_device
from ._errors import InvalidOperationError
from ._failures import refuse_in_callback, refuse_other_thread
from ._ops import OpType
from ._optable import EngineCallback
from ._validate import download_destination, host_array

__all__ = ["ManagedGpuContext", "StepTelemetry"]

_UPLOAD, _COMPUTE, _DOWNLOAD = OpType.UPLOAD, OpType.COMPUTE, OpType.DOWNLOAD
_ndarray = np.ndarray


class StepTelemetry(EngineCallback):
    """What :meth:`ManagedGpuContext.triple_buffered_step` queued.

    ``upload_ms``, ``compute_ms`` and ``download_ms`` are the GPU times of the
    three ops, None until they complete (see :meth:`done` and :meth:`wait`), and
    always None unless the context was made with ``timing=True``.
    """

    # (internally, the telemetry is the engine's completion callback of its three ops:
    # called as ``tel(op, ms)``, with no report built per op)

    __slots__ = ("upload_op", "compute_op", "download_op", "upload_ms", "compute_ms",
                 "download_ms", "error", "_coord", "_on_complete")

    def __init__(self, coord: AsyncCoordinator,
                 on_complete: Optional[Callable[["StepTelemetry"], None]] = None) -> None:
        self._coord = coord
        self._on_complete = on_complete
        self.upload_op = self.compute_op = self.download_op = -1
        self.upload_ms: Optional[float] = None
        self.compute_ms: Optional[float] = None
        self.download_ms: Optional[float] = None
        self.error: Optional[BaseException] = None

    def __call__(self, op: Any, ms: Optional[float]) -> None:
        """The engine's callback of the step's ops, ``op`` the engine's (not a user's
        call): records the op's time and the step's first error; after the download,
        calls ``on_complete`` (once)."""
        err = op.error
        if err is not None or self.error is not None:
            self.error = self.error or err
        t = op.type
        if t is _UPLOAD:
            self.upload_ms = ms
        elif t is _COMPUTE:
            self.compute_ms = ms
        elif t is _DOWNLOAD:
            self.download_ms = ms
            cb, self._on_complete = self._on_complete, None
            if cb is not None:
                cb(self)

    def done(self) -> bool:
        """True once the download completed (never blocks)."""
        return self._coord.is_complete(self.download_op)

    def wait(self, timeout: Optional[float] = None) -> "StepTelemetry":
        """Block until the step's output is in place; raise the step's error if any.
        ``timeout`` bounds the whole wait, not each of the three ops."""
        limit = check_timeout(timeout)
        deadline = None if limit is None else time.perf_counter() + limit
        for op in (self.upload_op, self.compute_op, self.download_op):
            self._coord.wait(op, None if deadline is None
                             else max(0.0, deadline - time.perf_counter()))
        return self

    @property
    def total_ms(self) -> Optional[float]:
        parts = (self.upload_ms, self.compute_ms, self.download_ms)
        return None if any(p is None for p in parts) else sum(parts)  # type: ignore[misc, arg-type]

    def __repr__(self) -> str:
        return (f"StepTelemetry(ops=({self.upload_op}, {self.compute_op}, {self.download_op}), "
                f"upload_ms={self.upload_ms}, compute_ms={self.compute_ms}, "
                f"download_ms={self.download_ms})")


class ManagedGpuContext:
    """A device with its coordinator, buffers and pipelines, freed together.

    Leaving the ``with`` block (or :meth:`close`) waits for queued work, frees
    everything, and raises failures no call has reported yet (never masking an
    exception already propagating).

    ``timing`` (default False, as for :class:`AsyncCoordinator`): with ``timing=True``
    the context's coordinator times every op, so each :class:`StepTelemetry` gets its
    GPU milliseconds. Timing events cost the host 2 to 3.5 us per op (measured on an
    H100), which shows in loops of small batches; without them the telemetry's times
    stay None. Pipelines time their stages either way (their statistics need it).

    >>> with ManagedGpuContext(device=0, backend="cpu") as ctx:   # doctest: +SKIP
    ...     buf = ctx.create_triple_buffer(2048, dtype=np.float32)
    """

    def __init__(self, device: int = 0, enable_streams: bool = True, backend: str = "auto", *,
                 max_in_flight: int = 1024, timing: bool = False) -> None:
        if not isinstance(timing, (bool, np.bool_)):
            raise TypeError(f"timing must be True or False, got {type(timing).__name__}")
        timing = bool(timing)
        from .backends import open_device

        self._device = open_device(backend, device)
        self._coord: Optional[AsyncCoordinator] = None
        # weakly: rings and pipelines made per request are freed when dropped
        self._buffers: "weakref.WeakSet[TripleBuffer]" = weakref.WeakSet()
        self._pipelines: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._rings: Dict[str, TripleBuffer] = {}
        # the last ring _ring gave: (dtype asked for, its capacity, the ring); the dtype is
        # held, so its identity names it (and its ``str``, the ring's key)
        self._last_ring: Optional[Tuple[np.dtype, int, TripleBuffer]] = None
        self._arrays: "weakref.WeakSet[DeviceArray]" = weakref.WeakSet()
        self._copies: Any = None  # the device's stream of blocking copies, once made
        # the kernel name the last step found registered on our coordinator (its names are
        # only ever added, until it closes, which its queue calls then refuse)
        self._step_kernel: Optional[str] = None
        self._owner = get_ident()
        self._closed = False
        try:
            if enable_streams:
                self._coord = AsyncCoordinator(self._device, max_in_flight=max_in_flight,
                                               timing=timing)
        except BaseException:
            self._device.close()
            raise

    @property
    def device(self) -> Any:
        return self._device

    @property
    def backend(self) -> str:
        return self._device.kind

    @property
    def closed(self) -> bool:
        return self._closed

    def check(self) -> None:
        """Raise :class:`InvalidOperationError` if this context is closed."""
        if self._closed:
            raise InvalidOperationError("this ManagedGpuContext is closed")

    def async_coordinator(self) -> Optional[AsyncCoordinator]:
        """The context's coordinator, or None when created with ``enable_streams=False``."""
        self.check()
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
        self.check()
        buf = TripleBuffer(self._device, size, dtype=dtype, depth=depth)
        self._buffers.add(buf)
        return buf

    def to_device(self, array: Any) -> DeviceArray:
        """A :class:`DeviceArray` holding a copy of numpy ``array`` (uploaded now, once):
        a constant every batch's kernel can read through ``extra=`` / ``args=``."""
        self.check()
        out = to_device(self._device, array)
        self._arrays.add(out)
        self._copies = self._copies or copier(self._device)  # kept while we live
        return out

    def empty_device(self, shape: Any, dtype: Any = np.float32) -> DeviceArray:
        """An uninitialised :class:`DeviceArray` of ``shape`` and ``dtype``."""
        self.check()
        out = empty_device(self._device, shape, dtype)
        self._arrays.add(out)
        self._copies = self._copies or copier(self._device)
        return out

    def create_pipeline_manager(self, *, depth: int = 3,
                                timing_sample: int = TIMING_SAMPLE) -> Any:
        """A :class:`PipelineStageManager` with its own coordinator on this device (its
        statistics timing one iteration in ``timing_sample``; 1: every op)."""
        self.check()
        from ._pipeline import PipelineStageManager

        int_arg(depth, "depth", 1, MAX_DEPTH)  # (refused before a coordinator is made)
        int_arg(timing_sample, "timing_sample", 1, MAX_SAMPLE)
        pipe = PipelineStageManager(AsyncCoordinator(self._device, timing=True), depth=depth,
                                    timing_sample=timing_sample, _owns_coordinator=True)
        self._pipelines.add(pipe)
        return pipe

    def triple_buffered_step(self, config: StepConfig) -> StepTelemetry:
        """Upload ``config.input``, run ``config.kernel`` on it, download into ``config.output``.

        Never blocks on the GPU: the ring of the context orders the three ops on
        the device. The returned telemetry fills its GPU times once complete.
        Everything is checked before anything is queued: a rejected step
        changes nothing.
        """
        # The common step (an open context, a StepConfig naming a registered kernel, with
        # plain numpy arrays that pass) is checked here, in one pass; anything else takes
        # _check_step, the checks one by one, in order, with their messages. Every check
        # runs before the upload (a refusal by a later queue call would leave the earlier
        # ops queued), but one: with the ring cached, the coordinator's own (its thread,
        # closed, called from a kernel) is left to the upload, which refuses first.
        ring: Optional[TripleBuffer] = None
        coord = self._coord
        if coord is not None and type(config) is StepConfig and not self._closed:
            x, out, kernel = config.input, config.output, config.kernel
            extra, launch, on_complete = config.extra, config.config, config.on_complete
            if type(x) is _ndarray and type(out) is _ndarray and type(kernel) is str \
                    and (type(extra) is tuple or type(extra) is list) \
                    and (launch is None or type(launch) is LaunchConfig) \
                    and (on_complete is None or callable(on_complete)):
                dtype, n = x.dtype, x.size
                flags = out.flags
                if n != 0 and x.flags.c_contiguous and flags.c_contiguous and flags.writeable \
                        and (out.dtype is dtype or out.dtype == dtype) and out.size >= n \
                        and (kernel == self._step_kernel or coord.has_kernel(kernel)):
                    self._step_kernel = kernel
                    last = self._last_ring
                    if last is not None and last[0] is dtype and last[1] >= n:
                        ring = last[2]
                    else:  # resolve_kernel's check, before a ring is made or grown
                        coord.check()
                        ring = self._ring(dtype, n)
                    c = coord
        if ring is None:
            c, x, ring = self._check_step(config)
            out, kernel = config.output, config.kernel
            extra, launch, on_complete = config.extra, config.config, config.on_complete
        if type(extra) is not tuple:  # a list: the compiled queue call takes a tuple
            extra = tuple(extra)
        tel = StepTelemetry(c, on_complete)  # the ops' callback, called (op, ms)
        tel.upload_op = up = c.queue_upload(x, ring, on_done=tel)
        try:
            tel.compute_op = c.queue_compute(kernel, [up], extra=extra or None,
                                             config=launch, on_done=tel)
        except BaseException:
            ring.get_process_buffer()  # the upload's slot goes back: nothing else uses it
            ring.retire()
            raise
        try:
            tel.download_op = c.queue_download(ring, out, on_done=tel)
        except BaseException:
            ring.retire()
            raise
        ring.advance()
        return tel

    def _check_step(self, config: StepConfig) -> Tuple[AsyncCoordinator, np.ndarray,
                                                        TripleBuffer]:
        """Every check of a step, one by one: (coordinator, input, ring) once all pass."""
        coord = self._require_coord()
        if not isinstance(config, StepConfig):
            raise TypeError(f"expected a StepConfig, got {type(config).__name__}")
        config.validate()
        x = host_array(config.input, getattr(config.input, "dtype", np.dtype(np.float32)),
                       "StepConfig.input")
        download_destination(config.output, x.dtype, x.size, "StepConfig.output")
        coord.resolve_kernel(config.kernel)  # unknown names fail before anything is queued
        return coord, x, self._ring(x.dtype, x.size)

    def _ring(self, dtype: np.dtype, n: int) -> TripleBuffer:
        ring = ring_for(self._rings, dtype.str, self._device, dtype, n)
        self._last_ring = (dtype, ring.capacity, ring)
        return ring

    def close(self) -> None:
        """Wait for in-flight work; free every stream, event and buffer; then raise
        failures no call has reported yet. Idempotent."""
        from ._optable import raise_failures

        coord = self._coord
        if not self._closed and not (coord is not None and coord.engine.in_callback) \
                and not self._device.on_own_thread():  # (those are refused as such)
            refuse_other_thread(self._owner, "ManagedGpuContext", closing=True)
        raise_failures(self.close_collecting(), "closing the context")

    def close_collecting(self) -> List[BaseException]:
        if self._closed:
            return []
        if self._device.on_own_thread():
            raise InvalidOperationError("a kernel may not close its context (it runs on a "
                                        "stream the close would wait for)")
        coords = [p.coordinator() for p in list(self._pipelines)] + [self._coord]
        for c in coords:  # from inside their callback or kernel: refused, nothing changed
            if c is not None and not c.closed and c.engine.in_callback:
                refuse_in_callback(c.engine.in_callback)
        self._closed = True
        errors: List[BaseException] = []
        try:
            for pipe in list(self._pipelines):
                errors.extend(pipe.close_collecting())
            if self._coord is not None:
                errors.extend(self._coord.close_collecting())
        finally:
            for buf in list(self._buffers) + list(self._rings.values()):
                buf.close()
            for arr in list(self._arrays):
                arr.close()
            self._buffers.clear()
            self._rings.clear()
            self._last_ring = None
            self._device.close()
            self._copies = None
        return errors

    def __enter__(self) -> "ManagedGpuContext":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        from ._optable import raise_failures

        errors = self.close_collecting()
        if exc_type is None:
            raise_failures(errors, "leaving the with block")

    def __repr__(self) -> str:
        state = "closed" if self._closed else self._device.name
        return f"ManagedGpuContext({state})"
