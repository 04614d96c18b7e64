"""A CUDA stream made current in CuPy and PyTorch: the context managers a callable kernel
(and ``pg.interop.use_stream``) enters, made once per stream and reused on every launch."""

from __future__ import annotations

import threading
from typing import Any, List, Optional, Tuple


class TorchCurrent:
    """PyTorch's current stream set to ``stream`` for a ``with`` block, then restored:
    what ``torch.cuda.stream`` does (the stream's device made current meanwhile, the
    previous streams of both devices put back), from one reusable object: building a
    ``torch.cuda.stream`` per launch cost more than the switch itself. The streams are
    read and set as torch's own ``current_stream``/``set_stream`` do, without making a
    Python stream object per read (torch's calls themselves where those are missing).
    Re-entrant, and per thread (torch's current streams are): nested blocks restore in
    order, blocks of other threads at the same time keep their own saved streams."""

    __slots__ = ("_cuda", "_stream", "_ordinal", "_local", "_get", "_set", "_mine")

    def __init__(self, torch: Any, stream: Any, ordinal: int) -> None:
        self._cuda = torch.cuda
        self._stream = stream
        self._ordinal = ordinal
        self._local = threading.local()  # .saved: this thread's stack of streams to restore
        self._mine = (stream.stream_id, stream.device_index, stream.device_type)
        self._get, self._set = _raw_stream_calls(torch, ordinal)

    def _current(self, device: int) -> Any:
        if self._get is not None:
            return self._get(device)
        return self._cuda.current_stream(device)

    def _make_current(self, stream: Any) -> None:
        if self._set is not None:
            self._set(stream_id=stream[0], device_index=stream[1], device_type=stream[2])
        else:
            self._cuda.set_stream(stream)

    def __enter__(self) -> Any:
        here = self._cuda.current_device()
        mine = self._current(self._ordinal)
        other = self._current(here) if here != self._ordinal else None
        # also makes the stream's device current
        self._make_current(self._mine if self._set is not None else self._stream)
        saved: Optional[List[Tuple[Any, Optional[Any]]]] = getattr(self._local, "saved", None)
        if saved is None:
            saved = self._local.saved = []
        saved.append((mine, other))
        return self._stream

    def __exit__(self, *exc: Any) -> None:
        mine, other = self._local.saved.pop()
        try:
            self._make_current(mine)
        finally:
            if other is not None:
                self._make_current(other)  # and the device that was current before


def _raw_stream_calls(torch: Any, ordinal: int) -> Tuple[Any, Any]:
    """torch's own reads and sets of a device's current stream as (id, device, type)
    triples, if this torch has them and they answer as expected; else (None, None)."""
    get = getattr(torch._C, "_cuda_getCurrentStream", None)
    put = getattr(torch._C, "_cuda_setStream", None)
    if get is None or put is None:
        return None, None
    try:
        now = get(ordinal)
        if not (isinstance(now, tuple) and len(now) == 3):
            return None, None
        here = torch.cuda.current_device()
        put(stream_id=now[0], device_index=now[1], device_type=now[2])  # no change
        if here != ordinal:  # the set made ``ordinal`` current: put that back too
            back = get(here)
            put(stream_id=back[0], device_index=back[1], device_type=back[2])
    except Exception:  # noqa: BLE001 - another torch: its public calls then
        return None, None
    return get, put


def foreign_contexts(stream: Any, handle: int, ordinal: int, cupy: Any, torch: Any
                     ) -> Tuple[Any, ...]:
    """The context managers making CUDA stream ``handle`` (``stream``, a prism-gpu stream
    on device ``ordinal``) current in the imported ones of CuPy and PyTorch, in entry
    order."""
    out: List[Any] = []
    if cupy is not None:
        device = cupy.cuda.Device(ordinal)
        with device:
            from_external = getattr(cupy.cuda.Stream, "from_external", None)
            cp_stream = (from_external(stream) if from_external is not None
                         else cupy.cuda.ExternalStream(handle))
        out.append(device)     # CuPy's current device: this stream's
        out.append(cp_stream)  # a CuPy stream is its own (re-entrant) context manager
    if torch is not None and torch.cuda.is_available():
        out.append(TorchCurrent(torch, torch.cuda.ExternalStream(handle, device=ordinal),
                                ordinal))
    return tuple(out)


def leave(entered: List[Any], failed: Optional[BaseException]) -> None:
    """Leave every stream switch ``entered``, the last first, even if one fails to. The
    kernel's own error ``failed`` stays the one raised (leaving failures become notes on
    it); else the first leaving failure is raised, with notes of the others."""
    errors: List[BaseException] = []
    for ctx in reversed(entered):
        try:
            ctx.__exit__(None, None, None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    if not errors:
        return
    first = failed if failed is not None else errors[0]
    for other in errors:
        if other is not first:
            first.add_note(f"also, restoring the CuPy/PyTorch streams failed: {other!r}")
    if failed is None:
        raise first
