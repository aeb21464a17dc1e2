"""Fuzzing the readers and the command line (issue 15) with hypothesis, bounded in time.

Contract: every input either succeeds with finite, schema-valid output, or fails with ValueError/OSError
(which ``fastsel.cli.app`` prints as one ``error:`` line with a non-zero exit code) -- never another
exception, never a traceback, never the CLI's "internal error" safety net.

Deterministic by default (``derandomize``); ``FASTSEL_FUZZ_SCALE=10`` tries ten times as many inputs and
``FASTSEL_FUZZ_RANDOM=1`` draws fresh ones. The counts (inputs tried, distinct error messages) are printed at
the end of the module and written to ``$FASTSEL_FUZZ_REPORT`` when set.
"""
from __future__ import annotations

import collections
import csv
import io
import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastsel.data.readers import load_custom_examples, load_examples  # noqa: E402
from tests.cli_helpers import run_cli

REPO = Path(__file__).resolve().parents[2]
SCALE = float(os.environ.get("FASTSEL_FUZZ_SCALE", "1"))
STATS: dict = {"inputs": 0, "failures": 0, "errors": collections.Counter(), "by_test": collections.Counter(),
               "ok_by_test": collections.Counter(), "started": collections.Counter(), "valid": collections.Counter(),
               "valid_ok": collections.Counter()}
# The fuzz tests' labels in STATS, and how many of their inputs must at least succeed in a run: the reader tests
# generate inputs known to be valid (clean files), every one of which must be read (asserted input by input);
# the command-line tests mix valid and invalid options, and at least one of their inputs must run through.
# (5 of the 100-150 reader inputs at the default scale: a default run generates about 30 valid GLUE files, 20
# SuperGLUE, 15-17 custom; the bound is loose so that fresh draws, FASTSEL_FUZZ_RANDOM=1, do not fail it by chance)
_AT_LEAST = max(1, min(5, int(5 * SCALE)))
MIN_VALID = {"glue": _AT_LEAST, "superglue": _AT_LEAST, "custom": _AT_LEAST, "cli-files": 2}  # cli: its @examples
MIN_OK = {"glue": _AT_LEAST, "superglue": _AT_LEAST, "custom": _AT_LEAST, "cli-files": 1, "cli-options": 1,
          "cli-plan": 1, "cli-finetune": 1, "subprocess": 0}
RAN: dict[str, str] = {}  # pytest test name -> its STATS label, for the tests that ran in this session
_UNIQUE = itertools.count()


def _settings(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None,
                    derandomize=not os.environ.get("FASTSEL_FUZZ_RANDOM"),
                    suppress_health_check=list(HealthCheck))


def _template(msg: str) -> str:
    """An error message without its particulars (paths, numbers, quoted values): distinct *kinds* of error."""
    msg = re.sub(r"(/[^\s:'\",;()]+)+", "<path>", msg)
    msg = re.sub(r"'[^']*'|\"[^\"]*\"", "<v>", msg)
    msg = re.sub(r"\[[^\]]*\]", "[..]", msg)
    msg = re.sub(r"0x[0-9a-f]+", "0xH", msg)
    msg = re.sub(r"\d+", "N", msg)
    return msg[:160]


def _begin(test: str, valid: bool = False) -> None:
    """At the start of every generated case: counts the cases the test body really ran (and the valid ones)."""
    STATS["started"][test] += 1
    STATS["valid"][test] += bool(valid)


def _record(test: str, error: str | None, valid: bool = False) -> None:
    """The outcome of one case; a valid input (a well-formed file the reader must accept) must have succeeded."""
    assert error is None or not valid, f"a valid {test} input was rejected: {error}"
    STATS["inputs"] += 1
    STATS["by_test"][test] += 1
    if error is None:
        STATS["ok_by_test"][test] += 1
        STATS["valid_ok"][test] += bool(valid)
    else:
        STATS["failures"] += 1
        STATS["errors"][_template(error)] += 1


def _summary() -> str:
    n_err = len(STATS["errors"])
    return (f"fuzz: {STATS['inputs']} inputs tried ({dict(STATS['by_test'])}), {STATS['inputs'] - STATS['failures']} "
            f"succeeded ({dict(STATS['ok_by_test'])}; valid inputs {dict(STATS['valid'])}, all read), "
            f"{STATS['failures']} one-line errors of {n_err} distinct kinds")


