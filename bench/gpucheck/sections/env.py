"""Section env: the environment record (device, driver, torch / CUDA / transformers versions, what fastsel
loaded), so that every timing in the JSON can be traced to the machine and software that produced it."""
from __future__ import annotations

import json
import platform
import subprocess

import torch

from ..run import Run


def _cmd(args: list[str]) -> str | None:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def section_env(run: Run, res: dict) -> None:
    res["python"] = platform.python_version()
    res["torch"] = torch.__version__
    res["torch_cuda"] = torch.version.cuda
    res["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    res["cpu_threads"] = torch.get_num_threads()
    for mod in ("transformers", "triton", "opacus", "datasets", "peft"):
        try:
            res[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            res[mod] = f"not importable: {type(exc).__name__}: {exc}"
    if run.cuda:
        props = torch.cuda.get_device_properties(run.device)
        res["gpu"] = props.name
        res["capability"] = f"{props.major}.{props.minor}"
        res["sm_count"] = props.multi_processor_count
        res["gpu_memory_gib"] = round(props.total_memory / (1 << 30), 1)
        res["nvidia_smi"] = _cmd(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"])
        run.data["gpu"] = props.name
        run.data["capability"] = res["capability"]
    else:
        res["gpu"] = None
        res["cpu"] = platform.processor() or platform.machine()
        run.data["skipped_no_gpu"] = ["CUDA-only linear backends (wmma, pipelined)", "peak GPU memory (extra_mib = null)",
                                      "GPU timings (CPU timings of tiny shapes only exercise the code)"]
    from fastsel.ops import backend as _backend
    from fastsel.ops import OPS

    ext = _backend.EXTENSION
    res["extension"] = {"loaded": ext.loaded, "cuda_kernels": ext.cuda, "reason": ext.reason,
                        **{k: getattr(ext, k, None) for k in ("built_with_torch", "built_with_cuda", "cuda_archs")}}
    res["ops"] = {op: list(_backend.op_backend(op, run.device)) for op in OPS}
    try:
        res["linear_backends"] = list(_backend.linear_backends_available(run.device))
    except Exception as exc:  # noqa: BLE001
        res["linear_backends"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps({k: res[k] for k in ("torch", "torch_cuda", "gpu", "extension", "linear_backends")}, default=str))
