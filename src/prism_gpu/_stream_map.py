"""stream_map: an iterable of host arrays in, an iterator of results out, in order."""

from __future__ import annotations

import collections
from typing import (Any, Callable, Deque, Dict, Iterable, Iterator, NamedTuple, Optional, Tuple,
                    Union)

import numpy as np

from . import _trace
from ._args import int_arg
from ._buffers import TripleBuffer
from ._coordinator import AsyncCoordinator
from ._copypool import Ticket
from ._errors import InvalidOperationError
from ._feed import Pulled, read_ahead
from ._kernels import Kernel
from ._hostmem import pinned_empty
from ._sink import Sink, check_out
from ._staging import Stager, cache_of

__all__ = ["stream_map", "pinned_empty"]

OutputSpec = Union[Tuple[Any, Any], Callable[[np.ndarray], Tuple[Any, Any]], None]


_READ_AHEAD_BYTES = 256 << 20  # big batches are pulled less far ahead than ``prefetch``


class _Queued:
    """A batch on its way: its three ops, where its download lands, and the copy of
    that into ``out[i]`` once started."""

    __slots__ = ("up", "comp", "down", "result", "final", "raw", "ticket")

    def __init__(self, up: int, comp: int, down: int, result: np.ndarray,
                 final: Optional[np.ndarray], raw: Optional[np.ndarray]) -> None:
        self.up, self.comp, self.down = up, comp, down
        self.result, self.final, self.raw = result, final, raw
        self.ticket: Optional[Ticket] = None


class _Prepared(NamedTuple):
    output: Optional[Tuple[Tuple[int, ...], np.dtype]]
    final: Optional[np.ndarray]


def _resolve_output(output: OutputSpec, batch: np.ndarray
                    ) -> Optional[Tuple[Tuple[int, ...], np.dtype]]:
    if output is None:
        return None
    spec = output(batch) if callable(output) else output
    try:
        shape, dtype = spec
        shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(
            int(d) for d in shape)
        dt = np.dtype(dtype)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"output must be (shape, dtype) or a callable giving one, got "
                        f"{spec!r}") from exc
    if any(d < 0 for d in shape) or int(np.prod(shape, dtype=np.int64)) == 0:
        raise ValueError(f"output shape {shape} holds no elements")
    if dt.hasobject:
        raise TypeError("output dtype must not be object")
    return shape, dt


