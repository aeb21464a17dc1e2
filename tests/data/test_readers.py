"""Tests for fastsel.data.readers: real GLUE/SuperGLUE files, folder layouts, malformed inputs, custom files."""
from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest

from fastsel.data.examples import Examples
from fastsel.data.readers import load_custom_examples, load_examples
from fastsel.data.specs import TASKS

# (task, split) -> row count, from shared/data/SOURCES.md
COUNTS = {
    ("cola", "train"): 8551, ("cola", "validation"): 1043,
    ("sst2", "train"): 67349, ("sst2", "validation"): 872,
    ("mrpc", "train"): 3668, ("mrpc", "validation"): 408,
    ("stsb", "train"): 5749, ("stsb", "validation"): 1500,
    ("rte", "train"): 2490, ("rte", "validation"): 277,
    ("wnli", "train"): 635, ("wnli", "validation"): 71,
    ("boolq", "train"): 32, ("boolq", "validation"): 3270,
    ("cb", "train"): 32, ("cb", "validation"): 56,
    ("copa", "train"): 32, ("copa", "validation"): 100,
    ("wic", "train"): 32, ("wic", "validation"): 638,
    ("wsc", "train"): 32, ("wsc", "validation"): 104,
    ("multirc", "train"): 154, ("multirc", "validation"): 4848,
    ("sg-rte", "train"): 32, ("sg-rte", "validation"): 277,
}
FOLDER = {"cola": "glue/CoLA", "sst2": "glue/SST-2", "mrpc": "glue/MRPC", "stsb": "glue/STS-B",
          "rte": "glue/RTE", "wnli": "glue/WNLI", "boolq": "superglue/BoolQ", "cb": "superglue/CB",
          "copa": "superglue/COPA", "wic": "superglue/WiC", "wsc": "superglue/WSC",
          "multirc": "superglue/MultiRC", "sg-rte": "superglue/RTE"}

_cache: dict = {}


def _load(data_dir, task, split):
    key = (str(data_dir), task, split)
    if key not in _cache:
        if not (data_dir / FOLDER[task]).is_dir():
            pytest.skip(f"{FOLDER[task]} not in {data_dir}")
        _cache[key] = load_examples(task, data_dir, split)
    return _cache[key]


# ---------------------------------------------------------------------------------------------- real data


@pytest.mark.parametrize("task,split", sorted(COUNTS))
def test_real_counts(data_dir, task, split):
    ex = _load(data_dir, task, split)
    assert isinstance(ex, Examples)
    assert len(ex.text_a) == len(ex.labels) == COUNTS[task, split]
    assert ex.task is TASKS[task] and ex.split == split
    single = task in ("cola", "sst2")
    assert (ex.text_b is None) == single
    if not single:
        assert len(ex.text_b) == len(ex.text_a)
    assert all(isinstance(t, str) and t for t in ex.text_a)
    if ex.task.is_regression:
        assert all(isinstance(v, float) for v in ex.labels)
    else:
        assert all(isinstance(v, int) and 0 <= v < ex.task.num_labels for v in ex.labels)


@pytest.mark.parametrize("task,split,dist", [
    ("cola", "train", {1: 6023, 0: 2528}),
    ("cola", "validation", {1: 721, 0: 322}),
    ("sst2", "train", {1: 37569, 0: 29780}),
    ("mrpc", "train", {1: 2474, 0: 1194}),
    ("rte", "train", {0: 1249, 1: 1241}),          # entailment=0, not_entailment=1
    ("wnli", "train", {0: 323, 1: 312}),
    ("boolq", "validation", {1: 2033, 0: 1237}),
    ("cb", "validation", {1: 28, 0: 23, 2: 5}),    # contradiction=1, entailment=0, neutral=2
    ("multirc", "validation", {0: 2773, 1: 2075}),
    ("wsc", "validation", {0: 66, 1: 38}),
    ("sg-rte", "validation", {0: 146, 1: 131}),
])
def test_real_label_distribution(data_dir, task, split, dist):
    assert dict(Counter(_load(data_dir, task, split).labels)) == dist


def test_stsb_scores(data_dir):
    tr = _load(data_dir, "stsb", "train")
    dev = _load(data_dir, "stsb", "validation")
    assert min(tr.labels) >= 0 and max(tr.labels) <= 5
    assert sum(tr.labels) / len(tr) == pytest.approx(2.701, abs=1e-3)
    assert sum(dev.labels) / len(dev) == pytest.approx(2.364, abs=1e-3)
    assert dev.text_a[0] == "A man with a hard hat is dancing."
    assert dev.labels[0] == 5.0


