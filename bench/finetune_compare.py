"""Seeded comparison of fine-tuning strategies on all-MiniLM-L6-v2 with real GLUE data (issue 14).

For every (task, seed): Fisher and variability layer scores are computed once (``fastsel score --metric
fisher,variability``, one pass) on a class-balanced training subset drawn with that seed, then every
strategy is trained by ``fastsel finetune --seed SEED`` in its own process (so that its peak memory is its
own) on that seed's balanced training subset, evaluated on the full validation split after every epoch
(best epoch reported). Random strategies use draw = seed (``random-1-s{seed}``), reported as ``random-1``,
so that their mean is over draws and seeds. The full fine-tuning run also records the rank stability of
Lodha et al. sec. 4: Kendall tau of the Fisher ranking of the blocks at epochs 1, 2, 3 against epoch 0
(``fastsel finetune --rank-epochs 1,2,3``; 4 Fisher passes over ``--rank-examples`` training examples,
outside the timed epochs).

Outputs (``--out DIR``; rewritten by this process alone after every finished run, so partial results are
usable and the study is resumable: a run whose ``results.json`` exists is not run again):

- ``DIR/results.json``: raw results per task, strategy and seed (metric, all metrics, per-epoch metrics,
  best epoch, trainable parameters, s/epoch, cache s, peak MB, tuned blocks, wall s, rank-stability taus),
  the scores' rankings per (task, seed), and failed runs;
- ``DIR/table.md``: mean +- std over seeds (n shown) beside trainable parameters, s/epoch and peak memory;
  the rank-stability table; the verdict (fisher-top-k vs position-top-k and vs random-k: difference of
  means, Welch t-test, paired comparison by seed; "beyond seed noise" only when Welch p < 0.05);
- ``DIR/<task>/seed<S>/<strategy>/``: each run's own directory (log.txt, results.json, plan.json, curve).

Sizing: ``--dry-run`` lists the runs still to do and estimates the wall time (a per-token cost model
fitted on finished runs under ``--out``, ``--out``/pilot and ``--cost-from`` directories); ``--pilot``
first runs every (task, strategy) once at a small budget (seed = first seed, ``--pilot-examples``, one
epoch) into ``DIR/pilot`` to measure those costs (run it with the study's ``--jobs``: the measured times
include the contention of parallel runs). ``--jobs 2`` runs two processes at once, each with
``OMP_NUM_THREADS=--threads`` (1); only this process writes ``DIR/results.json`` and ``DIR/table.md``.

This machine (2 CPU cores, cached frozen prefix). The budget numbers are plausible defaults, NOT yet
confirmed: run the pilot and the dry run, check the estimate is under 3 hours and that full fine-tuning
reaches SST-2 accuracy well above 0.85, then start the study:

    PY=.venv/bin/python
    PYTHONPATH=$PWD $PY bench/finetune_compare.py --data-dir ../shared/data --tasks sst2,mrpc,rte,cola \
        --seeds 0,1,2 --train-examples 2000 --score-examples 512 --epochs 3 --max-length 64 \
        --batch-size 16 --jobs 2 --out runs/compare-seeds --pilot --dry-run
    PYTHONPATH=$PWD $PY bench/finetune_compare.py --data-dir ../shared/data --tasks sst2,mrpc,rte,cola \
        --seeds 0,1,2 --train-examples 2000 --score-examples 512 --epochs 3 --max-length 64 \
        --batch-size 16 --jobs 2 --out runs/compare-seeds

Sizing so far (one seed, SST-2, this box with load average 2-5 from other jobs): full fine-tuning at
2000 examples / 3 epochs / 64 tokens took 72 s per epoch (281 s per run with rank stability) and reached
accuracy 0.838 (lr 5e-5) or 0.842 (--lr-full 1e-4); 4000 examples gave 0.843 (137 s per epoch). So the
defaults do NOT yet meet "well above 0.85". The dry run of the default study, costed from a 256-example
pilot of every strategy on SST-2 and of three on RTE, gave 23,900 core-seconds: 3.3 h at --jobs 2.

``--train-examples`` and ``--max-length`` also take per-task values, e.g. ``--max-length 64,rte=128``
(an item without ``task=`` is the default).

GPU, full training sets (``--train-examples 0`` = every training example: ``fastsel finetune`` is then
called without ``--train-examples``, which trains on the whole split in its natural class proportions;
scoring stays on ``--score-examples`` balanced examples):

    PYTHONPATH=$PWD python bench/finetune_compare.py --data-dir ../shared/data --tasks sst2,mrpc,rte,cola \
        --seeds 0,1,2 --train-examples 0 --score-examples 512 --epochs 3 --max-length 128 \
        --batch-size 16 --device cuda --jobs 1 --out runs/compare-seeds-gpu

On a GPU "peak MB" is CUDA max allocated memory, on a CPU the process's peak resident set (VmHWM).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]

# (reported name, fastsel strategy ({seed} = the run's seed), tuner, learning-rate family). Learning rates
# are fixed per family, not swept: the fewer trainable parameters, the larger the rate (as in Xie et al.
# B.4 / SPAFIT A.2). "adapters": Houlsby adapters in the top two blocks (the conventional top-K block
# choice with adapters instead of full tuning of the blocks); adapters in every block is "adapters-all".
STRATEGIES: list[tuple[str, str, str, str]] = [
    ("full", "full", "full", "full"),
    ("fisher-top-1", "fisher-top-1", "full", "blocks"),
    ("fisher-top-2", "fisher-top-2", "full", "blocks"),
    ("fisher-top-3", "fisher-top-3", "full", "blocks"),
    ("fisher-bottom-1", "fisher-bottom-1", "full", "blocks"),
    ("position-top-1", "position-top-1", "full", "blocks"),
    ("position-top-3", "position-top-3", "full", "blocks"),
    ("random-1", "random-1-s{seed}", "full", "blocks"),
    ("random-3", "random-3-s{seed}", "full", "blocks"),
    ("lstar-down-2", "lstar-down-2", "full", "blocks"),
    ("lstar-down-2-trunc", "lstar-down-2-trunc", "full", "blocks"),
    ("bitfit", "bitfit", "full", "bitfit"),
    ("lora-i", "lora-i", "full", "peft"),
    ("spafit-1-3-i", "spafit-1-3-i", "full", "peft"),
    ("adapters", "position-top-2", "adapter", "peft"),
]
# Only when asked for by --strategies.
EXTRA_STRATEGIES: list[tuple[str, str, str, str]] = [
    ("adapters-all", "full", "adapter", "peft"),
    ("position-top-2", "position-top-2", "full", "blocks"),
    ("fisher-bottom-3", "fisher-bottom-3", "full", "blocks"),
]
DEFAULT_LR = {"full": 5e-5, "blocks": 1e-4, "bitfit": 1e-3, "peft": 5e-4}
ALPHA = 0.05  # "beyond seed noise": Welch p below this

# Cost model fallbacks (seconds), used only when no finished run can be measured: per padded token of a
# full fine-tuning step (forward, backward, AdamW) and of evaluation, on one core of this 2-core box, and
# per-process start-up (Python, torch, transformers, the model, the data, plot, weights). Measured: SST-2,
# 2000 examples, max length 64, batch 16, load average 2-5 from other jobs.
BUILTIN_TRAIN_S_PER_TOKEN = 1.0e-3
BUILTIN_EVAL_S_PER_TOKEN = 1.9e-4
BUILTIN_OVERHEAD_S = 6.0
BUILTIN_SCORE_OVERHEAD_S = 8.0


# --------------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------------


def parse_per_task(text: str | int, cast=int) -> dict[str, Any]:
    """``"64"`` -> {"*": 64}; ``"64,rte=128"`` -> {"*": 64, "rte": 128}; ``"sst2=8000,2000"`` likewise."""
    out: dict[str, Any] = {}
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        key, _, value = item.rpartition("=")
        out[key.strip().lower() or "*"] = cast(value)
    if not out:
        raise ValueError(f"empty per-task value {text!r}")
    return out


def for_task(values: Mapping[str, Any], task: str) -> Any:
    if task.lower() in values:
        return values[task.lower()]
    if "*" in values:
        return values["*"]
    raise ValueError(f"no value for task {task!r} in {dict(values)} (give a default without 'task=')")


def strategy_table(names: Iterable[str] = ()) -> list[tuple[str, str, str, str]]:
    """The built-in list, or the named subset of it (and of EXTRA_STRATEGIES), in the built-in order."""
    wanted = [n for n in names if n]
    if not wanted:
        return list(STRATEGIES)
    known = {s[0]: s for s in STRATEGIES + EXTRA_STRATEGIES}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; choose from {list(known)}")
    return [s for s in STRATEGIES + EXTRA_STRATEGIES if s[0] in wanted]


def scores_kind(strategy: str) -> str | None:
    """Which scores file a fastsel strategy reads: fisher, variability or none."""
    if strategy.startswith(("fisher-", "top-", "bottom-")):
        return "fisher"
    if strategy.startswith("lstar"):
        return "variability"
    return None


def rank_epochs_for(epochs: int, wanted: Sequence[int]) -> list[int]:
    return [e for e in wanted if 1 <= e <= epochs]


def mean_std(values: Sequence[float]) -> tuple[float, float | None, int]:
    """(mean, sample std (ddof 1; None for n < 2), n)."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def fmt_ms(values: Sequence[float], digits: int = 3) -> str:
    m, s, n = mean_std(values)
    if n == 0:
        return "-"
    return f"{m:.{digits}f} ± {s:.{digits}f} (n={n})" if s is not None else f"{m:.{digits}f} (n=1)"


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------
# Statistics (pure)
# --------------------------------------------------------------------------------------------------


