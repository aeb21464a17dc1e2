"""The study's scheduler: at most ``--jobs`` ``fastsel`` subprocesses at once, each job after its
dependencies; only this (parent) process writes the aggregate, so parallel runs never race on it."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

from fastsel.utils.atomic import atomic_write_text

from .config import REPO
from .jobs import Job


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
