"""What the default head costs: ``fastsel score --metric fisher`` with ``--head auto`` (a probe fitted first)
against ``--head fresh`` (the paper's), in interleaved rounds of fresh processes (model loading included, as a
user runs it); min and median wall time and scores.json ``seconds``, and their ratios.

    OMP_NUM_THREADS=1 python bench/head_cost.py --data-dir ../shared/data --rounds 3 --out bench/head_cost.json

Run it on an idle machine (``uptime`` is recorded): a loaded box inflates both sides unevenly.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADS = ("fresh", "auto")


def run_once(head: str, args: argparse.Namespace, folder: Path) -> dict[str, float]:
    out = folder / f"{head}.json"
    cmd = [sys.executable, "-m", "fastsel", "score", "--metric", "fisher", "--model", args.model, "--task", args.task,
           "--data-dir", args.data_dir, "--head", head, "--no-progress", "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    record = json.loads(out.read_text())
    return {"wall": wall, "seconds": float(record["seconds"]), "head": record["head"]["kind"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--task", default="sst2")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="write the timings here (JSON)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, float]]] = {h: [] for h in HEADS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for head in HEADS:  # interleaved: load from other processes hits both alike
                runs[head].append(run_once(head, args, Path(tmp)))
    summary: dict[str, dict[str, float]] = {}
    for head, rs in runs.items():
        for key in ("wall", "seconds"):
            values = [r[key] for r in rs]
            summary.setdefault(head, {}).update({f"{key}_min": min(values), f"{key}_median": statistics.median(values)})
    ratio = {f"{key}_{stat}": summary["auto"][f"{key}_{stat}"] / summary["fresh"][f"{key}_{stat}"]
             for key in ("wall", "seconds") for stat in ("min", "median")}
    result = {"command": "python bench/head_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": args.model, "task": args.task, "rounds": args.rounds, "threads": os.environ.get("OMP_NUM_THREADS"),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_before": load_before, "load_after": os.getloadavg(), "runs": runs, "summary": summary,
              "auto_over_fresh": ratio}
    for head in HEADS:
        s = summary[head]
        print(f"--head {head:5s} (scored with {runs[head][0]['head']}): wall min {s['wall_min']:.1f} s, median "
              f"{s['wall_median']:.1f} s; scores.json seconds min {s['seconds_min']:.1f}, median {s['seconds_median']:.1f}")
    print("auto / fresh: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
    print(f"load average before {load_before[0]:.2f}, after {result['load_after'][0]:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
