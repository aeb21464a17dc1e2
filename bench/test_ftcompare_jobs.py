"""bench/ftcompare/jobs.py: the planned commands, and the settings checks of finished runs."""
from __future__ import annotations

from pathlib import Path

from ftcompare.config import strategy_table
from ftcompare.jobs import plan_jobs, score_mismatch, settings_mismatch
from ftcompare_fakes import args_for, fake_results


def test_plan_jobs(tmp_path):
    a = args_for(tmp_path, "--epochs", "3", "--train-examples", "2000,sst2=0", "--max-length", "64,rte=128")
    jobs = plan_jobs(a, Path(a.out), ["sst2", "rte"], [0, 1], strategy_table())
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
    j2 = [j for j in plan_jobs(a2, Path(a2.out), ["sst2"], [0], strategy_table(["full"]))]
    assert [j.kind for j in j2] == ["train"]  # no scoring when no strategy reads scores
    assert flag(j2[0], "--rank-epochs") == "1,2"


def test_settings_mismatch(tmp_path):
    a = args_for(tmp_path, "--epochs", "3", "--train-examples", "2000")
    job = next(j for j in plan_jobs(a, Path(a.out), ["sst2"], [0], strategy_table(["fisher-top-1"])) if j.kind == "train")
    res = fake_results(0.8, "fisher-top-1", 0)
    assert settings_mismatch(job, res) == []
    res["job"]["epochs"] = 2
    res["job"]["lr"] = 5e-5
    bad = settings_mismatch(job, res)
    assert any(b.startswith("epochs") for b in bad) and any(b.startswith("lr") for b in bad)


def test_score_mismatch(tmp_path):
    a = args_for(tmp_path, "--max-length", "64,rte=128", "--score-examples", "512")
    job = next(j for j in plan_jobs(a, Path(a.out), ["rte"], [2], strategy_table(["fisher-top-1"])) if j.kind == "score")
    cfg = {"num_examples": 512, "seed": 2, "max_length": 128, "balanced": True, "task": "rte"}
    assert score_mismatch(job, {"config": cfg}, 512) == []
    assert score_mismatch(job, {"config": dict(cfg, num_examples=32)}, 512) == ["scores num_examples 32 != 512"]


def test_settings_mismatch_reads_nested_training_settings(tmp_path):
    """results.json of FinetuneJob: the training settings (epochs, lr, seed) sit under job["train"]."""
    a = args_for(tmp_path, "--epochs", "3", "--train-examples", "2000")
    job = next(j for j in plan_jobs(a, Path(a.out), ["sst2"], [0], strategy_table(["fisher-top-1"])) if j.kind == "train")
    res = fake_results(0.8, "fisher-top-1", 0)
    flat = res["job"]
    res["job"] = {k: v for k, v in flat.items() if k not in ("epochs", "lr", "seed")}
    res["job"]["train"] = {k: flat[k] for k in ("epochs", "lr", "seed") if k in flat}
    assert settings_mismatch(job, res) == []
    res["job"]["train"]["epochs"] = 2
    assert any(b.startswith("epochs") for b in settings_mismatch(job, res))
