"""Fisher diagonal vs a plain forward + backward, per architecture (issue 13's table), on one machine.

Random-weight sequence classifiers of one size (hidden 256, 4 blocks, 4 heads, FFN 1024, eager attention),
one batch of B=16, T=128 (no padding), empirical Fisher via ``fisher_diagonal`` against a plain forward +
backward of the summed log-likelihood (parameter gradients). Rounds interleave all methods of all
architectures, so load from other processes hits them alike; min and median per method. A DeBERTa-v2 row
with the shared-computation capture switched off (``capture_shared=False``: the old exact per-example
fallback) shows the gain side by side.

    PYTHONPATH=$PWD python bench/fisher_archs.py [--rounds 5] [--archs bert deberta-v2 ...] [--threads 2]
        [--json bench/fisher_archs_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

ARCHS = ["bert", "roberta", "distilbert", "electra", "modernbert", "llama", "qwen2", "deberta-v2", "deberta-v2-own-keys"]


def make_model(arch: str, hidden: int = 256, layers: int = 4, heads: int = 4, ffn: int = 1024, vocab: int = 1000):
    import transformers as tf

    common = dict(vocab_size=vocab, num_labels=2, max_position_embeddings=512)
    size = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn)
    if arch == "bert":
        cfg = tf.BertConfig(**size, **common)
    elif arch == "roberta":
        cfg = tf.RobertaConfig(**size, pad_token_id=1, bos_token_id=0, eos_token_id=2, **common)
    elif arch == "distilbert":
        cfg = tf.DistilBertConfig(dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=ffn, **common)
    elif arch == "electra":
        cfg = tf.ElectraConfig(embedding_size=128, **size, **common)
    elif arch == "modernbert":
        cfg = tf.ModernBertConfig(**size, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                  sep_token_id=2, **common)
    elif arch in ("llama", "qwen2"):
        cls = tf.LlamaConfig if arch == "llama" else tf.Qwen2Config
        cfg = cls(**size, num_key_value_heads=heads, pad_token_id=0, bos_token_id=1, eos_token_id=2, **common)
    elif arch.startswith("deberta-v2"):
        # DeBERTa-v3-base's attention settings (relative attention, p2c + c2p, 256 buckets, layer-normed
        # relative embeddings); -own-keys: separate positional projections (share_att_key=False)
        cfg = tf.DebertaV2Config(**size, relative_attention=True, position_buckets=256, max_relative_positions=-1,
                                 pos_att_type=["p2c", "c2p"], position_biased_input=False, norm_rel_ebd="layer_norm",
                                 share_att_key=not arch.endswith("own-keys"), type_vocab_size=0, **common)
    else:
        raise ValueError(arch)
    for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
        if hasattr(cfg, k):
            setattr(cfg, k, 0.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return tf.AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager").eval()


def make_batch(B: int, T: int, vocab: int = 1000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(3, vocab, (B, T), generator=g),
        "attention_mask": torch.ones(B, T, dtype=torch.long),
        "labels": torch.randint(0, 2, (B,), generator=g),
    }


def plain(model, batch) -> None:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.log_softmax(logits.float(), -1).gather(1, batch["labels"][:, None]).sum().backward()
    model.zero_grad(set_to_none=True)


def fastsel(model, batch, capture_shared: bool = True) -> tuple[str, ...]:
    from fastsel.scores.fisher import fisher_diagonal
    from fastsel.capture.per_example import SquaredGradAccumulator

    acc = SquaredGradAccumulator(model, capture_shared=capture_shared)
    return fisher_diagonal(model, [batch], mode="empirical", accumulator=acc).fallback_params


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=ARCHS, choices=ARCHS)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-old-fallback", action="store_true", help="skip the DeBERTa rows with the capture off")
    ap.add_argument("--json", default=None, help="write the raw timings here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch = make_batch(args.batch_size, args.seq_len)
    models = {a: make_model(a) for a in args.archs}
    methods: list[tuple[str, str, object]] = []
    for a in args.archs:
        methods.append((a, "plain", lambda m=models[a]: plain(m, batch)))
        methods.append((a, "fastsel", lambda m=models[a]: fastsel(m, batch)))
        if a.startswith("deberta") and not args.no_old_fallback:
            methods.append((a, "fastsel-old-fallback", lambda m=models[a]: fastsel(m, batch, capture_shared=False)))
    fallback = {}
    for a, name, fn in methods:  # warm-up, and the fallback parameters of each run
        out = fn()
        if name.startswith("fastsel"):
            fallback[(a, name)] = list(out)
    times: dict[tuple[str, str], list[float]] = {(a, n): [] for a, n, _ in methods}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for a, name, fn in methods:
            t = time.perf_counter()
            fn()
            times[(a, name)].append(time.perf_counter() - t)
        load.append(os.getloadavg()[0])

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B={args.batch_size}, T={args.seq_len}, "
          f"{args.rounds} interleaved rounds, load average (1 min) {min(load):.2f}..{max(load):.2f}")
    print("| architecture | plain s (min / median) | fastsel s (min / median) | ratio (min / median) | fallback params |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    for a, name, _ in methods:
        if name == "plain":
            continue
        p, f = times[(a, "plain")], times[(a, name)]
        label = a if name == "fastsel" else f"{a}, old per-example fallback"
        row = dict(arch=a, method=name, plain=p, fastsel=f, fallback_params=fallback[(a, name)],
                   ratio_min=min(f) / min(p), ratio_median=statistics.median(f) / statistics.median(p))
        rows.append(row)
        print(f"| {label} | {min(p):.3f} / {statistics.median(p):.3f} | {min(f):.3f} / {statistics.median(f):.3f} "
              f"| {row['ratio_min']:.2f} / {row['ratio_median']:.2f} | {len(fallback[(a, name)])} |")
    if args.json:
        meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), batch_size=args.batch_size,
                    seq_len=args.seq_len, rounds=args.rounds, load_average_1min=load, machine=platform.machine(),
                    cpus=os.cpu_count(), command="PYTHONPATH=$PWD python bench/fisher_archs.py " + " ".join(argv or sys.argv[1:]),
                    time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
