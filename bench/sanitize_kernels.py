"""Call every compiled fastsel kernel once or twice on small shapes and compare with its ``*_ref`` twin.

Made to run under compute-sanitizer (bench/gpu_check.sh runs it with memcheck and racecheck, filtered to
fastsel's own kernels), so the shapes are small and cover the edges: T = 1 (2-d input and (B, 1, F)),
T not a multiple of the tile depth, O and I multiples of 8 and not, fp32 / bf16 / fp16, a non-contiguous
input, a second accumulation into the same ``out``; the norm op with and without input; the embedding op
with a padding index and repeated tokens; class statistics with fp32 and bf16 hidden states, several
classes, an example without pooled tokens, float64 and float32 accumulators, two merges.

    python3 bench/sanitize_kernels.py [--device cuda|cpu]

Prints one line per call (max relative error vs the reference) and exits 1 on any mismatch or error,
2 when the device has no compiled kernel at all (nothing to sanitize).
"""
from __future__ import annotations

import argparse
import inspect
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fastsel import ops  # noqa: E402
from fastsel.ops import backend as _backend  # noqa: E402

COMPILED_LINEAR = ("kernel", "wmma", "pipelined")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Inputs are the same low-precision values on both sides and the kernels accumulate in fp32, so even
# bf16 / fp16 inputs should agree to fp32 rounding; the T = 1 path squares before the GEMM (exact too).
TOL = {"fp32": 1e-4, "bf16": 1e-3, "fp16": 1e-3}


def linear_backends(device: torch.device) -> list[str]:
    """The compiled backends of the linear op on ``device`` (empty: no kernel to call)."""
    try:
        available = _backend.linear_backends_available(device)
    except AttributeError:  # older _backend: only the op's default
        available = ("kernel",) if _backend.op_backend("accumulate_linear_sq_grad", device)[0] != "reference" else ()
    return [b for b in available if b in COMPILED_LINEAR]


def call_linear(out, g, x, backend: str) -> None:
    if "backend" in inspect.signature(ops.accumulate_linear_sq_grad).parameters:
        ops.accumulate_linear_sq_grad(out, g, x, backend=backend)
    elif backend == "kernel":
        ops.accumulate_linear_sq_grad(out, g, x)
    else:
        raise RuntimeError("fastsel.ops.accumulate_linear_sq_grad has no backend= argument yet")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return float((got - ref).abs().max()) / max(scale, 1e-30) if ref.numel() else 0.0


