"""The task-aware scoring studies of docs/task_aware.md (issue 22), pre-registered there before any run.

Part A (scoring only): per (model, task, seed) the Fisher ranking with ``--head fresh`` and ``--head probe`` (whose
label-dependence check gives the permuted-probe ranking); H1: are rankings more alike within a task than across
tasks (a permutation test over the task labels), per (model, head); H2: is the probe head's ranking further from
its permuted-label twin than the fresh head's is.

Part B (fine-tuning): per (task, seed) fit the probe head once (``--save-head``), score fresh / probe / variability,
then train every single-block plan ``layers-l-l-(L-1)`` from that head; every selection rule is a lookup into
those runs; paired Wilcoxon signed-rank tests over the cells with Holm's correction.

    python bench/task_aware.py --part a --models minilm,mpnet=/path/all-mpnet-base-v2 --out bench/task_aware_partA.json
    python bench/task_aware.py --part b --out bench/task_aware_partB.json
    python bench/task_aware.py --summarize bench/task_aware_partA.json,bench/task_aware_partB.json

Records are appended cell by cell (atomically), so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fastsel.utils.atomic import atomic_write_text

TASKS_A = ("sst2", "mrpc", "cola", "rte")
TASKS_B = ("sst2", "mrpc", "cola")
LENGTH = {"sst2": 64, "cola": 64, "mrpc": 128, "rte": 128}
RULES = ("task-aware", "fresh", "position", "random", "variability", "oracle")
COMPARISONS = (("task-aware", "random"), ("task-aware", "fresh"), ("task-aware", "position"), ("fresh", "random"),
               ("variability", "random"))


# --------------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------------


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"cells": {}}


def _save(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, allow_nan=False) + "\n")


def _score(model: str, task: str, seed: int, data_dir: str, *, head: str = "fresh", metric: str = "fisher",
           num_examples: int = 200, max_length: int = 64, save_head: str | None = None) -> dict[str, Any]:
    from fastsel.pipeline.config import PipelineConfig, ScoreConfig
    from fastsel.pipeline.run import score

    options: dict[str, Any] = {}
    if metric == "fisher":
        options.update(head=head, save_head=save_head)
    cfg = ScoreConfig(metric=metric, model=model, task=task, data_dir=data_dir, num_examples=num_examples,
                      batch_size=16, max_length=max_length, seed=seed, confidence_groups=4, options=options)
    start = time.perf_counter()
    scores = score(cfg, PipelineConfig(), progress=False)[metric]
    d = scores.to_dict()
    keep = {k: d[k] for k in ("ranking", "label_dependence", "aggregations", "head", "l_star") if k in d}
    keep["scores"] = [l["score"] for l in d["layers"]]
    if "head" in keep:
        keep["head"] = {k: v for k, v in keep["head"].items() if k != "parameters"}
    keep["wall_seconds"] = round(time.perf_counter() - start, 2)
    return keep


def run_part_a(args: argparse.Namespace) -> None:
    out = Path(args.out)
    data = _load(out)
    data["settings"] = {"tasks": args.tasks, "seeds": args.seeds, "models": args.models, "num_examples": 200,
                        "probe_examples": 1000, "label_check": 0.2}
    for spec in args.models:
        name, _, path = spec.partition("=")
        seeds = args.seeds if name == "minilm" else args.seeds[: args.big_seeds]
        for seed, task in itertools.product(seeds, args.tasks):
            for head in ("fresh", "probe"):
                key = f"{name}/{task}/{seed}/{head}"
                if key in data["cells"]:
                    continue
                length = LENGTH[task] if name == "minilm" else 64
                rec = _score(path or name, task, seed, args.data_dir, head=head, max_length=length)
                rec.update(model=name, task=task, seed=seed, head_kind=head, max_length=length)
                data["cells"][key] = rec
                _save(out, data)
                print(f"{key}: ranking {rec['ranking']} ({rec['wall_seconds']} s)", flush=True)


def run_part_b(args: argparse.Namespace) -> None:
    from fastsel.data.task_metrics import main_metric
    from fastsel.data.specs import get_task
    from fastsel.train.config import TrainConfig
    from fastsel.train.finetune import FinetuneJob, run_finetune

    out = Path(args.out)
    data = _load(out)
    data["settings"] = {"tasks": args.tasks, "seeds": args.seeds, "model": "minilm", "train_examples": 500,
                        "eval_examples": 500, "epochs": 2, "lr": 1e-4, "batch_size": 16, "max_length": 64,
                        "metric_at": "last epoch"}
    work = Path(args.work)
    for seed, task in itertools.product(args.seeds, args.tasks):
        key = f"{task}/{seed}"
        cell = data["cells"].get(key, {})
        head_dir = work / f"head-{task}-{seed}"
        if "fresh" not in cell:
            cell["fresh"] = _score("minilm", task, seed, args.data_dir, head="fresh")
        if "probe" not in cell or not head_dir.exists():
            cell["probe"] = _score("minilm", task, seed, args.data_dir, head="probe", save_head=str(head_dir))
        if "variability" not in cell:
            cell["variability"] = _score("minilm", task, seed, args.data_dir, metric="variability", num_examples=2000)
        data["cells"][key] = cell
        _save(out, data)
        blocks = cell.setdefault("blocks", {})
        L = len(cell["fresh"]["ranking"])
        metric = main_metric(get_task(task))
        for layer in range(L):
            if str(layer) in blocks:
                continue
            run_dir = work / f"run-{task}-{seed}-{layer}"
            start = time.perf_counter()
            res = run_finetune(FinetuneJob(model=str(head_dir), task=task, out=str(run_dir), data_dir=args.data_dir,
                                           strategy=f"layers-{layer}-{layer}-{L - 1}", max_length=64,
                                           head="fresh",  # keep the head the folder holds: the cell's probe
                                           train_examples=500, eval_examples=500,
                                           train=TrainConfig(epochs=2, lr=1e-4, batch_size=16, seed=seed,
                                                             progress=False)))
            history = res["history"]
            blocks[str(layer)] = {"last": history[-1]["metrics"][metric], "per_epoch": [h["metrics"][metric] for h in history],
                                  "seconds": round(time.perf_counter() - start, 1), "trainable_params": res["trainable_params"]}
            cell["metric"] = metric
            _save(out, data)
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"{key} block {layer}: {metric} {blocks[str(layer)]['last']:.4f} ({blocks[str(layer)]['seconds']} s)", flush=True)


# --------------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------------


def rank_vector(ranking: Sequence[int]) -> list[int]:
    """ranking (best first) -> the rank of each block (0 = best)."""
    out = [0] * len(ranking)
    for r, l in enumerate(ranking):
        out[l] = r
    return out


def tau(a: Sequence[int], b: Sequence[int]) -> float:
    from scipy.stats import kendalltau

    t = kendalltau(rank_vector(a), rank_vector(b)).statistic
    return 1.0 if not math.isfinite(t) else float(t)  # two identical constant rankings cannot occur; guard anyway


def task_dependence(rankings: Sequence[Sequence[int]], tasks: Sequence[str], permutations: int = 10_000,
                    seed: int = 0) -> dict[str, Any]:
    """H1: S = mean tau within tasks - mean tau across tasks; one-sided permutation p over the task labels."""
    n = len(rankings)
    t = np.ones((n, n))
    for i, j in itertools.combinations(range(n), 2):
        t[i, j] = t[j, i] = tau(rankings[i], rankings[j])
    iu = np.triu_indices(n, 1)
    labels = np.asarray(tasks)

    def stat(lab: np.ndarray) -> tuple[float, float, float]:
        same = (lab[:, None] == lab[None, :])[iu]
        within, across = t[iu][same].mean(), t[iu][~same].mean()
        return within - across, within, across

    s, within, across = stat(labels)
    rng = np.random.default_rng(seed)
    count = sum(stat(rng.permutation(labels))[0] >= s - 1e-12 for _ in range(permutations))
    return {"S": float(s), "mean_tau_within": float(within), "mean_tau_across": float(across),
            "p": (1 + int(count)) / (1 + permutations), "cells": n, "task_dependent": (1 + int(count)) / (1 + permutations) < 0.05}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * pvalues[i])
        adjusted[i] = min(1.0, running)
    return adjusted


def rule_values(cell: dict[str, Any]) -> dict[str, float]:
    """Each selection rule's metric in one Part B cell (a lookup into its single-block runs)."""
    last = {int(k): v["last"] for k, v in cell["blocks"].items()}
    L = len(last)
    return {
        "task-aware": last[cell["probe"]["ranking"][0]],
        "fresh": last[cell["fresh"]["ranking"][0]],
        "position": last[L - 1],
        "random": float(np.mean([last[l] for l in range(L)])),
        "variability": last[cell["variability"]["ranking"][0]],
        "oracle": max(last.values()),
    }


