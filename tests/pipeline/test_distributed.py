"""Several processes (gloo on CPU): each rank scores its shard, accumulators are reduced (Fisher: sums;
class statistics: exact merge), rank 0 writes; results equal the single-process ones."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastsel.pipeline.config import PipelineConfig, ScoreConfig
from fastsel.pipeline.outputs import output_path
from fastsel.pipeline.streamed import run_pipeline
from tests.dist_helpers import assert_scores_close, free_port

REPO = Path(__file__).resolve().parents[2]
N = 90


def _cfg(tiny_dir, data_dir, metric="fisher,variability"):
    return ScoreConfig(metric=metric, model=tiny_dir, task="sst2", data_dir=str(data_dir), num_examples=N, batch_size=4,
                       max_length=40, options={"fisher": "sampled"})


def _worker(rank: int, world: int, port: int, cfg_json: str, pcfg_json: str, out: str, cache: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FASTSEL_CACHE=cache)
    import fastsel.pipeline  # noqa: F401  (the metric drivers register themselves in the spawned process)
    scores = run_pipeline(ScoreConfig.from_json(cfg_json), PipelineConfig.from_json(pcfg_json), out=out, progress=False)
    assert not dist.is_initialized()  # the pass tore its group down
    assert scores["fisher"].num_examples == N  # every rank holds the reduced result


@pytest.mark.parametrize("max_tokens", [None, 120])
def test_two_gloo_processes_equal_one(tmp_path, tiny_dir, data_dir, monkeypatch, max_tokens):
    cache = str(tmp_path / "cache")
    monkeypatch.setenv("FASTSEL_CACHE", cache)
    cfg = _cfg(tiny_dir, data_dir)
    pcfg = PipelineConfig(max_tokens=max_tokens, checkpoint_dir=str(tmp_path / "ck2"), checkpoint_every_examples=16)
    one = tmp_path / "one.json"
    run_pipeline(cfg, PipelineConfig(max_tokens=max_tokens), out=one, progress=False)
    two = tmp_path / "two.json"
    mp.spawn(_worker, args=(2, free_port(), cfg.to_json(), pcfg.to_json(), str(two), cache), nprocs=2, join=True)
    for metric in ("fisher", "variability"):
        a = json.loads(output_path(one, metric, 2).read_text())
        b = json.loads(output_path(two, metric, 2).read_text())
        assert b["pipeline"]["world_size"] == 2
        assert_scores_close(a, b)
    # one checkpoint file per rank, each covering its own shard
    files = sorted(p.name for p in (tmp_path / "ck2").iterdir())
    assert files == ["rank0-of-2.pt", "rank1-of-2.pt"]
    ex = [torch.load(tmp_path / "ck2" / f, weights_only=False)["examples"] for f in files]
    assert sum(ex) == N and min(ex) > 0


def test_torchrun_cli_equals_single_process(tmp_path, tiny_dir, data_dir):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed next to this python")
    env = dict(os.environ, PYTHONPATH=str(REPO), FASTSEL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    args = ["score", "--metric", "fisher", "--model", tiny_dir, "--task", "sst2", "--data-dir", str(data_dir),
            "--num-examples", str(N), "--max-tokens", "200", "--max-length", "40", "--fisher", "sampled", "--no-progress"]
    subprocess.run([sys.executable, "-m", "fastsel", *args, "--out", str(tmp_path / "one.json")], env=env, check=True,
                   capture_output=True)
    run = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "fastsel", *args,
                          "--out", str(tmp_path / "two.json")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("ranking (best first)") == 1  # rank 0 alone prints and writes
    assert_scores_close(json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text()))


def test_probe_head_two_gloo_processes_equal_one(tmp_path, tiny_dir, data_dir, monkeypatch):
    """--head probe under torchrun: every rank fits, rank 0's head (and rank 0's permuted-label head in the label
    check) is broadcast, so the two-process scores equal the one-process scores."""
    cache = str(tmp_path / "cache")
    monkeypatch.setenv("FASTSEL_CACHE", cache)
    cfg = ScoreConfig(metric="fisher", model=tiny_dir, task="sst2", data_dir=str(data_dir), num_examples=N, batch_size=4,
                      max_length=40, options={"head": "probe", "probe_examples": 60, "label_check": 0.3})
    one = tmp_path / "one.json"
    run_pipeline(cfg, PipelineConfig(), out=one, progress=False)
    two = tmp_path / "two.json"
    mp.spawn(_worker, args=(2, free_port(), cfg.to_json(), PipelineConfig().to_json(), str(two), cache), nprocs=2,
             join=True)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["head"]["kind"] == b["head"]["kind"] == "probe"
    assert_scores_close(a, b)
    torch.testing.assert_close(torch.tensor(b["label_dependence"]["permuted_scores"]),
                               torch.tensor(a["label_dependence"]["permuted_scores"]), rtol=1e-4, atol=0)
