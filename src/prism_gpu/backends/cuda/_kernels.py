"""Kernels on CUDA: NVRTC compilation with caches, exact argument types, launches."""

from __future__ import annotations

import os
import re
import sys
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from cuda.core import LaunchConfig as _CoreLaunchConfig
from cuda.core import launch as _launch

from ..._errors import KernelError, PrismGpuError
from ._driver import MAX_NATIVE_ARGS, NATIVE, from_cuda_exception
from ._interop import leave

_SIG = r"__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?void\s+{name}\s*\(([^)]*)\)"


def parse_params(source: str, entry: str) -> Optional[Tuple[str, ...]]:
    """The C parameter types of ``entry`` in ``source`` (None if not found)."""
    m = re.search(_SIG.format(name=re.escape(entry)), source)
    if m is None:
        return None
    params = []
    for raw in m.group(1).split(","):
        raw = " ".join(raw.replace("__restrict__", "").replace("const ", "").split())
        if not raw or raw == "void":
            continue
        # drop the parameter name; keep the type ("float*", "unsigned long long")
        mm = re.match(r"(.*?)(\w+)\s*$", raw)
        ctype = (mm.group(1) if mm else raw).replace(" *", "*").strip()
        params.append(ctype)
    return tuple(params)


# C parameter types -> numpy scalar types (exactly what the kernel reads)
_SCALARS: Dict[str, Any] = {
    "float": np.float32, "double": np.float64, "__half": np.float16, "half": np.float16,
    "int": np.int32, "signed": np.int32, "signed int": np.int32, "int32_t": np.int32,
    "unsigned": np.uint32, "unsigned int": np.uint32, "uint32_t": np.uint32,
    "long": np.int64, "long int": np.int64, "long long": np.int64, "long long int": np.int64,
    "int64_t": np.int64, "ptrdiff_t": np.int64,
    "unsigned long": np.uint64, "unsigned long int": np.uint64,
    "unsigned long long": np.uint64, "unsigned long long int": np.uint64,
    "uint64_t": np.uint64, "size_t": np.uint64,
    "short": np.int16, "int16_t": np.int16, "unsigned short": np.uint16, "uint16_t": np.uint16,
    "char": np.int8, "signed char": np.int8, "int8_t": np.int8,
    "unsigned char": np.uint8, "uint8_t": np.uint8, "bool": np.bool_,
}
_POINTEES = {k: np.dtype(v) for k, v in _SCALARS.items()}


def _converter(ctype: str, kernel: str, index: int) -> Callable[[Any], Any]:
    if ctype.endswith("*"):
        def ptr(value: Any) -> Any:
            p = getattr(value, "ptr", None)
            if p is not None:
                return p
            if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                return int(value)
            cai = getattr(value, "__cuda_array_interface__", None)
            if cai is not None:
                return cai["data"][0]
            raise KernelError(f"kernel {kernel!r} parameter {index} ({ctype}) needs a device "
                              f"array or a pointer, got {type(value).__name__}")
        return ptr
    np_type = _SCALARS.get(ctype)
    if np_type is None:
        def passthrough(value: Any) -> Any:
            if isinstance(value, np.generic):
                return value
            raise KernelError(f"kernel {kernel!r} parameter {index} has type {ctype!r}, which "
                              "prism-gpu cannot convert: pass a numpy scalar of that type")
        return passthrough

    def scalar(value: Any) -> Any:
        if isinstance(value, np.ndarray) or hasattr(value, "ptr"):
            raise KernelError(f"kernel {kernel!r} parameter {index} is {ctype}, got an array")
        return np_type(value)
    return scalar


class _ProgramCaches:
    memory: Dict[Tuple[Any, ...], Any] = {}
    disk: Any = None
    disk_tried = False
    lock = threading.Lock()

    @classmethod
    def file_cache(cls) -> Any:
        with cls.lock:
            if not cls.disk_tried:
                cls.disk_tried = True
                try:
                    from cuda.core.utils import FileStreamProgramCache

                    root = os.environ.get("PRISM_GPU_CACHE_DIR") or os.path.join(
                        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                        "prism-gpu", "kernels")
                    os.makedirs(root, exist_ok=True)
                    cls.disk = FileStreamProgramCache(root)
                except Exception:  # noqa: BLE001 - no disk cache: compile every process
                    cls.disk = None
            return cls.disk


