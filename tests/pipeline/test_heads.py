"""--head fresh|probe|warmup:STEPS|DIR, --save-head, the label-dependence check and the block aggregations
(fastsel.pipeline.heads, fastsel.pipeline.drivers.fisher), against a plain per-example loop on the saved checkpoint."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
import torch
from fisher_oracles import oracle_fisher
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fastsel.data.features import PadCollator, tokenize_examples
from fastsel.data.readers import examples_for
from fastsel.hf.layer_map import map_layers
from fastsel.pipeline.config import PipelineConfig, ScoreConfig
from fastsel.pipeline.drivers.fisher import LABEL_FREE_TAU, label_subset, permuted_labels
from fastsel.pipeline.heads import AUTO_MIN_EXAMPLES, fits_on_pool, head_parameter_names, parse_head, probe_pool
from fastsel.pipeline.run import score

POS = "good great best fine funny brilliant wonderful perfect charming clever".split()
NEG = "bad worse worst dull boring silly stupid terrible awful poor".split()
FILLER = "the film movie story plot cast scene it was a and very really quite".split()


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """A CSV of 300 short 'reviews' whose label is carried by one sentiment word: a probe can learn it."""
    rng = random.Random(0)
    rows = ["text,label"]
    for i in range(300):
        label = i % 2
        words = rng.sample(FILLER, 5) + [rng.choice(POS if label else NEG)]
        rng.shuffle(words)
        rows.append(f"{' '.join(words)},{label}")
    path = tmp_path_factory.mktemp("reviews") / "reviews.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _cfg(tiny_dir, reviews, **options) -> ScoreConfig:
    opts = {"probe_examples": 120, **options}
    return ScoreConfig(metric="fisher", model=str(tiny_dir), task="custom", data_file=str(reviews), text_fields=("text",),
                       num_examples=40, batch_size=8, max_length=32, seed=0, confidence_groups=0, options=opts)


def _oracle_blocks(model_dir, cfg: ScoreConfig) -> tuple[list[float], list[float], list[float]]:
    """(frobenius, trace, tensor-norm sum) per block of the saved checkpoint, by oracle_fisher on the scored examples."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    feats = tokenize_examples(examples_for(cfg), tok, cfg.max_length)
    diag = oracle_fisher(model, PadCollator(tok)(feats), "empirical")
    groups = map_layers(model).groups(model)
    frob, trace, norms = [], [], []
    for l in range(map_layers(model).num_layers):
        names = groups[f"layer.{l}"]
        frob.append(math.sqrt(sum(float(diag[n].double().square().sum()) for n in names)))
        trace.append(sum(float(diag[n].double().sum()) for n in names))
        norms.append(sum(math.sqrt(float(diag[n].double().square().sum())) for n in names))
    return frob, trace, norms


def test_probe_head_scores_equal_per_example_loop_on_saved_checkpoint(tiny_dir, reviews, tmp_path, one_thread):
    cfg = _cfg(tiny_dir, reviews, head="probe", save_head=str(tmp_path / "head"))
    scores = score(cfg, PipelineConfig(), out=tmp_path / "s.json", progress=False)["fisher"]
    frob, trace, norms = _oracle_blocks(tmp_path / "head", cfg)
    torch.testing.assert_close(torch.tensor([l.score for l in scores.layers]), torch.tensor(frob), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor([l.trace for l in scores.layers]), torch.tensor(trace), rtol=1e-4, atol=0)
    agg = json.loads((tmp_path / "s.json").read_text())["aggregations"]
    torch.testing.assert_close(torch.tensor(agg["scores"]["tensor_norm_sum"]), torch.tensor(norms), rtol=1e-4, atol=0)
    head = scores.info["head"]
    assert head["kind"] == "probe" and head["fitted"] and head["parameters"] == ["classifier.weight", "classifier.bias"]
    assert head["fit_examples"] + head["heldout_examples"] == head["examples"] == 120


def test_probe_fits_the_head_better_than_the_majority_class(tiny_dir, reviews, tmp_path, one_thread):
    scores = score(_cfg(tiny_dir, reviews, head="probe", label_check=0.25), PipelineConfig(), progress=False)["fisher"]
    head = scores.info["head"]
    assert head["heldout_metrics"]["accuracy"] > head["baseline"]["accuracy"] + 0.1
    dep = scores.info["label_dependence"]
    assert dep["head"] == "refitted on permuted labels"
    # the probe refitted on permuted labels learns nothing that generalises: near the majority class
    assert dep["permuted_head"]["heldout_metrics"]["accuracy"] < head["heldout_metrics"]["accuracy"]


def test_probe_pool_excludes_the_scored_examples(tiny_dir, reviews):
    cfg = _cfg(tiny_dir, reviews)
    scored = examples_for(cfg)
    pool = probe_pool(cfg, scored, 1000)
    assert len(pool) == 300 - 40
    assert not set(pool.text_a) & set(scored.text_a)


