"""The guide's Pattern 1: simple triple buffering with the AsyncCoordinator."""

import numpy as np

import prism_gpu as pg

with pg.ManagedGpuContext(backend="auto") as ctx:
    coord = ctx.async_coordinator()
    buf = ctx.create_triple_buffer(1 << 20, dtype=np.float32)
    rng = np.random.default_rng(0)
    data = [rng.random(1 << 20, dtype=np.float32) for _ in range(100)]
    results = [np.empty_like(d) for d in data]
    last = None
    for x, out in zip(data, results):
        up = coord.queue_upload(x, buf)            # H2D on the upload stream
        coord.queue_compute("scale", [up])         # waits for the upload on the device
        last = coord.queue_download(buf, out)      # waits for the compute on the device
        buf.advance()                              # the slot is free again (device-ordered)
    coord.synchronize_all()
    assert all(np.array_equal(r, d * 2) for r, d in zip(results, data))
    print("pattern 1:", ctx.backend, "ok")
