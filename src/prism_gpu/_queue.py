"""The coordinator's queue calls, its hot path: upload, compute and download ops.

:class:`PyQueueCore` is the reference, in Python. ``_ccore`` (C, where built) does the
common cases (no sync mode, no explicit ``args``/``config``/``outputs``,
``extra`` a tuple of values, numpy arrays) statement for statement, and hands everything
else to this reference; the test suite runs against both. :class:`QueueCore` is the one in use,
the base of :class:`prism_gpu.AsyncCoordinator`, which holds the state.
"""

from __future__ import annotations

import weakref

from threading import get_ident
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np

from . import _core, _sync
from ._buffers import FREE_I, PROCESSING_I, UPLOADING_I, TripleBuffer
from ._config import LaunchConfig
from ._devarray import DeviceArray, backend_values
from ._args import sequence_arg
from ._engine import D2H, H2D, LAUNCH, Engine, Lane
from ._errors import BufferUnavailableError, TransferError
from ._failures import root_of
from ._ops import CompletedOp, OpId, OpType
from ._optable import EngineCallback, OpTable
from ._kernels import Kernel
from ._registry import KernelRegistry
from ._slotmap import SlotMap, output_slots, pending_uploads
from ._sync import sync_mode
from ._validate import download_destination, upload_source

__all__ = ["PyQueueCore", "QueueCore"]

_UPLOAD, _COMPUTE, _DOWNLOAD = OpType.UPLOAD, OpType.COMPUTE, OpType.DOWNLOAD
OnDone = Callable[[CompletedOp, Optional[float]], None]


class PyQueueCore:
    """The queue calls; the state is the coordinator's."""

    _owner: int
    _engine: Engine
    _device: Any
    _table: OpTable
    _kernels: KernelRegistry
    _slots: SlotMap
    _up: Lane
    _compute: Lane
    _down: Lane
    _configs: Dict[int, LaunchConfig]
    # the coordinator's
    _check_slow: Callable[[], None]
    _settle: Callable[[int], None]
    _default_config: Callable[[int], LaunchConfig]

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
        done = self._table.reporter(on_done) if on_done is not None else None
        slot = buffer.take(FREE_I)
        if slot is None:
            raise BufferUnavailableError(
                f"no FREE slot to upload into (states: {buffer.get_states()}); download and "
                "advance() a slot first, or use a deeper buffer")
        try:
            view = slot.head(n)  # (closed by another thread since the take: refused)
            op = self._engine.submit(
                self._up, _UPLOAD, None, (), slot.write_hazards(), H2D, view,
                data if data.ndim == 1 else data.reshape(-1), keep=view, on_done=done)
        except BaseException:
            buffer.untake(slot, FREE_I)
            raise
        self._slots.filled(slot, op, n)
        if sync_mode():
            self._settle(op.id)
        return self._table.id_type(op.id)

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
        dep_ids = self._table.resolve_deps(deps)
        if config is not None and type(config) is not LaunchConfig \
                and not isinstance(config, LaunchConfig):
            raise TypeError(f"config must be a prism_gpu.LaunchConfig or None, got "
                            f"{type(config).__name__}")
        if extra is not None and type(extra) is not tuple:
            extra = sequence_arg(extra, "extra")
        done = self._table.reporter(on_done) if on_done is not None else None
        slots = self._slots.data_slots(dep_ids) if dep_ids else []
        pending = pending_uploads(slots) if slots else slots
        outs = output_slots(outputs, self._device) if outputs else ()
        if args is not None:
            arrays: Sequence[Any] = ()
            ext = backend_values(sequence_arg(args, "args") or (), self._device)
        else:
            if not kernel.uses_arrays:
                arrays = ()
            elif outs:
                arrays = [s.array for s in slots] + [s.head(n) for s, n in outs]
            else:
                arrays = [s.array for s in slots]
            ext = backend_values(extra, self._device) if extra is not None else kernel.defaults
        if kernel.check is not None:
            kernel.check(ext)
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
                root = self._table.root_pair(i)
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
            failed = root_of(op)
        for s in slots:
            s.updated(op, failed)
        if outs:
            for s, n in outs:
                self._slots.filled(s, op, n)
                if failed is not None:
                    s.failed = failed
            self._slots.touched(oid, slots + [s for s, _ in outs])
        elif slots:
            self._slots.touched(oid, slots)
        if sync_mode():
            self._settle(oid)
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
        done = self._table.reporter(on_done) if on_done is not None else None
        w, src = slot.writer, slot.array
        op = self._engine.submit(self._down, _DOWNLOAD, None, (w,) if w is not None else (),
                                 (), D2H, view, src, keep=(src, dst), on_done=done,
                                 root=slot.failed)
        buffer.take(PROCESSING_I)
        slot.read(op)
        self._slots.touched(op.id, (slot,))
        if sync_mode():
            self._settle(op.id)
        return self._table.id_type(op.id)


def _compiled() -> Any:
    c = _core.compiled_module()
    if c is not None:
        c.setup_queue({"reference": PyQueueCore, "TripleBuffer": TripleBuffer,
                       "ndarray": np.ndarray, "sync": _sync, "pending_uploads": pending_uploads,
                       "UPLOAD": _UPLOAD, "COMPUTE": _COMPUTE, "DOWNLOAD": _DOWNLOAD,
                       "DeviceArray": DeviceArray, "OpTable": OpTable,
                       "EngineCallback": EngineCallback,
                       "WeakKeyDictionary": weakref.WeakKeyDictionary, "Kernel": Kernel})
    return c


_C = _compiled()
if TYPE_CHECKING:
    QueueCore = PyQueueCore
else:
    QueueCore = _C.QueueCore if _C is not None else PyQueueCore
