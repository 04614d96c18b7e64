"""stream_map: an iterable of host arrays in, an iterator of results out, in order."""

from __future__ import annotations

import collections
import os
import sys
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Deque, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np

from ._buffers import TripleBuffer
from ._coordinator import AsyncCoordinator
from ._errors import DependencyFailedError, KernelError, PrismGpuError, TransferError
from ._kernels import Kernel

__all__ = ["stream_map", "pinned_empty"]

OutputSpec = Union[Tuple[Any, Any], Callable[[np.ndarray], Tuple[Any, Any]], None]


def pinned_empty(shape: Any, dtype: Any = np.float32, *, ctx: Any = None) -> np.ndarray:
    """An uninitialised numpy array in page-locked memory of ``ctx``'s device.

    Producers that write batches straight into such arrays skip the staging
    copy of :func:`stream_map`. Without ``ctx``, the default device is used.
    """
    device = ctx.device if ctx is not None else _default_device()
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    raw = device.allocate_pinned(max(1, count) * dt.itemsize)
    return raw[: count * dt.itemsize].view(dt).reshape(shape)


_DEFAULT: List[Any] = []


def _default_device() -> Any:
    if not _DEFAULT:
        from .backends import open_device

        _DEFAULT.append(open_device("auto"))
    return _DEFAULT[0]


class _Stager:
    """Copies pageable batches into pinned memory on worker threads.

    The caller's iterable is read on the calling thread (a Python iterator is
    not moved to another thread); only the copies run elsewhere, in chunks on a
    few threads for big batches (numpy releases the GIL while copying), so they
    overlap the device work of earlier batches.
    """

    CHUNK_BYTES = 8 << 20

    def __init__(self, device: Any, cache: "_PinnedCache") -> None:
        self._device = device
        self._cache = cache
        self._workers = max(1, min(8, os.cpu_count() or 1))
        self._pool: Optional[ThreadPoolExecutor] = None

    def needs_staging(self, batch: np.ndarray) -> bool:
        return bool(batch.size) and (not batch.flags.c_contiguous
                                     or not self._device.is_pinned(batch))

    def start(self, batch: np.ndarray) -> Tuple[np.ndarray, np.ndarray, List[Future]]:
        """Begin copying ``batch`` into pinned memory: (staged view, raw buffer, futures)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="prism-gpu-copy")
        raw = self._cache.take(self._device, batch.nbytes)
        staged = raw[: batch.nbytes].view(batch.dtype).reshape(batch.shape)
        if not batch.flags.c_contiguous or batch.nbytes < 2 * self.CHUNK_BYTES:
            return staged, raw, [self._pool.submit(np.copyto, staged, batch)]
        d, s = staged.reshape(-1), batch.reshape(-1)
        step = -(-len(s) // self._workers)
        return staged, raw, [self._pool.submit(np.copyto, d[i:i + step], s[i:i + step])
                             for i in range(0, len(s), step)]

    def recycle(self, raw: Optional[np.ndarray]) -> None:
        if raw is not None:
            self._cache.give(raw)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _root(array: np.ndarray) -> np.ndarray:
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


class _ResultPool:
    """Pinned memory for results, so downloads go straight into what is yielded.

    A buffer is reused only once nothing but the pool refers to it: every view
    of a yielded result keeps its buffer's reference count up, so results the
    consumer keeps are never overwritten. The idle count of each buffer is taken
    right after it is made, in the same way it is checked later, so references
    held inside the array machinery (DLPack owners) are counted in.
    """

    KEEP = 16  # idle buffers kept per size class

    def __init__(self) -> None:
        self._pool: dict = {}
        self._lock = threading.Lock()
        self.allocations = 0

    def empty(self, device: Any, shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        size = max(4096, 1 << (max(1, nbytes) - 1).bit_length())
        with self._lock:
            entries = self._pool.setdefault(size, [])
            for entry in entries:
                if sys.getrefcount(entry[0]) == entry[1]:
                    return entry[0][:nbytes].view(dtype).reshape(shape)
            entry = [_root(device.allocate_pinned(size)), 0]
            entry[1] = sys.getrefcount(entry[0])
            self.allocations += 1
            if len(entries) < self.KEEP:
                entries.append(entry)
            return entry[0][:nbytes].view(dtype).reshape(shape)


class _PinnedCache:
    """Pinned staging buffers of one device, kept across stream_map calls (pinning
    memory is slow; a loop that calls stream_map per epoch should pay it once)."""

    KEEP = 16  # buffers kept per size class

    def __init__(self) -> None:
        # no reference to the device: this is the value of a weak-keyed table
        self._free: dict = {}
        self._lock = threading.Lock()
        self.results = _ResultPool()

    def take(self, device: Any, nbytes: int) -> np.ndarray:
        size = max(4096, 1 << (max(1, nbytes) - 1).bit_length())
        with self._lock:
            free = self._free.get(size)
            if free:
                return free.pop()
        return device.allocate_pinned(size)

    def give(self, raw: np.ndarray) -> None:
        with self._lock:
            free = self._free.setdefault(raw.nbytes, [])
            if len(free) < self.KEEP:
                free.append(raw)


_CACHES: "weakref.WeakKeyDictionary[Any, _PinnedCache]" = weakref.WeakKeyDictionary()


def _cache_of(device: Any) -> _PinnedCache:
    cache = _CACHES.get(device)
    if cache is None:
        cache = _CACHES[device] = _PinnedCache()
    return cache


def _resolve_output(output: OutputSpec, batch: np.ndarray) -> Optional[Tuple[tuple, np.dtype]]:
    if output is None:
        return None
    spec = output(batch) if callable(output) else output
    try:
        shape, dtype = spec
        shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(shape)
        return shape, np.dtype(dtype)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"output must be (shape, dtype) or a callable giving one, got "
                        f"{spec!r}") from exc


def stream_map(kernel: Any, batches: Iterable[np.ndarray], depth: int = 3, ctx: Any = None,
               output: OutputSpec = None, progress: bool = False,
               extra: Tuple[Any, ...] = ()) -> Iterator[np.ndarray]:
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
        :func:`pinned_empty` go straight through (do not change them until their
        result is yielded).
    depth:
        Device slots in the ring: ``depth`` batches are processed at once, and one
        more is queued behind them (it starts when the oldest slot is free).
    ctx:
        A :class:`ManagedGpuContext`; default: a private one on ``backend="auto"``.
    output:
        ``(shape, dtype)`` of a second device array the kernel writes, or a callable
        of the batch returning one.
    progress:
        Show a progress bar with batches/s (rich).

    A failing batch raises :class:`KernelError` naming its index when its result
    is due, after every earlier result was yielded. Everything is released when
    the loop ends, breaks, raises or the iterator is garbage-collected.

    >>> for out in stream_map(lambda x: np.sqrt(x, out=x), batches):   # doctest: +SKIP
    ...     use(out)
    """
    if int(depth) < 1:
        raise ValueError("depth must be >= 1")
    if not isinstance(kernel, (Kernel, str)) and not callable(kernel):
        raise TypeError(f"kernel must be a Kernel, a callable or a kernel name, got "
                        f"{type(kernel).__name__}")
    return _stream_map(kernel, batches, int(depth), ctx, output, progress, tuple(extra))


