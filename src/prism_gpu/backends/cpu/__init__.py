"""Threaded CPU backend: one worker thread per stream, events with CUDA semantics."""

from ._device import CpuDevice, device_count

__all__ = ["CpuDevice", "device_count"]
