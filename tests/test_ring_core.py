"""The ring's twins: the compiled Slot, RingCore and SlotMap (where built) must answer as
the Python reference does, call for call, right or wrong, and keep no references."""

from __future__ import annotations

import gc
import random
import sys
import weakref
from typing import Any, Callable, List, Tuple

import numpy as np
import pytest

import prism_gpu as pg
from prism_gpu import _core, _ring, _slotmap
from prism_gpu._ring import FREE_I, PROCESSING_I, UPLOADING_I, BufferState

TWINS = [pytest.param((_ring.PySlot, _ring.PyRingCore, _slotmap.PySlotMap), id="python")]
if _core.COMPILED:
    C = _core.compiled_module()
    TWINS.append(pytest.param((C.Slot, C.RingCore, C.SlotMap), id="compiled"))
else:  # the skip says why
    TWINS.append(pytest.param(None, id="compiled", marks=pytest.mark.skip(
        reason=f"the compiled core is {_core.STATUS}")))


class FakeOp:
    """What the slots and the map read of an op: its id."""

    def __init__(self, oid: int) -> None:
        self.id = oid


def new_ring(twin: Tuple[Any, Any, Any], depth: int = 3, size: int = 8) -> Any:
    slot_type, core, _ = twin
    ring = type("Ring", (core,), {})()
    ring._ring_init([slot_type(ring, i, np.arange(size, dtype=np.float32) + 10 * i)
                     for i in range(depth)])
    return ring


@pytest.fixture(params=TWINS)
def twin(request: Any) -> Any:
    return request.param


def test_a_loop_moves_each_slot_round_the_cycle_in_ring_order(twin: Any) -> None:
    ring = new_ring(twin)
    assert ring.depth == 3 and ring.get_states() == [BufferState.FREE] * 3
    for k in range(7):
        up = ring.take(FREE_I)
        assert up.index == k % 3 and up.state is BufferState.UPLOADING
        assert ring.peek(UPLOADING_I) is up and ring.take(UPLOADING_I) is up
        assert ring.peek(PROCESSING_I) is up and ring.take(PROCESSING_I) is up
        assert up.state is BufferState.DOWNLOADING
        assert ring.advance() is True and ring.advance() is False
    assert ring.get_states() == [BufferState.FREE] * 3


def test_a_full_ring_refuses_a_take_and_an_untake_restores_the_cursor(twin: Any) -> None:
    ring = new_ring(twin, depth=2)
    a, b = ring.take(FREE_I), ring.take(FREE_I)
    assert ring.take(FREE_I) is None and ring.peek(FREE_I) is None
    assert ring.peek(UPLOADING_I, 1) is b and ring.peek(UPLOADING_I, -1) is b
    ring.untake(b, FREE_I)
    assert b.state is BufferState.FREE and ring.take(FREE_I) is b
    assert a.state is BufferState.UPLOADING


def test_produce_and_retire_keep_their_order_rules(twin: Any) -> None:
    ring = new_ring(twin)
    s = ring.produce()
    assert s.index == 0 and s.state is BufferState.PROCESSING
    ring.take(FREE_I)  # an upload waits: no output slot may be produced past it
    with pytest.raises(pg.InvalidOperationError, match="uploads waiting"):
        ring.produce()
    assert ring.retire() is True and s.state is BufferState.FREE
    assert ring.retire() is False
    t = ring.take(UPLOADING_I)
    ring.take(PROCESSING_I)
    ring.take(FREE_I)
    ring.take(UPLOADING_I)  # slot 2 PROCESSING while slot 1 is DOWNLOADING
    assert t.state is BufferState.DOWNLOADING
    with pytest.raises(pg.BufferUnavailableError, match="advance"):
        ring.retire()


def test_a_closed_ring_refuses_and_its_slots_drop_their_memory(twin: Any) -> None:
    ring = new_ring(twin)
    slot = ring.take(FREE_I)
    ring.close()
    assert ring.closed and all(s.full is None for s in ring.slots)
    for call in (lambda: ring.take(FREE_I), lambda: ring.peek(UPLOADING_I), ring.produce,
                 ring.retire, ring.advance, lambda: slot.array, lambda: slot.head(2)):
        with pytest.raises(pg.InvalidOperationError, match="closed"):
            call()