@pytest.fixture(autouse=True)
def _which(request):
    """Records which fuzz test ran (its STATS label is the one its cases recorded under)."""
    before = collections.Counter(STATS["started"])
    yield
    labels = [k for k in STATS["started"] if STATS["started"][k] != before[k]]
    if labels:
        RAN[request.node.name] = labels[0]


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    report = os.environ.get("FASTSEL_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps({"inputs": STATS["inputs"], "failures": STATS["failures"],
                                            "distinct_errors": len(STATS["errors"]), "by_test": dict(STATS["by_test"]),
                                            "ok_by_test": dict(STATS["ok_by_test"]),
                                            "errors": dict(STATS["errors"].most_common())}, indent=2))


# --------------------------------------------------------------------------------------------------
# Strategies: fields, rows, files, encodings, damage
# --------------------------------------------------------------------------------------------------

def mostly(good, bad, p_good: int = 8):
    """``good`` about p_good times in 10, else ``bad``: most inputs reach the happy path, the rest break it."""
    return st.integers(0, 9).flatmap(lambda i: good if i < p_good else bad)


WORDS = st.text(alphabet="abcdefghij klmnop.,!?'", min_size=1, max_size=30)
NASTY = ['"', '""', '\t', '\\', '\r', '\n', '\r\n', '\x00', 'a"b', '"a\tb"', "\ufeff", "é", "\u2028", " ", "",
         "nan", "inf", "-1", "1e400", "0x1", "True", "null", "[]", "{}"]
FIELD = mostly(WORDS, st.one_of(st.text(max_size=24), st.sampled_from(NASTY), st.integers(-3, 5).map(str),
                                st.floats(allow_nan=True, allow_infinity=True).map(repr)), 7)
JSONV = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6)
ENCODING = mostly(st.sampled_from(["utf-8", "utf-8-sig"]), st.sampled_from(["latin-1", "utf-16", "cp1252"]), 8)


@st.composite
def damaged(draw, text: str) -> bytes:
    """``text`` encoded one of several ways, then perhaps cut, spliced with random bytes or given a huge line."""
    data = text.encode(draw(ENCODING), errors="replace")
    action = draw(mostly(st.just("none"), st.sampled_from(["cut", "splice", "huge", "empty", "random"]), 6))
    if action == "cut" and data:
        data = data[: draw(st.integers(0, len(data)))]
    elif action == "splice":
        pos = draw(st.integers(0, len(data)))
        data = data[:pos] + draw(st.binary(min_size=1, max_size=8)) + data[pos:]
    elif action == "huge":
        data = data + b"\n" + b"x" * draw(st.sampled_from([1000, 200_000])) + b"\t0\n"
    elif action == "empty":
        data = b""
    elif action == "random":
        data = draw(st.binary(max_size=200))
    return data


LABEL_COLUMNS = ("label", "gold_label", "Quality", "score", "y")  # the columns that get labels, not words


@st.composite
def table_file(draw, columns: list[str], labels, sep: str = "\t", header: bool = True, good_labels=None) -> tuple[bytes, bool]:
    """(a TSV/CSV file, clean); about half of them clean (every field plain words, valid labels, no damage)."""
    cols = list(columns)
    if good_labels is not None and draw(st.booleans()):
        rows = [_join([draw(good_labels) if c in LABEL_COLUMNS else draw(WORDS) for c in cols],
                      sep, True) for _ in range(draw(st.integers(4, 10)))]
        return ("\n".join(([_join(cols, sep, True)] if header else []) + rows) + "\n").encode(), True
    mutate = draw(mostly(st.just("ok"), st.sampled_from(["drop", "extra", "shuffle", "rename"]), 7))
    if mutate == "drop" and cols:
        cols.pop(draw(st.integers(0, len(cols) - 1)))
    elif mutate == "extra":
        cols.append(draw(st.sampled_from(["extra", "label", "", "idx"])))
    elif mutate == "shuffle":
        cols = draw(st.permutations(cols))
    elif mutate == "rename" and cols:
        cols[draw(st.integers(0, len(cols) - 1))] = draw(st.text(max_size=6))
    n = draw(mostly(st.integers(4, 12), st.integers(0, 3), 8))
    rows = []
    for _ in range(n):
        row = [draw(labels) if c in LABEL_COLUMNS else draw(FIELD) for c in cols]
        if draw(st.integers(0, 39)) == 0:  # missing or extra fields
            row = row[: draw(st.integers(0, len(row)))] if draw(st.booleans()) else row + [draw(FIELD)]
        rows.append(_join(row, sep, draw(st.integers(0, 9)) > 0))
    eol = draw(mostly(st.just("\n"), st.sampled_from(["\r\n", "\r"]), 6))
    lines = ([_join(cols, sep, True)] if header else []) + rows
    return draw(damaged(eol.join(lines) + (eol if draw(st.booleans()) else ""))), False


