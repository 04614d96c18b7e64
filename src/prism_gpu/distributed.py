"""prism-gpu on Dask: partitions streamed through the GPUs of a cluster's workers.

Each worker keeps one long-lived context (a :class:`PrismWorkerPlugin`), so
compiled kernels, device memory pools and pinned staging are reused across
partitions and calls. One worker per GPU: give each worker its own
``CUDA_VISIBLE_DEVICES`` (:func:`local_cluster` does, for the GPUs of one
machine), or use dask-cuda's ``LocalCUDACluster`` where it is installed.

Dask is optional (``pip install "prism-gpu[dask]"``); ``import prism_gpu``
never imports it, and this module imports it only when a function needs it.

    >>> from prism_gpu import distributed as pgd                  # doctest: +SKIP
    >>> for out in pgd.stream_map(client, "scale", partitions):   # doctest: +SKIP
    ...     use(out)
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Any, Deque, Dict, Iterable, Iterator, Optional, Tuple

import numpy as np

__all__ = ["stream_map", "map_blocks", "local_cluster", "worker_context",
           "worker_info"]

PLUGIN = "prism-gpu"
_FIX = 'install the Dask extra: pip install "prism-gpu[dask]"'


def _distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(f"prism_gpu.distributed needs dask.distributed ({exc}); {_FIX}"
                          ) from exc
    return distributed


# -- the worker side -------------------------------------------------------------------
_CONTEXTS: Dict[str, Any] = {}   # backend -> the context of this process (one GPU)
_LOCK = threading.Lock()
_OPENED = [0]


def worker_context(backend: str = "auto") -> Any:
    """This process's long-lived context on ``backend`` (made on first use)."""
    with _LOCK:
        ctx = _CONTEXTS.get(backend)
        if ctx is None or ctx.closed:
            from ._context import ManagedGpuContext

            ctx = _CONTEXTS[backend] = ManagedGpuContext(backend=backend,
                                                         enable_streams=False)
            _OPENED[0] += 1
        return ctx


def _close_contexts() -> None:
    with _LOCK:
        for ctx in _CONTEXTS.values():
            ctx.close_collecting()
        _CONTEXTS.clear()


class _PluginMethods:
    """What the worker plugin does (mixed into Dask's ``WorkerPlugin`` on first use, so
    importing this module needs no Dask)."""

    name = PLUGIN
    idempotent = True  # registering again (every stream_map call) keeps the live one

    def __init__(self, backend: str = "auto") -> None:
        self.backend = backend

    def setup(self, worker: Any) -> None:
        worker_context(self.backend)

    def teardown(self, worker: Any) -> None:
        _close_contexts()


_PLUGIN_CLASS: list = []


def _plugin_class() -> Any:
    if not _PLUGIN_CLASS:
        from distributed.diagnostics.plugin import WorkerPlugin

        cls = type("PrismWorkerPlugin", (_PluginMethods, WorkerPlugin), {
            "__module__": __name__,
            "__doc__": "A Dask worker plugin: one long-lived prism-gpu context per worker, "
                       "opened at setup, closed at teardown. stream_map and map_blocks "
                       "register it; register it yourself with client.register_plugin("
                       "PrismWorkerPlugin(backend)) to pay the start-up before the first "
                       "partition."})
        _PLUGIN_CLASS.append(cls)
    return _PLUGIN_CLASS[0]


def __getattr__(name: str) -> Any:
    if name == "PrismWorkerPlugin":
        _distributed()
        return _plugin_class()
    raise AttributeError(name)


def worker_info() -> Dict[str, Any]:
    """What this process holds (run it on workers with ``client.run(worker_info)``):
    its device, and how many contexts it ever opened."""
    with _LOCK:
        live = [(b, c.device.name) for b, c in _CONTEXTS.items() if not c.closed]
    return {"contexts": live, "opened": _OPENED[0], "pid": os.getpid(),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}


def run_partition(kernel: Any, part: np.ndarray, output: Any, backend: str) -> np.ndarray:
    """``kernel`` over one partition on this worker's device; the result owns its memory."""
    from ._stream_map import stream_map as _stream_map

    ctx = worker_context(backend)
    if not isinstance(part, np.ndarray):
        part = np.asarray(part)
    out = [np.empty(part.shape, part.dtype)] if output is None else None
    try:
        (res,) = _stream_map(kernel, [part], ctx=ctx, output=output, out=out)
        return res if output is None else res.copy()
    except Exception as exc:
        own = exc.__cause__
        if getattr(exc, "batch_index", None) != 0 or not isinstance(own, Exception):
            raise
    # the partition's own error, not "batch 0 failed" (the client names the partition),
    # raised out here with no context: an exception chain that loops does not pickle
    own.__context__ = None
    raise own


# -- the client side -------------------------------------------------------------------
def _register(client: Any, backend: str) -> None:
    plugin = _plugin_class()(backend)
    register = getattr(client, "register_plugin", None)
    if register is not None:
        register(plugin, name=PLUGIN)
    else:  # dask.distributed before 2023.9
        client.register_worker_plugin(plugin, name=PLUGIN)