def _t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t as student_t

    return float(student_t.sf(t, df))


def welch(a: Sequence[float], b: Sequence[float]) -> dict[str, Any] | None:
    """Welch's two-sided t-test of mean(a) != mean(b); None when a group has fewer than 2 values.

    Both groups without spread (every seed gave the same value): p = 1 for equal means, 0 otherwise.
    """
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) < 2 or len(b) < 2:
        return None
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    va, vb = statistics.variance(a), statistics.variance(b)
    se2 = va / len(a) + vb / len(b)
    if se2 == 0:
        return {"t": math.copysign(math.inf, ma - mb) if ma != mb else 0.0, "df": None, "p": 1.0 if ma == mb else 0.0}
    t = (ma - mb) / math.sqrt(se2)
    df = se2 ** 2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    return {"t": t, "df": df, "p": min(1.0, 2 * _t_sf(abs(t), df))}


def paired(a: Mapping[Any, float], b: Mapping[Any, float]) -> dict[str, Any] | None:
    """Paired comparison over the seeds both have: mean difference a - b, wins/ties/losses of a, paired
    t-test p (None for n < 2). None when no seed is shared."""
    seeds = sorted(set(a) & set(b), key=str)
    if not seeds:
        return None
    d = [float(a[s]) - float(b[s]) for s in seeds]
    out: dict[str, Any] = {"n": len(d), "mean_diff": statistics.fmean(d), "wins": sum(x > 0 for x in d),
                           "ties": sum(x == 0 for x in d), "losses": sum(x < 0 for x in d), "p": None}
    if len(d) >= 2:
        sd = statistics.stdev(d)
        if sd == 0:
            out["p"] = 1.0 if d[0] == 0 else 0.0
        else:
            t = statistics.fmean(d) / (sd / math.sqrt(len(d)))
            out["p"] = min(1.0, 2 * _t_sf(abs(t), len(d) - 1))
    return out


def verdict_label(a: str, b: str, diff: float, p: float | None, alpha: float = ALPHA) -> str:
    if p is None:
        return "no test (n < 2)"
    if p < alpha:
        return f"{a if diff > 0 else b} better, beyond seed noise"
    return "within seed noise"


# --------------------------------------------------------------------------------------------------
# Runs -> records -> aggregate (pure except for reading the run directories)
# --------------------------------------------------------------------------------------------------


# results.json callbacks of ``fastsel finetune --rank-split both`` -> suffix of their keys in a record
RANK_RECORDS = {"rank_stability": "", "rank_stability_heldout": "_heldout"}