def _join(row: list[str], sep: str, quote: bool) -> str:
    """A CSV row quoted as csv.writer would (quote=True), or naively joined (stray quotes and separators)."""
    if sep != "," or not quote:
        return sep.join(row)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(row)
    return buf.getvalue()


def _write(base: Path, rel: str, data: bytes) -> Path:
    path = base / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _check_examples(ex) -> None:
    """A successful read: aligned, strings, labels of the task's kind, finite."""
    assert len(ex) > 0 and len(ex.text_a) == len(ex.labels)
    assert all(isinstance(t, str) for t in ex.text_a)
    if ex.text_b is not None:
        assert len(ex.text_b) == len(ex.labels) and all(isinstance(t, str) for t in ex.text_b)
    for y in ex.labels:
        if ex.task.is_regression:
            assert isinstance(y, float) and (math.isfinite(y) or ex.split.startswith("test"))
        else:
            assert isinstance(y, int) and (0 <= y < ex.task.num_labels or (y == -1 and ex.split.startswith("test")))


def _contract(test: str, read, valid: bool = False) -> None:
    _begin(test, valid)
    try:
        ex = read()
    except (ValueError, OSError) as exc:  # the CLI prints these as one `error:` line, exit code 2
        msg = str(exc)
        assert msg.strip(), f"empty error message from {type(exc).__name__}"
        _record(test, msg, valid)
        return
    _check_examples(ex)
    _record(test, None, valid)


# --------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------

GLUE = {  # task -> (folder, columns of the TSV, label strategy)
    "sst2": ("SST-2", ["sentence", "label"], st.sampled_from(["0", "1"])),
    "mrpc": ("MRPC", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], st.sampled_from(["0", "1"])),
    "stsb": ("STS-B", ["index", "genre", "sentence1", "sentence2", "score"], st.floats(0, 5).map(str)),
    "mnli": ("MNLI", ["index", "sentence1", "sentence2", "gold_label"],
             st.sampled_from(["entailment", "neutral", "contradiction"])),
}


@_settings(100)
@given(task=st.sampled_from(sorted(GLUE) + ["cola"]), split=st.sampled_from(["train", "validation", "test"]),
       data=st.data())
def test_fuzz_glue_tsv(tmp_path_factory, task, split, data):
    base = tmp_path_factory.mktemp("glue")
    if task == "cola":  # no header: source, label, orig_label, sentence
        good = st.sampled_from(["0", "1"])
        folder, (blob, clean) = "CoLA", data.draw(table_file(["source", "label", "orig", "sentence"],
                                                              mostly(good, FIELD, 9), header=False, good_labels=good))
    else:
        folder, cols, labels = GLUE[task]
        renamed = task == "mnli" and data.draw(st.booleans())
        if renamed:  # not MNLI's layout: its label column is gold_label (required except in the test split)
            cols = [c if c != "gold_label" else "label" for c in cols]
        blob, clean = data.draw(table_file(cols, mostly(labels, FIELD, 9), good_labels=labels))
        clean = clean and not (renamed and split != "test")
    names = {"train": "train.tsv", "validation": "dev_matched.tsv" if task == "mnli" else "dev.tsv",
             "test": "test_matched.tsv" if task == "mnli" else "test.tsv"}
    _write(base, f"glue/{folder}/{names[split]}", blob)
    _contract("glue", lambda: load_examples(task, base, split), valid=clean)


