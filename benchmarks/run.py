"""The prism-gpu benchmark runner: one process, one card.

Measures the floor (pinned H2D, D2H, concurrent bidirectional bandwidth, event
and launch costs), then each workload through a naive sequential loop,
hand-written three-stream CuPy and PyTorch loops, and every prism-gpu API.
Warm-up, repeated runs, medians with min-max spread; every output is checked
against numpy on random data. Writes JSON, a markdown table and a chart under
``benchmarks/results/<card>-<date>.*``.

    python benchmarks/run.py [--quick] [--repeats 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import prism_gpu as pg  # noqa: E402
from prism_gpu.bench._measure import event_overhead_us, measure_bandwidth  # noqa: E402
from prism_gpu.bench._peers_cuda import DEPTH, Work, cupy_loop, torch_loop  # noqa: E402

import prism_loops  # noqa: E402
import extra_workloads  # noqa: E402
import data_path  # noqa: E402
import pipeline_workload  # noqa: E402
import host_overhead  # noqa: E402

Variant = Callable[[Work, int], float]


def _stats(samples: List[float]) -> Dict[str, Any]:
    """Median, min and max of a variant's repeats, and the repeats themselves (in order:
    repeat r of every variant ran in the same round)."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "samples": list(samples)}


def _inputs(n: int, seed: int) -> List[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) + np.float32(0.5) for _ in range(DEPTH)]


def _check(work: Work) -> bool:
    """The last DEPTH outputs are 2 * the input of their iteration (iteration m % DEPTH)."""
    if len(work.outputs) != DEPTH:
        return False
    return all(np.array_equal(out, work.inputs[m] * np.float32(2))
               for m, out in enumerate(work.outputs))


def naive_loop(work: Work, iterations: int) -> float:
    """Upload, compute, download, wait: one stream, pinned memory, nothing overlaps."""
    import cupy as cp
    import cupyx

    from prism_gpu.bench._peers_cuda import SPIN_SCALE_SOURCE, spin_scale_grid

    k = cp.RawKernel(SPIN_SCALE_SOURCE, "spin_scale")
    s = cp.cuda.Stream(non_blocking=True)
    d = cp.empty(work.n_up, cp.float32)
    h_in = []
    for x in work.inputs:
        h = cupyx.empty_pinned((work.n_up,), cp.float32)
        h[:] = x
        h_in.append(h)
    h_out = [cupyx.empty_pinned((work.n_up,), cp.float32) for _ in range(DEPTH)]
    grid, n, us = spin_scale_grid(work.n_up), np.uint64(work.n_up), np.float64(work.spin_us)

    def step(i: int) -> None:
        d.set(h_in[i % DEPTH], stream=s)
        k((grid,), (256,), (d.data.ptr, n, us), stream=s)
        d.get(out=h_out[i % DEPTH], stream=s)  # blocking: the naive way

    for i in range(DEPTH):
        step(i)
    t = time.perf_counter()
    for i in range(iterations):
        step(i)
    ms = (time.perf_counter() - t) * 1e3 / iterations
    work.outputs = [h_out[i % DEPTH].copy() for i in range(iterations - DEPTH, iterations)]
    return ms


def kernel_ms(ctx: Any, n: int, us: float, repeats: int = 10) -> float:
    """Device time of one spin_scale launch on ``n`` floats."""
    dev = ctx.device
    coord = pg.AsyncCoordinator(dev, timing=True)
    try:
        buf = pg.TripleBuffer(dev, n)
        x = pg.pinned_empty(n, np.float32, ctx=ctx)
        x[:] = 1
        coord.register_kernel("k", prism_loops.kernel(n))
        times = []
        for _ in range(repeats + 1):
            up = coord.queue_upload(x, buf)
            c = coord.queue_compute("k", [up], extra=(us,))
            buf.get_process_buffer()
            buf.retire()  # the slot's data is not needed: FREE again without a download
            coord.wait(c)
            times.extend(d.duration_ms for d in coord.poll() if d.op_id == c)
        return statistics.median(times[1:])
    finally:
        coord.close()


def transfer_workload(ctx: Any, label: str, up_ms: float, comp_ms: float, down_ms: float,
                      iterations: int, repeats: int, bw: Any) -> Dict[str, Any]:
    n = int(min(up_ms * 1e-3 * bw.h2d * 1e9, down_ms * 1e-3 * bw.d2h * 1e9)) // 4
    nbytes = n * 4
    bws = [measure_bandwidth(ctx.device, nbytes, repeats=10)]
    compute = kernel_ms(ctx, n, comp_ms * 1e3)
    variants: Dict[str, Variant] = {
        "naive sequential (CuPy)": naive_loop,
        "CuPy (hand-written)": cupy_loop,
        "PyTorch (hand-written)": torch_loop,
        **prism_loops.variants(ctx),
    }
    rows = _run_variants(variants, lambda seed: Work(n, n, comp_ms * 1e3, scale=True,
                                                     inputs=_inputs(n, seed)),
                         iterations, repeats,
                         between=lambda: bws.append(measure_bandwidth(ctx.device, nbytes, 5)))
    # The floor is a limit of the hardware: the best bandwidth seen during the run.
    local_bw = max(bws, key=lambda b: b.bidirectional)
    terms = {"compute": compute, "upload": nbytes / max(b.h2d for b in bws) / 1e6,
             "download": nbytes / max(b.d2h for b in bws) / 1e6,
             "both copies": 2 * nbytes / local_bw.bidirectional / 1e6}
    floor = max(terms.values())
    _ratios(rows, floor)
    return {"workload": label, "kind": "transfer", "bytes_per_copy": nbytes,
            "iterations": iterations, "repeats": repeats, "floor_ms": floor,
            "floor_terms": terms, "bandwidth": local_bw.as_dict(), "rows": rows}


