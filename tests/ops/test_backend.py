"""Backend choice (fastsel.ops.backend): FASTSEL_BACKEND, the measured table, caching, build information; fastsel info."""
from __future__ import annotations

import json

import pytest
import torch

from fastsel import ops
from fastsel.ops import backend, linear


@pytest.fixture
def fresh_choice(monkeypatch):
    """Clear the cached decisions before and after a test that changes the environment or the table."""
    for fn in (backend._default_linear, backend._table_choice, backend._table):
        fn.cache_clear()
    yield monkeypatch
    for fn in (backend._default_linear, backend._table_choice, backend._table):
        fn.cache_clear()


def test_env_selects_a_backend_per_op(fresh_choice):
    fresh_choice.setenv(backend.BACKEND_ENV, "accumulate_norm_sq_grad=reference,accumulate_linear_sq_grad=bmm")
    assert backend.env_backend("accumulate_linear_sq_grad") == "bmm"
    assert backend.env_backend("accumulate_norm_sq_grad") == "reference"
    assert backend.env_backend("accumulate_embedding_sq_grad") is None
    assert backend.choose_linear_backend(torch.device("cpu"), torch.float32, 2, 3, 4, 5) == "bmm"


def test_env_bare_name_and_bad_name(fresh_choice):
    fresh_choice.setenv(backend.BACKEND_ENV, "bmm")
    assert backend.choose_linear_backend(torch.device("cpu"), torch.float32, 2, 3, 4, 5) == "bmm"
    fresh_choice.setenv(backend.BACKEND_ENV, "accumulate_linear_sq_grad=fast")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        ops.accumulate_linear_sq_grad(torch.zeros(4, 5), torch.randn(2, 3, 4), torch.randn(2, 3, 5))


def test_bmm_is_used_when_asked(fresh_choice):
    calls = []
    fresh_choice.setattr(linear, "accumulate_linear_sq_grad_bmm", lambda *a, **k: calls.append(a))
    ops.accumulate_linear_sq_grad(torch.zeros(4, 5), torch.randn(2, 3, 4), torch.randn(2, 3, 5), backend="bmm")
    assert len(calls) == 1


def test_default_on_cpu_is_the_compiled_kernel():
    expected = "kernel" if backend.EXTENSION.loaded else "reference"
    assert backend.choose_linear_backend(torch.device("cpu"), torch.bfloat16, 32, 128, 768, 768) == expected


def test_available_backends_on_cpu():
    names = backend.linear_backends_available("cpu")
    assert names[:2] == ("reference", "bmm")
    assert "pipelined" not in names and "wmma" not in names


def test_shape_classes():
    assert backend.linear_shape_class(32, 128, 768, 768) == ("T<=256", "B<=32", "OI<=1M")
    assert backend.linear_shape_class(8, 1, 4096, 1024) == ("T1", "B<=8", "OI>1M")
    assert backend.linear_shape_class(128, 512, 768, 3072) == ("T>256", "B>32", "OI>1M")


def test_table_rules_first_match_wins(fresh_choice, tmp_path):
    table = {
        "default": "wmma",
        "rules": [
            {"when": {"capability": "9.0", "dtype": ["bf16"], "T": "T<=256"}, "backend": "pipelined", "why": "x"},
            {"when": {"capability": "*", "dtype": ["fp32"]}, "backend": "bmm"},
        ],
    }
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    fresh_choice.setattr(backend, "BACKEND_TABLE_PATH", path)
    assert backend._table_choice("9.0", "bf16", ("T<=256", "B<=32", "OI<=1M"))[0] == "pipelined"
    assert backend._table_choice("9.0", "bf16", ("T>256", "B<=32", "OI<=1M"))[0] == "wmma"
    assert backend._table_choice("8.0", "fp32", ("T>256", "B<=32", "OI<=1M"))[0] == "bmm"
    assert backend._table_choice("8.0", "bf16", ("T<=256", "B<=32", "OI<=1M"))[0] == "wmma"


def test_committed_table_is_valid():
    table = json.loads(backend.BACKEND_TABLE_PATH.read_text())
    assert table["default"] in backend.LINEAR_BACKENDS
    for rule in table.get("rules", []):
        assert rule["backend"] in backend.LINEAR_BACKENDS, rule
        assert set(rule["when"]) <= {"capability", "dtype", "T", "B", "OI"}, rule


def test_torch_mismatch_warns_only_on_another_release():
    same = backend.ExtensionStatus(True, False, "x", built_with_torch=torch.__version__)
    other = backend.ExtensionStatus(True, False, "x", built_with_torch="1.0.0+cpu")
    assert backend.torch_mismatch(same) is None
    assert "rebuild" in backend.torch_mismatch(other)
    assert backend.torch_mismatch(backend.ExtensionStatus(False, False, "x")) is None


def test_cached_choices_follow_the_extension_status(monkeypatch):
    """Decisions are cached, but keyed on the extension's status: forcing the reference path still works."""
    device = torch.device("cpu")
    before = backend.choose_linear_backend(device, torch.float32, 2, 3, 4, 5)
    monkeypatch.setattr(backend, "EXTENSION", backend.ExtensionStatus(False, False, "forced in a test"))
    assert backend.op_backend("accumulate_norm_sq_grad", device) == ("reference", "forced in a test")
    assert backend.choose_linear_backend(device, torch.float32, 2, 3, 4, 5) == "reference"
    monkeypatch.undo()
    assert backend.choose_linear_backend(device, torch.float32, 2, 3, 4, 5) == before


def test_table_ships_with_the_package():
    """Package data: a non-editable install (make cuda-build) must find the measured table too."""
    from pathlib import Path

    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert backend.BACKEND_TABLE_PATH.name in pyproject["tool"]["setuptools"]["package-data"]["fastsel.ops"]


def test_info_reports_a_backend_for_every_op():
    from fastsel.cli.info import format_info, info

    data = info()
    assert set(data["ops"]) == set(ops.OPS)
    for op, per_dev in data["ops"].items():
        assert per_dev["cpu"]["backend"] == ("cpu" if backend.EXTENSION.loaded else "reference")
    assert "extension fastsel._C" in format_info(data)


def test_reference_backend_can_be_forced(monkeypatch):
    monkeypatch.setattr(backend, "EXTENSION", backend.ExtensionStatus(False, False, "forced in a test"))
    assert backend.op_backend("accumulate_linear_sq_grad", "cpu") == ("reference", "forced in a test")
