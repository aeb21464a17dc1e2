"""Ranking confidence (fastsel.scores.confidence): per-group accumulators beside the totals, Kendall tau / top-k
agreement between halves, delete-one-group jackknife intervals; independent of batching; CLI table and errors.
(Resume and two gloo processes: tests/pipeline/test_resume.py and tests/pipeline/test_distributed.py compare ranking_confidence.)"""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from scipy import stats as sps

from fastsel.cli.app import main
from fastsel.data.corpus import load_tokenized_corpus, schedule_batches
from fastsel.pipeline.config import PipelineConfig, ScoreConfig
from fastsel.pipeline.context import PipelineContext
from fastsel.pipeline.distributed import DistEnv
from fastsel.pipeline.drivers.fisher import FisherConsumer
from fastsel.pipeline.drivers.variability import VariabilityConsumer
from fastsel.pipeline.streamed import run_pass
from fastsel.scores.confidence import (
    confidence_from_groups,
    interval_quantile,
    jackknife_bias,
    jackknife,
    kendall_tau_b,
    rank_intervals,
    ranking_confidence,
    topk_agreement,
)
from fastsel.scores.variability import merge_class_stats, variability_ratio
from tests.dist_helpers import assert_scores_close, free_port

N = 80

T3 = 3.182446305284263  # Student's t, 97.5% quantile, 3 degrees of freedom (tables): the interval factor for K = 4


def test_interval_quantile_is_students_t_with_k_minus_1_dof():
    assert interval_quantile(4) == pytest.approx(T3, rel=1e-12)
    assert interval_quantile(2) == pytest.approx(12.706204736174707, rel=1e-12)
    assert interval_quantile(10_000) == pytest.approx(1.959963984540054, rel=1e-3)  # -> the normal quantile
    with pytest.raises(ValueError, match="at least 2 groups"):
        interval_quantile(1)


def _setup(tiny_dir, data_dir, pcfg=None, **kw):
    from fastsel.hf.loading import load_model

    base = dict(model=tiny_dir, task="sst2", data_dir=str(data_dir), num_examples=N, batch_size=8, max_length=40,
                metric="fisher,variability")
    base.update(kw)
    cfg = ScoreConfig(**base)
    pcfg = pcfg or PipelineConfig()
    model, tok, lmap = load_model(cfg.model, num_labels=2, seed=cfg.seed)
    corpus = load_tokenized_corpus(cfg, tok, pcfg.cache_dir)
    return PipelineContext(cfg, pcfg, model, tok, lmap, corpus.task, torch.device("cpu"), len(corpus)), corpus


def _pass(ctx, corpus):
    return run_pass(ctx, corpus, [FisherConsumer(ctx), VariabilityConsumer(ctx)], DistEnv(), progress=False).consumers


# -- the statistics ---------------------------------------------------------------------------------------


def test_tau_topk_jackknife_rank_intervals_against_numpy_scipy():
    rng = np.random.default_rng(0)
    for trial in range(30):
        L = int(rng.integers(2, 9))
        a = rng.normal(size=L)
        b = rng.normal(size=L)
        if trial % 3 == 0:  # ties
            a, b = np.round(a), np.round(b)
        want = sps.kendalltau(a, b).statistic
        got = kendall_tau_b(a, b)
        assert (np.isnan(want) and np.isnan(got)) or got == pytest.approx(want, abs=1e-12)
        for hib in (True, False):
            for k in (1, 2, 3):
                order = (lambda v: sorted(range(L), key=lambda l: ((-v[l] if hib else v[l]), l)))
                kk = min(k, L)
                assert topk_agreement(a, b, k, hib) == len(set(order(a)[:kk]) & set(order(b)[:kk])) / kk
    K, L = 4, 5
    leave = rng.normal(size=(K, L))
    full = rng.normal(size=L)
    se = np.sqrt((K - 1) / K * ((leave - leave.mean(0)) ** 2).sum(0))
    iv = jackknife(full, leave)
    np.testing.assert_allclose(np.array(iv), np.stack([full - T3 * se, full + T3 * se], 1), rtol=1e-12)
    # jackknife bias: with one example per group, the plug-in variance corrected by it is the unbiased variance
    x = rng.normal(size=(6, 3))
    plug_in = lambda v: v.var(0, ddof=0)  # noqa: E731
    leave_one = np.stack([plug_in(np.delete(x, g, 0)) for g in range(6)])
    corrected = plug_in(x) - np.array(jackknife_bias(plug_in(x), leave_one))
    np.testing.assert_allclose(corrected, x.var(0, ddof=1), rtol=1e-12)
    # rank intervals: best = 1 + intervals entirely better, worst = L - intervals entirely worse
    ivs = [(0.0, 1.0), (0.5, 2.0), (3.0, 4.0), (3.5, 3.6), (-1.0, -0.5)]
    got = rank_intervals(ivs, higher_is_better=True)
    assert got == [(3, 4), (3, 4), (1, 2), (1, 2), (5, 5)]
    assert rank_intervals(ivs, higher_is_better=False) == [(2, 3), (2, 3), (4, 5), (4, 5), (1, 1)]
    conf = ranking_confidence(list(full), list(leave[0]), list(leave[1]), leave, True)
    assert conf["method"] == "jackknife over K groups of examples" and conf["groups"] == K
    assert [d["layer"] for d in conf["layers"]] == list(range(L)) and set(conf["topk_agreement_halves"]) == {"1", "2", "3"}


