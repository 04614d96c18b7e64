"""AsyncCoordinator: upload, compute and download ops over three streams.

A thin client of the core: ids, reports and failures live in the op table,
streams and events in the engine, kernels in the registry, slot states and
hazards in each ring. The coordinator checks a call completely, then queues.
"""

from __future__ import annotations

import atexit
import math
import sys
import weakref
from threading import get_ident
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from ._buffers import FREE_I, PROCESSING_I, UPLOADING_I, BufferState, Slot, TripleBuffer
from ._config import LaunchConfig
from ._engine import D2H, H2D, LAUNCH, Engine, Op
from ._errors import (BufferUnavailableError, InvalidDependencyError, InvalidOperationError,
                      SynchronizationError, TransferError)
from ._kernels import Kernel
from ._ops import CompletedOp, OpId, OpType
from ._optable import OpTable, raise_failures
from ._registry import KernelRegistry
from ._validate import download_destination, upload_source

__all__ = ["AsyncCoordinator", "CoordinatorStatistics", "check_timeout"]

_UPLOADING = BufferState.UPLOADING
_PROCESSING = BufferState.PROCESSING
_UPLOAD, _COMPUTE, _DOWNLOAD = OpType.UPLOAD, OpType.COMPUTE, OpType.DOWNLOAD
OnDone = Callable[[CompletedOp, Optional[float]], None]


class CoordinatorStatistics(NamedTuple):
    """What :meth:`AsyncCoordinator.statistics` reports.

    ``issued``: op ids handed out; ``in_flight``: ops not yet known complete;
    ``failed``: ops that failed so far; ``unobserved_failures``: failures no call
    has reported yet (``synchronize_all`` raises them); ``events_pooled``: idle
    events kept for reuse; ``unreported``: completions waiting for ``poll``;
    ``dropped_reports``: completions dropped unpolled past ``report_backlog``.
    """

    issued: int
    in_flight: int
    failed: int
    unobserved_failures: int
    events_pooled: int
    unreported: int
    dropped_reports: int


