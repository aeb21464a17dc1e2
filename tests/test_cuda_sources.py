"""The CUDA kernel sources (csrc/**/*.cu) compile with a bare nvcc for sm_80 and sm_90.

The .cu files are torch-free by design, so this runs without a GPU or a CUDA build of torch; it is
skipped when nvcc is not on PATH. The second variant adds the flags torch's CUDAExtension passes
(no implicit half/bf16 conversions), which the kernels must also survive.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CU_FILES = sorted((REPO / "csrc").rglob("*.cu"))
ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
    "-DFASTSEL_WITH_CUDA",
]
VARIANTS = {"ci-c++17": ["-std=c++17"], "torch-c++20": ["-O3", "-std=c++20", *TORCH_NVCC_FLAGS]}

nvcc = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(nvcc is None, reason="nvcc not on PATH")


def test_there_are_cuda_sources():
    assert CU_FILES, "expected csrc/cuda/*.cu"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_cu_compiles(cu: Path, variant: str, tmp_path: Path):
    cmd = [nvcc, *VARIANTS[variant], "-c", str(cu), f"-I{REPO / 'csrc'}", *ARCHS, "-o", str(tmp_path / "k.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert "error" not in proc.stderr.lower(), proc.stderr
