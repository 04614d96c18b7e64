"""Kernels: CUDA C++ source (compiled by the CUDA backend) or Python callables."""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Callable, Mapping, Optional, Sequence

from ._args import sequence_arg
from ._config import LaunchConfig

__all__ = ["Kernel"]

_ACCEPTS: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def _accepts_stream(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` takes a ``stream`` keyword (cached weakly: a signature is slow)."""
    try:
        return _ACCEPTS[fn]
    except (KeyError, TypeError):
        pass
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    p = sig.parameters.get("stream")
    answer = p is not None and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    try:
        _ACCEPTS[fn] = answer
    except TypeError:  # not weakly referenceable: not cached
        pass
    return answer


class Kernel:
    """A unit of device work.

    Build one with :meth:`from_callable` (a Python function of the device
    arrays) or :meth:`from_source` (CUDA C++ compiled with NVRTC, with an
    optional ``cpu=`` version for the CPU backend).

    Callables are called ``fn(*arrays, *extra)``; CUDA C++ kernels get each
    array as a pointer followed by its element count (``size_t n``), then the
    extra scalars. ``check``, if given, is called with the values a launch passes after
    the arrays (``extra``, its defaults, or ``args``) when the launch is queued, on
    every backend, and raises for values the kernel cannot take (nothing is queued).
    """

    __slots__ = ("name", "fn", "source", "entry", "config", "cpu", "uses_arrays",
                 "defaults", "accepts_stream", "options", "check", "__weakref__")

    def __init__(self, name: str, *, fn: Optional[Callable[..., Any]] = None,
                 source: Optional[str] = None, entry: Optional[str] = None,
                 config: Optional[LaunchConfig] = None,
                 cpu: Optional[Callable[..., Any]] = None, uses_arrays: bool = True,
                 defaults: Sequence[Any] = (), options: Optional[Mapping[str, Any]] = None,
                 check: Optional[Callable[[Sequence[Any]], None]] = None) -> None:
        if (fn is None) == (source is None):
            raise ValueError("a Kernel has exactly one of fn= or source=")
        if config is not None and not isinstance(config, LaunchConfig):
            raise TypeError(f"config must be a LaunchConfig, got {type(config).__name__}")
        if check is not None and not callable(check):
            raise TypeError("check= must be a callable")
        for f in (fn, cpu):
            if f is not None and _runs_nothing(f):
                raise TypeError(f"kernel {name!r} is a generator or async function: calling it "
                                "runs none of its body; a kernel does its work when called")
        self.name = name
        self.fn = fn
        self.source = source
        self.entry = entry
        self.config = config
        self.cpu = cpu
        self.uses_arrays = uses_arrays
        self.defaults = sequence_arg(defaults, "defaults") or ()
        self.options = dict(options or {})
        self.check = check
        target = fn if fn is not None else cpu
        self.accepts_stream = target is not None and _accepts_stream(target)

    @classmethod
    def from_callable(cls, fn: Callable[..., Any], name: Optional[str] = None, *,
                      config: Optional[LaunchConfig] = None, defaults: Sequence[Any] = (),
                      check: Optional[Callable[[Sequence[Any]], None]] = None) -> "Kernel":
        """Wrap ``fn(*arrays, *extra)``. If ``fn`` takes a ``stream`` keyword it gets the
        stream it runs on (on CUDA: an object implementing ``__cuda_stream__``)."""
        if not callable(fn):
            raise TypeError(f"Kernel.from_callable needs a callable, got {type(fn).__name__}")
        return cls(name or str(getattr(fn, "__name__", "kernel")), fn=fn, config=config,
                   defaults=defaults, check=check)

    @classmethod
    def from_source(cls, source: str, entry: str, *, config: Optional[LaunchConfig] = None,
                    cpu: Optional[Callable[..., Any]] = None, name: Optional[str] = None,
                    options: Optional[Mapping[str, Any]] = None, defaults: Sequence[Any] = (),
                    check: Optional[Callable[[Sequence[Any]], None]] = None) -> "Kernel":
        """CUDA C++ ``source`` whose ``extern "C" __global__`` function ``entry`` is the
        kernel. Compiled with NVRTC (and cached in memory and on disk) by the CUDA
        backend; ``options`` are extra ``cuda.core.ProgramOptions`` fields. ``cpu`` is
        the version the CPU backend runs; without it the CPU backend refuses the kernel.
        Scalars are converted to the exact C types the signature declares."""
        if not isinstance(source, str) or not source.strip():
            raise ValueError("Kernel.from_source needs CUDA C++ source text")
        if not isinstance(entry, str) or not entry.isidentifier():
            raise ValueError(f"entry must be the kernel's function name, got {entry!r}")
        if cpu is not None and not callable(cpu):
            raise TypeError("cpu= must be a callable")
        return cls(name or entry, source=source, entry=entry, config=config, cpu=cpu,
                   options=options, defaults=defaults, check=check)

    def cpu_callable(self) -> Optional[Callable[..., Any]]:
        """What the CPU backend runs: the callable, or the source kernel's ``cpu=``."""
        return self.fn if self.fn is not None else self.cpu

    def __repr__(self) -> str:
        kind = "callable" if self.fn is not None else "source"
        return f"Kernel({self.name!r}, {kind})"


def _runs_nothing(f: Any) -> bool:
    """Whether calling ``f`` (or its ``__call__``) only makes a generator or coroutine."""
    for g in (f, getattr(type(f), "__call__", None)):
        if g is not None and (inspect.isgeneratorfunction(g) or inspect.iscoroutinefunction(g)
                              or inspect.isasyncgenfunction(g)):
            return True
    return False


def as_kernel(obj: Any, name: Optional[str] = None) -> Kernel:
    """A Kernel from a Kernel or a plain callable."""
    if isinstance(obj, Kernel):
        return obj
    if callable(obj):
        return Kernel.from_callable(obj, name)
    raise TypeError(f"expected a prism_gpu.Kernel or a callable, got {type(obj).__name__}")
