"""The ``prism-gpu`` command: ``bench`` (the main job) and ``info``."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prism-gpu",
        description="Streaming GPU work from Python: measure what overlap buys on this machine.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="the guide's performance table on this machine")
    b.add_argument("--backend", default="auto", choices=["auto", "cpu", "cuda"])
    b.add_argument("--device", type=int, default=0)
    b.add_argument("--workload", default="2,5,2", metavar="UP,COMPUTE,DOWN",
                   help="milliseconds of upload, compute and download, each from 0 to "
                        "10000, not all zero (default 2,5,2)")
    b.add_argument("--iterations", type=int, default=50, help="2 to 1,000,000 (default 50)")
    b.add_argument("--peers", action="store_true",
                   help="also run the workload hand-written in CuPy and PyTorch (CUDA only)")
    b.add_argument("--json", action="store_true", help="print machine-readable JSON")
    b.add_argument("--devices", metavar="N|IDS|all",
                   help="run the workload through stream_map on several devices: a count, "
                        "comma-separated ids, or all; reports each device alone and all "
                        "together")
    b.add_argument("--trace", metavar="PATH",
                   help="write the triple-buffered run's timeline as Chrome trace JSON")
    b.add_argument("--plot", metavar="PATH",
                   help="write a Gantt PNG of the sequential and triple-buffered runs "
                        '(needs pip install "prism-gpu[plot]")')
    i = sub.add_parser("info", help="backend, device, memory and copy bandwidth")
    i.add_argument("--backend", default="auto", choices=["auto", "cpu", "cuda"])
    i.add_argument("--device", type=int, default=0)
    i.add_argument("--json", action="store_true")
    return p


def _attach_values(argv: List[str]) -> List[str]:
    """``--workload -1,1,1`` -> ``--workload=-1,1,1``: argparse takes a token starting
    with ``-`` for an option, but a token with a comma after ``--workload`` can only be
    its value (so it reaches the workload check and its message)."""
    out: List[str] = []
    i = 0
    while i < len(argv):
        if (argv[i] == "--workload" and i + 1 < len(argv) and argv[i + 1].startswith("-")
                and "," in argv[i + 1]):
            out.append(f"--workload={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(_attach_values(sys.argv[1:] if argv is None else list(argv)))
    from .._errors import PrismGpuError

    try:
        if args.command == "bench":
            from ._bench import bench

            return bench(args)
        from ._info import info

        return info(args)
    except (PrismGpuError, ValueError) as exc:
        print(f"prism-gpu: error: {exc}", file=sys.stderr)
        return 2