def _run_variants(variants: Dict[str, Variant], make_work: Callable[[int], Work],
                  iterations: int, repeats: int,
                  between: Optional[Callable[[], None]] = None) -> List[Dict[str, Any]]:
    """Each repeat runs every variant once (round robin), so drift in the card or the
    link over the run affects all variants alike."""
    samples: Dict[str, List[float]] = {name: [] for name in variants}
    ok = {name: True for name in variants}
    errors: Dict[str, str] = {}
    for r in range(repeats):
        for name, fn in variants.items():
            if name in errors:
                continue
            work = make_work(1000 + r)
            try:
                samples[name].append(fn(work, iterations))
            except ImportError as exc:
                errors[name] = f"skipped: {exc}"
                continue
            ok[name] = ok[name] and _check(work)
        if between is not None:
            between()
    rows = []
    for name in variants:
        row: Dict[str, Any] = {"name": name, "verified": ok[name] and name not in errors}
        if name in errors:
            row["error"] = errors[name]
        if samples[name]:
            row.update(_stats(samples[name]))
            row["its"] = 1e3 / row["median"]
        rows.append(row)
        print(f"  {name:32s} {row.get('median', float('nan')):9.4f} ms  "
              f"verified={row['verified']}", flush=True)
    return rows


def _ratios(rows: List[Dict[str, Any]], floor: Optional[float]) -> None:
    peers = [r["median"] for r in rows if "hand-written" in r["name"] and "median" in r]
    best = min(peers) if peers else None
    for r in rows:
        if "median" not in r:
            continue
        if floor:
            r["vs_floor"] = r["median"] / floor
        if best:
            r["vs_best_peer"] = r["median"] / best


