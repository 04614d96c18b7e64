"""AsyncCoordinator: an op table over upload, compute and download streams.

Ops are plain records; the backend only sees copies, launches, records and
waits. Each op ends with a pooled event. Events go back to the pool only once
their op is known complete, so depending on op N always waits for op N.
"""

from __future__ import annotations

import atexit
import collections
import sys
import threading
import weakref
from threading import get_ident
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

from ._buffers import FREE_I, PROCESSING_I, UPLOADING_I, BufferState, Slot, TripleBuffer
from ._builtins import builtin_kernels
from ._config import LaunchConfig
from ._errors import (BufferUnavailableError, DependencyFailedError, InvalidDependencyError,
                      InvalidOperationError, KernelError, PrismGpuError, SynchronizationError,
                      TransferError)
from ._kernels import Kernel, as_kernel
from ._ops import CompletedOp, OpId, OpType, id_type
from ._validate import download_destination, upload_source

__all__ = ["AsyncCoordinator"]

_UPLOADING = BufferState.UPLOADING
_PROCESSING = BufferState.PROCESSING


class _Op:
    __slots__ = ("id", "type", "lane", "event", "start", "end", "kernel", "error", "finish",
                 "keep", "on_done")

    def __init__(self, op_id: int, op_type: OpType, lane: Deque["_Op"], kernel: Optional[str]):
        self.id = op_id
        self.type = op_type
        self.lane = lane
        self.kernel = kernel
        self.event: Any = None
        self.start: Any = None   # timing events, when the op is timed
        self.end: Any = None
        self.error: Optional[BaseException] = None
        self.finish: Optional[Callable[[], None]] = None
        self.keep: Any = None
        self.on_done: Optional[Callable[["_Op", Optional[float]], None]] = None


