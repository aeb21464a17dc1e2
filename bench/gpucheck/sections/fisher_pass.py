"""Section fisher_pass: the Fisher pass as a user runs it, ``fastsel score`` (its command line, in this process) on
a local BERT folder and a CSV, at B=32 and B=128: the default configuration (confidence groups on, the default
head, the label-dependence check) beside the bare pass (``--confidence-groups 0 --head fresh --label-check 0``);
with SDPA attention (what transformers loads by default, so what a user gets) and with eager attention (a model
folder whose config.json asks for it); with CUDA graphs off and on (``--cuda-graphs``, where fastsel has the
setting); and the variability pass (``--metric variability``) at both batch sizes.

Every run is one ``fastsel.cli.app.main(argv)`` call: model loading, tokenisation, the head, the pass, the
confidence groups and scores.json, as on the command line. Recorded per run: the wall time of the call, the
pass's own ``seconds`` from scores.json and examples per second of it, the head used, the attention the model
loaded with and the peak GPU memory. Runs are ordered by importance (the section's time share may cut the tail,
recorded as skipped); one unrecorded warm-up run comes first. The CLI's output goes to OUT/fisher_pass.log.
Times: ``pass_s`` is scores.json's ``pipeline.seconds_pass`` (the pass), ``scoring_s`` its ``seconds`` (head,
pass, label check, confidence), ``wall_s`` the whole call (model loading and tokenisation too).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from ..harness import MiB, free, sync
from ..run import Run

REPO = Path(__file__).resolve().parents[3]
BARE_FLAGS = ["--confidence-groups", "0", "--head", "fresh", "--label-check", "0"]
NO_GRAPHS_SETTING = "skipped: fastsel has no cuda_graphs setting"
ROUND_KEYS = ("wall_s", "scoring_s", "pass_s", "label_check_s", "peak_extra_mib")


def has_cuda_graphs_setting() -> bool:
    """Whether fastsel's PipelineConfig has ``cuda_graphs`` (``--cuda-graphs auto|on|off``)."""
    from fastsel.pipeline.config import PipelineConfig

    return "cuda_graphs" in {f.name for f in dataclasses.fields(PipelineConfig)}


def pass_variants(batch_sizes: list[int], graphs_setting: bool) -> list[dict[str, Any]]:
    """The runs of the section, most important first: each {name, metric, config, B, attn, graphs, skip}.

    ``graphs`` is 'off' or 'on'; without the setting the 'off' runs run as they are (fastsel without CUDA graphs
    is 'off') and the 'on' runs are skipped with :data:`NO_GRAPHS_SETTING`.
    """
    plan: list[tuple[str, str, str, str]] = []  # (metric, config, attn, graphs), per batch size below
    plan += [("fisher", "default", "sdpa", "off"), ("fisher", "bare", "sdpa", "off")]
    plan += [("fisher", "bare", "eager", "off"), ("fisher", "default", "eager", "off")]
    plan += [("variability", "default", "sdpa", "off")]
    plan += [("fisher", "default", "sdpa", "on"), ("fisher", "bare", "sdpa", "on"), ("fisher", "bare", "eager", "on")]
    out = []
    for metric, config, attn, graphs in plan:
        for B in batch_sizes:
            name = f"{metric} {config} B{B} {attn} graphs={graphs}"
            skip = NO_GRAPHS_SETTING if graphs == "on" and not graphs_setting else None
            out.append({"name": name, "metric": metric, "config": config, "B": B, "attn": attn, "graphs": graphs,
                        "skip": skip})
    return out


def pass_argv(v: dict[str, Any], *, model_dirs: dict[str, str], data_file: str, out: str, device: str,
              cfg: dict[str, Any], graphs_setting: bool) -> list[str]:
    """``fastsel score`` arguments of one run (bf16 autocast: the precision every GPU section measures in)."""
    argv = ["score", "--metric", v["metric"], "--model", model_dirs[v["attn"]], "--task", "custom",
            "--data-file", data_file, "--text-fields", "sentence", "--device", device, "--autocast", "bf16",
            "--batch-size", str(v["B"]), "--max-length", str(cfg["pass_max_length"]),
            "--num-examples", str(cfg["pass_examples"]), "--no-progress", "--out", out]
    if v["config"] == "bare" and v["metric"] == "fisher":
        argv += BARE_FLAGS
    elif v["config"] == "default" and cfg.get("pass_probe_examples"):  # dry: a probe pool of a few examples
        argv += ["--probe-examples", str(cfg["pass_probe_examples"])]
    if graphs_setting:
        argv += ["--cuda-graphs", v["graphs"]]
    return argv


