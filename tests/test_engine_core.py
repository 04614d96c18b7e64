"""The engine against a scripted device: the driver calls an op costs (records per op,
queries per lane whatever the number in flight) and where its events go back."""

from __future__ import annotations

from typing import Any, List, Optional

import pytest

from prism_gpu import _core
from prism_gpu._engine import H2D, Engine
from prism_gpu._ops import OpType
from prism_gpu._optable import OpTable
from _support import over_reference

# the engine over each core: the compiled one (where built) and the Python reference
PyEngine = over_reference(Engine, _core.PyEngineCore)
CORES = [pytest.param(PyEngine, id="python"),
         pytest.param(Engine, id="compiled", marks=pytest.mark.skipif(
             not _core.COMPILED, reason=f"the compiled core is {_core.STATUS}"))]


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

    def copy_d2h(self, dst: Any, src: Any) -> None:
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


@pytest.fixture(params=CORES)
def engine_cls(request: Any) -> Any:
    return request.param


def _queued(engine_cls: Any, n: int) -> tuple:
    dev = Device()
    eng = engine_cls(dev, OpTable(), max_in_flight=10_000)
    lane = eng.lane("upload")
    ops = [eng.submit(lane, OpType.UPLOAD, None, (), (), H2D, None, None) for _ in range(n)]
    dev.queries.clear()  # (the submits' own looks for events to take back: not counted)
    return dev, eng, ops


@pytest.mark.parametrize("n", [1, 2, 500])
def test_a_lane_whose_newest_op_is_done_takes_one_query(engine_cls: Any, n: int) -> None:
    dev, eng, ops = _queued(engine_cls, n)
    for op in ops:
        op.event.done = True
    eng.harvest()
    assert len(dev.queries) == 1 and not eng.inflight
    assert [r[0] for r in eng.table.take_reports()] == [op.id for op in ops]


@pytest.mark.parametrize("done", [0, 1, 7, 250, 499])
def test_a_partly_done_lane_takes_a_few_queries_and_retires_exactly_the_done_ops(
        engine_cls: Any, done: int) -> None:
    dev, eng, ops = _queued(engine_cls, 500)
    for op in ops[:done]:
        op.event.done = True
    eng.harvest()
    assert sorted(eng.inflight) == [op.id for op in ops[done:]]
    assert len(dev.queries) <= 2 + 9  # newest, oldest, then bisection of 500
    assert [r[0] for r in eng.table.take_reports()] == [op.id for op in ops[:done]]


def test_nothing_in_flight_takes_no_query(engine_cls: Any) -> None:
    dev, eng, _ = _queued(engine_cls, 0)
    eng.harvest()
    assert dev.queries == []


@pytest.mark.parametrize("timed", [False, True])
def test_an_op_records_its_closing_event_and_a_timed_one_a_start_stamp_too(
        engine_cls: Any, timed: bool) -> None:
    """A timed op's closing event is its end stamp (a timing event): two records, not an
    end stamp and an untimed closing event besides; its events go back to the pool of
    their kind once it completes, and nothing else is left holding them."""
    dev = Device()
    eng = engine_cls(dev, OpTable(), timing=timed)
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


class Launching(Stream):
    """A stream whose launches run the kernel given (a callable) at once."""

    def launch(self, kernel: Any, config: Any, arrays: Any, extra: Any) -> None:
        kernel()


def test_failures_on_both_cores(engine_cls: Any) -> None:
    """A launch that raises fails its op (it does not raise), and its dependants fail with
    DependencyFailedError naming it; a refusal (a prism-gpu error) raises at the submit
    and leaves nothing in flight, its start stamp back in the pool; an on_done that
    raises is kept for the caller, after the op's bookkeeping."""
    from prism_gpu._engine import LAUNCH
    from prism_gpu._errors import DependencyFailedError, KernelError, PrismGpuError

    dev = Device()
    dev.create_stream = lambda priority=0: Launching()  # type: ignore[method-assign]
    eng = engine_cls(dev, OpTable(), timing=True)
    lane = eng.lane("compute")

    def boom() -> None:
        raise ValueError("kernel went wrong")

    def refuse() -> None:
        raise PrismGpuError("refused")

    def bad_callback(op: Any, ms: Any) -> None:
        raise RuntimeError("callback")

    failed = eng.submit(lane, OpType.COMPUTE, "boom", (), (), LAUNCH, boom, None, (), ())
    assert isinstance(failed.error, KernelError) and "kernel went wrong" in str(failed.error)
    after = eng.submit(lane, OpType.COMPUTE, "next", (failed,), (), LAUNCH, lambda: None,
                       None, (), (), on_done=bad_callback)
    assert isinstance(after.error, DependencyFailedError) and after.error.root_op == failed.id
    pooled = len(eng._tpool)
    with pytest.raises(PrismGpuError, match="refused"):
        eng.submit(lane, OpType.COMPUTE, "refused", (), (), LAUNCH, refuse, None, (), ())
    assert len(eng._tpool) == pooled + 1, "the refused op's start stamp is pooled again"
    assert sorted(eng.inflight) == [failed.id, after.id] and eng.in_callback is False
    for op in (failed, after):
        op.event.done = True
    eng.harvest()
    reports = eng.table.take_reports()
    assert [(r[0], type(r[3])) for r in reports] == [(failed.id, KernelError),
                                                     (after.id, DependencyFailedError)]
    assert [str(e) for e in eng.take_callback_errors()] == ["callback"]
    assert failed.keep is None and failed.event is None and after.deps == ()