def part_b_verdict(cells: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from scipy.stats import wilcoxon

    done = {k: c for k, c in cells.items() if len(c.get("blocks", {})) == len(c["fresh"]["ranking"])}
    values = {k: rule_values(c) for k, c in done.items()}
    rows = []
    for a, b in COMPARISONS:
        d = np.asarray([v[a] - v[b] for v in values.values()])
        if np.allclose(d, 0):
            p = 1.0
        else:
            p = float(wilcoxon(d, zero_method="pratt", alternative="two-sided").pvalue)
        rows.append({"comparison": f"{a} - {b}", "n": len(d), "mean": float(d.mean()), "sd": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                     "wins": int((d > 0).sum()), "ties": int((d == 0).sum()), "losses": int((d < 0).sum()), "p": p})
    for row, adj in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = adj
        row["verdict"] = ("win" if row["mean"] > 0 else "loss") if adj < 0.05 else "no difference detected"
    per_task: dict[str, dict[str, list[float]]] = {}
    for k, v in values.items():
        task = k.split("/")[0]
        for rule, x in v.items():
            per_task.setdefault(task, {}).setdefault(rule, []).append(x)
    return {"cells": len(done), "comparisons": rows, "per_task": per_task,
            "chosen_blocks": {k: {"task-aware": c["probe"]["ranking"][0], "fresh": c["fresh"]["ranking"][0],
                                  "variability": c["variability"]["ranking"][0]} for k, c in done.items()}}


def summarize(paths: Sequence[str]) -> dict[str, Any]:
    from scipy.stats import wilcoxon

    out: dict[str, Any] = {}
    for path in paths:
        data = _load(Path(path))
        cells = data["cells"]
        if "blocks" in next(iter(cells.values()), {}) or any("fresh" in c for c in cells.values()):
            out["part_b"] = part_b_verdict(cells)
            continue
        part_a: dict[str, Any] = {}
        for model in sorted({c["model"] for c in cells.values()}):
            mine = {k: c for k, c in cells.items() if c["model"] == model}
            keys = sorted({(c["task"], c["seed"]) for c in mine.values()
                           if f"{model}/{c['task']}/{c['seed']}/fresh" in mine and f"{model}/{c['task']}/{c['seed']}/probe" in mine})
            fresh = [mine[f"{model}/{t}/{s}/fresh"] for t, s in keys]
            probe = [mine[f"{model}/{t}/{s}/probe"] for t, s in keys]
            tasks = [t for t, _ in keys]
            res: dict[str, Any] = {"cells": len(keys)}
            res["H1"] = {"fresh": task_dependence([c["ranking"] for c in fresh], tasks),
                         "probe": task_dependence([c["ranking"] for c in probe], tasks),
                         "permuted-probe": task_dependence([c["label_dependence"]["permuted_ranking"] for c in probe], tasks)}
            tf = [c["label_dependence"]["kendall_tau_vs_permuted_labels"] for c in fresh]
            tp = [c["label_dependence"]["kendall_tau_vs_permuted_labels"] for c in probe]
            diff = np.asarray(tp) - np.asarray(tf)
            p = 1.0 if np.allclose(diff, 0) else float(wilcoxon(tp, tf, zero_method="pratt", alternative="less").pvalue)
            res["H2"] = {"mean_tau_probe_vs_permuted": float(np.mean(tp)), "mean_tau_fresh_vs_permuted": float(np.mean(tf)),
                         "p_one_sided": p, "label_free_share_fresh": float(np.mean([c["label_dependence"]["label_free"] for c in fresh])),
                         "label_free_share_probe": float(np.mean([c["label_dependence"]["label_free"] for c in probe]))}
            # (records of the first cells lost the head's record to a key clash: "head" held the kind)
            res["probe_heldout"] = {t: [round(c["head"]["heldout_metrics"][c["head"]["main_metric"]], 4)
                                        for c in probe if c["task"] == t and isinstance(c.get("head"), dict)]
                                    for t in sorted(set(tasks))}
            res["permuted_probe_heldout"] = {
                t: [round(next(iter(c["label_dependence"]["permuted_head"]["heldout_metrics"].values())), 4)
                    for c in probe if c["task"] == t and "permuted_head" in c["label_dependence"]] for t in sorted(set(tasks))}
            res["rankings"] = {f"{t}/{s}": {"fresh": f["ranking"], "probe": p_["ranking"],
                                            "permuted-probe": p_["label_dependence"]["permuted_ranking"]}
                               for (t, s), f, p_ in zip(keys, fresh, probe)}
            res["aggregation_tau_probe_mean"] = {k: float(np.mean([c["aggregations"]["kendall_tau"][k] for c in probe
                                                                   if c["aggregations"]["kendall_tau"][k] is not None]))
                                                 for k in probe[0]["aggregations"]["kendall_tau"]} if probe else {}
            part_a[model] = res
        out["part_a"] = part_a
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("a", "b"))
    p.add_argument("--summarize", default=None, help="comma-separated result files")
    p.add_argument("--models", default="minilm", help="name or name=path, comma-separated (part a)")
    p.add_argument("--tasks", default=None)
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--big-seeds", type=int, default=3, help="part a: seeds for models other than minilm")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--out", default=None)
    p.add_argument("--work", default="runs/task_aware", help="part b: head checkpoints and run folders")
    args = p.parse_args(argv)
    if args.summarize:
        print(json.dumps(summarize(args.summarize.split(",")), indent=1))
        return 0
    if not args.part or not args.out:
        p.error("give --part and --out, or --summarize")
    args.models = [m for m in args.models.split(",") if m]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.tasks = args.tasks.split(",") if args.tasks else list(TASKS_A if args.part == "a" else TASKS_B)
    (run_part_a if args.part == "a" else run_part_b)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
