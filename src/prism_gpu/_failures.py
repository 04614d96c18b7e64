"""An op's failure: its own, or a dependency's it did not run because of."""

from __future__ import annotations

import threading
from typing import Any, Optional

from ._errors import (DependencyFailedError, InvalidOperationError, KernelError, PrismGpuError,
                      TransferError)
from ._inflight import Op, Root
from ._ops import OpType

__all__ = ["root_of", "dependency_error", "own_error", "refuse_in_callback", "raisable",
           "KERNEL", "refuse_close"]


def raisable(err: BaseException) -> BaseException:
    """A kept failure, to raise again: a copy with the same class, message, attributes
    and cause. Raising the kept object itself would add the caller's frames to its
    traceback at every raise (a chain that grows, and keeps the caller's arrays alive
    as long as the failure is kept)."""
    try:  # not through __init__: some take keyword-only arguments args does not hold
        new = type(err).__new__(type(err), *err.args)
        new.__dict__.update(err.__dict__)
    except Exception:  # noqa: BLE001 - an exception type that cannot be rebuilt so
        return err.with_traceback(None)
    new.__cause__ = err.__cause__
    new.__suppress_context__ = err.__suppress_context__
    return new.with_traceback(None)


def root_of(op: Op) -> Root:
    """The root of failed op ``op``'s failure."""
    err = op.error
    if isinstance(err, DependencyFailedError):
        return err.root_op, err.root_error
    return op.id, err


def dependency_error(op: Op, root: Root, oid: Optional[int] = None) -> DependencyFailedError:
    """The error of ``op``, which did not run because of the failure ``root``."""
    root_id, root_err = root
    oid = op.id if oid is None else oid
    what = f"{op.type.value} op {oid}" + (f" ({op.name!r})" if op.name else "")
    return DependencyFailedError(
        f"{what} did not run: it depends on op {root_id}, which failed: {root_err}",
        op_id=oid, root_op=root_id, root_error=root_err)


def own_error(op: Op, exc: BaseException, oid: Optional[int] = None) -> PrismGpuError:
    """The error of ``op`` whose own work raised ``exc``."""
    oid = op.id if oid is None else oid
    if op.type is OpType.COMPUTE:
        err: PrismGpuError = KernelError(
            f"kernel {op.name!r} (op {oid}) raised {type(exc).__name__}: {exc}",
            op_id=oid, kernel=op.name)
    else:
        err = TransferError(f"{op.type.value} op {oid} failed: {type(exc).__name__}: {exc}")
        err.op_id = oid  # type: ignore[attr-defined]
    err.__cause__ = exc
    return err


def refuse_in_callback(where: Any = True) -> None:
    """An ``on_done`` callback, or a kernel running inside the queue call (a callable on
    CUDA, where ``where`` is KERNEL), tried to queue, wait or close: refused
    (re-entering the call that runs it would corrupt the lanes and op ids)."""
    if where is KERNEL:
        raise InvalidOperationError(
            "a kernel may not queue, wait for or close ops of its coordinator (a callable "
            "kernel runs inside queue_compute); queue further work after that call returns")
    raise InvalidOperationError(
        "an on_done callback may not queue, wait for or close ops (it runs while completed "
        "ops are being retired); record what it needs and act after the call that ran it")


KERNEL = "kernel"  # the engine's in_callback while a launch runs (a callable runs there)


def refuse_close(engine: Any) -> None:
    """Raise, before anything changes, if closing what runs on ``engine`` now would
    corrupt it (from its callback or kernel) or wait for itself (on a thread of the
    device's own: a CPU kernel)."""
    if engine.in_callback:
        refuse_in_callback(engine.in_callback)
    if engine.device.on_own_thread():
        raise InvalidOperationError("a kernel may not close what it runs on (its stream "
                                    "would be waited for from inside it)")


def refuse_other_thread(owner: int, what: str, closing: bool = False) -> None:
    """Raise unless called on thread ``owner``, which made ``what`` (not thread-safe);
    a close is allowed once that thread has ended (nothing can race it then)."""
    here = threading.get_ident()
    if here == owner or (closing and not thread_alive(owner)):
        return
    raise InvalidOperationError(
        f"{what} is not thread-safe and was called from a thread other than the one that "
        "made it; use it (and close it) there, or give each thread its own")


def thread_alive(ident: int) -> bool:
    return any(t.ident == ident for t in threading.enumerate())