def _resolve_device(device: Any) -> Tuple[Any, bool]:
    if device is None:
        from .backends import open_device

        return open_device("auto"), True
    if hasattr(device, "create_stream") and hasattr(device, "allocate"):
        return device, False
    inner = getattr(device, "device", None)
    if inner is not None and hasattr(inner, "create_stream"):
        return inner, False
    raise TypeError(f"expected a prism-gpu device or context, got {type(device).__name__}")


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
        Record a start event per op so :class:`CompletedOp` carries ``duration_ms``.
    report_backlog:
        Completions kept for :meth:`poll`; older unreported ones are counted in
        ``dropped_reports`` and dropped, so a loop that never polls stays bounded.

    Not thread-safe by design: use it from the thread that created it.
    """

    def __init__(self, device: Any = None, *, max_in_flight: int = 1024, timing: bool = False,
                 report_backlog: int = 16384) -> None:
        if int(max_in_flight) < 1:
            raise ValueError("max_in_flight must be >= 1")
        self._device, self._owns_device = _resolve_device(device)
        self._owner = threading.get_ident()
        self._max = int(max_in_flight)
        self.timing = bool(timing)
        self._OpId = id_type()
        self._next = 0
        self._inflight: Dict[int, _Op] = {}
        self._failed: Dict[int, BaseException] = {}
        # op id -> weak references to the slots it touched (in the slot's current
        # generation): data flows along dependencies, dropped buffers are not kept alive
        self._op_slots: Dict[int, Tuple[Any, ...]] = {}
        self._sweep_at = 4096
        self._reports: Deque[CompletedOp] = collections.deque(maxlen=int(report_backlog))
        self.dropped_reports = 0
        self._pool: List[Any] = []
        self._tpool: List[Any] = []
        self._kernels: Dict[str, Tuple[Kernel, Any]] = {}
        self._configs: Dict[int, LaunchConfig] = {}
        self._any_failed = False
        self._by_obj: Dict[int, Tuple[Any, Kernel, Any]] = {}
        self._builtins = builtin_kernels()
        self._lanes: List[Deque[_Op]] = []
        self._lane_of: Dict[int, Deque[_Op]] = {}
        self._streams: List[Any] = []
        self._closed = False
        self._up = self._new_stream()
        self._compute = self._new_stream()
        self._down = self._new_stream()
        _LIVE.add(self)

    # streams and kernels ------------------------------------------------------
    @property
    def device(self) -> Any:
        return self._device

    def upload_stream(self) -> Any:
        return self._up

    def compute_stream(self) -> Any:
        return self._compute

    def download_stream(self) -> Any:
        return self._down

    def _new_stream(self, priority: int = 0) -> Any:
        stream = self._device.create_stream(priority)
        lane: Deque[_Op] = collections.deque()
        self._streams.append(stream)
        self._lanes.append(lane)
        self._lane_of[id(stream)] = lane
        return stream

    def register_kernel(self, name: str, kernel: Any) -> None:
        """Register ``kernel`` (a :class:`Kernel` or a callable) under ``name``."""
        self._check()
        if not isinstance(name, str) or not name:
            raise ValueError(f"kernel name must be a non-empty str, got {name!r}")
        k = as_kernel(kernel, name)
        self._kernels[name] = (k, self._device.prepare_kernel(k))

    def _kernel(self, name: Any) -> Tuple[Kernel, Any]:
        if isinstance(name, str):
            entry = self._kernels.get(name)
            if entry is None:
                k = self._builtins.get(name)
                if k is None:
                    known = sorted(set(self._kernels) | set(self._builtins))
                    raise InvalidOperationError(
                        f"no kernel named {name!r}; known: {', '.join(known)}. "
                        "Register it first with coord.register_kernel(name, kernel)")
                entry = self._kernels[name] = (k, self._device.prepare_kernel(k))
            return entry
        # a Kernel or callable passed directly: prepared once, kept alive with its entry
        cached = self._by_obj.get(id(name))
        if cached is None or cached[0] is not name:
            k = as_kernel(name)
            cached = self._by_obj[id(name)] = (name, k, self._device.prepare_kernel(k))
        return cached[1], cached[2]

    # the op machinery ---------------------------------------------------------
    def _check(self) -> None:
        if self._closed or get_ident() != self._owner:
            self._check_slow()

    def _check_slow(self) -> None:
        if self._closed:
            raise InvalidOperationError("this AsyncCoordinator is closed")
        if get_ident() != self._owner:
            raise InvalidOperationError(
                "AsyncCoordinator is not thread-safe and was called from a thread other than "
                "the one that created it; give each thread its own coordinator")

    def _event(self, timing: bool) -> Any:
        pool = self._tpool if timing else self._pool
        return pool.pop() if pool else self._device.create_event(timing)

    def _begin(self, op_type: OpType, stream: Any, kernel: Optional[str] = None,
               timing: Optional[bool] = None) -> _Op:
        if len(self._inflight) >= self._max:
            self._throttle()
        op = _Op(self._next, op_type, self._lane_of[id(stream)], kernel)
        if self.timing if timing is None else timing:
            op.start = self._event(True)
        return op

    def _throttle(self) -> None:
        """Bring ops in flight under ``max_in_flight``, blocking on the oldest if need be."""
        self._harvest()
        while len(self._inflight) >= self._max:
            oldest = next(iter(self._inflight.values()))
            oldest.event.synchronize()
            self._harvest_lane(oldest.lane, oldest)

    def _commit(self, op: _Op, stream: Any) -> OpId:
        if op.start is not None:
            # Timing lives in events of its own: streams waiting on a timing event are
            # slower, so the event others wait on never records time.
            op.end = self._event(True)
            stream.record(op.end, False)
        ev = self._event(False)
        stream.record(ev)
        op.event = ev
        op.lane.append(op)
        self._inflight[op.id] = op
        self._next += 1
        return self._OpId(op.id)

    def _abandon(self, op: _Op) -> None:
        if op.start is not None:
            self._tpool.append(op.start)

    def _resolve(self, op_id: Any, error: type) -> int:
        t = type(op_id)
        if (t is self._OpId or t is int) and 0 <= op_id < self._next:
            return op_id
        if not isinstance(op_id, int) or isinstance(op_id, bool):
            raise error(f"op ids are ints, got {type(op_id).__name__}")
        if isinstance(op_id, OpId) and type(op_id) is not self._OpId:
            raise error(f"op {int(op_id)} was issued by another coordinator")
        oid = int(op_id)
        if not 0 <= oid < self._next:
            raise error(f"op {oid} was never issued by this coordinator "
                        f"(ids issued so far: 0..{self._next - 1})")
        return oid

    def _failed_root(self, ids: Iterable[int]) -> Optional[int]:
        """The root of the first known failure among ops ``ids`` (None while nothing failed)."""
        if self._any_failed:
            for d in ids:
                root = self._root_of(d)
                if root is not None:
                    return root
        return None

    @staticmethod
    def _error_root(op: _Op) -> Optional[int]:
        err = op.error
        if err is None:
            return None
        return err.root_op if isinstance(err, DependencyFailedError) else op.id

    def _slots_of(self, oid: int) -> Tuple[Slot, ...]:
        refs = self._op_slots.get(oid)
        if refs is None:
            return ()
        return tuple(s for s in (r() for r in refs) if s is not None)

    def _map_slots(self, oid: int, slots: Sequence[Slot]) -> None:
        op_slots = self._op_slots
        op_slots[oid] = tuple(s.ref for s in slots)
        if len(op_slots) > self._sweep_at:  # entries of dropped buffers
            for k in [k for k, refs in op_slots.items() if all(r() is None for r in refs)]:
                del op_slots[k]
            self._sweep_at = 2 * len(op_slots) + 4096

    def _root_of(self, oid: int) -> Optional[int]:
        """The failed op at the root of ``oid``'s failure, if it is known to have failed."""
        op = self._inflight.get(oid)
        err = op.error if op is not None else self._failed.get(oid)
        if err is None:
            return None
        return err.root_op if isinstance(err, DependencyFailedError) else oid

    def _dependency_error(self, op: _Op, root: int, cause: Any = None) -> DependencyFailedError:
        root_err = self._failed.get(root) or cause
        root_op = self._inflight.get(root)
        if root_err is None and root_op is not None:
            root_err = root_op.error
        what = f"{op.type.value} op {op.id}" + (f" ({op.kernel!r})" if op.kernel else "")
        err = DependencyFailedError(
            f"{what} did not run: it depends on op {root}, which failed: {root_err}",
            op_id=op.id, root_op=root, root_error=root_err)
        return err

    # queueing -----------------------------------------------------------------
    def queue_upload(self, data: Any, buffer: TripleBuffer, *,
                     on_done: Optional[Callable[[Any, Optional[float]], None]] = None) -> OpId:
        """Copy ``data`` (host numpy array) into ``buffer``'s next FREE slot. Returns the op id.

        ``data`` may hold fewer elements than a slot (a short last batch).
        Pageable memory is staged, so ``data`` may be changed once this returns.
        ``on_done(op, duration_ms)`` is called when the op is found complete.
        """
        self._check()
        n = upload_source(data, buffer.dtype, buffer.size())
        if buffer.device is not self._device:
            raise TransferError("the buffer lives on another device than this coordinator")
        slot = buffer._take(FREE_I)
        if slot is None:
            raise BufferUnavailableError(
                f"no FREE slot to upload into (states: {buffer.get_states()}); download and "
                "advance() a slot first, or use a deeper buffer")
        stream = self._up
        try:
            op = self._begin(OpType.UPLOAD, stream)
            # Every op on a slot is ordered after the slot's previous one, so waiting
            # for the last covers every earlier reader (write-after-read).
            prior = self._inflight.get(slot.op)
            if prior is not None:
                stream.wait(prior.event, False)
            if op.start is not None:
                stream.record(op.start, False)
            dst = slot.full if n == slot.capacity else slot.full[:n]
            stream.copy_h2d(dst, data if data.ndim == 1 else data.reshape(-1))
        except BaseException:
            buffer._untake(slot, FREE_I)
            raise
        op.keep = slot.full
        op.on_done = on_done
        oid = self._commit(op, stream)
        op_slots = self._op_slots
        for old in slot.ops:
            op_slots.pop(old, None)
        slot.ops = [op.id]
        slot.valid, slot.op, slot.failed = n, op.id, None
        self._map_slots(op.id, (slot,))
        return oid

    def queue_compute(self, name: Any, deps: Iterable[int] = (), *, args: Optional[Sequence[Any]]
                      = None, extra: Optional[Sequence[Any]] = None,
                      config: Optional[LaunchConfig] = None,
                      outputs: Sequence[Any] = (),
                      on_done: Optional[Callable[[Any, Optional[float]], None]] = None) -> OpId:
        """Run kernel ``name`` after every op in ``deps``. Returns the op id.

        With no ``args``, the kernel gets the device arrays of the slots its
        dependencies touched (each once, in dependency order), then one array per
        ``outputs`` entry, then ``extra`` (default: the kernel's defaults). ``args``
        replaces that list entirely.

        ``outputs`` lists buffers (or ``(buffer, n)`` pairs) whose next FREE slot
        the kernel writes (``n`` elements, default the whole slot); the slot becomes
        PROCESSING, ready for :meth:`queue_download`.
        """
        self._check()
        kernel, prepared = self._kernel(name)
        if isinstance(deps, int):
            deps = (deps,)
        dep_ids = [self._resolve(d, InvalidDependencyError) for d in deps]
        slots: List[Slot] = []
        op_slots = self._op_slots
        for d in dep_ids:
            for r in op_slots.get(d, ()):
                s = r()
                if s is not None and s not in slots and (s.state is _UPLOADING
                                                         or s.state is _PROCESSING):
                    slots.append(s)
        pending = self._pending_uploads(slots) if slots else slots
        outs = self._output_slots(outputs) if outputs else ()
        if args is not None:
            arrays: Sequence[Any] = ()
            ext = tuple(args)
        else:
            arrays = ([s.array for s in slots] + [s.full[:n] for s, n in outs]
                      if kernel.uses_arrays else ())
            ext = tuple(extra) if extra is not None else kernel.defaults
        if config is None:
            config = kernel.config or self._default_config(len(arrays[0]) if arrays else 1)
        hazards = [o for s, _ in outs for o in s.ops] if outs else ()
        # keep every slot's ops chained: also wait for a slot's last op if no dep is it
        chain = [s.op for s in slots if s.op not in dep_ids]
        op = self._launch_op(self._compute, kernel, prepared, dep_ids + chain if chain
                             else dep_ids, hazards, arrays, ext, config)
        for s in pending:
            s.buffer._take(UPLOADING_I)
        for s, n in outs:
            if s.buffer._produce() is not s:  # checked free above; single-threaded use
                raise InvalidOperationError("output buffer changed while queueing")
            for old in s.ops:
                op_slots.pop(old, None)
            s.ops = []
            s.valid = n
            slots.append(s)
        op.keep = (arrays, ext)
        op.on_done = on_done
        oid = self._commit(op, self._compute)
        failed = self._error_root(op)
        for s in slots:
            s.op = op.id
            s.ops.append(op.id)
            if failed is not None and s.failed is None:
                s.failed = failed
        if slots:
            self._map_slots(op.id, slots)
        return oid

    def _default_config(self, n: int) -> LaunchConfig:
        cfg = self._configs.get(n)
        if cfg is None:
            if len(self._configs) > 256:
                self._configs.clear()
            cfg = self._configs[n] = LaunchConfig.for_elements(n)
        return cfg

    def _launch_op(self, stream: Any, kernel: Kernel, prepared: Any, waits: Iterable[int],
                   quiet_waits: Iterable[int], arrays: Sequence[Any], ext: Tuple[Any, ...],
                   config: LaunchConfig, timing: Optional[bool] = None) -> _Op:
        """Begin a compute op on ``stream``: waits, start record, launch. Not yet committed.

        ``waits`` (op ids) pass failures on (data dependencies); ``quiet_waits`` only
        order (write-after-read hazards). If a dependency is known to have failed,
        nothing is launched and the op fails with DependencyFailedError.
        """
        op = self._begin(OpType.COMPUTE, stream, kernel.name, timing)
        # after _begin, which may have retired (and so revealed) a failed dependency
        root = self._failed_root(waits)
        inflight = self._inflight  # looked up after _begin, which may retire ops
        for d in waits:
            dep = inflight.get(d)
            if dep is not None:
                stream.wait(dep.event)
        for d in quiet_waits:
            dep = inflight.get(d)
            if dep is not None:
                stream.wait(dep.event, False)
        if op.start is not None:
            stream.record(op.start, False)
        if root is not None:
            op.error = self._dependency_error(op, root)
            return op
        try:
            stream.launch(prepared, config, arrays, ext, op.id)
        except PrismGpuError:
            self._abandon(op)
            raise
        except Exception as exc:  # a callable run on the host at queue time (CUDA)
            self._any_failed = True
            op.error = KernelError(
                f"kernel {kernel.name!r} (op {op.id}) raised {type(exc).__name__}: {exc}",
                op_id=op.id, kernel=kernel.name)
            op.error.__cause__ = exc
        return op

    def _output_slots(self, outputs: Sequence[Any]) -> List[Tuple[Slot, int]]:
        outs: List[Tuple[Slot, int]] = []
        for entry in outputs:
            buf, n = entry if isinstance(entry, tuple) else (entry, None)
            if not isinstance(buf, TripleBuffer):
                raise TypeError(f"outputs takes TripleBuffers, got {type(buf).__name__}")
            if buf.device is not self._device:
                raise TransferError("an output buffer lives on another device")
            n = buf.size() if n is None else int(n)
            if not 1 <= n <= buf.size():
                raise TransferError(f"output length {n} does not fit a slot of {buf.size()}")
            slot = buf._peek(FREE_I)
            if slot is None or any(s is slot for s, _ in outs):
                raise BufferUnavailableError(
                    f"output buffer has no FREE slot (states: {buf.get_states()}); download "
                    "and advance() first")
            if buf._peek(UPLOADING_I) is not None:
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
            if s.buffer._peek(UPLOADING_I, k) is not s:
                older = s.buffer._peek(UPLOADING_I, 0)
                raise InvalidDependencyError(
                    f"slot {s.index} is computed on before the older upload in slot "
                    f"{older.index if older else '?'} of the same buffer; computes consume "
                    "uploads in ring order: queue a compute on the older upload first")
            ahead[id(s.buffer)] = k + 1
            pending.append(s)
        return pending

    def queue_download(self, buffer: TripleBuffer, dst: Any, *,
                       on_done: Optional[Callable[[Any, Optional[float]], None]] = None
                       ) -> OpId:
        """Copy ``buffer``'s oldest PROCESSING slot into host array ``dst``. Returns the op id.

        The copy waits on the GPU for every op on the slot. ``dst`` holds the data
        once :meth:`wait` or :meth:`poll` reports the op complete.
        """
        self._check()
        slot = buffer._peek(PROCESSING_I)
        if slot is None:
            raise BufferUnavailableError(
                f"no PROCESSING slot to download (states: {buffer.get_states()}); queue a "
                "compute on an upload first")
        view = download_destination(dst, buffer.dtype, slot.valid)
        stream = self._down
        op = self._begin(OpType.DOWNLOAD, stream)
        root = slot.failed
        if root is None and self._any_failed:
            root = self._root_of(slot.op)
        prior = self._inflight.get(slot.op)
        if prior is not None:
            stream.wait(prior.event)
        if op.start is not None:
            stream.record(op.start, False)
        if root is None:
            try:
                op.finish = stream.copy_d2h(view, slot.array)
            except BaseException:
                self._abandon(op)
                raise
        else:
            op.error = self._dependency_error(op, root)
        buffer._take(PROCESSING_I)
        op.keep = (slot.full, dst)
        op.on_done = on_done
        oid = self._commit(op, stream)
        slot.op = op.id
        slot.ops.append(op.id)
        self._map_slots(op.id, (slot,))
        return oid

    # completion ---------------------------------------------------------------
    def _complete(self, op: _Op) -> None:
        del self._inflight[op.id]
        ev = op.event
        if op.error is None:
            fault = ev.fault
            if fault is None:
                if op.finish is not None:
                    self._finish(op)
            else:
                exc, root = fault
                if root == op.id:
                    op.error = KernelError(
                        f"kernel {op.kernel!r} (op {op.id}) raised {type(exc).__name__}: {exc}",
                        op_id=op.id, kernel=op.kernel)
                    op.error.__cause__ = exc
                else:
                    op.error = self._dependency_error(op, root, exc)
        self._pool.append(ev)
        start = op.start
        if start is None:
            duration = None
        else:
            duration = op.end.elapsed_ms(start)
            self._tpool.append(start)
            self._tpool.append(op.end)
        if op.on_done is not None:
            op.on_done(op, duration)
        if op.error is not None:
            self._failed[op.id] = op.error
            self._any_failed = True
            root = self._error_root(op)
            for s in self._slots_of(op.id):
                if s.failed is None and op.id in s.ops:
                    s.failed = root
        reports = self._reports
        if len(reports) == reports.maxlen:
            self.dropped_reports += 1
        reports.append(CompletedOp(self._OpId(op.id), op.type, duration, op.error))
        op.keep = op.event = op.start = op.end = None

    def _finish(self, op: _Op) -> None:
        try:
            op.finish()
        except Exception as exc:  # noqa: BLE001 - reported as the op's error
            op.error = TransferError(f"finishing download op {op.id} failed: {exc}")
        op.finish = None

    def _harvest_lane(self, lane: Deque[_Op], upto: Optional[_Op] = None) -> None:
        """Complete the done ops at the head of ``lane`` (through ``upto``, known done).

        A lane is one stream, so its ops complete in order: when the newest is done
        all are, and otherwise the boundary is found by bisection, a few queries
        however many ops are in flight.
        """
        complete = self._complete
        if upto is not None:
            while lane:
                head = lane.popleft()
                complete(head)
                if head is upto:
                    return
            return
        if not lane or not lane[0].event.query():
            return
        if lane[-1].event.query():
            count = len(lane)
        else:
            lo, hi = 0, len(lane) - 1  # lane[lo] done, lane[hi] not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if lane[mid].event.query():
                    lo = mid
                else:
                    hi = mid
            count = hi
        for _ in range(count):
            complete(lane.popleft())

    def _harvest(self) -> None:
        for lane in self._lanes:
            if lane:
                self._harvest_lane(lane)

    def poll(self) -> List[CompletedOp]:
        """Ops completed since the last poll (never blocks)."""
        self._check()
        self._harvest()
        out = list(self._reports)
        self._reports.clear()
        return out

    def wait(self, op_id: int, timeout: Optional[float] = None) -> None:
        """Block until op ``op_id`` completes; raise its error if it failed.

        Raises :class:`SynchronizationError` if ``timeout`` seconds pass first.
        """
        self._check()
        oid = self._resolve(op_id, InvalidOperationError)
        op = self._inflight.get(oid)
        if op is not None:
            if not op.event.synchronize(timeout):
                raise SynchronizationError(
                    f"op {oid} ({op.type.value}) did not complete within {timeout} s")
            self._harvest_lane(op.lane, op)
        err = self._failed.get(oid)
        if err is not None:
            raise err

    def is_complete(self, op_id: int) -> bool:
        """True once ``op_id`` has completed (successfully or not); never blocks."""
        self._check()
        oid = self._resolve(op_id, InvalidOperationError)
        op = self._inflight.get(oid)
        if op is None:
            return True
        if op.event.query():
            self._harvest_lane(op.lane, op)
            return True
        return False

    def error(self, op_id: int) -> Optional[BaseException]:
        """The error of a completed op, or None."""
        self._check()
        return self._failed.get(self._resolve(op_id, InvalidOperationError))

    def synchronize_all(self) -> None:
        """Wait for every queued op. Op errors are reported by :meth:`wait` and :meth:`poll`."""
        self._check()
        for stream in self._streams:
            stream.synchronize()
        self._harvest()

    @property
    def in_flight(self) -> int:
        """Ops queued and not yet known complete."""
        return len(self._inflight)

    def statistics(self) -> Dict[str, int]:
        return {"issued": self._next, "in_flight": len(self._inflight),
                "failed": len(self._failed), "events_pooled": len(self._pool) + len(self._tpool),
                "unreported": len(self._reports), "dropped_reports": self.dropped_reports}

    # lifetime -----------------------------------------------------------------
    def close(self) -> None:
        """Wait for in-flight work, then free streams and events. Idempotent."""
        if self._closed:
            return
        try:
            for stream in self._streams:
                stream.synchronize()
            for lane in self._lanes:
                while lane:
                    self._complete(lane.popleft())
        finally:
            self._closed = True
            for stream in self._streams:
                stream.close()
            for ev in self._pool + self._tpool:
                close = getattr(ev, "close", None)
                if close is not None:
                    close()
            self._pool.clear()
            self._tpool.clear()
            self._kernels.clear()
            self._by_obj.clear()
            if self._owns_device:
                self._device.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "AsyncCoordinator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # a safety net; close() is the mechanism
        try:
            if not self._closed and not sys.is_finalizing():
                self.close()
        except Exception:  # noqa: BLE001
            pass


_LIVE: "weakref.WeakSet[AsyncCoordinator]" = weakref.WeakSet()


@atexit.register
def _close_live_coordinators() -> None:
    """Finish what coordinators left open still have queued, while their threads run."""
    for coord in list(_LIVE):
        try:
            coord.close()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
