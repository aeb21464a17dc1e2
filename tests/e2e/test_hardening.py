"""Issue 15, defects and guarantees: --max-length above the model's limit is clamped (and recorded), non-finite
values (a NaN weight, fp16 overflow) stop the run with one line naming the batch and the first layer affected,
no scores file is written from them and an earlier checkpoint is kept; --device cuda on a CPU-only torch is one
clear line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_config

from fastsel.cli.app import main
from fastsel.hf.loading import max_sequence_length


def _save(path: Path, model, minilm_path) -> str:
    from transformers import AutoTokenizer

    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(str(minilm_path)).save_pretrained(path)
    return str(path)


def _tiny_bert(path: Path, minilm_path, *, max_positions: int = 64, nan: str | None = None, scale: float = 1.0) -> str:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=max_positions)
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():
        if nan is not None:
            dict(model.named_parameters())[nan].view(-1)[3] = float("nan")
        if scale != 1.0:
            for name, p in model.named_parameters():
                if "encoder.layer.1.output.dense.weight" in name:
                    p.mul_(scale)
    return _save(path, model, minilm_path)


@pytest.fixture(scope="module")
def long_tsv(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("long") / "long.tsv"
    words = " ".join(f"word{i % 50}" for i in range(900))
    f.write_text("text\tlabel\n" + "".join(f"{words} {i}\t{i % 2}\n" for i in range(24)))
    return f


# -- lengths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,expected", [("bert", 64), ("roberta", 62), ("xlm-roberta", 62), ("distilbert", 64),
                                           ("electra", 64), ("deberta-v2", 64)])
def test_limit_of_every_architecture(arch, expected):
    assert max_sequence_length(tiny_config(arch)) == expected


def test_rotary_limit_is_the_configured_maximum():
    from transformers import RoFormerConfig

    assert max_sequence_length(RoFormerConfig(max_position_embeddings=96)) == 96


@pytest.mark.parametrize("streamed", [True, False])
def test_max_length_above_the_limit_is_clamped(tmp_path, capsys, minilm_path, long_tsv, streamed):
    model = _tiny_bert(tmp_path / "m", minilm_path, max_positions=64)
    out = tmp_path / "s.json"
    extra = [] if streamed else ["--metric", "cca"]
    rc = main(["score", "--model", model, "--task", "custom", "--data-file", str(long_tsv), "--text-fields", "text",
               "--max-length", "2000", "--batch-size", "3", "--out", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 0, err
    notes = [l for l in err.splitlines() if "max-length" in l]
    assert len(notes) == 1 and "64" in notes[0]
    d = json.loads(out.read_text())
    assert d["max_length_limit"] == 64 and d["config"]["max_length"] == 64


@pytest.mark.slow
def test_minilm_max_length_2000(tmp_path, capsys, long_tsv):
    out = tmp_path / "s.json"
    rc = main(["score", "--model", "minilm", "--task", "custom", "--data-file", str(long_tsv), "--text-fields", "text",
               "--max-length", "2000", "--batch-size", "2", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["max_length_limit"] == 512


# -- non-finite values ---------------------------------------------------------------------------------


def _score(model, data_dir, out, *extra):
    return main(["score", "--model", model, "--task", "sst2", "--data-dir", str(data_dir), "--num-examples", "24",
                 "--batch-size", "4", "--max-length", "24", "--out", str(out), "--no-progress", *extra])


@pytest.mark.parametrize("metric", ["fisher", "variability", "fisher,variability"])
def test_nan_weight_stops_with_one_line_and_writes_nothing(tmp_path, capsys, minilm_path, data_dir, metric):
    model = _tiny_bert(tmp_path / "m", minilm_path, nan="bert.encoder.layer.1.attention.self.query.weight")
    out = tmp_path / "s.json"
    rc = _score(model, data_dir, out, "--metric", metric)
    cap = capsys.readouterr()
    err = [l for l in cap.err.splitlines() if l.startswith("error:")]
    assert rc == 2 and len(err) == 1, cap.err
    assert "non-finite" in err[0] and "batch 0" in err[0]
    assert "bert.encoder.layer.1.attention.self.query.weight" in err[0] and "block 1" in err[0]
    assert "ranking" not in cap.out and not list(tmp_path.glob("s*.json"))


def test_nan_in_memory_metric_writes_nothing(tmp_path, capsys, minilm_path, data_dir):
    model = _tiny_bert(tmp_path / "m", minilm_path, nan="bert.encoder.layer.0.output.dense.weight")
    out = tmp_path / "s.json"
    rc = _score(model, data_dir, out, "--metric", "variability", "--probe")
    cap = capsys.readouterr()
    # the in-memory path: either its own check on the scores, or the statistics themselves refuse
    assert rc == 2 and "NaN" in cap.err and "block 0" in cap.err and "Traceback" not in cap.err and not out.exists()


def test_fp16_overflow_names_a_layer_and_suggests_bf16(tmp_path, capsys, minilm_path, data_dir):
    model = _tiny_bert(tmp_path / "m", minilm_path, scale=1e6)
    out = tmp_path / "s.json"
    rc = _score(model, data_dir, out, "--metric", "fisher", "--autocast", "fp16")
    err = capsys.readouterr().err
    assert rc == 2, err
    line = [l for l in err.splitlines() if l.startswith("error:")][0]
    assert "non-finite" in line and "block" in line and "--autocast bf16" in line
    assert not out.exists()


def test_checkpoint_before_the_nan_is_kept(tmp_path, capsys, minilm_path, data_dir):
    """A pass checkpoints, then meets a NaN: the error says so, the checkpoint stays loadable and unchanged."""
    from fastsel.pipeline.checkpoint import rank_file

    good = _tiny_bert(tmp_path / "good", minilm_path)
    ckpt, out = tmp_path / "ckpt", tmp_path / "s.json"
    # same settings, a good model first (writes checkpoints), then the same directory with a NaN weight
    assert _score(good, data_dir, out, "--checkpoint", str(ckpt), "--checkpoint-every", "8", "--keep-checkpoints") == 0
    out.unlink()
    f = rank_file(ckpt, 0, 1)
    before = f.read_bytes()
    from transformers import BertForSequenceClassification

    bad = BertForSequenceClassification.from_pretrained(good)
    with torch.no_grad():
        bad.bert.encoder.layer[2].output.dense.weight[0, 0] = float("inf")
    bad.save_pretrained(good)  # same path: same settings fingerprint
    rc = _score(good, data_dir, out, "--checkpoint", str(ckpt), "--checkpoint-every", "8")
    err = capsys.readouterr().err
    assert rc == 2 and "block 2" in err and not out.exists()
    assert f.read_bytes() == before
    state = torch.load(f, map_location="cpu", weights_only=False)
    assert state["complete"] and all(torch.isfinite(t).all() for t in state["consumers"]["fisher"]["sums"].values())


# -- devices -------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_device_cuda_on_cpu_torch_is_one_line(capsys, data_dir):
    rc = main(["score", "--device", "cuda", "--task", "sst2", "--data-dir", str(data_dir), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --device cuda") and "Traceback" not in err and len(err.splitlines()) == 1


def test_nonfinite_accumulator_names_the_parameter(tmp_path, capsys, minilm_path, data_dir, monkeypatch):
    """Finite logits but an Inf in a Fisher accumulator (e.g. a gradient overflow) from the third batch: the check
    (every 16 batches, here at the end) replays the batches and names that one."""
    from fastsel.pipeline.drivers.fisher import FisherConsumer

    model = _tiny_bert(tmp_path / "m", minilm_path)
    consume, seen = FisherConsumer.consume, {"n": 0, "bad": None}

    def broken(self, batch, outputs):
        consume(self, batch, outputs)
        seen["n"] += 1
        if seen["n"] == 3:
            seen["bad"] = int(batch["index"][0])  # the same batch overflows again when replayed
        if seen["bad"] is not None and seen["bad"] in batch["index"].tolist():
            # the accumulator this batch wrote: with confidence groups (the default) a group's sums, not ``sums``
            written = self.acc.group_sums[0] if self.acc.group_sums else self.acc.sums
            written["bert.encoder.layer.2.intermediate.dense.weight"][1, 1] = float("inf")

    monkeypatch.setattr(FisherConsumer, "consume", broken)
    out = tmp_path / "s.json"
    rc = _score(model, data_dir, out, "--metric", "fisher", "--prefetch", "0")
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert rc == 2 and len(err) == 1 and "accumulators at batch 2 (examples " in err[0]
    assert "bert.encoder.layer.2.intermediate.dense.weight (block 2)" in err[0] and not out.exists()
    assert seen["n"] == 6 + 3  # 6 batches, then the replay of the first three