def _sg_record(task: str, clean: bool = False):
    good = (st.booleans() if task in ("boolq", "wic", "wsc", "multirc") else
            st.sampled_from({"cb": ["entailment", "contradiction", "neutral"],
                             "sg-rte": ["entailment", "not_entailment"]}.get(task, [0, 1])))
    if clean:
        text, label, mostly_ = WORDS, good, (lambda g, b, p=8: g)
    else:
        text = mostly(WORDS, st.one_of(st.text(max_size=20), JSONV), 9)
        label = mostly(good, st.one_of(st.sampled_from(["entailment", "0", "1", "true"]), st.integers(-2, 3), JSONV), 8)
        mostly_ = mostly
    fields = {"boolq": ["question", "passage"], "cb": ["premise", "hypothesis"], "sg-rte": ["premise", "hypothesis"],
              "copa": ["premise", "choice1", "choice2", "question"], "wic": ["word", "sentence1", "sentence2"],
              "wsc": ["text", "target"]}.get(task, [])
    req = {f: text for f in fields}
    if task == "copa":
        req["question"] = mostly_(st.sampled_from(["cause", "effect"]), JSONV, 9)
    if task == "wsc":
        req["target"] = mostly_(st.fixed_dictionaries({"span1_text": text, "span2_text": text}), JSONV, 9)
    if task == "multirc":
        answer = st.fixed_dictionaries({"text": text, "label": label})
        question = st.fixed_dictionaries({"question": text, "answers": mostly_(st.lists(answer, min_size=1, max_size=2), JSONV, 9)})
        req["passage"] = mostly_(st.fixed_dictionaries({"text": text, "questions": mostly_(
            st.lists(question, min_size=1, max_size=2), JSONV, 9)}), JSONV, 9)
    req["label"] = label
    good = st.fixed_dictionaries(req, optional={"idx": JSONV})
    bad = st.fixed_dictionaries({}, optional={**req, "idx": JSONV})
    return good if clean else mostly(good, bad, 8)


@_settings(100)
@given(task=st.sampled_from(["boolq", "cb", "copa", "wic", "wsc", "multirc", "sg-rte"]),
       split=st.sampled_from(["train", "validation", "test"]), data=st.data())
def test_fuzz_superglue_jsonl(tmp_path_factory, task, split, data):
    base = tmp_path_factory.mktemp("sg")
    clean = data.draw(st.booleans())
    if clean:
        records = data.draw(st.lists(_sg_record(task, clean=True), min_size=2, max_size=5))
    else:
        records = data.draw(st.lists(mostly(_sg_record(task), JSONV, 9), max_size=6))
    keep = [data.draw(st.integers(0, 29)) > 0 for _ in records]  # about 1 line in 30 replaced by a random field
    lines = [json.dumps(r) if k else data.draw(FIELD) for r, k in zip(records, keep)]
    blob = "\n".join(lines) + "\n"
    damage = data.draw(st.booleans())
    blob = data.draw(damaged(blob)) if damage else blob.encode()
    clean = clean and all(keep) and not damage
    folder = {"boolq": "BoolQ", "cb": "CB", "copa": "COPA", "wic": "WiC", "wsc": "WSC", "multirc": "MultiRC",
              "sg-rte": "RTE"}[task]
    name = {"train": "train.jsonl", "validation": "val.jsonl", "test": "test.jsonl"}[split]
    _write(base, f"superglue/{folder}/{name}", blob)
    _contract("superglue", lambda: load_examples(task, base, split), valid=clean)