def test_glue_parsing_details(data_dir):
    mrpc = _load(data_dir, "mrpc", "train")  # BOM header, unescaped quotes
    assert mrpc.text_a[0].startswith("Amrozi accused his brother")
    assert mrpc.text_b[0].startswith('Referring to him as only "the witness"')
    dev = _load(data_dir, "mrpc", "validation")
    assert dev.text_b[0].startswith('"The foodservice pie business')  # lone quote kept verbatim
    cola = _load(data_dir, "cola", "train")  # no header
    assert cola.text_a[0].startswith("Our friends won't buy this analysis")
    rte = _load(data_dir, "rte", "train")
    assert rte.text_a[0] == "No Weapons of Mass Destruction Found in Iraq Yet." and rte.labels[0] == 1


def test_superglue_formats(data_dir):
    copa = _load(data_dir, "copa", "validation")
    assert copa.text_a[0] == "The man turned on the faucet. What happened as a result?"
    assert copa.text_b[0] == "The toilet filled with water. or Water flowed from the spout."
    assert copa.labels[0] == 1
    wic = _load(data_dir, "wic", "validation")
    assert wic.text_a[0] == "class: An emerging professional class."
    wsc = _load(data_dir, "wsc", "validation")
    assert wsc.text_b[0] == "him refers to anyone"
    mrc = _load(data_dir, "multirc", "validation")
    assert mrc.text_a[0].startswith("What causes a change in motion?")
    boolq = _load(data_dir, "boolq", "validation")
    assert boolq.text_a[0] == "does ethanol take more energy make that produces"


# ---------------------------------------------------------------------------------------------- layouts


def test_layouts_resolve(data_dir, tmp_path):
    if not (data_dir / "glue" / "RTE").is_dir() or not (data_dir / "superglue" / "CB").is_dir():
        pytest.skip("RTE / CB missing")
    ref_g = load_examples("rte", data_dir, "validation")
    ref_s = load_examples("cb", data_dir, "validation")
    # GLUE_DIR and SuperGLUE folder directly
    assert load_examples("rte", data_dir / "glue", "validation").text_a == ref_g.text_a
    assert load_examples("cb", data_dir / "superglue", "validation").text_a == ref_s.text_a
    assert load_examples("sg-rte", data_dir / "superglue", "validation").labels == ref_g.labels
    # the task folder itself
    assert load_examples("rte", data_dir / "glue" / "RTE", "dev").labels == ref_g.labels
    # other spellings of folders
    root = tmp_path / "root"
    (root / "GLUE" / "rte").mkdir(parents=True)
    (root / "super_glue" / "cb").mkdir(parents=True)
    shutil.copy(data_dir / "glue" / "RTE" / "dev.tsv", root / "GLUE" / "rte" / "dev.tsv")
    shutil.copy(data_dir / "superglue" / "CB" / "val.jsonl", root / "super_glue" / "cb" / "val.jsonl")
    assert load_examples("RTE", str(root), "val").labels == ref_g.labels
    assert load_examples("CB", root, "validation").labels == ref_s.labels


def test_superglue_prefers_train_jsonl(data_dir, tmp_path):
    src = data_dir / "superglue" / "CB"
    if not src.is_dir():
        pytest.skip("CB missing")
    d = tmp_path / "CB"
    d.mkdir()
    shutil.copy(src / "fewglue32_train.jsonl", d / "fewglue32_train.jsonl")
    assert len(load_examples("cb", tmp_path, "train")) == 32
    shutil.copy(src / "val.jsonl", d / "train.jsonl")
    assert len(load_examples("cb", tmp_path, "train")) == 56