def write_pass_inputs(folder: Path, bert: dict[str, Any], rows: int, max_length: int, seed: int = 0) -> tuple[dict[str, str], str]:
    """A random BERT of ``bert``'s sizes saved with the tiny WordPiece tokenizer of tests/tiny_tokenizer.py
    (folder/model-sdpa; folder/model-eager is the same weights with ``attn_implementation: eager`` in its
    config.json) and folder/data.csv: ``rows`` labelled sentences, each long enough to be truncated to
    ``max_length`` tokens (every batch the same T, as in the other sections)."""
    import csv
    import random

    from transformers import BertConfig, BertForSequenceClassification

    sys.path.insert(0, str(REPO / "tests"))
    try:
        from tiny_tokenizer import WORDS, make_tiny_tokenizer
    finally:
        sys.path.remove(str(REPO / "tests"))
    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tiny_tokenizer(folder / "vocab", model_max_length=max(512, max_length))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tok), hidden_size=bert["hidden_size"], num_hidden_layers=bert["num_layers"],
                        num_attention_heads=bert["num_heads"], intermediate_size=bert["intermediate_size"],
                        max_position_embeddings=max(512, max_length), pad_token_id=tok.pad_token_id)
    sdpa = folder / "model-sdpa"
    BertForSequenceClassification(config).save_pretrained(sdpa)
    tok.save_pretrained(sdpa)
    eager = folder / "model-eager"
    eager.mkdir(exist_ok=True)
    for f in sdpa.iterdir():
        target = eager / f.name
        if target.exists():
            target.unlink()
        if f.name == "config.json":
            target.write_text(json.dumps({**json.loads(f.read_text()), "attn_implementation": "eager"}, indent=1))
        else:
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)
    rng = random.Random(seed)
    path = folder / "data.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sentence", "label"])
        for _ in range(rows):
            w.writerow([" ".join(rng.choice(WORDS) for _ in range(max_length + 16)), rng.randint(0, 1)])
    return {"sdpa": str(sdpa), "eager": str(eager)}, str(path)


def loaded_attention(model_dir: str) -> str:
    """The attention implementation fastsel's loader gives this folder's model (on the CPU: only the config matters)."""
    from fastsel.hf.loading import load_model

    model, _, _ = load_model(model_dir, num_labels=2)
    return str(model.config._attn_implementation)


def _run_cli(argv: list[str], log: io.TextIOBase) -> tuple[int, str]:
    """(exit code, last lines of its output) of ``fastsel ARGV`` in this process; its output goes to ``log``."""
    from fastsel.cli.app import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # noqa: BLE001 - main reports its own errors; anything else is recorded
            traceback.print_exc()
            rc = 1
    text = buf.getvalue()
    log.write(text)
    log.flush()
    return int(rc or 0), "\n".join(text.strip().splitlines()[-6:])


