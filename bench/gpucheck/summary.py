"""The summary table of a GPU check: the shell driver's steps (OUT/steps.tsv), each section's status, the
headline numbers and the targets, read back from OUT/gpu_check.json (so it can be printed by a later process,
after the sanitizers, as the last thing of the run)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _fmt(v: Any, digits: int = 3) -> str:
    """A float to ``digits`` significant digits, anything else as str()."""
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def pass_lines(fp: dict) -> list[str]:
    """The fisher_pass section's table: one row per `fastsel score` run (times in s, examples/s of the pass)."""
    runs = fp.get("runs") or {}
    if not runs:
        return []
    head = f"{'fastsel score run':<44} {'pass s':>7} {'ex/s':>7} {'scoring s':>9} {'wall s':>7} {'MiB':>6}  status"
    out = ["", f"fastsel score as a user runs it ({fp.get('examples')} examples, T={fp.get('T')}, bf16 autocast; "
               f"attention loaded: {fp.get('attention_loaded')})", head]
    for name, r in runs.items():
        status = r.get("status", "?")
        if r.get("head"):
            status += f", head {r['head']}"
        if "error" in r:
            status += f": {r['error'][:60]}"
        out.append(f"{name:<44} {_fmt(r.get('pass_s', '-')):>7} {_fmt(r.get('examples_per_s', '-'), 4):>7} "
                   f"{_fmt(r.get('scoring_s', '-')):>9} {_fmt(r.get('wall_s', '-')):>7} {_fmt(r.get('peak_extra_mib', '-'), 4):>6}  "
                   f"{status[:70]}")
    ratios = fp.get("ratios") or {}
    if ratios:
        out.append("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    out.append("")
    return out


def summary_lines(data: dict, steps: list[tuple[str, str, str]] | None = None,
                  logs: list[str] | None = None) -> list[str]:
    """The short table: steps (from gpu_check.sh), sections, headline numbers, the `fastsel score` runs, the
    logs the step lines summarise (``logs``: file names under OUT), targets."""
    lines = []
    title = f"gpu_check summary ({'dry, ' if data.get('dry') else ''}{data.get('gpu') or data.get('device', '?')})"
    lines += [title, "-" * len(title)]
    if steps:
        lines.append(f"{'step':<12} {'status':<60} {'s':>6}")
        for name, status, secs in steps:
            lines.append(f"{name:<12} {status:<60} {secs:>6}")
        lines.append("")
    secs = data.get("sections", {})
    if secs:
        lines.append(f"{'section':<12} {'status':<60} {'s':>6}")
        for name, s in secs.items():
            status = s.get("status", "?")
            if "error" in s:
                status += f": {s['error']}"
            lines.append(f"{name:<12} {status[:120]:<60} {_fmt(s.get('seconds', '')):>6}")
        lines.append("")
    g = secs.get("gemm", {})
    if "bf16_tflops" in g:
        lines.append(f"GEMM bf16 {g['bf16_tflops']:.1f} TFLOP/s, fp32 {g['fp32_tflops']:.1f} TFLOP/s, copy {g['copy_gbps']:.0f} GB/s")
    lin = secs.get("linear", {})
    for dname, per in lin.get("winners", {}).items():
        lines.append(f"linear winners {dname}: " + ", ".join(f"{c}: {w}" for c, w in sorted(per.items())))
    if lin.get("checks_failed"):
        lines.append(f"linear checks FAILED: {len(lin['checks_failed'])} (first: {lin['checks_failed'][0]})")
    if lin.get("skipped_time_budget"):
        lines.append(f"linear configs skipped (time budget): {len(lin['skipped_time_budget'])}")
    if "triton_first_calls_s" in lin:
        lines.append(f"triton first calls (autotune + compile): {lin['triton_first_calls_s']:.1f} s")
    table = lin.get("backend_table") or {}
    if "rules" in table:
        lines.append(f"backend table: {table['rules']} measured rules, T classes {', '.join(table['T_classes'])}, "
                     f"dtypes {', '.join(table['dtypes'])} -> {Path(table['path']).name}")
    elif "error" in table:
        lines.append(f"backend table: not written ({table['error']})")
    fis = secs.get("fisher", {})
    if fis.get("methods"):
        lines.append("fisher (ms median, extra MiB): " + ", ".join(
            f"{n} {_fmt(m.get('median_ms'))}/{_fmt(m.get('extra_mib'))}" for n, m in fis["methods"].items() if "median_ms" in m))
    lines += pass_lines(secs.get("fisher_pass", {}))
    var = secs.get("variability", {})
    if var.get("methods"):
        lines.append("variability tokens/s: " + ", ".join(f"{n} {m['tokens_per_s']:.0f}" for n, m in var["methods"].items()))
    if logs:
        lines.append("logs: " + ", ".join(logs))
    if data.get("skipped_no_gpu"):
        lines.append("skipped (no GPU): " + "; ".join(data["skipped_no_gpu"]))
    tg = data.get("targets", {})
    if tg:
        lines.append("")
        lines.append(f"{'target':<44} {'value':>9} {'want':<40} met")
        for name, t in tg.items():
            met = "(dry)" if data.get("dry") else "yes" if t.get("met") else "NO"
            lines.append(f"{name:<44} {_fmt(t.get('value')):>9} {str(t.get('target')):<40} {met}")
    return lines


def read_steps(path: Path) -> list[tuple[str, str, str]]:
    """The (step, status, seconds) rows gpu_check.sh wrote to steps.tsv; none when it is missing."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            rows.append((parts[0], parts[1], parts[2]))
    return rows


LOG_FILES = ("build.log", "tests_cuda.log", "tests_cuda.xml", "sanitize_memcheck.log", "sanitize_racecheck.log",
             "sanitize_cpu.log", "fisher_pass.log", "backend_table.json", "gpu_check.log")


def present_logs(out_dir: Path) -> list[str]:
    """The log files of a run that exist under OUT (what `gpu_check.sh --collect` copies to commit)."""
    return [f for f in LOG_FILES if (out_dir / f).is_file()]


def print_summary(out_dir: Path) -> int:
    """Print the summary of OUT/gpu_check.json and OUT/steps.tsv (a missing or broken JSON is said, not raised)."""
    path = out_dir / "gpu_check.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        data = {"sections": {}, "note": f"no {path}: {exc}"}
    lines = summary_lines(data, read_steps(out_dir / "steps.tsv"), present_logs(out_dir))
    if "note" in data:
        lines.append(data["note"])
    print("\n".join(lines))
    return 0
