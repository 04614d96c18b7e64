"""Shortcuts of the compiled queue calls, on both cores: a registered name is looked up
in the registry's ``named`` table directly, an engine's own ``submit`` is called without
a method lookup, a ring's capacity is read from its slots. Each must answer as the
Python reference does, including where a subclass or a later change is in the way."""

from __future__ import annotations

import warnings
from typing import Any, List

import numpy as np
import pytest

import prism_gpu as pg
from prism_gpu import _coordinator, _core, _queue
from prism_gpu._coordinator import AsyncCoordinator
from prism_gpu._engine import Engine
from _support import F32, MUL3_SRC, add1, mul3, over_reference

PyCoordinator = over_reference(AsyncCoordinator, _queue.PyQueueCore)
CORES = [pytest.param(PyCoordinator, id="python"),
         pytest.param(AsyncCoordinator, id="compiled", marks=pytest.mark.skipif(
             not _core.COMPILED, reason=f"the compiled core is {_core.STATUS}"))]
N = 512


def _iterate(coord: Any, buf: pg.TripleBuffer, x: np.ndarray, out: np.ndarray,
             kernel: Any) -> None:
    up = coord.queue_upload(x, buf)
    coord.queue_compute(kernel, [up])
    d = coord.queue_download(buf, out)
    buf.advance()
    coord.wait(d)


def _after_one_iteration(coord: Any, device: Any, rng: np.random.Generator) -> Any:
    """``mul3`` registered, a ring, a random input and an output, one iteration run on
    them: (ring, input, output)."""
    coord.register_kernel("mul3", mul3())
    buf = pg.TripleBuffer(device, N)
    x, out = rng.standard_normal(N).astype(F32), np.empty(N, F32)
    _iterate(coord, buf, x, out, "mul3")
    return buf, x, out


@pytest.mark.parametrize("make", CORES)
def test_a_name_registered_again_runs_its_new_kernel(make: Any, device: Any) -> None:
    """The compiled lookup reads the live table: a name registered again runs the new
    kernel on the next compute, and a name never registered still says which are."""
    rng = np.random.default_rng(11)
    with make(device) as coord:
        buf = pg.TripleBuffer(device, N)
        out = np.empty(N, F32)
        coord.register_kernel("k", mul3())
        x = rng.standard_normal(N).astype(F32)
        _iterate(coord, buf, x, out, "k")
        np.testing.assert_array_equal(out, x * F32(3))
        coord.register_kernel("k", add1())
        x = rng.standard_normal(N).astype(F32)
        _iterate(coord, buf, x, out, "k")
        np.testing.assert_array_equal(out, x + F32(1))
        up = coord.queue_upload(x, buf)
        with pytest.raises(pg.InvalidOperationError, match="no kernel named 'nope'; known: "):
            coord.queue_compute("nope", [up])
        coord.synchronize_all()


@pytest.mark.parametrize("make", CORES)
def test_a_builtin_name_resolves_on_first_use(make: Any, device: Any) -> None:
    """A built-in is not in the registered table until first used: the lookup misses and
    the registry's resolve prepares it (then the table has it)."""
    rng = np.random.default_rng(12)
    with make(device) as coord:
        buf = pg.TripleBuffer(device, N)
        out = np.empty(N, F32)
        assert not coord.has_kernel("scale")
        x = rng.standard_normal(N).astype(F32)
        up = coord.queue_upload(x, buf)
        coord.queue_compute("scale", [up], extra=(2.0,))
        d = coord.queue_download(buf, out)
        buf.advance()
        coord.wait(d)
        np.testing.assert_allclose(out, x * F32(2), rtol=1e-6)
        assert coord.has_kernel("scale")


class _CountingEngine(Engine):
    """An engine whose class has its own submit: every op must go through it."""

    submits: List[Any] = []

    def submit(self, *args: Any, **kw: Any) -> Any:
        op = super().submit(*args, **kw)
        _CountingEngine.submits.append(op.type)
        return op