def compile_source(device: Any, kernel: Any) -> Any:
    """The cuda.core kernel for ``kernel``'s source, from a cache when possible."""
    from cuda.core import Program, ProgramOptions

    key = (kernel.source, kernel.entry, device.arch, tuple(sorted(kernel.options.items())))
    cached = _ProgramCaches.memory.get(key)
    if cached is not None:
        return cached
    try:
        opts = ProgramOptions(arch=f"sm_{device.arch}", std="c++17", **kernel.options)
        prog = Program(kernel.source, "c++", opts)
    except TypeError as exc:
        raise KernelError(f"bad compile options for kernel {kernel.name!r}: {exc}",
                          kernel=kernel.name) from exc
    disk = _ProgramCaches.file_cache()
    try:
        try:
            obj = prog.compile("cubin", cache=disk) if disk is not None else prog.compile("cubin")
        except TypeError:  # a cuda.core without cache=
            obj = prog.compile("cubin")
        cu_kernel = obj.get_kernel(kernel.entry)
    except Exception as exc:  # noqa: BLE001 - NVRTCError carries the log
        log = str(exc)
        raise KernelError(f"kernel {kernel.name!r} failed to compile:\n{log}",
                          kernel=kernel.name, log=log) from exc
    _ProgramCaches.memory[key] = cu_kernel
    return cu_kernel


class SourceKernel:
    """A compiled CUDA C++ kernel and the exact types of its parameters."""

    def __init__(self, device: Any, kernel: Any) -> None:
        self.name = kernel.name
        self._device = device
        self._k = compile_source(device, kernel)
        params = parse_params(kernel.source, kernel.entry)
        self._params: Tuple[str, ...] = params or ()
        self._conv = ([_converter(p, kernel.name, i) for i, p in enumerate(params)]
                      if params is not None else None)
        self._pointee: List[Any] = ([_POINTEES.get(p[:-1].strip()) if p.endswith("*")
                                     else None for p in params] if params is not None else [])
        self._func = _function(self._k) if NATIVE is not None else 0  # for native launches
        self._configs: Dict[int, Tuple[Any, Any]] = {}
        # per array count: whether every array maps to (T*, size_t n) (the fast path)
        self._layouts: Dict[int, bool] = {}
        self._ext: Any = None  # (extra tuple, array count, converted values): the last used

    def _fast_layout(self, na: int) -> bool:
        ok = self._layouts.get(na)
        if ok is None:
            p = self._params
            ok = self._conv is not None and len(p) >= 2 * na and all(
                p[2 * i].endswith("*") and _SCALARS.get(p[2 * i + 1]) is np.uint64
                for i in range(na))
            self._layouts[na] = ok
        return ok

    def _config(self, config: Any) -> Any:
        # keyed by identity: hashing a dataclass costs more than the lookup saves
        hit = self._configs.get(id(config))
        if hit is not None and hit[0] is config:
            return hit[1]
        self._device.check_launch_config(config, self.name)
        cfg: Any
        if self._func:  # the native launch's dimensions
            cfg = (*config.grid, *config.block, config.shared_mem_bytes)
        else:
            cfg = _CoreLaunchConfig(grid=config.grid, block=config.block,
                                    shmem_size=config.shared_mem_bytes)
        if len(self._configs) > 256:
            self._configs.clear()
        self._configs[id(config)] = (config, cfg)
        return cfg

    def arguments(self, arrays: Sequence[Any], extra: Sequence[Any]) -> List[Any]:
        na = len(arrays)
        conv = self._conv
        if conv is not None and 2 * na + len(extra) == len(conv) and self._fast_layout(na):
            # arrays as (pointer, size_t n); the extra values converted once per tuple
            # (first: the order the native packing checks them in)
            vals = self._extra_values(extra, na)
            out: List[Any] = []
            pointee = self._pointee
            for i, a in enumerate(arrays):
                want = pointee[2 * i]
                dt = getattr(a, "dtype", None)
                if want is not None and dt is not None and dt is not want and dt != want:
                    raise KernelError(f"kernel {self.name!r} parameter {2 * i} is "
                                      f"{self._params[2 * i]}, got an array of {dt}")
                ptr = getattr(a, "ptr", None)
                if ptr is None:
                    ptr = conv[2 * i](a)
                out.append(ptr)
                shape = a.shape
                out.append(np.uint64(shape[0] if len(shape) == 1 else a.size))
            out.extend(vals)
            return out
        raw: List[Any] = []
        for a in arrays:
            raw.append(a)
            raw.append(np.uint64(a.size))
        raw.extend(extra)
        conv = self._conv
        if conv is None:
            out = []
            for v in raw:
                if hasattr(v, "ptr"):
                    out.append(v.ptr)
                elif isinstance(v, np.generic):
                    out.append(v)
                else:
                    raise KernelError(
                        f"kernel {self.name!r}: its signature could not be read, so pass scalars "
                        f"as numpy scalars of the exact C type (got {type(v).__name__})")
            return out
        if len(raw) != len(conv):
            raise KernelError(
                f"kernel {self.name!r} takes {len(conv)} parameters ({', '.join(self._params)})"
                f" but got {len(raw)}: {len(arrays)} array(s) as (pointer, size_t n) and "
                f"{len(extra)} extra value(s)")
        out = []
        for i, (v, c) in enumerate(zip(raw, conv)):  # the general path
            want = self._pointee[i]
            if want is not None and hasattr(v, "dtype") and hasattr(v, "ptr") \
                    and v.dtype != want:
                raise KernelError(f"kernel {self.name!r} parameter {i} is "
                                  f"{self._params[i]}, got an array of {v.dtype}")
            out.append(c(v))
        return out

    def _extra_values(self, extra: Sequence[Any], na: int) -> Any:
        """The extra values converted to the kernel's C types (once per tuple)."""
        cached = self._ext
        if cached is not None and cached[0] is extra and cached[1] == na:
            return cached[2]
        conv = self._conv
        assert conv is not None
        vals = tuple(conv[2 * na + j](v) for j, v in enumerate(extra))
        self._ext = (extra, na, vals)
        return vals

    def launch(self, stream: Any, config: Any, arrays: Sequence[Any], extra: Sequence[Any]
               ) -> None:
        na = len(arrays)
        conv = self._conv
        if self._func and na and conv is not None and 2 * na + len(extra) == len(conv) \
                and len(conv) <= MAX_NATIVE_ARGS and self._fast_layout(na):
            # the arguments packed in C: (pointer, size_t n) per array, then the extra values
            # (checked in the general path's order: configuration, extra values, arrays)
            cfg = self._config(config)
            vals = self._extra_values(extra, na)
            try:
                err = NATIVE.launch_arrays(self._func, cfg, stream.live_handle, arrays,
                                           self._pointee, vals)
            except (TypeError, OverflowError) as exc:  # a value C cannot pass by value
                raise KernelError(f"kernel {self.name!r}: {exc}", kernel=self.name) from exc
            if err == 0:
                return
            if err > 0:
                raise stream.error_of(err, f"launching kernel {self.name!r}")
            if err > -1000:  # array -1 - err has another dtype than its parameter's
                i = -1 - err
                raise KernelError(f"kernel {self.name!r} parameter {2 * i} is "
                                  f"{self._params[2 * i]}, got an array of {arrays[i].dtype}")
            # an array without a device pointer of its own (CuPy, ...): the general path
        cfg = self._config(config)
        # (a signature with parameters and nothing passed: arguments() refuses it)
        args = self.arguments(arrays, extra) if (arrays or extra or self._conv) else ()
        if self._func and len(args) <= MAX_NATIVE_ARGS:
            try:
                err = NATIVE.launch(self._func, *cfg, stream.live_handle, args)
            except (TypeError, OverflowError) as exc:  # an argument C cannot pass by value
                raise KernelError(f"kernel {self.name!r}: {exc}", kernel=self.name) from exc
            if err:
                raise stream.error_of(err, f"launching kernel {self.name!r}")
            return
        if self._func:  # past the native call's parameters: cuda.core's own config
            cfg = _CoreLaunchConfig(grid=config.grid, block=config.block,
                                    shmem_size=config.shared_mem_bytes)
        try:
            _launch(stream._s, cfg, self._k, *args)
        except PrismGpuError:
            raise
        except Exception as exc:  # noqa: BLE001 - CUDAError from the driver
            raise from_cuda_exception(exc, f"launching kernel {self.name!r}") from exc


