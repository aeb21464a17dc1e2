"""Extra peak memory (RSS) of each Fisher-diagonal method on the CPU benchmark, one fresh process each.

Each child builds the model and batch, runs one example forward (loads the libraries, warms the
allocator), resets the kernel's peak-RSS counter (VmHWM, via /proc/self/clear_refs), runs the method
once and reports peak RSS minus RSS just before: the memory the method needs beyond the model. torch's
CPU allocator is malloc, so RSS sees it (tracemalloc does not).

    PYTHONPATH=$PWD python bench/fisher_memory.py [--methods plain fastsel ...] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peers  # noqa: E402

DEFAULT_METHODS = ["plain", "fastsel", "loop", "vmap", "opacus"]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def measure_one(name: str) -> dict:
    """Run in the child: the method's extra peak RSS in MB over the resident model and batch."""
    import torch

    cfg = peers.CPU_CONFIG
    model = peers.make_model(cfg)
    batch = peers.make_batch(cfg)
    with torch.no_grad():
        model(**{k: v[:1] for k, v in batch.items() if k != "labels"})
    exact = _reset_peak()
    before_kb = _status_kb("VmRSS")
    if not exact:  # ru_maxrss cannot be reset: it may still hold the model construction's peak
        before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peers.METHODS[name].run(model, batch)
    peak_kb = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "method": name,
        "model_mb": peers.param_bytes(model) / 2**20,
        "rss_before_mb": before_kb / 1024,
        "extra_peak_mb": (peak_kb - before_kb) / 1024,
        "peak_reset": exact,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=sorted(peers.METHODS))
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one)))
        return
    rows = []
    for name in args.methods:
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--one", name],
            check=True, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"measured {name}", file=sys.stderr, flush=True)
    plain = next((r["extra_peak_mb"] for r in rows if r["method"] == "plain"), None)
    model_mb = rows[0]["model_mb"]
    print(f"parameters: {model_mb:.1f} MB (fp32); peak reset via clear_refs: {rows[0]['peak_reset']}")
    print(f"{'method':<10}{'extra peak MB':>15}{'x params':>10}{'over plain MB':>15}{'x params':>10}")
    for r in rows:
        over = r["extra_peak_mb"] - plain if plain is not None else float("nan")
        r["over_plain_mb"] = over
        print(f"{r['method']:<10}{r['extra_peak_mb']:>15.1f}{r['extra_peak_mb'] / model_mb:>10.2f}{over:>15.1f}{over / model_mb:>10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
