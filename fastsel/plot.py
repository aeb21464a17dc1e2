"""Plots of per-layer scores (PNG, matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

import os
from typing import Sequence

from fastsel.scores import LayerScores

__all__ = ["plot_layer_scores"]


def plot_layer_scores(
    scores: LayerScores,
    path: str | os.PathLike,
    *,
    highlight: int = 3,
    secondary: tuple[str, Sequence[float]] | None = None,
    ylabel: str | None = None,
) -> None:
    """Bar chart of the score of every block, the ``highlight`` best in a darker colour.

    ``secondary`` = (label, values per layer) is drawn as a line on a twin axis (e.g. probe accuracy).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [s.layer for s in scores.layers]
    values = [s.score for s in scores.layers]
    best = set(scores.ranking[:highlight])
    colors = ["#1f4e79" if l in best else "#9dc3e6" for l in layers]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(layers) + 2), 3.6), dpi=120)
    ax.bar(layers, values, color=colors)
    ax.set_xticks(layers)
    ax.set_xlabel("layer (block index)")
    ax.set_ylabel(ylabel or f"{scores.metric} score")
    if values and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")
    order = "higher is better" if scores.higher_is_better else "lower is better"
    mode = f", {scores.mode}" if scores.mode else ""
    ax.set_title(f"{scores.metric}{mode}: {scores.model.split('/')[-1]} on {scores.task} (N={scores.num_examples}; {order})", fontsize=9)
    if secondary is not None:
        label, vals = secondary
        ax2 = ax.twinx()
        ax2.plot(layers, list(vals), color="#c55a11", marker="o", label=label)
        ax2.set_ylabel(label, color="#c55a11")
    ax.text(0.99, 0.97, f"top-{len(best)}: {sorted(best)}", transform=ax.transAxes, ha="right", va="top", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