def _stream_map(kernel: Any, batches: Iterable[np.ndarray], depth: int, ctx: Any,
                output: OutputSpec, progress: bool, extra: Tuple[Any, ...]
                ) -> Iterator[np.ndarray]:
    own_ctx = ctx is None
    if own_ctx:
        from ._context import ManagedGpuContext

        ctx = ManagedGpuContext(enable_streams=False)
    device = ctx.device
    coord = AsyncCoordinator(device, max_in_flight=8 * depth + 8)
    bar = _Progress(batches) if progress else None
    rings: dict = {}
    cache = _cache_of(device)
    results = cache.results
    stager = _Stager(device, cache)
    # batches pulled and (if pageable) being copied, not yet queued on the device
    ahead: Deque[Tuple[int, np.ndarray, np.ndarray, Optional[np.ndarray], List[Future]]] = \
        collections.deque()
    pending: Deque[Tuple[int, Any, np.ndarray, Optional[np.ndarray], int, int]] = \
        collections.deque()
    deferred: Optional[BaseException] = None
    try:
        coord._kernel(kernel)  # unknown names fail before any batch is pulled
        it = iter(batches)
        index = 0
        exhausted = False
        while True:
            while not exhausted and len(ahead) < depth:
                try:
                    batch = next(it)
                except StopIteration:
                    exhausted = True
                    break
                except Exception as exc:  # noqa: BLE001 - raised after earlier results
                    deferred, exhausted = exc, True
                    break
                if not isinstance(batch, np.ndarray):
                    deferred = TransferError(
                        f"stream_map: batch {index + len(ahead)} is a "
                        f"{type(batch).__name__}; batches must be numpy arrays")
                    deferred.batch_index = index + len(ahead)  # type: ignore[attr-defined]
                    exhausted = True
                    break
                if stager.needs_staging(batch):
                    ahead.append((index + len(ahead), batch, *stager.start(batch)))
                else:
                    ahead.append((index + len(ahead), batch, batch, None, []))
            # One batch more than the ring is queued before the oldest result is waited
            # for: the device orders its upload after that slot's download, and never
            # idles while the host wakes up.
            if ahead and len(pending) <= depth:
                idx, batch, staged, raw, copies = ahead.popleft()
                for f in copies:
                    f.result()
                try:
                    entry = _submit(coord, rings, results, kernel, idx, batch, staged, raw,
                                    output, extra, depth)
                except PrismGpuError as exc:  # rejected batch: earlier results come first
                    stager.recycle(raw)
                    while pending:
                        yield _finish(coord, pending.popleft(), stager, bar)
                    raise _batch_error(exc, idx) from exc
                pending.append(entry)
                index = idx + 1
                continue
            if not pending:
                break
            yield _finish(coord, pending.popleft(), stager, bar)
        if deferred is not None:
            raise deferred
    finally:
        for _, _, _, raw, copies in ahead:
            for f in copies:
                f.cancel()
        stager.close()
        coord.close()
        for ring in rings.values():
            ring.close()
        if bar is not None:
            bar.close()
        if own_ctx:
            ctx.close()


