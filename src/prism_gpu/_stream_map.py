"""stream_map: an iterable of host arrays in, an iterator of results out, in order."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, List, NamedTuple, Optional, Tuple, Union

import math
import numpy as np

from ._args import MAX_DEPTH, device_ids, dtype_arg, int_arg, iterable_arg, shape_arg
from ._context import ManagedGpuContext
from ._devarray import DeviceArray
from ._devlane import DeviceLane
from ._feed import Pulled, read_ahead
from ._hostmem import pinned_empty
from ._kernels import Kernel
from ._sink import Sink, check_out
from ._staging import Stager, cache_of

__all__ = ["stream_map", "check_map_args", "pinned_empty"]

OutputSpec = Union[Tuple[Any, Any], Callable[[np.ndarray], Tuple[Any, Any]], None]

_READ_AHEAD_BYTES = 256 << 20  # per device: big batches are pulled less far ahead


class _Prepared(NamedTuple):
    output: Optional[Tuple[Tuple[int, ...], np.dtype]]
    final: Optional[np.ndarray]


def _resolve_output(output: OutputSpec, batch: Optional[np.ndarray]
                    ) -> Optional[Tuple[Tuple[int, ...], np.dtype]]:
    if output is None:
        return None
    spec = output(batch) if callable(output) and batch is not None else output
    if not isinstance(spec, (tuple, list)) or len(spec) != 2:
        raise TypeError(f"output must be (shape, dtype) or a callable giving one, got "
                        f"{spec!r}")
    try:
        shape, dt = shape_arg(spec[0]), dtype_arg(spec[1])
    except TypeError as exc:
        raise TypeError(f"output must be (shape, dtype) or a callable giving one, got "
                        f"{spec!r}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"output {spec!r}: {exc}") from None
    if math.prod(shape) == 0:
        raise ValueError(f"output shape {shape} holds no elements")
    if dt.hasobject:
        raise TypeError("output dtype must not be object")
    return shape, dt


def check_map_args(kernel: Any, batches: Any, what: str, output: OutputSpec) -> OutputSpec:
    """The checks stream_map (and its Dask version) make at the call, rather than at the
    first batch (or on a worker); returns ``output`` resolved where it is fixed."""
    if not isinstance(kernel, (Kernel, str)):
        if not callable(kernel):
            raise TypeError(f"kernel must be a Kernel, a callable or a kernel name, got "
                            f"{type(kernel).__name__}")
        Kernel.from_callable(kernel)  # its own checks
    iterable_arg(batches, what)
    return output if output is None or callable(output) else _resolve_output(output, None)


def stream_map(kernel: Any, batches: Iterable[np.ndarray], depth: int = 3, ctx: Any = None,
               output: OutputSpec = None, progress: bool = False,
               extra: Tuple[Any, ...] = (), *, prefetch: int = 4,
               out: Any = None, devices: Any = None,
               backend: str = "auto") -> Iterator[np.ndarray]:
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
        Device slots in the ring (1 to 1024, each allocated up front): at most
        ``depth`` batches are on the device at once; staged batches queue behind
        them (up to ``prefetch // 2 + 1`` more, each starting when its slot is free).
    ctx:
        A :class:`ManagedGpuContext`; default: a private one on ``backend="auto"``.
    output:
        ``(shape, dtype)`` of a second device array the kernel writes, or a callable
        of the batch returning one.
    progress:
        Show a progress bar with batches/s (rich).
    prefetch:
        Batches pulled from the iterable beyond the ``depth`` on the device, so
        their staging copies overlap the device and each other (default 4, fewer
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

    devices:
        Spread batches over several devices: a count (devices ``0..n-1``), a list
        of device ids, or ``"all"``. Each gets its own context (streams, rings,
        pinned staging), ``depth`` and ``prefetch`` apply per device, and each
        next batch goes to the device expected to finish it first (its batches
        not landed yet, at its measured pace), so a slower device gets fewer.
        Results still come in input
        order. Not with ``ctx``; ``extra`` may not hold a :class:`DeviceArray`
        (it lives on one device).
    backend:
        The backend of the contexts stream_map opens itself (without ``ctx``).

    A failing batch raises when its result is due, after every earlier result was
    yielded, with ``batch_index``. Everything is released when the loop ends,
    breaks, raises or the iterator is garbage-collected.

    >>> for out in stream_map(lambda x: np.sqrt(x, out=x), batches):   # doctest: +SKIP
    ...     use(out)
    """
    depth, prefetch = int_arg(depth, "depth", 1, MAX_DEPTH), int_arg(prefetch, "prefetch", 0)
    output = check_map_args(kernel, batches, "batches", output)
    if not isinstance(extra, (tuple, list)):
        raise TypeError(f"extra must be a tuple, got {type(extra).__name__}")
    if ctx is not None and not isinstance(ctx, ManagedGpuContext):
        raise TypeError(f"ctx must be a ManagedGpuContext, got {type(ctx).__name__}")
    check_out(out)
    ids = device_ids(devices, backend)
    if ids is not None:
        if ctx is not None:
            raise ValueError("pass ctx= or devices=, not both: devices= opens a context "
                             "per device")
        if any(isinstance(v, DeviceArray) for v in extra):
            raise ValueError("a DeviceArray lives on one device; with devices=, pass "
                             "constants as host arrays or scalars")
    return _run(kernel, batches, depth, prefetch, ctx, output, progress, tuple(extra), out,
                ids, backend)


