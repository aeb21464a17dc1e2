"""The metric registry: one record per metric (run, consumer, options whose fields are the CLI flags), defaults."""
from __future__ import annotations

import argparse
import json

import pytest

from fastsel.cli.app import main
from fastsel.pipeline.drivers.fisher import FisherConsumer, FisherOptions
from fastsel.pipeline.drivers.variability import VariabilityOptions
from fastsel.pipeline.registry import (
    CONSUMERS,
    METRICS,
    Metric,
    add_option_arguments,
    default_num_examples,
    options_of,
    register_consumer,
    supports,
)


def test_one_record_per_metric_holds_run_consumer_and_options():
    assert set(METRICS) >= {"fisher", "variability", "cca", "numrank", "probe"}
    assert METRICS["fisher"].consumer is FisherConsumer and METRICS["fisher"].options is FisherOptions
    assert set(CONSUMERS) == {n for n, m in METRICS.items() if m.consumer is not None} >= {"fisher", "variability"}
    assert supports("fisher,variability") and not supports("fisher,probe")
    with pytest.raises(ValueError, match="registered twice"):
        register_consumer("fisher", FisherConsumer)
    with pytest.raises(ValueError, match="before its consumer"):
        register_consumer("no-such-metric", FisherConsumer)
    assert isinstance(METRICS["cca"], Metric)


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
        add_option_arguments(p, METRICS[m].options, taken)
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