def test_saved_head_is_the_head_a_path_run_scores_with(tiny_dir, reviews, tmp_path, one_thread):
    probe = score(_cfg(tiny_dir, reviews, head="probe", save_head=str(tmp_path / "h"), label_check=0), PipelineConfig(),
                  progress=False)["fisher"]
    again = score(_cfg(tiny_dir, reviews, head=str(tmp_path / "h"), label_check=0), PipelineConfig(), progress=False)["fisher"]
    assert again.info["head"]["kind"] == "path"
    torch.testing.assert_close(torch.tensor([l.score for l in again.layers]), torch.tensor([l.score for l in probe.layers]),
                               rtol=1e-6, atol=0)
    fresh = score(_cfg(tiny_dir, reviews, head="fresh", label_check=0), PipelineConfig(), progress=False)["fisher"]
    assert [l.score for l in fresh.layers] != [l.score for l in probe.layers]


def test_auto_head_is_the_probe_when_enough_examples_are_not_scored(tiny_dir, reviews, one_thread, capsys):
    """The default head (auto): a probe fitted on the pool (here 120 of the 260 examples not scored), recorded as
    asked by auto; the same scores as --head probe."""
    auto = score(_cfg(tiny_dir, reviews, label_check=0), PipelineConfig(), progress=False)["fisher"]
    assert auto.info["head"]["kind"] == "probe" and auto.info["head"]["requested"] == "auto"
    assert auto.info["head"]["examples"] == 120
    probe = score(_cfg(tiny_dir, reviews, head="probe", label_check=0), PipelineConfig(), progress=False)["fisher"]
    assert [l.score for l in auto.layers] == [l.score for l in probe.layers]
    assert "--head auto" not in capsys.readouterr().err


def test_auto_head_falls_back_to_fresh_in_one_line_when_few_examples_are_left(tiny_dir, tmp_path, one_thread, capsys):
    """Fewer than AUTO_MIN_EXAMPLES training examples not scored: the fresh head, said on stderr and recorded."""
    small = tmp_path / "small.csv"
    small.write_text("text,label\n" + "".join(f"{'good fine' if i % 2 else 'bad dull'} {i},{i % 2}\n" for i in range(60)))
    cfg = ScoreConfig(metric="fisher", model=str(tiny_dir), task="custom", data_file=str(small), text_fields=("text",),
                      num_examples=20, batch_size=8, max_length=16, seed=0, confidence_groups=0,
                      options={"label_check": 0})
    scores = score(cfg, PipelineConfig(), progress=False)["fisher"]
    head = scores.info["head"]
    assert head["kind"] == "fresh" and head["requested"] == "auto" and "only 40 training examples" in head["why_fresh"]
    lines = [l for l in capsys.readouterr().err.splitlines() if "--head auto" in l]
    assert len(lines) == 1 and f"from {AUTO_MIN_EXAMPLES}" in lines[0]
    fresh = score(ScoreConfig(**{**cfg.to_dict(), "options": {"label_check": 0, "head": "fresh"}}), PipelineConfig(),
                  progress=False)["fisher"]
    assert [l.score for l in scores.layers] == [l.score for l in fresh.layers]


def test_auto_head_fits_a_probe_on_fewer_examples_when_probe_examples_asks_so(tiny_dir, reviews, one_thread):
    scores = score(_cfg(tiny_dir, reviews, probe_examples=50, label_check=0), PipelineConfig(), progress=False)["fisher"]
    assert scores.info["head"]["kind"] == "probe" and scores.info["head"]["examples"] == 50


def test_warmup_head_trains_the_given_number_of_steps(tiny_dir, reviews, one_thread):
    import fastsel.train  # noqa: F401 - registers warmup

    scores = score(_cfg(tiny_dir, reviews, head="warmup:3", label_check=0), PipelineConfig(), progress=False)["fisher"]
    assert scores.info["head"]["kind"] == "warmup" and scores.info["head"]["steps"] == 3
    assert scores.info["head"]["examples"] == 3 * 8


def test_label_check_is_label_free_by_construction_for_exact_mode_with_a_fresh_head(tiny_dir, reviews, one_thread):
    scores = score(_cfg(tiny_dir, reviews, fisher="exact", head="fresh"), PipelineConfig(), progress=False)["fisher"]
    dep = scores.info["label_dependence"]
    assert dep["label_free"] and "by_construction" in dep
    assert "label-free by construction" in scores.table()
    assert scores.info["aggregations"]["scores"]["label_specific"] == [1.0] * len(scores.layers)


@pytest.mark.slow
def test_label_check_says_label_free_for_minilm_with_a_fresh_head(minilm_path, data_dir, one_thread):
    """The measured case of docs/task_aware.md: all-MiniLM-L6-v2 with a random head on SST-2."""
    cfg = ScoreConfig(metric="fisher", model=str(minilm_path), task="sst2", data_dir=str(data_dir), num_examples=64,
                      max_length=48, seed=0, confidence_groups=0, options={"label_check": 0.5, "head": "fresh"})
    scores = score(cfg, PipelineConfig(), progress=False)["fisher"]
    dep = scores.info["label_dependence"]
    assert dep["examples"] == 32 and dep["label_free"] and dep["kendall_tau_vs_permuted_labels"] >= LABEL_FREE_TAU
    assert "label-free" in scores.table() and "--head probe" in scores.table()


