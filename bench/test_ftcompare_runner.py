"""bench/ftcompare/runner.py: the scheduler, with fake subprocesses (no training, no model)."""
from __future__ import annotations

import json
import sys

from ftcompare.jobs import Job
from ftcompare.results import collect
from ftcompare.runner import run_jobs
from ftcompare_fakes import args_for, fake_results

from fastsel.utils.atomic import atomic_write_text

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
        sj = Job("score", task, 0, "scores", sdir, [sys.executable, str(script), str(sdir), score_kind, "0"])
        jobs.append(sj)
        for i, name in enumerate(("full", "fisher-top-1", "position-top-1")):
            rdir = sdir / name
            res = fake_results(0.8 + 0.01 * i, name)
            jobs.append(Job("train", task, 0, name, rdir, [sys.executable, str(script), str(rdir), "train", "0", json.dumps(res)],
                               deps=[sj.key] if name.startswith("fisher") else [], strategy=name))
    writes = []

    def on_done(failed):
        agg = collect(out, jobs, {"x": 1}, failed)
        atomic_write_text(out / "results.json", json.dumps(agg))
        writes.append(len(failed))

    failed = run_jobs(jobs, a, out, on_done)
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
    failed = run_jobs(jobs, a, out, on_done)
    assert len(writes) == 1 and {(f["task"], f["name"]) for f in failed} == {("rte", "scores"), ("rte", "fisher-top-1")}
