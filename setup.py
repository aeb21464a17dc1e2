"""Build fastsel._C: C++ CPU kernels always, CUDA kernels when a CUDA build is possible or forced.

Environment:
  FASTSEL_SKIP_CUDA_BUILD=1   never build CUDA kernels
  FASTSEL_FORCE_CUDA=1        build CUDA kernels even without a visible GPU (needs a CUDA torch + nvcc)
  TORCH_CUDA_ARCH_LIST        also turns the CUDA build on (the arches to build for, e.g. "8.0;9.0");
                              default: the visible GPUs' arches, or 8.0;9.0 when forced without a GPU
  CUDA_HOME / CUDA_PATH       the CUDA toolkit; found from nvcc when unset (wrapper scripts resolved)
  MAX_JOBS                    parallel compile jobs (ninja); default: the number of CPUs

Sources are globbed: csrc/*.cpp, csrc/cpu/*.cpp, and in CUDA builds csrc/cuda/*.cpp + csrc/cuda/*.cu. Every
source must have its own file stem (ninja names objects by stem: x.cpp and x.cu would collide).

Build with the torch you will run: ``pip install --no-build-isolation -e .`` (or ``make`` / ``make cuda-build``).
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_FORCED_ARCHS = "8.0;9.0"  # forced CUDA build without a visible GPU: the arches the kernels target
_SAFE = re.compile(r"[^A-Za-z0-9._+,-]")


def _log(msg: str) -> None:
    print(f"fastsel: {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------
# CUDA toolkit discovery (before torch.utils.cpp_extension is imported: it fixes CUDA_HOME at import)
# ---------------------------------------------------------------------------------------------------


def _is_toolkit(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))


def _script_target(path: str, max_bytes: int = 64 * 1024) -> str | None:
    """The absolute ``.../bin/nvcc`` a small wrapper script execs (None: not a text script, or none named)."""
    try:
        if os.path.getsize(path) > max_bytes:
            return None
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    if b"\0" in data:  # a binary, not a script
        return None
    for cand in re.findall(r"""(/[^\s'"`;|&()<>$]*/bin/nvcc)\b""", data.decode("utf-8", "replace")):
        cand = os.path.realpath(cand)
        if os.path.isfile(cand) and cand != os.path.realpath(path):
            return cand
    return None


def _dryrun_top(nvcc: str) -> str | None:
    """TOP= from ``nvcc --dryrun`` (nvcc prints the toolkit root it runs from)."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    return os.path.realpath(m.group(1).strip()) if m else None


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", os.path.basename(path))) or (0,)


def find_cuda_home(nvcc: str | None = None, env: dict[str, str] | None = None,
                   fallbacks: list[str] | None = None) -> tuple[str | None, str]:
    """(toolkit root, how it was found). ``nvcc``: the nvcc on PATH (default shutil.which)."""
    env = os.environ if env is None else env
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            return env[var], f"${var}"
    nvcc = nvcc if nvcc is not None else shutil.which("nvcc")
    if nvcc:
        seen = set()
        path = os.path.realpath(nvcc)
        for _ in range(4):  # wrappers of wrappers
            if path in seen:
                break
            seen.add(path)
            root = os.path.dirname(os.path.dirname(path))
            if _is_toolkit(root):
                via = "nvcc on PATH" if path == os.path.realpath(nvcc) else f"the nvcc that {nvcc} runs"
                return root, f"{via} ({path})"
            target = _script_target(path)
            if target is None:
                break
            path = target
        top = _dryrun_top(nvcc)
        if _is_toolkit(top):
            return top, f"TOP= of `{nvcc} --dryrun`"
    if fallbacks is None:
        fallbacks = [p for p in glob.glob("/usr/local/cuda-*") if not os.path.islink(p)]
        fallbacks = ["/usr/local/cuda"] + sorted(fallbacks, key=_version_key, reverse=True)
    for root in fallbacks:
        if _is_toolkit(root):
            return os.path.realpath(root), f"fallback {root}"
    return None, "no nvcc on PATH and no /usr/local/cuda*"


def nvidia_wheel_includes(torch_file: str | None = None, wanted: tuple[str, ...] = ("cublas_v2.h", "cusparse.h")) -> list[str]:
    """``nvidia/*/include`` folders of the CUDA library wheels next to the installed torch that hold any of
    ``wanted`` (a pip-installed CUDA torch ships cuBLAS/cuSPARSE headers there; a toolkit may not)."""
    roots: list[str] = []
    if torch_file is None:
        spec = importlib.util.find_spec("torch")
        torch_file = spec.origin if spec and spec.origin else None
    if torch_file:
        roots.append(os.path.join(os.path.dirname(os.path.dirname(torch_file)), "nvidia"))
    try:
        spec = importlib.util.find_spec("nvidia")
        roots += list(spec.submodule_search_locations or []) if spec else []
    except (ImportError, ValueError):
        pass
    out: list[str] = []
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "*", "include"))):
            inc = os.path.realpath(inc)
            if inc not in out and any(os.path.isfile(os.path.join(inc, h)) for h in wanted):
                out.append(inc)
    return out


def nvcc_version(cuda_home: str | None) -> str | None:
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if not nvcc or not os.path.isfile(nvcc):
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def duplicate_stems(sources: list[str]) -> dict[str, list[str]]:
    """Sources sharing a file stem (x.cpp and x.cu, or cpu/x.cpp and cuda/x.cpp): {stem: [paths]}."""
    by_stem: dict[str, list[str]] = {}
    for s in sources:
        by_stem.setdefault(os.path.splitext(os.path.basename(s))[0], []).append(s)
    return {k: v for k, v in by_stem.items() if len(v) > 1}


def _define(name: str, value: str) -> str:
    """-DNAME=value, value made shell- and ninja-safe; csrc/fastsel.cpp stringifies it (';' spelt ',')."""
    return f"-D{name}={_SAFE.sub('_', value.replace(';', ',').replace(' ', ','))}"


# ---------------------------------------------------------------------------------------------------
# What to build
# ---------------------------------------------------------------------------------------------------


def _want_cuda(cuda_home: str | None) -> tuple[bool, str]:
    import torch

    if os.environ.get("FASTSEL_SKIP_CUDA_BUILD", "0") == "1":
        return False, "FASTSEL_SKIP_CUDA_BUILD=1"
    forced = os.environ.get("FASTSEL_FORCE_CUDA", "0") == "1" or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    if torch.version.cuda is None:
        if forced:
            sys.exit("fastsel: CUDA build forced but this torch has no CUDA support (torch.version.cuda is None)")
        return False, "torch is a CPU build"
    if cuda_home is None:
        if forced:
            sys.exit("fastsel: CUDA build forced but no CUDA toolkit was found (no nvcc on PATH, CUDA_HOME unset)")
        return False, "nvcc not found"
    if forced or torch.cuda.is_available():
        return True, "forced" if forced else "GPU visible"
    return False, "no GPU visible (set FASTSEL_FORCE_CUDA=1 to build anyway)"


def _arch_list() -> tuple[str, str]:
    """The TORCH_CUDA_ARCH_LIST to build for (set in the environment for torch), and where it came from."""
    import torch

    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env and env != "native":
        return env, "TORCH_CUDA_ARCH_LIST"
    archs = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())},
                   key=lambda a: tuple(map(int, a.split("."))))
    if not archs:
        return DEFAULT_FORCED_ARCHS, "default (no GPU visible)"
    supported = [int(a.split("_")[1]) for a in torch.cuda.get_arch_list() if a.startswith("sm_") and a[3:].isdigit()]
    if supported:  # clamp to what this torch's nvcc knows (as torch does)
        top = max(supported)
        archs = sorted({a if int(a.replace(".", "")) <= top else f"{top // 10}.{top % 10}" for a in archs})
    archs[-1] += "+PTX"
    return ";".join(archs), "visible GPUs"


def _sources(root: str, cuda: bool) -> list[str]:
    pats = ["csrc/*.cpp", "csrc/cpu/*.cpp"] + (["csrc/cuda/*.cpp", "csrc/cuda/*.cu"] if cuda else [])
    return sorted(os.path.relpath(p, root) for pat in pats for p in glob.glob(os.path.join(root, pat)))


def _extensions():
    cuda_home, how = find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home
    _log(f"CUDA toolkit: {cuda_home or 'none'} ({how})")

    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    use_cuda, why = _want_cuda(cuda_home)
    _log(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}) at {os.path.dirname(torch.__file__)}")
    _log(f"CUDA kernels {'ON' if use_cuda else 'OFF'} ({why})")

    sources = _sources(ROOT, use_cuda)
    dups = duplicate_stems(sources)
    if dups:
        listing = "; ".join(" and ".join(v) for v in dups.values())
        sys.exit(f"fastsel: two sources share a file stem ({listing}): their objects would collide "
                 f"(ninja: 'multiple rules generate ...o'). Rename one of them.")
    _log(f"{len(sources)} sources: {' '.join(sources)}")

    jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
    os.environ["MAX_JOBS"] = jobs
    _log(f"ninja with MAX_JOBS={jobs}")

    cxx = ["-O3", "-std=c++20", "-fopenmp", _define("FASTSEL_TORCH_VERSION", torch.__version__)]
    common = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if not use_cuda:
        return [CppExtension("fastsel._C", sources, extra_compile_args={"cxx": cxx}, **common)]

    archs, arch_from = _arch_list()
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    cuda_version = nvcc_version(cuda_home) or torch.version.cuda
    _log(f"CUDA {cuda_version} (torch built with {torch.version.cuda}), arches {archs} ({arch_from})")
    if cuda_version and torch.version.cuda and cuda_version.split(".")[0] != torch.version.cuda.split(".")[0]:
        _log(f"WARNING: nvcc {cuda_version} and torch's CUDA {torch.version.cuda} differ in the major version")
    cxx += ["-DFASTSEL_WITH_CUDA", _define("FASTSEL_CUDA_VERSION", cuda_version or ""), _define("FASTSEL_CUDA_ARCHS", archs)]
    nvcc = ["-O3", "-std=c++20", "-DFASTSEL_WITH_CUDA", "--expt-relaxed-constexpr", "-lineinfo"]
    ext = CUDAExtension("fastsel._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **common)
    # After torch's own include paths (CUDA_HOME/include first): the wheels only fill in missing headers.
    extra = [d for d in nvidia_wheel_includes(torch.__file__) if not os.path.samefile(d, os.path.join(cuda_home, "include"))]
    missing = [h for h in ("cublas_v2.h", "cusparse.h") if not os.path.isfile(os.path.join(cuda_home, "include", h))]
    if missing:
        _log(f"{', '.join(missing)} not in the toolkit; from torch's nvidia wheels: {' '.join(extra) or 'NONE FOUND'}")
        ext.include_dirs.extend(extra)
    return [ext]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import the helpers above
    from setuptools import setup

    setup(ext_modules=_extensions(), cmdclass=_cmdclass())
