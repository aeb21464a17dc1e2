"""The build: source layout, setup.py's CUDA toolkit discovery, the built-against versions the extension
reports, and the --device check of the command line."""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastsel
from fastsel.ops import backend as _backend
from fastsel.ops.backend import EXTENSION, ExtensionStatus, torch_mismatch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup_py():
    """setup.py's helpers (importing it does not run setup(): that is guarded by __name__ == '__main__')."""
    spec = importlib.util.spec_from_file_location("fastsel_setup_py", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FASTSEL_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "fastsel", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300, **kw)


# --- sources ---------------------------------------------------------------------------------------


def test_source_stems_unique(setup_py):
    sources = [os.path.relpath(p, ROOT) for ext in ("cpp", "cu") for p in glob.glob(str(ROOT / "csrc" / "**" / f"*.{ext}"), recursive=True)]
    assert sources
    assert setup_py.duplicate_stems(sources) == {}, "sources sharing a stem collide in the ninja build"


def test_duplicate_stems_detected(setup_py):
    dups = setup_py.duplicate_stems(["csrc/cuda/a.cpp", "csrc/cuda/a.cu", "csrc/b.cpp", "csrc/cpu/b.cpp", "csrc/c.cpp"])
    assert dups == {"a": ["csrc/cuda/a.cpp", "csrc/cuda/a.cu"], "b": ["csrc/b.cpp", "csrc/cpu/b.cpp"]}


def test_setup_globs_sources(setup_py):
    cpu = setup_py._sources(str(ROOT), cuda=False)
    cuda = setup_py._sources(str(ROOT), cuda=True)
    assert "csrc/fastsel.cpp" in cpu and not any(s.startswith("csrc/cuda/") for s in cpu)
    assert set(cpu) < set(cuda) and any(s.endswith(".cu") for s in cuda)


def test_defines_are_shell_safe(setup_py):
    assert setup_py._define("FASTSEL_CUDA_ARCHS", "8.0;9.0+PTX") == "-DFASTSEL_CUDA_ARCHS=8.0,9.0+PTX"
    assert setup_py._define("FASTSEL_TORCH_VERSION", "2.14.1+cu130") == "-DFASTSEL_TORCH_VERSION=2.14.1+cu130"
    assert setup_py._define("X", "a b'$(rm)\"") == "-DX=a,b___rm__"


# --- CUDA toolkit discovery -------------------------------------------------------------------------


def _exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _toolkit(root: Path) -> Path:
    _exe(root / "bin" / "nvcc", "#!/bin/sh\necho 'fake nvcc'\n")
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    return root