@st.composite
def custom_file(draw) -> tuple[str, bytes, list[str], bool, bool]:
    """(extension, file bytes, text fields, regression, clean): clean files (a known extension and fields, rows of
    plain words and valid labels, nothing damaged) must be read."""
    ext = draw(mostly(st.sampled_from([".csv", ".tsv", ".jsonl", ".json"]), st.sampled_from([".txt", ".CSV", ""]), 9))
    regression = draw(st.integers(0, 3)) == 0
    fields = draw(mostly(st.sampled_from([["text"], ["a", "b"]]), st.sampled_from([["text", "missing"], ["a", "b", "c"], []]), 8))
    good = st.floats(-2, 2).map(str) if regression else st.sampled_from(["pos", "neg", "0", "1", "2"])
    label = mostly(good, st.one_of(st.floats(-2, 2).map(str), FIELD), 8)
    if ext in (".csv", ".tsv"):
        cols = [f for f in fields if f != "missing"] + ["y"]
        sep = "," if ext == ".csv" else "\t"
        blob, clean = draw(table_file(cols, label, sep=sep, good_labels=good))
        if clean:  # the labels (last column) of a clean table
            ys = [r[-1] for r in csv.reader(io.StringIO(blob.decode()), delimiter=sep)][1:]
    else:
        value = mostly(WORDS, st.one_of(st.text(max_size=12), JSONV), 8)
        jlabel = mostly(st.floats(-2, 2) if regression else st.sampled_from(["pos", "neg", 0, 1, True]), JSONV, 8)
        row = mostly(st.fixed_dictionaries({"text": value, "a": value, "b": value, "y": jlabel}),
                     st.fixed_dictionaries({}, optional={"text": value, "a": value, "b": value, "y": jlabel}), 8)
        clean = draw(st.booleans())
        if clean:
            value, jlabel = WORDS, (st.floats(-2, 2) if regression else st.sampled_from(["pos", "neg", 0, 1]))
            row = st.fixed_dictionaries({"text": value, "a": value, "b": value, "y": jlabel})
        many = draw(st.integers(0, 4)) > 0
        rows = draw(st.lists(row, min_size=4, max_size=12) if many else st.lists(row, max_size=3))
        clean = clean and many
        ys = [str(r["y"]) for r in rows] if clean else []
        if ext == ".json":
            whole = draw(st.integers(0, 4)) > 0
            text = json.dumps(rows) if whole else "[" + draw(st.text(max_size=20))
            clean = clean and whole
        else:
            keep = [draw(st.integers(0, 29)) > 0 for _ in rows]  # about 1 line in 30 replaced by a random field
            text = "\n".join(json.dumps(r) if k else draw(FIELD) for r, k in zip(rows, keep))
            clean = clean and all(keep)
        damage = draw(st.booleans())
        blob = draw(damaged(text)) if damage else text.encode()
        clean = clean and not damage
    clean = clean and ext in (".csv", ".tsv", ".jsonl", ".json") and fields in (["text"], ["a", "b"])
    clean = clean and (regression or len(set(ys)) >= 2)  # a classification file needs two classes
    return ext, blob, fields, regression, clean


@_settings(150)
@given(spec=custom_file(), balanced=st.booleans(), num=st.one_of(st.none(), st.integers(1, 8)))
def test_fuzz_custom_files(tmp_path_factory, spec, balanced, num):
    ext, blob, fields, regression, clean = spec
    path = _write(tmp_path_factory.mktemp("custom"), f"data{ext}", blob)
    _contract("custom", lambda: load_custom_examples(path, fields, "y", regression=regression, num_examples=num,
                                                     seed=0, balanced=balanced),
              # balanced sampling needs a number of examples and classes
              valid=clean and not (balanced and (num is None or regression)))


# --------------------------------------------------------------------------------------------------
# The command line, in process
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _offline():
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({k: "1" for k in old})
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


_run_cli = run_cli  # (tests/cli_helpers.py)


def _check_scores_file(path: Path) -> None:
    d = json.loads(path.read_text())
    for key in ("metric", "model", "task", "split", "num_examples", "layers", "ranking", "extra"):
        assert key in d, key
    L = len(d["layers"])
    assert [x["layer"] for x in d["layers"]] == list(range(L)) and sorted(d["ranking"]) == list(range(L))
    for x in d["layers"]:
        assert isinstance(x["score"], (int, float)) and math.isfinite(x["score"]), x
        if "trace" in x and x["trace"] is not None:
            assert math.isfinite(x["trace"]), x


