"""The Triton backend of the linear op: out (O, I) += sum_b (grad_output[b]^T @ input[b])^2, and the bias term
bias_out (O,) += sum_b (sum_t grad_output[b, t])^2 in the same launch.

One program per (o-tile, i-tile) output tile and range of examples. Its k-steps are the T-blocks of every
example of its range, one after another, as ONE loop over ``tl.dot`` (wgmma on sm_90, mma on sm_80), so
that Triton's software pipeline never drains between examples; at each example boundary the fp32
product is squared into a second register tile and cleared: no per-example result leaves the registers.
When the output tiles alone would not fill the GPU, the examples are split over programs (grid axis 1),
which then add their partial sums with atomics. The bias programs are one more column of tiles: they sum
grad_output's T-blocks by a dot with a block of ones (X's "ones column", without widening X's tiles, which
would cost a whole extra tile of work wherever BLOCK_I divides I), squared at the same boundaries.

T = 1 takes another form of the same kernel (``SQUARED``): sum_b (g_b x_b^T)^2 = (g^2)^T (x^2), one GEMM
of squared operands in fp32 over the B rows, instead of B k-steps of one useful row each.

Configurations are autotuned per GPU capability, keyed by the shape class of
:func:`fastsel.ops.backend.linear_shape_class` (and the operand dtypes), not the exact shape: the
length-bucketed batches of a run would otherwise retune at every new T. Under ``TRITON_INTERPRET=1``
the kernel runs on CPU tensors in Triton's interpreter (tests), with one fixed configuration.

Triton is optional: without it this module still imports, :data:`TRITON_IMPORT_ERROR` says why, and
:func:`fastsel.ops.backend.triton_backend_status` reports the backend unavailable.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fastsel.ops.backend import interpret_mode, linear_shape_class
from fastsel.ops.common import check_linear_operands, check_out

__all__ = [
    "accumulate_linear_sq_grad_triton",
    "TritonConfig",
    "configs_for_capability",
    "choose_example_splits",
    "shape_class_code",
    "TRITON_IMPORT_ERROR",
    "FP32_INPUT_PRECISION",
    "compile_for_target",
    "make_autotuner",
]

try:
    import triton
    import triton.language as tl
except Exception as exc:  # ImportError, or a broken install (a missing libtriton symbol)
    triton = None
    tl = None
    TRITON_IMPORT_ERROR: str | None = f"triton not importable: {type(exc).__name__}: {exc}"
else:
    TRITON_IMPORT_ERROR = None

# tl.dot of fp32 operands: 'ieee' is exact fp32 (the oracle's tolerance of 1e-4 holds); 'tf32' would run on
# the tensor cores with a 10-bit mantissa (about 1e-3 relative), 'tf32x3' in between. Changed after measuring.
FP32_INPUT_PRECISION = "ieee"
# Compute dtype codes of the kernel's CAST constexpr.
_CAST_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@dataclass(frozen=True)
class TritonConfig:
    """One launch configuration: output tile BLOCK_O x BLOCK_I, BLOCK_T rows per k-step, warps, pipeline stages."""

    block_o: int = 64
    block_i: int = 64
    block_t: int = 32
    num_warps: int = 4
    num_stages: int = 3

    def kwargs(self) -> dict[str, int]:
        return {"BLOCK_O": self.block_o, "BLOCK_I": self.block_i, "BLOCK_T": self.block_t}


# In the interpreter each program is a Python loop over numpy tile ops: large tiles, few programs.
INTERPRETER_CONFIG = TritonConfig(32, 32, 16, 4, 1)

if triton is not None:

    @triton.jit(do_not_specialize=["shape_class"])
    def _linear_sq_grad_kernel(
        out_ptr, bias_ptr, g_ptr, x_ptr,
        B, T, O, I,
        stride_gb, stride_gt, stride_go, stride_xb, stride_xt, stride_xi,
        shape_class,  # only the autotuner's key: linear_shape_class as an int
        HAS_BIAS: tl.constexpr, SQUARED: tl.constexpr, CAST: tl.constexpr, PRECISION: tl.constexpr,
        INTERPRET: tl.constexpr,
        BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """out (O, I) fp32 contiguous += sum_b (G_b^T X_b)^2; bias (O,) += sum_b (sum_t G_b)^2 when HAS_BIAS.

        G (B, T, O) and X (B, T, I) by strides. Grid: (tiles_o * (tiles_i + HAS_BIAS), splits); program
        (tile, s) streams the k-steps of examples [s * chunk, (s + 1) * chunk). SQUARED (T = 1, called with
        B = 1 and the examples as T): the operands are squared in fp32 and the product is the result.
        """
        pid = tl.program_id(0)
        split = tl.program_id(1)
        nsplit = tl.num_programs(1)
        # No tl.cdiv, tl.zeros, tl.sum: they are @triton.jit helpers, fixed to compiled or interpreted when
        # triton is first imported, and TRITON_INTERPRET may be set after that (tests): builtins only.
        tiles_i = (I + BLOCK_I - 1) // BLOCK_I
        pid_o = pid // (tiles_i + HAS_BIAS)
        pid_i = pid % (tiles_i + HAS_BIAS)
        ktiles = (T + BLOCK_T - 1) // BLOCK_T
        # The range of this program in the stream of k-steps j = b * ktiles + kt. A split never cuts an
        # example (its product must be squared whole) except under SQUARED, where all is linear and the
        # unit of the split is the k-step itself.
        if SQUARED:
            units = ktiles
            per_unit = 1
        else:
            units = B
            per_unit = ktiles
        chunk = (units + nsplit - 1) // nsplit
        j_begin = split * chunk * per_unit
        j_end = tl.minimum(units, (split + 1) * chunk) * per_unit

        offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_t = tl.arange(0, BLOCK_T)
        o_ok = offs_o < O
        is_bias = False
        if HAS_BIAS:
            is_bias = pid_i == tiles_i
        if is_bias:
            # The bias column of tiles: d bias_o = sum_t g[b, t, o], as a dot with a (16, BLOCK_T) block of ones
            # (the "ones column of X"; 16 rows, tl.dot's least): every row of the (16, BLOCK_O) result is the
            # sum; row 0 is stored. In fp32, exact for half operands too.
            rows = tl.arange(0, 16)
            ones = tl.full((16, BLOCK_T), 1.0, tl.float32)
            bacc = tl.full((16, BLOCK_O), 0.0, tl.float32)
            bsq = tl.full((16, BLOCK_O), 0.0, tl.float32)
            for j in range(j_begin, j_end):
                b = j // ktiles
                kt = j - b * ktiles
                t = kt * BLOCK_T + offs_t
                if SQUARED:  # t runs over the examples: t * stride can pass 2^31
                    t = t.to(tl.int64)
                g = tl.load(g_ptr + b.to(tl.int64) * stride_gb + t[:, None] * stride_gt + offs_o[None, :] * stride_go,
                            mask=(t < T)[:, None] & o_ok[None, :], other=0.0).to(tl.float32)
                if SQUARED:
                    bacc = tl.dot(ones, g * g, bacc, input_precision="ieee")
                else:
                    bacc = tl.dot(ones, g, bacc, input_precision="ieee")
                    if kt == ktiles - 1:  # example boundary
                        bsq += bacc * bacc
                        bacc = tl.full((16, BLOCK_O), 0.0, tl.float32)
            if SQUARED:
                bsq = bacc
            bptrs = bias_ptr + rows[:, None] * 0 + offs_o[None, :]
            bmask = (rows == 0)[:, None] & o_ok[None, :]
            if nsplit > 1:
                tl.atomic_add(bptrs, bsq, mask=bmask)
            else:
                tl.store(bptrs, tl.load(bptrs, mask=bmask, other=0.0) + bsq, mask=bmask)
        else:
            offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
            i_ok = offs_i < I
            acc = tl.full((BLOCK_O, BLOCK_I), 0.0, tl.float32)
            sq = tl.full((BLOCK_O, BLOCK_I), 0.0, tl.float32)
            for j in range(j_begin, j_end):
                b = j // ktiles
                kt = j - b * ktiles
                t = kt * BLOCK_T + offs_t
                if SQUARED:  # t runs over the examples: t * stride can pass 2^31
                    t = t.to(tl.int64)
                t_ok = t < T
                # G_b^T's tile (BLOCK_O, BLOCK_T) and X_b's (BLOCK_T, BLOCK_I); zeros past T, O, I add nothing.
                gt = tl.load(g_ptr + b.to(tl.int64) * stride_gb + offs_o[:, None] * stride_go + t[None, :] * stride_gt,
                             mask=o_ok[:, None] & t_ok[None, :], other=0.0)
                xt = tl.load(x_ptr + b.to(tl.int64) * stride_xb + t[:, None] * stride_xt + offs_i[None, :] * stride_xi,
                             mask=t_ok[:, None] & i_ok[None, :], other=0.0)
                if SQUARED:  # squares in fp32 of the operands as the compute type rounds them (mixed: half)
                    if CAST == 1:
                        gt = gt.to(tl.bfloat16)
                        xt = xt.to(tl.bfloat16)
                    elif CAST == 2:
                        gt = gt.to(tl.float16)
                        xt = xt.to(tl.float16)
                    gt = gt.to(tl.float32)
                    xt = xt.to(tl.float32)
                    acc = tl.dot(gt * gt, xt * xt, acc, input_precision="ieee")
                else:
                    # Mixed operands (half + fp32, as under autocast) are computed in the half type, as the
                    # CUDA kernels do; the conversion happens in registers, no copy of the fp32 operand.
                    if CAST == 1:
                        if INTERPRET:  # triton 3.7's interpreter multiplies bf16's uint16 storage: the same
                            # bf16-rounded values, multiplied exactly and summed in fp32, as the tensor cores do
                            acc = tl.dot(gt.to(tl.bfloat16).to(tl.float32), xt.to(tl.bfloat16).to(tl.float32), acc,
                                         input_precision="ieee")
                        else:
                            acc = tl.dot(gt.to(tl.bfloat16), xt.to(tl.bfloat16), acc)
                    elif CAST == 2:
                        acc = tl.dot(gt.to(tl.float16), xt.to(tl.float16), acc)
                    else:
                        acc = tl.dot(gt.to(tl.float32), xt.to(tl.float32), acc, input_precision=PRECISION)
                    if kt == ktiles - 1:  # example boundary: square this example's product, start the next
                        sq += acc * acc
                        acc = tl.full((BLOCK_O, BLOCK_I), 0.0, tl.float32)
            if SQUARED:
                sq = acc
            ptrs = out_ptr + offs_o[:, None] * I + offs_i[None, :]
            mask = o_ok[:, None] & i_ok[None, :]
            if nsplit > 1:  # several programs add to this tile: the order of fp32 adds varies
                tl.atomic_add(ptrs, sq, mask=mask)
            else:
                tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + sq, mask=mask)


def configs_for_capability(capability: tuple[int, int]) -> list[TritonConfig]:
    """The configurations the autotuner tries on a GPU of this capability (before pruning by shape).

    Register budget: two fp32 tiles (the product and the squares) of BLOCK_O x BLOCK_I live across the
    loop: 128 x 128 / 256 threads = 64 registers each, 128 for both, so 128 x 128 tiles need 8 warps (with 4,
    256 registers: spills). ptxas (3.7.1): 186-224 registers, no spills, for every configuration below.
    """
    if capability >= (9, 0):  # Hopper: wgmma wants 4-warp groups and M >= 64; deep pipelines (228 KB smem)
        return [TritonConfig(128, 128, 32, 8, 4), TritonConfig(128, 128, 64, 8, 3), TritonConfig(128, 128, 16, 8, 5),
                TritonConfig(128, 64, 32, 4, 4), TritonConfig(64, 128, 32, 4, 4), TritonConfig(64, 64, 32, 4, 4),
                TritonConfig(64, 64, 16, 4, 4)]
    if capability >= (8, 0):  # Ampere / Ada: mma.sync, cp.async
        return [TritonConfig(128, 128, 32, 8, 3), TritonConfig(128, 128, 16, 8, 4), TritonConfig(128, 64, 32, 4, 3),
                TritonConfig(64, 128, 32, 4, 3), TritonConfig(64, 64, 32, 4, 3), TritonConfig(64, 64, 16, 4, 4)]
    return [TritonConfig(64, 64, 32, 4, 2), TritonConfig(32, 32, 16, 4, 2)]


def _prune(configs: list, named_args: dict, **kwargs) -> list:
    """Drop the configurations whose tiles are mostly padding for this shape (keep at least one)."""
    T, O, I = named_args["T"], named_args["O"], named_args["I"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_T"] <= max(16, triton.next_power_of_2(T))
            and c.kwargs["BLOCK_O"] <= max(64, triton.next_power_of_2(O))
            and c.kwargs["BLOCK_I"] <= max(64, triton.next_power_of_2(I))]
    return kept or configs[-1:]


def shape_class_code(B: int, T: int, O: int, I: int) -> int:
    """:func:`linear_shape_class` as one int (the autotuner's key must be a kernel argument)."""
    t, b, oi = linear_shape_class(B, T, O, I)
    return (("T1", "T<=32", "T<=256", "T>256").index(t) * 6 + ("B<=8", "B<=32", "B>32").index(b) * 2
            + ("OI<=1M", "OI>1M").index(oi))


@functools.lru_cache(maxsize=4096)
def choose_example_splits(units: int, steps_per_unit: int, tiles: int, slots: int) -> int:
    """Programs per output tile: the chunk c of units (examples) per program that minimises the time of the
    slowest slot, waves(c) * (c * steps_per_unit + 2), waves(c) = ceil(tiles * ceil(units / c) / slots);
    the +2 is about two k-steps' worth of prologue and epilogue (the CUDA pipelined kernel's rule)."""
    best_cost, best_c = -1, units
    for c in range(1, min(units, 4096) + 1):
        splits = math.ceil(units / c)
        if splits > 65535:  # grid axis 1 limit
            continue
        cost = math.ceil(tiles * splits / max(1, slots)) * (c * steps_per_unit + 2)
        if best_cost < 0 or cost < best_cost:
            best_cost, best_c = cost, c
    return max(1, math.ceil(units / max(1, best_c)))


_TUNING_KEY = ["shape_class", "SQUARED", "HAS_BIAS"]  # + the operand dtypes, which Triton's autotuner adds


def make_autotuner(configs: list[TritonConfig], kernel, do_bench=None):
    """The kernel autotuned over ``configs``, per shape class, operand dtypes, T = 1 or not and bias or not;
    out and bias are restored between trials (they are accumulated into). The choices are kept in Triton's
    cache (cache_results): a machine tunes each key once, not once per process. ``do_bench``: Triton's
    default (CUDA events) when None."""
    tconfigs = [triton.Config(c.kwargs(), num_warps=c.num_warps, num_stages=c.num_stages) for c in configs]
    return triton.autotune(configs=tconfigs, key=_TUNING_KEY, prune_configs_by={"early_config_prune": _prune},
                           restore_value=["out_ptr", "bias_ptr"], cache_results=True, do_bench=do_bench)(kernel)


@functools.lru_cache(maxsize=16)
def _autotuned(capability: tuple[int, int]):
    """The autotuned kernel of a GPU capability (one per process and capability: its choices live in it)."""
    return make_autotuner(configs_for_capability(capability), _plain_kernel(False))


@functools.lru_cache(maxsize=2)
def _plain_kernel(interpret: bool):
    """The kernel for a fixed configuration, in the mode asked for: ``triton.jit`` decides between the
    compiled and the interpreted function when the module is imported, and TRITON_INTERPRET may be set later."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    kernel = _linear_sq_grad_kernel
    if interpret and not isinstance(kernel, InterpretedFunction):
        return InterpretedFunction(kernel.fn)
    if not interpret and not isinstance(kernel, JITFunction):
        return JITFunction(kernel.fn, do_not_specialize=["shape_class"])
    return kernel


def _compute_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype of the dot, as the bmm backend and the CUDA kernels choose it (fastsel.ops.linear imports this
    module, so the rule is restated, not imported): a shared fp32/bf16/fp16; the half one of half + fp32; else fp32."""
    if a == b and a in _CAST_CODES:
        return a
    for half, other in ((a, b), (b, a)):
        if half in (torch.bfloat16, torch.float16) and other == torch.float32:
            return half
    return torch.float32


_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def compile_for_target(capability: tuple[int, int], g_dtype: torch.dtype, x_dtype: torch.dtype, config: TritonConfig,
                       *, has_bias: bool = True, squared: bool = False):
    """Compile the kernel ahead of time for a GPU that need not be here (Triton's compiler and ptxas only):
    contiguous operands (unit feature strides, 16-divisible sizes and strides, as the JIT would specialise).
    Returns Triton's compiled kernel; ``.asm['ptx']`` shows wgmma / mma.sync and the cp.async pipeline."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compute = _compute_dtype(g_dtype, x_dtype)
    consts = dict(HAS_BIAS=has_bias, SQUARED=squared, CAST=_CAST_CODES[compute], PRECISION=FP32_INPUT_PRECISION,
                  INTERPRET=False, stride_go=1, stride_xi=1, **config.kwargs())
    pointers = {"out_ptr": "*fp32", "bias_ptr": "*fp32", "g_ptr": "*" + _TRITON_DTYPES[g_dtype],
                "x_ptr": "*" + _TRITON_DTYPES[x_dtype]}
    fn = _plain_kernel(False)  # the compiled form, also when TRITON_INTERPRET was set at import
    signature = {name: "constexpr" if name in consts else pointers.get(name, "i32") for name in fn.arg_names}
    aligned = ["out_ptr", "bias_ptr", "g_ptr", "x_ptr", "O", "I", "stride_gb", "stride_gt", "stride_xb", "stride_xt"]
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs={(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned})
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    return triton.compile(src, target=target, options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def accumulate_linear_sq_grad_triton(out: Tensor, grad_output: Tensor, input: Tensor, bias_out: Tensor | None = None,
                                     *, config: TritonConfig | None = None, splits: int | None = None,
                                     autotune: bool | None = None) -> None:
    """Triton backend of :func:`fastsel.ops.linear.accumulate_linear_sq_grad`, with the bias in the same launch.

    out (O, I) float32 contiguous, updated in place; grad_output (B, *, O); input (B, *, I) (the middle dims are
    positions; any strides as long as they flatten to (B, T, F) without a copy, else a copy is made);
    bias_out (O,) float32 or None: += sum_b (sum_t grad_output[b, t])^2, the bias of y = x W^T + b.
    Operand dtypes as the CUDA kernels: fp32, bf16, fp16; half + fp32 is computed in the half type; other
    pairs in fp32. ``config``: one fixed configuration instead of the autotuned ones; ``autotune``: None
    autotunes on a GPU and runs :data:`INTERPRETER_CONFIG` in the interpreter, True autotunes there too
    (tests); ``splits``: programs per output tile over the examples (None: chosen so that the tiles fill the
    GPU's SMs).
    """
    if triton is None:
        raise RuntimeError(f"fastsel: the triton backend is unavailable: {TRITON_IMPORT_ERROR}")
    check_linear_operands(grad_output, input)
    positions = grad_output.shape[1:-1].numel()  # explicit: reshape cannot infer -1 when B == 0
    g = grad_output.reshape(grad_output.shape[0], positions, grad_output.shape[-1])  # (B, T, O), a view if it can
    x = input.reshape(input.shape[0], positions, input.shape[-1])  # (B, T, I)
    B, T, O = g.shape
    I = x.shape[-1]
    check_out(out, (O, I), grad_output)
    if bias_out is not None:
        check_out(bias_out, (O,), grad_output)
    if input.device != grad_output.device:
        raise ValueError(f"fastsel: input is on {input.device} but grad_output is on {grad_output.device}")
    if B == 0 or T == 0 or O == 0:
        return
    if I == 0 and bias_out is None:
        return
    compute = _compute_dtype(g.dtype, x.dtype)
    if g.dtype not in _CAST_CODES:
        g = g.float()
    if x.dtype not in _CAST_CODES:
        x = x.float()
    interpret = interpret_mode()
    if interpret and compute == torch.bfloat16:
        # triton 3.7's interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even): round here.
        g, x = g.to(compute), x.to(compute)
    squared = T == 1
    if squared:  # one GEMM of squares over the B rows: B' = 1, the examples are the positions
        g, x = g.transpose(0, 1), x.transpose(0, 1)  # (1, B, O), (1, B, I)
    Bk, Tk = g.shape[0], g.shape[1]
    has_bias = bias_out is not None
    sms = _sm_count(out.device)

    def grid(meta: dict) -> tuple[int, int]:
        tiles = triton.cdiv(O, meta["BLOCK_O"]) * (triton.cdiv(I, meta["BLOCK_I"]) + int(has_bias))
        ktiles = triton.cdiv(Tk, meta["BLOCK_T"])
        if splits is not None:
            return tiles, max(1, splits)
        units, per_unit = (ktiles, 1) if squared else (Bk, ktiles)
        return tiles, choose_example_splits(units, per_unit, tiles, sms)

    args = (out, bias_out if has_bias else out, g, x, Bk, Tk, O, I,
            g.stride(0), g.stride(1), g.stride(2), x.stride(0), x.stride(1), x.stride(2),
            shape_class_code(B, T, O, I))
    consts = dict(HAS_BIAS=has_bias, SQUARED=squared, CAST=_CAST_CODES[compute], PRECISION=FP32_INPUT_PRECISION,
                  INTERPRET=interpret)
    if config is None and (autotune or (autotune is None and not interpret)):
        capability = torch.cuda.get_device_capability(out.device) if out.is_cuda else (0, 0)
        _autotuned(capability)[grid](*args, **consts)
        return
    config = config or INTERPRETER_CONFIG
    _plain_kernel(interpret)[grid](*args, **consts, **config.kwargs(), num_warps=config.num_warps,
                                   num_stages=config.num_stages)