def stream_map(kernel: Any, batches: Iterable[np.ndarray], depth: int = 3, ctx: Any = None,
               output: OutputSpec = None, progress: bool = False,
               extra: Tuple[Any, ...] = (), *, prefetch: int = 8,
               out: Any = None) -> Iterator[np.ndarray]:
    """Push every batch through ``kernel`` on the device; yield results in input order.

    Parameters
    ----------
    kernel:
        A :class:`Kernel`, a callable, or the name of a built-in kernel. It gets
        the batch's device array (flat, ``batch.size`` elements), then the output
        array if ``output`` is given, then ``extra``. Without ``output`` it works
        in place and the result has the batch's shape and dtype.
    batches:
        Any iterable of numpy arrays; lengths may differ. Pageable arrays are
        staged through pinned memory by worker threads; arrays from
        :func:`pinned_empty` go straight through.
    depth:
        Device slots in the ring: at most ``depth`` batches are on the device at
        once; staged batches queue behind them (up to ``prefetch // 2 + 1`` more,
        each starting when its slot is free).
    ctx:
        A :class:`ManagedGpuContext`; default: a private one on ``backend="auto"``.
    output:
        ``(shape, dtype)`` of a second device array the kernel writes, or a callable
        of the batch returning one.
    progress:
        Show a progress bar with batches/s (rich).
    prefetch:
        Batches pulled from the iterable beyond the ``depth`` on the device, so
        their staging copies overlap the device and each other (default 8, fewer
        for big batches: past ``depth + 1`` batches, pulling stops while the
        batches held reach 256 MiB; each holds a pinned staging buffer and a
        pinned result of its size). The read-ahead contract: while the loop body
        holds result ``k``, at most batches up to ``k + depth + prefetch`` have
        been pulled, so a producer reusing a ring of ``depth + prefetch + 1``
        pinned input arrays never overwrites a batch still in use.
    out:
        Where results go: result ``i`` is written into ``out[i]`` (a writable numpy
        array of the result's dtype and number of elements: a row of a
        preallocated array, an entry of a list) off the calling thread, and the
        iterator yields ``out[i]``. Page-locked ``out[i]`` (:func:`pinned_empty`,
        :func:`register`) gets the download directly; pageable ``out[i]`` through
        pinned memory, copied by several threads. Without ``out``, results are
        pinned arrays of a pool, reused once you drop every reference to them.

    A failing batch raises when its result is due, after every earlier result was
    yielded, with ``batch_index``. Everything is released when the loop ends,
    breaks, raises or the iterator is garbage-collected.

    >>> for out in stream_map(lambda x: np.sqrt(x, out=x), batches):   # doctest: +SKIP
    ...     use(out)
    """
    depth, prefetch = int_arg(depth, "depth", 1), int_arg(prefetch, "prefetch", 0)
    if not isinstance(kernel, (Kernel, str)) and not callable(kernel):
        raise TypeError(f"kernel must be a Kernel, a callable or a kernel name, got "
                        f"{type(kernel).__name__}")
    if not isinstance(extra, (tuple, list)):
        raise TypeError(f"extra must be a tuple, got {type(extra).__name__}")
    if output is not None and not callable(output) and not isinstance(output, (tuple, list)):
        raise TypeError(f"output must be (shape, dtype) or a callable giving one, got "
                        f"{output!r}")
    if ctx is not None and not hasattr(ctx, "device"):
        raise TypeError(f"ctx must be a ManagedGpuContext, got {type(ctx).__name__}")
    check_out(out)
    return _StreamMap(kernel, batches, depth, prefetch, ctx, output, progress,
                      tuple(extra), out).run()