def test_unavailable_when_a_subset_cannot_be_scored():
    def scores_of(groups):
        raise ValueError("a class has fewer than 2 examples")

    conf = confidence_from_groups([1.0, 2.0], scores_of, 4, True)
    assert conf["groups"] == 4 and "unavailable" in conf and "layers" not in conf


# -- the accumulators --------------------------------------------------------------------------------------


def _group_sizes(ctx, corpus, unit):
    """The examples of each of the 4 groups: whole batches of the pass's schedule (b mod 4), or index mod 4."""
    if unit == "examples":
        return [len(range(g, N, 4)) for g in range(4)]
    schedule = schedule_batches(corpus.lengths(), batch_size=ctx.config.batch_size, max_tokens=ctx.pipeline.max_tokens,
                                bucket=ctx.pipeline.bucket, seed=ctx.config.seed)
    return [sum(len(b) for b in schedule[g::4]) for g in range(4)]


@pytest.mark.parametrize("unit", ["batches", "examples"])
@pytest.mark.parametrize("mode", ["empirical", "sampled", "exact"])
def test_group_accumulators_sum_to_the_unchanged_totals(tiny_dir, data_dir, cache, mode, unit):
    """Groups-only accumulation: the totals (the sum of the groups) equal a run without groups within float32
    rounding; results unchanged; each group holds its batches (b mod K) or its examples (index mod K)."""
    ctx0, corpus = _setup(tiny_dir, data_dir, confidence_groups=0, options={"fisher": mode})
    plain_f, plain_v = _pass(ctx0, corpus)
    ctx, corpus = _setup(tiny_dir, data_dir, options={"fisher": mode}, confidence_unit=unit)
    assert ctx.confidence_unit == unit
    fis, var = _pass(ctx, corpus)
    sizes = _group_sizes(ctx, corpus, unit)
    assert fis.groups == var.groups == 4 and fis.acc.group_counts == sizes and sum(sizes) == N
    assert [g.num_examples for g in var.group_stats] == sizes
    blocks = {n for l in range(ctx.layer_map.num_layers) for n in ctx.layer_map.groups(ctx.model)[f"layer.{l}"]}
    assert fis.acc.group_names == blocks  # K-fold sums only of what the confidence ranks
    assert set(fis.acc.sums) == set(plain_f.acc.sums) - blocks and not fis.acc.sums_used
    for n, s in plain_f.acc.totals().items():
        torch.testing.assert_close(fis.acc.totals()[n], s)  # groups-only: their sum, within float32 rounding
        mine = sum(g[n].double() for g in fis.acc.group_sums) if n in blocks else fis.acc.sums[n].double()
        torch.testing.assert_close(mine, s.double(), rtol=2e-5, atol=1e-10)
    fis_scores, plain_f_scores = fis.result(), plain_f.result()  # once each: the result spends the Fisher sums
    assert fis_scores.info["ranking_confidence"]["method"] == f"jackknife over K groups of {unit}"
    for i in range(var.stats.num_layers):
        # the same sums up to float32 rounding of the hidden states: the batch is sorted by group, and a GEMM's
        # result for a row may depend on where the row sits (CI's CPU differed by 1 ulp here)
        for a, b in zip(var.stats.layer(i), plain_v.stats.layer(i)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
        merged = var.group_stats[0].layer(i)
        for g in var.group_stats[1:]:
            merged = merge_class_stats(*merged, *g.layer(i))
        for a, b in zip(merged, var.stats.layer(i)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    new, old = var.result(), plain_v.result()  # float64 statistics summed in another row order: equal to ~1e-15
    for a, b in zip(new.layers, old.layers):
        a, b = a.to_dict(), b.to_dict()
        assert {k: v for k, v in a.items() if not isinstance(v, float)} == {k: v for k, v in b.items() if not isinstance(v, float)}
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-12) for k in a if isinstance(a[k], float))
    new, old = fis_scores, plain_f_scores  # the Fisher totals are the groups' sum: equal within float32 rounding
    for a, b in zip(new.layers, old.layers):
        assert (a.layer, a.name, a.num_params) == (b.layer, b.name, b.num_params)
        torch.testing.assert_close(torch.tensor([a.score, a.trace, a.values["tensor_norm_sum"]], dtype=torch.float64),
                                   torch.tensor([b.score, b.trace, b.values["tensor_norm_sum"]], dtype=torch.float64),
                                   rtol=1e-5, atol=0)
    for new, old in ((var.result(), plain_v.result()), (fis_scores, plain_f_scores)):
        assert "ranking_confidence" in new.info and "ranking_confidence" not in old.info


