"""Host microseconds of the CUDA primitives prism-gpu can build on (cuda.core vs driver).

Informs which call the CUDA backend uses on its hot paths. Run on a CUDA machine.
"""

from __future__ import annotations

import json
import timeit

import numpy as np


def main() -> int:
    from cuda.bindings import driver
    from cuda.core import Device, LaunchConfig, LegacyPinnedMemoryResource, Program, \
        ProgramOptions, launch

    dev = Device(0)
    dev.set_current()
    s1, s2 = dev.create_stream(), dev.create_stream()
    h1, h2 = int(s1.handle), int(s2.handle)
    ev = dev.create_event()
    evh = int(ev.handle)
    n = 64 << 10
    mr = LegacyPinnedMemoryResource()
    hb = mr.allocate(n)
    host = np.from_dlpack(hb).view(np.uint8)
    hp = host.__array_interface__["data"][0]
    d = dev.allocate(n, stream=s1)
    dp = int(d.handle)
    s1.sync()
    k = Program('extern "C" __global__ void noop() {}', "c++",
                ProgramOptions(arch=f"sm_{dev.arch}")).compile("cubin").get_kernel("noop")
    cfg = LaunchConfig(grid=1, block=1)
    s1.record(ev)
    s1.sync()
    cases = {
        "core record": lambda: s1.record(ev),
        "drv cuEventRecord": lambda: driver.cuEventRecord(evh, h1),
        "core wait": lambda: s2.wait(ev),
        "drv cuStreamWaitEvent": lambda: driver.cuStreamWaitEvent(h2, evh, 0),
        "core is_done": lambda: ev.is_done,
        "drv cuEventQuery": lambda: driver.cuEventQuery(evh),
        "core copy_from (64 KiB)": lambda: d.copy_from(hb, stream=s1),
        "drv cuMemcpyAsync ints": lambda: driver.cuMemcpyAsync(dp, hp, n, h1),
        "drv cuMemcpyHtoDAsync ndarray": lambda: driver.cuMemcpyHtoDAsync(dp, host, n, h1),
        "core launch noop": lambda: launch(s1, cfg, k),
        "ndarray __array_interface__ ptr": lambda: host.__array_interface__["data"][0],
        "ndarray ctypes.data": lambda: host.ctypes.data,
        "core create_event": lambda: dev.create_event(),
    }
    out = {}
    for name, fn in cases.items():
        reps = 20000
        t = min(timeit.repeat(fn, number=reps, repeat=3)) / reps * 1e6
        s1.sync()
        s2.sync()
        out[name] = round(t, 3)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
