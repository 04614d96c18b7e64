"""How the engine finds completed ops: queries per lane, whatever the number in flight."""

from __future__ import annotations

from typing import Any, List, Optional

import pytest

from prism_gpu._engine import H2D, Engine
from prism_gpu._ops import OpType
from prism_gpu._optable import OpTable


class Ev:
    """An event whose completion the test decides; counts the queries it gets."""

    def __init__(self, log: List["Ev"]) -> None:
        self.done = False
        self.timing = False
        self.log = log

    def query(self) -> bool:
        self.log.append(self)
        return self.done

    def synchronize(self, timeout: Optional[float] = None) -> bool:
        self.done = True
        return True

    def error(self) -> Optional[BaseException]:
        return None

    def close(self) -> None:
        pass


class Stream:
    def wait(self, ev: Any, *, propagate: bool = True) -> None:
        pass

    def copy_h2d(self, dst: Any, src: Any) -> None:
        pass

    def record(self, ev: Any, *, stamp: bool = False) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        pass


class Device:
    closed = False

    def __init__(self) -> None:
        self.queries: List[Ev] = []

    def create_stream(self, priority: int = 0) -> Stream:
        return Stream()

    def create_event(self, timing: bool = False) -> Ev:
        return Ev(self.queries)


def _queued(n: int) -> tuple:
    dev = Device()
    eng = Engine(dev, OpTable(), max_in_flight=10_000)  # type: ignore[arg-type]
    lane = eng.lane("upload")
    ops = [eng.submit(lane, OpType.UPLOAD, None, (), (), H2D, None, None) for _ in range(n)]
    return dev, eng, ops


@pytest.mark.parametrize("n", [1, 2, 500])
def test_a_lane_whose_newest_op_is_done_takes_one_query(n: int) -> None:
    dev, eng, ops = _queued(n)
    for op in ops:
        op.event.done = True
    eng.harvest()
    assert len(dev.queries) == 1 and not eng.inflight
    assert [r[0] for r in eng.table.take_reports()] == [op.id for op in ops]


@pytest.mark.parametrize("done", [0, 1, 7, 250, 499])
def test_a_partly_done_lane_takes_a_few_queries_and_retires_exactly_the_done_ops(
        done: int) -> None:
    dev, eng, ops = _queued(500)
    for op in ops[:done]:
        op.event.done = True
    eng.harvest()
    assert sorted(eng.inflight) == [op.id for op in ops[done:]]
    assert len(dev.queries) <= 2 + 9  # newest, oldest, then bisection of 500
    assert [r[0] for r in eng.table.take_reports()] == [op.id for op in ops[:done]]


def test_nothing_in_flight_takes_no_query() -> None:
    dev, eng, _ = _queued(0)
    eng.harvest()
    assert dev.queries == []
