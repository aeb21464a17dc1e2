"""The dry run: the data statistics the cost model needs (token lengths of each split, read with the model's
tokenizer), the cost references gathered from finished runs on disk, and the printed estimate."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .config import EXTRA_STRATEGIES, REPO, STRATEGIES
from .costs import estimate_score, estimate_train, fit_costs, makespan, padded_tokens
from .jobs import Job
from .results import RANK_RECORDS, read_wall


_TOKEN_CACHE: dict[tuple, list[int]] = {}


def _token_lengths(model: str, task: str, data_dir: str, split: str, limit: int = 3000) -> tuple[list[int], int]:
    """Token lengths of up to ``limit`` random examples of a split (in a shuffled order) and the split's size."""
    key = (model, task, data_dir, split)
    if key not in _TOKEN_CACHE:
        import random

        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        from transformers import AutoTokenizer

        from fastsel.data import load_examples  # the package name: stable across the data modules' own moves
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
                job = {**res["job"], **res["job"].get("train", {})}  # FinetuneJob nests its training settings under "train"
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
                "cache_s": (res.get("cache") or {}).get("seconds", 0.0), "wall_s": read_wall(path.parent / "wall.json"),
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
