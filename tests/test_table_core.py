"""The op table's twins: the compiled TableCore (where built) must answer as the Python
reference does (ids, completion reports, the one-id dependency) and keep no references."""

from __future__ import annotations

import sys
from typing import Any

import pytest

import prism_gpu as pg
from prism_gpu import _core, _tablecore
from prism_gpu._ops import id_type
from prism_gpu._optable import OpTable
from _support import over_reference

PyOpTable = over_reference(OpTable, _tablecore.PyTableCore)
TABLES = [pytest.param(PyOpTable, id="python"),
          pytest.param(OpTable, id="compiled", marks=pytest.mark.skipif(
              not _core.COMPILED, reason=f"the compiled core is {_core.STATUS}"))]
UP, COMPUTE = pg.OpType.UPLOAD, pg.OpType.COMPUTE


@pytest.fixture(params=TABLES)
def table_type(request: Any) -> Any:
    return request.param


def test_the_compiled_table_is_the_one_in_use() -> None:
    assert issubclass(OpTable, _tablecore.TableCore)
    if _core.COMPILED:
        assert _tablecore.TableCore is _core.compiled_module().TableCore


def test_reports_are_kept_up_to_the_backlog_and_the_rest_counted(table_type: Any) -> None:
    t = table_type(report_backlog=3)
    for oid in range(5):
        t.next = oid + 1
        t.complete(oid, UP, 0.5 * oid, None)
    assert t.dropped_reports == 2 and t.unreported_reports == 3 and t.failed_total == 0
    reports = t.take_reports()
    assert [(int(r.op_id), r.op_type, r.duration_ms) for r in reports] == \
        [(2, UP, 1.0), (3, UP, 1.5), (4, UP, 2.0)]
    assert all(type(r.op_id) is t.id_type for r in reports)


def test_a_failed_op_is_kept_unobserved_until_reported(table_type: Any) -> None:
    t = table_type()
    t.next = 2
    err = pg.KernelError("boom")
    t.complete(0, UP, None, None)
    t.complete(1, COMPUTE, None, err)
    assert t.failed_total == 1 and t.unobserved == 1 and t.error(1, observe=False) is err
    assert t.take_unobserved() == [err] and t.unobserved == 0


def test_the_one_id_dependency_and_every_other_form_resolve_alike(table_type: Any) -> None:
    t = table_type()
    mine = t.id_type
    t.next = 5
    assert t.resolve_deps([mine(3)]) == [3] and type(t.resolve_deps([mine(3)])[0]) is int
    assert t.resolve_deps([3]) == [3] and t.resolve_deps(4) == [4]
    assert t.resolve_deps((mine(1), 2)) == [1, 2] and t.resolve_deps([]) == []
    for bad, err in (([mine(5)], pg.InvalidDependencyError), ([id_type()(1)],
                                                              pg.InvalidDependencyError),
                     ([mine(1 << 70)], pg.InvalidDependencyError), ("3", TypeError),
                     ([1.0], TypeError), (None, TypeError)):
        with pytest.raises(err):
            t.resolve_deps(bad)
    for below in (-1, -(1 << 70)):  # of this table's type, but never issued
        for form in ([mine(below)], mine(below)):
            with pytest.raises(pg.InvalidDependencyError, match="never issued"):
                t.resolve_deps(form)


def test_completions_keep_no_references(table_type: Any) -> None:
    t = table_type(report_backlog=8)
    op_type, duration = UP, 1.25
    for oid in range(20):
        t.complete(oid, op_type, duration, None)
    before = (sys.getrefcount(op_type), sys.getrefcount(duration))
    for oid in range(20, 400):
        t.complete(oid, op_type, duration, None)
    assert (sys.getrefcount(op_type), sys.getrefcount(duration)) == before
    t.take_reports()
    deps = [t.id_type(0)]
    t.next = 1
    before_dep = sys.getrefcount(deps[0])
    for _ in range(100):
        t.resolve_deps(deps)
    after_dep = sys.getrefcount(deps[0])  # (outside the assert: it holds what it shows)
    assert after_dep == before_dep


def test_wrong_calls_are_refused(table_type: Any) -> None:
    t = table_type()
    with pytest.raises(TypeError):
        t.complete(1, UP, None)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        table_type(report_backlog=0)
    assert t.unreported_reports == 0
