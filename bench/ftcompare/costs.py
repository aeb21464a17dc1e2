"""The cost model of the dry run (pure): per-token costs fitted on finished runs, the estimated seconds of a
training run or a scoring from them, and the wall time of the study's list scheduling on N workers."""
from __future__ import annotations

import statistics
from typing import Any, Mapping, Sequence


# Cost model fallbacks (seconds), used only when no finished run can be measured: per padded token of a
# full fine-tuning step (forward, backward, AdamW) and of evaluation, on one core of this 2-core box, and
# per-process start-up (Python, torch, transformers, the model, the data, plot, weights). Measured: SST-2,
# 2000 examples, max length 64, batch 16, load average 2-5 from other jobs.
BUILTIN_TRAIN_S_PER_TOKEN = 1.0e-3
BUILTIN_EVAL_S_PER_TOKEN = 1.9e-4
BUILTIN_OVERHEAD_S = 6.0
BUILTIN_SCORE_OVERHEAD_S = 8.0


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
