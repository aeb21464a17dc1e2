"""Markdown table + combined figure of the real-data variability runs (docs/variability.md).

    PYTHONPATH=$PWD python bench/variability_report.py runs/var docs/variability.png
reads runs/var/<task>.mean.json (with --probe) and, when present, <task>.cls.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

TASKS = ["sst2", "cola", "mrpc", "rte"]


def main(folder: str, figure: str | None = None) -> None:
    rows, runs = [], {}
    for t in TASKS:
        p = Path(folder) / f"{t}.mean.json"
        if not p.exists():
            continue
        d = json.loads(p.read_text())
        cls = Path(folder) / f"{t}.cls.json"
        c = json.loads(cls.read_text()) if cls.exists() else None
        runs[t] = (d, c)
        nu = " / ".join(f"{l['score']:.3g}" for l in d["layers"])
        s = " / ".join(f"{l['probe']:.3f}" for l in d["layers"])
        best_probe = max(range(len(d["layers"])), key=lambda l: d["layers"][l]["probe"])
        rho = d["rho_probe"]
        rows.append(
            f"| {t} | {d['num_examples']} | {d['extra']['embeddings']['score']:.3g} | {nu} | **{d['l_star']}** | {s} ({d['probe_metric']}) | "
            f"{best_probe} | {rho['pearson']:+.3f} / {rho['spearman']:+.3f} | {d['zeta']:.2f} | "
            f"{'%.2f' % c['zeta'] if c else 'n/a'} | {c['l_star'] if c else 'n/a'} |"
        )
    print("| task | N | nu(emb) | nu, blocks 0..5 | l* | probe s, blocks 0..5 | argmax s | rho(nu,s) Pearson / Spearman | zeta (mean) | zeta (CLS) | l* (CLS) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if figure and runs:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 2.8), dpi=80)
        for ax, (t, (d, c)) in zip(list(axes) if len(runs) > 1 else [axes], runs.items()):
            L = [l["layer"] for l in d["layers"]]
            ax.plot(L, [l["score"] for l in d["layers"]], "o-", color="#1f4e79", label="nu (mean)")
            if c:
                ax.plot(L, [l["score"] for l in c["layers"]], "^:", color="#1f4e79", alpha=0.6, label="nu (CLS)")
            ax.set_yscale("log")
            ax.set_xlabel("block")
            ax.set_title(f"{t}: l*={d['l_star']}, rho={d['rho_probe']['pearson']:+.2f}", fontsize=9)
            ax2 = ax.twinx()
            ax2.plot(L, [l["probe"] for l in d["layers"]], "s-", color="#c55a11", label=f"probe {d['probe_metric']}")
            ax2.tick_params(labelsize=7, colors="#c55a11")
            ax.tick_params(labelsize=7)
        axes[0].legend(fontsize=6, loc="upper right")
        fig.tight_layout()
        fig.savefig(figure)
        print(f"wrote {figure}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
