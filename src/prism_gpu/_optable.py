"""The op table: op ids, completion reports and failures, with their observation.

Plain data, no backend. One table per coordinator; every client (coordinator,
pipeline, stream_map, triple_buffered_step) issues ids from it through the
engine. A failure is *observed* once a call reported it to the user (``wait``,
``poll``, ``error``, a raise); unobserved failures are raised, once, by
:meth:`take_unobserved` callers (``synchronize_all``, leaving a ``with`` block).
"""

from __future__ import annotations

import collections
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

from ._errors import DependencyFailedError, InvalidDependencyError, PrismGpuError
from ._ops import CompletedOp, OpId, id_type
from ._tablecore import TableCore

__all__ = ["OpTable", "EngineCallback"]


class EngineCallback:
    """A base for the library's own completion callbacks (not users'): an ``on_done`` of
    this kind is given to the engine as it is and called with the engine's op and its
    time, ``(op, ms)`` (``op.id``, ``op.type``, ``op.error``), with no report built."""

    __slots__ = ()

    def __call__(self, op: Any, ms: Optional[float]) -> None:
        raise NotImplementedError


def scrub(exc: BaseException) -> None:
    """Drop the frame locals an exception's traceback holds (arrays, buffers), keeping
    the traceback printable: a kept failure must not keep the program's memory alive."""
    seen = 0
    while exc is not None and seen < 8:
        if exc.__traceback__ is not None:
            traceback.clear_frames(exc.__traceback__)  # skips frames still running
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1