def test_confidence_equals_numpy_on_the_group_statistics(tiny_dir, data_dir, cache):
    ctx, corpus = _setup(tiny_dir, data_dir, options={"fisher": "sampled"})
    fis, var = _pass(ctx, corpus)
    groups = ctx.layer_map.groups(ctx.model)
    L = ctx.layer_map.num_layers

    def fisher_np(gs):
        n = sum(fis.acc.group_counts[g] for g in gs)
        out = []
        for l in range(L):
            sq = sum(float(((sum(fis.acc.group_sums[g][p].double() for g in gs) / n) ** 2).sum())
                     for p in groups[f"layer.{l}"] if p in fis.acc.group_names)
            out.append(np.sqrt(sq))
        return np.array(out)

    def var_np(gs):
        out = []
        for i in range(1, L + 1):
            merged = var.group_stats[gs[0]].layer(i)
            for g in gs[1:]:
                merged = merge_class_stats(*merged, *var.group_stats[g].layer(i))
            out.append(variability_ratio(*merged)["nu"])
        return np.array(out)

    for consumer, scores_np, hib in ((fis, fisher_np, True), (var, var_np, False)):
        res = consumer.result()
        conf = res.info["ranking_confidence"]
        a, b = scores_np([0, 1]), scores_np([2, 3])
        assert conf["kendall_tau_halves"] == pytest.approx(sps.kendalltau(a, b).statistic, abs=1e-12)
        for k in (1, 2, 3):
            top = lambda v: set(np.argsort(-v if hib else v, kind="stable")[:k].tolist())  # noqa: E731
            assert conf["topk_agreement_halves"][str(k)] == len(top(a) & top(b)) / k
        leave = np.stack([scores_np([g for g in range(4) if g != d]) for d in range(4)])
        se = np.sqrt(3 / 4 * ((leave - leave.mean(0)) ** 2).sum(0))
        full = np.array([l.score for l in res.layers])
        got = np.array([d["score_interval"] for d in conf["layers"]])
        np.testing.assert_allclose(got[:, 0], full - T3 * se, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(got[:, 1], full + T3 * se, rtol=1e-6, atol=1e-12)
        bias = np.array([d["jackknife_bias"] for d in conf["layers"]])
        np.testing.assert_allclose(bias, 3 * (leave.mean(0) - full), rtol=1e-5, atol=1e-10)
        ranks = [tuple(d["rank_interval"]) for d in conf["layers"]]
        assert ranks == rank_intervals([tuple(x) for x in got], hib)
        for (r0, r1), r in zip(ranks, [res.ranking.index(l) + 1 for l in range(L)]):
            assert r0 <= r <= r1


def test_groups_of_examples_are_independent_of_batch_size_and_bucketing(tiny_dir, data_dir, cache):
    confs = []
    for bs, pcfg in ((8, PipelineConfig(bucket=False)), (5, PipelineConfig(max_tokens=150, bucket=True)),
                     (16, PipelineConfig(bucket=True))):
        ctx, corpus = _setup(tiny_dir, data_dir, pcfg, batch_size=bs, options={"fisher": "sampled"},
                             confidence_unit="examples")
        confs.append([c.result().info["ranking_confidence"] for c in _pass(ctx, corpus)])
    for a, b in itertools.combinations(confs, 2):
        for x, y in zip(a, b):
            assert x["kendall_tau_halves"] == pytest.approx(y["kendall_tau_halves"], abs=1e-9)
            assert x["topk_agreement_halves"] == y["topk_agreement_halves"]
            np.testing.assert_allclose([d["score_interval"] for d in x["layers"]],
                                       [d["score_interval"] for d in y["layers"]], rtol=1e-4, atol=1e-12)


# -- CLI --------------------------------------------------------------------------------------------------


def test_cli_table_json_and_plot(tmp_path, tiny_dir, data_dir, cache, capsys):
    out, plot = tmp_path / "s.json", tmp_path / "s.png"
    args = ["score", "--model", tiny_dir, "--task", "sst2", "--data-dir", str(data_dir), "--no-progress",
            "--num-examples", "48", "--max-length", "32", "--out", str(out), "--plot", str(plot)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "+-" in text and "rank interval" in text and "Kendall tau between halves" in text
    d = json.loads(out.read_text())
    conf = d["ranking_confidence"]
    assert conf["method"] == "jackknife over K groups of examples" and conf["groups"] == 4
    assert len(conf["layers"]) == len(d["layers"]) and plot.stat().st_size > 0
    assert main(args + ["--confidence-groups", "6"]) == 0
    assert json.loads(out.read_text())["ranking_confidence"]["groups"] == 6
    capsys.readouterr()
    assert main(args + ["--confidence-groups", "0"]) == 0
    assert "ranking_confidence" not in json.loads(out.read_text())
    assert "Kendall tau between halves" not in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["1", "-2"])
def test_bad_group_counts_are_one_line_errors(tmp_path, tiny_dir, data_dir, cache, capsys, bad):
    args = ["score", "--model", tiny_dir, "--task", "sst2", "--data-dir", str(data_dir), "--no-progress",
            "--num-examples", "8", "--confidence-groups", bad]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "confidence" in err and "\n" not in err


# -- --until-stable ---------------------------------------------------------------------------------------


def _score_args(tiny_dir, data_dir, n, *extra):
    return ["score", "--model", tiny_dir, "--task", "sst2", "--data-dir", str(data_dir), "--no-progress",
            "--num-examples", str(n), "--max-length", "32", "--batch-size", "8", *extra]


def test_until_stable_stops_early_and_records_n(tmp_path, tiny_dir, data_dir, cache, capsys):
    out = tmp_path / "s.json"
    assert main(_score_args(tiny_dir, data_dir, 400, "--until-stable", "--check-every", "32", "--stable-tau", "0.5",
                            "--out", str(out))) == 0
    d = json.loads(out.read_text())
    us = d["until_stable"]
    assert us["stable"] and not us["reached_end"] and us["examples_available"] == 400
    assert d["num_examples"] == us["examples_used"] < 400 and us["examples_used"] % 32 == 0
    last = us["checks"][-3:]
    assert len(last) == 3 and all(c["fisher"]["top3"] == last[-1]["fisher"]["top3"] for c in last)
    assert last[-1]["fisher"]["kendall_tau_halves"] >= 0.5
    assert "stable after" in capsys.readouterr().out


def test_until_stable_reaching_the_end_is_a_note(tmp_path, tiny_dir, data_dir, cache, capsys):
    out = tmp_path / "s.json"
    assert main(_score_args(tiny_dir, data_dir, 40, "--until-stable", "--check-every", "16", "--stable-checks", "9",
                            "--out", str(out))) == 0
    cap = capsys.readouterr()
    d = json.loads(out.read_text())
    assert d["until_stable"]["reached_end"] and not d["until_stable"]["stable"] and d["num_examples"] == 40
    assert "note" in d["until_stable"] and "reached the end of the data" in cap.err and "error" not in cap.err
    assert "reached the end" in cap.out


def test_until_stable_resume_gives_the_same_stop(tmp_path, tiny_dir, data_dir, cache, monkeypatch):
    from fastsel.pipeline.streamed import run_pipeline

    cfg = ScoreConfig(model=tiny_dir, task="sst2", data_dir=str(data_dir), num_examples=400, batch_size=8, max_length=32,
                      metric="fisher,variability", options={"fisher": "sampled"})
    kw = dict(until_stable=True, check_every_examples=32, stable_tau=0.5)
    ref = run_pipeline(cfg, PipelineConfig(**kw), progress=False)
    ck = str(tmp_path / "ck")
    calls = {"n": 0}
    real = FisherConsumer.consume

    def dying(self, batch, outputs):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real(self, batch, outputs)

    monkeypatch.setattr(FisherConsumer, "consume", dying)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, PipelineConfig(checkpoint_dir=ck, checkpoint_every_examples=16, **kw), progress=False)
    monkeypatch.setattr(FisherConsumer, "consume", real)
    got = run_pipeline(cfg, PipelineConfig(checkpoint_dir=ck, checkpoint_every_examples=16, resume=True, **kw), progress=False)
    for m in ("fisher", "variability"):
        assert got[m].info["until_stable"] == ref[m].info["until_stable"]
        assert got[m].num_examples == ref[m].num_examples < 400
        assert got[m].info["ranking_confidence"] == ref[m].info["ranking_confidence"]
        assert [l.score for l in got[m].layers] == [l.score for l in ref[m].layers]
    # the finished (stopped) checkpoint resumes to the same result without going on
    again = run_pipeline(cfg, PipelineConfig(checkpoint_dir=ck, checkpoint_every_examples=16, resume=True, **kw), progress=False)
    assert again["fisher"].num_examples == ref["fisher"].num_examples


