"""The Pareto plot: peak memory against step time (matplotlib, optional)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from memfit.planning.frontier import FrontierPoint
from memfit.verbs.bench import BenchResult


def pareto_plot(
    result: BenchResult,
    frontier: Sequence[FrontierPoint],
    path: Path,
    *,
    recompute_frontier: Sequence[FrontierPoint] = (),
    title: str,
) -> Path:
    """Write a PNG: the predicted frontier as a staircase, every row predicted (hollow) and
    measured (filled), joined by a thin line.

    Raises:
        ImportError: matplotlib is missing (``pip install memfit[plot]``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_ms = result.baseline_step_s * 1e3
    figure, axes = plt.subplots(figsize=(9, 6), dpi=110)
    lines = (
        (recompute_frontier, "0.75", "--", "frontier, keep/recompute only (predicted)"),
        (frontier, "0.45", "-", "frontier with selective options (predicted)"),
    )
    for points, color, style, label in lines:
        if points:
            xs = [p.peak_bytes / 2**20 for p in points]
            ys = [p.step_s * 1e3 for p in points]
            axes.step(xs, ys, where="post", color=color, ls=style, lw=1.5, label=label)
    markers = {"none": "s", "all": "D", "sqrt": "^", "optimal": "o", "optimal-recompute": "P"}
    colors = {
        "none": "black",
        "all": "tab:red",
        "sqrt": "tab:purple",
        "optimal": "tab:blue",
        "optimal-recompute": "tab:cyan",
    }
    seen: set[str] = set()
    for row in result.rows:
        if not row.feasible:
            continue
        kind = row.strategy if row.strategy in markers else "every"
        marker, color = markers.get(kind, "v"), colors.get(kind, "tab:orange")
        label = row.label
        predicted = (row.predicted_peak_bytes / 2**20, row.predicted_step_s * 1e3)
        measured = (row.measured_peak_bytes / 2**20, row.step_s * 1e3)
        axes.plot(*predicted, marker=marker, mfc="none", mec=color, ms=9, ls="none")
        axes.plot(
            *measured,
            marker=marker,
            color=color,
            ms=8,
            ls="none",
            label=None if label in seen else f"{label} (measured)",
        )
        axes.plot(*zip(predicted, measured, strict=True), color=color, lw=0.6, alpha=0.6)
        if row.strategy == "optimal":
            axes.annotate(row.budget, measured, textcoords="offset points", xytext=(6, 4))
        seen.add(label)
    axes.axhline(base_ms, color="0.8", lw=0.8, ls="--")
    axes.plot([], [], marker="o", mfc="none", mec="0.3", ls="none", label="predicted (hollow)")
    axes.set_xlabel("step peak memory (MiB, parameters and gradients included)")
    axes.set_ylabel("step time (ms, median)")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
