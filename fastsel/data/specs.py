"""The task registry: what each GLUE/SuperGLUE task is (:class:`TaskSpec`: benchmark, classes or regression,
official metrics), looked up by name with :func:`get_task`.

Every task is cast as single-sentence or sentence-pair classification (or regression for STS-B); the readers
(:mod:`fastsel.data.readers`) build its ``text_a`` / ``text_b`` and integer labels in these label orders.
A custom file's task is a ``TaskSpec(benchmark="custom")`` made by :func:`fastsel.data.readers.load_custom_examples`.

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

MultiRC: one example per (paragraph, question, answer option); its official metrics (F1 over all answer
options ``f1a`` and per-question exact match ``em``) are simplified to ``("f1", "accuracy")`` -- ``f1`` over
all answer options equals ``f1a``; ``em`` would need question grouping, which
:class:`fastsel.data.examples.Examples` does not carry. CB's official metric also includes macro-F1; the
registry lists only ``accuracy`` for it. SuperGLUE RTE is registered as ``sg-rte`` (GLUE RTE is ``rte``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["TaskSpec", "TASKS", "get_task", "name_key"]


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


def name_key(name: str) -> str:
    """The key names are matched by: lower case, letters and digits only ("SST-2" and "sst_2" give "sst2")."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


_ALIASES = {name_key(k): k for k in TASKS}
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
    key = _ALIASES.get(name_key(name))
    if key is None:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]
