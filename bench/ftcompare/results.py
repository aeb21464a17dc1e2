"""From run directories to the study's aggregate (results.json) and what is read from it: one record per finished
run, per-seed values, per-strategy summaries, and the comparisons behind the verdict (Welch and paired tests
per task, the sign test pooled over tasks), rank stability, and the merge of several studies."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

from .jobs import Job
from .stats import ALPHA, mean_std, paired, sign_test, verdict_label, welch


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
                wall = read_wall(job.out / "score_wall.json")
                entry["wall_s"] = wall
                agg["scores"].setdefault(job.task, {})[str(job.seed)] = entry
            continue
        if not job.done():
            continue
        res = json.loads((job.out / "results.json").read_text())
        plan_path = job.out / "plan.json"
        plan = json.loads(plan_path.read_text()) if plan_path.is_file() else None
        rec = record_from_run(res, plan, read_wall(job.out / "wall.json"))
        agg["runs"].setdefault(job.task, {}).setdefault(job.name, {})[str(job.seed)] = rec
    return agg


def read_wall(path: Path) -> float | None:
    try:
        return float(json.loads(path.read_text())["wall_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
