"""Training: metrics vs scikit-learn/scipy, cached prefix = uncached, checkpoints, rank stability, Trainer, CLI."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastsel.capture.prefix_cache import PrefixCache
from fastsel.data.task_metrics import TASK_METRICS, task_metrics
from fastsel.data.features import PadCollator
from fastsel.hf.layer_map import map_layers
from fastsel.plans.plan import LoraSpec
from fastsel.plans.strategies import build_plan
from fastsel.train.trainer import (
    FinetuneJob,
    RankStability,
    TrainConfig,
    cacheable_prefix,
    evaluate,
    load_trained,
    run_finetune,
    save_trained,
    train_model,
    trainer_callback,
)
from fastsel.tuners.apply import apply_plan, trainable_parameters, with_counts
from tests.tiny_models import VOCAB, tiny_model

TOK = SimpleNamespace(pad_token_id=0, pad_token_type_id=0, padding_side="right")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def features(n: int, seed: int = 0, num_labels: int = 2) -> list[dict]:
    """Random labelled features of varying lengths (3..11 tokens); labels depend on the first token."""
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = int(g.integers(3, 12))
        ids = [2] + g.integers(3, VOCAB, t - 1).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * t, "token_type_ids": [0] * t,
                    "special_tokens_mask": [1] + [0] * (t - 1), "labels": int(ids[1] % num_labels)})
    return out


def dropout_free(arch="bert", num_layers=4, seed=0):
    return tiny_model(arch, num_layers=num_layers, seed=seed, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


# -- metrics ------------------------------------------------------------------------------------------


def test_metrics_against_sklearn_and_scipy():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    g = np.random.default_rng(0)
    for trial in range(5):
        gold, pred = g.integers(0, 2, 200), g.integers(0, 2, 200)
        assert TASK_METRICS["accuracy"](pred, gold) == pytest.approx(accuracy_score(gold, pred))
        assert TASK_METRICS["f1"](pred, gold) == pytest.approx(f1_score(gold, pred))
        assert TASK_METRICS["mcc"](pred, gold) == pytest.approx(matthews_corrcoef(gold, pred))
        gold3, pred3 = g.integers(0, 3, 100), g.integers(0, 3, 100)
        assert TASK_METRICS["mcc"](pred3, gold3) == pytest.approx(matthews_corrcoef(gold3, pred3))
        x, y = g.normal(size=50), np.round(g.normal(size=50), 1)  # ties in y
        assert TASK_METRICS["pearson"](x, y) == pytest.approx(pearsonr(x, y).statistic)
        assert TASK_METRICS["spearman"](x, y) == pytest.approx(spearmanr(x, y).statistic)
    # degenerate cases: constant predictions
    assert TASK_METRICS["mcc"](np.zeros(10), g.integers(0, 2, 10)) == 0.0
    assert TASK_METRICS["f1"](np.zeros(10), np.zeros(10)) == 0.0
    assert set(task_metrics("mrpc", pred, gold)) == {"f1", "accuracy"}
    assert set(task_metrics("stsb", x, y)) == {"pearson", "spearman"}
    assert set(task_metrics("cola", pred, gold)) == {"mcc"}
    with pytest.raises(ValueError, match="no examples"):
        task_metrics("sst2", np.array([]), np.array([]))


# -- cached prefix ------------------------------------------------------------------------------------


def test_cacheable_prefix():
    assert cacheable_prefix(build_plan("position-top-2", 6)) == 4
    assert cacheable_prefix(build_plan("spafit-1-3-i", 6)) == 2  # group 2 (BitFit) starts at block 2
    assert cacheable_prefix(build_plan("full", 6)) == 0
    assert cacheable_prefix(build_plan("lora-i", 6)) == 0
    assert cacheable_prefix(build_plan("layers-1-1-2", 6)) == 1


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_cached_forward_equals_full_forward(arch):
    model = tiny_model(arch, num_layers=4, seed=3)
    feats = features(10, seed=1)
    collator = PadCollator(TOK)
    cache = PrefixCache(model, map_layers(model), 2, feats, collator, batch_size=4)
    idx = [7, 2, 5]
    batch = collator([feats[i] for i in idx])
    inputs = {k: v for k, v in batch.items() if k not in ("special_tokens_mask", "labels")}
    if arch == "distilbert":
        inputs.pop("token_type_ids")
    with torch.no_grad():
        ref = model(**inputs).logits
        with cache.activate(model):
            cache.set_batch(idx)
            out = model(**inputs).logits
        again = model(**inputs).logits  # modules restored
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, ref)


@pytest.mark.parametrize("strategy", ["position-top-2", "spafit-0-1-i"])
def test_cached_prefix_training_equals_uncached(strategy):
    train, dev = features(40, seed=1), features(16, seed=2)
    results = {}
    for mode in ("on", "off"):
        model = dropout_free()
        plan = build_plan(strategy, 4, lora=LoraSpec(r=2, alpha=4))
        apply_plan(model, plan)
        cfg = TrainConfig(epochs=2, lr=5e-3, batch_size=8, seed=5, cache_prefix=mode, progress=False)
        res = train_model(model, plan, train, dev, "sst2", TOK, cfg)
        results[mode] = (res, {n: p.detach().clone() for n, p in trainable_parameters(model)})
    (on, p_on), (off, p_off) = results["on"], results["off"]
    assert on.cache is not None and on.cache["blocks"] == cacheable_prefix(plan) and off.cache is None
    assert p_on.keys() == p_off.keys()
    for n in p_on:
        torch.testing.assert_close(p_on[n], p_off[n], rtol=1e-4, atol=1e-5)
    for a, b in zip(on.history, off.history):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-4)
        assert a.metrics == pytest.approx(b.metrics)


def test_training_is_seeded_and_keeps_best_epoch():
    train, dev = features(32, seed=1), features(16, seed=2)
    runs = []
    for _ in range(2):
        model = tiny_model("bert", num_layers=3)  # with dropout
        plan = build_plan("full", 3)
        apply_plan(model, plan)
        res = train_model(model, plan, train, dev, "sst2", TOK, TrainConfig(epochs=3, lr=1e-3, batch_size=8, seed=1, progress=False))
        runs.append((res, model.classifier.weight.detach().clone()))
    (a, wa), (b, wb) = runs
    assert [r.train_loss for r in a.history] == [r.train_loss for r in b.history]
    torch.testing.assert_close(wa, wb)
    best = max(range(3), key=lambda e: (a.history[e].metrics["accuracy"], -e))
    assert a.best_epoch == best + 1 and a.best_metrics == a.history[best].metrics


def test_evaluate_reports_the_models_predictions():
    model = tiny_model("bert", num_layers=2)
    feats = features(12)
    metrics, loss, pred = evaluate(model, feats, "sst2", PadCollator(TOK), batch_size=5)
    gold = np.array([f["labels"] for f in feats])
    assert metrics["accuracy"] == pytest.approx(float(np.mean(pred == gold)))
    assert loss > 0


# -- checkpoints --------------------------------------------------------------------------------------


@pytest.fixture
def tiny_vocab_dir(tmp_path, tiny_tokenizer):
    """A 4-layer tiny BERT of the tests' 64-word vocabulary (tests.tiny_models), saved with MiniLM's tokenizer:
    for save/load round trips only (the tokenizer's ids exceed its vocabulary); runs on real text use tiny_dir."""
    path = tmp_path / "base"
    tiny_model("bert", num_layers=4, seed=7).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("strategy,tuner", [("spafit-0-1-ii", "full"), ("layers-1-2-2", "adapter"), ("middle-1-trunc", "full")])
def test_save_load_round_trip_gives_identical_predictions(tmp_path, tiny_vocab_dir, strategy, tuner):
    from fastsel.hf.loading import load_model

    model, _, lm = load_model(str(tiny_vocab_dir), num_labels=2, seed=3)
    plan = with_counts(build_plan(strategy, 4, tuner=tuner, lora=LoraSpec(r=2, alpha=4), adapter_size=3), model)
    apply_plan(model, plan)
    train_model(model, plan, features(24), features(8, seed=4), "sst2", TOK,
                TrainConfig(epochs=1, lr=1e-2, batch_size=8, progress=False))
    run = save_trained(model, plan, tmp_path / "run", base_model=str(tiny_vocab_dir), num_labels=2, seed=3)
    from safetensors.torch import load_file

    saved = load_file(str(run / "trained.safetensors"))
    assert set(saved) == {n for n, _ in trainable_parameters(model)}
    assert sum(t.numel() for t in saved.values()) == plan.trainable_params
    loaded, _, plan2 = load_trained(run)
    assert plan2 == plan
    batch = PadCollator(TOK)(features(6, seed=9))
    inputs = {k: v for k, v in batch.items() if k not in ("special_tokens_mask", "labels")}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model.eval()(**inputs).logits, rtol=0, atol=0)


