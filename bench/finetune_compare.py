"""Compare tuning strategies on all-MiniLM-L6-v2 with real GLUE data; writes a markdown table.

For every task: Fisher scores (and variability scores) are computed once on a balanced training subset,
then every strategy is trained by ``fastsel finetune`` in its own process (so that the peak resident
memory is that run's), on the same balanced training subset, evaluated on the full validation split after
every epoch (best epoch reported).

    PYTHONPATH=$PWD python bench/finetune_compare.py --data-dir ../shared/data --tasks sst2,rte,mrpc,cola \
        --train-examples 1000 --epochs 2 --max-length 64 --out runs/compare

The table lands in ``<out>/table.md`` (rewritten after every run, so partial results are usable).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastsel.data.tasks import get_task, load_examples, make_dataloader, tokenize_examples  # noqa: E402
from fastsel.scores.fisher import fisher_layer_scores  # noqa: E402
from fastsel.hf.loading import load_model  # noqa: E402
from fastsel.pipeline.config import ScoreConfig
from fastsel.pipeline.inmemory import run_scoring  # noqa: E402

# (strategy, tuner, learning rate). Learning rates are fixed per family, not swept: the fewer trainable
# parameters, the larger the rate (as in Xie et al. B.4 / SPAFIT A.2).
STRATEGIES = [
    ("full", "full", 5e-5),
    ("fisher-top-1", "full", 1e-4),
    ("fisher-top-2", "full", 1e-4),
    ("fisher-top-3", "full", 1e-4),
    ("fisher-bottom-1", "full", 1e-4),
    ("lstar-down-1", "full", 1e-4),
    ("lstar-down-2", "full", 1e-4),
    ("lstar-down-1-trunc", "full", 1e-4),
    ("lstar-up", "full", 1e-4),
    ("position-top-1", "full", 1e-4),
    ("position-top-3", "full", 1e-4),
    ("middle-1", "full", 1e-4),
    ("middle-1-trunc", "full", 1e-4),
    ("bitfit", "full", 1e-3),
    ("lora-i", "full", 5e-4),
    ("spafit-1-3-i", "full", 5e-4),
    ("position-top-2", "adapter", 5e-4),
]
# the same plans trained without the cached frozen prefix: the epoch-time saving of the cache
NO_CACHE = [("position-top-1", "full", 1e-4), ("fisher-top-1", "full", 1e-4)]


def score_task(task: str, args, out: Path) -> dict[str, Path]:
    paths = {"fisher": out / "fisher.json", "variability": out / "variability.json"}
    if all(p.is_file() for p in paths.values()):
        return paths
    spec = get_task(task)
    ex = load_examples(spec, args.data_dir, "train", num_examples=args.score_examples, seed=args.seed, balanced=True)
    model, tok, lm = load_model(args.model, num_labels=spec.num_labels, seed=args.seed)
    feats = tokenize_examples(ex, tok, args.max_length)
    fisher, _ = fisher_layer_scores(model, make_dataloader(feats, tok, 16), total=len(feats), layer_map=lm,
                                    model_name=args.model, task=task, split="train", progress=True)
    fisher.to_json(paths["fisher"])
    var = run_scoring(ScoreConfig(metric="variability", model=args.model, task=task, data_dir=args.data_dir,
                                  num_examples=args.score_examples, balanced=True, seed=args.seed,
                                  max_length=args.max_length))
    var.to_json(paths["variability"])
    return paths


def run_name(strategy: str, tuner: str, cache: str) -> str:
    return (strategy if tuner == "full" else f"{strategy}+{tuner}") + ("" if cache == "auto" else f"+cache-{cache}")


def run_one(task: str, strategy: str, tuner: str, lr: float, scores: dict[str, Path], args, out: Path,
            cache: str = "auto") -> dict | None:
    name = run_name(strategy, tuner, cache)
    run_dir = out / name
    if (run_dir / "results.json").is_file():
        return json.loads((run_dir / "results.json").read_text())
    score_file = scores["variability"] if strategy.startswith("lstar") else scores["fisher"]
    cmd = [sys.executable, "-m", "fastsel", "finetune", "--model", args.model, "--task", task, "--data-dir",
           args.data_dir, "--strategy", strategy, "--tuner", tuner, "--epochs", str(args.epochs), "--lr", str(lr),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--train-examples",
           str(args.train_examples), "--seed", str(args.seed), "--lora-r", "8", "--lora-alpha", "16",
           "--adapter-size", str(args.adapter_size), "--cache-prefix", cache, "--out", str(run_dir), "--no-progress"]
    if strategy.startswith(("fisher", "lstar", "top", "bottom")):
        cmd += ["--scores", str(score_file)]
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"FAILED {task} {name}: {proc.stderr[-2000:]}", flush=True)
        return None
    print(f"{task} {name}: {proc.stdout.strip().splitlines()[0]} ({time.perf_counter() - start:.0f}s)", flush=True)
    return json.loads((run_dir / "results.json").read_text())


def table(rows: list[dict]) -> str:
    head = "| task | strategy | layers tuned | head on | metric (best epoch) | trainable params | s / epoch | cache s | peak RSS MB |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        res = r["res"]
        m = res["main_metric"]
        others = ", ".join(f"{k} {v:.3f}" for k, v in res["best"]["metrics"].items() if k != m)
        metric = f"{m} {res['best']['metrics'][m]:.3f}" + (f" ({others})" if others else "") + f" @{res['best']['epoch']}"
        plan = json.loads((Path(r["dir"]) / "plan.json").read_text())
        tuned = [l for l, b in enumerate(plan["blocks"]) if b["kind"] != "frozen"]
        cache = res.get("cache") or {}
        lines.append(f"| {r['task']} | {r.get('name', res['strategy'])} | {','.join(map(str, tuned)) or '-'} | {plan['head_layer']} | "
                     f"{metric} | {res['trainable_params']:,} | {res['epoch_seconds_mean']:.1f} | "
                     f"{cache.get('seconds', 0):.1f} | {res['peak_memory_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--tasks", default="sst2,rte,mrpc,cola")
    p.add_argument("--strategies", default="", help="comma-separated subset of the built-in list (default: all)")
    p.add_argument("--train-examples", type=int, default=1000)
    p.add_argument("--score-examples", type=int, default=512)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--adapter-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per run (1 avoids spin-waiting on a shared box)")
    p.add_argument("--cache-compare", action="store_true", help="also train some plans without the prefix cache")
    p.add_argument("--out", default="runs/compare")
    args = p.parse_args()
    wanted = {s for s in args.strategies.split(",") if s}
    out = Path(args.out)
    rows: list[dict] = []
    torch.set_num_threads(args.threads)
    for task in args.tasks.split(","):
        tdir = out / task
        tdir.mkdir(parents=True, exist_ok=True)
        scores = score_task(task, args, tdir)
        runs = [(s, t, lr, "auto") for s, t, lr in STRATEGIES]
        runs += [(s, t, lr, "off") for s, t, lr in NO_CACHE] if args.cache_compare else []
        for strategy, tuner, lr, cache in runs:
            name = run_name(strategy, tuner, cache)
            if wanted and name not in wanted and strategy not in wanted:
                continue
            res = run_one(task, strategy, tuner, lr, scores, args, tdir, cache)
            if res is not None:
                rows.append({"task": task, "res": res, "dir": str(tdir / name), "name": name})
                (out / "table.md").write_text(table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
