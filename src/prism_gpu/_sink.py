"""Where results go: a pinned array from the result pool, or the caller's ``out[i]``."""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import math
import numpy as np

from ._copypool import DONE, Ticket
from ._errors import TransferError
from ._staging import ResultLease, ResultPool, Stager

__all__ = ["Sink", "check_out"]


def check_out(out: Any) -> None:
    if out is not None and not hasattr(out, "__getitem__"):
        raise TypeError(f"out must be an array or a sequence of arrays (out[i] is result i), "
                        f"got {type(out).__name__}")


class Sink:
    """Result ``i`` goes into ``out[i]`` when ``out`` is given, else into the result pool.

    ``out[i]`` must be a writable numpy array with the result's dtype and number
    of elements (any shape and layout). Page-locked ``out[i]`` (from
    :func:`pinned_empty`, or inside :func:`register`) gets the download
    directly; pageable ``out[i]`` gets it through pinned memory, copied by the
    stager's workers.
    """

    def __init__(self, out: Any, device: Any, stager: Stager,
                 results: Union[ResultPool, ResultLease]) -> None:
        self._out = out
        self.device = device
        self._stager = stager
        self.results = results  # where results go without ``out``

    def claim(self, pos: int, shape: Tuple[int, ...], dtype: np.dtype) -> Optional[np.ndarray]:
        """``out[pos]`` checked against the result's shape and dtype (None without ``out``).
        Called before anything of batch ``pos`` is queued."""
        if self._out is None:
            return None
        try:
            final = self._out[pos]
        except (IndexError, KeyError) as exc:
            raise TransferError(f"out has no element {pos} ({exc}); pass an out with one "
                                "entry per batch") from exc
        if not isinstance(final, np.ndarray):
            raise TransferError(f"out[{pos}] is a {type(final).__name__}, not a numpy array")
        if final.dtype != dtype:
            raise TransferError(f"out[{pos}] has dtype {final.dtype}, result {pos} is {dtype}"
                                " (prism-gpu never converts silently)")
        size = math.prod(shape)
        if final.size != size:
            raise TransferError(f"out[{pos}] holds {final.size} elements (shape "
                                f"{final.shape}), result {pos} has {size} (shape {shape})")
        if not final.flags.writeable:
            raise TransferError(f"out[{pos}] is read-only; pass writable memory")
        return final

    def destination(self, final: Optional[np.ndarray], shape: Tuple[int, ...],
                    dtype: np.dtype) -> np.ndarray:
        """What the download writes: ``final`` itself when it is page-locked and
        contiguous, else pinned memory from the pool."""
        if final is None:
            return self.results.empty(self.device, shape, dtype)
        if final.flags.c_contiguous and self.device.is_pinned(final):
            return final
        return self.results.empty(self.device, final.shape, dtype)

    def start(self, dest: np.ndarray, final: Optional[np.ndarray]) -> Ticket:
        """Begin moving a complete download from ``dest`` into ``final``."""
        if final is None or dest is final:
            return DONE
        # results are waited for in order, staging copies only batches later
        return self._stager.copy(final, dest, urgent=self._stager.URGENT_RESULTS)

    def deliver(self, dest: np.ndarray, final: Optional[np.ndarray],
                ticket: Optional[Ticket] = None) -> np.ndarray:
        """The result to yield, once the download into ``dest`` is complete (and the
        copy ``ticket`` into ``final``, started here when not given, is done)."""
        if final is None:
            return dest
        (ticket or self.start(dest, final)).wait()
        return final
