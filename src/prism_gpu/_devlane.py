"""One device of a stream_map: its coordinator, rings and the batches queued on it."""

from __future__ import annotations

import collections
import math
import time
from typing import Any, Callable, Deque, Dict, Optional, Tuple

import numpy as np

from . import _trace
from ._buffers import TripleBuffer, ring_for
from ._coordinator import AsyncCoordinator
from ._copypool import Ticket
from ._errors import InvalidOperationError, PrismGpuError
from ._feed import Pulled
from ._sink import Sink
from ._staging import Stager

__all__ = ["DeviceLane"]


class _Queued:
    """A batch on its way: its three ops, where its download lands, and the copy of
    that into ``out[i]`` once started."""

    __slots__ = ("up", "comp", "down", "result", "final", "raw", "ticket", "t0", "landed")

    def __init__(self, up: int, comp: int, down: int, result: np.ndarray,
                 final: Optional[np.ndarray], raw: Optional[np.ndarray]) -> None:
        self.up, self.comp, self.down = up, comp, down
        self.result, self.final, self.raw = result, final, raw
        self.ticket: Optional[Ticket] = None
        self.t0 = time.perf_counter()
        self.landed = False


class DeviceLane:
    """Batches of one stream_map on one device, queued and finished in input order.

    Opens a private context on ``device`` (an ordinal, with ``backend``) unless
    ``ctx`` is given; the stream_map's kernel, ``extra`` and output spec apply.
    """

    def __init__(self, ctx: Any, device: Optional[int], backend: str, depth: int,
                 kernel: Any, extra: Tuple[Any, ...]) -> None:
        self.own_ctx = ctx is None
        if ctx is None:
            from ._context import ManagedGpuContext

            ctx = ManagedGpuContext(device=device or 0, backend=backend,
                                    enable_streams=False)
        elif ctx.closed:
            raise InvalidOperationError("stream_map: the context passed as ctx= is closed")
        self.ctx = ctx
        self.depth = depth
        self.kernel = kernel
        self.extra = extra
        self.rings: Dict[Tuple[str, str], TripleBuffer] = {}
        self.queued: Deque[_Queued] = collections.deque()
        self.cost = 0.0           # seconds a batch takes here (running average of landings)
        self._last_landed = 0.0
        try:
            self.coord = AsyncCoordinator(ctx.device, max_in_flight=8 * depth + 8)
            self.coord.resolve_kernel(kernel)  # unknown names fail before any batch
        except BaseException:
            if self.own_ctx:
                ctx.close_collecting()
            raise

    @property
    def device(self) -> Any:
        return self.ctx.device

    def expected_wait(self) -> float:
        """About how long a batch queued now would take to land here (never blocks):
        the batches whose downloads have not landed, plus it, at this device's pace."""
        busy = len(self.queued)
        for q in self.queued:
            if not q.landed:
                if not self.coord.is_complete(q.down):
                    break
                self._landed(q)
            busy -= 1
        return (busy + 1) * self.cost

    def _landed(self, q: _Queued) -> None:
        now = time.perf_counter()
        took = now - max(q.t0, self._last_landed)
        self.cost = took if self.cost == 0.0 else 0.7 * self.cost + 0.3 * took
        self._last_landed = now
        q.landed = True

    def close(self) -> None:
        try:
            self.coord.close_collecting()  # failures after the first raised one are moot
        finally:  # an interrupt while it waits still closes what this lane opened
            try:
                for ring in self.rings.values():
                    ring.close()
            finally:
                if self.own_ctx:
                    self.ctx.close_collecting()

    # queue ------------------------------------------------------------------------
    def submit(self, sink: Sink, entry: Pulled, stager: Stager) -> _Queued:
        entry.wait_staged()
        batch = entry.batch
        device = self.coord.device
        src = self._ring(device, "in", batch.dtype, batch.size)
        dst, n = None, 0
        if entry.info.output is not None:
            shape, dtype = entry.info.output
            n = math.prod(shape)
            dst = self._ring(device, "out", dtype, n)
        tracing = _trace.ACTIVE is not None
        if tracing:
            _trace.set_index(entry.pos)
        try:
            q = self._queue(sink, entry, stager, src, dst, n)
        finally:
            if tracing:
                _trace.set_index(None)
        self.queued.append(q)
        return q

    def finish(self, q: _Queued, sink: Sink, stager: Stager) -> np.ndarray:
        """``q``'s result (the oldest batch queued here), once it is complete."""
        coord = self.coord
        self.queued.popleft()
        try:
            coord.wait(q.down)  # retires the upload and compute before it too
        except PrismGpuError:
            coord.wait(q.up)    # the first failure of the chain is the batch's error
            stager.recycle(q.raw)
            coord.wait(q.comp)
            raise
        stager.recycle(q.raw)
        if not q.landed:
            self._landed(q)
        if q.ticket is None:
            q.ticket = sink.start(q.result, q.final)
        self._start_landed(sink)
        return sink.deliver(q.result, q.final, q.ticket)

    def _start_landed(self, sink: Sink) -> None:
        """Start the copies into ``out`` of later batches whose downloads have landed, so
        host copies of several batches overlap (downloads complete in queue order)."""
        coord = self.coord
        for q in self.queued:
            if q.ticket is not None or q.final is None or q.result is q.final:
                continue
            if not coord.is_complete(q.down) or coord.table.error(q.down, False) is not None:
                return
            q.ticket = sink.start(q.result, q.final)

    def _ring(self, device: Any, key: str, dtype: np.dtype, n: int) -> TripleBuffer:
        return ring_for(self.rings, (key, dtype.str), device, dtype, n, self.depth)

    def _queue(self, sink: Sink, entry: Pulled, stager: Stager, src: TripleBuffer,
               dst: Optional[TripleBuffer], n: int) -> _Queued:
        """Queue ``entry``'s ops; ``dst`` (``n`` elements written) when it has an output."""
        coord = self.coord
        batch = entry.batch
        final = entry.info.final
        extra = self.extra or None
        try:
            up = coord.queue_upload(entry.staged, src)  # n-d batches are taken flat
        except BaseException:
            stager.recycle(entry.raw)
            raise
        if entry.info.output is None:
            comp = _rollback_on_error(src, lambda: coord.queue_compute(
                self.kernel, [up], extra=extra))
            result = sink.destination(final, batch.shape, batch.dtype)
            down = coord.queue_download(src, result)
            src.advance()
        else:
            assert dst is not None
            shape, dtype = entry.info.output
            comp = _rollback_on_error(src, lambda: coord.queue_compute(
                self.kernel, [up], extra=extra, outputs=[(dst, n)]))
            src.retire()  # the input slot is done once the compute is (the GPU orders it)
            result = sink.destination(final, shape, dtype)
            down = coord.queue_download(dst, result)
            dst.advance()
        return _Queued(int(up), int(comp), int(down), result, final, entry.raw)


def _rollback_on_error(src: TripleBuffer, queue: Callable[[], Any]) -> Any:
    """Queue a compute on the upload just queued into ``src``; if the compute is
    rejected, the upload's slot goes back to FREE so the ring stays consistent."""
    try:
        return queue()
    except BaseException:
        src.get_process_buffer()
        src.retire()
        raise
