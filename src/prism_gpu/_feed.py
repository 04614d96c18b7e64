"""Feeding the device from an iterable: ordered results and a read-ahead contract.

Used by :func:`stream_map` and :meth:`PipelineStageManager.run`. The caller's
iterable is read on the calling thread (a Python iterator is not moved to
another thread); pageable batches are copied into pinned memory on worker
threads while earlier batches run on the device.
"""

from __future__ import annotations

import collections
from threading import get_ident
from typing import Any, Callable, Deque, Generator, Iterable, Iterator, NamedTuple, Optional

import numpy as np

from . import _trace
from ._copypool import Ticket
from ._errors import (DependencyFailedError, InvalidOperationError, KernelError,
                      PrismGpuError, TransferError)
from ._staging import Stager

__all__ = ["Pulled", "read_ahead", "batch_error", "check_batch"]


class Pulled(NamedTuple):
    """A batch taken from the iterable (its staging copy may still be running), or the
    error it gave, raised at its turn."""

    pos: int
    batch: Any
    staged: Any
    raw: Optional[np.ndarray]
    copies: Optional[Ticket]
    info: Any                         # what ``prepare`` made of the batch
    error: Optional[BaseException]
    from_iterable: bool = False       # the iterable's own error: raised as it is

    def wait_staged(self) -> None:
        if self.copies is not None:
            self.copies.wait()


def check_batch(batch: Any, pos: int) -> None:
    if not isinstance(batch, np.ndarray):
        raise TransferError(f"batch {pos} is a {type(batch).__name__}; batches must be "
                            "numpy arrays")
    if batch.dtype.hasobject:
        raise TransferError(f"batch {pos} has dtype {batch.dtype}; object arrays cannot go "
                            "to the device (convert to a numeric dtype)")
    if batch.size == 0:
        raise TransferError(f"batch {pos} is empty: there is nothing to transfer")
    if batch.itemsize == 0:
        raise TransferError(f"batch {pos} has dtype {batch.dtype!r}, whose elements hold no "
                            "bytes: there is nothing to transfer")


def batch_error(exc: BaseException, pos: int, what: str = "batch") -> BaseException:
    """``exc`` restated for batch ``pos``: a KernelError for failed kernels (with the
    op id and kernel name), the same error class otherwise. Carries ``batch_index``."""
    msg = f"{what} {pos} failed: {exc}"
    err: BaseException
    if isinstance(exc, (KernelError, DependencyFailedError)):
        err = KernelError(msg, op_id=getattr(exc, "op_id", None),
                          kernel=getattr(exc, "kernel", None))
    else:
        try:
            err = type(exc)(msg)
        except Exception:  # noqa: BLE001 - an exception type with another signature
            err = exc
    err.batch_index = pos  # type: ignore[attr-defined]
    return err


def _pull(it: Iterator[Any], pos: int, stager: Stager,
          prepare: Callable[[np.ndarray, int], Any]) -> Optional[Pulled]:
    try:
        batch = next(it)
    except StopIteration:
        return None
    except Exception as exc:  # noqa: BLE001 - the iterable's own error, at its turn
        return Pulled(pos, None, None, None, None, None, exc, True)
    return _take(batch, pos, stager, prepare)


def _take(batch: Any, pos: int, stager: Stager,
          prepare: Callable[[np.ndarray, int], Any]) -> Pulled:
    """Batch ``pos`` checked, prepared and (where it needs it) its staging started."""
    try:
        check_batch(batch, pos)
        info = prepare(batch, pos)
        if stager.needs_staging(batch):  # its pinned buffer may not be had, too
            staged, raw, copies = stager.start(batch)
            return Pulled(pos, batch, staged, raw, copies, info, None)
    except Exception as exc:  # noqa: BLE001 - raised at the batch's turn
        return Pulled(pos, None, None, None, None, None, exc)
    return Pulled(pos, batch, batch, None, None, info, None)