def _cli_contract(test: str, argv: list[str], outs: list[Path], valid: bool = False) -> None:
    _begin(test, valid)
    rc, out, err = _run_cli(argv)
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert "Traceback" not in err, err
    if rc == 0:
        assert not errors, err
        written = [p for p in outs if p.exists()]
        assert written, f"exit code 0 but none of {outs} written"
        for p in written:
            _check_scores_file(p)
        _record(test, None, valid)
    else:
        assert len(errors) == 1, f"rc={rc}, stderr: {err[-2000:]}"
        assert "internal error" not in errors[0], errors[0]
        for p in outs:  # nothing written on failure
            assert not p.exists(), p
        _record(test, errors[0][len("error:"):].strip(), valid)


@_settings(16)
@given(spec=custom_file(), metric=st.sampled_from(["fisher", "variability", "fisher,variability"]),
       extra=st.lists(st.sampled_from([["--regression"], ["--balanced", "--num-examples", "4"], ["--no-bucket"],
                                       ["--max-tokens", "40"], ["--max-length", "3"]]), max_size=2),
       clean=st.one_of(st.none(), st.sampled_from([["pos", "neg"], [0, 1, 2], [0.5, 1.5, -1.0], ["x", 2, True]])))
@example(spec=(".jsonl", b"", ["text"], False, False), metric="fisher,variability", extra=[], clean=["pos", "neg"])
@example(spec=(".jsonl", b"", ["text"], False, False), metric="fisher", extra=[["--no-bucket"]], clean=[0, 1, 2])
def test_fuzz_cli_on_fuzzed_files(tmp_path_factory, tiny_dir, spec, metric, extra, clean):
    ext, blob, fields, _, _ = spec
    if clean is not None:  # a well-formed file of a few classes, so that the pass itself runs
        ext, fields = ".jsonl", ["text"]
        blob = "\n".join(json.dumps({"text": t, "y": clean[i % len(clean)]}) for i, t in enumerate(
            ["a good film", "bad", "the plot is thin but the cast is fine", "", "!!!", "ok ok ok", "é ü ß",
             "a very long sentence " * 8, "fine", "dull and slow"])).encode()
    base = tmp_path_factory.mktemp("cli")
    path = _write(base, f"d{next(_UNIQUE)}{ext}", blob)
    out = base / "s.json"
    argv = ["score", "--model", tiny_dir, "--task", "custom", "--data-file", str(path),
            "--text-fields", ",".join(fields), "--label-field", "y", "--metric", metric, "--batch-size", "3",
            "--max-length", "16", "--no-progress", "--out", str(out), *itertools.chain(*extra)]
    outs = [out] if "," not in metric else [base / f"s.{m}.json" for m in metric.split(",")]
    # valid: the well-formed file of two or three string/integer classes, and no option that contradicts it:
    # --regression on class names, or 4 balanced examples of 3 classes (1 in some class) for the variability ratio
    too_few = ["--balanced", "--num-examples", "4"] in extra and len(clean or []) == 3 and "variability" in metric
    valid = clean in (["pos", "neg"], [0, 1, 2]) and ["--regression"] not in extra and not too_few
    _cli_contract("cli-files", argv, outs, valid=valid)


OPTIONS = {
    "--metric": ["fisher", "variability", "fisher,variability", "cca", "numrank", "probe", "nope", "fisher,fisher", ""],
    "--task": ["sst2", "rte", "stsb", "boolq", "copa", "cola", "nosuch", "custom"],
    "--split": ["train", "validation", "test", "dev", "bogus"],
    "--num-examples": ["0", "1", "2", "6", "20", "-3", "x"],
    "--batch-size": ["0", "-1", "1", "4", "1000", "2.5"],
    "--max-length": ["0", "1", "2", "8", "100000"],
    "--max-tokens": ["0", "1", "30", "-5"],
    "--fisher": ["empirical", "sampled", "exact", "bogus"],
    "--pooling": ["mean", "cls", "max"],
    "--variant": ["xie", "papyan", "z"],
    "--autocast": ["none", "bf16", "fp16", "fp8"],
    "--checkpoint-every": ["0", "1", "5"],
    "--prefetch": ["-1", "0", "3"],
    "--seed": ["-1", "0", "7", str(2**70)],
    "--device": ["cpu", "cuda", "cuda:3", "tpu", "cpu:0", "meta", "nonsense"],
    "--text-fields": ["", "sentence", "a,b,c", ",,"],
    "--label-field": ["label", "nope", ""],
}
FLAGS = ["--balanced", "--no-bucket", "--regression", "--resume", "--probe"]


