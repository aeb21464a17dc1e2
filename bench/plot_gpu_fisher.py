"""Plot the Fisher-pass figures of gpu_check runs: time and extra memory of every method over a training step.

    python bench/plot_gpu_fisher.py bench/gpu_check_h200.json bench/gpu_check_h200_b128.json --out docs/gpu_fisher_ratios.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ["train_step", "plain_fwd_bwd", "fastsel", "fastsel[pipelined]", "fastsel[wmma]", "fastsel[bmm]", "vmap", "opacus", "loop"]
LABELS = {"train_step": "train step", "plain_fwd_bwd": "fwd+bwd", "fastsel": "fastsel (default)", "loop": "per-example loop"}


def load(path: Path) -> tuple[str, dict]:
    data = json.loads(path.read_text())
    fisher = data["sections"]["fisher"]
    cfg = fisher["config"]
    return f"B={cfg['batch_size']}, T={cfg['seq_len']}", fisher["methods"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=Path("docs/gpu_fisher_ratios.png"))
    args = ap.parse_args()
    runs = [load(p) for p in args.runs]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(runs)
    for k, (label, methods) in enumerate(runs):
        base_t = methods["train_step"]["median_ms"]
        names = [m for m in METHODS if m in methods and "median_ms" in methods[m]]
        xs = [METHODS.index(m) + (k - (len(runs) - 1) / 2) * width for m in names]
        ratios = [methods[m]["median_ms"] / base_t for m in names]
        bars = ax_t.bar(xs, ratios, width, label=label)
        for bar, r in zip(bars, ratios):
            ax_t.text(bar.get_x() + bar.get_width() / 2, r * 1.05, f"{r:.2f}", ha="center", va="bottom", fontsize=7, rotation=90)
        mem = [(methods[m].get("extra_mib") or 0) / 1024 for m in names]
        ax_m.bar(xs, mem, width, label=label)
    for ax in (ax_t, ax_m):
        ax.set_xticks(range(len(METHODS)))
        ax.set_xticklabels([LABELS.get(m, m) for m in METHODS], rotation=35, ha="right", fontsize=8)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    ax_t.set_yscale("log")
    ax_t.axhline(1.2, color="red", lw=0.8, ls="--")
    ax_t.set_ylabel("median time / training step (log)")
    ax_t.set_title("Empirical Fisher diagonal, BERT-base, bf16 autocast (H200)")
    ax_m.set_ylabel("peak GPU memory over model + batch (GiB)")
    ax_m.set_title("Extra memory")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
