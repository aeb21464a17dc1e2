"""bench/gpucheck/sections/fisher_pass.py: which `fastsel score` runs the section makes, their arguments, the
CUDA-graphs runs skipped where fastsel has no such setting, and the ratios of runs that differ in one setting."""
from __future__ import annotations

import dataclasses

from gpucheck.config import make_config
from gpucheck.sections.fisher_pass import (BARE_FLAGS, NO_GRAPHS_SETTING, has_cuda_graphs_setting, pass_argv,
                                           pass_ratios, pass_variants)


def test_variants_cover_both_batch_sizes_configs_attentions_and_graphs():
    vs = pass_variants([32, 128], graphs_setting=True)
    fisher = {(v["config"], v["B"], v["attn"], v["graphs"]) for v in vs if v["metric"] == "fisher"}
    for B in (32, 128):
        assert {("default", B, "sdpa", "off"), ("bare", B, "sdpa", "off"), ("bare", B, "eager", "off"),
                ("default", B, "sdpa", "on"), ("bare", B, "sdpa", "on")} <= fisher
        assert any(v["metric"] == "variability" and v["B"] == B for v in vs)
    assert vs[0]["config"] == "default" and vs[0]["graphs"] == "off"  # most important first: the budget cuts the tail
    assert len({v["name"] for v in vs}) == len(vs) and not any(v["skip"] for v in vs)


def test_without_the_setting_the_graphs_runs_are_skipped_not_failed():
    vs = pass_variants([32], graphs_setting=False)
    assert {v["skip"] for v in vs if v["graphs"] == "on"} == {NO_GRAPHS_SETTING}
    assert all(v["skip"] is None for v in vs if v["graphs"] == "off")


def test_argv_of_the_default_and_the_bare_pass():
    cfg = make_config(False)
    dirs = {"sdpa": "/m/sdpa", "eager": "/m/eager"}
    vs = {v["name"]: v for v in pass_variants([32], graphs_setting=True)}
    default = pass_argv(vs["fisher default B32 sdpa graphs=off"], model_dirs=dirs, data_file="d.csv", out="s.json",
                        device="cuda", cfg=cfg, graphs_setting=True)
    assert default[:3] == ["score", "--metric", "fisher"] and "/m/sdpa" in default
    assert "--confidence-groups" not in default and "--head" not in default and "--probe-examples" not in default
    assert default[default.index("--batch-size") + 1] == "32" and default[-2:] == ["--cuda-graphs", "off"]
    bare = pass_argv(vs["fisher bare B32 eager graphs=on"], model_dirs=dirs, data_file="d.csv", out="s.json",
                     device="cuda", cfg=cfg, graphs_setting=True)
    assert "/m/eager" in bare and " ".join(BARE_FLAGS) in " ".join(bare) and bare[-2:] == ["--cuda-graphs", "on"]
    no_setting = pass_argv(vs["fisher bare B32 eager graphs=off"], model_dirs=dirs, data_file="d.csv", out="s.json",
                           device="cuda", cfg=cfg, graphs_setting=False)
    assert "--cuda-graphs" not in no_setting
    variability = pass_argv(vs["variability default B32 sdpa graphs=off"], model_dirs=dirs, data_file="d.csv",
                            out="s.json", device="cuda", cfg=cfg, graphs_setting=False)
    assert "--label-check" not in variability and variability[2] == "variability"


def test_has_cuda_graphs_setting_reads_the_dataclass():
    from fastsel.pipeline.config import PipelineConfig

    assert has_cuda_graphs_setting() == ("cuda_graphs" in {f.name for f in dataclasses.fields(PipelineConfig)})


def test_ratios_of_runs_that_differ_in_one_setting():
    def r(config, attn, graphs, pass_s, scoring_s, status="ok"):
        return {"metric": "fisher", "config": config, "B": 32, "attn": attn, "graphs": graphs, "pass_s": pass_s,
                "scoring_s": scoring_s, "status": status}

    runs = {"a": r("default", "sdpa", "off", 1.0, 3.0), "b": r("bare", "sdpa", "off", 1.0, 1.5),
            "c": r("bare", "eager", "off", 2.0, 2.1), "d": r("bare", "sdpa", "on", 0.5, 0.6),
            "e": r("default", "sdpa", "on", 9.0, 9.0, status=NO_GRAPHS_SETTING)}
    ratios = pass_ratios(runs)
    assert ratios == {"default/bare scoring B32 sdpa graphs=off": 2.0, "sdpa/eager pass bare B32 graphs=off": 0.5,
                      "graphs on/off pass bare B32 sdpa": 0.5}
