"""Finite checks of the streamed pass every --finite-check-every batches (fastsel.pipeline.diagnosis.FiniteChecks):
the batch that went non-finite is still named exactly (first bad logits flag; else a replay of the batches since
the last check into zeroed accumulators), a checkpoint is saved only after a passed check, and the number of
checks (host syncs) follows the setting."""
from __future__ import annotations

import math

import pytest
import torch

from fastsel.data.corpus import BatchReader, load_tokenized_corpus, schedule_batches
from fastsel.pipeline.checkpoint import load_checkpoint, rank_file
from fastsel.pipeline.checks import NonFiniteError
from fastsel.pipeline.config import PipelineConfig, ScoreConfig
from fastsel.pipeline.context import PipelineContext
from fastsel.pipeline.diagnosis import FiniteChecks
from fastsel.pipeline.distributed import DistEnv
from fastsel.pipeline.registry import BatchConsumer
from fastsel.pipeline.streamed import pass_settings, run_pass
from fastsel.scores.layer_scores import LayerScore, LayerScores

N, B = 48, 4  # 12 batches of 4 (no length bucketing: batch k holds a fixed set of examples)


class Poisoned(BatchConsumer):
    """Sums the example positions it sees; a batch holding example ``poison`` adds NaN. Can zero (``zeroable``)."""

    name = "poisoned-test"

    def __init__(self, poison: int | None, zeroable: bool = True) -> None:
        self.poison, self.zeroable = poison, zeroable
        self.total = torch.zeros(())
        self.flag_reads = 0

    def consume(self, batch, outputs) -> None:
        idx = batch["index"]
        self.total += idx.double().sum() + (math.nan if self.poison is not None and bool((idx == self.poison).any()) else 0)

    def finite_flag(self):
        self.flag_reads += 1
        return torch.isfinite(self.total)

    def zero_(self) -> None:
        if not self.zeroable:
            raise NotImplementedError("cannot zero")
        self.total.zero_()

    def first_nonfinite(self):
        return "the poisoned sum" if not bool(torch.isfinite(self.total)) else None

    def state_dict(self) -> dict:
        return {"total": self.total.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.total.copy_(state["total"])

    def all_reduce(self, group=None) -> None:
        pass

    def result(self) -> LayerScores:
        return LayerScores(self.name, "m", "t", "train", 0, [LayerScore(0, "layer.0", float(self.total))])


def _setup(tiny_dir, data_dir, **pipeline):
    from fastsel.hf.loading import load_model

    cfg = ScoreConfig(model=tiny_dir, task="sst2", data_dir=str(data_dir), num_examples=N, batch_size=B, max_length=24)
    pcfg = PipelineConfig(bucket=False, **pipeline)
    model, tok, lmap = load_model(cfg.model, num_labels=2, seed=cfg.seed)
    corpus = load_tokenized_corpus(cfg, tok, pcfg.cache_dir)
    ctx = PipelineContext(cfg, pcfg, model, tok, lmap, corpus.task, torch.device("cpu"), len(corpus))
    schedule = schedule_batches(corpus.lengths(), batch_size=B, max_tokens=None, bucket=False, seed=cfg.seed)
    return ctx, corpus, schedule


@pytest.fixture
def setup(tiny_dir, data_dir, cache):
    return lambda **pipeline: _setup(tiny_dir, data_dir, **pipeline)


def test_checks_every_n_batches_and_at_the_end(setup):
    """12 batches, a check every 5: after batches 5 and 10 and at the end (3 host syncs, not 12)."""
    ctx, corpus, schedule = setup(finite_check_every=5)
    c = Poisoned(None)
    res = run_pass(ctx, corpus, [c], DistEnv(), progress=False)
    assert len(schedule) == 12 and res.stats["finite_checks"] == 3 and c.flag_reads == 3
    assert res.stats["finite_check_every"] == 5


def test_every_batch_with_one(setup):
    ctx, corpus, _ = setup(finite_check_every=1)
    assert run_pass(ctx, corpus, [Poisoned(None)], DistEnv(), progress=False).stats["finite_checks"] == 12


@pytest.mark.parametrize("every", [1, 5, 16])
def test_replay_names_the_batch_whose_accumulators_went_nonfinite(setup, every):
    """The logits stay finite, one batch's contribution is NaN: the error names that batch and its examples,
    whichever check found it."""
    ctx, corpus, schedule = setup(finite_check_every=every)
    poison = int(schedule[6][1])
    with pytest.raises(NonFiniteError) as err:
        run_pass(ctx, corpus, [Poisoned(poison)], DistEnv(), progress=False)
    msg = str(err.value)
    assert f"in the accumulators at batch 6 (examples {','.join(map(str, schedule[6].tolist()))})" in msg, msg
    assert "first affected: the poisoned sum" in msg and "\n" not in msg


def test_a_consumer_that_cannot_zero_gives_the_range(setup):
    ctx, corpus, schedule = setup(finite_check_every=5)
    with pytest.raises(NonFiniteError, match=r"in the accumulators at one of batches 5-9; "):
        run_pass(ctx, corpus, [Poisoned(int(schedule[7][0]), zeroable=False)], DistEnv(), progress=False)


def test_nonfinite_logits_name_the_first_bad_batch_without_a_replay(setup):
    """The logits flags of the pending batches are read at the check: the first False one is the batch."""
    ctx, corpus, schedule = setup()
    c = Poisoned(None)
    replays = []

    def step(*args):
        replays.append(args)
        return torch.ones((), dtype=torch.bool)

    checks = FiniteChecks(ctx, [c], step, every=8)
    reader = BatchReader(corpus, ctx.tokenizer, schedule, prefetch=0)
    for k, host in zip(range(8), reader):
        checks.add(k, host, torch.tensor(k not in (3, 5)))
    assert checks.due
    with pytest.raises(NonFiniteError, match=r"in the logits/loss at batch 3 \(examples ") as err:
        checks.check(saved=None)
    assert not replays and "the checkpoint" not in str(err.value)


def test_a_passed_check_clears_the_pending_batches(setup):
    ctx, corpus, schedule = setup()
    checks = FiniteChecks(ctx, [Poisoned(None)], lambda *a: torch.ones((), dtype=torch.bool), every=3)
    for k, host in zip(range(2), BatchReader(corpus, ctx.tokenizer, schedule, prefetch=0)):
        checks.add(k, host, torch.tensor(True))
    assert not checks.due
    checks.check(saved=None)
    assert checks.pending == [] and checks.checks == 1
    checks.check(saved=None)  # nothing pending: no sync, not counted
    assert checks.checks == 1


def test_a_checkpoint_is_saved_only_after_a_passed_check(setup, tmp_path):
    """A check every 16 batches, a checkpoint every 3 batches (12 examples), NaN in batch 4: the check before the
    save after batch 5 finds it; the checkpoint of batch 3 stays, holding finite sums."""
    ckpt = tmp_path / "ckpt"
    ctx, corpus, schedule = setup(finite_check_every=16, checkpoint_dir=str(ckpt), checkpoint_every_examples=3 * B)
    with pytest.raises(NonFiniteError, match=r"at batch 4 .*the checkpoint of batch 3 is kept"):
        run_pass(ctx, corpus, [Poisoned(int(schedule[4][2]))], DistEnv(), progress=False)
    state = load_checkpoint(rank_file(str(ckpt), 0, 1), pass_settings(ctx.config, ctx.pipeline, corpus.key, 1))
    assert state is not None and state["cursor"] == 3
    assert float(state["consumers"]["poisoned-test"]["total"]) == sum(int(b.sum()) for b in schedule[:3])


def test_finite_check_every_must_be_positive():
    with pytest.raises(ValueError, match="--finite-check-every must be >= 1 batch, got 0"):
        PipelineConfig(finite_check_every=0)


def test_the_drivers_consumers_zero_every_accumulator(tiny_dir, data_dir, cache):
    """FisherConsumer.zero_ and VariabilityConsumer.zero_ (used by the replay) zero every sum in place."""
    from fastsel.hf.loading import load_model
    from fastsel.pipeline.drivers.fisher import FisherConsumer
    from fastsel.pipeline.drivers.variability import VariabilityConsumer

    cfg = ScoreConfig(model=tiny_dir, task="sst2", data_dir=str(data_dir), num_examples=16, batch_size=8, max_length=24,
                      options={"head": "fresh"})
    model, tok, lmap = load_model(cfg.model, num_labels=2, seed=cfg.seed)
    corpus = load_tokenized_corpus(cfg, tok, None)
    ctx = PipelineContext(cfg, PipelineConfig(), model, tok, lmap, corpus.task, torch.device("cpu"), len(corpus))
    fisher, var = FisherConsumer(ctx), VariabilityConsumer(ctx)
    run_pass(ctx, corpus, [fisher, var], DistEnv(), progress=False)
    tensors = lambda: [t for _, t in fisher.acc.accumulators()] + [  # noqa: E731
        t for st in (var.stats, *var.group_stats) for ts in (st.count, st.mean, st.m2) for t in ts if t is not None]
    before = {id(t) for t in tensors()}
    assert any(bool(t.any()) for t in tensors())
    fisher.zero_()
    var.zero_()
    assert {id(t) for t in tensors()} == before and not any(bool(t.any()) for t in tensors())
