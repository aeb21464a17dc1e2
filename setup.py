"""Build fastsel._C: C++ CPU kernels always, CUDA kernels when a CUDA build is possible or forced.

Environment:
  FASTSEL_SKIP_CUDA_BUILD=1   never build CUDA kernels
  FASTSEL_FORCE_CUDA=1        build CUDA kernels even without a visible GPU (needs a CUDA torch + nvcc)
  TORCH_CUDA_ARCH_LIST        also turns the CUDA build on (the arches to build for)
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> tuple[bool, str]:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("FASTSEL_SKIP_CUDA_BUILD", "0") == "1":
        return False, "FASTSEL_SKIP_CUDA_BUILD=1"
    forced = os.environ.get("FASTSEL_FORCE_CUDA", "0") == "1" or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    if torch.version.cuda is None:
        if forced:
            sys.exit("fastsel: CUDA build forced but this torch has no CUDA support (torch.version.cuda is None)")
        return False, "torch is a CPU build"
    if CUDA_HOME is None:
        if forced:
            sys.exit("fastsel: CUDA build forced but nvcc / CUDA_HOME was not found")
        return False, "nvcc not found"
    if forced or torch.cuda.is_available():
        return True, "forced" if forced else "GPU visible"
    return False, "no GPU visible (set FASTSEL_FORCE_CUDA=1 to build anyway)"


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    rel = lambda ps: sorted(os.path.relpath(p, ROOT) for p in ps)  # noqa: E731
    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    use_cuda, why = _want_cuda()
    print(f"fastsel: CUDA kernels {'ON' if use_cuda else 'OFF'} ({why})")
    common = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if use_cuda:
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        return [
            CUDAExtension(
                "fastsel._C",
                sources,
                extra_compile_args={"cxx": cxx + ["-DFASTSEL_WITH_CUDA"], "nvcc": ["-O3", "-std=c++20", "-DFASTSEL_WITH_CUDA"]},
                **common,
            )
        ]
    return [CppExtension("fastsel._C", sources, extra_compile_args={"cxx": cxx}, **common)]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=_extensions(), cmdclass=_cmdclass())
