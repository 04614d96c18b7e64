"""``prism-gpu info``: what this machine offers."""

from __future__ import annotations

import json
from typing import Any, Dict, List

from rich.console import Console
from rich.table import Table

from .._core import STATUS as core_status
from ..backends import open_device
from ..bench._measure import measure_bandwidth


def _devices(backend: str) -> List[Dict[str, Any]]:
    """Every device of ``backend`` here: index, name and memory."""
    from ..backends import device_count

    out = []
    for i in range(device_count(backend)):
        dev = open_device(backend, i)
        try:
            out.append({"index": i, "name": dev.name,
                        "total_memory_bytes": dev.properties.get("total_memory", 0)})
        finally:
            dev.close()
    return out


def info(args: Any) -> int:
    devices = _devices(args.backend)
    device = open_device(args.backend, args.device)
    try:
        bw = measure_bandwidth(device)
        props = device.properties
    finally:
        device.close()
    data = {"backend": device.kind, "device": device.name, "devices": devices,
            "total_memory_bytes": props.get("total_memory", 0), "properties": props,
            "bandwidth_gbs": {"h2d": bw.h2d, "d2h": bw.d2h, "bidirectional": bw.bidirectional},
            "bandwidth_bytes_per_copy": bw.nbytes, "compiled_core": core_status}
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    t = Table(title="prism-gpu info", show_header=False)
    t.add_row("backend", device.kind)
    t.add_row("device", device.name)
    t.add_row("memory", f"{data['total_memory_bytes'] / 2**30:.1f} GiB")
    t.add_row("H2D (pinned)", f"{bw.h2d:.1f} GB/s")
    t.add_row("D2H (pinned)", f"{bw.d2h:.1f} GB/s")
    t.add_row("both directions", f"{bw.bidirectional:.1f} GB/s in total")
    t.add_row("copy size", f"{bw.nbytes / 2**20:.0f} MiB")
    t.add_row("compiled core", core_status)
    if "native_driver_calls" in props:
        t.add_row("native driver calls", str(props["native_driver_calls"]))
    con = Console()
    con.print(t)
    d = Table(title=f"{len(devices)} device(s) of the {device.kind} backend")
    d.add_column("index", justify="right")
    d.add_column("device")
    d.add_column("memory", justify="right")
    for row in devices:
        d.add_row(str(row["index"]), row["name"], f"{row['total_memory_bytes'] / 2**30:.1f} GiB")
    con.print(d)
    return 0
