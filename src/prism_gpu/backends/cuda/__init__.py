"""CUDA backend on NVIDIA's cuda.core. Imported only when CUDA is asked for."""

from __future__ import annotations

_FIX = 'install the CUDA extra: pip install "prism-gpu[cuda]"'


def unavailable_reason(ordinal: int = 0) -> "str | None":
    """Why CUDA device ``ordinal`` cannot be used, or None when it can."""
    try:
        import cuda.core as _cc  # noqa: F401
    except ImportError as exc:
        return f"the CUDA backend needs cuda.core, which does not import ({exc}); {_FIX}"
    return "the CUDA backend is not built yet in this version of prism-gpu; use backend='cpu'"


def __getattr__(name: str):
    if name == "CudaDevice":
        from ..._errors import BackendUnavailableError

        raise BackendUnavailableError(unavailable_reason() or "CUDA backend not built")
    raise AttributeError(name)