@_settings(30)
@given(opts=st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.none(), max_size=4).flatmap(
           lambda d: st.fixed_dictionaries({k: st.sampled_from(OPTIONS[k]) for k in d})),
       flags=st.lists(st.sampled_from(FLAGS), unique=True, max_size=2),
       checkpoint=st.booleans(), num=st.sampled_from(["1", "4", "12"]))
def test_fuzz_cli_options(tmp_path_factory, tiny_dir, data_dir, opts, flags, checkpoint, num):
    base = tmp_path_factory.mktemp("opts")
    out = base / "s.json"
    opts = {"--num-examples": num, **opts}  # never the whole training split
    if opts["--num-examples"] not in ("0", "1", "2", "6", "-3", "x", "4", "12"):
        opts["--num-examples"] = "12"
    argv = ["score", "--model", tiny_dir, "--data-dir", str(data_dir), "--no-progress", "--out", str(out),
            *itertools.chain(*opts.items()), *flags]
    if opts.get("--task") == "custom":
        argv += ["--data-file", str(data_dir / "glue" / "SST-2" / "dev.tsv")]
    if checkpoint:
        argv += ["--checkpoint", str(base / "ckpt")]
    metric = opts.get("--metric", "fisher")
    outs = [out] + ([base / f"s.{m}.json" for m in metric.split(",")] if "," in metric else [])
    _cli_contract("cli-options", argv, outs)


PLAN_OPTIONS = {
    "--strategy": ["fisher-top-2", "top-1", "full", "bitfit", "lora", "nosuch", "", "stratified-0-1-2", "fisher-top-99"],
    "--tuner": ["full", "lora", "adapter", "bogus"],
    "--lora-r": ["0", "-1", "8", "x"],
    "--adapter-size": ["0", "16", "-2"],
    "--task": ["sst2", "stsb", "nosuch"],
    "--num-labels": ["0", "1", "3", "-1"],
}


@_settings(40)
@given(opts=st.dictionaries(st.sampled_from(sorted(PLAN_OPTIONS)), st.none(), max_size=3).flatmap(
    lambda d: st.fixed_dictionaries({"--strategy": st.sampled_from(PLAN_OPTIONS["--strategy"]),
                                     **{k: st.sampled_from(PLAN_OPTIONS[k]) for k in d}})),
       scores=st.sampled_from([None, "good", "garbage", "missing"]), peft=st.booleans())
def test_fuzz_cli_plan(tmp_path_factory, tiny_dir, opts, scores, peft):
    base = tmp_path_factory.mktemp("plan")
    argv = ["plan", "--model", tiny_dir, *itertools.chain(*opts.items()), *(["--peft"] if peft else [])]
    if scores == "good":
        layers = [{"layer": l, "name": f"layer.{l}", "score": float(l)} for l in range(3)]
        (base / "s.json").write_text(json.dumps({"metric": "fisher", "layers": layers}))
    elif scores == "garbage":
        (base / "s.json").write_bytes(b"\xff{not json")
    if scores is not None:
        argv += ["--scores", str(base / "s.json")]
    _begin("cli-plan")
    rc, out, err = _run_cli(argv + ["--out", str(base / "plan.json")])
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert "Traceback" not in err
    if rc == 0:
        assert not errors and json.loads((base / "plan.json").read_text())
        _record("cli-plan", None)
    else:
        assert len(errors) == 1 and "internal error" not in errors[0], err
        _record("cli-plan", errors[0][len("error:"):].strip())