def record_from_run(results: Mapping[str, Any], plan: Mapping[str, Any] | None, wall: float | None = None) -> dict[str, Any]:
    """The study's record of one finished ``fastsel finetune`` run (its results.json and plan.json)."""
    m = results["main_metric"]
    best = results["best"]
    hist = results.get("history", [])
    job = results.get("job", {})
    rec = {
        "strategy_run": results.get("strategy") or job.get("strategy"),
        "tuner": job.get("tuner"),
        "lr": job.get("lr"),
        "metric_name": m,
        "metric": best["metrics"][m],
        "metrics": best["metrics"],
        "best_epoch": best["epoch"],
        "epoch_metrics": [h["metrics"] for h in hist],
        "train_loss": [h.get("train_loss") for h in hist],
        "trainable_params": results["trainable_params"],
        "epoch_seconds": results["epoch_seconds_mean"],
        "eval_seconds": statistics.fmean([h["eval_seconds"] for h in hist]) if hist else None,
        "cache_seconds": (results.get("cache") or {}).get("seconds", 0.0),
        "peak_mb": results["peak_memory_mb"],
        "num_train": results.get("num_train"),
        "num_eval": results.get("num_eval"),
        "wall_s": wall,
    }
    if plan is not None:
        rec["tuned_blocks"] = [i for i, blk in enumerate(plan["blocks"]) if blk["kind"] != "frozen"]
        rec["head_layer"] = plan.get("head_layer")
        rec["num_layers"] = len(plan["blocks"])
    for callback, suffix in RANK_RECORDS.items():
        rank = (results.get("callbacks") or {}).get(callback)
        if not rank:
            continue
        epochs = rank.get("epochs", {})
        later = {e: entry for e, entry in epochs.items() if e != "0" and "kendall_tau" in entry}
        rec[f"rank_taus{suffix}"] = {e: entry["kendall_tau"] for e, entry in later.items()}
        rec[f"rank_mean_deviation{suffix}"] = {e: entry.get("mean_deviation") for e, entry in later.items()}
        rec[f"rankings{suffix}"] = {e: entry["ranking"] for e, entry in epochs.items()}
    return rec


def seed_values(agg: Mapping[str, Any], task: str, name: str, key: str = "metric") -> dict[str, float]:
    runs = agg.get("runs", {}).get(task, {}).get(name, {})
    return {s: r[key] for s, r in runs.items() if r.get(key) is not None}


def summarize(agg: Mapping[str, Any], task: str, name: str) -> dict[str, Any] | None:
    runs = agg.get("runs", {}).get(task, {}).get(name, {})
    if not runs:
        return None
    recs = [runs[s] for s in sorted(runs, key=lambda x: int(x))]
    metric_name = recs[0]["metric_name"]
    others = sorted({k for r in recs for k in r["metrics"] if k != metric_name})
    blocks: dict[str, int] = {}
    for r in recs:
        key = ",".join(map(str, r.get("tuned_blocks", []))) or "-"
        if r.get("num_layers") is not None and r.get("head_layer") not in (None, r["num_layers"] - 1):
            key += f" (head on {r['head_layer']})"
        blocks[key] = blocks.get(key, 0) + 1
    params = sorted({r["trainable_params"] for r in recs})
    return {
        "n": len(recs),
        "metric_name": metric_name,
        "metric": mean_std([r["metric"] for r in recs]),
        "others": {k: mean_std([r["metrics"][k] for r in recs if k in r["metrics"]]) for k in others},
        "best_epoch": [r["best_epoch"] for r in recs],
        "blocks": blocks,
        "params": params,
        "epoch_seconds": statistics.fmean([r["epoch_seconds"] for r in recs]),
        "cache_seconds": statistics.fmean([r["cache_seconds"] or 0.0 for r in recs]),
        "peak_mb": max(r["peak_mb"] for r in recs),
    }


def compare(agg: Mapping[str, Any], task: str, a: str, b: str, alpha: float = ALPHA) -> dict[str, Any] | None:
    """a vs b on ``task`` over seeds: means, difference, Welch test, paired comparison, same-block seeds."""
    va, vb = seed_values(agg, task, a), seed_values(agg, task, b)
    if not va or not vb:
        return None
    ma, mb = statistics.fmean(va.values()), statistics.fmean(vb.values())
    w = welch(list(va.values()), list(vb.values()))
    pr = paired(va, vb)
    runs = agg["runs"][task]
    same = [s for s in set(va) & set(vb)
            if runs[a][s].get("tuned_blocks") is not None and runs[a][s].get("tuned_blocks") == runs[b][s].get("tuned_blocks")]
    p = None if w is None else w["p"]
    return {"task": task, "a": a, "b": b, "n_a": len(va), "n_b": len(vb), "mean_a": ma, "mean_b": mb,
            "diff": ma - mb, "welch": w, "paired": pr, "same_blocks": len(same),
            "label": verdict_label(a, b, ma - mb, p, alpha)}