def test_label_subset_and_permutation_are_seeded_and_keep_the_label_multiset():
    a, b = label_subset(200, 0.2, 3), label_subset(200, 0.2, 3)
    assert len(a) == 40 and list(a) == list(b) and len(set(a.tolist())) == 40
    labels = torch.arange(200).numpy() % 3
    new = permuted_labels(labels, a, 3)
    assert sorted(new.values()) == sorted(labels[a].tolist()) and set(new) == set(a.tolist())


def test_aggregate_picks_the_ranking_and_label_specific_is_the_ratio(tiny_dir, reviews, one_thread):
    scores = score(_cfg(tiny_dir, reviews, aggregate="trace", label_check=0.5), PipelineConfig(), progress=False)["fisher"]
    agg = scores.info["aggregations"]
    assert agg["ranked_by"] == "trace"
    assert [l.score for l in scores.layers] == agg["scores"]["trace"]
    assert scores.ranking == agg["rankings"]["trace"]
    assert scores.info["label_dependence"]["compared"] == "trace"
    lab = score(_cfg(tiny_dir, reviews, aggregate="label_specific", label_check=0.5), PipelineConfig(), progress=False)["fisher"]
    perm = lab.info["label_dependence"]["permuted_scores"]
    frob = lab.info["aggregations"]["scores"]["frobenius"]
    torch.testing.assert_close(torch.tensor([l.score for l in lab.layers]), torch.tensor([f / p for f, p in zip(frob, perm)]))
    assert lab.info["label_dependence"]["compared"] == "frobenius"
    assert set(agg["kendall_tau"]) == {"frobenius~trace", "frobenius~tensor_norm_sum", "frobenius~label_specific",
                                       "trace~tensor_norm_sum", "trace~label_specific", "tensor_norm_sum~label_specific"}
    assert all(-1 <= t <= 1 for t in agg["kendall_tau"].values())


def test_head_parameter_names_add_what_the_checkpoint_lacked(tiny_dir):
    from fastsel.hf.loading import load_model

    model, _, lm = load_model(str(tiny_dir), num_labels=2)
    names = head_parameter_names(model, lm)
    assert "classifier.weight" in names and all(not n.startswith("bert.encoder") for n in names)


@pytest.mark.parametrize("spec", ["fresh", "probe", "warmup:5"])
def test_parse_head_accepts(spec):
    assert parse_head(spec)[0] == spec.split(":")[0]


@pytest.mark.parametrize("spec, needle", [("warmup:0", "warmup:STEPS"), ("warmup:x", "warmup:STEPS"),
                                          ("/no/such/dir", "neither auto, fresh"), (__file__, "is a file")])
def test_parse_head_refuses(spec, needle):
    with pytest.raises(ValueError, match=needle):
        parse_head(spec)


@pytest.mark.parametrize("flags, needle", [(["--head", "bogus"], "--head"),
                                           (["--aggregate", "label_specific", "--label-check", "0"], "label-check"),
                                           (["--label-check", "1.5"], "--label-check"),
                                           (["--probe-examples", "3"], "--probe-examples")])
def test_cli_refuses_bad_head_options_in_one_line(tiny_dir, reviews, flags, needle):
    cmd = [sys.executable, "-m", "fastsel", "score", "--model", str(tiny_dir), "--task", "custom", "--data-file",
           str(reviews), "--text-fields", "text", "--no-progress", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0]


def test_finetune_starts_every_strategy_from_the_probe_head(tiny_dir, data_dir, tmp_path, one_thread):
    from fastsel.train.config import TrainConfig
    from fastsel.train.finetune import FinetuneJob, run_finetune

    job = dict(model=str(tiny_dir), task="sst2", data_dir=str(data_dir), strategy="position-top-1",
               train_examples=96, eval_examples=32, score_examples=16, probe_examples=60, max_length=32,
               train=TrainConfig(epochs=1, progress=False))
    res = run_finetune(FinetuneJob(out=str(tmp_path / "a"), head="probe", **job))
    assert res["head"]["kind"] == "probe" and res["head"]["examples"] == 60
    fresh = run_finetune(FinetuneJob(out=str(tmp_path / "b"), head="fresh", **job))
    assert fresh["head"]["kind"] == "fresh"


def test_fits_on_pool_follows_the_registered_sources(tmp_path):
    """--probe-examples applies exactly to the head sources registered with needs_pool (auto, probe, warmup)."""
    import fastsel.train  # noqa: F401 - registers warmup

    assert all(fits_on_pool(spec) for spec in ("auto", "probe", "warmup:2"))
    assert not fits_on_pool("fresh") and not fits_on_pool(str(tmp_path))
