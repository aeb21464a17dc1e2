"""Tests for fastsel.data.specs: the task registry, its label orders and metrics, and name lookup."""
from __future__ import annotations

import pytest

from fastsel.data.specs import TASKS, get_task


# ---------------------------------------------------------------------------------------------- registry


def test_registry_contents():
    glue = {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    sg = {"boolq", "cb", "copa", "wic", "wsc", "multirc", "sg-rte"}
    assert {k for k, t in TASKS.items() if t.benchmark == "glue"} == glue
    assert {k for k, t in TASKS.items() if t.benchmark == "superglue"} == sg
    for k, t in TASKS.items():
        assert t.name == k
        assert t.is_regression == (k == "stsb")
        if not t.is_regression:
            assert len(t.label_names) == t.num_labels
    assert TASKS["stsb"].num_labels == 1 and TASKS["stsb"].label_names == ()
    assert TASKS["cola"].metrics == ("mcc",)
    assert TASKS["mrpc"].metrics == ("f1", "accuracy") == TASKS["qqp"].metrics
    assert TASKS["stsb"].metrics == ("pearson", "spearman")
    assert TASKS["sst2"].metrics == ("accuracy",)
    # datasets' label orders
    assert TASKS["mnli"].label_names == ("entailment", "neutral", "contradiction")
    assert TASKS["rte"].label_names == ("entailment", "not_entailment") == TASKS["qnli"].label_names
    assert TASKS["wnli"].label_names == ("not_entailment", "entailment")
    assert TASKS["cb"].label_names == ("entailment", "contradiction", "neutral")
    with pytest.raises(Exception):
        TASKS["sst2"].num_labels = 3  # frozen


@pytest.mark.parametrize("alias,name", [("SST-2", "sst2"), ("sst2", "sst2"), ("STS-B", "stsb"), ("CoLA", "cola"),
                                        ("MNLI", "mnli"), ("sg-rte", "sg-rte"), ("SG_RTE", "sg-rte"),
                                        ("BoolQ", "boolq"), ("multi-rc", "multirc"), ("WSC.fixed", "wsc")])
def test_get_task_aliases(alias, name):
    assert get_task(alias) is TASKS[name]


def test_get_task_unknown_lists_known():
    with pytest.raises(ValueError) as e:
        get_task("imdb")
    assert "imdb" in str(e.value) and "sst2" in str(e.value) and "boolq" in str(e.value)
