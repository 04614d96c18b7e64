"""Threaded CPU backend: one worker thread per stream, events with CUDA semantics."""

from ._device import CpuDevice

__all__ = ["CpuDevice"]