class OpTable(TableCore):
    """Ids, reports and failures of one coordinator's ops.

    Parameters
    ----------
    report_backlog:
        Completion reports kept for ``poll``; older unreported ones are dropped
        and counted, so a program that never polls stays bounded.
    keep_failures:
        Failures kept after they were observed (so ``wait``/``error`` on an old
        failed id still answer); the oldest observed ones are forgotten first. With none
        observed, the oldest unobserved ones are dropped too, and the next raise of
        unobserved failures says how many.
    """

    def __init__(self, report_backlog: int = 16384, keep_failures: int = 4096) -> None:
        if not 1 <= int(report_backlog) <= 1 << 31:
            raise ValueError(f"report_backlog must be between 1 and 2**31, got {report_backlog}")
        self._table_init(int(report_backlog), id_type())
        self._failed: Dict[int, BaseException] = {}       # op id -> error (bounded)
        self._unobserved: Dict[int, None] = {}            # ordered set of op ids
        self._keep = int(keep_failures)
        self.forgotten_failures = 0
        self.dropped_unobserved = 0  # unobserved failures past keep_failures, not yet told
        # ids of failures dropped unobserved -> their error's type (bounded: a wait on one
        # still raises; past 4x keep_failures the oldest are forgotten for good)
        self._lost: "collections.OrderedDict[int, type]" = collections.OrderedDict()

    # ids (``next`` is the next id; the engine issues them as it queues ops) --------

    def resolve(self, op_id: object, error: type) -> int:
        """``op_id`` as a plain int issued here, or ``error`` saying why not."""
        t = type(op_id)
        if t is int and 0 <= op_id < self.next:  # type: ignore[operator]
            return op_id  # type: ignore[return-value]
        if t is self.id_type and 0 <= op_id < self.next:  # type: ignore[operator]
            return int(op_id)  # type: ignore[call-overload]  # a plain int: messages name it
        if isinstance(op_id, bool) or not hasattr(op_id, "__index__"):
            raise TypeError(f"op ids are ints, got {type(op_id).__name__}")
        if isinstance(op_id, OpId) and type(op_id) is not self.id_type:
            raise error(f"op {int(op_id)} was issued by another coordinator")
        oid = op_id.__index__()  # type: ignore[attr-defined]
        if not 0 <= oid < self.next:
            raise error(f"op {oid} was never issued by this coordinator "
                        f"(ids issued so far: 0..{self.next - 1})")
        return oid

    def _resolve_deps(self, deps: Any) -> List[int]:
        """:meth:`resolve_deps` past its common case (one id of this table in a list)."""
        if hasattr(deps, "__index__") and not isinstance(deps, bool):
            deps = (deps,)
        elif isinstance(deps, (str, bytes)) or not hasattr(deps, "__iter__"):
            raise TypeError(f"deps must be op ids (an int or an iterable of ints), got "
                            f"{type(deps).__name__}")
        return [self.resolve(d, InvalidDependencyError) for d in deps]

    def reporter(self, on_done: Any) -> Optional[Callable[[Any, Optional[float]], None]]:
        """An engine callback giving ``on_done`` the op's :class:`CompletedOp` and time."""
        if on_done is None:
            return None
        if isinstance(on_done, EngineCallback):
            return on_done
        if not callable(on_done):
            raise TypeError(f"on_done must be callable, got {type(on_done).__name__}")
        id_type = self.id_type

        def report(op: Any, ms: Optional[float]) -> None:
            on_done(CompletedOp(id_type(op.id), op.type, ms, op.error), ms)
        return report

    # completion -----------------------------------------------------------------
    def _failed_op(self, oid: int, error: BaseException) -> None:
        """Op ``oid`` failed (its report is kept already): its error kept, scrubbed."""
        scrub(error)
        self.failed_total += 1
        self._failed[oid] = error
        self._unobserved[oid] = None
        if len(self._failed) > self._keep:
            self._forget()

    def _forget(self) -> None:
        """Down to three quarters of ``keep_failures`` (so a pass comes once per quarter:
        constant time per failure): the oldest observed failures first, then, if the
        unobserved ones alone are too many, the oldest of those, counted so that the
        next raise says how many were dropped."""
        failed, unobserved = self._failed, self._unobserved
        excess = len(failed) - (self._keep - self._keep // 4)
        for oid in [o for o in failed if o not in unobserved][:max(0, excess)]:
            del failed[oid]
            self.forgotten_failures += 1
        excess = len(failed) - (self._keep - self._keep // 4)
        lost = self._lost
        for oid in list(failed)[:max(0, excess)]:  # unobserved, every one
            lost[oid] = type(failed.pop(oid))
            del unobserved[oid]
            self.forgotten_failures += 1
            self.dropped_unobserved += 1
        while len(lost) > 4 * self._keep:
            lost.popitem(last=False)

    def error(self, oid: int, observe: bool = True) -> Optional[BaseException]:
        err = self._failed.get(oid)
        if err is None:
            return self._lost_error(oid) if self._lost and oid in self._lost else None
        if observe:
            self._observe(oid, err)
        return err

    def _lost_error(self, oid: int) -> BaseException:
        """A failure dropped unobserved: said as such, of its error's type where it can."""
        msg = (f"op {oid} failed; its error was not kept: more than {self._keep} failed ops "
               "went unobserved (never waited on, polled or raised)")
        try:
            err: BaseException = self._lost[oid](msg)
        except Exception:  # noqa: BLE001 - a type that takes other arguments
            err = PrismGpuError(msg)
        err.op_id = oid  # type: ignore[attr-defined]
        return err

    def _observe(self, oid: int, err: BaseException) -> None:
        self._unobserved.pop(oid, None)
        if isinstance(err, DependencyFailedError):
            # its message carries the root's error: the root reached the caller too
            self._unobserved.pop(err.root_op, None)

    def root_pair(self, oid: int) -> Optional[Tuple[int, Optional[BaseException]]]:
        """(root id, its error) of completed op ``oid``'s failure, or None."""
        r = self.root(oid)
        return None if r is None else (r, self.error(r, observe=False))

    def root(self, oid: int) -> Optional[int]:
        """The failed op at the root of ``oid``'s failure, if ``oid`` is known failed."""
        err = self._failed.get(oid)
        if err is None:
            return oid if oid in self._lost else None
        return err.root_op if isinstance(err, DependencyFailedError) else oid

    def take_reports(self) -> List[CompletedOp]:
        make = self.id_type
        out = [CompletedOp(make(oid), t, ms, err) for oid, t, ms, err in self._reports]
        self._reports.clear()
        for r in out:
            if r.error is not None:
                self._observe(int(r.op_id), r.error)
        return out

    def take_unobserved(self, ids: "Optional[set[int]]" = None) -> List[BaseException]:
        """Failures not yet reported to the user (only among ``ids`` if given), now
        observed. Dependency failures whose root is also reported are left out: the
        root's error already names what went wrong."""
        picked = [o for o in self._unobserved if ids is None or o in ids]
        errs = []
        roots = set()
        for oid in picked:
            del self._unobserved[oid]
            err = self._failed[oid]
            if isinstance(err, DependencyFailedError):
                if err.root_op in roots or err.root_op in self._failed:
                    continue
            roots.add(oid)
            errs.append(err)
        if errs and self.dropped_unobserved:
            errs[0].add_note(f"and {self.dropped_unobserved} older failures, not kept: more "
                             f"than {self._keep} failed ops went unobserved (never waited "
                             "on, polled or raised)")
            self.dropped_unobserved = 0
        return errs

    @property
    def unreported_reports(self) -> int:
        return len(self._reports)

    @property
    def unobserved(self) -> int:
        return len(self._unobserved)


def raise_failures(errors: List[BaseException], what: str) -> None:
    """Raise one failure as itself, several as an ExceptionGroup (a BaseExceptionGroup
    where one is not an Exception: a KeyboardInterrupt from a callback is kept)."""
    if not errors:
        return
    if len(errors) == 1:
        raise errors[0]
    # BaseExceptionGroup gives an ExceptionGroup when every error is an Exception
    raise BaseExceptionGroup(f"{len(errors)} ops failed unobserved ({what})", errors)
