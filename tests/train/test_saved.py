"""fastsel.train.saved: a trained run saved and loaded gives the same predictions."""
from __future__ import annotations

import pytest
import torch

from fastsel.data.features import PadCollator
from fastsel.plans.plan import LoraSpec
from fastsel.plans.strategies import build_plan
from fastsel.train.config import TrainConfig
from fastsel.train.loop import train_model
from fastsel.train.saved import load_trained, save_trained
from fastsel.tuners.apply import apply_plan, trainable_parameters, with_counts
from tests.tiny_models import tiny_model
from tests.train.train_helpers import TOK, features

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


# -- checkpoints --------------------------------------------------------------------------------------


@pytest.fixture
def tiny_vocab_dir(tmp_path, tiny_tokenizer):
    """A 4-layer tiny BERT of the tests' 64-word vocabulary (tests.tiny_models), saved with the tiny WordPiece
    tokenizer: for save/load round trips of random features only (the tokenizer's ids exceed the model's vocabulary);
    runs on real text use tiny_dir."""
    path = tmp_path / "base"
    tiny_model("bert", num_layers=4, seed=7).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("strategy,tuner", [("spafit-0-1-ii", "full"), ("layers-1-2-2", "adapter"), ("middle-1-trunc", "full")])
def test_save_load_round_trip_gives_identical_predictions(tmp_path, tiny_vocab_dir, strategy, tuner):
    from fastsel.hf.loading import load_model

    model, _, lm = load_model(str(tiny_vocab_dir), num_labels=2, seed=3)
    plan = with_counts(build_plan(strategy, 4, tuner=tuner, lora=LoraSpec(r=2, alpha=4), adapter_size=3), model)
    apply_plan(model, plan)
    train_model(model, plan, features(24), features(8, seed=4), "sst2", TOK,
                TrainConfig(epochs=1, lr=1e-2, batch_size=8, progress=False))
    run = save_trained(model, plan, tmp_path / "run", base_model=str(tiny_vocab_dir), num_labels=2, seed=3)
    from safetensors.torch import load_file

    saved = load_file(str(run / "trained.safetensors"))
    assert set(saved) == {n for n, _ in trainable_parameters(model)}
    assert sum(t.numel() for t in saved.values()) == plan.trainable_params
    loaded, _, plan2 = load_trained(run)
    assert plan2 == plan
    batch = PadCollator(TOK)(features(6, seed=9))
    inputs = {k: v for k, v in batch.items() if k not in ("special_tokens_mask", "labels")}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model.eval()(**inputs).logits, rtol=0, atol=0)


def test_load_trained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a fastsel run directory"):
        load_trained(tmp_path)
