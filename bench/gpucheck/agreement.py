"""Agreement checks of the GPU check: how a measured result is compared with its reference (relative to the
largest reference value, so that tiny entries do not dominate) and how a check is recorded."""
from __future__ import annotations

import math
from typing import Any

import torch


def check_record(name: str, err: float, tol: float, **extra: Any) -> dict:
    """A check as the JSON records it: ``ok`` when ``err <= tol``, with ``extra`` fields beside."""
    return {"name": name, "max_rel_err": err, "tol": tol, "ok": bool(err <= tol), **extra}


def rel_to_max(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (inf when got has non-finite values)."""
    got, ref = got.double(), ref.double()
    if not bool(torch.isfinite(got).all()):
        return math.inf
    return float((got - ref).abs().max()) / max(float(ref.abs().max()), 1e-300)


def close(got: torch.Tensor, ref: torch.Tensor, rtol: float, atol_rel: float = 1e-5) -> tuple[bool, float]:
    """(|got - ref| <= rtol |ref| + atol_rel max|ref| everywhere, max |got - ref| / max |ref|)."""
    got, ref = got.double(), ref.double()
    if not bool(torch.isfinite(got).all()):
        return False, math.inf
    scale = float(ref.abs().max())
    ok = bool(((got - ref).abs() <= rtol * ref.abs() + atol_rel * scale).all())
    return ok, float((got - ref).abs().max()) / max(scale, 1e-300)


def diag_err(got: dict, ref: dict, zero_rel: float = 1e-14) -> float:
    """max over tensors of max |got - ref| / max |ref| (floored at zero_rel x the largest value of all, as
    peers.disagreements: BERT's attention key bias has an exactly-zero gradient, rounding noise each way)."""
    floor = zero_rel * max(float(r.abs().max()) for r in ref.values() if r.numel())
    err = 0.0
    for n, r in ref.items():
        if n not in got:
            return math.inf
        d = float((got[n].double().cpu() - r.double().cpu()).abs().max()) if r.numel() else 0.0
        err = max(err, d / max(float(r.abs().max()), floor, 1e-300))
    return err


def layer_traces(diag: dict, model: torch.nn.Module) -> list[float]:
    """The Fisher trace of every layer (then of the parameters outside the layers, by name) of a diagonal."""
    from fastsel.scores.fisher import layer_statistics

    layers, extra = layer_statistics(diag, model)
    return [l["trace"] for l in layers] + [extra[k]["trace"] for k in sorted(extra)]


def trace_err(a: dict, b: dict, model: torch.nn.Module) -> float:
    """max over layers of |trace_a - trace_b| / |trace_b|: the agreement of a bf16 pass, whose per-entry errors are
    large but whose per-layer sums (what the scores use) must stay close."""
    ta, tb = layer_traces(a, model), layer_traces(b, model)
    return max(abs(x - y) / max(abs(y), 1e-300) for x, y in zip(ta, tb))
