"""The tokenised corpus: Arrow cache, length-bucketed batch schedules, shards, the padding reader."""
from __future__ import annotations

import numpy as np
import pytest

from fastsel.data.corpus import BatchReader, load_tokenized_corpus, padding_stats, schedule_batches, shard_batches
from fastsel.data.features import tokenize_examples
from fastsel.data.readers import load_examples
from fastsel.pipeline.config import ScoreConfig

N = 120


def _cfg(tiny_dir, data_dir, **kw):
    base = dict(model=tiny_dir, task="sst2", data_dir=str(data_dir), num_examples=N, batch_size=8, max_length=48)
    base.update(kw)
    return ScoreConfig(**base)


@pytest.mark.parametrize("bucket", [True, False])
@pytest.mark.parametrize("max_tokens", [None, 1, 40, 300])
def test_plan_covers_every_row_once_within_budget(bucket, max_tokens):
    lengths = np.random.default_rng(0).integers(3, 60, size=500)
    plan = schedule_batches(lengths, batch_size=7, max_tokens=max_tokens, bucket=bucket, seed=1)
    rows = np.concatenate(plan)
    assert sorted(rows.tolist()) == list(range(500))
    for b in plan:
        assert len(b) >= 1
        if max_tokens is not None:
            assert len(b) == 1 or len(b) * lengths[b].max() <= max_tokens
        else:
            assert len(b) <= 7
    if not bucket:
        assert rows.tolist() == list(range(500))  # data order kept
    again = schedule_batches(lengths, batch_size=7, max_tokens=max_tokens, bucket=bucket, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(plan, again))  # deterministic: needed for resume


def test_bucketing_cuts_padding():
    lengths = np.random.default_rng(0).integers(3, 60, size=2000)
    flat = padding_stats(lengths, schedule_batches(lengths, batch_size=32, bucket=False))
    bucketed = padding_stats(lengths, schedule_batches(lengths, batch_size=32, bucket=True))
    assert bucketed["tokens"] == flat["tokens"] == lengths.sum()
    assert bucketed["padding_fraction"] < 0.05 < 0.3 < flat["padding_fraction"]


def test_plan_errors_and_empty():
    with pytest.raises(ValueError, match="batch_size"):
        schedule_batches(np.array([3]), batch_size=0)
    with pytest.raises(ValueError, match="max_tokens"):
        schedule_batches(np.array([3]), batch_size=2, max_tokens=0)
    assert schedule_batches(np.zeros(0, dtype=np.int64), batch_size=4) == []


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_disjoint_and_cover(world):
    plan = schedule_batches(np.arange(1, 50), batch_size=4, bucket=True)
    shards = [shard_batches(plan, r, world) for r in range(world)]
    rows = sorted(int(i) for s in shards for b in s for i in b)
    assert rows == list(range(49))
    with pytest.raises(ValueError):
        shard_batches(plan, world, world)


def test_corpus_is_cached_memory_mapped_and_matches_tokenize_examples(tiny_dir, data_dir, cache, tiny_tokenizer):
    cfg = _cfg(tiny_dir, data_dir)
    corpus = load_tokenized_corpus(cfg, tiny_tokenizer)
    assert corpus.dataset.cache_files and str(cache) in corpus.dataset.cache_files[0]["filename"]  # on disk: mmap
    mtime = (corpus.path / "data.arrow").stat().st_mtime_ns
    again = load_tokenized_corpus(cfg, tiny_tokenizer, build=False)  # hit: no rebuild
    assert again.key == corpus.key and (again.path / "data.arrow").stat().st_mtime_ns == mtime
    ex = load_examples("sst2", data_dir, "train", num_examples=N, seed=0)
    feats = tokenize_examples(ex, tiny_tokenizer, 48)
    assert corpus.dataset["index"][:] == list(range(N))
    rows = corpus.dataset[:]
    for i in (0, 17, N - 1):
        for k in ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask", "labels"):
            assert list(rows[k][i]) == feats[i][k] if k != "labels" else rows[k][i] == feats[i][k]
    assert corpus.lengths().tolist() == [len(f["input_ids"]) for f in feats]
    # another subsample or max_length: another cache entry
    assert load_tokenized_corpus(_cfg(tiny_dir, data_dir, max_length=32), tiny_tokenizer).key != corpus.key


def test_reader_pads_each_batch_to_its_own_longest(tiny_dir, data_dir, cache, tiny_tokenizer):
    corpus = load_tokenized_corpus(_cfg(tiny_dir, data_dir), tiny_tokenizer)
    lengths = corpus.lengths()
    plan = schedule_batches(lengths, batch_size=1, max_tokens=100, bucket=True)
    for prefetch in (0, 3):
        seen = []
        for b, batch in zip(plan[2:], BatchReader(corpus, tiny_tokenizer, plan, start=2, prefetch=prefetch)):
            assert batch["index"].tolist() == b.tolist()
            assert batch["input_ids"].shape == (len(b), lengths[b].max())
            assert batch["attention_mask"].sum(1).tolist() == lengths[b].tolist()
            seen += b.tolist()
        assert len(seen) == sum(len(b) for b in plan[2:])
