"""Hand device work to CuPy, PyTorch and Numba without hidden synchronization.

``use_stream(stream)`` makes ``stream`` the current stream of CuPy and PyTorch
(each only if already imported) for the duration of a ``with`` block, so code
such as ``cupy.asarray(x) * 2`` inside it is ordered on that stream.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

from .backends._protocol import Stream

__all__ = ["use_stream"]


@contextlib.contextmanager
def use_stream(stream: Any) -> Iterator[Any]:
    """Make ``stream`` (a prism-gpu stream) current for CuPy and PyTorch in this block.

    On the CPU backend there is no device stream to share and this does nothing.
    """
    if not isinstance(stream, Stream):  # a CuPy/PyTorch stream would switch nothing
        raise TypeError(f"use_stream takes a prism-gpu stream (e.g. coord.compute_stream()), "
                        f"got {type(stream).__name__}")
    enter = getattr(stream, "_interop_enter", None)
    if enter is None:
        yield stream
        return
    with contextlib.ExitStack() as stack:
        for ctx in enter(sys.modules):
            stack.enter_context(ctx)
        yield stream
