"""Task registry, example loading, tokenization and batching for GLUE, SuperGLUE and custom data.

Every task is cast as single-sentence or sentence-pair classification (or regression for STS-B):
an :class:`Examples` holds ``text_a``, optional ``text_b`` and integer (float for regression) labels.

Data sources
------------
``load_examples(task, data_dir, split)`` reads local files. ``data_dir`` may be

1. a folder holding ``glue/`` and ``superglue/`` (e.g. ``shared/data``; ``GLUE``/``super_glue``/
   ``SuperGLUE`` spellings are accepted too),
2. a GLUE_DIR holding GLUE's own task folders (``CoLA``, ``SST-2``, ``MRPC``, ``STS-B``, ``QQP``,
   ``MNLI``, ``QNLI``, ``RTE``, ``WNLI``),
3. a SuperGLUE folder holding ``BoolQ``, ``CB``, ``COPA``, ``MultiRC``, ``RTE``, ``WiC``, ``WSC``,
4. (convenience) the task folder itself.

Folder names are matched case- and punctuation-insensitively (``sst2`` finds ``SST-2``).
With ``data_dir=None`` the split is fetched from the Hugging Face hub with ``datasets.load_dataset``
(``nyu-mll/glue`` / ``aps/super_glue``); that needs network access.

Split files: GLUE ``train.tsv`` / ``dev.tsv`` / ``test.tsv`` (MNLI: ``dev_matched.tsv`` and
``test_matched.tsv``; ``split="validation_mismatched"`` reads ``dev_mismatched.tsv``). SuperGLUE
``train.jsonl`` (preferred) or ``fewglue32_train.jsonl`` / ``val.jsonl`` / ``test.jsonl``.
Split aliases: ``dev``, ``val``, ``valid`` mean ``validation``. For ``split="test"`` files without
labels give label ``-1`` (``nan`` for STS-B), as ``datasets`` does; other splits require labels.

GLUE TSVs are read with ``csv.QUOTE_NONE`` (they contain unescaped quotes) and ``utf-8-sig``
(MRPC starts with a BOM). CoLA train/dev have no header (source, label, original mark, sentence).

Label orders follow the ``datasets`` glue / super_glue configs
-------------------------------------------------------------
=========  ==========================================  =======================================
task       inputs (text_a, text_b)                     labels
=========  ==========================================  =======================================
cola       sentence, -                                 unacceptable=0, acceptable=1
sst2       sentence, -                                 negative=0, positive=1
mrpc       #1 String, #2 String                        not_equivalent=0, equivalent=1
stsb       sentence1, sentence2                        float score 0..5 (regression)
qqp        question1, question2                        not_duplicate=0, duplicate=1
mnli       sentence1 (premise), sentence2 (hypothesis) entailment=0, neutral=1, contradiction=2
qnli       question, sentence                          entailment=0, not_entailment=1
rte        sentence1, sentence2                        entailment=0, not_entailment=1
wnli       sentence1, sentence2                        not_entailment=0, entailment=1
boolq      question, passage                           False=0, True=1
cb         premise, hypothesis                         entailment=0, contradiction=1, neutral=2
copa       premise + cue, "choice1 or choice2"         0 = choice1, 1 = choice2
wic        "word: sentence1", sentence2                False=0, True=1
wsc        text, "span2_text refers to span1_text"     False=0, True=1
multirc    passage, question + " " + answer            False=0, True=1 (one example per answer)
sg-rte     premise, hypothesis                         entailment=0, not_entailment=1
=========  ==========================================  =======================================

COPA: the cue is " What was the cause?" for ``question == "cause"`` and " What happened as a
result?" for ``"effect"``; the label is the index of the correct choice.
WiC: the target word is put in front of the first sentence (``f"{word}: {sentence1}"``) so that
truncation never drops it. WSC: span2 is the pronoun, span1 the candidate referent
(``f"{span2_text} refers to {span1_text}"``). MultiRC: one example per (paragraph, question,
answer option); its official metrics (F1 over all answer options ``f1a`` and per-question exact
match ``em``) are simplified to ``("f1", "accuracy")`` -- ``f1`` over all answer options equals
``f1a``; ``em`` would need question grouping, which :class:`Examples` does not carry.
CB's official metric also includes macro-F1; the registry lists only ``accuracy`` for it.
SuperGLUE RTE is registered as ``sg-rte`` (GLUE RTE is ``rte``).
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

__all__ = [
    "TaskSpec",
    "TASKS",
    "get_task",
    "Examples",
    "load_examples",
    "load_custom_examples",
    "examples_for",
    "DataSource",
    "canonical_split",
    "resolve_file",
    "tokenize_examples",
    "make_dataloader",
    "FEATURE_KEYS",
]

# the per-token features of a tokenised example (and of a batch, beside labels and index)
FEATURE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask")

# GLUE rows can be long (MultiRC/QNLI passages); the csv default limit is 128 KiB.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


# ----------------------------------------------------------------------------------------------
# Task registry
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """Static description of a task."""

    name: str
    benchmark: str  # "glue" | "superglue" | "custom"
    num_labels: int  # 1 for regression
    label_names: tuple[str, ...]  # () for regression
    metrics: tuple[str, ...]

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1 and not self.label_names


_ACC = ("accuracy",)
_BOOL = ("False", "True")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("cola", "glue", 2, ("unacceptable", "acceptable"), ("mcc",)),
        TaskSpec("sst2", "glue", 2, ("negative", "positive"), _ACC),
        TaskSpec("mrpc", "glue", 2, ("not_equivalent", "equivalent"), ("f1", "accuracy")),
        TaskSpec("stsb", "glue", 1, (), ("pearson", "spearman")),
        TaskSpec("qqp", "glue", 2, ("not_duplicate", "duplicate"), ("f1", "accuracy")),
        TaskSpec("mnli", "glue", 3, ("entailment", "neutral", "contradiction"), _ACC),
        TaskSpec("qnli", "glue", 2, _NLI2, _ACC),
        TaskSpec("rte", "glue", 2, _NLI2, _ACC),
        TaskSpec("wnli", "glue", 2, ("not_entailment", "entailment"), _ACC),
        TaskSpec("boolq", "superglue", 2, _BOOL, _ACC),
        TaskSpec("cb", "superglue", 3, ("entailment", "contradiction", "neutral"), _ACC),
        TaskSpec("copa", "superglue", 2, ("choice1", "choice2"), _ACC),
        TaskSpec("wic", "superglue", 2, _BOOL, _ACC),
        TaskSpec("wsc", "superglue", 2, _BOOL, _ACC),
        TaskSpec("multirc", "superglue", 2, _BOOL, ("f1", "accuracy")),
        TaskSpec("sg-rte", "superglue", 2, _NLI2, _ACC),
    ]
}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


_ALIASES = {_norm(k): k for k in TASKS}
_ALIASES.update(
    {
        "supergluerte": "sg-rte",
        "sgluerte": "sg-rte",
        "wscfixed": "wsc",
        "stsbenchmark": "stsb",
    }
)


def get_task(name: str | TaskSpec) -> TaskSpec:
    """Look a task up by name, ignoring case and punctuation ("SST-2", "sst_2", "STS-B")."""
    if isinstance(name, TaskSpec):
        return name
    key = _ALIASES.get(_norm(name))
    if key is None:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]


# ----------------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------------


@dataclass
class Examples:
    """The raw examples of one split."""

    task: TaskSpec
    split: str
    text_a: list[str]
    text_b: list[str] | None  # None for single-sentence tasks
    labels: list[int] | list[float]

    def __post_init__(self) -> None:
        n = len(self.text_a)
        if len(self.labels) != n or (self.text_b is not None and len(self.text_b) != n):
            raise ValueError(
                f"Examples: text_a ({n}), text_b ({None if self.text_b is None else len(self.text_b)})"
                f" and labels ({len(self.labels)}) must have the same length"
            )

    def __len__(self) -> int:
        return len(self.text_a)

    def subset(self, indices: Sequence[int]) -> "Examples":
        idx = [int(i) for i in indices]
        return Examples(
            task=self.task,
            split=self.split,
            text_a=[self.text_a[i] for i in idx],
            text_b=None if self.text_b is None else [self.text_b[i] for i in idx],
            labels=[self.labels[i] for i in idx],
        )


# ----------------------------------------------------------------------------------------------
# Label parsing
# ----------------------------------------------------------------------------------------------


def _parse_label(value: Any, spec: TaskSpec, where: str) -> int | float:
    if spec.is_regression:
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: label {value!r} is not a number (task {spec.name} is regression)") from None
        if not math.isfinite(out):
            raise ValueError(f"{where}: label {value!r} is not a finite number (task {spec.name} is regression)")
        return out
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, np.integer)):
        idx = int(value)
    else:
        s = str(value).strip()
        if s in spec.label_names:
            return spec.label_names.index(s)
        low = {n.lower(): i for i, n in enumerate(spec.label_names)}
        if s.lower() in low:
            return low[s.lower()]
        if s.lstrip("-").isdigit():
            idx = int(s)
        else:
            raise ValueError(
                f"{where}: unknown label {value!r} for task {spec.name}; expected one of "
                f"{list(spec.label_names)} or 0..{spec.num_labels - 1}"
            )
    if not 0 <= idx < spec.num_labels:
        raise ValueError(f"{where}: label {idx} out of range 0..{spec.num_labels - 1} for task {spec.name}")
    return idx


def _missing_label(spec: TaskSpec) -> int | float:
    return math.nan if spec.is_regression else -1


# ----------------------------------------------------------------------------------------------
# Per-task file formats
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GlueFormat:
    folder: str
    text_cols: tuple[str, ...]  # column names in GLUE's TSV
    label_col: str
    hf_text_cols: tuple[str, ...]  # column names in the datasets glue config
    files: dict  # split -> file name
    no_header_cols: tuple[str, ...] | None = None  # CoLA train/dev


_STD_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
_GLUE: dict[str, _GlueFormat] = {
    "cola": _GlueFormat("CoLA", ("sentence",), "label", ("sentence",), _STD_FILES,
                        ("source", "label", "orig_label", "sentence")),
    "sst2": _GlueFormat("SST-2", ("sentence",), "label", ("sentence",), _STD_FILES),
    "mrpc": _GlueFormat("MRPC", ("#1 String", "#2 String"), "Quality", ("sentence1", "sentence2"), _STD_FILES),
    "stsb": _GlueFormat("STS-B", ("sentence1", "sentence2"), "score", ("sentence1", "sentence2"), _STD_FILES),
    "qqp": _GlueFormat("QQP", ("question1", "question2"), "is_duplicate", ("question1", "question2"), _STD_FILES),
    "mnli": _GlueFormat("MNLI", ("sentence1", "sentence2"), "gold_label", ("premise", "hypothesis"),
                        {"train": "train.tsv", "validation": "dev_matched.tsv", "test": "test_matched.tsv",
                         "validation_mismatched": "dev_mismatched.tsv", "test_mismatched": "test_mismatched.tsv"}),
    "qnli": _GlueFormat("QNLI", ("question", "sentence"), "label", ("question", "sentence"), _STD_FILES),
    "rte": _GlueFormat("RTE", ("sentence1", "sentence2"), "label", ("sentence1", "sentence2"), _STD_FILES),
    "wnli": _GlueFormat("WNLI", ("sentence1", "sentence2"), "label", ("sentence1", "sentence2"), _STD_FILES),
}

_SG_FOLDERS = {"boolq": "BoolQ", "cb": "CB", "copa": "COPA", "wic": "WiC", "wsc": "WSC",
               "multirc": "MultiRC", "sg-rte": "RTE"}
_SG_FILES = {"train": ("train.jsonl", "fewglue32_train.jsonl"), "validation": ("val.jsonl",),
             "test": ("test.jsonl",)}
_HF_SG_CONFIG = {"boolq": "boolq", "cb": "cb", "copa": "copa", "wic": "wic", "wsc": "wsc.fixed",
                 "multirc": "multirc", "sg-rte": "rte"}

_SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                  "val": "validation", "dev": "validation", "validationmatched": "validation",
                  "devmatched": "validation", "test": "test", "testmatched": "test",
                  "validationmismatched": "validation_mismatched", "devmismatched": "validation_mismatched",
                  "testmismatched": "test_mismatched"}


def canonical_split(split: str) -> str:
    s = _SPLIT_ALIASES.get(_norm(split))
    if s is None:
        raise ValueError(f"unknown split {split!r}; use 'train', 'validation' or 'test'")
    return s


def _get(row: dict, key: str, where: str) -> Any:
    if key not in row or row[key] is None:
        raise ValueError(f"{where}: missing field {key!r} (fields found: {sorted(row)})")
    return row[key]


# SuperGLUE row -> list of (text_a, text_b, raw label or None). Work on both the original JSONL
# records and the flattened rows of the datasets super_glue configs.
def _sg_rows(name: str, row: dict, where: str) -> list[tuple[str, str, Any]]:
    lab = row.get("label")
    if name == "boolq":
        return [(_get(row, "question", where), _get(row, "passage", where), lab)]
    if name in ("cb", "sg-rte"):
        return [(_get(row, "premise", where), _get(row, "hypothesis", where), lab)]
    if name == "copa":
        q = _get(row, "question", where)
        if q not in ("cause", "effect"):
            raise ValueError(f"{where}: COPA question must be 'cause' or 'effect', got {q!r}")
        cue = " What was the cause?" if q == "cause" else " What happened as a result?"
        return [(_get(row, "premise", where) + cue,
                 f"{_get(row, 'choice1', where)} or {_get(row, 'choice2', where)}", lab)]
    if name == "wic":
        return [(f"{_get(row, 'word', where)}: {_get(row, 'sentence1', where)}", _get(row, "sentence2", where), lab)]
    if name == "wsc":
        tgt = row.get("target", row)
        return [(_get(row, "text", where),
                 f"{_get(tgt, 'span2_text', where)} refers to {_get(tgt, 'span1_text', where)}", lab)]
    if name == "multirc":
        if "paragraph" in row:  # datasets' flattened form
            return [(row["paragraph"], f"{_get(row, 'question', where)} {_get(row, 'answer', where)}", lab)]
        passage = _get(row, "passage", where)
        if not isinstance(passage, dict):
            raise ValueError(f"{where}: MultiRC 'passage' must be an object with 'text' and 'questions'")
        text = _get(passage, "text", where)
        out = []
        for q in _get(passage, "questions", where):
            for a in _get(q, "answers", where):
                out.append((text, f"{_get(q, 'question', where)} {_get(a, 'text', where)}", a.get("label")))
        return out
    raise AssertionError(name)


# ----------------------------------------------------------------------------------------------
# File resolution
# ----------------------------------------------------------------------------------------------


def _child_dir(parent: Path, name: str) -> Path | None:
    """``parent/name`` matched exactly, else case/punctuation-insensitively."""
    p = parent / name
    if p.is_dir():
        return p
    if not parent.is_dir():
        return None
    want = _norm(name)
    for c in sorted(parent.iterdir()):
        if c.is_dir() and _norm(c.name) == want:
            return c
    return None


def resolve_file(spec: TaskSpec, data_dir: Path, split: str) -> Path:
    if spec.benchmark == "glue":
        fmt = _GLUE[spec.name]
        folder, bench_dirs = fmt.folder, ("glue", "glue_data")
        if split not in fmt.files:
            raise ValueError(f"split {split!r} does not exist for {spec.name}; splits: {list(fmt.files)}")
        names: tuple[str, ...] = (fmt.files[split],)
        layout = f"<data_dir>/glue/{folder}/{names[0]} or <GLUE_DIR>/{folder}/{names[0]}"
    else:
        folder, bench_dirs = _SG_FOLDERS[spec.name], ("superglue", "super_glue")
        if split not in _SG_FILES:
            raise ValueError(f"split {split!r} does not exist for {spec.name}; splits: {list(_SG_FILES)}")
        names = _SG_FILES[split]
        layout = (f"<data_dir>/superglue/{folder}/{' or '.join(names)} or "
                  f"<SUPERGLUE_DIR>/{folder}/{' or '.join(names)}")

    if data_dir.exists() and not data_dir.is_dir():
        raise NotADirectoryError(f"fastsel: --data-dir {data_dir} is a file; give the folder holding glue/ and superglue/ "
                                 f"(expected layout: {layout})")
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"data directory {str(data_dir)!r} does not exist (task {spec.name}, split {split}); "
            f"expected layout: {layout}"
        )
    candidates: list[Path] = []
    for b in bench_dirs:
        bd = _child_dir(data_dir, b)
        if bd is not None:
            td = _child_dir(bd, folder)
            candidates.append(td if td is not None else bd / folder)
    td = _child_dir(data_dir, folder)
    candidates.append(td if td is not None else data_dir / folder)
    if _norm(data_dir.name) == _norm(folder):
        candidates.append(data_dir)
    tried = []
    for d in candidates:
        for n in names:
            f = d / n
            tried.append(str(f))
            if f.is_file():
                return f
    raise FileNotFoundError(
        f"no {split} file for task {spec.name}; tried: {', '.join(dict.fromkeys(tried))}. "
        f"Expected layout: {layout}"
    )


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------


def _read_glue_tsv(spec: TaskSpec, path: Path, split: str) -> tuple[list[str], list[str] | None, list]:
    fmt = _GLUE[spec.name]
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        first = next(reader, None)
        if first is None:
            raise ValueError(f"{path}: empty file, no examples for task {spec.name} split {split}")
        if fmt.no_header_cols is not None and first and first[0] != "index" and fmt.text_cols[0] not in first:
            header = list(fmt.no_header_cols)
            rows_iter: Any = _chain_first(first, reader)
        else:
            header = first
            rows_iter = reader
        col = {h.strip(): i for i, h in enumerate(header)}
        missing = [c for c in fmt.text_cols if c not in col]
        if missing:
            raise ValueError(f"{path}: missing text column(s) {missing}; columns found: {header}")
        ti = [col[c] for c in fmt.text_cols]
        li = col.get(fmt.label_col)
        if li is None and not split.startswith("test"):
            raise ValueError(f"{path}: missing label column {fmt.label_col!r}; columns found: {header}")
        need = max(ti + ([li] if li is not None else [])) + 1
        a: list[str] = []
        b: list[str] | None = [] if len(ti) == 2 else None
        labels: list = []
        for row in rows_iter:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) < need:
                raise ValueError(
                    f"{path}:{reader.line_num}: malformed row, expected at least {need} tab-separated fields "
                    f"({header}), got {len(row)}: {row!r}"
                )
            a.append(row[ti[0]])
            if b is not None:
                b.append(row[ti[1]])
            labels.append(_missing_label(spec) if li is None else
                          _parse_label(row[li], spec, f"{path}:{reader.line_num}"))
    return a, b, labels


_FIELD_LIMIT = 64 * 2**20  # characters per CSV/TSV field (csv's default, 128 KiB, is too small for long documents)


@contextlib.contextmanager
def _reading(path: Path, what: str = "") -> Any:
    """Turn what a malformed file makes the readers raise into one clear ValueError naming the file."""
    if csv.field_size_limit() < _FIELD_LIMIT:
        csv.field_size_limit(_FIELD_LIMIT)
    try:
        yield
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                         "save the file as UTF-8") from None
    except csv.Error as e:
        raise ValueError(f"{path}: malformed {what or 'CSV/TSV'} file ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
    except (TypeError, AttributeError, KeyError) as e:
        raise ValueError(f"{path}: malformed {what or 'record'} ({type(e).__name__}: {e}); "
                         "check the fields and their types") from None


def _chain_first(first, reader):
    yield first
    yield from reader


def _iter_jsonl(path: Path):
    with open(path, encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def _convert_sg(spec: TaskSpec, rows, split: str, src: str) -> tuple[list[str], list[str], list]:
    a: list[str] = []
    b: list[str] = []
    labels: list = []
    for where, row in rows:
        for ta, tb, lab in _sg_rows(spec.name, row, f"{src}:{where}"):
            if lab is None or (not isinstance(lab, str) and lab == -1 and split.startswith("test")):
                if not split.startswith("test"):
                    raise ValueError(f"{src}:{where}: missing label field 'label' (fields found: {sorted(row)})")
                labels.append(_missing_label(spec))
            else:
                labels.append(_parse_label(lab, spec, f"{src}:{where}"))
            a.append(str(ta))
            b.append(str(tb))
    return a, b, labels


def _load_hub(spec: TaskSpec, split: str) -> tuple[list[str], list[str] | None, list]:
    if spec.benchmark == "glue":
        repo, config = "nyu-mll/glue", spec.name
        hf_split = {"validation": "validation_matched", "test": "test_matched"}.get(split, split) \
            if spec.name == "mnli" else split
    else:
        repo, config, hf_split = "aps/super_glue", _HF_SG_CONFIG[spec.name], split
    try:
        import datasets

        ds = datasets.load_dataset(repo, config, split=hf_split)
    except Exception as e:  # noqa: BLE001 - offline, missing repo, ...
        raise RuntimeError(
            f"could not load {spec.name} ({repo}, config {config!r}, split {hf_split!r}) from the Hugging Face hub: "
            f"{type(e).__name__}: {e}. Pass a local data directory instead (data_dir= / --data-dir) holding "
            f"glue/<TASK>/*.tsv and superglue/<TASK>/*.jsonl."
        ) from e
    if spec.benchmark == "glue":
        cols = _GLUE[spec.name].hf_text_cols
        a = [str(x) for x in ds[cols[0]]]
        b = [str(x) for x in ds[cols[1]]] if len(cols) == 2 else None
        raw = ds["label"]
        labels = [(_missing_label(spec) if (not spec.is_regression and int(v) == -1) or
                   (spec.is_regression and split.startswith("test") and v == -1)
                   else _parse_label(v, spec, f"{repo}/{config}[{i}]")) for i, v in enumerate(raw)]
        return a, b, labels
    return _convert_sg(spec, ((i, dict(r)) for i, r in enumerate(ds)), split, f"{repo}/{config}")


# ----------------------------------------------------------------------------------------------
# Subsampling
# ----------------------------------------------------------------------------------------------


def _balanced_quota(counts: dict[int, int], k: int) -> dict[int, int]:
    """Split ``k`` over classes as equally as possible, capped by each class's size (water filling)."""
    quota = {c: 0 for c in counts}
    remaining = min(k, sum(counts.values()))
    active = sorted(c for c in counts if counts[c] > 0)
    while remaining > 0 and active:
        share = remaining // len(active)
        if share == 0:
            for c in active[:remaining]:
                quota[c] += 1
            break
        for c in active:
            add = min(share, counts[c] - quota[c])
            quota[c] += add
            remaining -= add
        active = [c for c in active if quota[c] < counts[c]]
    return quota


