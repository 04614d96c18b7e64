"""Scale-out: the guide's 2/5/2 workload on 1, 2, 4... GPUs of one machine, in one process
(``stream_map(devices=)``) and on Dask (one worker per GPU, ``map_blocks`` over an array
generated on the workers), with the host's copy bandwidth when every GPU copies at once.

    python benchmarks/multi_gpu.py [--iterations 60] [--out benchmarks/results]

Every output of the verification pass is checked against numpy.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import time
from typing import Any, Dict, List

import numpy as np

import prism_gpu as pg
from prism_gpu.backends import device_count
from prism_gpu.bench import Workload
from prism_gpu.bench._multi import run_multi
from prism_gpu.bench._peers_cuda import SPIN_SCALE_SOURCE, spin_scale_grid


def spin_kernel(n: int, us: float) -> pg.Kernel:
    """Doubles its block in place while the device spins ``us`` microseconds."""
    return pg.Kernel.from_source(SPIN_SCALE_SOURCE, "spin_scale", defaults=(us,),
                                 config=pg.LaunchConfig(grid=spin_scale_grid(n), block=256))


def verify(ids: List[int], n: int) -> bool:
    rng = np.random.default_rng()
    xs = [rng.standard_normal(n).astype(np.float32) for _ in range(4 * len(ids))]
    got = [r.copy() for r in pg.stream_map(spin_kernel(n, 100.0), xs, devices=ids)]
    return all(np.array_equal(r, x * np.float32(2)) for r, x in zip(got, xs))


def in_process_pageable(ids: List[int], n: int, us: float, blocks: int) -> float:
    """Blocks/s through stream_map(devices=ids) on pageable numpy blocks."""
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal(n).astype(np.float32) for _ in range(8)]
    k = spin_kernel(n, us)
    list(pg.stream_map(k, (xs[i % 8] for i in range(2 * len(ids))), devices=ids))
    t = time.perf_counter()
    for _ in pg.stream_map(k, (xs[i % 8] for i in range(blocks)), devices=ids):
        pass
    return blocks / (time.perf_counter() - t)


def dask_blocks(ids: List[int], n: int, us: float, blocks: int) -> Dict[str, float]:
    import dask.array as da
    import distributed

    from prism_gpu import distributed as pgd

    cluster = pgd.local_cluster(n_workers=len(ids), backend="cuda", threads_per_worker=2)
    client = distributed.Client(cluster)
    try:
        client.wait_for_workers(len(ids), timeout=120)
        k = spin_kernel(n, us)
        x = da.random.default_rng(3).standard_normal((blocks, n), chunks=(1, n),
                                                     dtype=np.float32)
        x = client.persist(x)           # generated on the workers
        distributed.wait(x)
        warm = client.persist(pgd.map_blocks(k, x[: 2 * len(ids)], backend="cuda"))
        distributed.wait(warm)
        t = time.perf_counter()
        y = client.persist(pgd.map_blocks(k, x, backend="cuda"))
        distributed.wait(y)
        secs = time.perf_counter() - t
        ok = bool(np.array_equal(y[:3].compute(), x[:3].compute() * np.float32(2)))
        info = client.run(pgd.worker_info)
        return {"blocks_per_s": blocks / secs, "verified": ok,
                "workers": len(info), "distinct_gpus": len({i["visible"] for i in info.values()})}
    finally:
        client.close()
        cluster.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--no-dask", action="store_true")
    args = ap.parse_args()
    total = device_count("cuda")
    counts = [c for c in (1, 2, 4, 8) if c <= total]
    work = Workload.parse("2,5,2")
    res: Dict[str, Any] = {"date": _dt.date.today().isoformat(), "gpus": total, "runs": []}
    dev = pg.open_device("cuda", 0)
    res["card"] = dev.name
    dev.close()
    for c in counts:
        ids = list(range(c))
        runs = [run_multi(ids, "cuda", work, args.iterations) for _ in range(2)]
        best = max(runs, key=lambda r: r["aggregate_its"])
        best["verified"] = verify(ids, 1 << 20)
        print(json.dumps({k: best[k] for k in ("devices", "per_device_its", "aggregate_its",
                                                 "scaling", "floor_its", "vs_floor",
                                                 "host_bidirectional_gbs_all_devices",
                                                 "verified")}), flush=True)
        res["runs"].append(best)
    one = res["runs"][0]["aggregate_its"]
    for r in res["runs"]:
        r["vs_one_gpu"] = r["aggregate_its"] / one
    if not args.no_dask and total > 1:
        n = 16 << 20  # 64 MiB blocks: about 1.2 ms each way at 54 GB/s
        us = 3000.0
        blocks = 24 * total
        res["dask"] = {"block_mib": 64, "spin_us": us, "blocks": blocks,
                       "in_process_pageable_blocks_per_s": statistics.median(
                           [in_process_pageable(list(range(total)), n, us, blocks)
                            for _ in range(2)])}
        d = dask_blocks(list(range(total)), n, us, blocks)
        res["dask"].update(d)
        res["dask"]["vs_in_process"] = d["blocks_per_s"] / \
            res["dask"]["in_process_pageable_blocks_per_s"]
        print(json.dumps(res["dask"]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    slug = res["card"].lower().replace(" ", "-")
    path = os.path.join(args.out, f"multi-gpu-{total}x-{slug}-{res['date']}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
