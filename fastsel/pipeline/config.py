"""What a scoring run computes (:class:`ScoreConfig`) and how its pass runs (:class:`PipelineConfig`): settings
fields (:func:`fastsel.utils.settings.setting`) from which ``fastsel score`` makes its flags; validated on
construction, round-trip through JSON."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastsel.data.settings import DataSettings
from fastsel.pipeline.cuda_graphs import CUDA_GRAPH_MODES
from fastsel.pipeline.registry import AUTOCAST, METRICS, options_of
from fastsel.scores.confidence import DEFAULT_GROUPS, GROUP_UNITS, MIN_BATCHES_PER_GROUP, check_confidence_unit
from fastsel.utils.settings import JsonSettings, setting

__all__ = ["ScoreConfig", "PipelineConfig", "DEFAULT_MODEL"]

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _metric_help() -> str:  # the registry is filled when the drivers are imported, after this module
    return (f"one of: {', '.join(sorted(METRICS))}; several, comma-separated, share one pass (e.g. "
            "fisher,variability)")


@dataclass
class ScoreConfig(DataSettings, JsonSettings):
    """Everything a scoring run computes; validated on construction, round-trips through JSON. The task and custom
    data fields come from :class:`fastsel.data.settings.DataSettings`."""

    metric: str = setting("fisher", _metric_help)
    model: str = setting(DEFAULT_MODEL, "local directory or hub name")
    split: str = setting("train", "the split scored")
    num_examples: int | None = setting(None, "random subset of this size (seeded); default: what the metric needs "
                                       "(docs/sample_size.md: fisher 200, variability and the probes 2000; the largest "
                                       "when several), or all of the data with --until-stable")
    balanced: bool = setting(False, "class-balanced subset")
    batch_size: int = setting(16, "examples per batch")
    max_length: int = setting(128, "tokens per example (longer ones are truncated)")
    seed: int = setting(0, "seed of the subset, the sampled labels and a fresh head")
    device: str = setting("cpu", "torch device (cpu, cuda, cuda:1, ...)")
    confidence_groups: int = setting(DEFAULT_GROUPS, "ranking confidence: the data split into K groups "
                                     "(--confidence-unit; Kendall tau between halves, top-k agreement, jackknife "
                                     "intervals; memory: K x the blocks' Fisher sums: K above the examples scored, or "
                                     "Fisher accumulators above half the available memory, are refused); 0: off",
                                     metavar="K")
    confidence_unit: str = setting("auto", "what the K groups are made of: batches (batch b of the schedule in group b "
                                   "mod K: no extra work per batch; depends on batch size and bucketing), examples "
                                   "(example i in group i mod K: independent of batching; every batch adds to every "
                                   "group), or auto: batches when every group gets at least "
                                   f"{MIN_BATCHES_PER_GROUP} batches", choices=("auto", *GROUP_UNITS))
    # the metrics' own settings ({"fisher": "exact"}, {"pooling": "cls"}): fields of their options dataclasses
    options: dict[str, Any] = setting(default_factory=dict, help="metric-specific options", cli=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in self.metric.split(","):
            if name not in METRICS:
                raise ValueError(f"fastsel: unknown metric {name!r}; choose from {sorted(METRICS)}")
            if METRICS[name].options is not None:  # its flags' ranges (--probe-c, --cca-folds): now, not after the pass
                options_of(METRICS[name].options, self.options)
        if self.batch_size < 1:
            raise ValueError(f"fastsel: batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"fastsel: seed (--seed) must be in 0..2**63-1, got {self.seed}")
        if self.max_length < 2:
            raise ValueError(f"fastsel: max_length must be >= 2, got {self.max_length}")
        k = self.confidence_groups
        if not isinstance(k, int) or isinstance(k, bool) or not (k == 0 or k >= 2):
            raise ValueError(f"fastsel: confidence_groups (--confidence-groups) must be 0 (off) or an integer >= 2, got {k!r}")
        check_confidence_unit(self.confidence_unit)
        if "confidence_groups" in self.options:
            raise ValueError("fastsel: confidence_groups is a ScoreConfig field, not an option: "
                             "ScoreConfig(confidence_groups=K)")
        if self.num_examples is not None and self.num_examples < 1:
            raise ValueError(f"fastsel: num_examples must be >= 1, got {self.num_examples}")
        self.check_data()


@dataclass
class PipelineConfig(JsonSettings):
    """How the pass runs (not what it computes, except autocast and batching, which change float sums)."""

    max_tokens: int | None = setting(None, "padded tokens per batch (batch size follows the lengths); default: "
                                     "--batch-size examples")
    bucket: bool = setting(True, "length-bucketed batches (minimal padding)")
    autocast: str = setting("none", "forward in bf16/fp16 autocast; accumulators stay fp32", choices=tuple(AUTOCAST))
    checkpoint_dir: str | None = setting(None, "folder for atomic checkpoints (one file per rank)", flag="--checkpoint",
                                         metavar="DIR")
    checkpoint_every_examples: int = setting(10000, "examples (over all processes) between checkpoints",
                                             flag="--checkpoint-every", metavar="M", needs="--checkpoint")
    resume: bool = setting(False, "continue from the checkpoint in --checkpoint")
    # a finished pass's checkpoint files: kept when called from Python; fastsel score removes them (the flag's default)
    keep_checkpoints: bool = setting(True, "keep the checkpoint files once the pass has finished", needs="--checkpoint",
                                     shown="removed, once scores.json is written")
    prefetch: int = setting(2, "batches read ahead by a background thread (0: inline)")
    cache_dir: str | None = setting(None, "tokenised Arrow caches (default $FASTSEL_CACHE or ~/.cache/fastsel)")
    dist_timeout: float | None = setting(None, "torchrun: how long a rank waits for the others in a collective before "
                                         "it fails with an error (a rank that died) instead of hanging; default 1800",
                                         metavar="SECONDS")
    # --until-stable: stop once the ranking is stable (fastsel.scores.confidence): Kendall tau between the halves of
    # the groups >= stable_tau and the top-3 set unchanged over the last stable_checks checks, one check every
    # check_every_examples examples (over all ranks)
    until_stable: bool = setting(False, "stop streaming once the layer ranking is stable (Kendall tau between two halves "
                                 "of the data >= --stable-tau and the top-3 unchanged over --stable-checks checks); the N "
                                 "used goes to scores.json")
    stable_tau: float = setting(0.9, "target tau in (0, 1]", metavar="TAU", needs="--until-stable")
    check_every_examples: int = setting(200, "examples (over all processes) between two checks", flag="--check-every",
                                        metavar="M", needs="--until-stable")
    stable_checks: int = setting(3, "the top-3 must be the same over the last C checks", metavar="C",
                                 needs="--until-stable")
    finite_check_every: int = setting(16, "batches between two checks of the logits and the accumulators for NaN/Inf "
                                      "(one host sync each); a failed check replays the batches since the last one "
                                      "to name the batch; also checked before each checkpoint, stability check and "
                                      "the end", metavar="BATCHES")
    cuda_graphs: str = setting("auto", "CUDA-graph capture of the scoring step, one graph per batch shape (lengths "
                               "padded to multiples of 32), replayed for later batches of that shape: on (needs a CUDA "
                               "--device), off, or auto: on where a GPU run measured that it pays (none has yet: eager); "
                               "steps it cannot capture (--fisher sampled, --confidence-groups K, variability, ...) run "
                               "eager, the reason in scores.json pipeline.cuda_graphs", choices=CUDA_GRAPH_MODES)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"fastsel: max_tokens must be >= 1, got {self.max_tokens}")
        if self.autocast not in AUTOCAST:
            raise ValueError(f"fastsel: autocast must be one of {sorted(AUTOCAST)}, got {self.autocast!r}")
        if self.checkpoint_every_examples < 1:
            raise ValueError(f"fastsel: --checkpoint-every must be >= 1 example, got {self.checkpoint_every_examples}")
        if self.prefetch < 0:
            raise ValueError(f"fastsel: prefetch must be >= 0, got {self.prefetch}")
        if self.dist_timeout is not None and not self.dist_timeout > 0:
            raise ValueError(f"fastsel: dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        if not (isinstance(self.stable_tau, (int, float)) and 0 < self.stable_tau <= 1):
            raise ValueError(f"fastsel: --stable-tau must be in (0, 1], got {self.stable_tau}")
        if self.check_every_examples < 1:
            raise ValueError(f"fastsel: --check-every must be >= 1 example, got {self.check_every_examples}")
        if self.stable_checks < 1:
            raise ValueError(f"fastsel: --stable-checks must be >= 1, got {self.stable_checks}")
        if self.finite_check_every < 1:
            raise ValueError(f"fastsel: --finite-check-every must be >= 1 batch, got {self.finite_check_every}")
        if self.cuda_graphs not in CUDA_GRAPH_MODES:
            raise ValueError(f"fastsel: --cuda-graphs must be one of {', '.join(CUDA_GRAPH_MODES)}, got {self.cuda_graphs!r}")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("fastsel: --resume needs --checkpoint PATH (the folder the interrupted run wrote)")