def check_timeout(timeout: Any) -> Optional[float]:
    """A wait timeout in seconds as a float, or None for no limit."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) and \
            not hasattr(timeout, "__float__"):
        raise TypeError(f"timeout must be a number of seconds or None, got "
                        f"{type(timeout).__name__}")
    if isinstance(timeout, str):
        raise TypeError("timeout must be a number of seconds or None, got str")
    t = float(timeout)
    if math.isnan(t) or t < 0:
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout!r}")
    return None if math.isinf(t) else t


def _resolve_device(device: Any) -> Tuple[Any, bool]:
    if device is None:
        from .backends import open_device

        return open_device("auto"), True
    if hasattr(device, "create_stream") and hasattr(device, "allocate"):
        dev = device
    else:
        dev = getattr(device, "device", None)  # a ManagedGpuContext
        if dev is None or not hasattr(dev, "create_stream"):
            raise TypeError(f"expected a prism-gpu device or context, got "
                            f"{type(device).__name__}")
    if dev.closed:
        raise InvalidOperationError("the device (or the context) is closed")
    return dev, False


def _int_arg(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    v = value.__index__()
    if v < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {v}")
    return v


class AsyncCoordinator:
    """Event-ordered asynchronous upload, compute and download.

    Parameters
    ----------
    device:
        A backend device (``ctx.device``), a :class:`ManagedGpuContext`, or None
        for ``backend="auto"``.
    max_in_flight:
        Ops queued but not known complete; past it, queueing waits for the oldest.
    timing:
        Record start/end events per op so :class:`CompletedOp` carries ``duration_ms``.
    report_backlog:
        Completions kept for :meth:`poll`; older unreported ones are counted in
        ``dropped_reports`` and dropped, so a loop that never polls stays bounded.

    Failures always reach the caller: :meth:`wait`, :meth:`poll` and :meth:`error`
    report them, and :meth:`synchronize_all` (and leaving a ``with`` block) raises
    those no call has reported yet. Not thread-safe by design: use it from the
    thread that created it.
    """

    def __init__(self, device: Any = None, *, max_in_flight: int = 1024, timing: bool = False,
                 report_backlog: int = 16384) -> None:
        max_in_flight = _int_arg(max_in_flight, "max_in_flight", 1)
        report_backlog = _int_arg(report_backlog, "report_backlog", 1)
        self._device, self._owns_device = _resolve_device(device)
        self._owner = get_ident()
        self._table = OpTable(report_backlog)
        self._engine = Engine(self._device, self._table, max_in_flight=max_in_flight,
                              timing=bool(timing))
        self._kernels = KernelRegistry(self._device.prepare_kernel)
        self._configs: Dict[int, LaunchConfig] = {}
        # op id -> the slots it touched (weakly: dropped buffers are not kept alive);
        # data flows along dependencies. An id leaves when its slot is refilled.
        self._slots_of: Dict[int, Any] = {}  # a weakref, or a tuple of them
        self._sweep_at = 4096
        self._up = self._engine.lane("upload")
        self._compute = self._engine.lane("compute")
        self._down = self._engine.lane("download")
        _LIVE.add(self)

    # the parts clients build on ------------------------------------------------
    @property
    def device(self) -> Any:
        return self._device

    @property
    def engine(self) -> Engine:
        """The engine (streams, events, ops in flight) that pipelines share."""
        return self._engine

    @property
    def table(self) -> OpTable:
        """The op table (ids, reports, failures) that pipelines share."""
        return self._table

    @property
    def timing(self) -> bool:
        return self._engine.timing

    def upload_stream(self) -> Any:
        return self._up.stream

    def compute_stream(self) -> Any:
        return self._compute.stream

    def download_stream(self) -> Any:
        return self._down.stream

    def register_kernel(self, name: str, kernel: Any) -> None:
        """Register ``kernel`` (a :class:`Kernel` or a callable) under ``name``."""
        self.check()
        self._kernels.register(name, kernel)

    def resolve_kernel(self, kernel: Any) -> Tuple[Kernel, Any]:
        """``kernel`` (a name, :class:`Kernel` or callable) as (Kernel, prepared form);
        unknown names and unpreparable kernels raise here."""
        self.check()
        return self._kernels.resolve(kernel)

    def check(self) -> None:
        """Raise unless this coordinator may be used now, from this thread."""
        if get_ident() != self._owner or self._engine.closed or self._device.closed:
            self._check_slow()

    def _check_slow(self) -> None:
        self._engine.check_open()
        if get_ident() != self._owner:
            raise InvalidOperationError(
                "AsyncCoordinator is not thread-safe and was called from a thread other than "
                "the one that created it; give each thread its own coordinator")

    # queueing -------------------------------------------------------------------
    def queue_upload(self, data: Any, buffer: TripleBuffer, *,
                     on_done: Optional[OnDone] = None) -> OpId:
        """Copy ``data`` (host numpy array) into ``buffer``'s next FREE slot. Returns the op id.

        ``data`` may hold fewer elements than a slot (a short last batch).
        Pageable memory is staged, so ``data`` may be changed once this returns.
        ``on_done(report, duration_ms)`` is called when the op is found complete.
        """
        if get_ident() != self._owner or self._engine.closed or self._device.closed:
            self._check_slow()
        if type(buffer) is not TripleBuffer and not isinstance(buffer, TripleBuffer):
            raise TypeError(f"buffer must be a TripleBuffer, got {type(buffer).__name__}")
        n = upload_source(data, buffer.dtype, buffer.capacity)
        if buffer.device is not self._device:
            raise TransferError("the buffer lives on another device than this coordinator")
        done = self._wrap(on_done) if on_done is not None else None
        slot = buffer.take(FREE_I)
        if slot is None:
            raise BufferUnavailableError(
                f"no FREE slot to upload into (states: {buffer.get_states()}); download and "
                "advance() a slot first, or use a deeper buffer")
        full = slot.full
        try:
            op = self._engine.submit(
                self._up, _UPLOAD, None, (), slot.write_hazards(), H2D,
                full if n == slot.capacity else full[:n],
                data if data.ndim == 1 else data.reshape(-1), keep=full, on_done=done)
        except BaseException:
            buffer.untake(slot, FREE_I)
            raise
        oid = op.id
        slots_of = self._slots_of
        for old in slot.filled(op, n):
            slots_of.pop(old, None)
        slots_of[oid] = slot.ref
        if len(slots_of) > self._sweep_at:
            self._sweep()
        return self._table.id_type(oid)

    def queue_compute(self, name: Any, deps: Iterable[int] = (), *,
                      args: Optional[Sequence[Any]] = None,
                      extra: Optional[Sequence[Any]] = None,
                      config: Optional[LaunchConfig] = None,
                      outputs: Sequence[Any] = (),
                      on_done: Optional[OnDone] = None) -> OpId:
        """Run kernel ``name`` after every op in ``deps``. Returns the op id.

        With no ``args``, the kernel gets the device arrays of the slots its
        dependencies touched (each once, in dependency order), then one array per
        ``outputs`` entry, then ``extra`` (default: the kernel's defaults). ``args``
        replaces that list entirely.

        ``outputs`` lists buffers (or ``(buffer, n)`` pairs) whose next FREE slot
        the kernel writes (``n`` elements, default the whole slot); the slot becomes
        PROCESSING, ready for :meth:`queue_download`.
        """
        if get_ident() != self._owner or self._engine.closed or self._device.closed:
            self._check_slow()
        kernel, prepared = self._kernels.resolve(name)
        dep_ids = self._dep_ids(deps)
        if config is not None and type(config) is not LaunchConfig \
                and not isinstance(config, LaunchConfig):
            raise TypeError(f"config must be a prism_gpu.LaunchConfig or None, got "
                            f"{type(config).__name__}")
        if extra is not None and type(extra) is not tuple:
            extra = _sequence(extra, "extra")
        if args is not None:
            args = _sequence(args, "args")
        done = self._wrap(on_done) if on_done is not None else None
        slots = self._data_slots(dep_ids) if dep_ids else []
        pending = self._pending_uploads(slots) if slots else slots
        outs = self._output_slots(outputs) if outputs else ()
        if args is not None:
            arrays: Sequence[Any] = ()
            ext = args
        else:
            if not kernel.uses_arrays:
                arrays = ()
            elif outs:
                arrays = [s.array for s in slots] + [s.full[:n] for s, n in outs]
            else:
                arrays = [s.array for s in slots]
            ext = extra if extra is not None else kernel.defaults
        if config is None:
            config = kernel.config or self._default_config(len(arrays[0]) if arrays else 1)
        # data flows from each dependency and each slot's writer; a slot rewritten in
        # place also follows its readers, and an output slot every op on its old data
        eng = self._engine
        inflight = eng.inflight
        waits: List[Any] = []
        root = None
        for i in dep_ids:
            dep = inflight.get(i)
            if dep is not None:
                waits.append(dep)
            elif root is None and self._table.failed_total:
                root = self._table_root(i)
        quiet: List[Any] = []
        for s in slots:
            w = s.writer
            if w is not None and w not in waits:
                waits.append(w)
            if s.readers:
                quiet.extend(s.readers)
        for s, _ in outs:
            quiet.extend(s.write_hazards())
        op = eng.submit(self._compute, _COMPUTE, kernel.name, waits, quiet, LAUNCH,
                        prepared, config, arrays, ext, keep=(arrays, ext), on_done=done,
                        root=root)
        for s in pending:
            s.buffer.take(UPLOADING_I)
        for s, _ in outs:
            s.buffer.produce()
        oid = op.id
        failed = None
        if op.error is not None:
            failed = eng.root_of(op)
        for s in slots:
            s.updated(op, failed)
        if outs:
            slots_of = self._slots_of
            for s, n in outs:
                for old in s.filled(op, n):
                    slots_of.pop(old, None)
                if failed is not None:
                    s.failed = failed
            refs = tuple(s.ref for s in slots) + tuple(s.ref for s, _ in outs)
            slots_of[oid] = refs[0] if len(refs) == 1 else refs
        elif slots:
            self._slots_of[oid] = slots[0].ref if len(slots) == 1 else tuple(
                s.ref for s in slots)
        return self._table.id_type(oid)

    def queue_download(self, buffer: TripleBuffer, dst: Any, *,
                       on_done: Optional[OnDone] = None) -> OpId:
        """Copy ``buffer``'s oldest PROCESSING slot into host array ``dst``. Returns the op id.

        The copy waits on the GPU for the op that last wrote the slot. ``dst``
        holds the data once :meth:`wait` or :meth:`poll` reports the op complete.
        """
        if get_ident() != self._owner or self._engine.closed or self._device.closed:
            self._check_slow()
        if type(buffer) is not TripleBuffer and not isinstance(buffer, TripleBuffer):
            raise TypeError(f"buffer must be a TripleBuffer, got {type(buffer).__name__}")
        slot = buffer.peek(PROCESSING_I)
        if slot is None:
            raise BufferUnavailableError(
                f"no PROCESSING slot to download (states: {buffer.get_states()}); queue a "
                "compute on an upload first")
        view = download_destination(dst, buffer.dtype, slot.valid)
        done = self._wrap(on_done) if on_done is not None else None
        w = slot.writer
        op = self._engine.submit(self._down, _DOWNLOAD, None, (w,) if w is not None else (),
                                 (), D2H, view, slot.array, keep=(slot.full, dst),
                                 on_done=done, root=slot.failed)
        buffer.take(PROCESSING_I)
        oid = op.id
        slot.read(op)
        self._slots_of[oid] = slot.ref
        return self._table.id_type(oid)

    # checks and slot bookkeeping -----------------------------------------------
    def _dep_ids(self, deps: Any) -> List[int]:
        table = self._table
        if type(deps) is list and len(deps) == 1:  # the common [upload_id]
            d = deps[0]
            if type(d) is table.id_type and d < table.next:  # type: ignore[operator]
                return [d]  # type: ignore[list-item]
        if hasattr(deps, "__index__") and not isinstance(deps, bool):
            deps = (deps,)
        elif isinstance(deps, (str, bytes)) or not hasattr(deps, "__iter__"):
            raise TypeError(f"deps must be op ids (an int or an iterable of ints), got "
                            f"{type(deps).__name__}")
        resolve = self._table.resolve
        return [resolve(d, InvalidDependencyError) for d in deps]

    def _wrap(self, on_done: Optional[OnDone]) -> Optional[Callable[[Op, Optional[float]], None]]:
        if on_done is None:
            return None
        if not callable(on_done):
            raise TypeError(f"on_done must be callable, got {type(on_done).__name__}")
        id_type = self._table.id_type

        def report(op: Op, ms: Optional[float]) -> None:
            on_done(CompletedOp(id_type(op.id), op.type, ms, op.error), ms)
        return report

    def _table_root(self, oid: int) -> Any:
        """(root id, error) of completed op ``oid``'s failure, or None."""
        r = self._table.root(oid)
        return None if r is None else (r, self._table.error(r, observe=False))

    def _sweep(self) -> None:
        """Drop the entries of dropped buffers from the op -> slot map."""
        slots_of = self._slots_of
        for k in [k for k, refs in slots_of.items()
                  if all(r() is None for r in (refs if type(refs) is tuple else (refs,)))]:
            del slots_of[k]
        self._sweep_at = 2 * len(slots_of) + 4096

    def _data_slots(self, dep_ids: Sequence[int]) -> List[Slot]:
        slots: List[Slot] = []
        slots_of = self._slots_of
        for d in dep_ids:
            refs = slots_of.get(d, ())
            for r in (refs if type(refs) is tuple else (refs,)):
                s = r()
                if s is not None and s not in slots and (s.state is _UPLOADING
                                                         or s.state is _PROCESSING):
                    slots.append(s)
        return slots

    def _default_config(self, n: int) -> LaunchConfig:
        cfg = self._configs.get(n)
        if cfg is None:
            if len(self._configs) > 256:
                self._configs.clear()
            cfg = self._configs[n] = LaunchConfig.for_elements(n)
        return cfg

    def _output_slots(self, outputs: Sequence[Any]) -> List[Tuple[Slot, int]]:
        if isinstance(outputs, (str, bytes, TripleBuffer)) or not hasattr(outputs, "__iter__"):
            raise TypeError("outputs must be a list of TripleBuffers or (buffer, n) pairs")
        outs: List[Tuple[Slot, int]] = []
        for entry in outputs:
            buf, n = entry if isinstance(entry, tuple) and len(entry) == 2 else (entry, None)
            if not isinstance(buf, TripleBuffer):
                raise TypeError(f"outputs takes TripleBuffers, got {type(buf).__name__}")
            if buf.device is not self._device:
                raise TransferError("an output buffer lives on another device")
            n = buf.capacity if n is None else _int_arg(n, "output length", 1)
            if n > buf.capacity:
                raise TransferError(f"output length {n} does not fit a slot of {buf.capacity}")
            slot = buf.peek(FREE_I)
            if slot is None or any(s.buffer is buf for s, _ in outs):
                raise BufferUnavailableError(
                    f"output buffer has no FREE slot (states: {buf.get_states()}); download "
                    "and advance() first")
            if buf.peek(UPLOADING_I) is not None:
                raise InvalidOperationError(
                    "an output buffer must not hold uploads waiting for a compute")
            outs.append((slot, n))
        return outs

    def _pending_uploads(self, slots: List[Slot]) -> List[Slot]:
        """Slots still UPLOADING, checked to be consumed in ring order."""
        ahead: Dict[int, int] = {}
        pending = []
        for s in slots:
            if s.state is not _UPLOADING:
                continue
            k = ahead.get(id(s.buffer), 0)
            if s.buffer.peek(UPLOADING_I, k) is not s:
                older = s.buffer.peek(UPLOADING_I, 0)
                raise InvalidDependencyError(
                    f"slot {s.index} is computed on before the older upload in slot "
                    f"{older.index if older else '?'} of the same buffer; computes consume "
                    "uploads in ring order: queue a compute on the older upload first")
            ahead[id(s.buffer)] = k + 1
            pending.append(s)
        return pending

    # completion -----------------------------------------------------------------
    def poll(self) -> List[CompletedOp]:
        """Ops completed since the last poll (never blocks)."""
        self.check()
        self._engine.harvest()
        return self._table.take_reports()

    def wait(self, op_id: int, timeout: Optional[float] = None) -> None:
        """Block until op ``op_id`` completes; raise its error if it failed.

        Raises :class:`SynchronizationError` if ``timeout`` seconds pass first.
        Every op found complete on the way is retired (its memory released).
        """
        self.check()
        oid = self._table.resolve(op_id, InvalidOperationError)
        limit = check_timeout(timeout)
        if not self._engine.wait(oid, limit):
            raise SynchronizationError(f"op {oid} did not complete within {timeout} s")
        err = self._table.error(oid)
        if err is not None:
            raise err

    def is_complete(self, op_id: int) -> bool:
        """True once ``op_id`` has completed (successfully or not); never blocks."""
        self.check()
        return self._engine.is_done(self._table.resolve(op_id, InvalidOperationError))

    def error(self, op_id: int) -> Optional[BaseException]:
        """The error of a completed op, or None."""
        self.check()
        return self._table.error(self._table.resolve(op_id, InvalidOperationError))

    def synchronize_all(self) -> None:
        """Wait for every queued op, then raise the failures no call has reported yet
        (one: that error; several: an ExceptionGroup), once."""
        self.check()
        self._engine.synchronize()
        raise_failures(self._table.take_unobserved(), "synchronize_all")

    @property
    def in_flight(self) -> int:
        """Ops queued and not yet known complete."""
        return len(self._engine.inflight)

    @property
    def dropped_reports(self) -> int:
        return self._table.dropped_reports

    def statistics(self) -> CoordinatorStatistics:
        t, e = self._table, self._engine
        return CoordinatorStatistics(
            issued=t.next, in_flight=len(e.inflight), failed=t.failed_total,
            unobserved_failures=t.unobserved, events_pooled=e.pooled_events,
            unreported=t.unreported_reports,
            dropped_reports=t.dropped_reports)

    # lifetime -------------------------------------------------------------------
    def close(self) -> None:
        """Wait for in-flight work, free streams and events, then raise the failures
        no call has reported yet. Idempotent."""
        raise_failures(self.close_collecting(), "close")

    def close_collecting(self) -> List[BaseException]:
        """Close like :meth:`close`, but return the unreported failures instead of
        raising them (for owners that report them their own way)."""
        eng = self._engine
        if eng.closed:
            return []
        errors: List[BaseException] = []
        try:
            eng.close(wait=not sys.is_finalizing())
            errors = self._table.take_unobserved()
        finally:
            self._kernels.clear()
            self._slots_of.clear()
            if self._owns_device:
                self._device.close()
        return errors

    @property
    def closed(self) -> bool:
        return self._engine.closed or self._device.closed

    def __enter__(self) -> "AsyncCoordinator":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        errors = self.close_collecting()
        if exc_type is None:
            raise_failures(errors, "leaving the with block")

    def __del__(self) -> None:  # a safety net; close() is the mechanism
        try:
            if not self._engine.closed and not sys.is_finalizing():
                self.close_collecting()
        except Exception:  # noqa: BLE001
            pass


def _sequence(value: Any, what: str) -> Optional[Tuple[Any, ...]]:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise TypeError(f"{what} must be a tuple or list (e.g. {what}=(2.0,)), got "
                    f"{type(value).__name__}")


_LIVE: "weakref.WeakSet[AsyncCoordinator]" = weakref.WeakSet()


@atexit.register
def _close_live_coordinators() -> None:
    """Finish what coordinators left open still have queued, while their threads run."""
    for coord in list(_LIVE):
        try:
            coord.close_collecting()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass

