"""fastsel finetune's OUT/peft/ (fastsel.train.export): a PEFT adapter that PeftModel.from_pretrained loads onto the
plain Hugging Face base model with fastsel's logits, the rest of a mixed plan beside it (load_exported), and the
words `fastsel plan --peft` / `fastsel finetune` print about a plan."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastsel.plans.plan import LoraSpec
from fastsel.plans.strategies import build_plan
from fastsel.train.export import (
    EXTRAS,
    MANIFEST,
    load_exported,
    peft_gaps,
    peft_note,
    tuning_summary,
)
from fastsel.train.saved import load_trained

pytest.importorskip("peft")

TEXTS = ["a fine and moving film", "the plot is thin and dull", "it is not bad at all", "what a waste of time",
         "great acting , weak story"]


def _finetune(tiny_dir, data_dir, out, strategy, *extra):
    from fastsel.cli.app import main

    rc = main(["finetune", "--model", str(tiny_dir), "--task", "sst2", "--data-dir", str(data_dir), "--strategy", strategy,
               "--train-examples", "16", "--eval-examples", "8", "--epochs", "1", "--batch-size", "8", "--max-length", "24",
               "--lr", "5e-2", "--score-examples", "8", "--no-progress", "--out", str(out), *extra])
    assert rc == 0
    return out


def _logits(model, tokenizer):
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def _base(tiny_dir, **kw):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(tiny_dir), num_labels=2, **kw)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_dir, data_dir):
    return _finetune(tiny_dir, data_dir, tmp_path_factory.mktemp("lora") / "run", "lora-ii", "--lora-r", "2")


def test_lora_run_loads_with_peft_alone(lora_run, tiny_dir, capsys):
    """The acceptance check of issue 24 item 5: plain PEFT, no fastsel, gives fastsel's logits."""
    from peft import PeftModel

    folder = lora_run / "peft"
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 4  # alpha follows r
    assert "classifier" in cfg["modules_to_save"] and cfg["task_type"] == "SEQ_CLS"
    fastsel_model, tokenizer, _ = load_trained(lora_run)
    want = _logits(fastsel_model, tokenizer)
    peft_model = PeftModel.from_pretrained(_base(tiny_dir), str(folder)).eval()
    torch.testing.assert_close(_logits(peft_model, tokenizer), want)
    # the trained head came through modules_to_save (a fresh base's head is another random draw)
    assert not torch.allclose(_logits(_base(tiny_dir).eval(), tokenizer), want)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["peft"] and manifest["note"] is None and manifest["extras"] == []
    assert json.loads((lora_run / "results.json").read_text())["export"]["peft"] is True
    # load_exported gives the same model from the base's path
    torch.testing.assert_close(_logits(load_exported(str(tiny_dir), folder), tokenizer), want)