def _subsample(ex: Examples, num_examples: int | None, seed: int, balanced: bool) -> Examples:
    if num_examples is None:
        if balanced:
            raise ValueError("balanced=True needs num_examples")
        return ex
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    n = len(ex)
    rng = np.random.default_rng(seed)
    if balanced:
        if ex.task.is_regression:
            raise ValueError(f"balanced subsampling needs a classification task; {ex.task.name} is regression")
        labels = np.asarray(ex.labels, dtype=np.int64)
        classes = sorted(set(labels.tolist()))
        counts = {c: int((labels == c).sum()) for c in classes}
        quota = _balanced_quota(counts, num_examples)
        chosen: list[int] = []
        for c in classes:
            idx = np.flatnonzero(labels == c)
            chosen.extend(rng.choice(idx, size=quota[c], replace=False).tolist())
        return ex.subset(sorted(chosen))
    if num_examples >= n:
        return ex
    return ex.subset(np.sort(rng.choice(n, size=num_examples, replace=False)).tolist())


# ----------------------------------------------------------------------------------------------
# Public loaders
# ----------------------------------------------------------------------------------------------


def load_examples(
    task: str | TaskSpec,
    data_dir: str | Path | None = None,
    split: str = "train",
    *,
    num_examples: int | None = None,
    seed: int = 0,
    balanced: bool = False,
) -> Examples:
    """Load one split of a GLUE/SuperGLUE task (see the module docstring for layouts and formats).

    ``num_examples`` draws a seeded random subset without replacement (``numpy.random.default_rng(seed)``),
    kept in file order; ``balanced=True`` draws as equally as possible per class. Asking for more examples
    than exist returns all of them.
    """
    spec = get_task(task)
    if spec.benchmark not in ("glue", "superglue"):
        raise ValueError(f"task {spec.name} is a custom task; use load_custom_examples")
    split = canonical_split(split)
    if data_dir is None:
        a, b, labels = _load_hub(spec, split)
        src = f"the Hugging Face hub ({spec.name}, {split})"
    else:
        path = resolve_file(spec, Path(data_dir).expanduser(), split)
        if spec.benchmark == "glue":
            with _reading(path, f"GLUE {spec.name} TSV"):
                a, b, labels = _read_glue_tsv(spec, path, split)
        else:
            with _reading(path, f"SuperGLUE {spec.name} record"):
                a, b, labels = _convert_sg(spec, _iter_jsonl(path), split, str(path))
        src = str(path)
    if not a:
        raise ValueError(f"no examples in {src} (task {spec.name}, split {split})")
    ex = Examples(task=spec, split=split, text_a=a, text_b=b, labels=labels)
    return _subsample(ex, num_examples, seed, balanced)


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    ext = "".join(path.suffixes[-1:]).lower()
    if ext in (".csv", ".tsv"):
        with open(path, encoding="utf-8-sig", newline="") as fh:
            if ext == ".csv":
                reader = csv.DictReader(fh)
            else:
                reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            fields = list(reader.fieldnames or [])
            rows = []
            for row in reader:
                if None in row:  # more fields than the header
                    raise ValueError(f"{path}:{reader.line_num}: malformed row, more fields than the header {fields}")
                if all(v is None or v == "" for v in row.values()):
                    continue
                rows.append((reader.line_num, row))
        return fields, rows
    if ext in (".jsonl", ".ndjson", ".json"):
        text = path.read_text(encoding="utf-8-sig")
        if ext == ".json" and text.lstrip().startswith("["):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
            if not all(isinstance(r, dict) for r in data):
                raise ValueError(f"{path}: expected a JSON list of objects")
            rows = list(enumerate(data, 1))
        else:
            rows = list(_iter_jsonl(path))
        fields = list(dict.fromkeys(k for _, r in rows for k in r))
        return fields, rows
    raise ValueError(f"{path}: unsupported file type {ext!r}; use .csv, .tsv, .jsonl (or .json)")


