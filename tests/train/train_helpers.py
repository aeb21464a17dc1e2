"""Shared by the tests of fastsel.train: random labelled features for the tiny models and a stand-in tokenizer."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from tests.tiny_models import VOCAB, tiny_model

TOK = SimpleNamespace(pad_token_id=0, pad_token_type_id=0, padding_side="right")  # what PadCollator reads


def features(n: int, seed: int = 0, num_labels: int = 2) -> list[dict]:
    """Random labelled features of varying lengths (3..11 tokens); labels depend on the first token."""
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = int(g.integers(3, 12))
        ids = [2] + g.integers(3, VOCAB, t - 1).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * t, "token_type_ids": [0] * t,
                    "special_tokens_mask": [1] + [0] * (t - 1), "labels": int(ids[1] % num_labels)})
    return out


def dropout_free(arch="bert", num_layers=4, seed=0):
    return tiny_model(arch, num_layers=num_layers, seed=seed, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
