"""Loading of the compiled extension (fastsel._C), and which backend each op runs on.

fastsel never fails to import because fastsel._C is missing or broken: every op then runs its
pure-torch reference and ``fastsel info`` says why.

Backends of an op (not every op has every one):
  ``reference``  the pure-torch ``*_ref`` twin (always there; the oracle)
  ``kernel``     the compiled kernel for the tensor's device (C++ on CPU, CUDA on GPU), its default variant
  ``bmm``        (linear op) per-example batched GEMMs over chunks of examples into a bounded workspace,
                 then the square-accumulate: no custom kernel, cuBLAS / MKL do the work
  ``wmma``       (linear op, CUDA) the 64x64-tile WMMA kernel
  ``pipelined``  (linear op, CUDA) the 128x128-tile cp.async multi-stage WMMA kernel
  ``triton``     (linear op) the Triton kernel of ``fastsel.ops.linear_triton``, autotuned per capability:
                 CUDA sm_80+ with triton installed; CPU tensors only in Triton's interpreter
                 (TRITON_INTERPRET=1, for tests). Never a default until the table names it.

The choice, first match wins: the ``backend=`` argument of the op's wrapper; ``FASTSEL_BACKEND``
(``reference`` for every op, or ``op=backend,...`` / a bare backend name for the ops that have it); for the
linear op on CUDA the measured table ``fastsel/ops/backend_table.json``; else ``kernel`` when compiled, else
``reference``. Decisions are cached per (op, device, dtype, shape class): the hot path pays a dict lookup.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "EXTENSION",
    "ExtensionStatus",
    "op_backend",
    "FORCE_REFERENCE_ENV",
    "BACKEND_ENV",
    "LINEAR_BACKENDS",
    "BACKEND_TABLE_PATH",
    "linear_backends_available",
    "choose_linear_backend",
    "linear_shape_class",
    "env_backend",
    "env_problem",
    "torch_mismatch",
    "explain_linear_default",
    "interpret_mode",
    "triton_status",
    "triton_backend_status",
]

BACKEND_ENV = "FASTSEL_BACKEND"
FORCE_REFERENCE_ENV = BACKEND_ENV  # "reference" forces the pure-torch path everywhere (older name)
LINEAR_BACKENDS: tuple[str, ...] = ("reference", "bmm", "kernel", "wmma", "pipelined", "triton")
CUDA_ONLY_LINEAR = ("wmma", "pipelined")
BACKEND_TABLE_PATH = Path(__file__).with_name("backend_table.json")  # fastsel/ops/backend_table.json


@dataclass(frozen=True)
class ExtensionStatus:
    loaded: bool
    cuda: bool
    reason: str
    built_with_torch: str | None = None  # torch.__version__ the extension was compiled against
    built_with_cuda: str | None = None  # CUDA toolkit version of the CUDA kernels (None: no CUDA kernels)
    cuda_archs: str | None = None  # the arches the CUDA kernels were compiled for


def _load() -> ExtensionStatus:
    if os.environ.get(BACKEND_ENV, "").strip().lower() == "reference":
        return ExtensionStatus(False, False, f"{BACKEND_ENV}=reference")
    try:
        from fastsel import _C  # registers torch.ops.fastsel.*
    except Exception as exc:  # ImportError, or an undefined-symbol OSError from an ABI mismatch
        return ExtensionStatus(False, False, f"fastsel._C not importable: {type(exc).__name__}: {exc}")
    built_torch = getattr(_C, "torch_version", None)
    built_cuda = getattr(_C, "cuda_version", None) or None
    archs = getattr(_C, "cuda_archs", None) or None
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("fastsel::accumulate_linear_sq_grad", "CUDA")
    reason = "compiled extension loaded" + (" with CUDA kernels" if has_cuda else " (CPU kernels only)")
    return ExtensionStatus(True, has_cuda, reason, built_torch, built_cuda, archs)


EXTENSION: ExtensionStatus = _load()


def torch_mismatch(status: ExtensionStatus | None = None) -> str | None:
    """A warning when the extension was built against another torch than the one running, else None.

    Only the release (2.13.0 of 2.13.0+cpu) is compared: the local part names the wheel flavour.
    """
    status = status or EXTENSION
    if not status.loaded or not status.built_with_torch:
        return None
    built, running = status.built_with_torch.split("+")[0], torch.__version__.split("+")[0]
    if built != running:
        return (f"fastsel._C was built against torch {status.built_with_torch} but torch {torch.__version__} is "
                f"running: rebuild it (pip install --no-build-isolation -e .)")
    return None


def op_backend(op_name: str, device: torch.device | str) -> tuple[str, str]:
    """(backend, reason) for running ``fastsel::op_name`` on ``device``: 'cuda', 'cpu' or 'reference'.

    Cached per (op, device type, extension status): the ops ask on every call, per layer and batch.
    """
    return _op_backend(op_name, torch.device(device).type, EXTENSION)


@functools.lru_cache(maxsize=256)
def _op_backend(op_name: str, device_type: str, status: ExtensionStatus) -> tuple[str, str]:
    if not status.loaded:
        return "reference", status.reason
    key = "CUDA" if device_type == "cuda" else "CPU" if device_type == "cpu" else None
    if key is None:
        return "reference", f"no kernel for device type {device_type!r}"
    qualname = f"fastsel::{op_name}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key):
        why = "extension built without CUDA kernels" if key == "CUDA" else f"{qualname} has no {key} kernel"
        return "reference", why
    return key.lower(), f"compiled {key} kernel"


# ---------------------------------------------------------------------------------------------------
# Per-op backend choice (FASTSEL_BACKEND, the measured table), cached
# ---------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _env_choices(raw: str) -> tuple[tuple[str | None, str], ...]:
    """Parse FASTSEL_BACKEND: 'reference', 'bmm', 'accumulate_linear_sq_grad=pipelined,...'."""
    out = []
    for part in filter(None, (p.strip() for p in raw.split(","))):
        op, _, name = part.rpartition("=")
        out.append((op.strip() or None, name.strip().lower()))
        _check_env_part(raw, *out[-1])
    return tuple(out)


def _check_env_part(raw: str, op: str | None, name: str) -> None:
    """ValueError (one line) for an unknown backend or op name in FASTSEL_BACKEND: never ignored silently."""
    # fastsel.ops.OPS without an import (the package imports this module): it is loaded when a backend is chosen
    ops = getattr(sys.modules.get("fastsel.ops"), "OPS", None)
    if name not in LINEAR_BACKENDS:
        raise ValueError(f"fastsel: {BACKEND_ENV}={raw}: unknown backend {name!r}; choose from {', '.join(LINEAR_BACKENDS)} "
                         f"({BACKEND_ENV}=NAME, or OP=NAME,... per op), or unset {BACKEND_ENV}")
    if op is not None and ops and op not in ops:
        raise ValueError(f"fastsel: {BACKEND_ENV}={raw}: unknown op {op!r}; the ops are {', '.join(ops)}")


def env_problem() -> str | None:
    """What is wrong with FASTSEL_BACKEND (an unknown backend or op name), or None (``fastsel info`` reports it)."""
    try:
        _env_choices(os.environ.get(BACKEND_ENV, ""))
    except ValueError as exc:
        return str(exc)
    return None


def env_backend(op_name: str) -> str | None:
    """The backend FASTSEL_BACKEND asks for ``op_name`` (None: no preference)."""
    for op, name in _env_choices(os.environ.get(BACKEND_ENV, "")):
        if op in (None, op_name):
            return name
    return None


def linear_backends_available(device: torch.device | str, *, with_triton: bool = True) -> tuple[str, ...]:
    """The backends of the linear op that can run on ``device`` (always 'reference' and 'bmm').

    ``with_triton=False`` leaves 'triton' out without importing triton (which takes a while).
    """
    device = torch.device(device)
    names = ["reference", "bmm"]
    if op_backend("accumulate_linear_sq_grad", device)[0] != "reference":
        names.append("kernel")
        if device.type == "cuda":
            names += list(CUDA_ONLY_LINEAR)
    if with_triton and triton_backend_status(device)[0]:
        names.append("triton")
    return tuple(names)


TRITON_INTERPRET_ENV = "TRITON_INTERPRET"


def interpret_mode() -> bool:
    """Whether Triton kernels run in its interpreter (TRITON_INTERPRET, read as triton reads it)."""
    return os.environ.get(TRITON_INTERPRET_ENV, "").strip().lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=1)
def triton_status() -> tuple[str | None, str]:
    """(triton's version or None, why): imported once, on first use only (it takes a while)."""
    try:
        import triton
        import triton.language  # a broken install fails here
    except Exception as exc:  # ImportError, or an OSError from libtriton
        return None, f"triton not importable: {type(exc).__name__}: {exc}"
    return triton.__version__, f"triton {triton.__version__}"


def triton_backend_status(device: torch.device | str) -> tuple[bool, str]:
    """(whether the linear op's triton backend can run on ``device``, why)."""
    device = torch.device(device)
    return _triton_backend_status(device.type, device.index or 0, interpret_mode())


@functools.lru_cache(maxsize=64)
def _triton_backend_status(device_type: str, index: int, interpret: bool) -> tuple[bool, str]:
    version, why = triton_status()
    if version is None:
        return False, why
    if interpret:
        return True, f"{why} in its interpreter ({TRITON_INTERPRET_ENV}=1: slow, for tests)"
    if device_type == "cpu":
        return False, f"{why} runs CPU tensors only in its interpreter: set {TRITON_INTERPRET_ENV}=1 (slow, for tests)"
    if device_type != "cuda":
        return False, f"no triton kernel for device type {device_type!r}"
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:  # bf16 tl.dot and the configurations want sm_80+
        return False, f"{why}: the kernel wants compute capability 8.0+, this GPU is {major}.{minor}"
    return True, f"{why} on sm_{major}{minor}"


def linear_shape_class(B: int, T: int, O: int, I: int) -> tuple[str, str, str]:
    """Coarse classes of a linear-op call the table distinguishes: (tokens per example, batch, layer size)."""
    t = "T1" if T <= 1 else "T<=32" if T <= 32 else "T<=256" if T <= 256 else "T>256"
    b = "B<=8" if B <= 8 else "B<=32" if B <= 32 else "B>32"
    size = "OI<=1M" if O * I <= (1 << 20) else "OI>1M"
    return t, b, size


@functools.lru_cache(maxsize=1)
def _table() -> dict[str, Any]:
    try:
        return json.loads(BACKEND_TABLE_PATH.read_text())
    except (OSError, ValueError):
        return {}


def _dtype_key(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "other")


@functools.lru_cache(maxsize=4096)
def _table_choice(capability: str, dtype: str, shape_class: tuple[str, str, str]) -> tuple[str, str] | None:
    table = _table()
    for rule in table.get("rules", []):
        when = rule.get("when", {})
        if when.get("capability") not in (None, "*", capability):
            continue
        if dtype not in when.get("dtype", [dtype]):
            continue
        if any(when.get(key) not in (None, value) for key, value in zip(("T", "B", "OI"), shape_class)):
            continue
        return rule["backend"], f"table {BACKEND_TABLE_PATH.name}: {rule.get('why', 'measured')}"
    default = table.get("default")
    return (default, f"table {BACKEND_TABLE_PATH.name}: default") if default else None


@functools.lru_cache(maxsize=64)
def _capability(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"{major}.{minor}"


def choose_linear_backend(device: torch.device, dtype: torch.dtype, B: int, T: int, O: int, I: int,
                          requested: str | None = None) -> str:
    """The backend the linear op runs for this call (see the module docstring for the order)."""
    name = requested or env_backend("accumulate_linear_sq_grad")
    if name == "triton":  # its own check: whether triton imports and can run here, not the extension's state
        usable, why = triton_backend_status(device)
        if not usable:
            raise ValueError(f"fastsel: backend 'triton' of accumulate_linear_sq_grad cannot run on {device}: {why}")
        return name
    if name is not None:
        if name not in LINEAR_BACKENDS:
            raise ValueError(f"fastsel: unknown backend {name!r} for accumulate_linear_sq_grad; choose from {LINEAR_BACKENDS}")
        available = linear_backends_available(device, with_triton=False)  # no triton import for the others
        if name not in available:
            raise ValueError(f"fastsel: backend {name!r} of accumulate_linear_sq_grad cannot run on {device}: "
                             f"{op_backend('accumulate_linear_sq_grad', device)[1]} (available: {', '.join(available)})")
        return name
    index = device.index if device.index is not None else 0
    return _default_linear(device.type, index, dtype, linear_shape_class(B, T, O, I), EXTENSION)


@functools.lru_cache(maxsize=4096)
def _default_linear(device_type: str, index: int, dtype: torch.dtype, shape_class: tuple[str, str, str],
                    status: ExtensionStatus) -> str:
    if _op_backend("accumulate_linear_sq_grad", device_type, status)[0] == "reference":
        return "reference"
    if device_type != "cuda":
        return "kernel"
    picked = _table_choice(_capability(index), _dtype_key(dtype), shape_class)
    if picked and picked[0] == "triton" and not _triton_backend_status(device_type, index, False)[0]:
        picked = None  # a table naming triton, on an install without it
    # No measurement for this GPU: cuBLAS's batched GEMMs are the safer choice than an unmeasured kernel.
    return picked[0] if picked else "bmm"


def explain_linear_default(device: torch.device | str, dtype: torch.dtype, B: int, T: int, O: int, I: int) -> str:
    """Why the default linear backend is what it is (for ``fastsel info``)."""
    device = torch.device(device)
    if env_backend("accumulate_linear_sq_grad"):
        return f"{BACKEND_ENV}={os.environ.get(BACKEND_ENV)}"
    if device.type != "cuda":
        return op_backend("accumulate_linear_sq_grad", device)[1]
    picked = _table_choice(_capability(device.index or 0), _dtype_key(dtype), linear_shape_class(B, T, O, I))
    return picked[1] if picked else "no measurement for this GPU in the table: batched GEMMs (the safer one)"