def _ring(rings: dict, device: Any, key: str, dtype: np.dtype, n: int, depth: int
          ) -> TripleBuffer:
    ring = rings.get((key, dtype.str))
    if ring is None or ring.size() < n:
        size = n if ring is None else max(n, 2 * ring.size())
        ring = rings[(key, dtype.str)] = TripleBuffer(device, size, dtype=dtype, depth=depth)
    return ring


def _submit(coord: AsyncCoordinator, rings: dict, results: _ResultPool, kernel: Any,
            index: int, batch: np.ndarray,
            staged: np.ndarray, raw: Optional[np.ndarray], output: OutputSpec,
            extra: Tuple[Any, ...], depth: int) -> Tuple[int, Any, np.ndarray,
                                                         Optional[np.ndarray], int, int]:
    src = _ring(rings, coord.device, "in", batch.dtype, batch.size, depth)
    up = coord.queue_upload(staged.reshape(-1), src)
    out_spec = _resolve_output(output, batch)
    if out_spec is None:
        comp = coord.queue_compute(kernel, [up], extra=extra or None)
        result = results.empty(coord.device, batch.shape, batch.dtype)
        down = coord.queue_download(src, result)
        src.advance()
    else:
        shape, dtype = out_spec
        n = int(np.prod(shape, dtype=np.int64))
        dst = _ring(rings, coord.device, "out", dtype, n, depth)
        comp = coord.queue_compute(kernel, [up], extra=extra or None, outputs=[(dst, n)])
        src.get_download_buffer()  # the input slot is done once the compute is
        src.advance()
        result = results.empty(coord.device, shape, dtype)
        down = coord.queue_download(dst, result)
        dst.advance()
    return index, comp, result, raw, int(down), int(up)


def _finish(coord: AsyncCoordinator, entry: Tuple[int, Any, np.ndarray, Optional[np.ndarray],
                                                  int, int],
            stager: Optional[_Stager], bar: Optional["_Progress"]) -> np.ndarray:
    index, comp, result, raw, down, up = entry
    try:
        coord.wait(up)
        if stager is not None:
            stager.recycle(raw)
        coord.wait(comp)
        coord.wait(down)
    except PrismGpuError as exc:
        raise _batch_error(exc, index) from exc
    if bar is not None:
        bar.advance()
    return result


def _batch_error(exc: PrismGpuError, index: int) -> PrismGpuError:
    """``exc`` restated for batch ``index``: a KernelError for failed kernels (with the
    op id and kernel name), the same error class otherwise. Carries ``batch_index``."""
    msg = f"stream_map: batch {index} failed: {exc}"
    if isinstance(exc, (KernelError, DependencyFailedError)):
        err: PrismGpuError = KernelError(msg, op_id=getattr(exc, "op_id", None),
                                         kernel=getattr(exc, "kernel", None))
    else:
        err = type(exc)(msg)
    err.batch_index = index  # type: ignore[attr-defined]
    return err


class _Progress:
    def __init__(self, batches: Any) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)

        total = len(batches) if hasattr(batches, "__len__") else None
        self._p = Progress(TextColumn("stream_map"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[rate]} batches/s"), TimeElapsedColumn())
        self._p.start()
        self._task = self._p.add_task("batches", total=total, rate="-")
        self._n = 0
        import time

        self._clock = time.perf_counter
        self._t0 = self._clock()

    def advance(self) -> None:
        self._n += 1
        dt = self._clock() - self._t0
        rate = f"{self._n / dt:.1f}" if dt > 0 else "-"
        self._p.update(self._task, advance=1, rate=rate)

    def close(self) -> None:
        self._p.stop()
