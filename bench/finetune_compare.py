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

# The code lives in bench/ftcompare/ (config, stats, jobs, results, report, costs, sizing, runner); this file is
# the command line (its docstring is the --help text, so this note stands here).

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "bench"):  # fastsel and the ftcompare package, without PYTHONPATH too
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from fastsel.utils.atomic import atomic_write_text  # noqa: E402
from ftcompare.config import DEFAULT_LR, EXTRA_STRATEGIES, parse_per_task, rank_epochs_for, strategy_table  # noqa: E402
from ftcompare.jobs import plan_jobs, score_mismatch, settings_mismatch  # noqa: E402
from ftcompare.report import plot_summary, render_summary, render_table  # noqa: E402
from ftcompare.results import collect, merge_results  # noqa: E402
from ftcompare.runner import run_jobs  # noqa: E402
from ftcompare.sizing import dry_run  # noqa: E402


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