def read_ahead(batches: Iterable[Any], depth: int, prefetch: int, stager: Stager,
               prepare: Callable[[np.ndarray, int], Any],
               submit: Callable[[Pulled], Any],
               finish: Callable[[Any], Any], what: str = "batch",
               window: Optional[int] = None, max_bytes: Optional[int] = None,
               as_is: Optional[Callable[[np.ndarray, int], Any]] = None,
               moved: Optional[str] = None, lane: Any = None) -> Generator[Any, None, None]:
    """Results of ``finish(submit(batch))`` for every batch, in input order.

    Up to ``window`` batches (default ``depth + 1``) are submitted before the oldest
    result is waited for. Past ``depth + 1`` batches, no more is pulled while the
    batches pulled and not yet yielded hold ``max_bytes`` or more. The
    read-ahead contract: while result ``k`` is held by the consumer, batches
    up to ``k + depth + prefetch`` have been pulled, no more. A batch's error
    (from ``prepare``, ``submit`` or ``finish``) is raised at its turn, after
    every earlier result, with ``batch_index``; the iterable's own error is
    raised as it is, at its turn.

    ``as_is(batch, pos)``, where given, submits instead of ``submit`` the batches
    that need nothing done before: numpy arrays (not a subclass) that
    :func:`check_batch` passes and that need no staging (contiguous, page-locked).
    ``prepare`` is not called for those: give ``as_is`` only where it would make
    nothing of them. They are pulled, held and submitted when the others would be.

    ``moved``, where given: the message of the InvalidOperationError raised (as
    such, not as a batch's error) when the generator is resumed on another thread
    than the one that started it.

    ``lane``, where given: a :class:`DeviceLane` alone (not paced) whose results come
    from the pool, with ``submit``, ``finish`` and ``as_is`` its ``submit``, ``finish``
    and ``queue``. What ``as_is`` and ``finish`` do for a batch its input ring fits,
    outside a trace, is then done here, the same calls in the same order (a function
    call less each, the calls bound once; see :meth:`DeviceLane.as_is_calls`), except
    the coordinator's check before a wait where a queue call just made the same.
    """
    ahead: Deque[Any] = collections.deque()  # Pulled, or a batch as it is (as_is)
    pending: Deque[Any] = collections.deque()  # handles of batches yielded, yielded + 1, ...

    def done(pos: int, handle: Any) -> Any:
        try:
            return finish(handle)
        except PrismGpuError as exc:
            raise batch_error(exc, pos, what) from exc

    limit = depth + 1 if window is None else window
    held: Deque[int] = collections.deque()  # bytes of each batch pulled, not yet yielded
    held_bytes = 0
    cap = float("inf") if max_bytes is None else max_bytes
    it = iter(batches)
    reach = depth + prefetch  # pulled while pulled <= yielded + reach
    pinned = stager.page_locked if as_is is not None else None
    known, ranges = stager.known, stager.ranges  # page_locked's answers: the same, faster
    ndarray = np.ndarray
    owner = get_ident() if moved is not None else None
    pull_ahead, take_ahead, hold, unhold = ahead.append, ahead.popleft, held.append, \
        held.popleft
    pend, unpend = pending.append, pending.popleft
    fast = lane is not None
    calls: Any = lane.as_is_calls() if fast else (None,) * 11
    check, upload, compute, download, wait, wait_op, table, kernel, extra, results, \
        results_on = calls
    pulled = yielded = 0
    exhausted = queued = False
    try:
        while True:
            while not exhausted and pulled <= yielded + reach and (
                    held_bytes < cap or len(held) <= depth):
                if pinned is None:
                    entry = _pull(it, pulled, stager, prepare)
                    if entry is None:
                        exhausted = True
                        break
                else:
                    try:
                        batch = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    except Exception as exc:  # noqa: BLE001 - the iterable's own error
                        entry = Pulled(pulled, None, None, None, None, None, exc, True)
                    else:
                        # what check_batch passes and needs_staging says no to, as is
                        hit = known.get(id(batch))
                        if hit is not None and hit[0]() is batch \
                                and hit[1] is ranges.state and batch.flags.c_contiguous \
                                or type(batch) is ndarray and batch.flags.c_contiguous \
                                and batch.size and batch.itemsize \
                                and not batch.dtype.hasobject and pinned(batch):
                            pull_ahead(batch)
                            nbytes = batch.nbytes
                            del batch  # (held where it is queued, as long as need be)
                            hold(nbytes)
                            held_bytes += nbytes
                            pulled += 1
                            continue
                        entry = _take(batch, pulled, stager, prepare)
                        del batch
                pull_ahead(entry)
                # what the batch holds: its pinned staging buffer where it has one
                nbytes = getattr(entry.batch, "nbytes", 0) if entry.raw is None \
                    else entry.raw.nbytes  # a staging buffer: at least the batch
                hold(nbytes)
                held_bytes += nbytes
                pulled += 1
                if entry.error is not None:
                    exhausted = True
            # (submitting changes nothing the pulls above wait on: no pull in between)
            while ahead and len(pending) < limit:
                entry = take_ahead()  # batch pulled - len(ahead) - 1: ahead holds the next
                if type(entry) is ndarray:
                    try:
                        last = lane.in_ring if fast else None  # lane.queue(entry, pos):
                        if last is not None and last[0] is entry.dtype \
                                and last[1] >= entry.size and _trace.ACTIVE is None:
                            src = last[2]
                            up = upload(entry, src)
                            try:
                                comp = compute(kernel, [up], extra=extra)
                            except BaseException:  # the upload's slot back to FREE
                                src.get_process_buffer()
                                src.retire()
                                raise
                            result, target = results(results_on, entry.shape, entry.dtype,
                                                     entry.nbytes)
                            down = download(src, target)
                            src.advance()
                            pend((down, result, up, comp))
                            queued = True  # (see the wait below)
                            continue
                        pend(as_is(entry, pulled - len(ahead) - 1))  # type: ignore[misc]
                        continue
                    except Exception as exc:  # rejected batch: earlier results first
                        err: BaseException = exc
                        entry = None
                elif entry.error is None:
                    try:
                        pend(submit(entry))
                        continue
                    except Exception as exc:  # rejected batch: earlier results first
                        err = exc
                else:
                    err = entry.error
                pos = pulled - len(ahead) - 1
                while pending:
                    yield done(yielded, unpend())
                    if owner is not None and get_ident() != owner:
                        raise InvalidOperationError(moved)
                    yielded += 1
                if entry is not None and entry.from_iterable:
                    raise err
                raise batch_error(err, pos, what) from err
            if not pending:
                break
            handle = unpend()
            try:
                if fast and type(handle) is tuple:  # lane.finish(handle):
                    down, result, up, comp = handle
                    try:
                        # the coordinator's check, unless its queue calls made the same
                        # checks (its thread, it and its device open, no kernel of its
                        # running) since the iterable or the consumer last ran: only
                        # this generator's own calls ran since
                        if not queued:
                            check()
                        wait(down)
                        if table.failed_total and table.error(down, False) is not None:
                            wait_op(down)
                    except PrismGpuError:
                        wait_op(up)  # the first failure of the chain is the batch's error
                        wait_op(comp)
                        raise
                else:
                    result = finish(handle)
            except PrismGpuError as exc:
                raise batch_error(exc, yielded, what) from exc
            held_bytes -= unhold()
            yield result
            queued = False
            if owner is not None and get_ident() != owner:
                raise InvalidOperationError(moved)
            yielded += 1
    finally:
        ahead.clear()  # copies still running finish before the stager closes
