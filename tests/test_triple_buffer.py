"""TripleBuffer: the slot state machine, its ring order, and thread safety."""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, List, Optional

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule, run_state_machine_as_test)

import prism_gpu as pg
from _support import ring_ordered

FREE, UP, PROC, DOWN = (pg.BufferState.FREE, pg.BufferState.UPLOADING,
                        pg.BufferState.PROCESSING, pg.BufferState.DOWNLOADING)


def test_new_buffer(device: Any) -> None:
    buf = pg.TripleBuffer(device, 1024, dtype=np.float32)
    assert buf.size() == 1024
    assert buf.get_states() == [FREE] * 3
    slot = buf.get_upload_buffer()
    assert slot is not None
    assert slot.index == 0 and slot.state is UP
    assert len(slot.array) == 1024
    assert np.dtype(slot.array.dtype) == np.float32


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_depth(device: Any, depth: int) -> None:
    buf = pg.TripleBuffer(device, 8, dtype=np.int32, depth=depth)
    assert buf.get_states() == [FREE] * depth
    assert len({id(s) for s in (buf.get_upload_buffer() for _ in range(depth))}) == depth
    assert buf.get_upload_buffer() is None


@pytest.mark.parametrize("kwargs", [{"size": 0}, {"size": -3}, {"size": 4, "depth": 0}])
def test_invalid_arguments(device: Any, kwargs: Dict[str, int]) -> None:
    with pytest.raises(ValueError):
        pg.TripleBuffer(device, **kwargs)


def test_one_slot_through_every_state(device: Any) -> None:
    buf = pg.TripleBuffer(device, 16)
    assert buf.get_process_buffer() is None
    assert buf.get_download_buffer() is None
    assert buf.advance() is False
    assert buf.get_states() == [FREE] * 3

    up = buf.get_upload_buffer()
    assert buf.get_states() == [UP, FREE, FREE]
    assert buf.get_download_buffer() is None           # not processed yet
    proc = buf.get_process_buffer()
    assert proc is up and proc.state is PROC
    assert buf.get_states() == [PROC, FREE, FREE]
    assert buf.advance() is False                       # not downloading yet
    down = buf.get_download_buffer()
    assert down is up and down.state is DOWN
    assert buf.get_states() == [DOWN, FREE, FREE]
    assert buf.advance() is True
    assert up.state is FREE
    assert buf.get_states() == [FREE] * 3
    assert buf.advance() is False


def test_overlapped_loop_uses_slots_in_ring_order(device: Any) -> None:
    """Iteration k uploads slot k % depth while k-1 computes and k-2 downloads."""
    depth = 3
    buf = pg.TripleBuffer(device, 4, depth=depth)
    for k in range(4 * depth):
        assert buf.get_upload_buffer().index == k % depth
        if k >= 1:
            assert buf.get_process_buffer().index == (k - 1) % depth
        if k >= 2:
            assert buf.get_download_buffer().index == (k - 2) % depth
            assert buf.advance() is True
        assert ring_ordered(buf.get_states())


def test_closed_buffer_rejects_transitions(device: Any) -> None:
    buf = pg.TripleBuffer(device, 4)
    buf.close()
    for take in (buf.get_upload_buffer, buf.get_process_buffer, buf.get_download_buffer,
                 buf.advance):
        with pytest.raises(pg.InvalidOperationError):
            take()


# --- model-based test --------------------------------------------------------------------

class _Model:
    """Counters per role: slot of the k-th take is k % depth."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.uploaded = self.processed = self.downloaded = self.freed = 0

    def states(self) -> List[pg.BufferState]:
        out = [FREE] * self.depth
        for k in range(self.freed, self.uploaded):
            out[k % self.depth] = (DOWN if k < self.downloaded else
                                   PROC if k < self.processed else UP)
        return out


def _machine(device: Any) -> type:
    class TripleBufferMachine(RuleBasedStateMachine):
        buf: Optional[pg.TripleBuffer] = None

        @initialize(depth=st.integers(1, 5))
        def make(self, depth: int) -> None:
            self.buf = pg.TripleBuffer(device, 4, dtype=np.float32, depth=depth)
            self.model = _Model(depth)

        def _check_take(self, slot: Any, k: int, can: bool, state: pg.BufferState) -> bool:
            if not can:
                assert slot is None
                return False
            assert slot is not None
            assert slot.index == k % self.model.depth
            assert slot.state is state
            return True

        @rule()
        def upload(self) -> None:
            m = self.model
            can = m.uploaded - m.freed < m.depth
            if self._check_take(self.buf.get_upload_buffer(), m.uploaded, can, UP):
                m.uploaded += 1

        @rule()
        def process(self) -> None:
            m = self.model
            can = m.processed < m.uploaded
            if self._check_take(self.buf.get_process_buffer(), m.processed, can, PROC):
                m.processed += 1

        @rule()
        def download(self) -> None:
            m = self.model
            can = m.downloaded < m.processed
            if self._check_take(self.buf.get_download_buffer(), m.downloaded, can, DOWN):
                m.downloaded += 1

        @rule()
        def advance(self) -> None:
            m = self.model
            can = m.freed < m.downloaded
            assert self.buf.advance() is can
            if can:
                m.freed += 1

        @precondition(lambda self: self.buf is not None)
        @invariant()
        def states_match(self) -> None:
            assert self.buf.get_states() == self.model.states()
            assert self.buf.size() == 4

        def teardown(self) -> None:
            if self.buf is not None:
                self.buf.close()

    return TripleBufferMachine


def test_state_machine_matches_model(device: Any) -> None:
    run_state_machine_as_test(
        _machine(device),
        settings=settings(max_examples=50, stateful_step_count=40, deadline=None))


# --- thread safety -----------------------------------------------------------------------

def test_three_threads_one_role_each(device: Any) -> None:
    depth, rounds = 3, 2000
    buf = pg.TripleBuffer(device, 4, depth=depth)
    seen: Dict[str, List[int]] = {"upload": [], "process": [], "download": []}
    bad_states: List[list] = []
    errors: List[BaseException] = []
    stop = threading.Event()

    def drive(role: str, take: Any, then: Any = None) -> None:
        try:
            deadline = time.monotonic() + 120  # only a broken buffer gets near this
            for _ in range(rounds):
                while (slot := take()) is None:
                    if stop.is_set() or time.monotonic() > deadline:
                        raise RuntimeError(f"{role} starved")
                    time.sleep(0)
                seen[role].append(slot.index)
                states = buf.get_states()
                if not ring_ordered(states):
                    bad_states.append(states)
                if then is not None and not then():
                    raise AssertionError(f"{role}: advance() found nothing DOWNLOADING")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            stop.set()

    threads = [
        threading.Thread(target=drive, args=("upload", buf.get_upload_buffer)),
        threading.Thread(target=drive, args=("process", buf.get_process_buffer)),
        threading.Thread(target=drive, args=("download", buf.get_download_buffer,
                                             buf.advance)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not errors, errors
    assert not bad_states, bad_states[:5]
    for role, indices in seen.items():
        assert indices == [r % depth for r in range(rounds)], role
    assert buf.get_states() == [FREE] * depth
