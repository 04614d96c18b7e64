"""Fixtures shared by every test: the backend, its device/coordinator/context, a latch.

The latch itself (:class:`Latch`, :func:`make_latch`) lives in ``_support`` so test
modules can import it; it is re-exported here.
"""

from __future__ import annotations

import functools
import gc
import threading
from typing import Any, Iterator, Optional

import pytest

import prism_gpu as pg
from _support import Latch, make_latch
from prism_gpu.backends import cuda_unavailable_reason

__all__ = ["Latch", "make_latch"]


@functools.lru_cache(maxsize=None)
def _cuda_reason() -> Optional[str]:
    return cuda_unavailable_reason()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """GPU-only tests (marked ``cuda``) skip with the reason CUDA is unusable here."""
    if item.get_closest_marker("cuda") is not None and "backend" not in item.fixturenames:
        reason = _cuda_reason()
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def backend(request: pytest.FixtureRequest) -> str:
    """Every backend; ``cuda`` skips with the reason where it is not usable."""
    if request.param == "cuda":
        reason = _cuda_reason()
        if reason is not None:
            pytest.skip(reason)
    return request.param


@pytest.fixture
def device(backend: str) -> Iterator[Any]:
    dev = pg.open_device(backend)
    yield dev
    dev.close()


@pytest.fixture
def coord(device: Any) -> Iterator[pg.AsyncCoordinator]:
    c = pg.AsyncCoordinator(device)
    yield c
    c.close()


@pytest.fixture
def ctx(backend: str) -> Iterator[pg.ManagedGpuContext]:
    c = pg.ManagedGpuContext(backend=backend)
    yield c
    c.close()


@pytest.fixture
def timed_ctx(backend: str) -> Iterator[pg.ManagedGpuContext]:
    """A context whose coordinator times every op (its steps' telemetry gets times)."""
    c = pg.ManagedGpuContext(backend=backend, timing=True)
    yield c
    c.close()


@pytest.fixture
def latch(backend: str, coord: pg.AsyncCoordinator) -> Iterator[Latch]:
    """A latch registered on ``coord`` as ``"latch"``; released before ``coord`` closes."""
    lt = make_latch(backend)
    coord.register_kernel("latch", lt.kernel)
    yield lt
    lt.release()


def _suspects(before: set) -> list:
    return [t for t in threading.enumerate()
            if t not in before and t.is_alive()
            and (t.name.startswith("prism-gpu") or not t.daemon)]


@pytest.fixture
def no_thread_leaks() -> Iterator[None]:
    """Fail if the test leaves new prism-gpu (or non-daemon) threads running.

    Request it last: its snapshot then includes the threads of the other
    fixtures, and its check runs before they are torn down.
    """
    before = set(threading.enumerate())
    yield
    gc.collect()
    leaked = _suspects(before)
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"
