"""The study's markdown: the per-task table (mean ± std over seeds beside cost), rank stability, the verdict
table with its summary line, the table across studies, and the one-panel-per-task plot."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

from .results import pooled_verdicts, rank_stability, seed_values, summarize, verdicts
from .stats import ALPHA, mean_std


def fmt_ms(values: Sequence[float], digits: int = 3) -> str:
    m, s, n = mean_std(values)
    if n == 0:
        return "-"
    return f"{m:.{digits}f} ± {s:.{digits}f} (n={n})" if s is not None else f"{m:.{digits}f} (n=1)"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def rank_lines(agg: Mapping[str, Any], tasks: Sequence[str]) -> list[str]:
    """The markdown section on rank stability (training and held-out passes) of the full runs."""
    lines: list[str] = []
    lines += ["", "## Rank stability of the Fisher ranking during full fine-tuning (Lodha et al. sec. 4)", "",
              "Kendall tau between the Fisher ranking of the blocks after epoch e and before training (epoch 0), "
              "mean ± std over seeds; in brackets the mean |rank_e - rank_0| per block. Measured on training examples "
              "(the ones the model fits) and, with --rank-split both, on held-out validation examples.", ""]
    any_rows = False
    for suffix, what in (("", "training examples"), ("_heldout", "held-out validation examples")):
        rs_rows = [(t, rank_stability(agg, t, suffix=suffix)) for t in tasks]
        epochs = sorted({e for _, r in rs_rows if r for e in r["taus"]}, key=int)
        if not epochs:
            continue
        any_rows = True
        lines += [f"Fisher passes on {what}:", "",
                  "| task | " + " | ".join(f"tau @ epoch {e}" for e in epochs) + " |", "|" + "---|" * (len(epochs) + 1)]
        for t, r in rs_rows:
            if r is None:
                continue
            cells = []
            for e in epochs:
                cell = fmt_ms(r["taus"].get(e, []))
                if r["deviations"].get(e):
                    cell += f" [{statistics.fmean(r['deviations'][e]):.2f}]"
                cells.append(cell)
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        lines.append("")
    if not any_rows:
        lines.append("(no full fine-tuning run with --rank-epochs yet)")
    return lines


def verdict_lines(agg: Mapping[str, Any], tasks: Sequence[str], alpha: float = ALPHA) -> list[str]:
    """The markdown section with the verdict table and its one-line summary."""
    lines: list[str] = []
    lines += ["", "## Verdict: Fisher-selected blocks vs position- and random-selected ones", "",
              f"Computed from the runs above. Welch: two-sided Welch t-test on the per-seed metrics; paired: the "
              f"same seeds (same training subset, same head init), mean difference, fisher wins/ties/losses and a "
              f"paired t-test. \"Beyond seed noise\" only when Welch p < {alpha}. \"Same blocks\": seeds where both "
              f"strategies tuned the same blocks (the comparison is then void for that seed).", ""]
    vs = verdicts(agg, tasks, alpha)
    if vs:
        lines += ["| task | comparison | fisher mean | other mean | diff | Welch p | paired diff (W/T/L) | paired p | same blocks | verdict |",
                  "|" + "---|" * 10]
        for c in vs:
            pr = c["paired"]
            pair = f"{pr['mean_diff']:+.3f} ({pr['wins']}/{pr['ties']}/{pr['losses']})" if pr else "-"
            lines.append(f"| {c['task']} | {c['a']} vs {c['b']} | {c['mean_a']:.3f} (n={c['n_a']}) | {c['mean_b']:.3f} (n={c['n_b']}) | "
                         f"{c['diff']:+.3f} | {fmt_p(c['welch']['p'] if c['welch'] else None)} | {pair} | "
                         f"{fmt_p(pr['p'] if pr else None)} | {c['same_blocks']}/{pr['n'] if pr else 0} | {c['label']} |")
        better = [c for c in vs if c["label"].startswith(c["a"] + " better")]
        worse = [c for c in vs if c["label"].endswith("beyond seed noise") and not c["label"].startswith(c["a"] + " better")]
        untested = [c for c in vs if c["welch"] is None]
        lines += ["", f"Summary: of {len(vs)} comparisons, Fisher-selected blocks are better beyond seed noise in "
                      f"{len(better)}" + (f" ({', '.join(c['task'] + ': ' + c['b'] for c in better)})" if better else "") +
                  f", worse beyond seed noise in {len(worse)}" +
                  (f" ({', '.join(c['task'] + ': ' + c['b'] for c in worse)})" if worse else "") +
                  f", within seed noise in {len(vs) - len(better) - len(worse) - len(untested)}"
                  + (f", untested (n < 2) in {len(untested)}" if untested else "") + "."]
        pooled = pooled_verdicts(vs)
        if len({c["task"] for c in vs}) > 1 and pooled:
            lines += ["", "Pooled over tasks (paired seeds; only the sign of each difference, as the metrics differ): "
                      "wins/ties/losses of the Fisher side and the two-sided exact sign test.", "",
                      "| comparison | tasks | W/T/L | sign test p |", "|---|---|---|---|"]
            for k in pooled:
                lines.append(f"| {k['a']} vs {k['b']} | {', '.join(k['tasks'])} | {k['wins']}/{k['ties']}/{k['losses']} | "
                             f"{fmt_p(k['p'])} |")
    else:
        lines.append("(no pair of fisher-top-k and position-top-k / random-k runs yet)")
    return lines


def render_table(agg: Mapping[str, Any], tasks: Sequence[str], names: Sequence[str], alpha: float = ALPHA) -> str:
    cfg = agg.get("config", {})
    lines = ["# Fine-tuning strategies on MiniLM: mean ± std over seeds", ""]
    if cfg:
        lines += ["Settings: " + ", ".join(f"{k} {v}" for k, v in cfg.items()), ""]
    lines += ["Metric: the task's main metric at the best epoch (accuracy; F1 for MRPC; MCC for CoLA), mean ± sample std "
              "over seeds (n = seeds); other metrics: mean. Blocks: the tuned blocks (0-based) and in how many seeds. "
              "s/epoch: mean training time per epoch (evaluation excluded); cache s: one-off frozen-prefix cache; "
              "peak MB: max over seeds of the run's peak memory.", ""]
    head = "| task | strategy | metric | mean ± std (n) | other metrics | blocks (seeds) | trainable params | s / epoch | cache s | peak MB |"
    lines += [head, "|" + "---|" * 10]
    for task in tasks:
        for name in names:
            s = summarize(agg, task, name)
            if s is None:
                continue
            others = ", ".join(f"{k} {m:.3f}" for k, (m, _, _) in s["others"].items()) or "-"
            blocks = "; ".join(f"{b} ({c})" for b, c in s["blocks"].items())
            params = " / ".join(f"{p:,}" for p in s["params"])
            lines.append(f"| {task} | {name} | {s['metric_name']} | {fmt_ms([v for v in seed_values(agg, task, name).values()])} | "
                         f"{others} | {blocks} | {params} | {s['epoch_seconds']:.1f} | {s['cache_seconds']:.1f} | {s['peak_mb']:.0f} |")
    lines += rank_lines(agg, tasks)
    lines += verdict_lines(agg, tasks, alpha)
    failed = agg.get("failed") or []
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- {f['task']} seed {f['seed']} {f['name']}: {f['error']}" for f in failed]
    return "\n".join(lines) + "\n"


def plot_summary(agg: Mapping[str, Any], tasks: Sequence[str], names: Sequence[str], path: str | Path) -> None:
    """One panel per task: each strategy's mean metric over seeds with ± std error bars and the seeds as small
    dots; full fine-tuning as a dashed line; fisher-top-k dark blue, position and random controls lighter blues."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in tasks if t in agg.get("runs", {})]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 0.28 * len(names) + 1.4), dpi=120, sharey=True)
    axes = list(axes) if len(tasks) > 1 else [axes]
    colour = {"fisher": "#1f4e79", "position": "#5b9bd5", "random": "#9dc3e6"}
    for ax, task in zip(axes, tasks):
        metric_name = ""
        for y, name in enumerate(names):
            values = list(seed_values(agg, task, name).values())
            if not values:
                continue
            metric_name = next(iter(agg["runs"][task][name].values()))["metric_name"]
            m, sd, _ = mean_std(values)
            family = name.split("-")[0] if name.startswith(("fisher-top", "position-", "random-")) else "other"
            ax.errorbar(m, y, xerr=sd or 0.0, fmt="o", ms=5, color=colour.get(family, "#7f7f7f"), lw=1.2, capsize=2)
            ax.plot(values, [y] * len(values), ".", color="#404040", ms=2.5)
            if name == "full":
                ax.axvline(m, color="#c55a11", ls="--", lw=1)
        ax.set_title(f"{task} ({metric_name})", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", lw=0.3)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    fig.suptitle("MiniLM, mean ± std over seeds (dots: seeds; dashed: full fine-tuning)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render_summary(agg: Mapping[str, Any], tasks: Sequence[str], names: Sequence[str], alpha: float = ALPHA) -> str:
    """One table across tasks (strategy x task, mean ± std over seeds), then rank stability and the verdict."""
    tasks = [t for t in tasks if t in agg.get("runs", {})]
    lines = ["# Fine-tuning strategies on MiniLM across tasks: mean ± std over seeds", ""]
    for task in tasks:
        cfg = agg.get("configs", {}).get(task, {})
        if cfg:
            lines.append(f"- {task}: " + ", ".join(f"{k} {v}" for k, v in cfg.items()))
    metric = {t: next((r["metric_name"] for by_seed in agg["runs"][t].values() for r in by_seed.values()), "") for t in tasks}
    lines += ["", "| strategy | " + " | ".join(f"{t} ({metric[t]})" for t in tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for name in names:
        cells = [fmt_ms(list(seed_values(agg, t, name).values())) for t in tasks]
        if any(c != "-" for c in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += rank_lines(agg, tasks)
    lines += verdict_lines(agg, tasks, alpha)
    return "\n".join(lines) + "\n"
