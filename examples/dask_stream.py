"""prism-gpu on Dask: one worker per GPU, partitions streamed through each worker's GPU.

Runs anywhere: with no GPU the workers use the CPU backend. Needs the Dask extra:
    pip install "prism-gpu[dask]"
    python examples/dask_stream.py
"""

from __future__ import annotations

import numpy as np

import prism_gpu as pg
from prism_gpu import distributed as pgd


def main() -> None:
    import dask.array as da
    from distributed import Client

    n_workers = max(1, min(4, pg.backends.device_count()))  # one worker per device
    with pgd.local_cluster(n_workers=n_workers) as cluster, Client(cluster) as client:
        # 1. Partitions made here, sent to the workers, results back in order.
        rng = np.random.default_rng(0)
        parts = [rng.standard_normal(1 << 20).astype(np.float32) for _ in range(16)]
        for i, out in enumerate(pgd.stream_map(client, "scale", parts, depth=2)):
            assert np.array_equal(out, parts[i] * np.float32(2))
        print(f"stream_map: {len(parts)} partitions through {n_workers} worker(s), in order")

        # 2. Data generated on the workers: nothing crosses the network but the result.
        x = da.random.default_rng(1).standard_normal((64, 1 << 20), chunks=(4, 1 << 20),
                                                     dtype=np.float32)
        y = pgd.map_blocks("scale", x)
        total = float(y.sum().compute())
        expect = float((x * np.float32(2)).sum().compute())
        assert np.isclose(total, expect, rtol=1e-4), (total, expect)
        print(f"map_blocks: sum of 2x = {total:.1f} (numpy on the same blocks: {expect:.1f})")
    print("ok")


if __name__ == "__main__":
    main()
