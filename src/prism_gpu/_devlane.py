"""One device of a stream_map: its coordinator, rings and the batches queued on it."""

from __future__ import annotations

import collections
import math
import time
from typing import Any, Deque, Dict, Optional, Tuple

import numpy as np

from . import _trace
from ._buffers import TripleBuffer, ring_for
from ._coordinator import AsyncCoordinator
from ._copypool import Ticket
from ._errors import InvalidOperationError, PrismGpuError
from ._feed import Pulled
from ._kernels import as_kernel
from ._sink import Sink
from ._staging import Stager

__all__ = ["DeviceLane"]


class _Queued:
    """A batch on its way: its three ops, where its download lands, and the copy of
    that into ``out[i]`` once started."""

    __slots__ = ("up", "comp", "down", "result", "final", "raw", "ticket", "t0", "landed")

    def __init__(self, up: int, comp: int, down: int, result: np.ndarray,
                 final: Optional[np.ndarray], raw: Optional[np.ndarray], t0: float) -> None:
        self.up, self.comp, self.down = up, comp, down
        self.result, self.final, self.raw = result, final, raw
        self.ticket: Optional[Ticket] = None
        self.t0 = t0
        self.landed = False


# the stream_map's kernel on the lane's own coordinator: a name is one dict lookup per
# batch, where a Kernel is a weak-keyed one and a plain callable is wrapped per batch
_KERNEL = "\0stream_map"


