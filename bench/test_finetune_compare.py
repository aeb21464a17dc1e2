"""Fast tests of bench/finetune_compare.py: planning, aggregation, statistics, verdict, cost model and the
scheduler (with fake subprocesses). No training, no model.

    PYTHONPATH=$PWD python -m pytest -q bench/test_finetune_compare.py
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

# Loaded from its path, so that the test does not depend on sys.path, the rootdir or bench/conftest.py.
_PATH = Path(__file__).resolve().parent / "finetune_compare.py"
_spec = importlib.util.spec_from_file_location("finetune_compare_under_test", _PATH)
fc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fc  # dataclasses look their module up
_spec.loader.exec_module(fc)


def args_for(tmp_path, *extra):
    a = fc.build_parser().parse_args(["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"), *extra])
    a.train_examples = fc.parse_per_task(a.train_examples)
    a.max_length = fc.parse_per_task(a.max_length)
    a.rank_epochs = [int(e) for e in a.rank_epochs.split(",") if e.strip()]
    return a


# -- small helpers ------------------------------------------------------------------------------------


def test_per_task_values():
    assert fc.parse_per_task("64") == {"*": 64}
    v = fc.parse_per_task("64,rte=128, SST2=32")
    assert v == {"*": 64, "rte": 128, "sst2": 32}
    assert fc.for_task(v, "rte") == 128 and fc.for_task(v, "cola") == 64 and fc.for_task(v, "sst2") == 32
    with pytest.raises(ValueError):
        fc.for_task({"rte": 1}, "cola")


def test_strategy_list_is_the_issues():
    names = [s[0] for s in fc.strategy_table()]
    assert names == ["full", "fisher-top-1", "fisher-top-2", "fisher-top-3", "fisher-bottom-1", "position-top-1",
                     "position-top-3", "random-1", "random-3", "lstar-down-2", "lstar-down-2-trunc", "bitfit", "lora-i",
                     "spafit-1-3-i", "adapters"]
    assert [s[0] for s in fc.strategy_table(["bitfit", "full", ""])] == ["full", "bitfit"]
    assert [s[0] for s in fc.strategy_table(["adapters-all"])] == ["adapters-all"]
    with pytest.raises(SystemExit):
        fc.strategy_table(["fisher-top-9x"])


def test_plan_jobs(tmp_path):
    a = args_for(tmp_path, "--epochs", "3", "--train-examples", "2000,sst2=0", "--max-length", "64,rte=128")
    jobs = fc.plan_jobs(a, Path(a.out), ["sst2", "rte"], [0, 1], fc.strategy_table())
    by = {j.key: j for j in jobs}
    assert len(jobs) == 2 * 2 * (1 + 15)
    assert [j.key for j in jobs[:2]] == ["sst2/seed0/scores", "sst2/seed0/full"]  # seed-major, scoring first

    def flag(j, f):
        return j.cmd[j.cmd.index(f) + 1] if f in j.cmd else None

    r = by["rte/seed1/random-3"]
    assert flag(r, "--strategy") == "random-3-s1" and flag(r, "--seed") == "1" and r.deps == []
    assert flag(r, "--train-examples") == "2000" and flag(r, "--max-length") == "128" and flag(r, "--scores") is None
    assert flag(by["sst2/seed0/random-1"], "--strategy") == "random-1-s0"
    assert flag(by["sst2/seed1/full"], "--train-examples") is None  # 0 = the whole split: no flag
    f = by["rte/seed1/fisher-top-2"]
    assert f.deps == ["rte/seed1/scores"] and flag(f, "--scores").endswith("rte/seed1/scores.fisher.json")
    assert flag(by["rte/seed1/lstar-down-2-trunc"], "--scores").endswith("rte/seed1/scores.variability.json")
    full = by["sst2/seed0/full"]
    assert flag(full, "--rank-epochs") == "1,2,3" and flag(full, "--lr") == "5e-05"
    assert flag(by["sst2/seed0/fisher-top-1"], "--rank-epochs") is None
    ad = by["sst2/seed0/adapters"]
    assert flag(ad, "--strategy") == "position-top-2" and flag(ad, "--tuner") == "adapter" and flag(ad, "--lr") == "0.0005"
    assert flag(by["sst2/seed0/bitfit"], "--lr") == "0.001" and flag(by["sst2/seed0/fisher-bottom-1"], "--lr") == "0.0001"
    s = by["rte/seed0/scores"]
    assert flag(s, "--metric") == "fisher,variability" and "--balanced" in s.cmd and flag(s, "--seed") == "0"
    # fewer epochs than the rank epochs: only those that exist
    a2 = args_for(tmp_path, "--epochs", "2")
    j2 = [j for j in fc.plan_jobs(a2, Path(a2.out), ["sst2"], [0], fc.strategy_table(["full"]))]
    assert [j.kind for j in j2] == ["train"]  # no scoring when no strategy reads scores
    assert flag(j2[0], "--rank-epochs") == "1,2"


# -- records, aggregate, statistics, verdict ---------------------------------------------------------


def fake_results(metric=0.8, strategy="fisher-top-1", seed=0, main="accuracy", extra=None, taus=None, epochs=3):
    hist = [{"epoch": e, "train_loss": 0.5, "train_seconds": 10.0, "eval_seconds": 2.0,
             "metrics": {main: metric - 0.01 * (epochs - e), **(extra or {})}, "eval_loss": 0.4} for e in range(1, epochs + 1)]
    res = {"job": {"strategy": strategy, "tuner": "full", "epochs": epochs, "seed": seed, "max_length": 64,
                   "train_examples": 2000, "lr": 1e-4, "batch_size": 16, "task": "sst2", "rank_examples": 256},
           "task": "sst2", "strategy": strategy, "num_train": 2000, "num_eval": 872, "history": hist,
           "best": {"epoch": epochs, "metrics": hist[-1]["metrics"]}, "main_metric": main, "trainable_params": 1775234,
           "epoch_seconds_mean": 10.0, "cache": {"blocks": 4, "seconds": 5.0, "megabytes": 10.0}, "peak_memory_mb": 800.0,
           "callbacks": {}}
    if taus:
        res["callbacks"]["rank_stability"] = {"epochs": {"0": {"ranking": [4, 5, 3, 2, 1, 0]}, **{
            e: {"ranking": [4, 5, 3, 2, 1, 0], "kendall_tau": t, "mean_deviation": 0.5} for e, t in taus.items()}}}
    return res


def fake_plan(blocks, head=5, n=6):
    return {"blocks": [{"kind": "full" if i in blocks else "frozen"} for i in range(n)], "head_layer": head}


def test_record_from_run():
    rec = fc.record_from_run(fake_results(0.9, "full", taus={"1": 0.8, "2": 0.6}), fake_plan(range(6)), 123.0)
    assert rec["metric"] == 0.9 and rec["metric_name"] == "accuracy" and rec["best_epoch"] == 3
    assert rec["tuned_blocks"] == [0, 1, 2, 3, 4, 5] and rec["head_layer"] == 5 and rec["wall_s"] == 123.0
    assert rec["rank_taus"] == {"1": 0.8, "2": 0.6} and rec["cache_seconds"] == 5.0 and rec["peak_mb"] == 800.0
    assert len(rec["epoch_metrics"]) == 3 and rec["eval_seconds"] == 2.0
    rec = fc.record_from_run(fake_results(0.7, "random-1-s2"), fake_plan([2]), None)
    assert rec["strategy_run"] == "random-1-s2" and "rank_taus" not in rec and rec["tuned_blocks"] == [2]


def agg_of(values: dict[str, dict[int, float]], blocks: dict[str, list[int]] | None = None, task="sst2"):
    runs = {}
    for name, by_seed in values.items():
        for seed, v in by_seed.items():
            rec = fc.record_from_run(fake_results(v, name, seed), fake_plan((blocks or {}).get(name, [5])), 10.0)
            runs.setdefault(task, {}).setdefault(name, {})[str(seed)] = rec
    return {"config": {}, "runs": runs, "scores": {}, "failed": []}


def test_welch_and_paired_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    a, b = [0.81, 0.83, 0.80, 0.84], [0.78, 0.79, 0.74]
    w = fc.welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert math.isclose(w["t"], ref.statistic, rel_tol=1e-9) and math.isclose(w["p"], ref.pvalue, rel_tol=1e-7)
    pa = {0: 0.81, 1: 0.83, 2: 0.80}
    pb = {0: 0.79, 1: 0.80, 2: 0.80, 3: 0.5}  # seed 3 has no partner
    pr = fc.paired(pa, pb)
    ref = stats.ttest_rel([0.81, 0.83, 0.80], [0.79, 0.80, 0.80])
    assert pr["n"] == 3 and (pr["wins"], pr["ties"], pr["losses"]) == (2, 1, 0)
    assert math.isclose(pr["p"], ref.pvalue, rel_tol=1e-7) and math.isclose(pr["mean_diff"], 0.05 / 3, rel_tol=1e-9)
    # degenerate cases
    assert fc.welch([0.8], [0.7, 0.6]) is None
    assert fc.welch([0.8, 0.8], [0.8, 0.8])["p"] == 1.0
    assert fc.welch([0.8, 0.8], [0.7, 0.7])["p"] == 0.0
    assert fc.paired({0: 0.8}, {0: 0.7})["p"] is None
    assert fc.paired({0: 0.8}, {1: 0.7}) is None


def test_mean_std():
    m, s, n = fc.mean_std([0.8, 0.9, 1.0])
    assert math.isclose(m, 0.9) and math.isclose(s, 0.1) and n == 3
    assert fc.mean_std([0.5])[1] is None and fc.fmt_ms([0.5]) == "0.500 (n=1)" and fc.fmt_ms([]) == "-"
    assert fc.fmt_ms([0.8, 0.9, 1.0]) == "0.900 ± 0.100 (n=3)"


def test_verdicts():
    agg = agg_of({
        "fisher-top-1": {0: 0.85, 1: 0.86, 2: 0.855},
        "position-top-1": {0: 0.80, 1: 0.81, 2: 0.805},   # clearly worse
        "random-1": {0: 0.70, 1: 0.90, 2: 0.86},          # noisy
        "fisher-top-3": {0: 0.80},                        # one seed only
        "position-top-3": {0: 0.81, 1: 0.82},
    }, blocks={"fisher-top-1": [4], "position-top-1": [5], "random-1": [4], "fisher-top-3": [3, 4, 5], "position-top-3": [3, 4, 5]})
    vs = {(c["a"], c["b"]): c for c in fc.verdicts(agg, ["sst2"])}
    assert set(vs) == {("fisher-top-1", "position-top-1"), ("fisher-top-1", "random-1"), ("fisher-top-3", "position-top-3")}
    c = vs[("fisher-top-1", "position-top-1")]
    assert c["label"] == "fisher-top-1 better, beyond seed noise" and c["welch"]["p"] < 0.05
    assert math.isclose(c["diff"], 0.05) and c["paired"]["wins"] == 3 and c["same_blocks"] == 0
    c = vs[("fisher-top-1", "random-1")]
    assert c["label"] == "within seed noise" and c["same_blocks"] == 3
    assert vs[("fisher-top-3", "position-top-3")]["label"] == "no test (n < 2)"
    worse = fc.compare(agg_of({"a": {0: 0.5, 1: 0.51}, "b": {0: 0.8, 1: 0.81}}), "sst2", "a", "b")
    assert worse["label"] == "b better, beyond seed noise"


def test_render_table():
    agg = agg_of({"fisher-top-1": {0: 0.85, 1: 0.86, 2: 0.855}, "position-top-1": {0: 0.80, 1: 0.81, 2: 0.805}},
                 blocks={"fisher-top-1": [4], "position-top-1": [5]})
    for seed, taus in ((0, {"1": 0.6, "2": 0.4, "3": 0.4}), (1, {"1": 0.8, "2": 0.6, "3": 0.6})):
        agg["runs"]["sst2"].setdefault("full", {})[str(seed)] = fc.record_from_run(
            fake_results(0.88, "full", seed, taus=taus), fake_plan(range(6)), 50.0)
    agg["runs"]["sst2"]["lstar-down-2-trunc"] = {"0": fc.record_from_run(fake_results(0.7, "lstar-down-2-trunc"),
                                                                         fake_plan([2, 3], head=3), 9.0)}
    md = fc.render_table(agg, ["sst2"], ["full", "fisher-top-1", "position-top-1", "lstar-down-2-trunc", "bitfit"])
    assert "| sst2 | fisher-top-1 | accuracy | 0.855 ± 0.005 (n=3) | - | 4 (3) | 1,775,234 | 10.0 | 5.0 | 800 |" in md
    assert "| sst2 | full | accuracy | 0.880 ± 0.000 (n=2) |" in md
    assert "2,3 (head on 3) (1)" in md
    assert "| bitfit |" not in md  # not run: no row
    assert "| sst2 | 0.700 ± 0.141 (n=2) [0.50] | 0.500 ± 0.141 (n=2) [0.50] | 0.500 ± 0.141 (n=2) [0.50] |" in md
    assert "fisher-top-1 vs position-top-1" in md and "fisher-top-1 better, beyond seed noise" in md
    assert "better beyond seed noise in 1 (sst2: position-top-1)" in md


# -- cost model ---------------------------------------------------------------------------------------


def test_cost_model_roundtrip():
    c = {"train": 2e-4, "eval": 5e-5, "cache": 3e-5, "overhead": 11.0}
    ref = {"task": "sst2", "name": "full", "num_train": 256, "num_eval": 872, "epochs": 1, "tok_train": 20.0, "tok_eval": 25.0,
           "rank_passes": 2, "rank_examples": 256}
    ref["train_s"] = ref["epochs"] * 256 * 20.0 * c["train"]
    ref["eval_s"] = ref["epochs"] * 872 * 25.0 * c["eval"]
    ref["cache_s"] = (256 * 20.0 + 872 * 25.0) * c["cache"]
    rank_s = 2 * 256 * 20.0 * c["train"]
    ref["wall_s"] = c["overhead"] + ref["train_s"] + ref["eval_s"] + ref["cache_s"] + rank_s
    costs = fc.fit_costs([ref])
    got = costs["by"][("sst2", "full")]
    for k in c:
        assert math.isclose(got[k], c[k], rel_tol=1e-9), k
    sec, src = fc.estimate_train("full", "sst2", 2000, 872, 20.0, 25.0, 3, 4, 256, costs)
    want = 11.0 + 3 * (2000 * 20 * 2e-4 + 872 * 25 * 5e-5) + (2000 * 20 + 872 * 25) * 3e-5 + 4 * 256 * 20 * 2e-4
    assert src == "measured" and math.isclose(sec, want, rel_tol=1e-9)
    assert fc.estimate_train("full", "rte", 2000, 277, 60.0, 60.0, 3, 0, 0, costs)[1] == "other task"
    assert fc.estimate_train("bitfit", "rte", 2000, 277, 60.0, 60.0, 3, 0, 0, costs)[1] == "full's cost (upper bound)"
    assert fc.estimate_train("bitfit", "rte", 2000, 277, 60.0, 60.0, 3, 0, 0, {})[1] == "built-in"


def test_padded_tokens():
    assert fc.padded_tokens([10, 20, 5, 5], 2, 64) == 12.5  # batches (10, 20) -> 20, (5, 5) -> 5
    assert fc.padded_tokens([100, 3], 2, 64) == 64


def test_makespan():
    d = {"s": 10.0, "a": 5.0, "b": 5.0, "c": 20.0}
    deps = {"a": ["s"], "b": ["s"]}
    assert fc.makespan(d, deps, ["s", "a", "b", "c"], 1) == 40.0
    # 2 workers: s | c at 0; a at 10 (s done), b at 15 -> 20; c ends at 20
    assert fc.makespan(d, deps, ["s", "a", "b", "c"], 2) == 20.0
    assert fc.makespan({}, {}, [], 2) == 0.0


# -- scheduler with fake subprocesses -----------------------------------------------------------------

_FAKE = r"""
import json, sys, time
from pathlib import Path
out = Path(sys.argv[1]); kind = sys.argv[2]; value = float(sys.argv[3])
time.sleep(0.3)
if kind == "fail":
    print("boom: the fake run failed"); sys.exit(3)