def test_find_cuda_home_fake_wrapper(setup_py, tmp_path):
    real = _toolkit(tmp_path / "opt" / "cuda-12.9")
    wrapper = _exe(tmp_path / "usr" / "bin" / "nvcc", f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    home, how = setup_py.find_cuda_home(nvcc=str(wrapper), env={}, fallbacks=[])
    assert home == str(real.resolve()) and str(wrapper) in how
    # a symlink to the real nvcc resolves without reading anything
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "nvcc"
    link.symlink_to(real / "bin" / "nvcc")
    assert setup_py.find_cuda_home(nvcc=str(link), env={}, fallbacks=[])[0] == str(real.resolve())
    # a wrapper of a wrapper
    outer = _exe(tmp_path / "outer" / "bin" / "nvcc", f'#!/bin/bash\n# outer\nexec {wrapper} "$@"\n')
    assert setup_py.find_cuda_home(nvcc=str(outer), env={}, fallbacks=[])[0] == str(real.resolve())
    # CUDA_HOME / CUDA_PATH win
    assert setup_py.find_cuda_home(nvcc=str(wrapper), env={"CUDA_PATH": "/x"}, fallbacks=[]) == ("/x", "$CUDA_PATH")


def test_find_cuda_home_dryrun_and_fallback(setup_py, tmp_path):
    real = _toolkit(tmp_path / "cuda-13.1")
    # a wrapper that names no path: nvcc --dryrun's TOP= tells
    opaque = _exe(tmp_path / "wrap" / "bin" / "nvcc", f"#!/bin/sh\necho '#$ TOP={real}/bin/..' >&2\n")
    home, how = setup_py.find_cuda_home(nvcc=str(opaque), env={}, fallbacks=[])
    assert home == str(real.resolve()) and "dryrun" in how
    # no nvcc at all: the fallbacks, first toolkit wins
    assert setup_py.find_cuda_home(nvcc="", env={}, fallbacks=[str(tmp_path / "none"), str(real)])[0] == str(real.resolve())
    assert setup_py.find_cuda_home(nvcc="", env={}, fallbacks=[])[0] is None


@pytest.mark.skipif(not shutil.which("nvcc"), reason="no nvcc on PATH")
def test_find_cuda_home_this_machine(setup_py):
    nvcc = shutil.which("nvcc")
    home, how = setup_py.find_cuda_home(nvcc=nvcc, env={})
    assert home and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")), how
    assert os.path.isfile(os.path.join(home, "bin", "nvcc"))
    naive = os.path.dirname(os.path.dirname(nvcc))  # torch's own guess
    if not os.path.isfile(os.path.join(naive, "include", "cuda_runtime.h")):  # e.g. /usr/local/bin/nvcc, a wrapper
        assert os.path.realpath(home) != os.path.realpath(naive)
        assert os.path.basename(os.path.realpath(home)).startswith("cuda"), home  # the versioned folder


def test_nvidia_wheel_includes(setup_py, tmp_path):
    sp = tmp_path / "site-packages"
    (sp / "torch").mkdir(parents=True)
    (sp / "torch" / "__init__.py").write_text("")
    for sub, header in (("cu13", "cublas_v2.h"), ("cusparse", "cusparse.h"), ("cudnn", "cudnn.h")):
        (sp / "nvidia" / sub / "include").mkdir(parents=True)
        (sp / "nvidia" / sub / "include" / header).write_text("")
    found = setup_py.nvidia_wheel_includes(str(sp / "torch" / "__init__.py"))
    ours = [d for d in found if d.startswith(str(tmp_path.resolve()))]
    assert ours == [str((sp / "nvidia" / s / "include").resolve()) for s in ("cu13", "cusparse")]


# --- built-against versions ----------------------------------------------------------------------------


def test_torch_mismatch():
    other = ExtensionStatus(True, False, "loaded", built_with_torch="1.99.0+cpu")
    msg = torch_mismatch(other)
    assert msg and "1.99.0" in msg and torch.__version__ in msg
    same = ExtensionStatus(True, False, "loaded", built_with_torch=torch.__version__)
    assert torch_mismatch(same) is None
    flavour = ExtensionStatus(True, False, "loaded", built_with_torch=torch.__version__.split("+")[0] + "+cu999")
    assert torch_mismatch(flavour) is None  # only the release is compared
    assert torch_mismatch(ExtensionStatus(False, False, "not built", built_with_torch="1.99.0")) is None
    assert torch_mismatch(ExtensionStatus(True, False, "old build")) is None  # built before the attribute existed


@pytest.mark.skipif(not EXTENSION.loaded, reason=f"fastsel._C not loaded: {EXTENSION.reason}")
def test_extension_reports_built_against():
    from fastsel import _C

    assert _C.torch_version == EXTENSION.built_with_torch == torch.__version__
    assert isinstance(_C.cuda_version, str) and isinstance(_C.cuda_archs, str)
    if not EXTENSION.cuda:
        assert _C.cuda_version == "" and _C.cuda_archs == "" and EXTENSION.built_with_cuda is None
    else:
        assert _C.cuda_version and _C.cuda_archs


@pytest.mark.skipif(not EXTENSION.loaded, reason=f"fastsel._C not loaded: {EXTENSION.reason}")
def test_info_reports_built_against():
    proc = _run("info")
    assert proc.returncode == 0, proc.stderr
    assert f"built against torch {torch.__version__}" in proc.stdout
    assert "WARNING" not in proc.stdout
    import json

    data = json.loads(_run("info", "--json").stdout)
    assert data["extension"]["built_with_torch"] == torch.__version__ and data["torch_mismatch"] is None
    for key in ("fastsel", "python", "torch", "torch_cuda", "cuda_available", "gpu", "extension", "ops"):
        assert key in data


def test_info_warns_on_mismatch(monkeypatch):
    from fastsel.cli import info as info_mod

    monkeypatch.setattr(_backend, "EXTENSION", ExtensionStatus(True, False, "loaded", built_with_torch="1.99.0+cpu"))
    data = info_mod.info()
    data["extension"]["built_with_torch"] = "1.99.0+cpu"
    text = info_mod.format_info(data)
    assert "WARNING: fastsel._C was built against torch 1.99.0+cpu" in text
    assert "built against torch 1.99.0+cpu" in text


def test_require_cuda_check():
    from fastsel.cli.info import cuda_build_problems, info

    problems = cuda_build_problems(info())
    if EXTENSION.cuda and EXTENSION.built_with_cuda:
        assert problems == []
    else:
        assert problems
    fake = {"extension": {"loaded": False, "reason": "nope"}}
    assert cuda_build_problems(fake) == ["fastsel._C not loaded: nope"]


# --- --device on a machine that lacks it -----------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
@pytest.mark.parametrize("argv", [["score", "--device", "cuda"],
                                  ["finetune", "--task", "rte", "--out", "unused", "--device", "cuda:0"]])
def test_device_unavailable_is_one_line(argv):
    proc = _run(*argv)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda"), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_device_index_past_visible(monkeypatch, capsys):
    from fastsel.cli import app as cli

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cli.check_device("cuda")
    cli.check_device("cuda:0")
    with pytest.raises(ValueError, match=r"cuda:3: only 1 CUDA device"):
        cli.check_device("cuda:3")
    assert cli.main(["score", "--device", "cuda:3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --device cuda:3: only 1 CUDA device(s) visible (cuda:0..cuda:0)"]


def test_device_cpu_only_torch_and_bad_names(monkeypatch):
    from fastsel.cli import app as cli

    cli.check_device("cpu")
    with pytest.raises(ValueError, match="is not a device"):
        cli.check_device("gpu0")
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    with pytest.raises(ValueError, match="CPU-only build"):
        cli.check_device("cuda")
    assert fastsel.__version__
