"""``prism-gpu bench``: the guide's performance table, measured here."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.table import Table

from ..backends import open_device
from ..bench._measure import event_overhead_us
from ..bench._workload import Workload, run_workload

MAX_ITERATIONS = 1_000_000


def bench(args: Any) -> int:
    work = Workload.parse(args.workload)
    if not 2 <= args.iterations <= MAX_ITERATIONS:
        raise ValueError(f"--iterations must be from 2 to {MAX_ITERATIONS:,}, "
                         f"got {args.iterations}")
    if getattr(args, "devices", None) is not None:
        if args.trace is not None or args.plot is not None or args.peers:
            raise ValueError("--trace, --plot and --peers apply to the one-device run, not "
                             "with --devices")
        return _bench_devices(args, work)
    for path in (args.trace, args.plot):
        if path is not None:
            _check_writable(path)
    if args.plot is not None:
        from .._gantt import _pyplot

        _pyplot()  # without matplotlib, say so before measuring anything
    traces: Optional[Dict[str, Any]] = {} if (args.trace or args.plot) else None
    device = open_device(args.backend, args.device)
    try:
        result = run_workload(device, work, iterations=args.iterations, traces=traces)
        events = event_overhead_us(device)
        peers: List[Dict[str, Any]] = []
        if args.peers:
            from ..bench._peers import run_peers

            peers = run_peers(device, result, args.iterations)
    finally:
        device.close()
    data = result.as_dict()
    data["event_overhead_us"] = events
    data["peers"] = peers
    if traces:
        if args.trace:
            traces["triple-buffered"].save(args.trace)
        if args.plot:
            from .._gantt import plot

            w = f"{work.up_ms:g}/{work.compute_ms:g}/{work.down_ms:g} ms"
            plot([(f"sequential, {w}", traces["sequential"]),
                  (f"triple-buffered, {w}", traces["triple-buffered"])], args.plot)
        data["trace_summary"] = traces["triple-buffered"].summary()._asdict()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    _render(data)
    return 0


def _check_writable(path: str) -> None:
    """Refuse, before anything is measured, a path the results could not be written to."""
    if not path or os.path.isdir(path):
        raise ValueError(f"cannot write {path!r}: name a file, not a folder")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ValueError(f"cannot write {path!r}: its folder does not exist")
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot write {path!r}: {exc.strerror or exc}") from None
    if not existed:
        os.remove(path)  # written once the run is done


def _device_ids(text: str, backend: str) -> List[int]:
    """``--devices`` (a count, comma-separated ids or ``all``) as device ids."""
    from .._args import device_ids

    value: Any = text
    if text != "all":
        try:
            value = [int(p) for p in text.split(",") if p.strip()] if "," in text \
                else int(text)
        except ValueError:
            raise ValueError(f"--devices must be a count, comma-separated ids or all, got "
                             f"{text!r}") from None
    try:
        ids = device_ids(value, backend)
    except OverflowError:
        raise ValueError(f"--devices {text!r} is out of range") from None
    assert ids is not None
    return ids


def _bench_devices(args: Any, work: Workload) -> int:
    from ..bench._multi import run_multi

    ids = _device_ids(args.devices, args.backend)
    data = run_multi(ids, args.backend, work, max(4, args.iterations))
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    t = Table(title=f"prism-gpu bench --devices: {data['device']} ({data['backend']}), "
                    f"workload {work.up_ms:g}/{work.compute_ms:g}/{work.down_ms:g} ms, "
                    "stream_map")
    t.add_column("Devices")
    t.add_column("iterations/s", justify="right")
    for d, its in data["per_device_its"].items():
        t.add_row(f"device {d} alone", f"{its:.1f}")
    t.add_row(f"all {len(ids)} together", f"{data['aggregate_its']:.1f}")
    t.add_row("floor (all together)", f"{data['floor_its']:.1f}")
    con = Console()
    con.print(t)
    con.print(f"Scaling {data['scaling']:.2f}x device {ids[0]} alone; "
              f"{data['vs_floor'] * 100:.1f}% of the floor (the stages' pace on every "
              f"device, or the host moving "
              f"{data['host_bidirectional_gbs_all_devices']:.1f} GB/s with all copying)")
    return 0


def _render(d: Dict[str, Any]) -> None:
    con = Console()
    w = d["workload"]
    title = (f"prism-gpu bench: {d['device']} ({d['backend']}), workload "
             f"{w['up_ms']:g}/{w['compute_ms']:g}/{w['down_ms']:g} ms, "
             f"{d['iterations']} iterations")
    ops = Table(title=title)
    ops.add_column("Operation")
    ops.add_column("Asked (ms)", justify="right")
    ops.add_column("Measured (ms)", justify="right")
    ops.add_column("Size", justify="right")
    ops.add_row("Upload", f"{w['up_ms']:g}", f"{d['op_ms']['upload']:.3f}",
                f"{d['up_bytes'] / 2**20:.1f} MiB")
    ops.add_row("Compute", f"{w['compute_ms']:g}", f"{d['op_ms']['compute']:.3f}", "spin")
    ops.add_row("Download", f"{w['down_ms']:g}", f"{d['op_ms']['download']:.3f}",
                f"{d['down_bytes'] / 2**20:.1f} MiB")
    con.print(ops)

    res = Table(title="Sequential vs triple-buffered")
    res.add_column("Mode")
    res.add_column("ms/iteration", justify="right")
    res.add_column("iterations/s", justify="right")
    res.add_row("Sequential", f"{d['sequential_ms']:.3f}", f"{d['sequential_its']:.1f}")
    res.add_row("Triple-buffered", f"{d['triple_ms']:.3f}", f"{d['triple_its']:.1f}")
    for p in d.get("peers", []):
        res.add_row(p["name"], f"{p['ms']:.3f}", f"{1e3 / p['ms']:.1f}")
    res.add_row("Floor", f"{d['floor_ms']:.3f}", f"{1e3 / d['floor_ms']:.1f}")
    con.print(res)
    bound = max(d["floor_terms"], key=d["floor_terms"].get)
    con.print(f"Speedup {d['speedup']:.2f}x; overlap efficiency {d['efficiency'] * 100:.1f}% "
              f"(floor / triple-buffered; the floor is set by {bound}: max of the stage "
              f"times and both copies at {d['bandwidth']['bidirectional']:.1f} GB/s)")

    ev = Table(title="Event overhead (host time per call)")
    ev.add_column("Operation")
    ev.add_column("us", justify="right")
    for name, label in (("create", "Event creation"), ("record", "Event record"),
                        ("query", "Event query"), ("wait", "Stream wait on event")):
        ev.add_row(label, f"{d['event_overhead_us'][name]:.2f}")
    con.print(ev)