def test_a_submit_from_a_callback_is_refused_on_both_cores(engine_cls: Any) -> None:
    from prism_gpu._errors import InvalidOperationError

    eng = engine_cls(Device(), OpTable())
    lane = eng.lane("upload")
    seen: List[BaseException] = []

    def reenter(op: Any, ms: Any) -> None:
        try:
            eng.submit(lane, OpType.UPLOAD, None, (), (), H2D, None, None)
        except InvalidOperationError as exc:
            seen.append(exc)

    op = eng.submit(lane, OpType.UPLOAD, None, (), (), H2D, None, None, on_done=reenter)
    op.event.done = True
    eng.harvest()
    assert len(seen) == 1 and "callback" in str(seen[0]) and not eng.inflight


def test_past_max_in_flight_a_submit_waits_for_the_oldest_on_both_cores(
        engine_cls: Any) -> None:
    eng = engine_cls(Device(), OpTable(), max_in_flight=4)
    lane = eng.lane("upload")
    ops = [eng.submit(lane, OpType.UPLOAD, None, (), (), H2D, None, None) for _ in range(9)]
    assert len(eng.inflight) <= 4
    assert all(op.event is None for op in ops[:5]), "the oldest were waited for and retired"


class CountingDevice(Device):
    """Counts the events it makes; with ``keeps_up`` an op is done once recorded."""

    def __init__(self, keeps_up: bool) -> None:
        super().__init__()
        self.made = 0
        self.keeps_up = keeps_up

    def create_stream(self, priority: int = 0) -> Stream:
        stream = Stream()
        if self.keeps_up:
            def record(ev: Any, *, stamp: bool = False) -> None:
                ev.done = True
            stream.record = record  # type: ignore[method-assign]
        return stream

    def create_event(self, timing: bool = False) -> Ev:
        self.made += 1
        return super().create_event(timing)


@pytest.mark.parametrize("timed", [False, True])
def test_a_gpu_that_keeps_up_is_served_by_about_reclaim_events(engine_cls: Any,
                                                               timed: bool) -> None:
    """6000 ops on three lanes of a device that keeps up: a submit short of events takes
    back those of completed ops (every RECLAIM ops in flight) rather than make new ones
    until max_in_flight (1024 events made per engine before, 2.9 us each on an H100)."""
    dev = CountingDevice(keeps_up=True)
    eng = engine_cls(dev, OpTable(), timing=timed)
    lanes = [eng.lane(n) for n in ("up", "compute", "down")]
    for i in range(6000):
        eng.submit(lanes[i % 3], OpType.UPLOAD, None, (), (), H2D, None, None)
    assert dev.made <= (2 if timed else 1) * (_core.RECLAIM + 3), dev.made  # (a start, an end)
    assert len(dev.queries) <= 3 * 6000 // _core.RECLAIM + 3
    assert len(eng.inflight) <= _core.RECLAIM + 3


def test_a_gpu_behind_is_looked_at_once_per_reclaim_ops(engine_cls: Any) -> None:
    """Nothing completes: every op needs a new event, and the looks for some to take back
    cost a few queries per RECLAIM ops, not per op."""
    dev = CountingDevice(keeps_up=False)
    eng = engine_cls(dev, OpTable(), max_in_flight=10_000)
    lane = eng.lane("upload")
    for _ in range(1000):
        eng.submit(lane, OpType.UPLOAD, None, (), (), H2D, None, None)
    assert dev.made == 1000 and len(eng.inflight) == 1000
    looks = 1000 // _core.RECLAIM
    assert looks <= len(dev.queries) <= 2 * looks  # the newest, then the oldest, per look
    assert eng._reclaim_at == 1000 // _core.RECLAIM * _core.RECLAIM + _core.RECLAIM


