"""The ``prism-gpu`` command: argument validation, a small CPU bench, and the
benchmark helpers staying out of ``import prism_gpu``."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

import prism_gpu as pg
from prism_gpu.bench import Bandwidth, Workload, run_workload
from prism_gpu.cli import main

BAD_WORKLOADS = ["inf,5,2", "1e6,1,1", "1,nan,1", "-1,1,1", "0,0,0", "a,b,c", "1,2",
                 "1,-inf,1", "10001,0,0", ""]


@pytest.mark.parametrize("text", BAD_WORKLOADS)
def test_bench_rejects_bad_workload(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--workload", text, "--backend", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("prism-gpu: error: ")
    assert "workload" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("text", BAD_WORKLOADS)
def test_workload_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="UP,COMPUTE,DOWN"):
        Workload.parse(text)


@pytest.mark.parametrize("text, expected", [("2,5,2", (2.0, 5.0, 2.0)),
                                            (" 0 , 5, 0 ", (0.0, 5.0, 0.0)),
                                            ("10000,0,0", (10000.0, 0.0, 0.0)),
                                            ("0.2,0.2,0.2", (0.2, 0.2, 0.2))])
def test_workload_parse_accepts(text: str, expected: tuple) -> None:
    w = Workload.parse(text)
    assert (w.up_ms, w.compute_ms, w.down_ms) == expected


@pytest.mark.parametrize("values", [(float("inf"), 1, 1), (1, float("nan"), 1), (-1, 1, 1),
                                    (0, 0, 0), (1, 1, 1e6)])
def test_workload_constructor_rejects(values: tuple) -> None:
    with pytest.raises(ValueError, match="workload"):
        Workload(*values)


@pytest.mark.parametrize("iterations", ["1", "0", "-5", "1000001"])
def test_bench_rejects_bad_iterations(iterations: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--backend", "cpu", "--workload", "1,1,1",
                 "--iterations", iterations]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("prism-gpu: error: --iterations must be from 2 to 1,000,000")


class _TinyDevice:
    """Reports 64 MiB of device memory; any allocation fails the test."""

    kind = "fake"
    name = "fake"
    properties = {"total_memory": 64 << 20}

    def _fail(self, *args: Any) -> None:
        raise AssertionError("allocated before the size check")

    allocate = allocate_pinned = create_stream = create_event = _fail


def test_run_workload_rejects_oversized_copies_before_allocating() -> None:
    bw = Bandwidth(h2d=10.0, d2h=10.0, bidirectional=20.0, nbytes=1 << 20)
    # 2 ms at 10 GB/s is 20 MB a copy: 3 slots of each ring exceed 16 MiB
    with pytest.raises(ValueError, match="of device memory .* more than a quarter"):
        run_workload(_TinyDevice(), Workload(2, 5, 2), iterations=3, bw=bw)


def test_bench_cpu_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--backend", "cpu", "--workload", "1,1,1", "--iterations", "3",
                 "--json"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert {"backend", "device", "workload", "iterations", "up_bytes", "down_bytes",
            "bandwidth", "op_ms", "sequential_ms", "triple_ms", "floor_ms", "floor_terms",
            "speedup", "efficiency", "sequential_its", "triple_its", "event_overhead_us",
            "peers"} <= set(data)
    assert data["backend"] == "cpu"
    assert data["workload"] == {"up_ms": 1.0, "compute_ms": 1.0, "down_ms": 1.0}
    assert data["iterations"] == 3
    assert data["peers"] == []
    assert data["up_bytes"] > 0 and data["down_bytes"] > 0
    assert data["triple_ms"] > 0 and data["sequential_ms"] > 0
    assert set(data["event_overhead_us"]) == {"create", "record", "query", "wait"}


def test_import_prism_gpu_leaves_bench_out() -> None:
    code = ("import prism_gpu, sys; "
            "print('prism_gpu.bench' in sys.modules, 'prism_gpu.cli' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


def test_bench_trace_and_plot(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    trace, png = tmp_path / "run.json", tmp_path / "run.png"
    assert main(["bench", "--backend", "cpu", "--workload", "1,1,1", "--iterations", "3",
                 "--json", "--trace", str(trace), "--plot", str(png)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["trace_summary"]["ops"] > 0
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    assert {e["cat"] for e in events} == {"upload", "compute", "download"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_plot_to_a_missing_folder_is_refused(tmp_path: Any,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "no" / "such" / "run.png"
    assert main(["bench", "--backend", "cpu", "--iterations", "3", "--plot", str(bad)]) == 2
    assert "folder does not exist" in capsys.readouterr().err


def test_plot_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from prism_gpu._gantt import _pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"prism-gpu\[plot\]"):
        _pyplot()


def test_bench_devices_cpu_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--backend", "cpu", "--devices", "2", "--workload", "0.5,1,0.5",
                 "--iterations", "8", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["devices"] == [0, 1] and set(d["per_device_its"]) == {"0", "1"}
    assert d["aggregate_its"] > 0 and d["floor_its"] > 0
    assert d["scaling"] == pytest.approx(d["aggregate_its"] / d["per_device_its"]["0"])


@pytest.mark.parametrize("text", ["0", "x", "1,1", "-1", ",", "99999999999999999999", ""])
def test_bench_devices_rejects(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--backend", "cpu", "--devices", text]) == 2
    assert "devices" in capsys.readouterr().err


def test_info_lists_every_device(capsys: pytest.CaptureFixture[str]) -> None:
    from prism_gpu.backends import device_count

    assert main(["info", "--backend", "cpu", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [x["index"] for x in d["devices"]] == list(range(device_count("cpu")))


@pytest.mark.parametrize("bad", ["folder", "", "/proc/no-such-dir-here/x.json"])
def test_bench_trace_to_an_unwritable_path_is_refused_before_running(
        bad: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path) if bad == "folder" else bad
    assert main(["bench", "--backend", "cpu", "--iterations", "3", "--trace", path]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "Traceback" not in err


@pytest.mark.parametrize("extra", [["--trace", "t.json"], ["--plot", "p.png"], ["--peers"]])
def test_bench_options_of_the_one_device_run_are_refused_with_devices(
        extra: list, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--backend", "cpu", "--devices", "2", *extra]) == 2
    assert "not with --devices" in capsys.readouterr().err


def test_concurrent_bandwidth_stays_within_a_quarter_of_host_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # --devices measured with 256 MiB buffers, four per device, whatever the count:
    # 16 devices took 8.5 GB of a 24 GB machine, 64 were killed
    from prism_gpu.bench import _multi, _workload

    sizes = []
    monkeypatch.setattr(_workload, "host_memory", lambda: 256 << 20)
    real = pg.TripleBuffer.__init__

    def spy(self: Any, device: Any, size: int, *a: Any, **k: Any) -> None:
        sizes.append(size * 4)
        real(self, device, size, *a, **k)

    monkeypatch.setattr(pg.TripleBuffer, "__init__", spy)
    devices = [pg.open_device("cpu", i) for i in range(4)]
    try:
        assert _multi.concurrent_bandwidth(devices, repeats=1) > 0
    finally:
        for d in devices:
            d.close()
    assert sizes and 4 * max(sizes) * len(devices) <= (256 << 20) // 4 + (4 << 20)