def _one_run(run: Run, v: dict, argv: list[str], out: Path, log: io.TextIOBase) -> dict[str, Any]:
    dev = run.device
    rec: dict[str, Any] = {k: v[k] for k in ("metric", "config", "B", "attn", "graphs")}
    log.write(f"\n===== {v['name']}: fastsel {' '.join(argv)}\n")
    out.unlink(missing_ok=True)
    free(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    t0 = time.perf_counter()
    rc, tail = _run_cli(argv, log)
    sync(dev)
    rec["wall_s"] = time.perf_counter() - t0
    if dev.type == "cuda":
        rec["peak_extra_mib"] = (torch.cuda.max_memory_allocated(dev) - before) / MiB
    if rc != 0 or not out.is_file():
        rec["error"] = f"rc {rc}: {tail}"[-600:]
        return rec
    scores = json.loads(out.read_text())
    pipe = scores.get("pipeline", {}) if isinstance(scores.get("pipeline"), dict) else {}
    rec["scoring_s"] = scores.get("seconds")  # the whole scoring: head, pass, label check, confidence
    rec["pass_s"] = pipe.get("seconds_pass", scores.get("seconds"))  # the pass itself
    if isinstance(rec["pass_s"], (int, float)) and rec["pass_s"] > 0:
        rec["examples_per_s"] = run.cfg["pass_examples"] / rec["pass_s"]
    head = scores.get("head")
    rec["head"] = head.get("kind") if isinstance(head, dict) else head
    rec["label_check_s"] = (scores.get("label_dependence") or {}).get("seconds")
    rec["confidence"] = "ranking_confidence" in scores
    graphs = {k: v for k, v in pipe.items() if "graph" in k.lower()}  # what fastsel says it did with CUDA graphs
    if graphs:
        rec["pipeline_graphs"] = graphs
    return rec


def section_fisher_pass(run: Run, res: dict) -> None:
    import tempfile

    cfg, dev = run.cfg, run.device
    graphs = has_cuda_graphs_setting()
    res["cuda_graphs_setting"] = graphs
    variants = pass_variants(cfg["pass_B"], graphs)
    res["examples"], res["T"], res["autocast"] = cfg["pass_examples"], cfg["pass_max_length"], "bf16"
    runs: dict[str, dict] = {}
    res["runs"] = runs
    with tempfile.TemporaryDirectory(prefix="gpucheck-pass-") as tmp, \
            (run.out_dir / "fisher_pass.log").open("w") as log:
        work = Path(tmp)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        old_cache = os.environ.get("FASTSEL_CACHE")
        os.environ["FASTSEL_CACHE"] = str(work / "cache")
        try:
            t0 = time.perf_counter()
            model_dirs, data_file = write_pass_inputs(work / "inputs", cfg["bert"], cfg["pass_examples"] + cfg["pass_probe_pool"],
                                                      cfg["pass_max_length"])
            res["inputs_s"] = time.perf_counter() - t0
            res["attention_loaded"] = {a: loaded_attention(d) for a, d in model_dirs.items()}
            out = work / "scores.json"

            def argv_of(v):
                return pass_argv(v, model_dirs=model_dirs, data_file=data_file, out=str(out), device=str(dev), cfg=cfg,
                                 graphs_setting=graphs)

            first = next(v for v in variants if not v["skip"])
            warm = _one_run(run, first, argv_of(first), out, log)  # CUDA/cuBLAS/SDPA start-up, not any run's time
            res["warmup"] = {"name": first["name"], "wall_s": warm["wall_s"], **({"error": warm["error"]} if "error" in warm else {})}
            for rnd in range(cfg["pass_rounds"]):
                for v in variants:
                    rec = runs.setdefault(v["name"], {k: v[k] for k in ("metric", "config", "B", "attn", "graphs")})
                    if v["skip"]:
                        rec["status"] = v["skip"]
                        continue
                    if run.over(res):
                        rec.setdefault("status", "skipped (time budget)")
                        continue
                    r = _one_run(run, v, argv_of(v), out, log)
                    if "error" in r:
                        if v["graphs"] == "on" and dev.type != "cuda":
                            rec["status"] = f"skipped (CUDA graphs on a CPU: {r['error'][:200]})"
                        else:
                            rec["status"] = "failed"
                            rec["error"] = r["error"]
                        continue
                    rec.setdefault("rounds", []).append({k: r.get(k) for k in ROUND_KEYS})
                    best = min(rec["rounds"], key=lambda x: x["pass_s"] if isinstance(x["pass_s"], (int, float)) else 1e18)
                    rec.update({k: r[k] for k in ("head", "confidence", "pipeline_graphs") if k in r}, status="ok",
                               **{k: best.get(k) for k in ROUND_KEYS})
                    if isinstance(best["pass_s"], (int, float)) and best["pass_s"] > 0:
                        rec["examples_per_s"] = cfg["pass_examples"] / best["pass_s"]
                    print(f"{v['name']:<44} pass {rec['pass_s']} s, scoring {rec['scoring_s']} s, wall {rec['wall_s']:.2f} s, "
                          f"head {rec.get('head')}, confidence {rec.get('confidence')}",
                          flush=True)
                run.save()
        finally:
            if old_cache is None:
                os.environ.pop("FASTSEL_CACHE", None)
            else:
                os.environ["FASTSEL_CACHE"] = old_cache
    res["ratios"] = pass_ratios(runs)
    failed = [n for n, r in runs.items() if r.get("status") == "failed"]
    if failed:
        res["status"] = f"failed ({len(failed)} runs: {failed[0]} ...)"


def pass_ratios(runs: dict[str, dict]) -> dict[str, float]:
    """Time ratios of the Fisher runs that differ in one setting: default / bare on the whole scoring
    (``scoring_s``: the head, the label check and the confidence groups are outside the pass), sdpa / eager and
    CUDA graphs on / off on the pass itself (``pass_s``)."""
    def t(metric, config, B, attn, graphs, key):
        for r in runs.values():
            if (r.get("metric"), r.get("config"), r.get("B"), r.get("attn"), r.get("graphs")) == (metric, config, B, attn, graphs):
                v = r.get(key)
                return v if isinstance(v, (int, float)) and v > 0 else None
        return None

    out: dict[str, float] = {}
    for r in runs.values():
        if r.get("metric") != "fisher" or r.get("status") != "ok":
            continue
        config, B, attn, graphs = r["config"], r["B"], r["attn"], r["graphs"]
        pairs = []
        if config == "default":
            pairs.append((f"default/bare scoring B{B} {attn} graphs={graphs}", "scoring_s", ("bare", attn, graphs)))
        if attn == "sdpa":
            pairs.append((f"sdpa/eager pass {config} B{B} graphs={graphs}", "pass_s", (config, "eager", graphs)))
        if graphs == "on":
            pairs.append((f"graphs on/off pass {config} B{B} {attn}", "pass_s", (config, attn, "off")))
        for label, key, (c2, a2, g2) in pairs:
            mine, other = t("fisher", config, B, attn, graphs, key), t("fisher", c2, B, a2, g2, key)
            if mine and other:
                out[label] = mine / other
    return out
