"""CUDA streams and events: cuda.core objects, driver calls on the hot paths."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, List, Optional, Sequence

import numpy as np

from ..._errors import InvalidOperationError
from ._driver import CURRENT, NATIVE, NOT_READY, bindings_memcpy, error, from_cuda_exception
from .._hostranges import host_address
from ._interop import foreign_contexts
from ._memory import REGISTERED, DeviceArray

# The driver calls of the hot path: native (one C call each) when built and loadable,
# else cuda.core and cuda.bindings. Copies return a CUresult as an int either way.
_memcpy = NATIVE.memcpy if NATIVE is not None else bindings_memcpy
_record = NATIVE.record if NATIVE is not None else None
_wait = NATIVE.wait if NATIVE is not None else None
_query = NATIVE.query if NATIVE is not None else None


class _EventCommon:
    """What both kinds of event do in Python (their fields: ``timing``, ``_ev``, the
    cuda.core event, ``_h``, its handle, ``_last``, the stream of the most recent record,
    ``_finish``, host work that record finishes, ``_err``, what that work raised)."""

    __slots__ = ()
    _ev: Any
    _h: int
    _finish: Optional[List[Callable[[], None]]]
    _err: Optional[BaseException]

    def query(self) -> bool:
        raise NotImplementedError

    def synchronize(self, timeout: Optional[float] = None) -> bool:
        if self.query():  # done already (the common case of a wait on an old op): one
            return True   # query, its host work run, rather than a blocking call
        if timeout is None:
            try:
                self._ev.sync()  # releases the GIL while it waits (checked on the GPU)
            except Exception as exc:  # noqa: BLE001 - CUDAError
                raise from_cuda_exception(exc, "waiting for an event") from exc
            if self._finish is not None:
                self._run_finishers()
            return True
        deadline = time.perf_counter() + timeout
        pause = 20e-6
        while not self.query():
            left = deadline - time.perf_counter()
            if left <= 0:
                return False
            time.sleep(min(pause, left))
            pause = min(pause * 2, 2e-3)
        return True

    def _run_finishers(self) -> None:
        work, self._finish = self._finish, None  # type: ignore[misc]
        for fn in work or ():
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - reported through error()
                if self._err is None:
                    self._err = exc  # type: ignore[misc]

    def elapsed_ms(self, start: "_EventCommon") -> float:
        try:
            return float(self._ev - start._ev)  # cuda.core's subtraction: checked in C
        except Exception as exc:  # noqa: BLE001 - CUDAError
            raise from_cuda_exception(exc, "reading event times") from exc

    def close(self) -> None:
        if self._ev is not None:
            self._h = 0  # type: ignore[misc]  # the native calls refuse it from now on
            self._ev.close()
            self._ev = None


class CudaEvent(_EventCommon):
    """A cuda.core event. Host work that a record finishes (the host side of a
    pageable download) runs when the record is found complete. Where the native calls
    are on, :class:`NativeCudaEvent` (its hot methods in C) is used instead."""

    __slots__ = ("timing", "_ev", "_h", "_last", "_finish", "_err", "__weakref__")

    def __init__(self, ev: Any, timing: bool) -> None:
        self._ev = ev
        self._h = int(ev.handle)
        self.timing = timing
        self._last: Any = None  # the stream of the most recent record
        self._finish: Optional[List[Callable[[], None]]] = None
        self._err: Optional[BaseException] = None

    def query(self) -> bool:
        if _query is not None:
            r = _query(self._h)
            if r == 0:
                done = True
            elif r == NOT_READY:
                done = False
            elif not self._h:
                raise InvalidOperationError("querying a closed event")
            else:  # a sticky error: a fault of earlier work
                raise error(r, "querying an event")
        else:
            if self._ev is None:
                raise InvalidOperationError("querying a closed event")
            # cuda.core's checks run in C: about twice as fast as a cuda.bindings call
            try:
                done = self._ev.is_done
            except Exception as exc:  # noqa: BLE001 - CUDAError: a sticky error
                raise from_cuda_exception(exc, "querying an event") from exc
        if done and self._finish is not None:
            self._run_finishers()
        return done

    def error(self) -> Optional[BaseException]:
        """Called once the record is known complete: finishes its host work and
        returns what failed there (device faults are sticky errors raised by
        query and synchronize instead)."""
        if self._finish is not None:
            self._run_finishers()
        return self._err


class _StreamCommon:
    """What both kinds of stream do in Python (their fields: ``_device``, ``_s``, the
    cuda.core stream, ``_h``, its handle, ``live_handle``, the handle work is queued on,
    0 once closed (refused then), ``priority``, ``_interop``, ``_pending``, host work for
    the next record, ``_closed``)."""

    _device: Any
    _s: Any
    _h: int
    live_handle: int
    _interop: Optional[tuple]
    _pending: List[Callable[[], None]]
    _closed: bool

    def record(self, event: Any, *, stamp: bool = False) -> None:
        raise NotImplementedError

    @property
    def handle(self) -> int:
        if self._closed:  # a freed handle: another library would queue work on it
            raise InvalidOperationError("this stream is closed: it has no handle")
        return self._h

    def __cuda_stream__(self) -> tuple:
        return (0, self.handle)

    def _refuse_closed(self, what: str) -> None:
        raise InvalidOperationError(f"{what} on a closed stream")

    # copies of pageable memory: through a pinned staging buffer ----------------------
    def _copy_h2d_staged(self, dst: DeviceArray, src: np.ndarray, nbytes: int) -> None:
        """Never hand pageable memory to an async copy: stage it, so the caller may
        change ``src`` as soon as this returns."""
        dev = self._device
        cls, stage = dev.staging.take(nbytes)
        np.copyto(stage[:nbytes].view(src.dtype).reshape(src.shape), src)
        err = _memcpy(dst.ptr, host_address(stage), nbytes, self.live_handle)
        if err:
            dev.staging.give_back(cls, stage)
            raise self.error_of(err, "host-to-device copy")
        try:
            ev = dev.create_event(False)
            self.record(ev)
        except BaseException:
            # the copy is queued but nothing marks its end: wait for it, then give back
            try:
                self.synchronize()
            finally:
                dev.staging.give_back(cls, stage)
            raise
        dev.staging.give_back_after(cls, stage, ev)

    def _copy_d2h_staged(self, dst: np.ndarray, src: DeviceArray, nbytes: int) -> None:
        dev = self._device
        cls, stage = dev.staging.take(nbytes)
        err = _memcpy(host_address(stage), src.ptr, nbytes, self.live_handle)
        if err:
            dev.staging.give_back(cls, stage)
            raise self.error_of(err, "device-to-host copy")

        def finish() -> None:
            try:
                np.copyto(dst, stage[:nbytes].view(dst.dtype).reshape(dst.shape))
            finally:
                dev.staging.give_back(cls, stage)
        # the host half runs once the next record here is found complete
        self._pending.append(finish)

    def copy_d2d(self, dst: DeviceArray, src: DeviceArray) -> None:
        if self._closed:
            self._refuse_closed("device-to-device copy")
        self._device._current()
        err = _memcpy(dst.ptr, src.ptr, src.nbytes, self.live_handle)
        if err:
            raise self.error_of(err, "device-to-device copy")

    def error_of(self, err: int, what: str) -> Exception:
        """The error for CUresult ``err`` of ``what`` queued here."""
        if self._closed:
            return InvalidOperationError(f"{what} on a closed stream")
        return error(err, what)

    def interop_contexts(self, modules: dict) -> Iterable[Any]:
        """Context managers making this stream current in CuPy / PyTorch, if imported.

        Made once per stream (and again only when CuPy or PyTorch is imported later)
        and reused: a callable kernel enters them on every launch.
        """
        if self._closed:
            self._refuse_closed("making a stream current in CuPy or PyTorch")
        key = (modules.get("cupy"), modules.get("torch"))
        cached = self._interop
        if cached is None or cached[0] != key:
            cached = self._interop = (key, foreign_contexts(self, self._h, self._device.ordinal,
                                                            *key))
        return cached[1]

    def _interop_enter(self, modules: dict) -> Iterable[Any]:
        return self.interop_contexts(modules)

    def synchronize(self) -> None:
        try:
            self._s.sync()
        except Exception as exc:  # noqa: BLE001 - CUDAError
            raise from_cuda_exception(exc, "stream synchronize") from exc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.live_handle = 0  # work queued from now on is refused
        self._interop = None  # CuPy and PyTorch views of the freed stream
        try:
            self._s.sync()
        finally:
            self._s.close()


class CudaStream(_StreamCommon):
    """A non-blocking CUDA stream. Implements ``__cuda_stream__`` for CuPy, PyTorch, Numba.
    Where the native calls are on, :class:`NativeCudaStream` (its hot methods in C, the
    same statements) is used instead."""

    def __init__(self, device: Any, stream: Any, priority: int = 0) -> None:
        self._device = device
        self._s = stream
        self._h = int(stream.handle)
        self.live_handle = self._h
        self.priority = priority
        self._interop = None
        self._pending = []
        self._closed = False

    def copy_h2d(self, dst: DeviceArray, src: np.ndarray) -> None:
        if self._closed:
            self._refuse_closed("host-to-device copy")
        self._device._current()
        nbytes = src.nbytes
        ptr, pinned = self._device.host_info(src)
        if not pinned:
            return self._copy_h2d_staged(dst, src, nbytes)
        err = _memcpy(dst.ptr, ptr, nbytes, self.live_handle)
        if err:
            raise self.error_of(err, "host-to-device copy")

    def copy_d2h(self, dst: np.ndarray, src: DeviceArray) -> None:
        if self._closed:
            self._refuse_closed("device-to-host copy")
        self._device._current()
        nbytes = dst.nbytes
        ptr, pinned = self._device.host_info(dst)
        if not pinned:
            return self._copy_d2h_staged(dst, src, nbytes)
        err = _memcpy(ptr, src.ptr, nbytes, self.live_handle)
        if err:
            raise self.error_of(err, "device-to-host copy")

    def launch(self, kernel: Any, config: Any, arrays: Sequence[Any], extra: Sequence[Any]
               ) -> None:
        if self._closed:  # a callable would run CuPy or PyTorch on the freed stream
            self._refuse_closed(f"launching kernel {kernel.name!r}")
        self._device._current()
        kernel.launch(self, config, arrays, extra)

    def record(self, event: Any, *, stamp: bool = False) -> None:
        if self._closed:
            self._refuse_closed("recording an event")
        if not event._h:  # cuda.core would record a new event instead, and succeed
            raise InvalidOperationError("recording a closed event")
        self._device._current()
        if _record is not None:
            err = _record(event._h, self.live_handle)
            if err:
                raise self.error_of(err, "recording an event")
        else:
            try:
                self._s.record(event._ev)
            except Exception as exc:  # noqa: BLE001 - CUDAError
                raise from_cuda_exception(exc, "recording an event") from exc
        event._last = self
        event._err = None
        if self._pending and not stamp:
            event._finish, self._pending = self._pending, []

    def wait(self, event: Any, *, propagate: bool = True) -> None:
        if self._closed:
            self._refuse_closed("stream wait on an event")
        if not event._h:
            raise InvalidOperationError("stream wait on a closed event")
        self._device._current()
        if event._last is self:
            return  # stream order already puts this after that record
        if _wait is not None:
            err = _wait(self.live_handle, event._h)
            if err:
                raise self.error_of(err, "stream wait on an event")
            return
        try:
            self._s.wait(event._ev)
        except Exception as exc:  # noqa: BLE001 - CUDAError
            raise from_cuda_exception(exc, "stream wait on an event") from exc


# The event and stream types the device makes: with the native calls on, their hot
# methods (query, error; record, wait, copies of pinned memory, launch) are C, the same
# statements as CudaEvent's and CudaStream's (PRISM_GPU_NATIVE_DRIVER=0 picks those).
EVENT: Any = CudaEvent
STREAM: Any = CudaStream
if NATIVE is not None:
    # (the copies keep the device's host_info answers, as PinnedAllocator.host_info does,
    # until a registration of host memory changes)
    NATIVE.bind(InvalidOperationError, CURRENT, error, REGISTERED)

    class NativeCudaEvent(NATIVE.Event, _EventCommon):  # type: ignore[misc, name-defined]
        __slots__ = ()

    class NativeCudaStream(NATIVE.Stream, _StreamCommon):  # type: ignore[misc, name-defined]
        def __init__(self, device: Any, stream: Any, priority: int = 0) -> None:
            super().__init__(device, int(stream.handle))
            self._s = stream
            self._h = int(stream.handle)
            self.priority = priority
            self._interop = None

    EVENT, STREAM = NativeCudaEvent, NativeCudaStream
