"""The study's jobs: one scoring per (task, seed) and one training run per (task, seed, strategy), each a
``fastsel`` command with its own directory; and the checks that a finished run was made with this study's
settings (a run made with other settings must not be mixed in)."""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import for_task, rank_epochs_for, scores_kind


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
    job_record = results.get("job", {})
    got = {**job_record, **job_record.get("train", {})}  # FinetuneJob nests its training settings under "train"
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
