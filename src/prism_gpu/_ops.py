"""The op model: plain data shared by every backend."""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple, Optional

__all__ = ["OpType", "CompletedOp", "OpId", "CoordinatorStatistics"]


class OpType(str, Enum):
    UPLOAD = "upload"
    COMPUTE = "compute"
    DOWNLOAD = "download"

    def __str__(self) -> str:
        return self.value


class OpId(int):
    """An op id: an int (from 0, increasing) that remembers its coordinator.

    Plain ints are accepted wherever an id is; an ``OpId`` of another
    coordinator is rejected instead of silently naming a different op. Each
    coordinator issues ids of its own subclass (see :func:`id_type`).
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"OpId({int(self)})"


def id_type() -> type:
    """A fresh OpId subclass: one per coordinator, so ids know where they came from."""
    return type("OpId", (OpId,), {"__slots__": ()})


class CompletedOp(NamedTuple):
    op_id: int
    op_type: OpType
    duration_ms: Optional[float]
    error: Optional[BaseException]


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