def _lanes(ctx: Any, devices: Optional[List[int]], backend: str, depth: int, kernel: Any,
           extra: Tuple[Any, ...]) -> List[DeviceLane]:
    if devices is None:
        return [DeviceLane(ctx, None, backend, depth, kernel, extra)]
    lanes: List[DeviceLane] = []
    try:
        for d in devices:  # several lanes: each measures its pace, for expected_wait
            lanes.append(DeviceLane(None, d, backend, depth, kernel, extra,
                                    paced=len(devices) > 1))
    except BaseException:
        for lane in lanes:
            lane.close()
        raise
    return lanes


_AS_IS = _Prepared(None, None)  # a batch's result in the pool, of its shape and dtype


def _run(kernel: Any, batches: Iterable[np.ndarray], depth: int, prefetch: int, ctx: Any,
         output: OutputSpec, progress: bool, extra: Tuple[Any, ...], out: Any,
         devices: Optional[List[int]], backend: str) -> Iterator[np.ndarray]:
    """One stream_map call: a lane per device, the staging and where results go."""
    lanes = _lanes(ctx, devices, backend, depth, kernel, extra)
    device = lanes[0].device
    bar = _Progress(batches) if progress else None
    cache = cache_of(device)  # pinned host memory serves every device
    stager = Stager(device, cache)
    results = cache.results.lease()  # (this generator's thread alone calls it)
    sink = Sink(out, device, stager, results)
    for lane in lanes:
        lane.attach(sink, stager)
    plain = output is None and out is None  # each result in the pool, shaped as its batch

    def prepare(batch: np.ndarray, pos: int) -> _Prepared:
        if plain:
            return _AS_IS
        spec = _resolve_output(output, batch) if callable(output) else output
        shape, dtype = spec if spec is not None else (batch.shape, batch.dtype)
        return _Prepared(spec, sink.claim(pos, shape, dtype))

    submit: Callable[[Pulled], Any]
    as_is: Optional[Callable[[np.ndarray, int], Any]]
    finish: Callable[[Any], np.ndarray]
    if len(lanes) == 1:  # the handle is the lane's queued batch
        lane = lanes[0]
        submit, finish = lane.submit, lane.finish
        as_is = lane.queue if plain else None
    else:  # (lane, its queued batch)
        def load(ln: DeviceLane) -> Tuple[float, int]:
            return ln.expected_wait(), len(ln.queued)

        def pick() -> DeviceLane:
            return min(lanes, key=load)

        def submit(entry: Pulled) -> Tuple[DeviceLane, Any]:
            ln = pick()
            return ln, ln.submit(entry)

        def submit_as_is(batch: np.ndarray, pos: int) -> Tuple[DeviceLane, Any]:
            ln = pick()
            return ln, ln.queue(batch, pos)

        def finish(handle: Tuple[DeviceLane, Any]) -> np.ndarray:
            return handle[0].finish(handle[1])

        as_is = submit_as_is if plain else None
    if bar is not None:
        def finish_shown(handle: Any, finish: Callable[[Any], np.ndarray] = finish
                         ) -> np.ndarray:
            result = finish(handle)
            bar.advance()
            return result

        finish = finish_shown

    n = len(lanes)
    try:
        # batches staged ahead queue behind the ring's slots on the device (the GPU
        # orders each slot's reuse), so host copies of several batches overlap
        yield from read_ahead(
            batches, n * depth, prefetch, stager, prepare, submit, finish,
            "stream_map: batch", window=n * (depth + 1) + prefetch // 2,
            max_bytes=n * _READ_AHEAD_BYTES, as_is=as_is,
            moved="a stream_map iterator was started on another thread: its "
                  "coordinators are that thread's; iterate it where it started",
            # (a lane alone, its results from the pool: read_ahead queues and finishes
            # its page-locked batches itself; not with a bar counting the finish calls)
            lane=lanes[0] if plain and n == 1 and bar is None else None)
    finally:
        stager.close()
        for lane in lanes:
            lane.close()
        results.close()  # (once no download writes its buffers: not if a close raised)
        if bar is not None:
            bar.close()


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