@pytest.mark.parametrize("make", CORES)
def test_an_engine_overriding_submit_is_called(make: Any, device: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled queue calls call an engine's submit directly only when its class has
    the core's own; an override is called, for each of the three ops."""
    monkeypatch.setattr(_coordinator, "Engine", _CountingEngine)
    _CountingEngine.submits = []
    rng = np.random.default_rng(13)
    with make(device) as coord:
        assert type(coord.engine) is _CountingEngine
        coord.register_kernel("mul3", mul3())
        buf = pg.TripleBuffer(device, N)
        out = np.empty(N, F32)
        for _ in range(4):
            x = rng.standard_normal(N).astype(F32)
            _iterate(coord, buf, x, out, "mul3")
            np.testing.assert_array_equal(out, x * F32(3))
    types = [pg.OpType.UPLOAD, pg.OpType.COMPUTE, pg.OpType.DOWNLOAD]
    assert _CountingEngine.submits == types * 4


@pytest.mark.parametrize("make", CORES)
def test_capacity_read_from_the_slots_bounds_an_upload(make: Any, device: Any) -> None:
    """An upload longer than the ring's slots is refused, naming both sizes, and changes
    nothing; one exactly as long goes."""
    rng = np.random.default_rng(14)
    with make(device) as coord:
        buf = pg.TripleBuffer(device, N)
        with pytest.raises(pg.TransferError, match=f"{N + 1}.*{N}"):
            coord.queue_upload(np.ones(N + 1, F32), buf)
        assert [s.name for s in buf.get_states()] == ["FREE"] * 3
        coord.register_kernel("mul3", mul3())
        out = np.empty(N, F32)
        x = rng.standard_normal(N).astype(F32)
        _iterate(coord, buf, x, out, "mul3")
        np.testing.assert_array_equal(out, x * F32(3))


@pytest.mark.parametrize("make", CORES)
def test_a_closed_device_refuses_the_next_queue_call(make: Any) -> None:
    """A device's ``closed`` (a plain attribute) is read by every queue call: closing the
    device under the coordinator makes the next one refuse, saying so."""
    dev = pg.open_device("cpu")
    coord = make(dev)
    buf = pg.TripleBuffer(dev, N)
    x = np.ones(N, F32)
    coord.wait(coord.queue_upload(x, buf))
    dev.close()
    assert dev.closed
    with pytest.raises(pg.InvalidOperationError, match="closed"):
        coord.queue_upload(x, buf)
    coord.close()


def test_the_compiled_core_reads_this_numpys_array_fields() -> None:
    """The queue calls read a plain array's dtype, flags and shape from its struct where
    setup found the struct to match what Python sees; on this numpy it must."""
    if not _core.COMPILED:
        pytest.skip(f"the compiled core is {_core.STATUS}")
    from prism_gpu import _ccore  # type: ignore[attr-defined]

    assert _ccore.np_fields() is True


@pytest.mark.parametrize("make", CORES)
def test_an_array_changed_in_place_is_checked_again(make: Any, device: Any) -> None:
    """The same array object, changed between calls (made read-only, reshaped, given
    another dtype in place), is checked again as it is now: a read-only destination is
    refused, a reshaped input goes, an input of another dtype is refused; each refusal
    leaves the ring as it was."""
    rng = np.random.default_rng(15)
    with make(device) as coord:
        buf, x, out = _after_one_iteration(coord, device, rng)
        np.testing.assert_array_equal(out, x * F32(3))
        out.flags.writeable = False
        up = coord.queue_upload(x, buf)
        coord.queue_compute("mul3", [up])
        before = buf.get_states()
        with pytest.raises(pg.PrismGpuError, match="read-only|writ"):
            coord.queue_download(buf, out)
        assert buf.get_states() == before
        out.flags.writeable = True
        coord.wait(coord.queue_download(buf, out))
        buf.advance()
        np.testing.assert_array_equal(out, x * F32(3))
        x = rng.standard_normal(N).astype(F32)
        x.resize((N // 2, 2), refcheck=False)  # (its struct's shape, in place)
        _iterate(coord, buf, x, out, "mul3")
        np.testing.assert_array_equal(out, x.reshape(-1) * F32(3))
        x.resize((N,), refcheck=False)
        with warnings.catch_warnings():  # (setting a dtype in place: deprecated lately)
            warnings.simplefilter("ignore", DeprecationWarning)
            x.dtype = np.int32
        states = buf.get_states()
        with pytest.raises(pg.PrismGpuError, match="int32|dtype"):
            coord.queue_upload(x, buf)
        assert buf.get_states() == states
        coord.synchronize_all()


@pytest.mark.parametrize("make", CORES)
def test_a_kernel_attribute_replaced_on_the_class_is_read(
        make: Any, device: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel's fields are read from their slots while the class stands as it was: once
    the class replaces one (here ``check``, with a property refusing every value), the
    next compute reads it, and is refused; put back, the slot is read again."""
    rng = np.random.default_rng(16)
    with make(device) as coord:
        buf, x, out = _after_one_iteration(coord, device, rng)

        def refuse(values: Any) -> None:
            raise ValueError("refused by the replaced check")
        with monkeypatch.context() as m:
            m.setattr(pg.Kernel, "check", property(lambda self: refuse))
            up = coord.queue_upload(x, buf)
            with pytest.raises(ValueError, match="replaced check"):
                coord.queue_compute("mul3", [up])
            coord.wait(up)
        x = rng.standard_normal(N).astype(F32)
        coord.queue_compute("mul3", [up])  # the upload still waits for its compute
        d = coord.queue_download(buf, out)
        buf.advance()
        coord.wait(d)
        x2 = rng.standard_normal(N).astype(F32)
        _iterate(coord, buf, x2, out, "mul3")
        np.testing.assert_array_equal(out, x2 * F32(3))


class _Refusing(pg.Kernel):
    """A kernel whose class answers ``check`` from its own ``__getattribute__``."""

    def __getattribute__(self, name: str) -> Any:
        if name == "check":
            def refuse(values: Any) -> None:
                raise ValueError("refused by __getattribute__")
            return refuse
        return super().__getattribute__(name)


@pytest.mark.parametrize("make", CORES)
def test_a_kernel_class_with_its_own_getattribute_is_asked(make: Any, device: Any) -> None:
    """A slot is read directly only for a class with the generic attribute lookup: a
    kernel class with its own ``__getattribute__`` is asked, after a plain kernel's
    slots were read at the same call site; the refused compute queues nothing."""
    rng = np.random.default_rng(17)
    with make(device) as coord:
        coord.register_kernel("refusing", _Refusing.from_source(
            MUL3_SRC, "mul3", cpu=lambda a: None))
        buf, x, out = _after_one_iteration(coord, device, rng)
        up = coord.queue_upload(x, buf)
        for _ in range(3):  # (a call site keeps what its first lookup found)
            with pytest.raises(ValueError, match="__getattribute__"):
                coord.queue_compute("refusing", [up])
        coord.queue_compute("mul3", [up])
        d = coord.queue_download(buf, out)
        buf.advance()
        coord.wait(d)
        np.testing.assert_array_equal(out, x * F32(3))


class _OtherSlots:
    __slots__ = ("a", "b")


class _Borrowing(pg.Kernel):
    """A kernel class given another class's member as ``check`` (getattr refuses it)."""

    __slots__ = ()


@pytest.mark.parametrize("make", CORES)
def test_a_member_of_another_class_is_never_read_at_its_offset(
        make: Any, device: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A member descriptor of an unrelated class set on a kernel class: getattr refuses it
    (TypeError), on every call, and the kernel's own function is never taken for it."""
    ran: List[Any] = []
    k = _Borrowing("borrowing", fn=lambda *a: ran.append(a))
    monkeypatch.setattr(_Borrowing, "check", _OtherSlots.__dict__["b"], raising=False)
    with make(device) as coord:
        coord.register_kernel("borrowing", k)
        buf = pg.TripleBuffer(device, N)
        up = coord.queue_upload(np.ones(N, F32), buf)
        for _ in range(3):
            with pytest.raises(TypeError, match="doesn't apply|does not apply"):
                coord.queue_compute("borrowing", [up])
        assert ran == []
        coord.synchronize_all()


@pytest.mark.parametrize("make", CORES)
def test_a_kernel_given_by_object_is_prepared_once_and_held_weakly(
        make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Kernel passed to queue_compute itself (not by name) is prepared on first use and
    found again after (the compiled lookup reads the registry's weak mapping); each new
    object is prepared once; a kernel dropped leaves the mapping; the results are right."""
    import gc
    import weakref

    dev = pg.open_device("cpu")
    prepared: List[Any] = []
    real = dev.prepare_kernel
    monkeypatch.setattr(dev, "prepare_kernel", lambda k: prepared.append(id(k)) or real(k))
    rng = np.random.default_rng(18)
    with make(dev) as coord:
        buf = pg.TripleBuffer(dev, N)
        out = np.empty(N, F32)
        k = mul3()
        for _ in range(5):
            x = rng.standard_normal(N).astype(F32)
            _iterate(coord, buf, x, out, k)
            np.testing.assert_array_equal(out, x * F32(3))
        assert prepared == [id(k)]
        other = add1()
        for _ in range(3):
            x = rng.standard_normal(N).astype(F32)
            _iterate(coord, buf, x, out, other)
            np.testing.assert_array_equal(out, x + F32(1))
        assert prepared == [id(k), id(other)]
        refs = [weakref.ref(other)]
        del other
        for _ in range(20):  # kernels made per request, each used once
            fresh = add1()
            refs.append(weakref.ref(fresh))
            x = rng.standard_normal(N).astype(F32)
            _iterate(coord, buf, x, out, fresh)
            np.testing.assert_array_equal(out, x + F32(1))
            del fresh
        coord.synchronize_all()
        coord.poll()
        gc.collect()
        alive = sum(r() is not None for r in refs)
        assert alive <= 1, f"{alive} of 21 kernels given by object are kept"
        assert len(prepared) == 22
    dev.close()
