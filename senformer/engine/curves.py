"""Training curves from ``scalars.csv``: one PNG with the losses and the validation mIoU against step.

matplotlib is imported only here and only when plotting, and the figure is drawn on its own Agg
canvas, never through ``pyplot``: a training process must not pick up a GUI backend or keep figures
alive in pyplot's global registry."""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path

LOSS_PREFIX = "train/loss"
MIOU_TAG = "val/mIoU"


def read_scalars(csv_path) -> dict:
    """{tag: (steps, values)} sorted by step; malformed or non-finite rows (a run killed mid-write) are skipped."""
    series = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                step, value = int(row["step"]), float(row["value"])
            except (KeyError, TypeError, ValueError):
                continue
            if row.get("tag") and math.isfinite(value):
                series.setdefault(row["tag"], {})[step] = value  # a repeated (step, tag): the later row wins
    return {tag: (sorted(pts), [pts[s] for s in sorted(pts)]) for tag, pts in series.items()}


def plot_scalars(csv_path, png_path):
    """Writes ``png_path`` (losses and val mIoU vs step) from ``csv_path``; returns its Path, or None
    (writing nothing) when the CSV has no rows. Raises ImportError when matplotlib is missing."""
    series = read_scalars(csv_path)
    if not series:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plotting training curves needs matplotlib (pip install matplotlib)") from e

    fig = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_val = fig.subplots(1, 2)
    _losses(ax_loss, {t: s for t, s in series.items() if t.startswith(LOSS_PREFIX)})
    _miou(ax_val, series.get(MIOU_TAG))

    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, png_path)  # a viewer refreshing the file mid-run never reads half a PNG
    finally:
        tmp.unlink(missing_ok=True)
    return png_path


def _losses(ax, losses):
    ax.set_title("training loss")
    ax.set_xlabel("step")
    if not losses:
        _note(ax, "no loss logged yet")
        return
    for tag in sorted(losses, key=lambda t: (t != LOSS_PREFIX, t)):  # the total first
        steps, values = losses[tag]
        ax.plot(steps, values, label=tag[len("train/"):], lw=2 if tag == LOSS_PREFIX else 1,
                marker="o" if len(steps) == 1 else None)
    values = [v for _, vs in losses.values() for v in vs]
    # a log axis keeps the slow tail of a loss that fell by orders of magnitude readable
    if min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")


def _miou(ax, points):
    ax.set_title("validation mIoU")
    ax.set_xlabel("step")
    ax.set_ylabel("mIoU (%)")
    if not points:
        _note(ax, "no validation point yet")
        return
    steps, values = points
    ax.plot(steps, [v * 100 for v in values], marker="o")
    best = max(range(len(values)), key=values.__getitem__)
    ax.annotate(f"{values[best] * 100:.2f}", (steps[best], values[best] * 100), textcoords="offset points",
                xytext=(0, 6), ha="center", fontsize="small")
    ax.grid(True, alpha=0.3)


def _note(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])
