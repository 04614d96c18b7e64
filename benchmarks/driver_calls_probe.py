"""Decides the hot-path design: the nine raw cuda.core calls of a Pattern-1 iteration vs the same driver calls made from C (the _cudrv module of this commit). Run on a CUDA machine: python benchmarks/driver_calls_probe.py"""
import statistics, sys, time, json
import numpy as np
sys.path.insert(0, "benchmarks")
from host_overhead import _per_iter, raw_cuda_core, backend_only, prism
from cuda.core import Device, LaunchConfig, LegacyPinnedMemoryResource, Program, ProgramOptions
from cuda.bindings import driver
from prism_gpu.backends.cuda import _cudrv as C

N = (64 << 10) // 4
print("available", C.available())
dev = Device(0); dev.set_current()
err, ctx = driver.cuCtxGetCurrent(); ctx = int(ctx)
up, comp, down = (dev.create_stream() for _ in range(3))
prog = Program('extern "C" __global__ void noop() {}\nextern "C" __global__ void scale(float* a, unsigned long long n, float s) { unsigned long long i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) a[i] *= s; }', "c++", ProgramOptions(arch=f"sm_{dev.arch}"))
mod = prog.compile("cubin")
k = mod.get_kernel("noop"); ks = mod.get_kernel("scale")
print("kernel attrs", [a for a in dir(k) if not a.startswith("__")])
kh = k.handle if hasattr(k, "handle") else k._handle
print("kernel handle type", type(kh))
res = driver.cuKernelGetFunction(kh); print("getfunction", res[0]); fn = int(res[1])
fns = int(driver.cuKernelGetFunction(ks.handle)[1])
mr = LegacyPinnedMemoryResource()
h_in, h_out = mr.allocate(N * 4), mr.allocate(N * 4)
hin = np.from_dlpack(h_in).view(np.float32) if False else None
d = [dev.allocate(N * 4, stream=up) for _ in range(3)]
up.sync()
ev = [[dev.create_event() for _ in range(3)] for _ in range(3)]
H = lambda o: int(o.handle)
hs = [H(up), H(comp), H(down)]
he = [[H(e) for e in row] for row in ev]
hd = [H(b) for b in d]
hi, ho = H(h_in), H(h_out)
u, c, dn = hs
G, B = (1, 1, 1), (1, 1, 1)
def step(i):
    s = i % 3
    e_up, e_c, e_dn = he[s]
    C.wait(ctx, u, e_dn)
    C.memcpy(ctx, u, hd[s], hi, N * 4)
    C.record(ctx, u, e_up)
    C.wait(ctx, c, e_up)
    C.launch(ctx, c, fn, G, B, 0, b"", ())
    C.record(ctx, c, e_c)
    C.wait(ctx, dn, e_c)
    C.memcpy(ctx, dn, ho, hd[s], N * 4)
    C.record(ctx, dn, e_dn)
def sync():
    for s in (up, comp, down): s.sync()
out = {}
for r in range(3):
    out.setdefault("c_calls", []).append(_per_iter(step, sync, 5000))
    out.setdefault("raw", []).append(raw_cuda_core(5000)["raw_cuda_core_us_per_iteration"])
# correctness of launch with params
a = dev.allocate(N * 4, stream=up); up.sync()
x = np.random.default_rng(1).random(N, dtype=np.float32)
C.memcpy(ctx, u, H(a), x.ctypes.data, N * 4); up.sync()
print("launch code", C.launch(ctx, u, fns, ((N + 255) // 256, 1, 1), (256, 1, 1), 0, b"PQf", (H(a), N, np.float32(2.5))))
y = np.empty_like(x); C.memcpy(ctx, u, y.ctypes.data, H(a), N * 4); up.sync()
print("scale ok", np.array_equal(y, x * np.float32(2.5)))
t = time.perf_counter()
for i in range(20000): C.query(ctx, he[0][0])
print("query us", (time.perf_counter() - t) / 20000 * 1e6)
t = time.perf_counter()
for i in range(20000): ev[0][0].is_done
print("cuda.core is_done us", (time.perf_counter() - t) / 20000 * 1e6)
print({k: [round(v, 2) for v in vs] for k, vs in out.items()})