def stream_map(client: Any, kernel: Any, partitions: Iterable[Any], depth: int = 3,
               output: Any = None, backend: str = "auto") -> Iterator[np.ndarray]:
    """Run ``kernel`` over every partition on the cluster's workers; yield the results
    in partition order.

    ``partitions`` are numpy arrays (sent from here) or Dask futures of arrays
    (already on the workers). ``kernel`` is anything :func:`prism_gpu.stream_map`
    takes that pickles: a built-in name, a :class:`Kernel`, a function. At most
    ``depth`` partitions per worker are in flight. A failing partition raises at
    its turn, after every earlier result, with ``partition_index``; the later
    ones are cancelled.
    """
    from ._args import MAX_DEPTH, int_arg
    from ._stream_map import check_map_args

    depth = int_arg(depth, "depth", 1, MAX_DEPTH)
    dist = _distributed()
    if not isinstance(client, dist.Client):
        raise TypeError(f"client must be a dask.distributed.Client, got "
                        f"{type(client).__name__}")
    check_map_args(kernel, partitions, "partitions", output)  # here, not on a worker
    _backend_arg(backend)
    return _stream(client, kernel, partitions, depth, output, backend)


def _backend_arg(backend: Any) -> None:
    """Checked here, not resolved: the workers may have a GPU this process lacks."""
    from .backends import BACKENDS

    if backend not in BACKENDS:
        raise (TypeError if not isinstance(backend, str) else ValueError)(
            f"backend must be 'auto', 'cuda' or 'cpu', got {backend!r}")


def _stream(client: Any, kernel: Any, partitions: Iterable[Any], depth: int, output: Any,
            backend: str) -> Iterator[np.ndarray]:
    _register(client, backend)
    workers = max(1, len(client.scheduler_info().get("workers", {})))
    limit = depth * workers
    # (index, future) in flight, then at most one (index, error): the partitions'
    # iterable or the submission failed there; raised at its turn, after every result
    pending: Deque[Tuple[int, Any]] = collections.deque()
    failed: Optional[Tuple[int, Exception]] = None
    it = iter(partitions)
    index = 0
    try:
        while True:
            while failed is None and len(pending) < limit:
                try:
                    part = next(it)
                except StopIteration:
                    break
                except Exception as exc:  # noqa: BLE001 - the iterable's own error
                    failed = (index, exc)
                    break
                try:
                    fut = client.submit(run_partition, kernel, part, output, backend,
                                        pure=False)
                except Exception as exc:  # noqa: BLE001 - e.g. a partition that won't pickle
                    failed = (index, exc)
                    break
                pending.append((index, fut))
                index += 1
            if not pending:
                if failed is not None:
                    i, err = failed
                    err.partition_index = i  # type: ignore[attr-defined]
                    err.add_note(f"raised by partition {i} before it reached a worker")
                    raise err
                return
            i, fut = pending.popleft()
            try:
                result = fut.result()
            except Exception as exc:  # noqa: BLE001 - a worker's failure, at its turn
                exc.partition_index = i  # type: ignore[attr-defined]
                exc.add_note(f"raised by partition {i} on a Dask worker")
                raise
            yield result
    finally:
        for _, fut in pending:
            fut.cancel()


def _block(block: np.ndarray, kernel: Any, backend: str) -> np.ndarray:
    if block.size == 0:
        return block.copy()
    if not block.flags.c_contiguous:  # np.ascontiguousarray would make a 0-d block 1-d
        block = block.copy(order="C")
    return run_partition(kernel, block, None, backend)


def map_blocks(kernel: Any, dask_array: Any, backend: str = "auto") -> Any:
    """A lazy dask array: ``kernel`` (in place: each block keeps its shape and dtype)
    applied to every block on the device of the worker that holds it."""
    try:
        import dask.array as da
    except ImportError as exc:
        raise ImportError(f"map_blocks needs dask.array ({exc}); {_FIX}") from exc
    if not isinstance(dask_array, da.Array):
        raise TypeError(f"map_blocks takes a dask array, got {type(dask_array).__name__}")
    try:
        _register(_distributed().default_client(), backend)
    except (ValueError, ImportError):
        pass  # no client: blocks run in this process, on its own context
    arr: Any = dask_array
    return arr.map_blocks(_block, kernel=kernel, backend=backend, dtype=arr.dtype,
                          meta=np.empty((0,) * arr.ndim, arr.dtype))


def local_cluster(n_workers: Optional[int] = None, backend: str = "auto",
                  threads_per_worker: int = 2, **kwargs: Any) -> Any:
    """A cluster on this machine with one worker process per device: on CUDA each
    worker sees only its GPU (``CUDA_VISIBLE_DEVICES``); ``n_workers`` defaults to
    every device. ``kwargs`` go to the scheduler (e.g. ``dashboard_address``)."""
    from ._args import int_arg
    from .backends import device_count, resolve_backend

    _backend_arg(backend)
    threads = int_arg(threads_per_worker, "threads_per_worker", 1)
    dist = _distributed()
    kind = resolve_backend(backend)
    count = device_count(kind)
    n = count if n_workers is None else int_arg(n_workers, "n_workers", 1)
    if kind == "cuda" and n > count:
        raise ValueError(f"n_workers={n}, but this machine shows {count} CUDA device(s): "
                         "one worker per GPU")
    # worker i gets the i-th GPU this process sees: an existing mask is kept
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = [v.strip() for v in mask.split(",")] if mask else [str(i) for i in range(n)]
    workers = {}
    for i in range(n):
        env = {"CUDA_VISIBLE_DEVICES": visible[i]} if kind == "cuda" else {}
        env["PRISM_GPU_BACKEND"] = kind
        workers[f"prism-gpu-{i}"] = {"cls": dist.Nanny, "options": {
            "nthreads": threads, "env": env, "host": "127.0.0.1"}}
    scheduler = {"cls": dist.Scheduler, "options": {"host": "127.0.0.1",
                                                     "dashboard_address": None, **kwargs}}
    return dist.SpecCluster(workers=workers, scheduler=scheduler)
