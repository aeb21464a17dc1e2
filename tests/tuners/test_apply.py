"""Applying plans: truncation equals the full model's hidden state, adapters, gradients and optimizer state."""
from __future__ import annotations

import pytest
import torch

from fastsel.hf.layer_map import map_layers
from fastsel.plans.plan import LoraSpec, Plan, PlanError, Tuning
from fastsel.plans.strategies import build_plan
from fastsel.train.config import TrainConfig
from fastsel.train.loop import make_optimizer
from fastsel.tuners.adapters import AdaptedLinear, BottleneckAdapter
from fastsel.tuners.apply import apply_plan, trainable_parameters
from tests.tiny_models import random_batch, tiny_model

TRUNC_ARCHS = ["bert", "roberta", "distilbert", "electra", "deberta-v2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _backbone_hidden_states(model, batch):
    lm = map_layers(model)
    backbone = model.get_submodule(lm.backbone_name)
    return backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)


@pytest.mark.parametrize("arch", TRUNC_ARCHS)
@pytest.mark.parametrize("head_layer", [0, 2])
def test_truncated_model_output_equals_full_hidden_state_at_head_layer(arch, head_layer):
    batch = random_batch(arch, batch_size=3, seq_len=7, pad_last=2)
    full = tiny_model(arch, num_layers=4, seed=1)
    ref = _backbone_hidden_states(full, batch).hidden_states[head_layer + 1]  # [0] is the embedding output
    cut = tiny_model(arch, num_layers=4, seed=1)
    apply_plan(cut, build_plan(f"layers-{head_layer}-{head_layer}-{head_layer}", 4))
    lm = map_layers(cut)
    assert lm.num_layers == head_layer + 1 and cut.config.num_hidden_layers == head_layer + 1
    out = _backbone_hidden_states(cut, batch)
    torch.testing.assert_close(out.last_hidden_state, ref)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(out.last_hidden_state[mask], ref[mask])
    # the head reads that state: the logits equal the full model's head applied to it
    logits = cut(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert logits.shape == (3, 2)


def test_truncation_saves_parameters_and_compute():
    model = tiny_model("bert", num_layers=6)
    n_full = sum(p.numel() for p in model.parameters())
    apply_plan(model, build_plan("layers-0-1-1", 6))
    per_block = sum(p.numel() for p in tiny_model("bert", num_layers=1).bert.encoder.layer[0].parameters())
    assert sum(p.numel() for p in model.parameters()) == n_full - 4 * per_block
    assert len(model.bert.encoder.layer) == 2


def test_adapter_module_shapes_and_residual():
    ad = BottleneckAdapter(16, 4)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        ad.up.weight.zero_()
    torch.testing.assert_close(ad(x), x)  # zero up-projection: exactly the identity
    model = tiny_model("bert", num_layers=3)
    apply_plan(model, build_plan("position-top-1", 3, tuner="adapter", adapter_size=4))
    block = model.bert.encoder.layer[2]
    assert isinstance(block.attention.output.dense, AdaptedLinear) and isinstance(block.output.dense, AdaptedLinear)
    assert not isinstance(model.bert.encoder.layer[1].output.dense, AdaptedLinear)
    names = {n for n, _ in trainable_parameters(model)}
    b = "bert.encoder.layer.2."
    assert names == {f"{b}{site}.adapter.{lin}.{w}" for site in ("attention.output.dense", "output.dense")
                     for lin in ("down", "up") for w in ("weight", "bias")} | {
        f"{b}{ln}.LayerNorm.{w}" for ln in ("attention.output", "output") for w in ("weight", "bias")} | {
        "classifier.weight", "classifier.bias"}


def test_adapter_changes_output_only_through_adapter():
    batch = random_batch("bert", batch_size=2)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    ref = tiny_model("bert", num_layers=3, seed=2)(**inputs).logits
    model = tiny_model("bert", num_layers=3, seed=2)
    apply_plan(model, build_plan("full", 3, tuner="adapter", adapter_size=4))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BottleneckAdapter):
                m.up.weight.zero_()
    torch.testing.assert_close(model(**inputs).logits, ref)


@pytest.mark.parametrize("strategy,kw", [
    ("fisher-top-1", "scores"), ("spafit-0-1-ii", None), ("bitfit", None), ("lora-i", None),
    ("position-top-1", "adapter"), ("middle-1-trunc", None)])
def test_gradients_and_optimizer_state_only_for_trainable(strategy, kw):
    from fastsel.scores.layer_scores import LayerScore, LayerScores

    extra = {}
    if kw == "scores":
        extra["scores"] = LayerScores("fisher", "m", "t", "train", 4, [LayerScore(l, "", float(l % 2)) for l in range(4)])
    if kw == "adapter":
        extra.update(tuner="adapter", adapter_size=3)
    model = tiny_model("bert", num_layers=4)
    plan = build_plan(strategy, 4, lora=LoraSpec(r=2, alpha=4), **extra)
    apply_plan(model, plan)
    model.train()
    optimizer, scheduler = make_optimizer(model, TrainConfig(lr=1e-3), total_steps=2)
    loss = model(**random_batch("bert")).loss
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    optimizer.step()
    state_ids = {id(p) for p in optimizer.state}
    trainable = {id(p) for _, p in trainable_parameters(model)}
    assert state_ids == trainable and trainable
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable


def test_frozen_parameters_do_not_change_in_training():
    model = tiny_model("bert", num_layers=3)
    apply_plan(model, build_plan("spafit-0-1-i", 3, lora=LoraSpec(r=2, alpha=4)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer, scheduler = make_optimizer(model, TrainConfig(lr=1e-2, warmup_ratio=0.0), total_steps=3)
    model.train()
    for seed in range(3):
        model(**random_batch("bert", seed=seed)).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p)
        if not p.requires_grad:
            assert not changed, n
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if "lora_B" in n)


def test_apply_errors():
    model = tiny_model("bert", num_layers=3)
    apply_plan(model, build_plan("lora-i", 3, lora=LoraSpec(r=2, alpha=4)))
    with pytest.raises(PlanError, match="already has LoRA"):
        apply_plan(model, build_plan("lora-i", 3))
    with pytest.raises(PlanError, match="no parameter to train"):
        m = tiny_model("bert", num_layers=3)
        apply_plan(m, Plan([Tuning()] * 3, head=Tuning()))
        make_optimizer(m, TrainConfig(), 1)
