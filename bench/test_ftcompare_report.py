"""bench/ftcompare/report.py (and the --summarize command line): the markdown and the plot."""
from __future__ import annotations

import json

import finetune_compare
from ftcompare.report import plot_summary, render_summary, render_table
from ftcompare.results import merge_results, rank_stability, record_from_run
from ftcompare_fakes import agg_of, fake_plan, fake_results


def test_render_table():
    agg = agg_of({"fisher-top-1": {0: 0.85, 1: 0.86, 2: 0.855}, "position-top-1": {0: 0.80, 1: 0.81, 2: 0.805}},
                 blocks={"fisher-top-1": [4], "position-top-1": [5]})
    for seed, taus in ((0, {"1": 0.6, "2": 0.4, "3": 0.4}), (1, {"1": 0.8, "2": 0.6, "3": 0.6})):
        agg["runs"]["sst2"].setdefault("full", {})[str(seed)] = record_from_run(
            fake_results(0.88, "full", seed, taus=taus), fake_plan(range(6)), 50.0)
    agg["runs"]["sst2"]["lstar-down-2-trunc"] = {"0": record_from_run(fake_results(0.7, "lstar-down-2-trunc"),
                                                                         fake_plan([2, 3], head=3), 9.0)}
    md = render_table(agg, ["sst2"], ["full", "fisher-top-1", "position-top-1", "lstar-down-2-trunc", "bitfit"])
    assert "| sst2 | fisher-top-1 | accuracy | 0.855 ± 0.005 (n=3) | - | 4 (3) | 1,775,234 | 10.0 | 5.0 | 800 |" in md
    assert "| sst2 | full | accuracy | 0.880 ± 0.000 (n=2) |" in md
    assert "2,3 (head on 3) (1)" in md
    assert "| bitfit |" not in md  # not run: no row
    assert "| sst2 | 0.700 ± 0.141 (n=2) [0.50] | 0.500 ± 0.141 (n=2) [0.50] | 0.500 ± 0.141 (n=2) [0.50] |" in md
    assert "fisher-top-1 vs position-top-1" in md and "fisher-top-1 better, beyond seed noise" in md
    assert "better beyond seed noise in 1 (sst2: position-top-1)" in md


def test_held_out_rank_stability_is_recorded_and_rendered():
    res = fake_results(0.9, "full", taus={"1": 0.8})
    res["callbacks"]["rank_stability_heldout"] = {"epochs": {"0": {"ranking": [4, 5, 3, 2, 1, 0]}, "1": {
        "ranking": [5, 4, 3, 2, 1, 0], "kendall_tau": 0.87, "mean_deviation": 0.33}}}
    rec = record_from_run(res, fake_plan(range(6)), 1.0)
    assert rec["rank_taus"] == {"1": 0.8} and rec["rank_taus_heldout"] == {"1": 0.87}
    assert rec["rankings_heldout"]["1"] == [5, 4, 3, 2, 1, 0]
    agg = {"runs": {"sst2": {"full": {"0": rec}}}}
    assert rank_stability(agg, "sst2", suffix="_heldout")["taus"] == {"1": [0.87]}
    md = render_table(agg, ["sst2"], ["full"])
    assert "Fisher passes on training examples" in md and "Fisher passes on held-out validation examples" in md
    assert "0.870" in md


def test_summary_across_studies_merges_tasks_and_counts_verdicts(tmp_path, capsys):
    sst2 = agg_of({"full": {0: 0.83, 1: 0.82}, "fisher-top-1": {0: 0.81, 1: 0.80}, "position-top-1": {0: 0.70, 1: 0.71}},
                  {"fisher-top-1": [4], "position-top-1": [5]})
    sst2["config"] = {"train_examples": {"*": 2000}}
    cola = agg_of({"full": {0: 0.16, 1: 0.18}, "fisher-top-1": {0: 0.07, 1: 0.08}}, task="cola")
    # a later study's seed 2 of sst2/full is merged into the first study's seeds
    extra = agg_of({"full": {2: 0.84}})
    merged = merge_results([sst2, cola, extra])
    assert sorted(merged["runs"]["sst2"]["full"]) == ["0", "1", "2"] and merged["configs"]["cola"] == {}
    md = render_summary(merged, ["sst2", "mrpc", "cola"], ["full", "fisher-top-1", "position-top-1", "bitfit"])
    assert "| strategy | sst2 (accuracy) | cola (accuracy) |" in md  # mrpc: no runs, no column
    assert "| full | 0.830 ± 0.010 (n=3) | 0.170 ± 0.014 (n=2) |" in md
    assert "| position-top-1 | 0.705 ± 0.007 (n=2) | - |" in md and "| bitfit |" not in md
    assert "sst2 | fisher-top-1 vs position-top-1" in md and "Summary: of 1 comparisons" in md
    # the CLI reads the files and prints the same
    paths = []
    for i, agg in enumerate((sst2, cola, extra)):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(agg))
    assert finetune_compare.main(["--summarize", ",".join(map(str, paths)), "--tasks", "sst2,mrpc,cola",
                    "--strategies", "full,fisher-top-1,position-top-1,bitfit"]) == 0
    assert capsys.readouterr().out == md


def test_summary_plot_is_written(tmp_path):
    agg = merge_results([agg_of({"full": {0: 0.83, 1: 0.82}, "fisher-top-1": {0: 0.81, 1: 0.80}}),
                            agg_of({"full": {0: 0.16}}, task="cola")])
    plot_summary(agg, ["sst2", "cola"], ["full", "fisher-top-1"], tmp_path / "summary.png")
    plot_summary(agg, ["cola"], ["full", "fisher-top-1"], tmp_path / "one.png")  # one panel
    assert (tmp_path / "summary.png").stat().st_size > 1000 and (tmp_path / "one.png").stat().st_size > 1000
