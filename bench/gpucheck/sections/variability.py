"""Section variability: tokens/s of the streaming class statistics (accumulate_class_statistics) vs a plain
forward, and class_stats_update vs its reference."""
from __future__ import annotations

import json
import traceback

import torch

from ..agreement import check_record, rel_to_max
from ..backends import autocast
from ..harness import bench, extra_peak_mib, free
from ..run import Run


def variability_batches(n: int, B: int, T: int, vocab: int, device: torch.device, seed: int = 0) -> list[dict]:
    """Padded batches with special tokens (CLS first, SEP last) and labels, as fastsel.data makes them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (B, T), generator=g)
        lengths = torch.randint(max(4, T // 4), T + 1, (B,), generator=g)
        att = (torch.arange(T) < lengths.unsqueeze(1)).long()
        special = 1 - att
        special[:, 0] = 1
        special[torch.arange(B), lengths - 1] = 1
        out.append({k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": att, "special_tokens_mask": special,
                                                  "labels": torch.randint(0, 2, (B,), generator=g)}.items()})
    return out


def _variability_check(run: Run, res: dict, model, batches: list[dict], bc) -> None:
    """class_stats_update vs its reference on one layer's hidden states (autocast), float64 accumulators,
    two merges."""
    from fastsel import ops
    from fastsel.capture.taps import pool_mask
    from fastsel.hf.io import model_inputs

    dev, layer = run.device, run.cfg["var_layer"]
    D = bc.hidden_size
    state = {name: [torch.zeros(2, dtype=torch.float64, device=dev), torch.zeros(2, D, dtype=torch.float64, device=dev),
                    torch.zeros(2, D, D, dtype=torch.float64, device=dev)] for name in ("op", "ref")}
    dtype = None
    for b in batches[:2]:
        with torch.no_grad(), autocast(dev):
            hidden = model(**model_inputs(b), output_hidden_states=True).hidden_states[layer]
        dtype = str(hidden.dtype)
        mask = pool_mask(b, "mean")
        ops.class_stats_update(*state["op"], hidden, mask, b["labels"])
        ops.class_stats_update_ref(*state["ref"], hidden, mask, b["labels"])
    errs = [rel_to_max(a, r) for a, r in zip(state["op"], state["ref"])]
    res["check"] = check_record(f"class_stats_update vs ref (layer {layer}, hidden {dtype})", max(errs), 1e-8,
                                per_tensor=errs)
    print(res["check"], flush=True)


def section_variability(run: Run, res: dict) -> None:
    import peers
    from fastsel.hf.io import model_inputs
    from fastsel.scores.variability import accumulate_class_statistics

    dev, cfg = run.device, run.cfg
    bc = peers.BenchConfig(**cfg["bert"])
    model = peers.make_model(bc, dev)
    batches = variability_batches(cfg["var_batches"], bc.batch_size, bc.seq_len, bc.vocab_size, dev)
    padded = sum(b["input_ids"].numel() for b in batches)
    real = int(sum(int(b["attention_mask"].sum()) for b in batches))
    res.update(batches=len(batches), B=bc.batch_size, T=bc.seq_len, padded_tokens=padded, real_tokens=real)
    try:
        _variability_check(run, res, model, batches, bc)
    except Exception as exc:  # noqa: BLE001 - the timing still runs
        res["check"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)}
        print(res["check"]["traceback"], flush=True)
    free(dev)

    def plain():
        with torch.no_grad(), autocast(dev):
            for b in batches:
                model(**model_inputs(b), output_hidden_states=False)

    def streaming():
        with autocast(dev):
            accumulate_class_statistics(model, batches, num_classes=2, pooling="mean")

    times = bench({"plain_forward": plain, "variability": streaming}, dev, rounds=cfg["var_rounds"], warmup=2)
    res["methods"] = times
    for name, t in times.items():
        if "median_ms" in t:
            t["tokens_per_s"] = padded / (t["median_ms"] * 1e-3)
            t["real_tokens_per_s"] = real / (t["median_ms"] * 1e-3)
            t["extra_mib"] = extra_peak_mib(plain if name == "plain_forward" else streaming, dev)
    print(json.dumps(times, default=str), flush=True)
    problems = [f"{n}: {t['error']}" for n, t in times.items() if "error" in t]
    if not problems:
        ratio = times["plain_forward"]["median_ms"] / times["variability"]["median_ms"]
        res["throughput_x_plain"] = ratio
        run.data.setdefault("targets", {})["variability: tokens/s vs plain forward"] = {
            "value": ratio, "target": ">= 0.9", "met": ratio >= 0.9}
    if not res["check"].get("ok"):
        problems.insert(0, "agreement")
    if problems:
        res["status"] = "failed (" + "; ".join(problems) + ")"
    del model, batches
    free(dev)
