"""An op in flight and the stream lane it runs on: what the engine keeps per op."""

from __future__ import annotations

import collections
from typing import Any, Callable, Deque, Optional, Sequence, Tuple

from ._ops import OpType
from .backends._protocol import Event, Stream

__all__ = ["Lane", "Op", "Root", "H2D", "D2H", "LAUNCH"]

H2D, D2H, LAUNCH = 0, 1, 2  # the kinds of work an op does

Root = Tuple[int, Optional[BaseException]]
"""A failure's root: the id of the op that failed, and its error."""

_UPLOAD, _COMPUTE, _DOWNLOAD = OpType.UPLOAD, OpType.COMPUTE, OpType.DOWNLOAD


class Lane:
    """One stream and the FIFO of its ops in flight (a stream completes in order)."""

    __slots__ = ("stream", "ops", "name", "__weakref__")

    def __init__(self, stream: Stream, name: str) -> None:
        self.stream = stream
        self.ops: Deque["Op"] = collections.deque()
        self.name = name


class Op:
    """An op in flight: its events, what it keeps alive, who to tell when it is done."""

    __slots__ = ("id", "type", "lane", "event", "start", "end", "name", "error", "keep",
                 "on_done", "deps", "trace")

    def __init__(self, op_type: OpType, lane: Lane, name: Optional[str]) -> None:
        self.id = -1
        self.type = op_type
        self.lane = lane
        self.name = name
        self.event: Any = None
        self.start: Any = None
        self.end: Any = None
        self.error: Optional[BaseException] = None
        self.keep: Any = None
        self.on_done: Optional[Callable[["Op", Optional[float]], None]] = None
        self.deps: Sequence["Op"]  # set by the engine's submit, for every op
        self.trace: Any = None  # (trace, index, bytes) while a trace records it

    def times_since(self, ref: Event) -> Tuple[float, float]:
        """(start, end) in ms since timing event ``ref``; only inside ``on_done`` of a
        timed op."""
        return self.start.elapsed_ms(ref), self.end.elapsed_ms(ref)
