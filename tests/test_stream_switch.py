"""The PyTorch stream switch of callable kernels (backends/cuda/_interop.py), against a
stand-in for torch's stream state: per thread, a current device and a current stream per
device; setting a stream makes its device current (as torch's own call does). Runs
without a GPU; the GPU suite checks the same switch against PyTorch itself."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any, Dict, Tuple

import pytest

from prism_gpu.backends.cuda import _interop


class FakeStream:
    def __init__(self, sid: int, device: int) -> None:
        self.stream_id, self.device_index, self.device_type = sid, device, 1

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, FakeStream) and other.stream_id == self.stream_id

    def __hash__(self) -> int:
        return self.stream_id


def fake_torch(raw: bool) -> Any:
    local = threading.local()

    def state() -> Tuple[list, Dict[int, int]]:
        if not hasattr(local, "device"):
            local.device, local.streams = [0], {0: 0, 1: 0}  # default streams: id 0
        return local.device, local.streams

    def current_device() -> int:
        return state()[0][0]

    def get(device: int) -> Tuple[int, int, int]:
        return (state()[1][device], device, 1)

    def put(stream_id: int, device_index: int, device_type: int) -> None:
        dev, streams = state()
        dev[0] = device_index
        streams[device_index] = stream_id

    cuda = SimpleNamespace(
        current_device=current_device,
        current_stream=lambda d: FakeStream(state()[1][d], d),
        set_stream=lambda s: put(s.stream_id, s.device_index, s.device_type),
        is_available=lambda: True)
    c = SimpleNamespace(_cuda_getCurrentStream=get, _cuda_setStream=put) if raw \
        else SimpleNamespace()
    return SimpleNamespace(cuda=cuda, _C=c, state=state)


@pytest.fixture(params=["raw", "public"])
def torch(request: Any) -> Any:
    return fake_torch(request.param == "raw")


def snapshot(torch: Any) -> Tuple[int, Dict[int, int]]:
    dev, streams = torch.state()
    return dev[0], dict(streams)


@pytest.mark.parametrize("here", [0, 1])
def test_the_switch_restores_what_torch_cuda_stream_restores(torch: Any, here: int) -> None:
    # the stream lives on device 0; the thread's current device is ``here``
    torch.cuda.set_stream(FakeStream(5, 1))
    torch.cuda.set_stream(FakeStream(6, 0))
    torch.cuda.set_stream(FakeStream(7 if here == 1 else 6, here))
    before = snapshot(torch)
    sw = _interop.TorchCurrent(torch, FakeStream(42, 0), 0)
    with sw:
        assert snapshot(torch) == (0, {**before[1], 0: 42})
        with sw:  # nested (use_stream inside a callable on the same stream)
            assert snapshot(torch)[1][0] == 42
        assert snapshot(torch) == (0, {**before[1], 0: 42})
    assert snapshot(torch) == before


def test_threads_switching_one_stream_at_once_restore_their_own_streams(torch: Any) -> None:
    sw = _interop.TorchCurrent(torch, FakeStream(42, 0), 0)
    entered = threading.Barrier(2)
    a_left = threading.Event()
    seen: Dict[str, Any] = {}

    def a() -> None:  # starts on device 1, leaves first
        torch.cuda.set_stream(FakeStream(11, 1))
        before = snapshot(torch)
        with sw:
            entered.wait(10)
        a_left.set()
        seen["a"] = (before, snapshot(torch))

    def b() -> None:  # starts on device 0 with its own stream, leaves after a
        torch.cuda.set_stream(FakeStream(22, 0))
        before = snapshot(torch)
        with sw:
            entered.wait(10)
            a_left.wait(10)
        seen["b"] = (before, snapshot(torch))

    threads = [threading.Thread(target=a, daemon=True), threading.Thread(target=b, daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert seen["a"][0] == seen["a"][1] and seen["b"][0] == seen["b"][1]


def test_a_torch_without_raw_calls_or_with_odd_ones_takes_the_public_ones() -> None:
    torch = fake_torch(True)
    torch._C._cuda_getCurrentStream = lambda d: [0, d, 1]  # a list: not what is known
    assert _interop._raw_stream_calls(torch, 0) == (None, None)
    torch = fake_torch(True)

    def broken(**kw: Any) -> None:
        raise RuntimeError("another signature")
    torch._C._cuda_setStream = broken
    assert _interop._raw_stream_calls(torch, 0) == (None, None)
    before = snapshot(torch)
    with _interop.TorchCurrent(torch, FakeStream(9, 0), 0):
        assert snapshot(torch)[1][0] == 9
    assert snapshot(torch) == before


def test_leaving_the_switches_keeps_the_kernels_error_and_leaves_every_one() -> None:
    left = []

    class Switch:
        def __init__(self, name: str, fails: bool) -> None:
            self.name, self.fails = name, fails

        def __exit__(self, *exc: Any) -> None:
            left.append(self.name)
            if self.fails:
                raise RuntimeError(f"leaving {self.name}")

    switches = [Switch("a", True), Switch("b", False), Switch("c", True)]
    own = ValueError("the kernel's own")
    _interop.leave(switches, own)  # the kernel's error stays the one its caller raises
    assert left == ["c", "b", "a"]
    assert own.__notes__ == [
        "also, restoring the CuPy/PyTorch streams failed: RuntimeError('leaving c')",
        "also, restoring the CuPy/PyTorch streams failed: RuntimeError('leaving a')"]
    left.clear()
    with pytest.raises(RuntimeError, match="leaving c") as info:
        _interop.leave(switches, None)  # no kernel error: the first leaving failure, noted
    assert left == ["c", "b", "a"]
    assert info.value.__notes__ == [
        "also, restoring the CuPy/PyTorch streams failed: RuntimeError('leaving a')"]
    left.clear()
    _interop.leave([Switch("a", False)], None)  # nothing failed: nothing raised
    assert left == ["a"]
