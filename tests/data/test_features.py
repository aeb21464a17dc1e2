"""Tests for fastsel.data.features: tokenisation, dynamic padding and the seeded DataLoader."""
from __future__ import annotations

import torch

from fastsel.data.examples import Examples
from fastsel.data.features import make_dataloader, tokenize_examples
from fastsel.data.readers import load_examples
from fastsel.data.specs import TASKS


# ---------------------------------------------------------------------------------------------- tokenize + batch


def _toy(pairs: bool, regression: bool = False) -> Examples:
    spec = TASKS["stsb"] if regression else (TASKS["rte"] if pairs else TASKS["sst2"])
    a = ["a short one .", "this sentence is quite a bit longer than the first one was", "mid length here"]
    b = ["and its partner", "x", "another fairly long second segment for the pair"] if pairs else None
    labels = [0.5, 4.0, 2.25] if regression else [0, 1, 1]
    return Examples(spec, "train", a, b, labels)


def test_tokenize_pairs(tiny_tokenizer):
    tok = tiny_tokenizer
    feats = tokenize_examples(_toy(pairs=True), tok, max_length=64)
    assert len(feats) == 3
    special = set(tok.all_special_ids)
    for f in feats:
        assert set(f) == {"input_ids", "attention_mask", "token_type_ids", "special_tokens_mask", "labels"}
        assert set(f["token_type_ids"]) == {0, 1}
        assert f["token_type_ids"][0] == 0 and f["token_type_ids"][-1] == 1
        assert f["special_tokens_mask"] == [int(t in special) for t in f["input_ids"]]
        assert sum(f["special_tokens_mask"]) == 3  # [CLS] a [SEP] b [SEP]
        assert isinstance(f["labels"], int)
    single = tokenize_examples(_toy(pairs=False), tok)
    assert all(set(f["token_type_ids"]) == {0} and sum(f["special_tokens_mask"]) == 2 for f in single)
    short = tokenize_examples(_toy(pairs=True), tok, max_length=8)
    assert max(len(f["input_ids"]) for f in short) == 8
    reg = tokenize_examples(_toy(pairs=True, regression=True), tok)
    assert [f["labels"] for f in reg] == [0.5, 4.0, 2.25]


def test_dataloader_dynamic_padding(tiny_tokenizer):
    tok = tiny_tokenizer
    feats = tokenize_examples(_toy(pairs=True), tok)
    lens = [len(f["input_ids"]) for f in feats]
    batches = list(make_dataloader(feats, tok, batch_size=2))
    assert [b["input_ids"].shape[1] for b in batches] == [max(lens[:2]), lens[2]]
    b = batches[0]
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "special_tokens_mask", "labels"}
    assert b["labels"].dtype == torch.long and b["input_ids"].dtype == torch.long
    pad = b["attention_mask"] == 0
    assert pad.any()
    assert (b["input_ids"][pad] == tok.pad_token_id).all()
    assert (b["special_tokens_mask"][pad] == 1).all() and (b["token_type_ids"][pad] == 0).all()
    for i in range(2):  # real positions unchanged
        n = lens[i]
        assert b["input_ids"][i, :n].tolist() == feats[i]["input_ids"]
        assert b["special_tokens_mask"][i, :n].tolist() == feats[i]["special_tokens_mask"]
    # special mask covers exactly special tokens + padding
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    expect = torch.isin(b["input_ids"], special) | pad
    assert torch.equal(b["special_tokens_mask"].bool(), expect)

    reg = make_dataloader(tokenize_examples(_toy(True, regression=True), tok), tok, batch_size=3)
    assert next(iter(reg))["labels"].dtype == torch.float32


def test_dataloader_shuffle_seeded(data_dir, tiny_tokenizer):
    ex = load_examples("rte", data_dir, "validation", num_examples=40, seed=0)
    feats = tokenize_examples(ex, tiny_tokenizer, max_length=64)
    order = lambda s: torch.cat([b["labels"] for b in make_dataloader(feats, tiny_tokenizer, 8, shuffle=True, seed=s)])
    ids = lambda s: [b["input_ids"][:, 1].tolist() for b in make_dataloader(feats, tiny_tokenizer, 8, shuffle=True, seed=s)]
    assert ids(1) == ids(1) and ids(1) != ids(2)
    assert sorted(order(1).tolist()) == sorted(ex.labels)
    plain = list(make_dataloader(feats, tiny_tokenizer, 8))
    assert sum(b["input_ids"].shape[0] for b in plain) == 40
    assert all(b["input_ids"].shape[1] <= 64 for b in plain)