def test_wait_blocks_on_the_op_and_retires_it_and_those_before(engine_cls: Any) -> None:
    """wait(oid) on both cores: an op not in flight is done at once; an op in flight is
    synchronized (its timeout passed on) and harvested with the ops before it on its lane;
    a timeout that passes answers False and retires nothing; from a callback, refused."""
    from prism_gpu._errors import InvalidOperationError

    class Slow(Ev):
        asked: List[Any] = []

        def synchronize(self, timeout: Optional[float] = None) -> bool:
            Slow.asked.append(timeout)
            if timeout is not None:
                return False
            return super().synchronize(timeout)

    dev = Device()
    dev.create_event = lambda timing=False: Slow(dev.queries, timing)  # type: ignore
    eng = engine_cls(dev, OpTable())
    lane = eng.lane("upload")
    ops = [eng.submit(lane, OpType.UPLOAD, None, (), (), H2D, None, None) for _ in range(3)]
    assert eng.wait(99) is True and eng.wait(oid=ops[1].id, timeout=0.5) is False
    assert Slow.asked == [0.5] and len(eng.inflight) == 3
    ops[0].event.done = True
    assert eng.wait(ops[1].id) is True and Slow.asked == [0.5, None]
    assert sorted(eng.inflight) == [ops[2].id], "the op waited on and those before it retire"
    seen: List[BaseException] = []

    def reenter(op: Any, ms: Any) -> None:
        try:
            eng.wait(ops[2].id)
        except InvalidOperationError as exc:
            seen.append(exc)
    eng.submit(lane, OpType.UPLOAD, None, (), (), H2D, None, None, on_done=reenter)
    eng.wait(ops[2].id)
    for op in list(eng.inflight.values()):
        op.event.done = True
    eng.harvest()
    assert len(seen) == 1 and "callback" in str(seen[0])
    with pytest.raises(TypeError):
        eng.wait()


def test_given_events_go_to_their_pool_up_to_its_cap_then_are_closed(engine_cls: Any) -> None:
    closed: List[Any] = []

    class Closing(Ev):
        def close(self) -> None:
            closed.append(self)

    eng = engine_cls(Device(), OpTable(), max_in_flight=2)
    assert eng._pool_cap == 2 * 2 + 64
    eng._pool_cap = 2
    evs = [Closing([], timing=bool(i % 2)) for i in range(6)]
    for ev in evs:
        eng.give_event(ev)
    assert eng._pool == evs[0:4:2][:2] and eng._tpool == evs[1:4:2][:2]
    assert closed == evs[4:]
    with pytest.raises(AttributeError):
        eng.give_event(object())


def test_an_engine_in_a_cycle_with_its_ops_is_collected(engine_cls: Any) -> None:
    """Ops in flight whose callbacks hold the engine (a coordinator's reporters do): the
    cycle through the compiled types is found by the garbage collector."""
    import gc
    import weakref

    eng = engine_cls(Device(), OpTable())
    lane = eng.lane("upload")
    for _ in range(3):
        eng.submit(lane, OpType.UPLOAD, None, (), (), H2D, None, None,
                   on_done=lambda op, ms, e=eng: e)
    ref = weakref.ref(eng)
    del eng, lane
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("path", ["plain", "timed", "failing", "refused", "callback"])
def test_completed_ops_hold_no_references_on_both_cores(engine_cls: Any, path: str) -> None:
    """After its completion, nothing of an op's (what it kept, its name, its callback, its
    lane, its type) is referenced more than before it was queued: a compiled core that
    lost count of a reference would keep the program's arrays alive forever."""
    import sys

    from prism_gpu._engine import LAUNCH
    from prism_gpu._errors import PrismGpuError

    dev = Device()
    dev.create_stream = lambda priority=0: Launching()  # type: ignore[method-assign]
    eng = engine_cls(dev, OpTable(report_backlog=4), timing=path == "timed")
    lane = eng.lane("compute")
    kept, name, op_type = object(), "kernel-name-" + path, OpType.COMPUTE

    def boom() -> None:
        raise ValueError("kernel went wrong")

    def refuse() -> None:
        raise PrismGpuError("refused")

    def callback(op: Any, ms: Any) -> None:
        if path == "callback":
            raise RuntimeError("callback")

    def run(rounds: int) -> None:
        for _ in range(rounds):
            kernel = {"failing": boom, "refused": refuse}.get(path, lambda: None)
            try:
                op = eng.submit(lane, op_type, name, (), (), LAUNCH, kernel, None, (), (),
                                keep=kept, on_done=callback)
                eng.submit(lane, op_type, name, (op,), (), LAUNCH, lambda: None, None, (), (),
                           keep=kept, on_done=callback)
            except PrismGpuError:
                pass
            for o in list(lane.ops):
                o.event.done = True
            eng.harvest()
            eng.take_callback_errors()
            eng.table.take_unobserved()
        eng.table.take_reports()

    run(3)  # pools and caches filled
    watched: tuple = (kept, callback, eng)
    if path != "failing":  # (failures are kept for the caller, bounded: they name their op)
        watched += (name, op_type, lane)
    before = [sys.getrefcount(x) for x in watched]
    run(200)
    after = [sys.getrefcount(x) for x in watched]
    assert after == before


