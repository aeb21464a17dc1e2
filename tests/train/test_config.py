"""fastsel.train.config and the job of fastsel.train.finetune: settings validated when made, JSON round trips."""
from __future__ import annotations

import json

import pytest

from fastsel.train.config import TrainConfig
from fastsel.train.finetune import FinetuneJob


def test_train_config_json_round_trip():
    cfg = TrainConfig(epochs=2, lr=1e-4, seed=7, cache_prefix="off", checkpoint_every_steps=5, max_grad_norm=None)
    back = TrainConfig.from_json(cfg.to_json())
    assert back == cfg and json.loads(cfg.to_json())["checkpoint_every_steps"] == 5


@pytest.mark.parametrize("kw, needle", [
    ({"epochs": 0}, "epochs"), ({"lr": 0.0}, "lr"), ({"lr": float("nan")}, "lr"), ({"batch_size": 0}, "batch sizes"),
    ({"warmup_ratio": 1.0}, "warmup_ratio"), ({"weight_decay": -1.0}, "weight_decay"), ({"seed": 2**32}, "seed"),
    ({"cache_prefix": "maybe"}, "cache_prefix"), ({"checkpoint_every_steps": -1}, "checkpoint_every_steps"),
])
def test_train_config_refuses_bad_values(kw, needle):
    with pytest.raises(ValueError, match=needle):
        TrainConfig(**kw)


def test_unknown_key_is_refused():
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"epochs": 1, "lrr": 1e-3})


def test_finetune_job_json_round_trip_keeps_the_nested_training_settings():
    job = FinetuneJob(task="sst2", out="run", strategy="top-2", rank_epochs=(0, 2), lora_alpha=None,
                      train=TrainConfig(epochs=2, seed=3))
    data = json.loads(job.to_json())
    assert data["train"]["epochs"] == 2 and data["rank_epochs"] == [0, 2]
    back = FinetuneJob.from_json(job.to_json())
    assert back == job and isinstance(back.train, TrainConfig) and back.rank_epochs == (0, 2)


@pytest.mark.parametrize("kw, needle", [
    ({}, "exactly one of --plan and --strategy"),
    ({"strategy": "full", "plan_path": "plan.json"}, "exactly one of --plan and --strategy"),
    ({"strategy": "full", "rank_epochs": (4,)}, r"epoch\(s\) \[4\] outside 0..3"),
    ({"strategy": "full", "max_length": 1}, "--max-length"),
    ({"strategy": "full", "score_examples": 0}, "--score-examples"),
    ({"strategy": "full", "probe_examples": 5}, "--probe-examples"),
    ({"strategy": "full", "train_examples": 0}, "--train-examples"),
    ({"strategy": "full", "head": "bogus"}, "--head"),
    ({"strategy": "full", "fisher_mode": "fast"}, "--fisher"),
    ({"strategy": "full", "eval_file": "dev.csv"}, "--eval-file applies only to --task custom"),
    ({"strategy": "full", "data_dir": "glue", "task": "custom", "data_file": "a.csv", "text_fields": ("t",)},
     "--data-dir does not apply to --task custom"),
])
def test_finetune_job_refuses_bad_settings_when_made(kw, needle):
    with pytest.raises(ValueError, match=needle):
        FinetuneJob(**{"task": "sst2", "out": "run", **kw})


def test_finetune_job_needs_task_and_out():
    with pytest.raises(TypeError):
        FinetuneJob(strategy="full", out="run")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        FinetuneJob(strategy="full", task="sst2")  # type: ignore[call-arg]