def test_layer_selection_with_tuner_lora_loads_with_peft(tmp_path, tiny_dir, data_dir, capsys):
    from peft import PeftModel

    run = _finetune(tiny_dir, data_dir, tmp_path / "run", "position-top-2", "--tuner", "lora", "--lora-r", "2")
    assert "tuning blocks 1, 2 (lora(r=2,query+key+value)) and the head (position-top-2+lora)" in capsys.readouterr().err
    cfg = json.loads((run / "peft" / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [1, 2]
    fastsel_model, tokenizer, _ = load_trained(run)
    peft_model = PeftModel.from_pretrained(_base(tiny_dir), str(run / "peft")).eval()
    torch.testing.assert_close(_logits(peft_model, tokenizer), _logits(fastsel_model, tokenizer))


def test_spafit_exports_lora_and_saves_biases_beside(tmp_path, tiny_dir, data_dir):
    from peft import PeftModel
    from safetensors.torch import load_file

    run = _finetune(tiny_dir, data_dir, tmp_path / "run", "spafit-0-1-i", "--lora-r", "2")
    folder = run / "peft"
    fastsel_model, tokenizer, _ = load_trained(run)
    want = _logits(fastsel_model, tokenizer)
    extras = load_file(str(folder / EXTRAS))
    # group 2 (block 1): every bias; group 3 (block 2): intermediate/output biases; no LoRA matrix, no head
    assert extras and all(n.endswith("bias") for n in extras)
    assert {n.split(".")[3] for n in extras} == {"1", "2"}
    assert not any("attention" in n for n in extras if ".layer.2." in n)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["peft"] and "BitFit biases (blocks 1, 2)" in manifest["note"]
    torch.testing.assert_close(_logits(load_exported(_base(tiny_dir), folder), tokenizer), want)
    # PEFT alone holds the LoRA matrices and the head, not the biases: it is not fastsel's model
    alone = PeftModel.from_pretrained(_base(tiny_dir), str(folder)).eval()
    assert not torch.allclose(_logits(alone, tokenizer), want)


@pytest.mark.parametrize("strategy,extra", [("position-top-1", ()), ("middle-1-trunc", ()),
                                            ("layers-1-1-2", ("--tuner", "adapter", "--adapter-size", "3"))])
def test_full_block_truncated_and_adapter_plans_load_exported(tmp_path, tiny_dir, data_dir, strategy, extra):
    run = _finetune(tiny_dir, data_dir, tmp_path / "run", strategy, *extra)
    folder = run / "peft"
    assert not (folder / "adapter_config.json").exists()  # no LoRA: nothing a LoraConfig holds
    fastsel_model, tokenizer, plan = load_trained(run)
    model = load_exported(_base(tiny_dir), folder)
    torch.testing.assert_close(_logits(model, tokenizer), _logits(fastsel_model, tokenizer))
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["note"].startswith(f"note: plan {plan.strategy} has no LoRA block")
    assert any(n.startswith("classifier.") for n in manifest["extras"])


def test_a_pooler_the_checkpoint_lacks_goes_to_modules_to_save(tmp_path, tiny_dir):
    """A fresh load draws a missing pooler anew, so the adapter carries fastsel's draw (else PEFT alone differs)."""
    import shutil

    from peft import PeftModel
    from transformers import BertModel

    from fastsel.hf.loading import load_model
    from fastsel.train.export import export_trained
    from fastsel.tuners.apply import apply_plan

    base = tmp_path / "no-pooler"
    BertModel.from_pretrained(str(tiny_dir), add_pooling_layer=False).save_pretrained(base)
    for f in Path(tiny_dir).iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            shutil.copy(f, base / f.name)
    model, tokenizer, lm = load_model(str(base), num_labels=2, seed=3)
    plan = build_plan("lora-i", lm.num_layers, lora=LoraSpec(r=2, alpha=4))
    apply_plan(model, plan)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    manifest = export_trained(model, plan, tmp_path / "peft", base_model=str(base), num_labels=2)
    assert manifest["modules_to_save"] == ["classifier", "bert.pooler.dense"] and manifest["extras"] == []
    alone = PeftModel.from_pretrained(_base(base), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(_logits(alone, tokenizer), _logits(model.eval(), tokenizer))


def test_load_exported_errors(tmp_path, lora_run, tiny_dir):
    with pytest.raises(FileNotFoundError, match="not a fastsel export"):
        load_exported(_base(tiny_dir), tmp_path)
    from tests.tiny_models import tiny_model

    with pytest.raises(Exception, match="4-block|3-block|blocks"):
        load_exported(tiny_model("bert", num_layers=4), lora_run / "peft")


# -- words ---------------------------------------------------------------------------------------------------


def test_peft_notes_name_what_lora_cannot_express():
    lora = LoraSpec(r=2, alpha=4)
    assert peft_note(build_plan("lora-i", 4, lora=lora)) is None and peft_gaps(build_plan("lora-ii", 4, lora=lora)) == []
    assert peft_note(build_plan("position-top-2", 4, tuner="lora", lora=lora)) is None
    spafit = peft_note(build_plan("spafit-0-1-ii", 4, lora=lora))
    assert spafit.startswith("note: a LoraConfig cannot express this plan's BitFit biases (blocks 1, 2, 3)")
    assert len(spafit.splitlines()) == 1
    full = peft_note(build_plan("position-top-2", 4))
    assert "has no LoRA block and trains whole blocks 2, 3" in full
    assert "Houlsby adapters (block 1)" in peft_note(build_plan("layers-1-1-3", 4, tuner="adapter"))
    assert "the head on block 2 (the blocks above it removed)" in peft_note(build_plan("middle-1-trunc", 4))
    assert "the whole embeddings" in peft_note(build_plan("full", 4))


def test_tuning_summary():
    assert tuning_summary(build_plan("position-top-2", 6)) == "tuning blocks 4, 5 and the head (position-top-2)"
    assert tuning_summary(build_plan("layers-2-2-2", 4)) == (
        "tuning block 2 and the head (layers-2-2-2; the head reads block 2, blocks above it removed)")
    s = tuning_summary(build_plan("spafit-0-1-i", 4, lora=LoraSpec(r=8, alpha=16)))
    assert s == "tuning block 1 (bitfit), blocks 2, 3 (lora(r=8,query+key+value)+bias(intermediate,output)) and the head (spafit-0-1-i)"


def test_plan_peft_prints_a_note_for_what_it_cannot_express(tiny_dir, capsys):
    from fastsel.cli.app import main

    assert main(["plan", "--model", str(tiny_dir), "--strategy", "spafit-0-1-i", "--peft"]) == 0
    out = capsys.readouterr().out
    cfg = json.loads(next(l for l in out.splitlines() if l.startswith("PEFT LoraConfig:")).split(":", 1)[1])
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["layers_to_transform"] == [2]  # the documented defaults
    assert sum(l.startswith("note: a LoraConfig cannot express this plan's BitFit biases") for l in out.splitlines()) == 1
    assert main(["plan", "--model", str(tiny_dir), "--strategy", "position-top-1", "--peft"]) == 0
    out = capsys.readouterr().out
    assert "has no LoRA block and trains whole block 2" in out and "PEFT LoraConfig:" not in out
    assert main(["plan", "--model", str(tiny_dir), "--strategy", "lora-i", "--lora-r", "4", "--peft"]) == 0
    out = capsys.readouterr().out
    assert '"r": 4, "lora_alpha": 8' in out and "note:" not in out
    assert main(["plan", "--model", str(tiny_dir), "--strategy", "lora-i", "--lora-r", "4", "--lora-alpha", "3", "--peft"]) == 0
    assert '"lora_alpha": 3' in capsys.readouterr().out


def test_help_shows_the_lora_defaults(capsys):
    from fastsel.cli.app import main

    for command in ("plan", "finetune"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--lora-r LORA_R LoRA rank (default: 8)" in text, text
        assert "(default: 2*r)" in text
