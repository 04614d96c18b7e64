"""Gantt pictures of traces: one row per stream lane, colours by op type (matplotlib)."""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple

__all__ = ["plot"]

COLORS = {"upload": "#1f77b4", "compute": "#2ca02c", "download": "#ff7f0e"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError('plotting a trace needs matplotlib: pip install "prism-gpu[plot]"'
                          ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(panels: Sequence[Tuple[str, Any]], path: str) -> None:
    """Write a PNG with one Gantt panel per ``(title, trace)``, stacked, on one time axis.

    Each panel's title gets the achieved and floor milliseconds per iteration.
    """
    plt = _pyplot()
    from matplotlib.patches import Patch

    panels = [(t, tr) for t, tr in panels if tr.ops]
    if not panels:
        raise ValueError("nothing to plot: the trace recorded no op")
    heights = [max(1, len(tr.lanes())) for _, tr in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 1.2 + 0.55 * sum(heights)),
                             squeeze=False, sharex=True,
                             gridspec_kw={"height_ratios": heights})
    for ax, (title, tr) in zip(axes[:, 0], panels):
        lanes: List[str] = tr.lanes()
        row = {lane: i for i, lane in enumerate(lanes)}
        for o in tr.ops:
            ax.broken_barh([(o.start_ms, max(o.duration_ms, 1e-4))], (row[o.lane] - 0.4, 0.8),
                           facecolors=COLORS.get(o.op_type, "grey"),
                           edgecolor="black" if o.error else "white", linewidth=0.4)
        ax.set_yticks(range(len(lanes)))
        ax.set_yticklabels(lanes)
        ax.invert_yaxis()
        s = tr.summary()
        head = f"{title}: " if title else ""
        ax.set_title(f"{head}{s.achieved_ms:.3f} ms/iteration achieved, floor "
                     f"{s.floor_ms:.3f} ({s.efficiency * 100:.0f}%), copies overlap kernels "
                     f"{s.overlap * 100:.0f}% of the time", fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("device time (ms)")
    fig.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items()],
               loc="upper right", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