class DeviceLane:
    """Batches of one stream_map on one device, queued and finished in input order.

    Opens a private context on ``device`` (an ordinal, with ``backend``) unless
    ``ctx`` is given; the stream_map's kernel, ``extra`` and output spec apply.
    ``paced``: the lane measures how long its batches take (:meth:`expected_wait`),
    for a stream_map spreading batches over several lanes. :meth:`attach` gives it
    the stream_map's sink and stager before any batch.
    """

    def __init__(self, ctx: Any, device: Optional[int], backend: str, depth: int,
                 kernel: Any, extra: Tuple[Any, ...], paced: bool = False) -> None:
        self.own_ctx = ctx is None
        if ctx is None:
            from ._context import ManagedGpuContext

            ctx = ManagedGpuContext(device=device or 0, backend=backend,
                                    enable_streams=False)
        elif ctx.closed:
            raise InvalidOperationError("stream_map: the context passed as ctx= is closed")
        self.ctx = ctx
        self.depth = depth
        self.paced = paced
        self.rings: Dict[Tuple[str, str], TripleBuffer] = {}
        self.queued: Deque[_Queued] = collections.deque()
        self.cost = 0.0           # seconds a batch takes here (running average of landings)
        self._last_landed = 0.0
        self._extra = extra or None
        self.in_ring: Optional[Tuple[np.dtype, int, TripleBuffer]] = None  # the last input ring
        self.sink: Any = None
        self.stager: Any = None
        self._results: Any = None
        self._results_on: Any = None
        try:
            self.coord = coord = AsyncCoordinator(ctx.device, max_in_flight=8 * depth + 8)
            if isinstance(kernel, str):
                coord.resolve_kernel(kernel)  # unknown names fail before any batch
            else:  # (a callable wrapped once, as it would be per batch: its own name)
                coord.register_kernel(_KERNEL, as_kernel(kernel))
                kernel = _KERNEL
        except BaseException:
            if self.own_ctx:
                ctx.close_collecting()
            raise
        self.kernel = kernel
        self._device = coord.device
        self._engine = coord.engine
        self._table = coord.table

    @property
    def device(self) -> Any:
        return self.ctx.device

    def attach(self, sink: Sink, stager: Stager) -> None:
        """Where this lane's results go, and the stager its batches' buffers go back to."""
        self.sink, self.stager = sink, stager
        # (what sink.destination does without out=, and the object the download writes)
        self._results = sink.results.empty_and_target
        self._results_on = sink.device

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
    def submit(self, entry: Pulled) -> _Queued:
        """Queue a batch as :func:`read_ahead` pulled it (staged, or as it is)."""
        entry.wait_staged()
        info = entry.info
        return self.queue(entry.staged, entry.pos, entry.raw, info.output, info.final)

    def queue(self, staged: np.ndarray, pos: int, raw: Optional[np.ndarray] = None,
              output: Any = None, final: Optional[np.ndarray] = None) -> _Queued:
        """Queue batch ``pos``'s ops: upload ``staged`` (the batch, or its copy in the
        staging buffer ``raw``), compute, download into ``final`` (``out[pos]``) or
        what stands in for it. With the defaults: a contiguous, page-locked batch,
        uploaded as it is, whose result (of its shape and dtype) comes from the pool."""
        dtype, size = staged.dtype, staged.size
        last = self.in_ring
        if last is not None and last[0] is dtype and last[1] >= size:
            src = last[2]
        else:
            src = self._ring("in", dtype, size)
            self.in_ring = (dtype, src.capacity, src)
        dst, n = None, 0
        if output is not None:
            n = math.prod(output[0])
            dst = self._ring("out", output[1], n)
        coord = self.coord
        tracing = _trace.ACTIVE is not None
        if tracing:
            _trace.set_index(pos)
        try:
            try:
                up = coord.queue_upload(staged, src)  # n-d batches are taken flat
            except BaseException:
                self.stager.recycle(raw)
                raise
            try:  # a rejected compute: the upload's slot goes back to FREE (a consistent ring)
                if output is None:
                    comp = coord.queue_compute(self.kernel, [up], extra=self._extra)
                else:
                    comp = coord.queue_compute(self.kernel, [up], extra=self._extra,
                                               outputs=[(dst, n)])
            except BaseException:
                src.get_process_buffer()
                src.retire()
                raise
            if output is None:
                if final is None:  # (the result, held by the batch, keeps its buffer)
                    result, target = self._results(self._results_on, staged.shape, dtype,
                                                   staged.nbytes)
                else:
                    result = target = self.sink.destination(final, staged.shape, dtype)
                down = coord.queue_download(src, target)
                src.advance()
            else:
                assert dst is not None
                src.retire()  # the input slot is done once the compute is (the GPU orders it)
                result = self.sink.destination(final, *output)
                down = coord.queue_download(dst, result)
                dst.advance()
        finally:
            if tracing:
                _trace.set_index(None)
        q = _Queued(int(up), int(comp), int(down), result, final, raw,
                    time.perf_counter() if self.paced else 0.0)
        self.queued.append(q)
        return q

    def as_is_calls(self) -> Tuple[Any, ...]:
        """What :func:`read_ahead` (given this lane) calls to queue a batch itself as
        :meth:`queue` would with its defaults (a contiguous, page-locked batch, uploaded
        as it is into the ring ``in_ring`` names, its result from the pool) and to finish it
        as :meth:`finish` does a ``(download, result, upload, compute)`` handle: the
        coordinator's check, queue calls and waits, the engine's wait, the op table, the
        kernel and ``extra``, and the pool's call and its first argument."""
        coord = self.coord
        return (coord.check, coord.queue_upload, coord.queue_compute, coord.queue_download,
                self._engine.wait, coord.wait, self._table, self.kernel, self._extra,
                self._results, self._results_on)

    def _await(self, down: int, up: int, comp: int, staged: bool, raw: Any) -> None:
        """coord.wait(down) for an id of ours, in steps: the same checks, the same wait
        (which retires the upload and compute before it too); a failure raised by
        coord.wait itself (no op here has an on_done callback). On a failure the first
        of the chain is the batch's error (its staging buffer ``raw`` recycled first,
        where ``staged``)."""
        coord = self.coord
        try:
            coord.check()
            self._engine.wait(down)
            table = self._table
            if table.failed_total and table.error(down, False) is not None:
                coord.wait(down)
        except PrismGpuError:
            coord.wait(up)
            if staged:
                self.stager.recycle(raw)
            coord.wait(comp)
            raise

    def finish(self, q: Any) -> np.ndarray:
        """``q``'s result (the oldest batch queued here), once it is complete."""
        if type(q) is tuple:  # queued by read_ahead itself, which finishes it so too
            down, result, up, comp = q
            self._await(down, up, comp, False, None)
            return result  # type: ignore[no-any-return]
        self.queued.popleft()
        self._await(q.down, q.up, q.comp, True, q.raw)
        if q.raw is not None:
            self.stager.recycle(q.raw)
        if self.paced and not q.landed:
            self._landed(q)
        final = q.final
        if final is None:  # no out=: the download is the result (and nothing to start)
            return q.result
        sink = self.sink
        if q.ticket is None:
            q.ticket = sink.start(q.result, final)
        self._start_landed(sink)
        return sink.deliver(q.result, final, q.ticket)  # type: ignore[no-any-return]

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

    def _ring(self, key: str, dtype: np.dtype, n: int) -> TripleBuffer:
        return ring_for(self.rings, (key, dtype.str), self._device, dtype, n, self.depth)
