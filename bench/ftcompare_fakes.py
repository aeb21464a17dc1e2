"""Fakes shared by the bench/test_ftcompare_*.py tests: a parsed command line, a finished run's results.json and
plan.json, and an aggregate built from per-seed metrics. No training, no model."""
from __future__ import annotations

import finetune_compare
from ftcompare.config import parse_per_task
from ftcompare.results import record_from_run


def args_for(tmp_path, *extra):
    """The study's parsed command line with the per-task options and rank epochs converted, as main() does."""
    a = finetune_compare.build_parser().parse_args(["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"), *extra])
    a.train_examples = parse_per_task(a.train_examples)
    a.max_length = parse_per_task(a.max_length)
    a.rank_epochs = [int(e) for e in a.rank_epochs.split(",") if e.strip()]
    return a


def fake_results(metric=0.8, strategy="fisher-top-1", seed=0, main="accuracy", extra=None, taus=None, epochs=3):
    hist = [{"epoch": e, "train_loss": 0.5, "train_seconds": 10.0, "eval_seconds": 2.0,
             "metrics": {main: metric - 0.01 * (epochs - e), **(extra or {})}, "eval_loss": 0.4} for e in range(1, epochs + 1)]
    res = {"job": {"strategy": strategy, "tuner": "full", "epochs": epochs, "seed": seed, "max_length": 64,
                   "train_examples": 2000, "lr": 1e-4, "batch_size": 16, "task": "sst2", "rank_examples": 256},
           "task": "sst2", "strategy": strategy, "num_train": 2000, "num_eval": 872, "history": hist,
           "best": {"epoch": epochs, "metrics": hist[-1]["metrics"]}, "main_metric": main, "trainable_params": 1775234,
           "epoch_seconds_mean": 10.0, "cache": {"blocks": 4, "seconds": 5.0, "megabytes": 10.0}, "peak_memory_mb": 800.0,
           "callbacks": {}}
    if taus:
        res["callbacks"]["rank_stability"] = {"epochs": {"0": {"ranking": [4, 5, 3, 2, 1, 0]}, **{
            e: {"ranking": [4, 5, 3, 2, 1, 0], "kendall_tau": t, "mean_deviation": 0.5} for e, t in taus.items()}}}
    return res


def fake_plan(blocks, head=5, n=6):
    return {"blocks": [{"kind": "full" if i in blocks else "frozen"} for i in range(n)], "head_layer": head}


def agg_of(values: dict[str, dict[int, float]], blocks: dict[str, list[int]] | None = None, task="sst2"):
    runs = {}
    for name, by_seed in values.items():
        for seed, v in by_seed.items():
            rec = record_from_run(fake_results(v, name, seed), fake_plan((blocks or {}).get(name, [5])), 10.0)
            runs.setdefault(task, {}).setdefault(name, {})[str(seed)] = rec
    return {"config": {}, "runs": runs, "scores": {}, "failed": []}