if kind == "score":
    for k in ("fisher", "variability"):
        (out / f"scores.{k}.json").write_text(json.dumps({"ranking": [4, 5, 3, 2, 1, 0], "l_star": 5}))
    sys.exit(0)
res = json.loads(sys.argv[4])
(out / "plan.json").write_text(json.dumps({"blocks": [{"kind": "full"}] * 6, "head_layer": 5}))
(out / "train-state.pt").write_text("x")
(out / "results.json").write_text(json.dumps(res))
"""


def test_scheduler_parallel_resume_and_failures(tmp_path):
    script = tmp_path / "fake.py"
    script.write_text(_FAKE)
    out = tmp_path / "out"
    a = args_for(tmp_path, "--jobs", "2")
    jobs = []
    for task, score_kind in (("sst2", "score"), ("rte", "fail")):
        sdir = out / task / "seed0"
        sj = fc.Job("score", task, 0, "scores", sdir, [sys.executable, str(script), str(sdir), score_kind, "0"])
        jobs.append(sj)
        for i, name in enumerate(("full", "fisher-top-1", "position-top-1")):
            rdir = sdir / name
            res = fake_results(0.8 + 0.01 * i, name)
            jobs.append(fc.Job("train", task, 0, name, rdir, [sys.executable, str(script), str(rdir), "train", "0", json.dumps(res)],
                               deps=[sj.key] if name.startswith("fisher") else [], strategy=name))
    writes = []

    def on_done(failed):
        agg = fc.collect(out, jobs, {"x": 1}, failed)
        fc.atomic_write_text(out / "results.json", json.dumps(agg))
        writes.append(len(failed))

    failed = fc.run_jobs(jobs, a, out, on_done)
    assert len(writes) == 7  # one write per finished subprocess (6 started + the skipped dependent is not one)
    keys = {(f["task"], f["name"]) for f in failed}
    assert keys == {("rte", "scores"), ("rte", "fisher-top-1")}
    assert "exit 3" in next(f["error"] for f in failed if f["name"] == "scores")
    agg = json.loads((out / "results.json").read_text())
    assert set(agg["runs"]["sst2"]) == {"full", "fisher-top-1", "position-top-1"}
    assert set(agg["runs"]["rte"]) == {"full", "position-top-1"}
    assert agg["scores"]["sst2"]["0"]["fisher_ranking"] == [4, 5, 3, 2, 1, 0]
    rd = out / "sst2" / "seed0" / "full"
    assert (rd / "wall.json").is_file() and not (rd / "train-state.pt").exists() and (rd / "log.txt").is_file()
    assert (out / "sst2" / "seed0" / "score_wall.json").is_file()
    # resumable: only the failed ones run again (and fail again)
    writes.clear()
    failed = fc.run_jobs(jobs, a, out, on_done)
    assert len(writes) == 1 and {(f["task"], f["name"]) for f in failed} == {("rte", "scores"), ("rte", "fisher-top-1")}


def test_settings_mismatch(tmp_path):
    a = args_for(tmp_path, "--epochs", "3", "--train-examples", "2000")
    job = next(j for j in fc.plan_jobs(a, Path(a.out), ["sst2"], [0], fc.strategy_table(["fisher-top-1"])) if j.kind == "train")
    res = fake_results(0.8, "fisher-top-1", 0)
    assert fc.settings_mismatch(job, res) == []
    res["job"]["epochs"] = 2
    res["job"]["lr"] = 5e-5
    bad = fc.settings_mismatch(job, res)
    assert any(b.startswith("epochs") for b in bad) and any(b.startswith("lr") for b in bad)


def test_score_mismatch(tmp_path):
    a = args_for(tmp_path, "--max-length", "64,rte=128", "--score-examples", "512")
    job = next(j for j in fc.plan_jobs(a, Path(a.out), ["rte"], [2], fc.strategy_table(["fisher-top-1"])) if j.kind == "score")
    cfg = {"num_examples": 512, "seed": 2, "max_length": 128, "balanced": True, "task": "rte"}
    assert fc.score_mismatch(job, {"config": cfg}, 512) == []
    assert fc.score_mismatch(job, {"config": dict(cfg, num_examples=32)}, 512) == ["scores num_examples 32 != 512"]


def test_held_out_rank_stability_is_recorded_and_rendered():
    res = fake_results(0.9, "full", taus={"1": 0.8})
    res["callbacks"]["rank_stability_heldout"] = {"epochs": {"0": {"ranking": [4, 5, 3, 2, 1, 0]}, "1": {
        "ranking": [5, 4, 3, 2, 1, 0], "kendall_tau": 0.87, "mean_deviation": 0.33}}}
    rec = fc.record_from_run(res, fake_plan(range(6)), 1.0)
    assert rec["rank_taus"] == {"1": 0.8} and rec["rank_taus_heldout"] == {"1": 0.87}
    assert rec["rankings_heldout"]["1"] == [5, 4, 3, 2, 1, 0]
    agg = {"runs": {"sst2": {"full": {"0": rec}}}}
    assert fc.rank_stability(agg, "sst2", suffix="_heldout")["taus"] == {"1": [0.87]}
    md = fc.render_table(agg, ["sst2"], ["full"])
    assert "Fisher passes on training examples" in md and "Fisher passes on held-out validation examples" in md
    assert "0.870" in md


def test_summary_across_studies_merges_tasks_and_counts_verdicts(tmp_path, capsys):
    sst2 = agg_of({"full": {0: 0.83, 1: 0.82}, "fisher-top-1": {0: 0.81, 1: 0.80}, "position-top-1": {0: 0.70, 1: 0.71}},
                  {"fisher-top-1": [4], "position-top-1": [5]})
    sst2["config"] = {"train_examples": {"*": 2000}}
    cola = agg_of({"full": {0: 0.16, 1: 0.18}, "fisher-top-1": {0: 0.07, 1: 0.08}}, task="cola")
    # a later study's seed 2 of sst2/full is merged into the first study's seeds
    extra = agg_of({"full": {2: 0.84}})
    merged = fc.merge_results([sst2, cola, extra])
    assert sorted(merged["runs"]["sst2"]["full"]) == ["0", "1", "2"] and merged["configs"]["cola"] == {}
    md = fc.render_summary(merged, ["sst2", "mrpc", "cola"], ["full", "fisher-top-1", "position-top-1", "bitfit"])
    assert "| strategy | sst2 (accuracy) | cola (accuracy) |" in md  # mrpc: no runs, no column
    assert "| full | 0.830 ± 0.010 (n=3) | 0.170 ± 0.014 (n=2) |" in md
    assert "| position-top-1 | 0.705 ± 0.007 (n=2) | - |" in md and "| bitfit |" not in md
    assert "sst2 | fisher-top-1 vs position-top-1" in md and "Summary: of 1 comparisons" in md
    # the CLI reads the files and prints the same
    paths = []
    for i, agg in enumerate((sst2, cola, extra)):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(agg))
    assert fc.main(["--summarize", ",".join(map(str, paths)), "--tasks", "sst2,mrpc,cola",
                    "--strategies", "full,fisher-top-1,position-top-1,bitfit"]) == 0
    assert capsys.readouterr().out == md


def test_summary_plot_is_written(tmp_path):
    agg = fc.merge_results([agg_of({"full": {0: 0.83, 1: 0.82}, "fisher-top-1": {0: 0.81, 1: 0.80}}),
                            agg_of({"full": {0: 0.16}}, task="cola")])
    fc.plot_summary(agg, ["sst2", "cola"], ["full", "fisher-top-1"], tmp_path / "summary.png")
    fc.plot_summary(agg, ["cola"], ["full", "fisher-top-1"], tmp_path / "one.png")  # one panel
    assert (tmp_path / "summary.png").stat().st_size > 1000 and (tmp_path / "one.png").stat().st_size > 1000


def test_sign_test_is_the_exact_binomial_tail_and_pooling_counts_seeds():
    def exact(w, l):  # 2 P(W <= min(w, l)), W ~ Binomial(w + l, 1/2), capped at 1
        n = w + l
        return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(w, l) + 1)) / 2 ** n)

    for w, l in ((8, 2), (3, 7), (5, 5), (0, 4), (10, 0), (1, 0)):
        assert fc.sign_test(w, l) == pytest.approx(exact(w, l), rel=1e-12)
    assert fc.sign_test(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096, rel=1e-12)  # the pooled MRPC..CoLA case
    assert fc.sign_test(0, 0) == 1.0
    a = agg_of({"fisher-top-1": {0: 0.81, 1: 0.80, 2: 0.82}, "position-top-1": {0: 0.79, 1: 0.80, 2: 0.80}},
               {"fisher-top-1": [4], "position-top-1": [5]})
    b = agg_of({"fisher-top-1": {0: 0.10, 1: 0.05}, "position-top-1": {0: 0.05, 1: 0.07}},
               {"fisher-top-1": [4], "position-top-1": [5]}, task="cola")
    pooled = fc.pooled_verdicts(fc.verdicts(fc.merge_results([a, b]), ["sst2", "cola"]))
    assert len(pooled) == 1
    k = pooled[0]
    assert (k["a"], k["b"], k["tasks"]) == ("fisher-top-1", "position-top-1", ["sst2", "cola"])
    assert (k["wins"], k["ties"], k["losses"]) == (3, 1, 1) and k["p"] == pytest.approx(fc.sign_test(3, 1))
    md = fc.render_summary(fc.merge_results([a, b]), ["sst2", "cola"], ["fisher-top-1", "position-top-1"])
    assert "| fisher-top-1 vs position-top-1 | sst2, cola | 3/1/1 |" in md
