"""All GPU timings of the project in one process: writes OUT/gpu_check.json and prints a short table.

    python3 bench/gpu_check.py --out runs/gpu_check            # on a GPU (BERT-base / BERT-large shapes)
    python3 bench/gpu_check.py --dry --out runs/gpu_check      # on a CPU: tiny shapes, CUDA-only parts skipped

Sections (each in its own try/except; the JSON is rewritten after every section, so a crash or a kill
leaves the results so far; an error is recorded and the next section runs):

  env          device, driver, torch / CUDA / transformers versions, what fastsel loaded
  gemm         measured bf16 and fp32 GEMM TFLOP/s (8192^3, random data) and device-to-device copy GB/s
  linear       every backend of accumulate_linear_sq_grad (CUDA pipelined / wmma, triton, bmm) on BERT-base /
               BERT-large layer shapes, B in {8, 32, 128}, T in {32, 64, 128, 512}, bf16, fp16 and fp32:
               checked against the fp32 reference, then timed (interleaved with the weight-gradient GEMM of
               the same shape, the physical limit); one mixed-dtype call (g bf16, x fp32, as under autocast);
               per-(dtype, shape class) winners ("linear_winners", with rules in the format of
               fastsel/ops/backend_table.json), and that table written to OUT/backend_table.json
  error        bf16 inputs: relative error of every backend vs an fp64 oracle, and of a bf16 pure-torch
               per-example bmm, on BERT-base shapes (B=32, T=128)
  fisher       BERT-base Fisher pass (B=32, T=128) under bf16 autocast: fastsel (default and each linear
               backend) vs a plain training step, the per-example loop, torch.func vmap and Opacus; time
               and extra peak memory, agreement checks first (fp32 vs the loop, bf16 per-layer traces)
  fisher_pass  `fastsel score` as a user runs it (in this process) on a BERT folder: B=32 and 128, the default
               configuration and the bare pass, SDPA and eager attention, CUDA graphs off and on, and the
               variability pass; its output in OUT/fisher_pass.log
  variability  tokens/s of accumulate_class_statistics vs a plain forward; class_stats_update vs its ref

Timing: warm-up, then methods interleaved round by round (A B C A B C ...), each call timed by CUDA
events (CPU: perf_counter); median and min reported. Extra memory = peak allocated during the method
minus allocated before it (CUDA only). ``--budget-s`` bounds the whole run: a section past its share
records what it skipped.

The code lives in bench/gpucheck/ (harness, config, run, agreement, backends, sections/<one per section>,
summary); this file is the command line, and the restart in a fresh process after a broken CUDA context.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # the gpucheck package and peers.py

import torch  # noqa: E402

from gpucheck.run import Run  # noqa: E402
from gpucheck.sections import SECTIONS  # noqa: E402
from gpucheck.summary import print_summary, summary_lines  # noqa: E402

__all__ = ["SECTIONS", "main"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fastsel: every GPU timing in one process (see the module docstring)")
    ap.add_argument("--dry", action="store_true", help="CPU, tiny shapes; CUDA-only parts reported as skipped")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "runs/gpu_check"))
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    ap.add_argument("--budget-s", type=float, default=None, help="wall-time budget of the whole run (default 240; dry 150)")
    ap.add_argument("--summary", action="store_true", help="only print the summary table of OUT/gpu_check.json")
    ap.add_argument("--bert-batch-size", type=int, default=None,
                    help="examples per batch of the BERT model of the fisher/variability/profile sections (default 32)")
    ap.add_argument("--bert-seq-len", type=int, default=None, help="tokens per example there (default 128)")
    ap.add_argument("--resume", action="store_true", help="keep the sections already in OUT/gpu_check.json (used "
                    "internally: after a section breaks the CUDA context the rest run in a fresh process)")
    args = ap.parse_args(argv)
    if args.summary:
        return print_summary(args.out)
    device = torch.device(args.device or ("cpu" if args.dry else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (use --dry on a CPU)", file=sys.stderr)
        return 2
    if args.dry:
        torch.manual_seed(0)
    budget = args.budget_s or (150.0 if args.dry else 240.0)
    run = Run(args.out, args.dry, device, budget, resume=args.resume)
    for key, value in (("batch_size", args.bert_batch_size), ("seq_len", args.bert_seq_len)):
        if value is not None:  # another regime of the same model (e.g. GPU-bound rather than launch-bound)
            run.cfg["bert"][key] = value
            run.data.setdefault("bert_override", {})[key] = value
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    for name in wanted:
        if name not in SECTIONS:
            print(f"gpu_check: unknown section {name!r}", file=sys.stderr)
            return 2
    order = ([] if args.resume else ["env"]) + [s for s in wanted if s != "env" or args.resume]
    for i, name in enumerate(order):
        run.section(name, SECTIONS[name])
        rest = order[i + 1:]
        if run.data["sections"][name].get("cuda_context_broken") and rest and run.data.get("resumed", 0) < 3:
            # every later CUDA call would fail: the remaining sections in a fresh process (same JSON)
            left = max(30.0, run.deadline - time.monotonic())
            print(f"gpu_check: CUDA context broken in section {name}; restarting for {', '.join(rest)}", flush=True)
            sys.stdout.flush()
            sys.stderr.flush()
            cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out), "--sections", ",".join(rest),
                   "--resume", "--budget-s", f"{left:.0f}", "--device", str(device)] + (["--dry"] if args.dry else []) \
                + ([f"--bert-batch-size={args.bert_batch_size}"] if args.bert_batch_size else []) \
                + ([f"--bert-seq-len={args.bert_seq_len}"] if args.bert_seq_len else [])
            os.execv(sys.executable, cmd)
    run.data["seconds"] = round(time.monotonic() - run.t0, 1)
    run.save()
    print()
    print("\n".join(summary_lines(run.data)))
    failed = [n for n, s in run.data["sections"].items() if str(s.get("status", "")).startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
