"""Plots of per-layer scores (PNG, matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

import os
from typing import Sequence

from fastsel.scores.layer_scores import LayerScores
from fastsel.utils.atomic import atomic_savefig

__all__ = ["plot_layer_scores", "plot_layer_curves", "top_label"]


def _error_bars(scores: LayerScores):
    """(2, L) distances below/above each score of its ranking-confidence interval, or None."""
    conf = scores.info.get("ranking_confidence")
    if not isinstance(conf, dict) or "layers" not in conf:
        return None
    iv = {d["layer"]: d["score_interval"] for d in conf["layers"]}
    below = [max(0.0, s.score - iv[s.layer][0]) for s in scores.layers]
    above = [max(0.0, iv[s.layer][1] - s.score) for s in scores.layers]
    return [below, above]


def top_label(scores: LayerScores, k: int = 3) -> str:
    """The bar chart's "top-k: [...]" label: the k best blocks in rank order, best first."""
    top = list(scores.ranking[:k])
    return f"top-{len(top)}: {top}"


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
    ax.bar(layers, values, color=colors, yerr=_error_bars(scores), capsize=3, ecolor="#444444")
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
    ax.text(0.99, 0.97, top_label(scores, highlight), transform=ax.transAxes, ha="right", va="top", fontsize=8)
    fig.tight_layout()
    try:
        atomic_savefig(fig, path)  # a temporary file renamed over path: never a half-written image
    finally:
        plt.close(fig)


def plot_layer_curves(
    scores: LayerScores,
    path: str | os.PathLike,
    *,
    secondary_key: str = "probe",
    dashed_key: str | None = "nu_papyan",
    ylabel: str | None = None,
) -> None:
    """Line plot of the per-layer score (log scale when positive and spanning > 10x), the best layer
    marked; a layer value ``dashed_key`` (e.g. the Papyan variant of nu) as a dashed line, and
    ``secondary_key`` (e.g. the probe score) on a twin axis when the layers carry it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [s.layer for s in scores.layers]
    values = [s.score for s in scores.layers]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(layers) + 2.5), 3.6), dpi=120)
    yerr = _error_bars(scores)
    if yerr is not None:
        ax.errorbar(layers, values, yerr=yerr, color="#1f4e79", marker="o", capsize=3, label=scores.metric)
    else:
        ax.plot(layers, values, color="#1f4e79", marker="o", label=scores.metric)
    if dashed_key and all(dashed_key in s.values for s in scores.layers):
        ax.plot(layers, [s.values[dashed_key] for s in scores.layers], color="#1f4e79", ls="--", alpha=0.6, label=dashed_key)
    best = scores.ranking[0] if scores.layers else None
    if best is not None:
        ax.axvline(best, color="#888888", ls=":", lw=1)
        ax.annotate(f"best = {best}", (best, values[best]), textcoords="offset points", xytext=(4, 6), fontsize=8)
    if values and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")
    ax.set_xticks(layers)
    ax.set_xlabel("layer (block index)")
    ax.set_ylabel(ylabel or f"{scores.metric}" + (" (lower is better)" if not scores.higher_is_better else ""), color="#1f4e79")
    handles, labels = ax.get_legend_handles_labels()
    if all(secondary_key in s.values for s in scores.layers) and scores.layers:
        ax2 = ax.twinx()
        metric = scores.info.get("probe_metric", secondary_key)
        ax2.plot(layers, [s.values[secondary_key] for s in scores.layers], color="#c55a11", marker="s", label=f"probe {metric}")
        ax2.set_ylabel(f"probe {metric} (validation)", color="#c55a11")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    rho = scores.info.get("rho_probe")
    rho_txt = f", rho={rho['pearson']:.2f}" if isinstance(rho, dict) and rho.get("pearson") is not None else ""
    mode = f", {scores.mode}" if scores.mode else ""
    ax.set_title(f"{scores.metric}{mode}: {scores.model.split('/')[-1]} on {scores.task} (N={scores.num_examples}{rho_txt})", fontsize=9)
    ax.legend(handles, labels, fontsize=7, loc="best")
    fig.tight_layout()
    try:
        atomic_savefig(fig, path)  # a temporary file renamed over path: never a half-written image
    finally:
        plt.close(fig)
