"""The kernel registry of one coordinator: names, built-ins, and kernels passed directly.

Named kernels are kept (the user registered them). Kernels passed directly are
prepared once and cached weakly, so a program creating kernels per request
does not keep them alive; plain callables are wrapped per use (cheap) and
never cached, so one-off lambdas are freed as soon as their ops complete.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, Tuple

from ._builtins import builtin_kernels
from ._errors import InvalidOperationError
from ._kernels import Kernel, as_kernel

__all__ = ["KernelRegistry"]

Entry = Tuple[Kernel, Any]


class KernelRegistry:
    """Resolves a kernel name, :class:`Kernel` or callable to (kernel, prepared)."""

    def __init__(self, prepare: Callable[[Kernel], Any]) -> None:
        self._prepare = prepare
        # name -> (kernel, prepared): the kernels registered by name (and built-ins once
        # used); read directly by the compiled queue core, so never rebound
        self.named: Dict[str, Entry] = {}
        self._builtins = builtin_kernels()
        # Kernel -> prepared; the prepared form never refers back to its Kernel. Read
        # directly by the compiled queue core (through the mapping's ``data``), so never
        # rebound
        self.direct: "weakref.WeakKeyDictionary[Kernel, Any]" = weakref.WeakKeyDictionary()

    def register(self, name: str, kernel: Any) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"kernel name must be a non-empty str, got {name!r}")
        k = as_kernel(kernel, name)
        self.named[name] = (k, self._prepare(k))

    def prepared(self, name: str) -> bool:
        """Whether kernel ``name`` is registered and prepared (a built-in once used)."""
        return type(name) is str and name in self.named

    def resolve(self, kernel: Any) -> Entry:
        if isinstance(kernel, str):
            entry = self.named.get(kernel)
            if entry is None:
                k = self._builtins.get(kernel)
                if k is None:
                    known = sorted(set(self.named) | set(self._builtins))
                    raise InvalidOperationError(
                        f"no kernel named {kernel!r}; known: {', '.join(known)}. "
                        "Register it first with coord.register_kernel(name, kernel)")
                entry = self.named[kernel] = (k, self._prepare(k))
            return entry
        if isinstance(kernel, Kernel):
            prepared = self.direct.get(kernel)
            if prepared is None:
                prepared = self.direct[kernel] = self._prepare(kernel)
            return kernel, prepared
        if callable(kernel):
            k = as_kernel(kernel)
            return k, self._prepare(k)
        raise TypeError(f"kernel must be a registered name, a prism_gpu.Kernel or a callable, "
                        f"got {type(kernel).__name__}")

    def __len__(self) -> int:
        return len(self.named) + len(self.direct)

    def clear(self) -> None:
        self.named.clear()
        self.direct.clear()
