"""Section error: with bf16 inputs, the relative error of every linear backend vs an fp64 oracle, compared
with the error of a bf16 pure-torch per-example bmm (the bar a backend must not be much worse than)."""
from __future__ import annotations

from typing import Any

import torch

from ..harness import free
from ..run import Run


def section_error(run: Run, res: dict) -> None:
    from fastsel import ops
    from fastsel.ops.backend import linear_backends_available

    dev = run.device
    B, T = run.cfg["error_BT"]
    backends = list(linear_backends_available(dev))
    res["B"], res["T"], res["shapes"] = B, T, []
    worst = 0.0
    for O, I in run.cfg["error_shapes"]:
        gen = torch.Generator(device=dev).manual_seed(O * 3 + I)
        g = torch.randn(B, T, O, device=dev, generator=gen).to(torch.bfloat16)
        x = torch.randn(B, T, I, device=dev, generator=gen).to(torch.bfloat16)
        oracle = torch.zeros(O, I, device=dev, dtype=torch.float64)
        chunk = max(1, (1 << 26) // (O * I))
        for s in range(0, B, chunk):
            oracle += torch.bmm(g[s:s + chunk].double().transpose(1, 2), x[s:s + chunk].double()).square().sum(0)
        norm = float(oracle.norm())
        rec: dict[str, Any] = {"O": O, "I": I, "errors": {}}
        # the bf16 pure-torch reference: per-example bmm with bf16 output, squared and summed in fp32
        naive = torch.zeros(O, I, device=dev)
        for s in range(0, B, chunk):
            naive += torch.bmm(g[s:s + chunk].transpose(1, 2), x[s:s + chunk]).float().square().sum(0)
        rec["bf16_torch_err"] = float((naive.double() - oracle).norm()) / norm
        for bname in backends:
            try:
                out = torch.zeros(O, I, device=dev)
                if bname == "reference":
                    ops.accumulate_linear_sq_grad_ref(out, g, x)
                else:
                    ops.accumulate_linear_sq_grad(out, g, x, backend=bname)
                err = float((out.double() - oracle).norm()) / norm
                rec["errors"][bname] = {"rel_err": err, "x_bf16_torch": err / max(rec["bf16_torch_err"], 1e-300)}
                if bname != "reference":
                    worst = max(worst, err / max(rec["bf16_torch_err"], 1e-300))
            except Exception as exc:  # noqa: BLE001
                rec["errors"][bname] = {"error": f"{type(exc).__name__}: {exc}"}
        res["shapes"].append(rec)
        print(f"O{O} I{I}: bf16-torch {rec['bf16_torch_err']:.2e}  "
              + "  ".join(f"{k} {v.get('rel_err', float('nan')):.2e}" for k, v in rec["errors"].items()), flush=True)
        del g, x, oracle, naive
        free(dev)
    res["worst_x_bf16_torch"] = worst
    run.data.setdefault("targets", {})["bf16 error <= 2x bf16-torch"] = {"value": worst, "target": "<= 2", "met": worst <= 2}
