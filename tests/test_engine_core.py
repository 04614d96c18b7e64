"""The engine against a scripted device: the driver calls an op costs (records per op,
queries per lane whatever the number in flight) and where its events go back."""

from __future__ import annotations

from typing import Any, List, Optional

import pytest

from prism_gpu._engine import H2D, Engine
from prism_gpu._ops import OpType
from prism_gpu._optable import OpTable


class Ev:
    """An event whose completion the test decides; counts the queries it gets."""

    def __init__(self, log: List["Ev"], timing: bool = False) -> None:
        self.done = False
        self.timing = timing
        self.log = log

    def elapsed_ms(self, start: "Ev") -> float:
        assert self.timing and start.timing, "times are read from timing events only"
        return 0.5

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
    def __init__(self) -> None:
        self.records: List[Ev] = []

    def wait(self, ev: Any, *, propagate: bool = True) -> None:
        pass

    def copy_h2d(self, dst: Any, src: Any) -> None:
        pass

    def record(self, ev: Any, *, stamp: bool = False) -> None:
        self.records.append(ev)

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
        return Ev(self.queries, timing)


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


@pytest.mark.parametrize("timed", [False, True])
def test_an_op_records_its_closing_event_and_a_timed_one_a_start_stamp_too(
        timed: bool) -> None:
    """A timed op's closing event is its end stamp (a timing event): two records, not an
    end stamp and an untimed closing event besides; its events go back to the pool of
    their kind once it completes, and nothing else is left holding them."""
    dev = Device()
    eng = Engine(dev, OpTable(), timing=timed)  # type: ignore[arg-type]
    lane = eng.lane("upload")
    times: list = []
    for round_ in range(3):  # pooled events are reused on later rounds
        ops = [eng.submit(lane, OpType.UPLOAD, None, (), (), H2D, None, None,
                          on_done=lambda op, ms: times.append(ms)) for _ in range(4)]
        assert len(lane.stream.records) == 4 * (2 if timed else 1)
        for op in ops:
            assert op.event.timing is timed
            assert (op.end is op.event) if timed else (op.start is None and op.end is None)
        closing = lane.stream.records[1::2] if timed else lane.stream.records
        assert closing == [op.event for op in ops]
        if timed:
            assert lane.stream.records[0::2] == [op.start for op in ops]
        lane.stream.records.clear()
        for op in ops:
            op.event.done = True
        eng.harvest()
        assert not eng.inflight
        assert times[-4:] == ([0.5] * 4 if timed else [None] * 4)
        assert all(not ev.timing for ev in eng._pool) and all(ev.timing for ev in eng._tpool)
        assert len(eng._pool) + len(eng._tpool) == 4 * (2 if timed else 1)
