"""prism-gpu on Dask: a LocalCluster of two worker processes on loopback, CPU backend."""

from __future__ import annotations

import sys
from typing import Any, Iterator

import numpy as np
import pytest

import prism_gpu as pg

distributed = pytest.importorskip("distributed", reason='needs the Dask extra: pip install '
                                  '"prism-gpu[dask]"')
da = pytest.importorskip("dask.array")
pgd = pytest.importorskip("prism_gpu.distributed")

F32 = np.float32


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    cluster = pgd.local_cluster(n_workers=2, backend="cpu", threads_per_worker=1)
    c = distributed.Client(cluster)
    try:
        c.wait_for_workers(2, timeout=60)
        yield c
    finally:
        c.close()
        cluster.close()


def test_importing_prism_gpu_imports_no_dask() -> None:
    import subprocess

    code = ("import sys, prism_gpu, prism_gpu.distributed; "
            "print(any(m.split('.')[0] in ('dask', 'distributed') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


def test_stream_map_in_order_and_the_worker_context_is_reused(client: Any) -> None:
    rng = np.random.default_rng()
    parts = [rng.standard_normal(int(n)).astype(F32) for n in rng.integers(100, 5000, 12)]

    def add1(x: Any) -> None:            # a closure: travels by value
        x += np.float32(1)

    got = list(pgd.stream_map(client, add1, parts, depth=2, backend="cpu"))
    for p, r in zip(parts, got):
        np.testing.assert_array_equal(r, p + F32(1))
    before = client.run(pgd.worker_info)
    got = list(pgd.stream_map(client, "scale", parts, backend="cpu"))   # a built-in name
    after = client.run(pgd.worker_info)
    assert len(after) == 2
    for addr, info in after.items():
        assert info["opened"] == 1 == before[addr]["opened"]   # one context, kept
        assert len(info["contexts"]) == 1
    assert len({info["pid"] for info in after.values()}) == 2
    for p, r in zip(parts, got):
        np.testing.assert_array_equal(r, p * F32(2))


def test_a_failing_partition_raises_at_its_turn(client: Any) -> None:
    parts = [np.full(64, i, F32) for i in range(12)]

    def fail_at_7(x: Any) -> None:
        if x[0] == 7:
            raise ArithmeticError("partition 7")
        x += np.float32(1)

    got = []
    with pytest.raises(Exception) as info:
        for r in pgd.stream_map(client, fail_at_7, parts, backend="cpu"):
            got.append(r)
    assert info.value.partition_index == 7
    assert "partition 7" in str(info.value)
    assert "batch 0" not in str(info.value)  # the worker's one-batch run is not the user's
    assert isinstance(info.value, pg.KernelError)  # its type crosses to the client
    assert [float(r[0]) for r in got] == [1.0 * (i + 1) for i in range(7)]
    # the cluster is still fine afterwards
    (r,) = pgd.stream_map(client, "scale", [np.ones(8, F32)], backend="cpu")
    np.testing.assert_array_equal(r, np.full(8, 2, F32))


def test_map_blocks_equals_numpy(client: Any) -> None:
    x = da.random.default_rng(7).standard_normal((4000, 300), chunks=(700, 300)).astype(F32)
    y = pgd.map_blocks(pg.Kernel("twice", fn=_twice), x, backend="cpu")
    np.testing.assert_array_equal(y.compute(), x.compute() * F32(2))


def _twice(a: Any) -> None:
    a *= np.float32(2)


def test_bad_arguments(client: Any) -> None:
    with pytest.raises(TypeError, match="Client"):
        pgd.stream_map("not a client", "scale", [])
    with pytest.raises(TypeError, match="dask array"):
        pgd.map_blocks("scale", np.ones(4))
    with pytest.raises(ValueError):
        pgd.stream_map(client, "scale", [], depth=0)


def test_a_bad_partition_is_reported_with_its_index(client: Any) -> None:
    parts = [np.ones(8, F32), np.array([object()] * 3), np.ones(8, F32)]
    got = []
    with pytest.raises(Exception) as info:
        for r in pgd.stream_map(client, "scale", parts, backend="cpu"):
            got.append(r)
    assert info.value.partition_index == 1 and len(got) == 1


def test_results_before_a_failing_source_or_submission_come_first(client: Any) -> None:
    # the iterable's error (or an unpicklable partition) raised at once, throwing away
    # the results of the partitions already sent
    def source() -> Iterator[np.ndarray]:
        yield np.ones(4, F32)
        yield np.full(4, 2, F32)
        raise RuntimeError("source failed at item 2")

    got = []
    with pytest.raises(RuntimeError, match="item 2") as info:
        for r in pgd.stream_map(client, "scale", source(), backend="cpu"):
            got.append(r)
    assert [float(r[0]) for r in got] == [2.0, 4.0]
    assert info.value.partition_index == 2

    import threading

    parts = [np.ones(4, F32), np.ones(4, F32), threading.Lock()]  # a lock will not pickle
    got = []
    with pytest.raises(Exception) as info2:
        for r in pgd.stream_map(client, "scale", parts, backend="cpu"):
            got.append(r)
    assert len(got) == 2 and info2.value.partition_index == 2


def test_map_blocks_keeps_a_0d_array_0d(client: Any) -> None:
    x = da.from_array(np.array(3.0, F32))
    y = pgd.map_blocks("scale", x, backend="cpu")
    r = y.compute()
    assert y.shape == () and r.shape == () and float(r) == 6.0


def test_arguments_are_checked_at_the_call() -> None:
    with pytest.raises(TypeError, match="n_workers"):
        pgd.local_cluster(n_workers="2", backend="cpu")
    with pytest.raises(TypeError, match="threads_per_worker"):
        pgd.local_cluster(n_workers=1, backend="cpu", threads_per_worker="2")
    with pytest.raises(ValueError, match="n_workers"):
        pgd.local_cluster(n_workers=0, backend="cpu")
    with pytest.raises(TypeError, match="backend"):
        pgd.local_cluster(n_workers=1, backend=5)


def test_stream_map_arguments_are_checked_before_any_partition(client: Any) -> None:
    parts = [np.ones(4, F32)]
    with pytest.raises(TypeError, match="partitions"):
        pgd.stream_map(client, "scale", None)
    with pytest.raises(TypeError, match="kernel"):
        pgd.stream_map(client, 5, parts)
    with pytest.raises(ValueError, match="backend"):
        pgd.stream_map(client, "scale", parts, backend="gpu")
    with pytest.raises(TypeError, match="output"):
        pgd.stream_map(client, "scale", parts, output=((2.5,), F32))


@pytest.mark.cuda
def test_local_cluster_keeps_within_the_visible_gpus(monkeypatch: Any) -> None:
    from prism_gpu.backends import device_count

    n = device_count("cuda")
    with pytest.raises(ValueError, match="one worker per GPU"):
        pgd.local_cluster(n_workers=n + 1, backend="cuda")
