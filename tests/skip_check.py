"""CI says when tests did not run: a run with ``--strict-skips`` (``make test``, or FASTSEL_STRICT_SKIPS=1) fails
when a test, or a whole test module, is skipped for a reason that tests/expected_skips.txt does not allow.

tests/expected_skips.txt holds one rule a line, ``NODEID-GLOB | REASON-REGEX`` (``#`` starts a comment): a skip is
expected when its node id matches the glob (fnmatch) and its reason matches the regular expression (re.search).
The rules cover what a CPU-only machine with the data and the MiniLM package cannot run (a GPU, nvcc); a missing
data folder, a missing package or a missing compiled extension is not in it, so such a run fails instead of
passing with a quarter of its tests skipped.

The hooks are imported by tests/conftest.py; the matching functions are unit-tested in tests/test_skip_check.py.
"""
from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ALLOW_LIST = Path(__file__).resolve().parent / "expected_skips.txt"
OPTION = "--strict-skips"
ENV = "FASTSEL_STRICT_SKIPS"


@dataclass(frozen=True)
class Rule:
    glob: str
    reason: re.Pattern
    line: int

    def matches(self, nodeid: str, reason: str) -> bool:
        return fnmatch.fnmatchcase(nodeid, self.glob) and self.reason.search(reason) is not None


def parse_rules(text: str) -> list[Rule]:
    """The rules of an allow-list text; ValueError (with its line number) on a malformed line."""
    rules = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        glob, sep, regex = line.partition(" | ")
        if not sep or not glob.strip() or not regex.strip():
            raise ValueError(f"expected_skips line {n}: want 'NODEID-GLOB | REASON-REGEX', got {raw!r}")
        try:
            pattern = re.compile(regex.strip())
        except re.error as e:
            raise ValueError(f"expected_skips line {n}: bad regular expression {regex.strip()!r}: {e}") from None
        rules.append(Rule(glob.strip(), pattern, n))
    return rules


def load_rules(path: Path = ALLOW_LIST) -> list[Rule]:
    return parse_rules(Path(path).read_text())


def unexpected_skips(skips: list[tuple[str, str]], rules: list[Rule]) -> list[tuple[str, str]]:
    """The (nodeid, reason) pairs that no rule allows."""
    return [(nodeid, reason) for nodeid, reason in skips if not any(r.matches(nodeid, reason) for r in rules)]


def skip_reason(report) -> str:
    """The reason of a skipped test or collection report ('Skipped: ' prefix removed)."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        text = str(longrepr[2])
    else:
        text = str(longrepr)
    return text.removeprefix("Skipped: ")


# -- the pytest hooks (pytest_addoption and pytest_configure are imported into tests/conftest.py) ------------


def pytest_addoption(parser):
    group = parser.getgroup("fastsel skip check")
    group.addoption(OPTION, action="store_true", default=False,
                    help="fail the run when a test is skipped for a reason not allowed by the allow-list "
                         f"(also: {ENV}=1)")
    group.addoption("--expected-skips", default=str(ALLOW_LIST), metavar="PATH",
                    help="the allow-list of --strict-skips (default tests/expected_skips.txt)")


def pytest_configure(config):
    strict = bool(config.getoption(OPTION, default=False)) or os.environ.get(ENV, "") not in ("", "0")
    if strict and not config.pluginmanager.has_plugin("fastsel-skip-check"):
        path = Path(config.getoption("--expected-skips", default=str(ALLOW_LIST)))
        config.pluginmanager.register(SkipCheck(load_rules(path), path), "fastsel-skip-check")


class SkipCheck:
    """Records every skipped test and skipped module; fails an otherwise green run if one is not allowed."""

    def __init__(self, rules: list[Rule], path: Path) -> None:
        self.rules, self.path = rules, path
        self.skips: list[tuple[str, str]] = []

    def pytest_runtest_logreport(self, report):
        if report.skipped and not hasattr(report, "wasxfail"):  # an xfail ran; a skip did not
            self.skips.append((report.nodeid, skip_reason(report)))

    def pytest_collectreport(self, report):
        if report.skipped:  # a whole module skipped at import (pytest.importorskip, allow_module_level)
            self.skips.append((report.nodeid, skip_reason(report)))

    def unexpected(self) -> list[tuple[str, str]]:
        return unexpected_skips(self.skips, self.rules)

    def pytest_sessionfinish(self, session, exitstatus):
        if self.unexpected() and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        bad = self.unexpected()
        if not bad:
            terminalreporter.write_line(f"skip check: {len(self.skips)} skipped, all allowed by {self.path.name}")
            return
        terminalreporter.section("unexpected skips", sep="=", red=True, bold=True)
        for nodeid, reason in bad:
            terminalreporter.write_line(f"UNEXPECTED SKIP {nodeid}: {reason}")
        terminalreporter.write_line(f"{len(bad)} of {len(self.skips)} skips are not allowed by {self.path}: the run "
                                    "fails (install what they need, or allow them there with a reason)")
