"""The metric registry: one record per metric (run, consumer, options whose fields are the CLI flags), defaults."""
from __future__ import annotations

import argparse
import contextlib
import json

import pytest
import torch

from fastsel.cli.app import main
from fastsel.pipeline.config import PipelineConfig, ScoreConfig
from fastsel.pipeline.distributed import DistEnv
from fastsel.pipeline.drivers.fisher import FisherConsumer, FisherOptions
from fastsel.pipeline.drivers.variability import VariabilityConsumer, VariabilityOptions
from fastsel.pipeline.registry import (
    METRICS,
    BatchConsumer,
    Metric,
    default_num_examples,
    options_of,
    register_metric,
)
from fastsel.pipeline.run import streams
from fastsel.pipeline.stability import StabilityWatch
from fastsel.pipeline.streamed import run_pass
from fastsel.scores.layer_scores import LayerScore, LayerScores
from fastsel.utils.settings import add_setting_arguments


def test_one_record_per_metric_holds_run_consumer_and_options():
    assert set(METRICS) >= {"fisher", "variability", "cca", "numrank", "probe"}
    assert METRICS["fisher"].consumer is FisherConsumer and METRICS["fisher"].options is FisherOptions
    assert METRICS["variability"].consumer is VariabilityConsumer
    assert {n for n, m in METRICS.items() if m.consumer is not None} >= {"fisher", "variability"}
    assert streams(ScoreConfig(metric="fisher,variability")) and not streams(ScoreConfig(metric="fisher,probe"))
    assert not streams(ScoreConfig(metric="variability", options={"probe": True}))
    with pytest.raises(ValueError, match="registered twice"):
        register_metric(Metric(name="fisher", run=lambda ctx: None, consumer=FisherConsumer))
    assert isinstance(METRICS["cca"], Metric)


# -- the consumer contract: BatchConsumer declares every hook of the pass ---------------------------------


class _Minimal(BatchConsumer):
    """Only the required hooks: the defaults of the others are under test."""

    name = "minimal-test"

    def consume(self, batch, outputs) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def all_reduce(self, group=None) -> None:
        pass

    def result(self) -> LayerScores:
        return LayerScores("minimal-test", "m", "t", "train", 0, [LayerScore(0, "layer.0", 0.0)])


def test_the_drivers_consumers_are_batch_consumers():
    assert issubclass(FisherConsumer, BatchConsumer) and issubclass(VariabilityConsumer, BatchConsumer)
    assert FisherConsumer.supports_stability and VariabilityConsumer.supports_stability
    assert FisherConsumer.needs_backward and not VariabilityConsumer.needs_backward


def test_a_consumer_missing_a_required_hook_fails_at_construction_and_registration():
    class NoResult(BatchConsumer):
        name = "no-result-test"

        def consume(self, batch, outputs) -> None:
            pass

        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state: dict) -> None:
            pass

        def all_reduce(self, group=None) -> None:
            pass

    with pytest.raises(TypeError, match="result"):
        NoResult()
    with pytest.raises(TypeError, match="does not implement the required hook.*result"):
        register_metric(Metric(name="no-result-test", run=lambda ctx: None, consumer=NoResult))
    assert "no-result-test" not in METRICS


def test_registration_refuses_a_consumer_that_is_no_batch_consumer_or_misnamed():
    class DuckTyped:  # every method, but not the base class
        name = "duck-test"

        def capture(self, batch):
            return contextlib.nullcontext()

    with pytest.raises(TypeError, match="not a subclass of fastsel.pipeline.registry.BatchConsumer"):
        register_metric(Metric(name="duck-test", run=lambda ctx: None, consumer=DuckTyped))
    with pytest.raises(TypeError, match="is named 'minimal-test'"):
        register_metric(Metric(name="other-test", run=lambda ctx: None, consumer=_Minimal))
    with pytest.raises(TypeError, match="not callable"):
        register_metric(Metric(name="junk-test", run=lambda ctx: None, consumer=42))  # type: ignore[arg-type]
    assert not {"duck-test", "other-test", "junk-test"} & set(METRICS)


def test_the_pass_refuses_a_consumer_that_is_no_batch_consumer():
    class DuckTyped:
        name = "duck-test"

    with pytest.raises(TypeError, match="BatchConsumer subclasses .* not DuckTyped"):
        run_pass(None, None, [DuckTyped()], DistEnv(), progress=False)  # type: ignore[arg-type, list-item]


def test_stability_flag_and_method_go_together():
    with pytest.raises(TypeError, match="supports_stability is True but stability_scores is not implemented"):
        class _Claims(_Minimal):  # noqa: F841
            supports_stability = True
    with pytest.raises(TypeError, match="supports_stability is False but stability_scores is implemented"):
        class _Hides(_Minimal):  # noqa: F841
            def stability_scores(self, active):
                return lambda groups: []


def test_the_optional_hooks_default_as_documented():
    c = _Minimal()
    assert (c.needs_backward, c.needs_hidden_states, c.supports_stability) == (False, False, False)
    with c.capture({"input_ids": torch.zeros(1, 2, dtype=torch.int64)}) as entered:
        assert entered is None  # a null context: nothing hooked
    assert c.finite_flag() is None  # nothing to check
    assert c.first_nonfinite() is None  # nothing to name
    with pytest.raises(NotImplementedError, match="'minimal-test' has no ranking confidence"):
        c.stability_scores(False)


def test_until_stable_names_the_consumer_without_stability_scores():
    class Ctx:  # what StabilityWatch reads before the pass
        config = ScoreConfig(metric="fisher", confidence_groups=4)
        pipeline = PipelineConfig(until_stable=True)
        num_examples = 8

    with pytest.raises(ValueError, match="--until-stable: metric 'minimal-test' has no ranking confidence"):
        StabilityWatch(Ctx(), [_Minimal()], DistEnv(), [[0, 1]])  # type: ignore[arg-type]


def test_options_have_one_default_each_and_validate():
    assert options_of(VariabilityOptions, {}) == VariabilityOptions()
    opts = options_of(VariabilityOptions, {"pooling": "cls", "fisher": "exact", "probe_c": None})
    assert (opts.pooling, opts.variant, opts.probe_c, opts.probe) == ("cls", "xie", 1.0, False)
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        options_of(VariabilityOptions, {"pooling": "max"})
    with pytest.raises(ValueError, match="unknown Fisher mode"):
        options_of(FisherOptions, {"fisher": "gold"})


def test_option_fields_make_the_flags_once():
    p = argparse.ArgumentParser()
    taken: set[str] = set()
    for m in ("fisher", "variability", "cca", "probe"):
        add_setting_arguments(p, METRICS[m].options, taken=taken)
    args = p.parse_args(["--pooling", "cls", "--probe", "--cca-folds", "3", "--fisher", "sampled"])
    assert (args.pooling, args.probe, args.cca_folds, args.fisher, args.variant) == ("cls", True, 3, "sampled", "xie")
    assert sum(flag == "--pooling" for a in p._actions for flag in a.option_strings) == 1
    with pytest.raises(SystemExit):
        p.parse_args(["--variant", "nope"])


def test_default_sample_size_follows_the_study():
    assert default_num_examples("fisher") == 200
    assert default_num_examples("variability") == default_num_examples("fisher,variability") == 2000


def test_cli_scores_the_default_number_of_examples(tiny_dir, data_dir, tmp_path):
    out = tmp_path / "s.json"
    assert main(["score", "--metric", "fisher", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir),
                 "--max-length", "16", "--batch-size", "50", "--no-progress", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["num_examples"] == 200