def test_load_trained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a fastsel run directory"):
        load_trained(tmp_path)


# -- rank stability and the HF Trainer ----------------------------------------------------------------


def test_rank_stability_callback():
    train, dev = features(32, seed=1), features(8, seed=2)
    model = tiny_model("bert", num_layers=4)
    plan = build_plan("position-top-1", 4)
    apply_plan(model, plan)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    cb = RankStability(train[:16], TOK, epochs=(1, 2), batch_size=8)
    res = train_model(model, plan, train, dev, "sst2", TOK, TrainConfig(epochs=2, lr=1e-3, batch_size=8, progress=False),
                      callbacks=[cb])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before  # restored after each pass
    rep = res.callbacks["rank_stability"]["epochs"]
    assert set(rep) == {"0", "1", "2"}
    assert sorted(rep["0"]["ranking"]) == [0, 1, 2, 3]
    for e in ("1", "2"):
        r0, re_ = rep["0"]["ranks"], rep[e]["ranks"]
        assert rep[e]["rank_deviation"] == [abs(a - b) for a, b in zip(re_, r0)]
        from scipy.stats import kendalltau

        assert rep[e]["kendall_tau"] == pytest.approx(kendalltau(r0, re_).statistic)
    # epoch 0 is the untrained model: its ranking is the Fisher ranking of the fresh model
    from fastsel.scores.fisher import fisher_layer_scores

    fresh = tiny_model("bert", num_layers=4)
    scores, _ = fisher_layer_scores(fresh, [PadCollator(TOK)(train[:8]), PadCollator(TOK)(train[8:16])])
    assert rep["0"]["ranking"] == scores.ranking


