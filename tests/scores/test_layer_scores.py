"""LayerScores.table(): the label-dependence line under the table says what to do next for the head it scored with."""
from __future__ import annotations

import pytest

from fastsel.scores.layer_scores import LayerScore, LayerScores

LABEL_FREE = {"kendall_tau_vs_permuted_labels": 1.0, "label_free": True, "examples": 4}


def _scores(head: dict) -> LayerScores:
    layers = [LayerScore(layer=i, name=f"layer.{i}", score=float(i + 1)) for i in range(3)]
    return LayerScores(metric="fisher", model="m", task="sst2", split="train", num_examples=20, layers=layers,
                       info={"head": head, "label_dependence": dict(LABEL_FREE)})


@pytest.mark.parametrize("head, hint, not_hint", [
    ({"kind": "fresh"}, "try --head probe", "--head auto"),
    ({"kind": "fresh", "requested": "auto", "why_fresh": "only 40 training examples are not scored"},
     "--head auto fits a probe head", "try --head probe"),
    ({"kind": "probe", "requested": "auto", "fit_examples": 80, "main_metric": "accuracy",
      "heldout_metrics": {"accuracy": 0.8}, "baseline": {"accuracy": 0.5}}, "(docs/task_aware.md)", "--head"),
])
def test_label_free_line_hints_at_what_the_head_allows(head, hint, not_hint):
    line = next(l for l in _scores(head).table().splitlines() if l.startswith("label-free"))
    assert hint in line and not_hint not in line
