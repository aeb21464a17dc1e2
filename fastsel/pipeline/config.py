"""What a scoring run computes (:class:`ScoreConfig`) and how its pass runs (:class:`PipelineConfig`):
validated on construction, round-trip through JSON."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from fastsel.data.specs import get_task
from fastsel.pipeline.registry import AUTOCAST, METRICS, options_of
from fastsel.scores.confidence import DEFAULT_GROUPS

__all__ = ["ScoreConfig", "PipelineConfig"]


@dataclass
class ScoreConfig:
    """Everything a scoring run needs; validated on construction, round-trips through JSON."""

    metric: str = "fisher"
    model: str = "sentence-transformers/all-MiniLM-L6-v2"
    task: str = "sst2"
    data_dir: str | None = None
    split: str = "train"
    num_examples: int | None = None
    balanced: bool = False
    batch_size: int = 16
    max_length: int = 128
    seed: int = 0
    device: str = "cpu"
    # custom data (task "custom"): a CSV/TSV/JSONL file with named columns
    data_file: str | None = None
    text_fields: tuple[str, ...] = ()
    label_field: str = "label"
    regression: bool = False
    # metric-specific options (e.g. {"fisher": "exact"}, {"pooling": "cls"})
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.text_fields = tuple(self.text_fields)
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
        k = self.options.get("confidence_groups", DEFAULT_GROUPS)
        if not isinstance(k, int) or isinstance(k, bool) or not (k == 0 or k >= 2):
            raise ValueError(f"fastsel: confidence_groups (--confidence-groups) must be 0 (off) or an integer >= 2, got {k!r}")
        if self.num_examples is not None and self.num_examples < 1:
            raise ValueError(f"fastsel: num_examples must be >= 1, got {self.num_examples}")
        if self.task == "custom":
            if not self.data_file or not self.text_fields:
                raise ValueError("fastsel: task 'custom' needs data_file and text_fields (--data-file, --text-fields)")
        else:
            get_task(self.task)  # raises for an unknown task

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ScoreConfig":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"fastsel: unknown ScoreConfig keys {sorted(unknown)}")
        return cls(**data)


@dataclass
class PipelineConfig:
    """How the pass runs (not what it computes, except autocast and batching, which change float sums)."""

    max_tokens: int | None = None  # padded tokens per batch; None: --batch-size examples per batch
    bucket: bool = True  # length-bucketed batches (minimal padding)
    autocast: str = "none"  # none | bf16 | fp16 forward; accumulators stay fp32
    checkpoint: str | None = None  # folder of per-rank checkpoint files
    checkpoint_every: int = 10000  # examples (over all ranks) between checkpoints
    resume: bool = False
    # keep the checkpoint files of a pass that finished (fastsel score removes them unless --keep-checkpoints)
    keep_checkpoints: bool = True
    prefetch: int = 2  # batches read ahead by a background thread (0: inline)
    cache_dir: str | None = None  # tokenised Arrow caches (default $FASTSEL_CACHE or ~/.cache/fastsel)
    dist_timeout: float | None = None  # seconds a collective waits for the other ranks (None: distributed default)
    # --until-stable: stop once the ranking is stable (fastsel.scores.confidence): Kendall tau between the halves of
    # the groups >= stable_tau and the top-3 set unchanged over the last stable_checks checks, one check every
    # check_every examples (over all ranks)
    until_stable: bool = False
    stable_tau: float = 0.9
    check_every: int = 200
    stable_checks: int = 3

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"fastsel: max_tokens must be >= 1, got {self.max_tokens}")
        if self.autocast not in AUTOCAST:
            raise ValueError(f"fastsel: autocast must be one of {sorted(AUTOCAST)}, got {self.autocast!r}")
        if self.checkpoint_every < 1:
            raise ValueError(f"fastsel: checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.prefetch < 0:
            raise ValueError(f"fastsel: prefetch must be >= 0, got {self.prefetch}")
        if self.dist_timeout is not None and not self.dist_timeout > 0:
            raise ValueError(f"fastsel: dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        if not (isinstance(self.stable_tau, (int, float)) and 0 < self.stable_tau <= 1):
            raise ValueError(f"fastsel: --stable-tau must be in (0, 1], got {self.stable_tau}")
        if self.check_every < 1:
            raise ValueError(f"fastsel: --check-every must be >= 1 example, got {self.check_every}")
        if self.stable_checks < 1:
            raise ValueError(f"fastsel: --stable-checks must be >= 1, got {self.stable_checks}")
        if self.resume and not self.checkpoint:
            raise ValueError("fastsel: --resume needs --checkpoint PATH (the folder the interrupted run wrote)")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "PipelineConfig":
        data = json.loads(text)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"fastsel: unknown PipelineConfig keys {sorted(unknown)}")
        return cls(**data)
