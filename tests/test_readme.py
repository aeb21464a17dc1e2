"""The README's and the user docs' snippets work as written.

- ```python blocks run (with a tiny model, the test data folder and a few examples substituted);
- every ``fastsel ...`` command line of a ```bash / ```sh / ``` block parses with the CLI's own parser (a flag that
  does not exist, or a score flag without the one it needs, fails), ``make TARGET`` names a Makefile target,
  ``bash FILE`` an existing file, and ``FASTSEL_BACKEND=...`` a valid backend choice;
- every ``--flag`` the text mentions is a flag of some ``fastsel`` command (or of the few other tools named);
- ```json blocks parse, and their keys are keys of a real scores.json;
- ```text blocks (what a command prints) are the only ones not checked.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, REPO / "docs" / "scoring.md", REPO / "docs" / "building.md", REPO / "docs" / "architecture.md"]
SHELL = ("bash", "sh", "")
# flags of tools other than fastsel that the docs name
OTHER_FLAGS = {"--strict-skips", "--no-build-isolation", "--nproc-per-node", "--require-cuda", "--dry", "--steps", "--dryrun"}


def blocks(path: Path) -> list[tuple[str, str]]:
    """(language, code) of every fenced block of ``path``."""
    return re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def snippets(path: Path = README) -> list[str]:
    return [code for lang, code in blocks(path) if lang == "python"]


def prose(path: Path) -> str:
    """The text of ``path`` outside fenced blocks."""
    return re.sub(r"^```\w*\n.*?^```", "", path.read_text(), flags=re.S | re.M)


# -- python ------------------------------------------------------------------------------------------------------


def is_backend_snippet(code: str) -> bool:
    """The SquaredGradAccumulator snippet: it runs on a plain torch module (test_backend_snippet)."""
    return "SquaredGradAccumulator(" in code


def shrink(code: str, tiny_dir, data_dir) -> str:
    """``code`` on the tiny model and the test data: the model name, the data folder, fewer examples, one epoch."""
    code = code.replace('"minilm"', repr(str(tiny_dir))).replace('"../shared/data"', repr(str(data_dir)))
    code = re.sub(r"num_examples=\d+", "num_examples=16", code)
    code = re.sub(r"epochs=\d+", "epochs=1", code)
    assert '"minilm"' not in code and "../shared/data" not in code
    return code


def run_snippets(path: Path, tiny_dir, data_dir) -> dict:
    """Run the model snippets of ``path`` in order, in one namespace (as a reader would), in the current folder."""
    ns: dict = {}
    for code in snippets(path):
        if not is_backend_snippet(code):
            exec(compile(shrink(code, tiny_dir, data_dir), str(path.name), "exec"), ns)
    return ns


def test_docs_have_their_snippets():
    assert len(snippets(README)) >= 2
    assert any(is_backend_snippet(c) for c in snippets(REPO / "docs" / "scoring.md"))
    for path in DOCS:
        for lang, _ in blocks(path):
            assert lang in ("python", "json", "text", *SHELL), f"{path.name}: a ```{lang} block that no test runs"


def test_readme_snippets(tiny_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_snippets(README, tiny_dir, data_dir)
    scores, layer_map = ns["scores"], ns["layer_map"]
    assert (tmp_path / "scores.json").is_file() and len(scores.ranking) == layer_map.num_layers
    assert isinstance(scores.info["label_dependence"]["label_free"], bool)
    trainable = {n for n, p in ns["model"].named_parameters() if p.requires_grad}
    assert trainable and all(not n.startswith("bert.embeddings") for n in trainable)
    assert ns["result"].best_metrics


def test_scoring_doc_fisher_snippet(tiny_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_snippets(REPO / "docs" / "scoring.md", tiny_dir, data_dir)
    assert (tmp_path / "scores.json").is_file() and len(ns["scores"].ranking) == ns["layer_map"].num_layers
    assert set(ns["fisher"].diagonal) == {n for n, p in ns["model"].named_parameters() if p.requires_grad}


def test_backend_snippet():
    [code] = [c for path in DOCS for c in snippets(path) if is_backend_snippet(c)]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))
    loader = [(torch.randn(4, 5), torch.randint(0, 3, (4,))) for _ in range(2)]
    ns = {"model": model, "loader": loader}
    exec(compile(code, "docs/scoring.md", "exec"), ns)
    # the oracle: per-example gradients one by one
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in loader:
        for i in range(len(x)):
            logp = torch.log_softmax(model(x[i:i + 1]), -1)[0, y[i]]
            for (n, p), g in zip(model.named_parameters(), torch.autograd.grad(logp, list(model.parameters()))):
                want[n] += g**2
    for n in want:
        torch.testing.assert_close(ns["fisher"][n], want[n] / 8, rtol=1e-4, atol=1e-7)


# -- shell -------------------------------------------------------------------------------------------------------


def shell_lines(path: Path) -> list[str]:
    """The command lines of the shell blocks of ``path`` (continuations joined; comment lines left out)."""
    out = []
    for lang, code in blocks(path):
        if lang in SHELL:
            for line in code.replace("\\\n", " ").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    out.append(line.strip())
    return out


def fastsel_argv(tokens: list[str]) -> list[str] | None:
    """The arguments of ``fastsel`` in one command line: ``fastsel ARGS``, ``VAR=x fastsel ARGS``, ``python -m
    fastsel ARGS``, ``torchrun ... -m fastsel ARGS``; None when the line runs something else."""
    i = 0
    while i < len(tokens) and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[i]):
        i += 1
    if i < len(tokens) and tokens[i] == "fastsel":
        return tokens[i + 1:]
    for j in range(i, len(tokens) - 1):
        if tokens[j] == "-m" and tokens[j + 1] == "fastsel":
            return tokens[j + 2:]
    return None


def commands(path: Path) -> list[tuple[str, list[str]]]:
    """(line, tokens) of every command line of the shell blocks of ``path``."""
    return [(line, shlex.split(line, comments=True)) for line in shell_lines(path)]


def parse(argv: list[str]) -> argparse.Namespace:
    from fastsel.cli.app import build_parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"`fastsel {' '.join(argv)}` does not parse: {err.getvalue().strip()}")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_shell_commands(path, monkeypatch):
    from fastsel.cli.app import check_score_flags
    from fastsel.ops.backend import env_problem

    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M))
    seen = 0
    for line, tokens in commands(path):
        argv = fastsel_argv(tokens)
        if argv is not None:
            seen += 1
            args = parse(argv)
            if args.command == "score":
                try:
                    check_score_flags(args)
                except ValueError as exc:
                    pytest.fail(f"{path.name}: `{line}` is refused: {exc}")
            for tok in tokens[:tokens.index("fastsel") if "fastsel" in tokens else 0]:
                if tok.startswith("FASTSEL_BACKEND="):
                    monkeypatch.setenv("FASTSEL_BACKEND", tok.split("=", 1)[1])
                    assert env_problem() is None, f"{path.name}: `{line}`: {env_problem()}"
        elif tokens[0] == "make":
            for target in (t for t in tokens[1:] if "=" not in t):
                assert target in targets, f"{path.name}: `{line}`: no Makefile target {target!r}"
        elif tokens[0] == "bash":
            assert (REPO / tokens[1]).is_file(), f"{path.name}: `{line}`: no file {tokens[1]}"
    minimum = {"README.md": 4, "scoring.md": 10, "building.md": 2, "architecture.md": 0}[path.name]
    assert seen >= minimum, f"{path.name}: {seen} fastsel command lines found, expected at least {minimum}"


def all_flags() -> set[str]:
    from fastsel.cli.app import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {flag for p in sub.choices.values() for a in p._actions for flag in a.option_strings}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_flags_mentioned_exist(path):
    known = all_flags() | OTHER_FLAGS
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", prose(path)))
    for lang, code in blocks(path):
        if lang in SHELL:
            mentioned |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", code))
    assert not mentioned - known, f"{path.name} mentions flags that no command has: {sorted(mentioned - known)}"


# -- json --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_scores(tiny_dir, data_dir, tmp_path_factory) -> dict:
    from fastsel import ScoreConfig, score

    out = tmp_path_factory.mktemp("scores") / "scores.json"
    score(ScoreConfig(metric="fisher", model=str(tiny_dir), task="sst2", data_dir=str(data_dir), num_examples=16),
          out=out, progress=False)
    return json.loads(out.read_text())


def keys_exist(example, real, where: str = "") -> None:
    if isinstance(example, dict):
        assert isinstance(real, dict), f"{where}: an object in the docs, {type(real).__name__} in scores.json"
        for key, value in example.items():
            assert key in real, f"{where}.{key}: not in a real scores.json (keys there: {sorted(real)})"
            keys_exist(value, real[key], f"{where}.{key}")
    elif isinstance(example, list) and example and isinstance(example[0], dict):
        keys_exist(example[0], real[0], f"{where}[0]")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_json_blocks_are_scores_json(path, real_scores):
    for lang, code in blocks(path):
        if lang == "json":
            keys_exist(json.loads(code), real_scores)