def load_custom_examples(
    path: str | Path,
    text_fields: Sequence[str],
    label_field: str,
    *,
    task_name: str = "custom",
    regression: bool = False,
    num_examples: int | None = None,
    seed: int = 0,
    balanced: bool = False,
    label_names: Sequence[str] | None = None,
) -> Examples:
    """Load a CSV / TSV / JSONL file (by extension) with one or two text columns and a label column.

    CSV uses standard quoting; TSV is read GLUE-style without quote processing (``csv.QUOTE_NONE``).
    Classification labels (strings or integers) are mapped to 0..C-1 in sorted order (numeric order when
    all labels are integers); the returned task is a ``TaskSpec(benchmark="custom")`` whose ``label_names``
    are the original values as strings. ``regression=True`` parses float labels.

    ``label_names`` (classification only; the ``label_names`` of the training file's task) maps the file's
    labels onto those names instead of deriving the classes from the file -- an integer label is matched as
    the str of the int, a named one as its stripped string -- and the returned task has exactly those
    ``label_names``, so a validation file holding a subset of the classes keeps the training file's class
    indices. A label not among them is a ValueError naming the file, the row and the label.
    """
    if label_names is not None:
        if regression:
            raise ValueError("fastsel: label_names is for classification; with regression=True it must be None")
        if isinstance(label_names, str):
            raise ValueError(f"fastsel: label_names must be a sequence of class names, got the string {label_names!r}")
        label_names = tuple(str(n) for n in label_names)
        if len(label_names) < 2 or len(set(label_names)) != len(label_names):
            raise ValueError(f"fastsel: label_names must be at least 2 distinct class names, got {list(label_names)}")
    path = Path(path).expanduser()
    if isinstance(text_fields, str):
        text_fields = [text_fields]
    text_fields = list(text_fields)
    if len(text_fields) not in (1, 2):
        raise ValueError(f"text_fields must name 1 or 2 columns, got {text_fields}")
    if not path.is_file():
        raise FileNotFoundError(f"custom data file {str(path)!r} does not exist")
    with _reading(path):
        fields, rows = _read_table(path)
    missing = [c for c in [*text_fields, label_field] if c not in fields]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; columns found: {fields}")
    if not rows:
        raise ValueError(f"{path}: no examples")
    a: list[str] = []
    b: list[str] | None = [] if len(text_fields) == 2 else None
    raw: list = []
    for where, row in rows:
        loc = f"{path}:{where}"
        vals = [_get(row, c, loc) for c in text_fields]
        a.append(str(vals[0]))
        if b is not None:
            b.append(str(vals[1]))
        lab = _get(row, label_field, loc)
        if isinstance(lab, str) and not lab.strip():
            raise ValueError(f"{loc}: empty label in column {label_field!r}")
        raw.append(lab)
    if regression:
        spec = TaskSpec(task_name, "custom", 1, (), ("pearson", "spearman"))
        labels: list = [_parse_label(v, spec, f"{path}:{w}") for v, (w, _) in zip(raw, rows)]
    elif label_names is not None:
        index = {n: i for i, n in enumerate(label_names)}
        labels = [_known_label(v, index, f"{path}:{w}") for v, (w, _) in zip(raw, rows)]
        spec = TaskSpec(task_name, "custom", len(label_names), label_names, ("accuracy",))
    else:
        keys = [v.strip() if isinstance(v, str) else v for v in raw]
        numbers = [_as_float(v) for v in keys]
        fractional = next((k for k, x in zip(keys, numbers) if x is not None and not x.is_integer()), None)
        if fractional is not None and all(x is not None for x in numbers):
            # real-valued labels (e.g. 3.75) would each become a class of their own
            raise ValueError(f"fastsel: {path}: label column {label_field!r} holds real numbers (e.g. {fractional!r}), "
                             f"which would make {len(set(numbers))} classes: pass --regression (regression=True) for a "
                             "real-valued label, or use integer or named class labels")
        as_int = [_as_int(v) for v in keys]
        if all(v is not None for v in as_int):
            uniq = sorted(set(as_int))
            index = {v: i for i, v in enumerate(uniq)}
            labels = [index[v] for v in as_int]
        else:
            strs = [str(v) for v in keys]
            uniq = sorted(set(strs))
            index = {v: i for i, v in enumerate(uniq)}
            labels = [index[v] for v in strs]
        if len(uniq) < 2:
            raise ValueError(f"{path}: label column {label_field!r} has a single class {uniq}; need at least 2")
        spec = TaskSpec(task_name, "custom", len(uniq), tuple(str(u) for u in uniq), ("accuracy",))
    ex = Examples(task=spec, split="custom", text_a=a, text_b=b, labels=labels)
    return _subsample(ex, num_examples, seed, balanced)


