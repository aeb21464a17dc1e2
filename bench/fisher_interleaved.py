"""Interleaved timing of Fisher-diagonal methods: rounds alternate between methods, so load from other
processes on a shared machine hits all of them alike; reports min and median wall time and the ratio
of each to the plain forward+backward.

    PYTHONPATH=$PWD python bench/fisher_interleaved.py [--methods plain fastsel] [--rounds 15]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peers  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["plain", "fastsel"], choices=sorted(peers.METHODS))
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    import torch

    cfg = peers.CPU_CONFIG
    model, batch = peers.make_model(cfg), peers.make_batch(cfg)
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    for m in args.methods:  # warm-up
        peers.METHODS[m].run(model, batch)
    for _ in range(args.rounds):
        for m in args.methods:
            t = time.perf_counter()
            peers.METHODS[m].run(model, batch)
            times[m].append(time.perf_counter() - t)
    base = times.get("plain")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    print(f"{'method':<10}{'min s':>8}{'median s':>10}{'min/plain':>11}{'median/plain':>14}")
    for m, ts in times.items():
        lo, med = min(ts), statistics.median(ts)
        r1 = f"{lo / min(base):.2f}" if base else "-"
        r2 = f"{med / statistics.median(base):.2f}" if base else "-"
        print(f"{m:<10}{lo:>8.3f}{med:>10.3f}{r1:>11}{r2:>14}")


if __name__ == "__main__":
    main()