@pytest.mark.parametrize("extra, what", [
    (["--stable-tau", "0"], "--stable-tau"), (["--stable-tau", "1.5"], "--stable-tau"), (["--stable-tau", "nan"], "--stable-tau"),
    (["--check-every", "0"], "--check-every"), (["--stable-checks", "0"], "--stable-checks"),
    (["--confidence-groups", "0"], "--confidence-groups"),
])
def test_until_stable_bad_targets_are_one_line_errors(tiny_dir, data_dir, cache, capsys, extra, what):
    assert main(_score_args(tiny_dir, data_dir, 8, "--until-stable", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and what in err and "\n" not in err


def _stable_worker(rank: int, world: int, port: int, cfg_json: str, pcfg_json: str, out: str, cache: str) -> None:
    import os

    from fastsel.pipeline.streamed import run_pipeline

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FASTSEL_CACHE=cache)
    import fastsel.pipeline  # noqa: F401  (the metric drivers register themselves in the spawned process)
    run_pipeline(ScoreConfig.from_json(cfg_json), PipelineConfig.from_json(pcfg_json), out=out, progress=False)


def test_until_stable_two_gloo_processes_equal_one(tmp_path, tiny_dir, data_dir, monkeypatch):
    """Both ranks check at the same points on reduced statistics: same stop, same N, same confidence."""
    import torch.multiprocessing as mp

    from fastsel.pipeline.outputs import output_path
    from fastsel.pipeline.streamed import run_pipeline

    cache = str(tmp_path / "cache")
    monkeypatch.setenv("FASTSEL_CACHE", cache)
    cfg = ScoreConfig(model=tiny_dir, task="sst2", data_dir=str(data_dir), num_examples=400, batch_size=8, max_length=32,
                      metric="fisher,variability", options={"fisher": "sampled"})
    pcfg = PipelineConfig(until_stable=True, check_every_examples=32, stable_tau=0.5)  # 4 batches per check: 2 per rank
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    run_pipeline(cfg, pcfg, out=one, progress=False)
    mp.spawn(_stable_worker, args=(2, free_port(), cfg.to_json(), pcfg.to_json(), str(two), cache), nprocs=2, join=True)
    for metric in ("fisher", "variability"):
        a = json.loads(output_path(one, metric, 2).read_text())
        b = json.loads(output_path(two, metric, 2).read_text())
        assert b["pipeline"]["world_size"] == 2 and a["until_stable"]["stable"]
        assert a["until_stable"]["examples_used"] == b["until_stable"]["examples_used"] == a["num_examples"] < 400
        assert [c[metric]["top3"] for c in a["until_stable"]["checks"]] == [c[metric]["top3"] for c in b["until_stable"]["checks"]]
        assert_scores_close(a, b)


def test_group_unit_auto_takes_batches_from_two_per_group():
    from fastsel.scores.confidence import group_unit

    assert group_unit(64, 8, 4) == "batches" and group_unit(63, 8, 4) == "examples"  # 2 x 4 batches of 8
    assert group_unit(10, 8, 4, "batches") == "batches" and group_unit(10_000, 8, 4, "examples") == "examples"
    with pytest.raises(ValueError, match="--confidence-unit must be auto, batches or examples, got 'rows'"):
        group_unit(64, 8, 4, "rows")
