"""The op table's hot path: issuing ids, recording a completion, the one-id dependency.

:class:`PyTableCore` is the reference, in Python; ``_ccore`` (C, where built) has the
same as ``TableCore``, statement for statement, used unless ``PRISM_GPU_COMPILED=0``;
the test suite runs against both. :class:`prism_gpu._optable.OpTable` derives from
the one in use and holds the rest (failures, their observation, ``poll``'s reports).
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any, Deque, List, Optional, Tuple

from . import _core
from ._ops import OpType

__all__ = ["TableCore", "PyTableCore"]

Report = Tuple[int, OpType, Optional[float], Optional[BaseException]]


class PyTableCore:
    """``next`` is the next op id (the engine issues them as it queues ops)."""

    next: int
    id_type: Any
    dropped_reports: int
    failed_total: int
    _reports: Deque[Report]
    _backlog: int
    # the subclass's
    _failed_op: Any
    _resolve_deps: Any

    def _table_init(self, report_backlog: int, id_type: Any) -> None:
        self.id_type = id_type
        self.next = 0
        self._backlog = report_backlog
        self._reports = collections.deque(maxlen=report_backlog)
        self.dropped_reports = 0
        self.failed_total = 0

    def complete(self, oid: int, op_type: OpType, duration: Optional[float],
                 error: Optional[BaseException]) -> None:
        """Op ``oid`` completed: its report kept for ``poll`` (the oldest unpolled one
        dropped and counted past the backlog), its failure kept if it failed."""
        reports = self._reports
        if len(reports) == self._backlog:
            self.dropped_reports += 1
        reports.append((oid, op_type, duration, error))  # a CompletedOp once polled
        if error is not None:
            self._failed_op(oid, error)

    def resolve_deps(self, deps: Any) -> List[int]:
        """Dependencies given as an op id or an iterable of them, as plain ints."""
        if type(deps) is list and len(deps) == 1:  # the common [upload_id]
            d = deps[0]
            if type(d) is self.id_type and 0 <= d < self.next:
                return [int(d)]  # plain ints, as documented
        return self._resolve_deps(deps)  # type: ignore[no-any-return]


_C = _core.compiled_module()
if TYPE_CHECKING:
    TableCore = PyTableCore
else:
    TableCore = _C.TableCore if _C is not None else PyTableCore