def test_hf_trainer_with_plan_and_callback(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model("bert", num_layers=3)
    plan = build_plan("spafit-0-1-i", 3, lora=LoraSpec(r=2, alpha=4))
    apply_plan(model, plan)
    train = features(16)
    cb = RankStability(train[:8], TOK, epochs=(1,), batch_size=8)
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=8,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    collate = PadCollator(TOK)
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      data_collator=lambda fs: {k: v for k, v in collate(fs).items() if k != "special_tokens_mask"},
                      callbacks=[trainer_callback(cb)])
    trainer.train()
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for _, p in trainable_parameters(model)}
    assert set(cb.report()["epochs"]) == {"0", "1"}


# -- the CLI on the real model and data (slow) ----------------------------------------------------------


@pytest.mark.slow
def test_finetune_cli_on_minilm(tmp_path, data_dir, minilm_path, capsys):
    from fastsel.cli.app import main

    out = tmp_path / "run"
    rc = main(["finetune", "--model", str(minilm_path), "--task", "rte", "--data-dir", str(data_dir), "--strategy",
               "fisher-top-1", "--train-examples", "32", "--eval-examples", "32", "--epochs", "1", "--max-length", "48",
               "--score-examples", "16", "--lr", "1e-4", "--no-progress", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["trainable_params"] == json.loads((out / "plan.json").read_text())["trainable_params"]
    assert res["cache"]["blocks"] >= 0 and (out / "curve.png").is_file() and (out / "scores.json").is_file()
    assert len(res["history"]) == 1 and 0 <= res["best"]["metrics"]["accuracy"] <= 1
    # a strategy whose metric is missing gives a clear error when no scores are passed
    from fastsel.pipeline.registry import METRICS

    if "variability" not in METRICS:
        rc = main(["finetune", "--model", str(minilm_path), "--task", "rte", "--data-dir", str(data_dir), "--strategy",
                   "lstar-up", "--train-examples", "8", "--epochs", "1", "--out", str(tmp_path / "r2"), "--no-progress"])
        assert rc == 2 and "no 'variability' metric is registered" in capsys.readouterr().err


# -- fastsel finetune: checkpoints, SIGKILL, --resume (issue 15) ---------------------------------------


def _ft_state(path):
    import torch

    s = torch.load(path, map_location="cpu", weights_only=False)
    return s["epoch"], s["batch"], s["step"]


@pytest.fixture(scope="module")
def ft_setup(tmp_path_factory, minilm_path):
    import os
    from pathlib import Path

    from tests.stream_helpers import save_tiny_bert

    repo = Path(__file__).resolve().parents[2]
    model = save_tiny_bert(tmp_path_factory.mktemp("ft-tiny"), minilm_path)
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return model, env


def _ft_cmd(model, data_dir, out, *extra):
    import sys

    return [sys.executable, "-m", "fastsel", "finetune", "--model", model, "--task", "rte", "--data-dir", str(data_dir),
            "--strategy", "top-2", "--train-examples", "32", "--eval-examples", "8", "--epochs", "2", "--batch-size", "4",
            "--max-length", "24", "--lr", "1e-3", "--no-progress", "--out", str(out), *extra]


def test_finetune_sigkill_and_resume_is_bit_identical(tmp_path, ft_setup, data_dir):
    import signal
    import subprocess
    import time

    model, env = ft_setup
    ref = tmp_path / "ref"
    subprocess.run(_ft_cmd(model, data_dir, ref), env=env, check=True, capture_output=True)

    out = tmp_path / "run"
    args = _ft_cmd(model, data_dir, out, "--checkpoint-every", "1")
    state = out / "train-state.pt"
    kills = []
    for target in (2, 11):  # mid epoch 1, then mid epoch 2 of the resumed run
        proc = subprocess.Popen(args + (["--resume"] if kills else []), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and proc.poll() is None:
                if state.exists() and _ft_state(state)[2] >= target:
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.01)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
        kills.append(_ft_state(state))
        assert not (out / "results.json").exists()
    assert kills[0][2] >= 2 and kills[1][2] > kills[0][2]
    done = subprocess.run(args + ["--resume", "--keep-checkpoints"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming training at epoch" in done.stderr
    assert (out / "train-state.pt").is_file()  # kept for the check below (a finished run's is removed without the flag)
    from safetensors.torch import load_file

    got, want = load_file(out / "trained.safetensors"), load_file(ref / "trained.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)  # bit for bit
    a, b = (json.loads((d / "results.json").read_text()) for d in (ref, out))
    for r in (a, b):
        for h in r["history"]:
            h.pop("train_seconds"), h.pop("eval_seconds")
    assert a["history"] == b["history"] and a["best"] == b["best"]

    # other settings: refused in one line
    bad = subprocess.run(_ft_cmd(model, data_dir, out, "--resume", "--lr", "2e-3"), env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "other settings" in bad.stderr and "lr" in bad.stderr and "Traceback" not in bad.stderr


def test_finetune_nan_loss_is_one_line(tmp_path, ft_setup, data_dir, capsys):
    from pathlib import Path

    from transformers import BertForSequenceClassification

    from fastsel.cli.app import main

    model, _ = ft_setup
    broken = tmp_path / "broken"
    m = BertForSequenceClassification.from_pretrained(model)
    with torch.no_grad():
        m.bert.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
    m.save_pretrained(broken)
    for f in Path(model).iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            (broken / f.name).write_bytes(f.read_bytes())
    rc = main(["finetune", "--model", str(broken), "--task", "rte", "--data-dir", str(data_dir), "--strategy", "full",
               "--train-examples", "8", "--eval-examples", "4", "--epochs", "1", "--batch-size", "4", "--max-length", "16",
               "--no-progress", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "training loss is nan" in err and "encoder.layer.0.output.dense.weight" in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_finetune_clamps_max_length(tmp_path, ft_setup, data_dir, capsys):
    from fastsel.cli.app import main

    model, _ = ft_setup
    rc = main(["finetune", "--model", model, "--task", "rte", "--data-dir", str(data_dir), "--strategy", "top-1",
               "--train-examples", "8", "--eval-examples", "4", "--epochs", "1", "--batch-size", "4",
               "--max-length", "5000", "--no-progress", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert sum("--max-length 5000" in l for l in err.splitlines()) == 1
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert r["max_length_limit"] == 128 and r["job"]["max_length"] == 128


def test_finetune_zero_examples_is_one_line(tmp_path, tiny_dir, data_dir, capsys):
    from fastsel.cli.app import main

    for flag in ("--train-examples", "--eval-examples"):
        code = main(["finetune", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir), "--strategy", "full",
                     flag, "0", "--no-progress", "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert code == 2 and f"{flag} must be >= 1" in err and "Traceback" not in err


def test_finetune_rank_split_both_measures_held_out_examples(tmp_path, tiny_dir, data_dir):
    from fastsel.cli.app import main
    from fastsel.data.features import tokenize_examples
    from fastsel.data.readers import load_examples
    from fastsel.data.specs import get_task
    from fastsel.hf.loading import load_model
    from fastsel.scores.fisher import fisher_layer_scores

    out = tmp_path / "run"
    code = main(["finetune", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir), "--strategy", "full",
                 "--train-examples", "16", "--eval-examples", "12", "--epochs", "1", "--batch-size", "8", "--max-length", "24",
                 "--rank-epochs", "1", "--rank-examples", "8", "--rank-split", "both", "--no-progress", "--out", str(out)])
    assert code == 0
    cbs = json.loads((out / "results.json").read_text())["callbacks"]
    assert set(cbs) == {"rank_stability", "rank_stability_heldout"}
    for rep in cbs.values():
        assert set(rep["epochs"]) == {"0", "1"} and "kendall_tau" in rep["epochs"]["1"]
    # epoch 0 of the held-out passes: the Fisher scores of the fresh model on the first 8 validation examples
    model, tok, _ = load_model(str(tiny_dir), num_labels=2, seed=0)
    ev = tokenize_examples(load_examples(get_task("sst2"), str(data_dir), "validation", num_examples=12, seed=0), tok, 24)
    scores, _ = fisher_layer_scores(model, [PadCollator(tok)(ev[:8])], progress=False)
    torch.testing.assert_close(torch.tensor(cbs["rank_stability_heldout"]["epochs"]["0"]["scores"]),
                               torch.tensor([s.score for s in scores.layers]), rtol=1e-4, atol=1e-12)
    assert cbs["rank_stability_heldout"]["epochs"]["0"]["scores"] != cbs["rank_stability"]["epochs"]["0"]["scores"]


def test_finetune_rank_split_bad_value_is_one_line(tmp_path, tiny_dir, data_dir, capsys):
    from fastsel.cli.app import main

    with pytest.raises(SystemExit) as exit_:  # argparse's choices
        main(["finetune", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir), "--strategy", "full",
              "--rank-split", "test", "--no-progress", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--rank-split" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="--rank-split must be one of"):  # the API checks it too
        run_finetune(FinetuneJob(model=str(tiny_dir), task="sst2", out=str(tmp_path / "run"), strategy="full",
                                 rank_split="test"))
