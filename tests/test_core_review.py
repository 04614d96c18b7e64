"""Findings of a review of the compiled ring, slot map, op table and engine, each a
regression test. The crashers run in a fresh process (a crash must fail the test, not the
run); the rest compare the compiled twin with the Python reference."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

import prism_gpu as pg
from prism_gpu import _core, _queue, _ring, _slotmap
from prism_gpu._coordinator import AsyncCoordinator
from _support import mul3, over_reference

pytestmark = pytest.mark.skipif(not _core.COMPILED,
                                reason=f"the compiled core is {_core.STATUS}")


def _survives(body: str) -> str:
    """Run ``body`` (``C`` is the compiled module) in a fresh process: its output."""
    code = "from prism_gpu import _core\nimport numpy as np\nC = _core.compiled_module()\n" + \
        textwrap.dedent(body)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, f"exit {p.returncode}: {p.stderr[-2000:]}"
    return p.stdout


def test_an_id_type_whose_index_empties_the_dependency_list_is_survived() -> None:
    out = _survives("""
        lst = []
        class Idx:
            def __index__(self):
                lst.clear()
                return 0
        class T(C.TableCore):
            def _resolve_deps(self, deps):
                return "slow"
        t = T()
        t._table_init(8, Idx)
        t.next = 5
        lst.append(Idx())
        print(t.resolve_deps(lst))
    """)
    assert out.strip() == "slow"  # not an int: the general path answers


def test_a_kind_whose_comparison_deletes_the_engine_state_is_survived() -> None:
    out = _survives("""
        e = C.EngineCore()
        class K:
            def __eq__(self, o):
                try:
                    del e.inflight
                except AttributeError:
                    pass
                return False
            __hash__ = object.__hash__
        try:
            e.submit(object(), None, None, (), (), K(), None, None)
        except AttributeError as exc:
            print("refused", exc)
    """)
    assert out.startswith("refused")


def test_slot_map_calls_whose_keys_or_refs_run_code_are_survived() -> None:
    out = _survives("""
        m = C.SlotMap()
        class R:
            def __call__(self):
                m._map.clear()
                return None
        s1, s2 = C.Slot(None, 0, np.zeros(4)), C.Slot(None, 1, np.zeros(4))
        m.touched(10**30, [s1, s2])
        s1.ref, s2.ref = R(), R()
        m.touched(10**30 + 1, [s1, s2])
        m._map[10**30] = (R(), R())
        m._sweep()
        deps = []
        class K:
            def __init__(self, tag):
                self.tag = tag
            def __hash__(self):
                return 7
            def __eq__(self, other):
                if self.tag == "stored" and deps:
                    deps.clear()
                    for i in range(20):
                        m._map[1000 + i] = ()
                return False
        s = C.Slot(None, 0, np.zeros(4))
        m.touched(K("stored"), [s])
        deps.append(K("probe" + "x" * 100))
        m.data_slots(deps)
        held = []
        class H:
            def __hash__(self):
                return 7
            def __eq__(self, other):
                if held:
                    held.clear()
                    for i in range(20):
                        m._map[2000 + i] = ()
                return False
        class Op:
            def __init__(self, i):
                self.id = i
        s.ops = [H()]
        held = s.ops
        m.filled(s, Op(1), 4)
        print("ok")
    """)
    assert out.strip() == "ok"


def test_a_ring_started_again_by_its_own_slots_iteration_is_refused_and_leaks_nothing(
        ) -> None:
    out = _survives("""
        import sys
        r = C.RingCore()
        inner = [C.Slot(None, 9, np.zeros(2))]
        def gen():
            r._ring_init(inner)
            yield C.Slot(None, 0, np.zeros(2))
        before = sys.getrefcount(inner[0])
        try:
            r._ring_init(gen())
        except RuntimeError as exc:
            print("refused", exc)
        print(r.depth, sys.getrefcount(inner[0]) - before)
    """)
    assert out.splitlines() == ["refused this ring was started already", "1 1"]


@pytest.mark.parametrize("slot_type", [_ring.PySlot, "compiled"])
def test_head_answers_any_number_as_python_slices(slot_type: Any) -> None:
    Slot = _core.compiled_module().Slot if slot_type == "compiled" else slot_type
    full = np.arange(4.0)
    s = Slot(None, 0, full)
    assert s.head(2 ** 70) is full or s.head(2 ** 70).shape == (4,)
    assert s.head(np.int64(4)) is full and s.head(4.0) is full and s.head(4) is full
    np.testing.assert_array_equal(s.head(np.int64(2)), full[:2])


@pytest.mark.parametrize("map_type", [_slotmap.PySlotMap, "compiled"])
def test_touching_no_slots_stores_an_empty_tuple(map_type: Any) -> None:
    m = (_core.compiled_module().SlotMap if map_type == "compiled" else map_type)()
    m.touched(5, [])
    assert m._map == {5: ()} and m.data_slots([5]) == []


PyCoordinator = over_reference(AsyncCoordinator, _queue.PyQueueCore)


@pytest.mark.parametrize("coord_type", [PyCoordinator, AsyncCoordinator])
def test_a_negative_id_of_the_coordinator_s_type_is_refused_as_never_issued(
        coord_type: Any) -> None:
    """[OpId(-1)] was taken as a dependency on both cores: the compute ran with no data."""
    dev = pg.open_device("cpu")
    c = coord_type(dev)
    try:
        c.register_kernel("mul3", mul3())
        buf = pg.TripleBuffer(dev, 4)
        u = c.queue_upload(np.ones(4, np.float32), buf)
        before = buf.get_states()
        for deps in ([type(u)(-1)], type(u)(-1), [type(u)(10 ** 6)]):
            with pytest.raises(pg.InvalidDependencyError, match="never issued"):
                c.queue_compute("mul3", deps)
        assert buf.get_states() == before
        c.synchronize_all()
    finally:
        c.close()