# --- findings of a review of the compiled core: each answered alike by both cores -------


def test_a_wait_that_changes_the_dependency_list_is_survived(engine_cls: Any) -> None:
    """The compiled submit held the list's items only by borrowing: a stream wait that
    empties the caller's list freed the op it was reading."""
    dev = Device()
    eng = engine_cls(dev, OpTable())
    lane = eng.lane("upload")
    first = eng.submit(lane, OpType.UPLOAD, None, (), (), H2D, None, None)
    deps = [first]
    lane.stream.wait = lambda ev, propagate=True: deps.clear()  # type: ignore[assignment]
    del first
    op = eng.submit(lane, OpType.UPLOAD, None, deps, (), H2D, None, None)
    assert op.id == 1 and op.error is None


def test_a_flag_whose_truth_raises_reaches_the_caller(engine_cls: Any) -> None:
    class Bad:
        def __bool__(self) -> bool:
            raise ValueError("no truth here")

    eng = engine_cls(Device(), OpTable())
    lane = eng.lane("upload")
    eng.in_callback = Bad()
    with pytest.raises(ValueError, match="no truth here"):
        eng.submit(lane, OpType.UPLOAD, None, (), (), H2D, None, None)
    with pytest.raises(ValueError, match="no truth here"):
        eng.harvest()
    eng.in_callback = False


def test_submit_takes_every_argument_by_position_or_keyword(engine_cls: Any) -> None:
    eng = engine_cls(Device(), OpTable())
    lane = eng.lane("upload")
    kept = object()
    a = eng.submit(lane, OpType.UPLOAD, "a", (), (), H2D, None, None, None, None, kept, None,
                   True, None)
    b = eng.submit(lane=lane, op_type=OpType.UPLOAD, name="b", deps=(), quiet=(), kind=H2D,
                   a=None, b=None, keep=kept)
    assert (a.keep, a.start is not None, b.keep, b.start) == (kept, True, kept, None)
    with pytest.raises(TypeError):
        eng.submit(lane, OpType.UPLOAD, None, (), (), H2D, None)  # b missing
    with pytest.raises(TypeError):
        eng.submit(lane, OpType.UPLOAD, None, (), (), H2D, None, None, lane=lane)
    eng.timing = 1  # any truthy value, as in Python
    assert eng.submit(lane, OpType.UPLOAD, None, (), (), H2D, None, None).start is not None


def test_times_of_an_op_without_its_events_are_refused(engine_cls: Any) -> None:
    eng = engine_cls(Device(), OpTable(), timing=True)
    lane = eng.lane("upload")
    op = eng.submit(lane, OpType.UPLOAD, None, (), (), H2D, None, None)
    del op.start
    with pytest.raises(AttributeError):
        op.times_since(op.end)


# --- findings of a second review: each answered alike by both cores ----------------------


@pytest.mark.parametrize("field", ["table", "device", "inflight", "max_in_flight"])
def test_a_deleted_engine_field_raises_attribute_error(engine_cls: Any, field: str) -> None:
    eng = engine_cls(Device(), OpTable())
    lane = eng.lane("upload")
    delattr(eng, field)
    with pytest.raises(AttributeError):
        eng.submit(lane, OpType.UPLOAD, None, (), (), H2D, None, None)


def test_keywords_limits_and_kinds_as_in_python(engine_cls: Any) -> None:
    """harvest, _harvest_lane and _complete take their arguments by keyword; the limit of
    ops in flight is any number; the kind of work compares as Python compares it."""
    from prism_gpu._engine import LAUNCH

    dev = Device()
    dev.create_stream = lambda priority=0: Launching()  # type: ignore[method-assign]
    eng = engine_cls(dev, OpTable(), max_in_flight=2 ** 63)
    lane = eng.lane("compute")
    ran: list = []
    op = eng.submit(lane, OpType.COMPUTE, "k", (), (), float(LAUNCH), lambda: ran.append(1),
                    None, (), ())
    assert ran == [1], "a kind equal to LAUNCH launches"
    eng.max_in_flight = float("inf")
    other = eng.submit(lane, OpType.DOWNLOAD, None, (), (), None, None, None)
    for o in (op, other):
        o.event.done = True
    eng.harvest(upto=op)
    eng._harvest_lane(lane=lane, upto=None)
    assert not eng.inflight
    with pytest.raises(TypeError):
        eng.harvest(bogus=1)
    with pytest.raises(TypeError) as py_msg:
        iter(None)  # type: ignore[call-overload]
    with pytest.raises(TypeError) as msg:
        eng.submit(lane, OpType.UPLOAD, None, None, (), H2D, None, None)
    assert str(msg.value) == str(py_msg.value)
