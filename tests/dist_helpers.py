"""Helpers of the multi-process tests: a free TCP port and the comparison of two scores.json dicts."""
from __future__ import annotations

import socket

import pytest
import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_scores_close(a: dict, b: dict, rtol: float = 1e-5) -> None:
    """Two scores.json dicts of the same run on one and on several processes agree (scores, ranking confidence)."""
    assert a["ranking"] == b["ranking"] and a["num_examples"] == b["num_examples"]
    for x, y in zip(a["layers"], b["layers"]):
        torch.testing.assert_close(torch.tensor([x["score"], x.get("trace", 0.0)], dtype=torch.float64),
                                   torch.tensor([y["score"], y.get("trace", 0.0)], dtype=torch.float64), rtol=rtol, atol=0)
    for g in a["extra"]:
        torch.testing.assert_close(a["extra"][g]["score"], b["extra"][g]["score"], rtol=rtol, atol=0)
    # ranking confidence: per-group accumulators summed / merged exactly over the ranks
    ca, cb = a["ranking_confidence"], b["ranking_confidence"]
    assert ca["groups"] == cb["groups"] and ca["topk_agreement_halves"] == cb["topk_agreement_halves"]
    assert ca["kendall_tau_halves"] == pytest.approx(cb["kendall_tau_halves"], abs=1e-9)
    assert [x["rank_interval"] for x in ca["layers"]] == [x["rank_interval"] for x in cb["layers"]]
    torch.testing.assert_close(torch.tensor([x["score_interval"] for x in ca["layers"]], dtype=torch.float64),
                               torch.tensor([x["score_interval"] for x in cb["layers"]], dtype=torch.float64),
                               rtol=1e-4, atol=1e-12)
