"""The figures of ``oloraplus tune``: validation loss against learning rate, and per ``-plus`` method a
heatmap over (log lr, log lambda). Rows are ``experiments.tune.trial_rows`` dicts (``method``, ``state``,
``lr``, ``ratio``, ``val_loss``)."""

from __future__ import annotations

import math
from pathlib import Path

from oloraplus.experiments.render import save_png


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # object API: Agg canvas, no pyplot global state

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


LOSS_AXIS_SPAN = 0.15  # the figures show validation losses up to 15% above the best; higher ones sit on the edge


def loss_cap(values: list[float]) -> float | None:
    """The top of the figures' loss axis: ``LOSS_AXIS_SPAN`` above the lowest value, or None (no cap)
    when every value is below that (a diverged trial's loss of 8 would flatten the rest to a line)."""
    if not values:
        return None
    cap = min(values) * (1 + LOSS_AXIS_SPAN)
    return cap if max(values) > cap else None


def figure_val_loss_vs_lr(rows: list[dict], methods: list[str], path: Path) -> None:
    """Each trial's validation loss against its lr (lr_A), one colour per method, its best as a star;
    pruned trials at their last value."""
    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot()
    shown = [r for r in rows if r["method"] in methods and r["state"] in ("COMPLETE", "PRUNED")
             and r["val_loss"] is not None]
    cap = loss_cap([r["val_loss"] for r in shown])

    def plot(points: list[dict], **style) -> None:
        below = [r for r in points if cap is None or r["val_loss"] <= cap]
        above = [r for r in points if cap is not None and r["val_loss"] > cap]
        ax.scatter([r["lr"] for r in below], [r["val_loss"] for r in below], **style)
        if above:  # drawn on the top edge, pointing up
            ax.scatter([r["lr"] for r in above], [cap] * len(above), **{**style, "marker": "^", "label": None},
                       clip_on=False)

    for i, method in enumerate(methods):
        done = [r for r in shown if r["method"] == method and r["state"] == "COMPLETE"]
        pruned = [r for r in shown if r["method"] == method and r["state"] == "PRUNED"]
        color = f"C{i}"
        plot(done, color=color, label=method, s=28)
        if pruned:
            plot(pruned, color=color, marker="x", s=22, alpha=0.6, label=f"{method} (pruned: last value)")
        if done:
            top = min(done, key=lambda r: r["val_loss"])
            ax.scatter([top["lr"]], [top["val_loss"]], color=color, marker="*", s=220, edgecolors="black", zorder=3)
    if cap is not None:
        ax.set_ylim(top=cap)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (lr_A)")
    ax.set_ylabel("validation loss")
    ax.set_title("validation loss against learning rate (star: best"
                 + (f"; ▲: above {cap:.3g}" if cap is not None else "") + ")")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    save_png(fig, path)


def figure_heatmap(rows: list[dict], method: str, lr_range: tuple[float, float], ratio_range: tuple[float, float],
                   path: Path, bins: int = 8) -> None:
    """Best validation loss per cell of a grid over (log10 lr, log2 lambda) spanning the searched
    ranges, with the trials on top."""
    import numpy as np

    fig = _figure(6.0, 4.8)
    ax = fig.add_subplot()
    x_edges = np.linspace(math.log10(lr_range[0]), math.log10(lr_range[1]) + 1e-12, bins + 1)
    y_edges = np.linspace(math.log2(ratio_range[0]), math.log2(ratio_range[1]) + 1e-12, bins + 1)
    grid = np.full((bins, bins), np.nan)
    xs = [math.log10(r["lr"]) for r in rows]
    ys = [math.log2(r["ratio"]) for r in rows]
    for x, y, r in zip(xs, ys, rows):
        i = min(bins - 1, max(0, int(np.searchsorted(y_edges, y, side="right")) - 1))
        j = min(bins - 1, max(0, int(np.searchsorted(x_edges, x, side="right")) - 1))
        grid[i, j] = r["val_loss"] if np.isnan(grid[i, j]) else min(grid[i, j], r["val_loss"])
    cap = loss_cap([r["val_loss"] for r in rows])  # a diverged cell must not wash out the colour scale
    mesh = ax.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(grid), cmap="viridis_r", shading="flat", vmax=cap)
    fig.colorbar(mesh, ax=ax, label="best validation loss in cell" + (f" (>= {cap:.3g}: one colour)" if cap else ""),
                 extend="max" if cap is not None else "neither")
    if rows:
        ax.scatter(xs, ys, c="white", edgecolors="black", s=18)
    ax.set_xlim(x_edges[0], x_edges[-1])
    ax.set_ylim(y_edges[0], y_edges[-1])
    ax.set_xlabel("log10 learning rate (lr_A)")
    ax.set_ylabel("log2 lambda (lr_B / lr_A)")
    ax.set_title(f"{method}: best validation loss per cell ({len(rows)} trials)", fontsize=10)
    save_png(fig, path)