# ---------------------------------------------------------------------------------------------- errors


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_dir_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_examples("sst2", tmp_path / "nope")
    with pytest.raises(FileNotFoundError) as e:
        load_examples("sst2", tmp_path, "validation")
    msg = str(e.value)
    assert str(tmp_path / "SST-2" / "dev.tsv") in msg and "glue/SST-2/dev.tsv" in msg
    with pytest.raises(FileNotFoundError, match="fewglue32_train.jsonl"):
        load_examples("boolq", tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_examples("sst2", tmp_path, "holdout")


def test_missing_label_column_and_malformed_rows(tmp_path):
    _write(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\n0\ta\tb\n")
    with pytest.raises(ValueError, match="missing label column 'label'.*sentence2"):
        load_examples("rte", tmp_path, "train")
    _write(tmp_path / "RTE" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tonly\n")
    with pytest.raises(ValueError, match=r"dev.tsv:3: malformed row"):
        load_examples("rte", tmp_path, "validation")
    _write(tmp_path / "RTE" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match="unknown label 'maybe'"):
        load_examples("rte", tmp_path, "validation")
    _write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\n")
    with pytest.raises(ValueError, match="no examples"):
        load_examples("sst2", tmp_path)
    _write(tmp_path / "CB" / "val.jsonl", '{"premise": "a", "hypothesis": "b", "label": "neutral"}\n{oops\n')
    with pytest.raises(ValueError, match=r"val.jsonl:2: malformed JSON"):
        load_examples("cb", tmp_path, "validation")
    _write(tmp_path / "CB" / "val.jsonl", '{"premise": "a", "label": "neutral"}\n')
    with pytest.raises(ValueError, match="missing field 'hypothesis'"):
        load_examples("cb", tmp_path, "validation")
    _write(tmp_path / "CB" / "val.jsonl", '{"premise": "a", "hypothesis": "b"}\n')
    with pytest.raises(ValueError, match="missing label"):
        load_examples("cb", tmp_path, "validation")


def test_test_split_without_labels(tmp_path):
    _write(tmp_path / "RTE" / "test.tsv", "index\tsentence1\tsentence2\n0\ta\tb\n1\tc\td\n")
    ex = load_examples("rte", tmp_path, "test")
    assert ex.labels == [-1, -1] and ex.text_b == ["b", "d"]
    _write(tmp_path / "STS-B" / "test.tsv", "index\tsentence1\tsentence2\n0\ta\tb\n")
    assert math.isnan(load_examples("stsb", tmp_path, "test").labels[0])
    _write(tmp_path / "CoLA" / "test.tsv", "index\tsentence\n0\tJohn left.\n")
    assert load_examples("cola", tmp_path, "test").text_a == ["John left."]


def test_hub_failure_is_clear(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def boom(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(RuntimeError, match="--data-dir"):
        load_examples("sst2", None, "train")


# ---------------------------------------------------------------------------------------------- custom files


def test_custom_csv_tsv_jsonl(tmp_path):
    csv_path = _write(tmp_path / "d.csv", 'text,other,y\n"hello, ""world""",x,pos\nbad,y,neg\nok,z,neutral\n')
    ex = load_custom_examples(csv_path, ["text"], "y", task_name="mine")
    assert ex.text_a[0] == 'hello, "world"' and ex.text_b is None
    assert ex.task.label_names == ("neg", "neutral", "pos") and ex.labels == [2, 0, 1]
    assert ex.task.benchmark == "custom" and ex.task.name == "mine" and ex.task.num_labels == 3

    tsv_path = _write(tmp_path / "d.tsv", 'a\tb\tlabel\nsay "hi\tthere\t10\nx\ty\t2\nu\tv\t10\n')
    ex = load_custom_examples(tsv_path, ("a", "b"), "label")
    assert ex.text_a[0] == 'say "hi' and ex.text_b == ["there", "y", "v"]
    assert ex.task.label_names == ("2", "10") and ex.labels == [1, 0, 1]  # numeric order

    rows = [{"q": f"q{i}", "p": f"p{i}", "score": i / 2} for i in range(6)]
    jl = _write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    ex = load_custom_examples(jl, ["q", "p"], "score", regression=True)
    assert ex.task.is_regression and ex.labels == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    ex = load_custom_examples(jl, ["q", "p"], "score", regression=True, num_examples=3, seed=0)
    assert len(ex) == 3

    rows = [{"t": f"t{i}", "lab": bool(i % 3)} for i in range(30)]
    jl = _write(tmp_path / "b.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    ex = load_custom_examples(jl, ["t"], "lab", num_examples=10, balanced=True)
    assert dict(Counter(ex.labels)) == {0: 5, 1: 5}


def test_custom_errors(tmp_path):
    p = _write(tmp_path / "d.csv", "text,y\na,1\nb,0\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['label'\].*\['text', 'y'\]"):
        load_custom_examples(p, ["text"], "label")
    with pytest.raises(ValueError, match="missing column"):
        load_custom_examples(p, ["text", "text2"], "y")
    with pytest.raises(FileNotFoundError):
        load_custom_examples(tmp_path / "none.csv", ["text"], "y")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_custom_examples(_write(tmp_path / "d.xlsx", "x"), ["text"], "y")
    with pytest.raises(ValueError, match="no examples"):
        load_custom_examples(_write(tmp_path / "e.csv", "text,y\n"), ["text"], "y")
    with pytest.raises(ValueError, match="not a number"):
        load_custom_examples(_write(tmp_path / "r.csv", "text,y\na,high\n"), ["text"], "y", regression=True)


def test_custom_label_names_mapping(tmp_path):
    train = load_custom_examples(_write(tmp_path / "train.csv", "text,y\na,pos\nb,neg\nc, pos \n"), ["text"], "y")
    assert train.task.label_names == ("neg", "pos")
    # the names given are used as they are (not re-sorted from the file), stripped labels matched
    dev = load_custom_examples(_write(tmp_path / "dev.csv", "text,y\nx,neg\ny, pos\nz,neg\n"), ["text"], "y",
                               task_name="mine", label_names=("pos", "neg"))
    assert dev.task.label_names == ("pos", "neg") and dev.task.num_labels == 2
    assert dev.labels == [1, 0, 1] and dev.task.name == "mine" and dev.task.benchmark == "custom"
    same = load_custom_examples(tmp_path / "dev.csv", ["text"], "y", label_names=list(train.task.label_names))
    assert same.task.label_names == train.task.label_names and same.labels == [0, 1, 0]


def test_custom_label_names_subset_keeps_indices(tmp_path):
    train = load_custom_examples(_write(tmp_path / "train.csv", "text,y\na,neg\nb,neutral\nc,pos\n"), ["text"], "y")
    assert train.task.label_names == ("neg", "neutral", "pos")
    # a single class present: allowed with label_names, and it keeps the training file's index (2, not 0)
    dev = load_custom_examples(_write(tmp_path / "dev.csv", "text,y\nx,pos\ny,pos\n"), ["text"], "y",
                               label_names=train.task.label_names)
    assert dev.labels == [2, 2] and dev.task.num_labels == 3 and dev.task.label_names == train.task.label_names
    assert dev.task == train.task
    # without label_names the file alone has a single class
    with pytest.raises(ValueError, match="single class"):
        load_custom_examples(tmp_path / "dev.csv", ["text"], "y")


def test_custom_label_names_unknown_label(tmp_path):
    p = _write(tmp_path / "dev.csv", "text,y\n" + "".join(f"t{i},neg\n" for i in range(5)) + "u,maybe\n")
    with pytest.raises(ValueError) as e:
        load_custom_examples(p, ["text"], "y", label_names=("neg", "pos"))
    msg = str(e.value)
    assert msg == f"fastsel: {p}:7: label 'maybe' is not one of the training file's labels ['neg', 'pos']"
    assert "\n" not in msg
    jl = _write(tmp_path / "dev.jsonl", '{"t": "a", "y": 1}\n{"t": "b", "y": 3}\n')
    with pytest.raises(ValueError, match=r"dev.jsonl:2: label 3 is not one of the training file's labels \['1', '2'\]"):
        load_custom_examples(jl, ["t"], "y", label_names=("1", "2"))
    with pytest.raises(ValueError, match="regression"):
        load_custom_examples(p, ["text"], "y", regression=True, label_names=("neg", "pos"))


def test_custom_label_names_integers(tmp_path):
    train = load_custom_examples(_write(tmp_path / "train.tsv", "a\tlabel\nx\t10\ny\t2\nz\t7\n"), ["a"], "label")
    assert train.task.label_names == ("2", "7", "10")
    dev = load_custom_examples(_write(tmp_path / "dev.tsv", "a\tlabel\nx\t10\ny\t 2\nz\t+10\n"), ["a"], "label",
                               label_names=train.task.label_names)
    assert dev.labels == [2, 0, 2] and dev.task.label_names == ("2", "7", "10")
    # JSON integers (and integral floats) match the str of the int
    jl = _write(tmp_path / "dev.jsonl", '{"a": "p", "label": 7}\n{"a": "q", "label": 2.0}\n{"a": "r", "label": "10"}\n')
    assert load_custom_examples(jl, ["a"], "label", label_names=train.task.label_names).labels == [1, 0, 2]
