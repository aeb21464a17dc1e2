"""Write fastsel/ops/backend_table.json (the default CUDA backend of the linear op) from a gpu_check.json.

    python bench/make_backend_table.py bench/gpu_check_h200.json [--out fastsel/ops/backend_table.json]

The rules are gpu_check's ``linear_winners.rules``: per (GPU capability, operand dtype, shape class of
``fastsel.ops.backend.linear_shape_class``) the backend with the lowest geometric-mean slowdown against the
best backend of each measured configuration, among those that passed their agreement check. A GPU with
no rule falls back to the table's default, cuBLAS batched GEMMs (``bmm``), the backend that needs no
custom kernel; so does a shape class the run did not time. fp16 gets its own rules when the run timed fp16
(gpu_check does since T in {32, 64} and triton were added); an older run's bf16 rules cover fp16 too.
bench/gpu_check.py writes the same table to OUT/backend_table.json at the end of its linear section.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def table_from(data: dict, source: str) -> dict:
    rules = [dict(r) for r in data.get("linear_winners", {}).get("rules", [])]
    measured_fp16 = any("fp16" in r["when"].get("dtype", []) for r in rules)
    for r in rules:  # a run that did not time fp16 (before 2027): it runs the same tensor-core code as bf16
        if not measured_fp16 and "bf16" in r["when"].get("dtype", []):
            r["when"] = {**r["when"], "dtype": ["bf16", "fp16"]}
    if not rules:
        raise SystemExit(f"make_backend_table: {source} has no linear_winners.rules (did the linear section run?)")
    return {
        "about": (
            "Default CUDA backend of fastsel::accumulate_linear_sq_grad per GPU capability, operand dtype and shape "
            "class (fastsel.ops.backend.linear_shape_class); first matching rule wins, else 'default'. Written by "
            f"bench/make_backend_table.py from {source} ({data.get('gpu')}, torch {data.get('sections', {}).get('env', {}).get('torch')})."
        ),
        "default": "bmm",
        "rules": rules,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gpu_check_json", type=Path)
    ap.add_argument("--out", type=Path, default=REPO / "fastsel" / "ops" / "backend_table.json")
    args = ap.parse_args()
    table = table_from(json.loads(args.gpu_check_json.read_text()), args.gpu_check_json.name)
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {args.out}: {len(table['rules'])} rules")


if __name__ == "__main__":
    main()