# --------------------------------------------------------------------------------------------------
# Two real processes: the exit code and stderr a shell sees
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["bad-bytes", "bad-option"])
def test_subprocess_errors_are_one_line(tmp_path, tiny_dir, case):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
    f = tmp_path / "d.csv"
    f.write_bytes(b"text,y\n\xff\xfe\x00bad,1\n\"unterminated,0\n")
    if case == "bad-bytes":
        argv = ["score", "--model", tiny_dir, "--task", "custom", "--data-file", str(f), "--text-fields", "text",
                "--label-field", "y", "--no-progress"]
    else:
        argv = ["score", "--batch-size", "many"]
    _begin("subprocess")
    p = subprocess.run([sys.executable, "-m", "fastsel", *argv], env=env, capture_output=True, text=True, timeout=300)
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
    _record("subprocess", errors[0][len("error:"):].strip())


FINETUNE_OPTIONS = {
    "--strategy": ["top-1", "full", "bitfit", "nosuch", "fisher-top-1", "lora-i"],
    "--epochs": ["0", "1", "-2"],
    "--lr": ["0", "-1", "1e-3", "nan"],
    "--batch-size": ["0", "4", "x"],
    "--warmup-ratio": ["0.5", "1.5", "-0.1"],
    "--cache-prefix": ["auto", "on", "off"],
    "--task": ["rte", "stsb", "nosuch", "copa"],
    "--checkpoint-every": ["-1", "0", "1"],
    "--rank-epochs": ["", "x", "1"],
    "--seed": ["0", "-5", str(2**70)],
    "--max-length": ["1", "16", "9999"],
}


@_settings(12)
@given(opts=st.dictionaries(st.sampled_from(sorted(FINETUNE_OPTIONS)), st.none(), max_size=3).flatmap(
    lambda d: st.fixed_dictionaries({k: st.sampled_from(FINETUNE_OPTIONS[k]) for k in d})),
       resume=st.booleans(), plan=st.sampled_from([None, "garbage"]))
def test_fuzz_cli_finetune(tmp_path_factory, tiny_dir, data_dir, opts, resume, plan):
    base = tmp_path_factory.mktemp("ft")
    opts = {"--strategy": "top-1", "--task": "rte", "--epochs": "1", "--max-length": "16", **opts}
    if plan is not None:
        opts.pop("--strategy")
        (base / "plan.json").write_bytes(b'{"strategy": 3, "layers": "x"}')
        opts["--plan"] = str(base / "plan.json")
    argv = ["finetune", "--model", tiny_dir, "--data-dir", str(data_dir), "--train-examples", "8", "--eval-examples", "4",
            "--no-progress", "--out", str(base / "run"), *itertools.chain(*opts.items()), *(["--resume"] if resume else [])]
    _begin("cli-finetune")
    rc, out, err = _run_cli(argv)
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert "Traceback" not in err, err
    if rc == 0:
        assert not errors, err
        r = json.loads((base / "run" / "results.json").read_text())
        assert r["history"] and all(math.isfinite(h["train_loss"]) for h in r["history"])
        _record("cli-finetune", None)
    else:
        assert len(errors) == 1 and "internal error" not in errors[0], err[-3000:]
        assert not (base / "run" / "results.json").exists()
        _record("cli-finetune", errors[0][len("error:"):].strip())


def test_zz_fuzz_counts(capsys):
    """Last in the module: for every fuzz test that ran in this session, each case its body started recorded one
    outcome, it ran cases at all, every valid input it generated was read (and there were enough of them), and enough
    inputs succeeded; the session's totals are the sums of the tests' counts."""
    if not RAN:
        pytest.skip("no fuzz test of this module ran in this session (deselected)")
    labels = sorted(set(RAN.values()))
    for label in labels:
        started, recorded = STATS["started"][label], STATS["by_test"][label]
        assert started == recorded > 0, f"{label}: {started} cases started, {recorded} outcomes recorded"
        assert STATS["valid_ok"][label] == STATS["valid"][label], label  # every valid input read
        assert STATS["valid"][label] >= MIN_VALID.get(label, 0), (label, STATS["valid"][label])
        assert STATS["ok_by_test"][label] >= MIN_OK[label], (label, STATS["ok_by_test"][label])
    assert set(STATS["by_test"]) == set(labels)
    assert STATS["inputs"] == sum(STATS["by_test"].values()) > 0
    assert STATS["failures"] == STATS["inputs"] - sum(STATS["ok_by_test"].values()) == sum(STATS["errors"].values())
    with capsys.disabled():
        print("\n" + _summary())