class Checker:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.count = 0

    def run(self, name: str, tol: float, fn) -> None:
        """fn() -> list of (got, ref) pairs; fails when any max relative error exceeds tol, or on an error."""
        self.count += 1
        try:
            pairs = fn()
            err = max(rel_err(g, r) for g, r in pairs)
            ok = err <= tol
            print(f"{'ok  ' if ok else 'FAIL'} {name:<58} max rel err {err:.2e} (tol {tol:.0e})", flush=True)
            if not ok:
                self.failures.append(f"{name}: max rel err {err:.2e} > {tol:.0e}")
        except Exception as exc:  # noqa: BLE001 - every call is reported, the rest still run
            print(f"FAIL {name:<58} {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(limit=3)
            self.failures.append(f"{name}: {type(exc).__name__}: {exc}")


def randn(shape, dtype, device, gen, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(dtype).to(device)


def check_linear(chk: Checker, device: torch.device, gen: torch.Generator) -> None:
    backends = linear_backends(device)
    if not backends:
        print("linear: no compiled backend on", device)
        return
    B = 3
    cases = []
    for O, I in ((96, 136), (70, 130)):
        for T in (1, 17, 64):
            cases.append((f"B{B} T{T} O{O} I{I}", (B, T), O, I, False))
    cases.append(("2-d input (T=1) O70 I130", (5,), 70, 130, False))
    cases.append(("non-contiguous x, T17 O96 I136", (B, 17), 96, 136, True))
    # many examples per block (the per-block example loop), and many tiles with partial last ones
    cases.append(("B64 T17 O96 I136", (64, 17), 96, 136, False))
    cases.append(("B2 T33 O512 I1032", (2, 33), 512, 1032, False))
    for backend in backends:
        for dname, dtype in DTYPES.items():
            for label, lead, O, I, strided in cases:
                def fn(lead=lead, O=O, I=I, strided=strided, dtype=dtype, backend=backend):
                    g = randn((*lead, O), dtype, device, gen)
                    if strided:  # every other column of a wider tensor
                        x = randn((*lead, 2 * I), dtype, device, gen)[..., ::2]
                    else:
                        x = randn((*lead, I), dtype, device, gen)
                    out = torch.rand(O, I, generator=gen).to(device)  # a non-zero accumulator
                    ref = out.clone()
                    call_linear(out, g, x, backend)
                    call_linear(out, g, x, backend)  # a second accumulation into the same out
                    ops.accumulate_linear_sq_grad_ref(ref, g, x)
                    ops.accumulate_linear_sq_grad_ref(ref, g, x)
                    return [(out, ref)]

                chk.run(f"linear[{backend}] {dname} {label}", TOL[dname], fn)


def check_norm(chk: Checker, device: torch.device, gen: torch.Generator) -> None:
    for dname, dtype in DTYPES.items():
        for label, lead, D in (("B3 T17 D130", (3, 17), 130), ("B5 T64 D96", (5, 64), 96), ("2-d B4 D70", (4,), 70)):
            for with_input in (True, False):
                def fn(lead=lead, D=D, dtype=dtype, with_input=with_input):
                    g = randn((*lead, D), dtype, device, gen)
                    x = randn((*lead, D), dtype, device, gen) if with_input else None
                    out = torch.rand(D, generator=gen).to(device)
                    ref = out.clone()
                    ops.accumulate_norm_sq_grad(out, g, x)
                    ops.accumulate_norm_sq_grad(out, g, x)
                    ops.accumulate_norm_sq_grad_ref(ref, g, x)
                    ops.accumulate_norm_sq_grad_ref(ref, g, x)
                    return [(out, ref)]

                chk.run(f"norm {dname} {label} {'scale' if with_input else 'bias'}", TOL[dname], fn)


def check_layer_norm(chk: Checker, device: torch.device, gen: torch.Generator) -> None:
    # many rows for the statistics launch (a partial last block), D not a multiple of 32, both outputs or one
    cases = (("B3 T17 D130", (3, 17), 130), ("B5 T64 D96", (5, 64), 96), ("2-d B4 D70", (4,), 70),
             ("B33 T9 D1030", (33, 9), 1030))
    for dname, dtype in DTYPES.items():
        for label, lead, D in cases:
            for which in ("both", "weight", "bias"):
                def fn(lead=lead, D=D, dtype=dtype, which=which):
                    g = randn((*lead, D), dtype, device, gen)
                    x = randn((*lead, D), dtype, device, gen, scale=2.0) + 0.5
                    outs = [torch.rand(D, generator=gen).to(device) if which in (k, "both") else None for k in ("weight", "bias")]
                    refs = [None if o is None else o.clone() for o in outs]
                    for _ in range(2):  # a second accumulation into the same outputs
                        ops.accumulate_layer_norm_sq_grad(*outs, g, x, 1e-5)
                        ops.accumulate_layer_norm_sq_grad_ref(*refs, g, x, 1e-5)
                    return [(o, r) for o, r in zip(outs, refs) if o is not None]

                chk.run(f"layer_norm {dname} {label} {which}", TOL[dname], fn)


def check_embedding(chk: Checker, device: torch.device, gen: torch.Generator) -> None:
    V = 50
    for dname, dtype in DTYPES.items():
        for label, (B, T), D, padding_idx in (("B3 T17 D130 pad0", (3, 17), 130, 0), ("B4 T64 D96 nopad", (4, 64), 96, -1)):
            def fn(B=B, T=T, D=D, padding_idx=padding_idx, dtype=dtype):
                idx = torch.randint(0, 12, (B, T), generator=gen)  # few distinct tokens: many repeats
                idx[:, -3:] = 0  # padding at the end
                idx[0, 0] = V - 1  # the last row
                idx = idx.to(device)
                g = randn((B, T, D), dtype, device, gen)
                out = torch.rand(V, D, generator=gen).to(device)
                ref = out.clone()
                ops.accumulate_embedding_sq_grad(out, g, idx, padding_idx)
                ops.accumulate_embedding_sq_grad(out, g, idx, padding_idx)
                ops.accumulate_embedding_sq_grad_ref(ref, g, idx, padding_idx)
                ops.accumulate_embedding_sq_grad_ref(ref, g, idx, padding_idx)
                return [(out, ref)]

            chk.run(f"embedding {dname} {label}", TOL[dname], fn)


def check_class_stats(chk: Checker, device: torch.device, gen: torch.Generator) -> None:
    C = 3
    for hname, hdtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for acc in (torch.float64, torch.float32):
            for (B, T, D) in ((7, 13, 70), (9, 33, 96)):
                def fn(B=B, T=T, D=D, hdtype=hdtype, acc=acc):
                    state = [torch.zeros(C, dtype=torch.float64), torch.zeros(C, D, dtype=acc), torch.zeros(C, D, D, dtype=acc)]
                    mine = [t.to(device) for t in state]
                    ref = [t.to(device) for t in state]
                    for step in range(2):  # two merges: the second one goes through Chan's update
                        hidden = randn((B, T, D), hdtype, device, gen, scale=2.0) + 0.5
                        lengths = torch.randint(1, T + 1, (B,), generator=gen)
                        mask = (torch.arange(T) < lengths.unsqueeze(1)).to(torch.int64)
                        mask[1] = 0  # an example without pooled tokens: skipped
                        labels = torch.randint(0, C, (B,), generator=gen)
                        labels[: min(B, C)] = torch.arange(min(B, C))  # every class present
                        if step == 1:
                            labels[labels == 2] = 0  # class 2 absent from the second batch
                        mask, labels = mask.to(device), labels.to(device)
                        # the grouping made once per batch (as the pass does) on even steps, the kernel's own on odd
                        grouping = ops.class_grouping(labels, C) if step % 2 == 0 else None
                        ops.class_stats_update(*mine, hidden, mask, labels, grouping)
                        ops.class_stats_update_ref(*ref, hidden, mask, labels)
                    return list(zip(mine, ref))

                tol = 1e-9 if acc == torch.float64 else 1e-4
                chk.run(f"class_stats hidden {hname} acc {str(acc).split('.')[-1]} B{B} T{T} D{D}", tol, fn)

            def layers_fn(hdtype=hdtype, acc=acc, L=3, B=9, T=17, D=70):
                """The pass's path: each layer pooled (class_stats_pool), then one update of the L layers."""
                mine = [torch.zeros(L, C, dtype=torch.float64, device=device), torch.zeros(L, C, D, dtype=acc, device=device),
                        torch.zeros(L, C, D, D, dtype=acc, device=device)]
                ref = [t.clone() for t in mine]
                hidden = randn((L, B, T, D), hdtype, device, gen, scale=2.0) + 0.5
                lengths = torch.randint(1, T + 1, (B,), generator=gen)
                mask = (torch.arange(T) < lengths.unsqueeze(1)).to(torch.int64)
                mask[2] = 0
                mask, labels = mask.to(device), (torch.arange(B) % C).to(device)
                pooled = torch.empty(L, B, D, dtype=acc, device=device)
                for l in range(L):
                    ops.class_stats_pool(pooled[l], hidden[l], mask)
                ops.class_stats_update(*mine, pooled.unsqueeze(2), (mask != 0).any(1, keepdim=True), labels,
                                       ops.class_grouping(labels, C))
                ops.class_stats_update_ref(*ref, hidden, mask, labels)
                return list(zip(mine, ref))

            chk.run(f"class_stats pool + L=3 layers hidden {hname} acc {str(acc).split('.')[-1]}",
                    1e-9 if acc == torch.float64 else 1e-4, layers_fn)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sanitize_kernels: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    compiled = {op: _backend.op_backend(op, device) for op in ops.OPS}
    print(f"torch {torch.__version__}, device {device}, extension: {_backend.EXTENSION.reason}")
    for op, (backend, why) in compiled.items():
        print(f"  {op:<32} {backend:<10} {why}")
    if all(b == "reference" for b, _ in compiled.values()):
        print(f"sanitize_kernels: no compiled kernel for {device}: nothing to sanitize", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(args.seed)
    chk = Checker()
    check_linear(chk, device, gen)
    check_norm(chk, device, gen)
    check_layer_norm(chk, device, gen)
    check_embedding(chk, device, gen)
    check_class_stats(chk, device, gen)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"{chk.count - len(chk.failures)} passed, {len(chk.failures)} failed")
    for f in chk.failures:
        print("  FAIL", f)
    return 1 if chk.failures else 0


if __name__ == "__main__":
    sys.exit(main())
