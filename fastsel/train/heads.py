"""``--head warmup:STEPS``: score after a short full fine-tuning (the head source that needs the training loop, so it
registers from here into :data:`fastsel.pipeline.heads.HEAD_SOURCES`)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch

from fastsel.data.task_metrics import main_metric
from fastsel.pipeline.heads import HeadRequest, HeadSource, PreparedHead, register_head_source
from fastsel.plans.strategies import build_plan
from fastsel.train.config import TrainConfig
from fastsel.train.loop import train_model

__all__ = ["WARMUP_LR", "warmup"]

WARMUP_LR = 2e-5  # full fine-tuning's usual rate (the README's default for `fastsel finetune --strategy full`)
_HOLDOUT = 0.2  # of the pool, for the one evaluation that train_model makes


def _warm(req: HeadRequest, features: list[dict], steps: int, device: torch.device) -> dict:
    order = np.random.default_rng([req.seed, 0x3A4]).permutation(len(features)).tolist()
    held = max(1, int(round(_HOLDOUT * len(features))))
    train = [features[i] for i in order[held:]][: steps * req.batch_size]
    if not train:
        raise ValueError(f"fastsel: --head warmup: {len(features)} training examples are too few; raise --probe-examples")
    cfg = TrainConfig(epochs=1, lr=WARMUP_LR, batch_size=req.batch_size, seed=req.seed, device=str(device),
                      cache_prefix="off", progress=req.progress)
    plan = build_plan("full", req.layer_map.num_layers)
    result = train_model(req.model, plan, train, [features[i] for i in order[:held]], req.task, req.tokenizer, cfg)
    req.model.eval()
    return {"steps": -(-len(train) // req.batch_size), "examples": len(train), "heldout_examples": held, "lr": WARMUP_LR,
            "heldout_metrics": result.best_metrics, "main_metric": main_metric(req.task)}


def warmup(req: HeadRequest) -> PreparedHead:
    """STEPS optimizer steps of full fine-tuning (every parameter) on the pool; the permuted-label twin restarts from
    the same pretrained weights and fresh head (both states are kept in memory: twice the model)."""
    steps = int(str(req.argument))
    features = req.pool()
    device = torch.device(req.device)
    initial = {k: v.detach().clone() for k, v in req.model.state_dict().items()}
    info = _warm(req, features, steps, device)

    @contextlib.contextmanager
    def permuted(seed: int) -> Iterator[None]:
        warmed = {k: v.detach().clone() for k, v in req.model.state_dict().items()}
        order = np.random.default_rng([seed, 0x9E3A]).permutation(len(features))
        shuffled = [{**f, "labels": features[int(j)]["labels"]} for f, j in zip(features, order)]
        try:
            req.model.load_state_dict(initial)
            head.permuted_info = _warm(req, shuffled, steps, device)
            yield
        finally:
            req.model.load_state_dict(warmed)

    head = PreparedHead({"kind": "warmup", "seed": req.seed, "fitted": True, **info}, permuted, fits_labels=True)
    return head


register_head_source(HeadSource("warmup", warmup, "a short full fine-tuning of STEPS optimizer steps (warmup:STEPS) on "
                                "training examples not scored", needs_pool=True))
