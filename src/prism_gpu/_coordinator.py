"""AsyncCoordinator: upload, compute and download ops over three streams. A thin client
of the core (op table, engine, kernels, rings with their hazards): checks, then queues."""

from __future__ import annotations

import sys
from threading import get_ident
from typing import Any, Callable, Dict, List, Optional, Tuple

from ._args import LIVE as _LIVE, check_timeout, int_arg, resolve_device
from ._config import LaunchConfig
from ._engine import Engine
from ._failures import KERNEL, raisable, refuse_in_callback, thread_alive
from ._errors import (InvalidOperationError,
                      SynchronizationError)
from ._kernels import Kernel
from ._ops import CompletedOp, CoordinatorStatistics, OpType
from ._optable import OpTable, raise_failures
from ._queue import QueueCore
from ._registry import KernelRegistry
from ._slotmap import SlotMap

__all__ = ["AsyncCoordinator"]

_UPLOAD, _COMPUTE, _DOWNLOAD = OpType.UPLOAD, OpType.COMPUTE, OpType.DOWNLOAD
OnDone = Callable[[CompletedOp, Optional[float]], None]


class AsyncCoordinator(QueueCore):
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
        max_in_flight = int_arg(max_in_flight, "max_in_flight", 1)
        report_backlog = int_arg(report_backlog, "report_backlog", 1)
        self._device, self._owns_device = resolve_device(device)
        self._owner = get_ident()
        self._table = OpTable(report_backlog)
        self._engine = Engine(self._device, self._table, max_in_flight=max_in_flight,
                              timing=bool(timing))
        self._kernels = KernelRegistry(self._device.prepare_kernel)
        self._configs: Dict[int, LaunchConfig] = {}
        # op id -> the slots it touched (weakly: dropped buffers are not kept alive);
        # data flows along dependencies. An id leaves when its slot is refilled.
        self._slots = SlotMap()  # where each op's data lives
        self._up = self._engine.lane("upload")
        self._compute = self._engine.lane("compute")
        self._down = self._engine.lane("download")
        _LIVE.add(self)  # closed at interpreter exit if left open

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

    def has_kernel(self, name: str) -> bool:
        """Whether ``name`` is a kernel registered here, ready to queue (a built-in counts
        once it was used). Never raises; :meth:`resolve_kernel` says why a name is not."""
        return self._kernels.prepared(name)

    def check(self) -> None:
        """Raise unless this coordinator may be used now, here (not in one of its kernels)."""
        if get_ident() != self._owner or self._engine.closed or self._device.closed \
                or self._engine.in_callback is KERNEL:
            self._check_slow()
            refuse_in_callback(KERNEL)

    def _check_slow(self) -> None:
        self._engine.check_open()
        if get_ident() != self._owner:
            raise InvalidOperationError(
                "AsyncCoordinator is not thread-safe and was called from a thread other than "
                "the one that created it; give each thread its own coordinator")

    def _settle(self, oid: int) -> None:
        """Sync mode: wait for op ``oid`` and raise its error here, at the queue call."""
        self._engine.wait(oid)
        err = self._table.error(oid)
        if err is not None:
            raise raisable(err)

    # checks and slot bookkeeping -----------------------------------------------
    def _default_config(self, n: int) -> LaunchConfig:
        cfg = self._configs.get(n)
        if cfg is None:
            if len(self._configs) > 256:
                self._configs.clear()
            cfg = self._configs[n] = LaunchConfig.for_elements(n)
        return cfg

    # completion -----------------------------------------------------------------
    def poll(self) -> List[CompletedOp]:
        """Ops completed since the last poll (never blocks)."""
        self.check()
        self._engine.harvest()
        self._engine.raise_callback_errors()  # before the reports are taken: kept for the next
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
            raise raisable(err)
        self._engine.raise_callback_errors()

    def is_complete(self, op_id: int) -> bool:
        """True once ``op_id`` has completed (successfully or not); never blocks."""
        self.check()
        done = self._engine.is_done(self._table.resolve(op_id, InvalidOperationError))
        self._engine.raise_callback_errors()
        return done

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
        self._engine.raise_callback_errors()

    @property
    def in_flight(self) -> int:
        """Ops queued and not yet known complete."""
        return len(self._engine.inflight)

    dropped_reports = property(lambda self: self._table.dropped_reports)

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
        no call has reported yet. Idempotent. Not from another thread, nor a callback."""
        if not self.closed and get_ident() != self._owner and thread_alive(self._owner):
            self._check_slow()  # another live thread's call: refused (a callback's: below)
        raise_failures(self.close_collecting(), "close")

    def close_collecting(self) -> List[BaseException]:
        """Close like :meth:`close`, returning the unreported failures (for owners)."""
        eng = self._engine
        if eng.closed:
            return []
        if eng.in_callback:  # from its callback or kernel: refused, nothing changed
            refuse_in_callback(eng.in_callback)
        errors: List[BaseException] = []
        try:
            eng.close(wait=not sys.is_finalizing())
            errors = self._table.take_unobserved() + eng.take_callback_errors()
        finally:
            self._kernels.clear()
            self._slots.clear()
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