def test_slots_track_their_writer_readers_and_ops(twin: Any) -> None:
    ring = new_ring(twin)
    s = ring.take(FREE_I)
    w, r1, r2, u = FakeOp(5), FakeOp(6), FakeOp(7), FakeOp(8)
    assert list(s.write_hazards()) == []
    assert s.filled(w, 4) == [] and s.valid == 4 and s.writer is w
    np.testing.assert_array_equal(s.array, np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(s.head(2), np.arange(2, dtype=np.float32))
    assert s.head(8) is s.full and list(s.write_hazards()) == [w]
    s.read(r1)
    s.read(r2)
    assert s.readers == [r1, r2] and list(s.write_hazards()) == [r1, r2]
    s.updated(u, ("root", "err"))
    assert s.writer is u and s.readers == [] and s.failed == ("root", "err")
    s.updated(FakeOp(9), ("other", "err"))  # the first failure stays the slot's
    assert s.failed == ("root", "err") and s.ops == [5, 6, 7, 8, 9]
    assert s.filled(FakeOp(10), 8) == [5, 6, 7, 8, 9] and s.failed is None
    assert repr(s) == "Slot(index=0, state=UPLOADING, valid=8)"
    assert s.ref() is s


def test_the_slot_map_follows_data_and_forgets_refilled_slots(twin: Any) -> None:
    ring = new_ring(twin)
    m = twin[2]()
    a = ring.take(FREE_I)
    m.filled(a, FakeOp(1), 8)
    assert m.data_slots([1]) == [a] and m.data_slots([2]) == []
    m.touched(2, [a])
    assert m.data_slots([2, 1]) == [a]  # each slot once
    b = ring.take(FREE_I)
    m.filled(b, FakeOp(3), 8)
    m.touched(4, (a, b))
    assert m.data_slots([4]) == [a, b]
    m.filled(a, FakeOp(5), 8)  # a refilled: op 1's entry goes (op 2 and 4 stay: touched)
    assert m.data_slots([1]) == [] and m.data_slots([5]) == [a]
    ring.take(UPLOADING_I)
    ring.take(PROCESSING_I)  # a is DOWNLOADING: no compute consumes it
    assert m.data_slots([5]) == [] and m.data_slots([4]) == [b]
    ring.close()
    with pytest.raises(pg.InvalidOperationError, match="closed"):
        m.data_slots([3])
    m.clear()
    assert m.data_slots([3, 4, 5]) == []


def test_the_slot_map_sweeps_the_entries_of_dropped_rings(twin: Any) -> None:
    m = twin[2]()
    m._sweep_at = 8
    for k in range(40):
        ring = new_ring(twin, depth=1)
        m.filled(ring.take(FREE_I), FakeOp(k), 8)
        del ring
        gc.collect()
    # the ninth entry swept the eight of dropped rings; the next sweep waits for 4098
    assert len(m._map) == 32 and m._sweep_at == 4098


def test_wrong_calls_are_refused_alike(twin: Any) -> None:
    """Each wrong call raises the same type of error on both twins and changes nothing."""
    ring = new_ring(twin)
    before = ring.get_states()
    for call in (lambda: ring.take("0"), lambda: ring.take(None), lambda: ring.peek(),
                 lambda: ring.peek(FREE_I, "1")):
        with pytest.raises(TypeError):
            call()
    for call in (lambda: ring.take(4), lambda: ring.peek(4)):
        with pytest.raises(IndexError):
            call()
    with pytest.raises(AttributeError):
        ring.untake(None, FREE_I)
    assert ring.get_states() == before
    s = ring.take(FREE_I)
    with pytest.raises(TypeError):
        s.filled(FakeOp(1), "4")
    with pytest.raises(AttributeError):
        s.filled(object(), 4)
    assert s.ops == [] and s.writer is None and s.valid == 8


def test_a_dropped_ring_is_collected_with_its_slots(twin: Any) -> None:
    ring = new_ring(twin)
    m = twin[2]()
    m.filled(ring.take(FREE_I), FakeOp(1), 8)
    gone = weakref.ref(ring)
    slot = weakref.ref(ring.slots[0])
    del ring
    gc.collect()
    assert gone() is None and slot() is None and m.data_slots([1]) == []


def _program(seed: int, steps: int) -> List[Tuple[str, Tuple[int, ...]]]:
    rng = random.Random(seed)
    names = ["take", "take", "take", "untake", "peek", "produce", "retire", "advance",
             "states", "filled", "read", "updated", "touched", "data", "close"]
    return [(rng.choice(names), (rng.randrange(0, 5), rng.randrange(-4, 5), rng.randrange(1, 9)))
            for _ in range(steps)]


def _run(twin: Any, program: List[Tuple[str, Tuple[int, ...]]]) -> List[Any]:
    """Every answer of ``program`` on ``twin``: values as plain data, errors as their type
    and message."""
    ring = new_ring(twin, depth=4)
    m = twin[2]()
    taken: List[Tuple[Any, int]] = []
    out: List[Any] = []
    oid = [100]

    def op() -> FakeOp:
        oid[0] += 1
        return FakeOp(oid[0])

    def name(s: Any) -> Any:
        return None if s is None else ("slot", s.index)

    calls: dict[str, Callable[[int, int, int], Any]] = {
        "take": lambda w, a, n: (lambda s: (taken.append((s, w)) if s is not None else None,
                                            name(s))[1])(ring.take(w)),
        "untake": lambda w, a, n: ring.untake(*taken.pop()) if taken else None,
        "peek": lambda w, a, n: name(ring.peek(w, a)),
        "produce": lambda w, a, n: name(ring.produce()),
        "retire": lambda w, a, n: ring.retire(),
        "advance": lambda w, a, n: ring.advance(),
        "states": lambda w, a, n: [str(s) for s in ring.get_states()],
        "filled": lambda w, a, n: m.filled(ring.slots[n % 4], op(), n),
        "read": lambda w, a, n: ring.slots[n % 4].read(op()),
        "updated": lambda w, a, n: ring.slots[n % 4].updated(op(), (a, "e") if a > 2 else None),
        "touched": lambda w, a, n: m.touched(oid[0] - a % 3, ring.slots[:n % 3 + 1]),
        "data": lambda w, a, n: [name(s) for s in m.data_slots(range(oid[0] - 8, oid[0] + 1))],
        "close": lambda w, a, n: ring.close() if n == 8 else None,
    }
    for what, (w, a, n) in program:
        try:
            out.append((what, calls[what](w, a, n)))
        except Exception as e:  # noqa: BLE001 - the error is the answer compared
            out.append((what, type(e).__name__, "closed" in str(e)))
        out.append([(s.index, str(s.state), s.valid, list(s.ops), s.failed,
                     None if s.writer is None else s.writer.id, [r.id for r in s.readers])
                    for s in ring.slots])
    return out


@pytest.mark.skipif(not _core.COMPILED, reason=f"the compiled core is {_core.STATUS}")
@pytest.mark.parametrize("seed", range(40))
def test_random_programs_answer_alike_on_both_twins(seed: int) -> None:
    """A differential check: 40 random programs of 150 calls (right and wrong cursors,
    untakes, closes, the map's calls) give the same answers and states on both twins."""
    program = _program(seed, 150)
    assert _run(TWINS[0].values[0], program) == _run(TWINS[1].values[0], program)


def test_the_slots_keep_no_references(twin: Any) -> None:
    ring = new_ring(twin)
    m = twin[2]()
    ops = [FakeOp(k) for k in range(400)]
    watched = [ring, m, *ring.slots]
    for k in range(0, 400, 4):  # warm up: every list at its steady size
        s = ring.take(FREE_I)
        m.filled(s, ops[k], 8)
        ring.take(UPLOADING_I)
        s.updated(ops[k + 1])
        m.touched(ops[k + 1].id, [s])
        ring.take(PROCESSING_I)
        s.read(ops[k + 2])
        ring.advance()
        s = None
        if k == 200:
            before = [sys.getrefcount(o) for o in watched]
            probe = [sys.getrefcount(o) for o in ops[:190]]
    assert [sys.getrefcount(o) for o in watched] == before
    assert [sys.getrefcount(o) for o in ops[:190]] == probe
    del ring, m, watched
    gc.collect()
    alone = [FakeOp(-1)]  # held by its list only, as each op should be now
    assert {sys.getrefcount(o) for o in ops} == {sys.getrefcount(o) for o in alone}
