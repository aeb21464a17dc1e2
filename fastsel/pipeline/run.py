"""One entry point for scoring: :func:`score` runs a :class:`ScoreConfig` in the streamed pass when every metric
has a consumer (one shared pass; checkpoints, torchrun), else in memory, and refuses what only the streamed pass
can do (several metrics, checkpoints, token budgets, autocast, --until-stable, several processes) for the rest."""
from __future__ import annotations

import os
from pathlib import Path

from fastsel.pipeline.config import PipelineConfig, ScoreConfig
from fastsel.pipeline.distributed import world_size
from fastsel.pipeline.inmemory import run_scoring
from fastsel.pipeline.registry import METRICS
from fastsel.pipeline.streamed import run_pipeline
from fastsel.scores.layer_scores import LayerScores

__all__ = ["score", "streams"]


def streams(cfg: ScoreConfig) -> bool:
    """Whether ``cfg`` runs in the streamed pass: every metric has a consumer, and no probe (probes keep the
    scored subset's states in memory and need a validation pass)."""
    streamed = all(name in METRICS and METRICS[name].consumer is not None for name in cfg.metric.split(","))
    return streamed and not cfg.options.get("probe")


def score(cfg: ScoreConfig, pcfg: PipelineConfig | None = None, *, out: str | os.PathLike | None = None,
          plot: str | os.PathLike | None = None, progress: bool = True) -> dict[str, LayerScores]:
    """Score ``cfg.metric`` -> {metric: LayerScores}; writes ``out`` / ``plot`` (one file per metric when several)."""
    from fastsel.hf.loading import no_progress_bars

    with no_progress_bars(not progress):  # transformers' "Loading weights" and datasets' "tokenising" bars too
        return _score(cfg, pcfg or PipelineConfig(), out=out, plot=plot, progress=progress)


def _score(cfg: ScoreConfig, pcfg: PipelineConfig, *, out: str | os.PathLike | None, plot: str | os.PathLike | None,
           progress: bool) -> dict[str, LayerScores]:
    if streams(cfg):
        return run_pipeline(cfg, pcfg, out=out, plot=plot, progress=progress)
    if "," in cfg.metric:
        raise ValueError(f"fastsel: {cfg.metric!r}: only metrics of the streamed pass can share one pass")
    if pcfg.checkpoint_dir or pcfg.resume or pcfg.max_tokens or pcfg.autocast != "none" or pcfg.until_stable or world_size() > 1:
        raise ValueError(f"fastsel: metric {cfg.metric!r}{' with --probe' if cfg.options.get('probe') else ''} does not run "
                         "in the streamed pass; --max-tokens, --autocast, --checkpoint/--resume, --until-stable and torchrun "
                         "need a streamed metric (fisher, variability without --probe)")
    return {cfg.metric: run_scoring(cfg, out=Path(out) if out else None, plot=plot, progress=progress)}