if NATIVE is not None:
    # a native stream's launch of a SourceKernel takes the first branch of launch above
    # in C, from the caches it keeps (_configs, _ext, _layouts); a miss calls launch
    NATIVE.bind_kernel(SourceKernel, MAX_NATIVE_ARGS)


class CallableKernel:
    """A Python callable run on the host at queue time, with its stream current."""

    def __init__(self, kernel: Any) -> None:
        self.name = kernel.name
        self._fn = kernel.fn
        self._stream_kw = kernel.accepts_stream

    def launch(self, stream: Any, config: Any, arrays: Sequence[Any], extra: Sequence[Any]
               ) -> None:
        entered = []  # (an ExitStack costs more than the switches it wraps)
        failed: Optional[BaseException] = None
        try:
            for ctx in stream.interop_contexts(sys.modules):
                ctx.__enter__()
                entered.append(ctx)
            if self._stream_kw:
                self._fn(*arrays, *extra, stream=stream)
            else:
                self._fn(*arrays, *extra)
        except BaseException as exc:
            failed = exc
            raise
        finally:
            leave(entered, failed)


def _function(kernel: Any) -> int:
    """The handle a native launch takes for a cuda.core kernel: its library kernel handle,
    as cuda.core's own launch passes it (the driver runs it in the current context, so one
    prepared kernel serves whichever context is current at launch)."""
    return int(kernel.handle)


def prepare(device: Any, kernel: Any) -> Any:
    if kernel.fn is not None:
        return CallableKernel(kernel)
    return SourceKernel(device, kernel)


__all__ = ["prepare", "SourceKernel", "CallableKernel"]