class _StreamMap:
    """One stream_map call: its coordinator, rings and staging."""

    def __init__(self, kernel: Any, batches: Iterable[np.ndarray], depth: int, prefetch: int,
                 ctx: Any, output: OutputSpec, progress: bool, extra: Tuple[Any, ...],
                 out: Any) -> None:
        self.kernel = kernel
        self.batches = batches
        self.depth = depth
        self.prefetch = prefetch
        self.ctx = ctx
        self.output = output
        self.progress = progress
        self.extra = extra
        self.out = out
        self.rings: Dict[Tuple[str, str], TripleBuffer] = {}

    def run(self) -> Iterator[np.ndarray]:
        own_ctx = self.ctx is None
        if own_ctx:
            from ._context import ManagedGpuContext

            ctx = ManagedGpuContext(enable_streams=False)
        else:
            ctx = self.ctx
            if ctx.closed:
                raise InvalidOperationError("stream_map: the context passed as ctx= is closed")
        device = ctx.device
        coord = AsyncCoordinator(device, max_in_flight=8 * self.depth + 8)
        bar = _Progress(self.batches) if self.progress else None
        cache = cache_of(device)
        stager = Stager(device, cache)
        sink = Sink(self.out, device, stager, cache.results)
        output = self.output

        def prepare(batch: np.ndarray, pos: int) -> _Prepared:
            spec = _resolve_output(output, batch)
            shape, dtype = spec if spec is not None else (batch.shape, batch.dtype)
            return _Prepared(spec, sink.claim(pos, shape, dtype))

        queued: Deque[_Queued] = collections.deque()

        def submit(entry: Pulled) -> _Queued:
            q = self._submit(coord, sink, entry, stager)
            queued.append(q)
            return q

        def finish(q: _Queued) -> np.ndarray:
            queued.popleft()  # the oldest: results come in order
            coord.wait(q.up)
            stager.recycle(q.raw)
            coord.wait(q.comp)
            coord.wait(q.down)
            if q.ticket is None:
                q.ticket = sink.start(q.result, q.final)
            _start_landed(coord, sink, queued)
            result = sink.deliver(q.result, q.final, q.ticket)
            if bar is not None:
                bar.advance()
            return result

        try:
            coord.resolve_kernel(self.kernel)  # unknown names fail before any batch is pulled
            # batches staged ahead queue behind the ring's slots on the device (the GPU
            # orders each slot's reuse), so host copies of several batches overlap
            yield from read_ahead(self.batches, self.depth, self.prefetch, stager, prepare,
                                  submit, finish, "stream_map: batch",
                                  window=self.depth + 1 + self.prefetch // 2,
                                  max_bytes=_READ_AHEAD_BYTES)
        finally:
            stager.close()
            coord.close_collecting()  # failures after the first raised one are moot
            for ring in self.rings.values():
                ring.close()
            if bar is not None:
                bar.close()
            if own_ctx:
                ctx.close_collecting()

    def _ring(self, device: Any, key: str, dtype: np.dtype, n: int) -> TripleBuffer:
        ring = self.rings.get((key, dtype.str))
        if ring is None or ring.capacity < n:
            size = n if ring is None else max(n, 2 * ring.capacity)
            new = TripleBuffer(device, size, dtype=dtype, depth=self.depth)
            if ring is not None:
                ring.close()  # ops in flight keep what they use alive
            ring = self.rings[(key, dtype.str)] = new
        return ring

    def _submit(self, coord: AsyncCoordinator, sink: Sink, entry: Pulled,
                stager: Stager) -> _Queued:
        entry.wait_staged()
        batch = entry.batch
        device = coord.device
        src = self._ring(device, "in", batch.dtype, batch.size)
        dst = None
        if entry.info.output is not None:
            shape, dtype = entry.info.output
            dst = self._ring(device, "out", dtype, int(np.prod(shape, dtype=np.int64)))
        tracing = _trace.ACTIVE is not None
        if tracing:
            _trace.set_index(entry.pos)
        try:
            return self._queue(coord, sink, entry, stager, src, dst)
        finally:
            if tracing:
                _trace.set_index(None)

    def _queue(self, coord: AsyncCoordinator, sink: Sink, entry: Pulled,
               stager: Stager, src: TripleBuffer, dst: Optional[TripleBuffer]) -> _Queued:
        batch = entry.batch
        final = entry.info.final
        extra = self.extra or None
        try:
            up = coord.queue_upload(entry.staged.reshape(-1), src)
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
            n = int(np.prod(shape, dtype=np.int64))
            comp = _rollback_on_error(src, lambda: coord.queue_compute(
                self.kernel, [up], extra=extra, outputs=[(dst, n)]))
            src.retire()  # the input slot is done once the compute is (the GPU orders it)
            result = sink.destination(final, shape, dtype)
            down = coord.queue_download(dst, result)
            dst.advance()
        return _Queued(int(up), int(comp), int(down), result, final, entry.raw)


def _start_landed(coord: AsyncCoordinator, sink: Sink, queued: Deque[_Queued]) -> None:
    """Start the copies into ``out`` of later batches whose downloads have landed, so
    host copies of several batches overlap (downloads complete in queue order)."""
    for q in queued:
        if q.ticket is not None or q.final is None or q.result is q.final:
            continue
        if not coord.is_complete(q.down) or coord.table.error(q.down, False) is not None:
            return
        q.ticket = sink.start(q.result, q.final)


def _rollback_on_error(src: TripleBuffer, queue: Callable[[], Any]) -> Any:
    """Queue a compute on the upload just queued into ``src``; if the compute is
    rejected, the upload's slot goes back to FREE so the ring stays consistent."""
    try:
        return queue()
    except BaseException:
        src.get_process_buffer()
        src.retire()
        raise


class _Progress:
    def __init__(self, batches: Any) -> None:
        import time

        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)

        total = len(batches) if hasattr(batches, "__len__") else None
        self._p = Progress(TextColumn("stream_map"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[rate]} batches/s"), TimeElapsedColumn())
        self._p.start()
        self._task = self._p.add_task("batches", total=total, rate="-")
        self._n = 0
        self._clock = time.perf_counter
        self._t0 = self._clock()

    def advance(self) -> None:
        self._n += 1
        dt = self._clock() - self._t0
        rate = f"{self._n / dt:.1f}" if dt > 0 else "-"
        self._p.update(self._task, advance=1, rate=rate)

    def close(self) -> None:
        self._p.stop()
