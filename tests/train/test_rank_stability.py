"""fastsel.train.rank_stability: the Fisher ranking during training, in our loop and in transformers.Trainer."""
from __future__ import annotations

import pytest

from fastsel.data.features import PadCollator
from fastsel.plans.plan import LoraSpec
from fastsel.plans.strategies import build_plan
from fastsel.train.config import TrainConfig
from fastsel.train.loop import train_model
from fastsel.train.rank_stability import RankStability, trainer_callback
from fastsel.tuners.apply import apply_plan, trainable_parameters
from tests.tiny_models import tiny_model
from tests.train.train_helpers import TOK, features

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


# -- rank stability and the HF Trainer ----------------------------------------------------------------


def test_rank_stability_callback():
    train, dev = features(32, seed=1), features(8, seed=2)
    model = tiny_model("bert", num_layers=4)
    plan = build_plan("position-top-1", 4)
    apply_plan(model, plan)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    cb = RankStability(train[:16], TOK, epochs=(1, 2), batch_size=8)
    res = train_model(model, plan, train, dev, "sst2", TOK, TrainConfig(epochs=2, lr=1e-3, batch_size=8, progress=False),
                      callbacks=[cb])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before  # restored after each pass
    rep = res.callbacks["rank_stability"]["epochs"]
    assert set(rep) == {"0", "1", "2"}
    assert sorted(rep["0"]["ranking"]) == [0, 1, 2, 3]
    for e in ("1", "2"):
        r0, re_ = rep["0"]["ranks"], rep[e]["ranks"]
        assert rep[e]["rank_deviation"] == [abs(a - b) for a, b in zip(re_, r0)]
        from scipy.stats import kendalltau

        assert rep[e]["kendall_tau"] == pytest.approx(kendalltau(r0, re_).statistic)
    # epoch 0 is the untrained model: its ranking is the Fisher ranking of the fresh model
    from fastsel.scores.fisher import fisher_layer_scores

    fresh = tiny_model("bert", num_layers=4)
    scores, _ = fisher_layer_scores(fresh, [PadCollator(TOK)(train[:8]), PadCollator(TOK)(train[8:16])])
    assert rep["0"]["ranking"] == scores.ranking


def test_hf_trainer_with_plan_and_callback(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model("bert", num_layers=3)
    plan = build_plan("spafit-0-1-i", 3, lora=LoraSpec(r=2, alpha=4))
    apply_plan(model, plan)
    train = features(16)
    cb = RankStability(train[:8], TOK, epochs=(1,), batch_size=8)
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=8,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    collate = PadCollator(TOK)
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      data_collator=lambda fs: {k: v for k, v in collate(fs).items() if k != "special_tokens_mask"},
                      callbacks=[trainer_callback(cb)])
    trainer.train()
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for _, p in trainable_parameters(model)}
    assert set(cb.report()["epochs"]) == {"0", "1"}