def _known_label(value: Any, index: dict[str, int], where: str) -> int:
    """The class index of ``value`` among the training file's label names (its stripped string, else the str of
    its int, as load_custom_examples names the classes)."""
    key = value.strip() if isinstance(value, str) else value
    if str(key) in index:
        return index[str(key)]
    as_int = _as_int(key)
    if as_int is not None and str(as_int) in index:
        return index[str(as_int)]
    raise ValueError(f"fastsel: {where}: label {key!r} is not one of the training file's labels {list(index)}")


def _as_float(v: Any) -> float | None:
    """A finite label's number (a float, an int, or a string that reads as one), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating, str)):
        return None
    try:
        x = float(v)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"[+-]?\d+", v):
        return int(v)
    return None


# ----------------------------------------------------------------------------------------------
# Tokenization and batching
# ----------------------------------------------------------------------------------------------


def tokenize_examples(examples: Examples, tokenizer, max_length: int = 128) -> list[dict[str, list[int]]]:
    """Tokenize (pairs as pairs) with truncation; return one feature dict per example.

    Each dict holds ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the tokenizer returns
    them), ``special_tokens_mask`` (from the tokenizer, 1 at special tokens) and ``labels``
    (int, or float for regression).
    """
    if len(examples) == 0:
        return []
    kwargs = dict(truncation=True, max_length=max_length, return_special_tokens_mask=True)
    if examples.text_b is None:
        enc = tokenizer(list(examples.text_a), **kwargs)
    else:
        enc = tokenizer(list(examples.text_a), list(examples.text_b), **kwargs)
    keys = [k for k in FEATURE_KEYS if k in enc]
    if "special_tokens_mask" not in enc:
        raise ValueError("tokenizer did not return special_tokens_mask")
    conv: Callable = float if examples.task.is_regression else int
    cols = [enc[k] for k in keys]
    return [
        {**{k: list(c[i]) for k, c in zip(keys, cols)}, "labels": conv(examples.labels[i])}
        for i in range(len(examples))
    ]


class PadCollator:
    """Pad a list of feature dicts to the longest sequence in the batch.

    ``input_ids`` are padded with ``tokenizer.pad_token_id``, ``attention_mask`` and ``token_type_ids``
    with 0 (``pad_token_type_id``), ``special_tokens_mask`` with 1 (padding counts as special), on the
    tokenizer's ``padding_side``. ``labels`` become a long tensor, or float32 when they are floats.
    """

    def __init__(self, tokenizer):
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None:
            raise ValueError("tokenizer has no pad token (pad_token_id is None); set tokenizer.pad_token first")
        self.pad_values = {
            "input_ids": int(pad_id),
            "attention_mask": 0,
            "token_type_ids": int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
            "special_tokens_mask": 1,
        }
        self.left = getattr(tokenizer, "padding_side", "right") == "left"

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("empty batch")
        width = max(len(f["input_ids"]) for f in features)
        batch: dict[str, torch.Tensor] = {}
        for key, pad in self.pad_values.items():
            if key not in features[0]:
                continue
            out = torch.full((len(features), width), pad, dtype=torch.long)
            for i, f in enumerate(features):
                seq = f[key]
                if len(seq) != len(f["input_ids"]):
                    raise ValueError(f"feature {i}: {key} has length {len(seq)}, input_ids {len(f['input_ids'])}")
                if self.left:
                    out[i, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
                else:
                    out[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            batch[key] = out
        if "labels" in features[0]:
            labs = [f["labels"] for f in features]
            dtype = torch.float32 if any(isinstance(v, float) for v in labs) else torch.long
            batch["labels"] = torch.tensor(labs, dtype=dtype)
        return batch


def make_dataloader(
    features: list[dict], tokenizer, batch_size: int, *, shuffle: bool = False, seed: int = 0
) -> torch.utils.data.DataLoader:
    """A DataLoader with dynamic per-batch padding (see :class:`PadCollator`); shuffling is seeded."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(
        list(features), batch_size=batch_size, shuffle=shuffle, generator=generator,
        collate_fn=PadCollator(tokenizer),
    )


class DataSource(Protocol):
    """What names a scoring run's data (fastsel.pipeline.config.ScoreConfig is one): the task, its split and
    sampling, the custom file's columns, and the tokenised length."""

    task: str
    data_dir: str | None
    split: str
    num_examples: int | None
    seed: int
    balanced: bool
    data_file: str | None
    text_fields: tuple[str, ...]
    label_field: str
    regression: bool
    max_length: int


def examples_for(cfg: DataSource) -> Examples:
    """The examples a scoring config names (for task "custom": its data_file and columns)."""
    if cfg.task == "custom":
        return load_custom_examples(cfg.data_file, cfg.text_fields, cfg.label_field, regression=cfg.regression,
                                    num_examples=cfg.num_examples, seed=cfg.seed, balanced=cfg.balanced)
    return load_examples(cfg.task, cfg.data_dir, cfg.split, num_examples=cfg.num_examples, seed=cfg.seed, balanced=cfg.balanced)