def card_info() -> Dict[str, Any]:
    import subprocess

    info: Dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        name, driver, mem = (x.strip() for x in q.stdout.strip().splitlines()[0].split(","))
        info.update(card=name, driver=driver, memory=mem)
    except Exception as exc:  # noqa: BLE001
        info["card_error"] = str(exc)
    for mod in ("cuda.core", "cuda.bindings", "cupy", "torch"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            info[mod] = m.__version__
        except Exception:  # noqa: BLE001
            info[mod] = None
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--only", default="", help="comma-separated workload labels to run")
    ap.add_argument("--merge", action="store_true",
                    help="update today's result file for this card instead of replacing it")
    args = ap.parse_args()
    only = {x for x in args.only.split(",") if x}
    scale = 0.2 if args.quick else 1.0
    info = card_info()
    print(json.dumps(info), flush=True)
    ctx = pg.ManagedGpuContext(backend="cuda")
    results: Dict[str, Any] = {"info": info, "date": _dt.date.today().isoformat(),
                               "workloads": []}
    try:
        bw = measure_bandwidth(ctx.device, 256 << 20, repeats=10)
        results["floor"] = {"bandwidth_gbs": bw.as_dict(),
                            "event_overhead_us": event_overhead_us(ctx.device),
                            "launch_us": extra_workloads.launch_cost_us()}
        print("floor", json.dumps(results["floor"]), flush=True)
        for label, up, comp, down, iters in (("2/5/2", 2, 5, 2, 90), ("3/3/3", 3, 3, 3, 90),
                                             ("0.2/0.2/0.2", 0.2, 0.2, 0.2, 600)):
            if only and label not in only:
                continue
            print(f"workload {label}", flush=True)
            results["workloads"].append(transfer_workload(
                ctx, label, up, comp, down, max(DEPTH, int(iters * scale) // DEPTH * DEPTH),
                args.repeats, bw))
        if not only or "tiny" in only:
            print("workload tiny", flush=True)
            results["workloads"].append(extra_workloads.tiny(
                ctx, int(1500 * scale) // DEPTH * DEPTH, args.repeats, _run_variants, _ratios,
                _inputs, host_overhead))
        if not only or "pipeline" in only:
            print("workload pipeline", flush=True)
            results["workloads"].append(pipeline_workload.pipeline(
                ctx, bw, measure_bandwidth, max(DEPTH, int(60 * scale)), args.repeats))
        if not only or "pageable" in only:
            print("workload pageable", flush=True)
            results["workloads"].append(extra_workloads.pageable(
                ctx, max(6, int(45 * scale)), args.repeats))
        for mib in (4, 16):
            if not only or f"data{mib}" in only or "data" in only:
                print(f"workload data path, {mib} MiB batches", flush=True)
                results["workloads"].append(data_path.workload(ctx, mib, args.repeats, bw))
    finally:
        ctx.close()
    stem = os.path.join(args.out, f"{_slug(info.get('card', 'gpu'))}-{results['date']}")
    os.makedirs(args.out, exist_ok=True)
    if args.merge and os.path.exists(stem + ".json"):
        with open(stem + ".json") as f:
            old = json.load(f)
        done = {w["workload"] for w in results["workloads"]}
        results["workloads"] = [w for w in old["workloads"] if w["workload"] not in done] \
            + results["workloads"]
        order = ["2/5/2", "3/3/3", "0.2/0.2/0.2", "tiny", "pipeline", "pageable 64",
                 "pageable 4", "pageable 16"]
        results["workloads"].sort(key=lambda w: next(
            (i for i, k in enumerate(order) if w["workload"].startswith(k)), 99))
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=2)
    md = markdown(results)
    with open(stem + ".md", "w") as f:
        f.write(md)
    try:
        chart(results, stem + ".png")
    except ImportError as exc:
        print(f"no chart: {exc}")
    print(md)
    return 0


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def markdown(res: Dict[str, Any]) -> str:
    info = res["info"]
    fl = res.get("floor", {})
    bw = fl.get("bandwidth_gbs", {})
    lines = [f"# prism-gpu benchmark: {info.get('card')} ({res['date']})", "",
             f"Driver {info.get('driver')}, cuda.core {info.get('cuda.core')}, "
             f"cuda.bindings {info.get('cuda.bindings')}, CuPy {info.get('cupy')}, "
             f"PyTorch {info.get('torch')}, Python {info.get('python')}.", "",
             f"Floor: pinned H2D {bw.get('h2d', 0):.1f} GB/s, D2H {bw.get('d2h', 0):.1f} GB/s, "
             f"both directions {bw.get('bidirectional', 0):.1f} GB/s in total (256 MiB copies); "
             f"event us: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                       fl.get("event_overhead_us", {}).items())
             + f"; kernel launch {fl.get('launch_us', float('nan')):.2f} us.", "",
             "Medians of repeated runs after warm-up (min-max in brackets); each repeat runs "
             "every variant in turn. The floor uses the best bandwidth measured between "
             "repeats. Every output is checked against numpy on random data.", ""]
    for w in res["workloads"]:
        lines.append(f"## {w['workload']}")
        lines.append("")
        if w.get("note"):
            lines += [w["note"], ""]
        if w.get("floor_ms"):
            terms = ", ".join(f"{k} {v:.3f}" for k, v in w.get("floor_terms", {}).items())
            lines += [f"Floor {w['floor_ms']:.3f} ms/iteration ({terms}).", ""]
        unit = w.get("unit", "ms/iteration")
        lines.append(f"| variant | {unit} | range | vs floor | vs best peer | per s | ok |")
        lines.append("|---|---:|---:|---:|---:|---:|:-:|")
        for r in w["rows"]:
            if "median" not in r:
                lines.append(f"| {r['name']} | - | - | - | - | - | {r.get('error', '')} |")
                continue
            lines.append(
                f"| {r['name']} | {r['median']:.4f} | {r['min']:.4f}-{r['max']:.4f} | "
                f"{r.get('vs_floor', float('nan')):.3f} | "
                f"{r.get('vs_best_peer', float('nan')):.3f} | {r.get('its', 0):.1f} | "
                f"{'yes' if r['verified'] else 'NO'} |")
        for k, v in w.get("extra", {}).items():
            lines.append(f"\n{k}: {v}")
        lines.append("")
    return "\n".join(lines)


def chart(res: Dict[str, Any], path: str) -> bool:
    """Bar charts of the workloads that have a floor and measured rows; False (and a
    printed note) if there is none, e.g. ``--only tiny,pageable``."""
    ws = [w for w in res["workloads"]
          if w.get("floor_ms") and any("median" in r and "naive" not in r["name"]
                                       for r in w["rows"])]
    if not ws:
        print(f"no chart: no workload with a floor and measured variants "
              f"(ran: {', '.join(w['workload'] for w in res['workloads']) or 'none'})")
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ws), figsize=(5 * len(ws), 4.5), squeeze=False)
    for ax, w in zip(axes[0], ws):
        rows = [r for r in w["rows"] if "median" in r and "naive" not in r["name"]]
        names = [r["name"].replace("prism ", "").replace(" (hand-written)", "") for r in rows]
        vals = [r["median"] for r in rows]
        colors = ["tab:orange" if "hand-written" in r["name"] else "tab:blue" for r in rows]
        ax.barh(names, vals, color=colors)
        ax.axvline(w["floor_ms"], color="black", linestyle="--", label="floor")
        ax.set_title(f"{w['workload']} ({w.get('unit', 'ms/iteration')})")
        ax.set_xlim(0, max(vals + [w["floor_ms"]]) * 1.15)
        ax.invert_yaxis()
        ax.legend(loc="lower right")
    fig.suptitle(f"prism-gpu (blue) vs hand-written peers (orange), {res['info'].get('card')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