def verdicts(agg: Mapping[str, Any], tasks: Sequence[str], alpha: float = ALPHA) -> list[dict[str, Any]]:
    """fisher-top-k vs position-top-k and vs random-k, k = 1..3, wherever both were run."""
    out = []
    for task in tasks:
        for k in (1, 2, 3):
            for other in (f"position-top-{k}", f"random-{k}"):
                c = compare(agg, task, f"fisher-top-{k}", other, alpha)
                if c is not None:
                    out.append(c)
    return out


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test (ties dropped): scipy's binomial test of wins out of wins + losses at 1/2."""
    from scipy.stats import binomtest

    return float(binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0


def pooled_verdicts(comparisons: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per comparison kind (e.g. fisher-top-1 vs position-top-1), the paired seeds of every task pooled: wins,
    ties, losses of the Fisher side and the sign test. Metrics differ across tasks (accuracy, F1, MCC), so only
    the signs of the paired differences are pooled."""
    kinds: dict[tuple[str, str], dict[str, Any]] = {}
    for c in comparisons:
        pr = c["paired"]
        if not pr:
            continue
        k = kinds.setdefault((c["a"], c["b"]), {"a": c["a"], "b": c["b"], "tasks": [], "wins": 0, "ties": 0, "losses": 0})
        k["tasks"].append(c["task"])
        for f in ("wins", "ties", "losses"):
            k[f] += pr[f]
    out = []
    for k in kinds.values():
        k["p"] = sign_test(k["wins"], k["losses"])
        out.append(k)
    return out


def rank_stability(agg: Mapping[str, Any], task: str, name: str = "full", suffix: str = "") -> dict[str, Any] | None:
    """Kendall taus and mean rank deviations per epoch over seeds; suffix "_heldout": the held-out passes."""
    runs = agg.get("runs", {}).get(task, {}).get(name, {})
    taus: dict[str, list[float]] = {}
    devs: dict[str, list[float]] = {}
    for r in runs.values():
        for e, t in (r.get(f"rank_taus{suffix}") or {}).items():
            taus.setdefault(e, []).append(t)
        for e, d in (r.get(f"rank_mean_deviation{suffix}") or {}).items():
            if d is not None:
                devs.setdefault(e, []).append(d)
    if not taus:
        return None
    return {"taus": taus, "deviations": devs}


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def _p(p: float | None) -> str:
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
    lines += ["", f"## Verdict: Fisher-selected blocks vs position- and random-selected ones", "",
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
                         f"{c['diff']:+.3f} | {_p(c['welch']['p'] if c['welch'] else None)} | {pair} | "
                         f"{_p(pr['p'] if pr else None)} | {c['same_blocks']}/{pr['n'] if pr else 0} | {c['label']} |")
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
                             f"{_p(k['p'])} |")
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


def merge_results(aggs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several studies' results.json in one: runs and scores by task (a later file wins a (task, name, seed) it
    shares with an earlier one), configs kept per task, failed runs concatenated."""
    merged: dict[str, Any] = {"configs": {}, "runs": {}, "scores": {}, "failed": []}
    for agg in aggs:
        for task, by_name in agg.get("runs", {}).items():
            merged["configs"][task] = agg.get("config", {})
            for name, by_seed in by_name.items():
                merged["runs"].setdefault(task, {}).setdefault(name, {}).update(by_seed)
        for task, by_seed in agg.get("scores", {}).items():
            merged["scores"].setdefault(task, {}).update(by_seed)
        merged["failed"] += list(agg.get("failed") or [])
    return merged


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


# --------------------------------------------------------------------------------------------------
# The study: jobs
# --------------------------------------------------------------------------------------------------


@dataclass
class Job:
    kind: str  # "score" or "train"
    task: str
    seed: int
    name: str  # reported strategy name ("scores" for scoring)
    out: Path  # run directory (train) or seed directory (score)
    cmd: list[str]
    deps: list[str] = field(default_factory=list)
    strategy: str = ""
    tuner: str = "full"
    lr: float = 0.0
    train_examples: int | None = None
    max_length: int = 0
    epochs: int = 0
    rank_epochs: list[int] = field(default_factory=list)
    rank_split: str = ""  # of the rank-stability passes ("" when none)

    @property
    def key(self) -> str:
        return f"{self.task}/seed{self.seed}/{self.name}"

    def done(self) -> bool:
        if self.kind == "score":
            return all((self.out / f"scores.{k}.json").is_file() for k in ("fisher", "variability"))
        return (self.out / "results.json").is_file()


def seed_dir(out: Path, task: str, seed: int) -> Path:
    return out / task / f"seed{seed}"


def plan_jobs(args: argparse.Namespace, out: Path, tasks: Sequence[str], seeds: Sequence[int],
              strategies: Sequence[tuple[str, str, str, str]], *, epochs: int | None = None,
              train_examples: Mapping[str, int] | None = None) -> list[Job]:
    """Every scoring and training job of the study, seed-major (all tasks of seed 0 first), scoring first."""
    epochs = args.epochs if epochs is None else epochs
    train_examples = args.train_examples if train_examples is None else train_examples
    lrs = {"full": args.lr_full, "blocks": args.lr_blocks, "bitfit": args.lr_bitfit, "peft": args.lr_peft}
    py = sys.executable
    jobs: list[Job] = []
    for seed in seeds:
        for task in tasks:
            sdir = seed_dir(out, task, seed)
            ml = for_task(args.max_length, task)
            needs = {scores_kind(s[1]) for s in strategies} - {None}
            score_key = None
            if needs:
                score_cmd = [py, "-m", "fastsel", "score", "--metric", "fisher,variability", "--model", args.model,
                             "--task", task, "--data-dir", args.data_dir, "--num-examples", str(args.score_examples),
                             "--balanced", "--seed", str(seed), "--max-length", str(ml), "--device", args.device,
                             "--out", str(sdir / "scores.json"), "--no-progress"]
                sj = Job("score", task, seed, "scores", sdir, score_cmd, max_length=ml)
                jobs.append(sj)
                score_key = sj.key
            n_train = for_task(train_examples, task)
            for name, strategy, tuner, family in strategies:
                strategy = strategy.format(seed=seed)
                lr = lrs[family]
                rdir = sdir / name
                # the LoRA / adapter sizes only where they apply: finetune refuses a flag it would ignore
                lora = tuner == "lora" or strategy.startswith(("lora-", "spafit-"))
                cmd = [py, "-m", "fastsel", "finetune", "--model", args.model, "--task", task, "--data-dir",
                       args.data_dir, "--strategy", strategy, "--tuner", tuner, "--epochs", str(epochs), "--lr", repr(lr),
                       "--batch-size", str(args.batch_size), "--max-length", str(ml), "--seed", str(seed),
                       *(["--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha)] if lora else []),
                       *(["--adapter-size", str(args.adapter_size)] if tuner == "adapter" else []),
                       "--device", args.device, "--out", str(rdir), "--no-progress"]
                if n_train:
                    cmd += ["--train-examples", str(n_train)]
                deps = []
                kind = scores_kind(strategy)
                if kind:
                    cmd += ["--scores", str(sdir / f"scores.{kind}.json")]
                    deps.append(score_key)
                rank = rank_epochs_for(epochs, args.rank_epochs) if name == "full" else []
                if rank:
                    cmd += ["--rank-epochs", ",".join(map(str, rank)), "--rank-examples", str(args.rank_examples),
                            "--rank-split", args.rank_split]
                jobs.append(Job("train", task, seed, name, rdir, cmd, deps, strategy, tuner, lr, n_train or None, ml,
                                epochs, rank, args.rank_split if rank else ""))
    return jobs


# results.json "job" fields that must match for a finished run to count as this study's
def settings_mismatch(job: Job, results: Mapping[str, Any]) -> list[str]:
    got = results.get("job", {})
    want = {"strategy": job.strategy, "tuner": job.tuner, "epochs": job.epochs, "seed": job.seed,
            "max_length": job.max_length, "train_examples": job.train_examples}
    bad = [f"{k} {got.get(k)!r} != {v!r}" for k, v in want.items() if got.get(k) != v]
    if job.rank_split and got.get("rank_split", "train") != job.rank_split:  # runs from before --rank-split: train
        bad.append(f"rank_split {got.get('rank_split', 'train')!r} != {job.rank_split!r}")
    if got.get("lr") is not None and not math.isclose(float(got["lr"]), job.lr, rel_tol=1e-9):
        bad.append(f"lr {got['lr']!r} != {job.lr!r}")
    return bad


def score_mismatch(job: Job, scores: Mapping[str, Any], score_examples: int) -> list[str]:
    """Settings of a finished scoring (a scores.json's config) that differ from this study's."""
    got = scores.get("config", {})
    want = {"num_examples": score_examples, "seed": job.seed, "max_length": job.max_length, "balanced": True,
            "task": job.task}
    return [f"scores {k} {got.get(k)!r} != {v!r}" for k, v in want.items() if got.get(k) != v]


def collect(out: Path, jobs: Sequence[Job], config: Mapping[str, Any], failed: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The aggregate results.json, built from the run directories on disk."""
    agg: dict[str, Any] = {"config": dict(config), "runs": {}, "scores": {}, "failed": list(failed)}
    for job in jobs:
        if job.kind == "score":
            if job.done():
                entry = {}
                for k in ("fisher", "variability"):
                    d = json.loads((job.out / f"scores.{k}.json").read_text())
                    entry[f"{k}_ranking"] = d.get("ranking")
                    if k == "variability":
                        entry["l_star"] = d.get("l_star")
                    entry[f"{k}_tau_halves"] = (d.get("ranking_confidence") or {}).get("kendall_tau_halves")
                wall = _read_wall(job.out / "score_wall.json")
                entry["wall_s"] = wall
                agg["scores"].setdefault(job.task, {})[str(job.seed)] = entry
            continue
        if not job.done():
            continue
        res = json.loads((job.out / "results.json").read_text())
        plan_path = job.out / "plan.json"
        plan = json.loads(plan_path.read_text()) if plan_path.is_file() else None
        rec = record_from_run(res, plan, _read_wall(job.out / "wall.json"))
        agg["runs"].setdefault(job.task, {}).setdefault(job.name, {})[str(job.seed)] = rec
    return agg


def _read_wall(path: Path) -> float | None:
    try:
        return float(json.loads(path.read_text())["wall_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------------------------------
# Cost model (dry run)
# --------------------------------------------------------------------------------------------------


def padded_tokens(lengths: Sequence[int], batch_size: int, max_length: int) -> float:
    """Mean padded length per example when ``lengths`` are cut at ``max_length`` and batched in order."""
    if not lengths:
        return float(max_length)
    cut = [min(n, max_length) for n in lengths]
    total = sum(max(cut[i : i + batch_size]) * len(cut[i : i + batch_size]) for i in range(0, len(cut), batch_size))
    return total / len(cut)


def fit_costs(refs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-token costs from finished runs. A ref: {task, name, num_train, num_eval, epochs, tok_train,
    tok_eval, train_s (sum over epochs), eval_s (sum), cache_s, wall_s or None, rank_passes, rank_examples}.
    Returns {"by": {(task, name): coeffs}, "by_name": {name: coeffs}}; coeffs: train, eval, cache (s per
    token), overhead (s per process), n (refs)."""
    def coeffs(r):
        e = max(r["epochs"], 1)
        c_train = r["train_s"] / max(e * r["num_train"] * r["tok_train"], 1e-9)
        c_eval = r["eval_s"] / max(e * r["num_eval"] * r["tok_eval"], 1e-9)
        cache_tokens = r["num_train"] * r["tok_train"] + r["num_eval"] * r["tok_eval"]
        c_cache = (r["cache_s"] or 0.0) / max(cache_tokens, 1e-9)
        rank_s = r.get("rank_passes", 0) * r.get("rank_examples", 0) * r["tok_train"] * c_train
        overhead = None
        if r.get("wall_s") is not None:
            overhead = max(r["wall_s"] - r["train_s"] - r["eval_s"] - (r["cache_s"] or 0.0) - rank_s, 0.0)
        return {"train": c_train, "eval": c_eval, "cache": c_cache, "overhead": overhead}

    def merge(cs):
        out = {k: statistics.median([c[k] for c in cs]) for k in ("train", "eval", "cache")}
        ov = [c["overhead"] for c in cs if c["overhead"] is not None]
        out["overhead"] = statistics.median(ov) if ov else None
        out["n"] = len(cs)
        return out

    by: dict[tuple[str, str], list] = {}
    by_name: dict[str, list] = {}
    for r in refs:
        c = coeffs(r)
        by.setdefault((r["task"], r["name"]), []).append(c)
        by_name.setdefault(r["name"], []).append(c)
    return {"by": {k: merge(v) for k, v in by.items()}, "by_name": {k: merge(v) for k, v in by_name.items()}}


def estimate_train(name: str, task: str, n_train: int, n_eval: int, tok_train: float, tok_eval: float, epochs: int,
                   rank_passes: int, rank_examples: int, costs: Mapping[str, Any], uses_cache: bool | None = None
                   ) -> tuple[float, str]:
    """(seconds, source) of one training run under the fitted ``costs``."""
    by, by_name = costs.get("by", {}), costs.get("by_name", {})
    if (task, name) in by:
        c, src = by[(task, name)], "measured"
    elif name in by_name:
        c, src = by_name[name], "other task"
    elif "full" in by_name:
        c, src = dict(by_name["full"], cache=0.0), "full's cost (upper bound)"
    else:
        c, src = {"train": BUILTIN_TRAIN_S_PER_TOKEN, "eval": BUILTIN_EVAL_S_PER_TOKEN, "cache": 0.0,
                  "overhead": BUILTIN_OVERHEAD_S}, "built-in"
    overhead = c["overhead"]
    if overhead is None:
        ovs = [v["overhead"] for v in by_name.values() if v["overhead"] is not None]
        overhead = statistics.median(ovs) if ovs else BUILTIN_OVERHEAD_S
    full_train = by_name.get("full", {}).get("train", c["train"])
    seconds = (overhead + epochs * (n_train * tok_train * c["train"] + n_eval * tok_eval * c["eval"])
               + (n_train * tok_train + n_eval * tok_eval) * c["cache"]
               + rank_passes * rank_examples * tok_train * full_train)
    return seconds, src


def estimate_score(task: str, n: int, tok: float, refs: Sequence[Mapping[str, Any]], costs: Mapping[str, Any]) -> tuple[float, str]:
    """Scoring (Fisher + variability, one pass): from measured scorings, else ~2 training steps per example."""
    def per_tok(rs):
        return [(r["wall_s"] - BUILTIN_SCORE_OVERHEAD_S) / max(r["n"] * r["tok"], 1e-9) for r in rs if r.get("wall_s")]

    for rs, src in (([r for r in refs if r.get("task") == task], "measured"), (refs, "other task")):
        if per_tok(rs):
            return BUILTIN_SCORE_OVERHEAD_S + n * tok * max(statistics.median(per_tok(rs)), 0.0), src
    full = costs.get("by_name", {}).get("full", {}).get("train", BUILTIN_TRAIN_S_PER_TOKEN)
    return BUILTIN_SCORE_OVERHEAD_S + 2 * n * tok * full, "guess"


def makespan(durations: Mapping[str, float], deps: Mapping[str, Sequence[str]], order: Sequence[str], workers: int) -> float:
    """Wall time of list scheduling in ``order`` on ``workers`` (a job starts once its deps are done), as
    the study's scheduler does it: at every free slot, the first ready job in order."""
    pending = list(order)
    finish: dict[str, float] = {}
    running: list[tuple[float, str]] = []
    now = 0.0
    while pending or running:
        ready = [k for k in pending if all(d in finish and finish[d] <= now for d in deps.get(k, ()))]
        while ready and len(running) < workers:
            k = ready.pop(0)
            pending.remove(k)
            running.append((now + durations[k], k))
        if not running:  # deps can never finish (should not happen)
            raise ValueError(f"unsatisfiable dependencies: {pending}")
        running.sort()
        t, k = running.pop(0)
        now = t
        finish[k] = t
    return now


# --------------------------------------------------------------------------------------------------
# Data statistics for the cost model (reads the data and the tokenizer; not needed by the tests)
# --------------------------------------------------------------------------------------------------

_TOKEN_CACHE: dict[tuple, list[int]] = {}


def _token_lengths(model: str, task: str, data_dir: str, split: str, limit: int = 3000) -> tuple[list[int], int]:
    """Token lengths of up to ``limit`` random examples of a split (in a shuffled order) and the split's size."""
    key = (model, task, data_dir, split)
    if key not in _TOKEN_CACHE:
        import random

        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        from transformers import AutoTokenizer

        from fastsel.data.tasks import load_examples
        from fastsel.hf.loading import resolve_model_path

        ex = load_examples(task, data_dir, split)
        idx = list(range(len(ex.text_a)))
        random.Random(0).shuffle(idx)
        idx = idx[:limit]
        tok = AutoTokenizer.from_pretrained(resolve_model_path(model))
        a = [ex.text_a[i] for i in idx]
        b = [ex.text_b[i] for i in idx] if ex.text_b else None
        enc = tok(a, b, truncation=False) if b else tok(a, truncation=False)
        _TOKEN_CACHE[key] = ([len(x) for x in enc["input_ids"]], len(ex.text_a))
    return _TOKEN_CACHE[key]


def task_tokens(model: str, task: str, data_dir: str, max_length: int, batch_size: int) -> dict[str, float]:
    tr, n_tr = _token_lengths(model, task, data_dir, "train")
    ev, n_ev = _token_lengths(model, task, data_dir, "validation")
    return {"tok_train": padded_tokens(tr, batch_size, max_length), "tok_eval": padded_tokens(ev, 64, max_length),
            "tok_score": padded_tokens(sorted(tr), 16, max_length),  # scoring buckets by length
            "n_train_all": n_tr, "n_eval": n_ev}


def gather_refs(dirs: Sequence[Path], model: str, data_dir: str) -> tuple[list[dict], list[dict]]:
    """Cost references from every finished run (results.json with a fastsel finetune job) and scoring
    (score_wall.json) under ``dirs``."""
    train_refs, score_refs = [], []
    known = {s[0] for s in STRATEGIES + EXTRA_STRATEGIES}
    seen: set[Path] = set()
    for d in dirs:
        if not d.is_dir():
            continue
        for path in sorted(d.rglob("results.json")):
            if path.resolve() in seen or path.parent == d:  # DIR/results.json is the study's aggregate
                continue
            seen.add(path.resolve())
            try:
                res = json.loads(path.read_text())
                job = res["job"]
                hist = res["history"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            name = path.parent.name if path.parent.name in known else _name_of(job.get("strategy", ""), job.get("tuner", "full"))
            toks = task_tokens(model, job["task"], data_dir, job["max_length"], job["batch_size"])
            passes = sum(len(((res.get("callbacks") or {}).get(c) or {}).get("epochs", {})) for c in RANK_RECORDS)
            train_refs.append({
                "task": job["task"], "name": name, "num_train": res["num_train"], "num_eval": res["num_eval"],
                "epochs": len(hist), "tok_train": toks["tok_train"], "tok_eval": toks["tok_eval"],
                "train_s": sum(h["train_seconds"] for h in hist), "eval_s": sum(h["eval_seconds"] for h in hist),
                "cache_s": (res.get("cache") or {}).get("seconds", 0.0), "wall_s": _read_wall(path.parent / "wall.json"),
                "rank_passes": passes, "rank_examples": min(job.get("rank_examples", 0), res["num_train"]) if passes else 0,
            })
        for path in sorted(d.rglob("score_wall.json")):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            try:
                w = json.loads(path.read_text())
                toks = task_tokens(model, w["task"], data_dir, w["max_length"], 16)
                score_refs.append({"task": w["task"], "n": w["num_examples"], "tok": toks["tok_score"], "wall_s": w["wall_s"]})
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return train_refs, score_refs


def _name_of(strategy: str, tuner: str) -> str:
    import re

    if tuner == "adapter":
        return "adapters" if strategy == "position-top-2" else ("adapters-all" if strategy == "full" else f"{strategy}+adapter")
    m = re.fullmatch(r"random-(\d+)(?:-s\d+)?", strategy)
    return f"random-{m.group(1)}" if m else strategy


def dry_run(jobs: Sequence[Job], args: argparse.Namespace, cost_dirs: Sequence[Path]) -> float:
    """Print the jobs still to run with estimated seconds; returns the estimated wall time at --jobs."""
    train_refs, score_refs = gather_refs(cost_dirs, args.model, args.data_dir)
    costs = fit_costs(train_refs)
    todo = [j for j in jobs if not j.done()]
    durations, deps, sources = {}, {}, {}
    print(f"{len(jobs)} jobs, {len(jobs) - len(todo)} done, {len(todo)} to run; cost model from {len(train_refs)} "
          f"finished runs and {len(score_refs)} scorings under {', '.join(map(str, cost_dirs))}")
    for j in todo:
        toks = task_tokens(args.model, j.task, args.data_dir, j.max_length, args.batch_size)
        if j.kind == "score":
            sec, src = estimate_score(j.task, args.score_examples, toks["tok_score"], score_refs, costs)
        else:
            n_train = j.train_examples or toks["n_train_all"]
            passes = (len(j.rank_epochs) + 1) * (2 if j.rank_split == "both" else 1) if j.rank_epochs else 0
            sec, src = estimate_train(j.name, j.task, n_train, toks["n_eval"], toks["tok_train"], toks["tok_eval"],
                                      j.epochs, passes, min(args.rank_examples, n_train), costs)
        durations[j.key], sources[j.key] = sec, src
        deps[j.key] = [d for d in j.deps if d in {t.key for t in todo}]
        print(f"  {j.key:<42} {sec:8.0f} s  ({src})")
    total = sum(durations.values())
    per_task: dict[str, float] = {}
    per_name: dict[str, float] = {}
    for j in todo:
        per_task[j.task] = per_task.get(j.task, 0.0) + durations[j.key]
        per_name[j.name] = per_name.get(j.name, 0.0) + durations[j.key]
    if todo:
        print("core-seconds per task: " + ", ".join(f"{t} {v:.0f}" for t, v in per_task.items()))
        print("core-seconds per strategy: " + ", ".join(f"{n} {v:.0f}" for n, v in per_name.items()))
    wall = makespan(durations, deps, [j.key for j in todo], args.jobs) if todo else 0.0
    by_src: dict[str, int] = {}
    for s in sources.values():
        by_src[s] = by_src.get(s, 0) + 1
    print(f"estimate: {total:.0f} core-seconds ({total / 3600:.2f} h); wall with --jobs {args.jobs}: "
          f"{wall:.0f} s ({wall / 3600:.2f} h)   [sources: {by_src}]")
    if any(s != "measured" for s in sources.values()):
        print("  (runs not 'measured' are extrapolated: run --pilot for a per-(task, strategy) measurement)")
    return wall


# --------------------------------------------------------------------------------------------------
# Scheduler: subprocesses, the parent alone writes the aggregate
# --------------------------------------------------------------------------------------------------


def run_jobs(jobs: Sequence[Job], args: argparse.Namespace, out: Path, on_done) -> list[dict]:
    """Run the unfinished ``jobs`` with at most ``args.jobs`` subprocesses at once, in order, a job waiting
    for its dependencies; ``on_done(failed)`` after every finished job. Returns the failures."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    pending = [j for j in jobs if not j.done()]
    done_keys = {j.key for j in jobs if j.done()}
    failed: list[dict] = []
    failed_keys: set[str] = set()
    running: dict[str, tuple[Job, subprocess.Popen, float, Any]] = {}
    try:
        while pending or running:
            for j in list(pending):  # jobs whose scoring failed cannot run
                bad = [d for d in j.deps if d in failed_keys]
                if bad:
                    pending.remove(j)
                    failed_keys.add(j.key)
                    failed.append({"task": j.task, "seed": j.seed, "name": j.name, "error": f"needs {bad[0]}, which failed"})
            for j in list(pending):
                if len(running) >= args.jobs:
                    break
                if all(d in done_keys for d in j.deps):
                    pending.remove(j)
                    j.out.mkdir(parents=True, exist_ok=True)
                    log = open(j.out / ("score_log.txt" if j.kind == "score" else "log.txt"), "w")
                    log.write("$ " + " ".join(j.cmd) + "\n")
                    log.flush()
                    proc = subprocess.Popen(j.cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
                    running[j.key] = (j, proc, time.perf_counter(), log)
                    print(f"start {j.key} (pid {proc.pid})", flush=True)
            if not running:
                if pending:
                    raise RuntimeError(f"jobs that can never start: {[j.key for j in pending]}")
                break
            time.sleep(0.5)
            for key, (j, proc, start, log) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del running[key]
                wall = time.perf_counter() - start
                if rc == 0 and j.done():
                    done_keys.add(key)
                    if j.kind == "score":
                        atomic_write_text(j.out / "score_wall.json", json.dumps(
                            {"wall_s": wall, "task": j.task, "num_examples": args.score_examples,
                             "max_length": j.max_length}) + "\n")
                    else:
                        atomic_write_text(j.out / "wall.json", json.dumps({"wall_s": wall}) + "\n")
                        _prune(j.out, args.keep_weights)
                    print(f"done  {key}: {_summary_line(j)} ({wall:.0f} s)", flush=True)
                else:
                    tail = _tail(j.out / ("score_log.txt" if j.kind == "score" else "log.txt"))
                    failed_keys.add(key)
                    failed.append({"task": j.task, "seed": j.seed, "name": j.name, "error": f"exit {rc}: {tail[-1] if tail else ''}"})
                    print(f"FAILED {key} (exit {rc}):\n    " + "\n    ".join(tail[-15:]), flush=True)
                on_done(failed)
    except KeyboardInterrupt:
        for key, (j, proc, _, log) in running.items():  # only our own children, by their handles
            proc.terminate()
        for key, (j, proc, _, log) in running.items():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        raise
    return failed


def _prune(run_dir: Path, keep_weights: bool) -> None:
    # fastsel finetune leaves its resumable training checkpoint (parameters + optimizer; ~360 MB for full
    # fine-tuning of MiniLM) behind after a finished run; the study does not need it.
    (run_dir / "train-state.pt").unlink(missing_ok=True)
    if not keep_weights:
        (run_dir / "trained.safetensors").unlink(missing_ok=True)


def _tail(path: Path, n: int = 40) -> list[str]:
    try:
        return [l for l in path.read_text(errors="replace").splitlines() if l.strip()][-n:]
    except OSError:
        return []


def _summary_line(job: Job) -> str:
    if job.kind == "score":
        try:
            d = json.loads((job.out / "scores.fisher.json").read_text())
            v = json.loads((job.out / "scores.variability.json").read_text())
            return f"fisher ranking {d.get('ranking')}, l* {v.get('l_star')}"
        except (OSError, ValueError):
            return "scored"
    try:
        r = json.loads((job.out / "results.json").read_text())
        m = r["main_metric"]
        return f"{m} {r['best']['metrics'][m]:.4f} @{r['best']['epoch']}, {r['epoch_seconds_mean']:.1f} s/epoch"
    except (OSError, ValueError, KeyError):
        return "finished"


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--tasks", default="sst2,mrpc,rte,cola")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (training subset, head init, shuffling, random draw)")
    p.add_argument("--strategies", default="", help="comma-separated subset of the built-in list (default: all); "
                   f"also: {', '.join(s[0] for s in EXTRA_STRATEGIES)}")
    p.add_argument("--train-examples", default="2000", help="balanced training subset per seed; 0 = the whole training "
                   "split (natural class proportions); per task: 2000,sst2=8000")
    p.add_argument("--score-examples", type=int, default=512, help="balanced training examples for the layer scores")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", default="64", help="max tokens; per task: 64,rte=128")
    p.add_argument("--lr-full", type=float, default=DEFAULT_LR["full"], help="full fine-tuning")
    p.add_argument("--lr-blocks", type=float, default=DEFAULT_LR["blocks"], help="full tuning of selected blocks")
    p.add_argument("--lr-bitfit", type=float, default=DEFAULT_LR["bitfit"])
    p.add_argument("--lr-peft", type=float, default=DEFAULT_LR["peft"], help="LoRA, SPAFIT, adapters")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--adapter-size", type=int, default=256)
    p.add_argument("--rank-epochs", default="1,2,3", help="epochs at which the full run re-ranks the blocks by Fisher "
                   "(Kendall tau vs epoch 0); those above --epochs are dropped; empty: none")
    p.add_argument("--rank-examples", type=int, default=256, help="examples of each rank-stability Fisher pass")
    p.add_argument("--rank-split", choices=("train", "validation", "both"), default="both",
                   help="examples of the rank-stability passes: training ones (fitted by the model), held-out ones, or both")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every subprocess")
    p.add_argument("--jobs", type=int, default=1, help="subprocesses at once (2 on this 2-core box)")
    p.add_argument("--keep-weights", action="store_true", help="keep each run's trained.safetensors")
    p.add_argument("--out", default="runs/compare-seeds")
    p.add_argument("--summarize", default="", metavar="FILES",
                   help="comma-separated results.json of finished studies: print one table across their tasks, the rank "
                        "stability and the verdict; run nothing")
    p.add_argument("--plot", default="", metavar="PNG", help="with --summarize: also draw the table, one panel per task")
    p.add_argument("--dry-run", action="store_true", help="list the runs to do and estimate the wall time; run nothing")
    p.add_argument("--pilot", action="store_true", help="first measure every (task, strategy) once at a small budget "
                   "(first seed, --pilot-examples, 1 epoch) into OUT/pilot; then the study (or, with --dry-run, the estimate)")
    p.add_argument("--pilot-examples", type=int, default=256)
    p.add_argument("--cost-from", default="", help="more directories with finished runs for the cost model (comma-separated)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.train_examples = parse_per_task(args.train_examples)
    args.max_length = parse_per_task(args.max_length)
    args.rank_epochs = [int(e) for e in args.rank_epochs.split(",") if e.strip()]
    tasks = [t for t in args.tasks.split(",") if t]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    strategies = strategy_table(args.strategies.split(","))
    names = [s[0] for s in strategies]
    if args.summarize:
        aggs = [json.loads(Path(f).read_text()) for f in args.summarize.split(",") if f.strip()]
        merged = merge_results(aggs)
        print(render_summary(merged, tasks, names), end="")
        if args.plot:
            plot_summary(merged, tasks, names, args.plot)
        return 0
    out = Path(args.out)
    if args.epochs < 3 and "full" in names and args.rank_epochs:
        print(f"note: --epochs {args.epochs} < 3: rank stability only at epochs {rank_epochs_for(args.epochs, args.rank_epochs)}")
    config = {"model": args.model, "seeds": seeds, "train_examples": args.train_examples, "score_examples": args.score_examples,
              "epochs": args.epochs, "batch_size": args.batch_size, "max_length": args.max_length,
              "lr": {"full": args.lr_full, "blocks": args.lr_blocks, "bitfit": args.lr_bitfit, "peft": args.lr_peft},
              "lora": [args.lora_r, args.lora_alpha], "adapter_size": args.adapter_size,
              "rank_epochs": rank_epochs_for(args.epochs, args.rank_epochs), "rank_examples": args.rank_examples,
              "rank_split": args.rank_split,
              "device": args.device}
    jobs = plan_jobs(args, out, tasks, seeds, strategies)

    # a finished run made with other settings must not be mixed in
    stale = []
    for j in jobs:
        if j.kind == "train" and j.done():
            bad = settings_mismatch(j, json.loads((j.out / "results.json").read_text()))
        elif j.kind == "score" and j.done():
            bad = score_mismatch(j, json.loads((j.out / "scores.fisher.json").read_text()), args.score_examples)
        else:
            bad = []
        if bad:
            stale.append(f"{j.key}: {'; '.join(bad)}")
    if stale:
        print(f"{len(stale)} finished runs under {out} were made with other settings (use another --out, or remove them):\n  "
              + "\n  ".join(stale[:20]), file=sys.stderr)
        return 2

    cost_dirs = [out, out / "pilot"] + [Path(d) for d in args.cost_from.split(",") if d]
    if args.pilot:
        pilot_jobs = plan_jobs(args, out / "pilot", tasks, seeds[:1], strategies, epochs=1,
                               train_examples={"*": args.pilot_examples})
        print(f"pilot: {sum(not j.done() for j in pilot_jobs)} runs into {out / 'pilot'}", flush=True)
        pfailed = run_jobs(pilot_jobs, args, out / "pilot", lambda failed: None)
        if pfailed:
            print(f"pilot: {len(pfailed)} failed runs", file=sys.stderr)
    if args.dry_run:
        dry_run(jobs, args, cost_dirs)
        return 0

    def write(failed) -> None:
        agg = collect(out, jobs, config, failed)
        atomic_write_text(out / "results.json", json.dumps(agg, indent=1) + "\n")
        atomic_write_text(out / "table.md", render_table(agg, tasks, names))

    out.mkdir(parents=True, exist_ok=True)
    write([])
    failed = run_jobs(jobs, args, out, write)
    write(failed)
    print((out / "table.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
