"""Reading the examples of a split: GLUE TSV, SuperGLUE JSONL, the Hugging Face hub, and custom CSV/TSV/JSONL
files, into :class:`fastsel.data.examples.Examples` (label orders: :mod:`fastsel.data.specs`).

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
``load_custom_examples(path, text_fields, label_field)`` reads a custom CSV / TSV / JSONL file, and
``examples_for(cfg)`` picks between the two for a scoring config.

Split files: GLUE ``train.tsv`` / ``dev.tsv`` / ``test.tsv`` (MNLI: ``dev_matched.tsv`` and
``test_matched.tsv``; ``split="validation_mismatched"`` reads ``dev_mismatched.tsv``). SuperGLUE
``train.jsonl`` (preferred) or ``fewglue32_train.jsonl`` / ``val.jsonl`` / ``test.jsonl``.
Split aliases: ``dev``, ``val``, ``valid`` mean ``validation``. For ``split="test"`` files without
labels give label ``-1`` (``nan`` for STS-B), as ``datasets`` does; other splits require labels.

GLUE TSVs are read with ``csv.QUOTE_NONE`` (they contain unescaped quotes) and ``utf-8-sig``
(MRPC starts with a BOM). CoLA train/dev have no header (source, label, original mark, sentence).

SuperGLUE rows become pairs as the table in :mod:`fastsel.data.specs` lists. COPA: the cue is " What was
the cause?" for ``question == "cause"`` and " What happened as a result?" for ``"effect"``; the label is the
index of the correct choice. WiC: the target word is put in front of the first sentence
(``f"{word}: {sentence1}"``) so that truncation never drops it. WSC: span2 is the pronoun, span1 the
candidate referent (``f"{span2_text} refers to {span1_text}"``). MultiRC: one example per (paragraph,
question, answer option).
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
from typing import Any, Protocol, Sequence

import numpy as np

from fastsel.data.examples import Examples, subsample
from fastsel.data.specs import TaskSpec, get_task, name_key

__all__ = [
    "load_examples",
    "load_custom_examples",
    "examples_for",
    "DataSource",
    "canonical_split",
    "resolve_file",
]

# GLUE rows can be long (MultiRC/QNLI passages); the csv default limit is 128 KiB.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


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
    s = _SPLIT_ALIASES.get(name_key(split))
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
    want = name_key(name)
    for c in sorted(parent.iterdir()):
        if c.is_dir() and name_key(c.name) == want:
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
    if name_key(data_dir.name) == name_key(folder):
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


@contextlib.contextmanager
def _reading(path: Path, what: str = "") -> Any:
    """Turn what a malformed file makes the readers raise into one clear ValueError naming the file."""
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
    return subsample(ex, num_examples, seed, balanced)


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
    return subsample(ex, num_examples, seed, balanced)


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
# A scoring config's examples
# ----------------------------------------------------------------------------------------------


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
