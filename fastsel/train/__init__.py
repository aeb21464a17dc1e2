"""Training a planned model: the optimisation settings (``config``), the loop with evaluation by the task metric and
the cached frozen prefix (``loop``), its resumable state (``train_state``), saving and loading what was trained
(``saved``), rank stability during training (``rank_stability``), the PEFT export (``export``) and ``fastsel
finetune`` (``finetune``)."""
from fastsel.train.config import TrainConfig
from fastsel.train.finetune import EVAL_SHARE, RANK_CALLBACK_NAMES, RANK_SPLITS, FinetuneJob, job_examples, run_finetune
from fastsel.train.loop import (
    EpochCallback,
    EpochRecord,
    TrainResult,
    cacheable_prefix,
    evaluate,
    make_optimizer,
    peak_memory_mb,
    train_model,
)
from fastsel.train.rank_stability import RankStability, trainer_callback
from fastsel.train.saved import load_trained, save_trained
from fastsel.train import heads  # noqa: F401,E402 - registers --head warmup:STEPS

__all__ = ["TrainConfig", "EpochRecord", "TrainResult", "EpochCallback", "make_optimizer", "evaluate", "train_model",
           "cacheable_prefix", "save_trained", "load_trained", "RankStability", "trainer_callback", "FinetuneJob",
           "RANK_SPLITS", "RANK_CALLBACK_NAMES", "EVAL_SHARE", "job_examples", "run_finetune", "peak_memory_mb"]
