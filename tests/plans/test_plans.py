"""Plans: strategies, validation, JSON, trainable-parameter counts (tiny configs and BERT-large on meta), PEFT export."""
from __future__ import annotations

import json

import pytest
from transformers import BertConfig

from fastsel.cli.app import main
from fastsel.hf.layer_map import map_layers
from fastsel.plans.plan import FULL, LoraSpec, Plan, PlanError, Tuning
from fastsel.plans.strategies import build_plan
from fastsel.scores.layer_scores import LayerScore, LayerScores
from fastsel.tuners.apply import apply_plan, count_trainable, with_counts
from tests.tiny_models import tiny_config, tiny_model

LARGE = dict(vocab_size=28996, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
             intermediate_size=4096, max_position_embeddings=512, type_vocab_size=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def bert_large(num_labels: int = 3) -> BertConfig:
    return BertConfig(**LARGE, num_labels=num_labels)


def scores(values, metric="fisher", higher_is_better=True, **info) -> LayerScores:
    return LayerScores(metric=metric, model="m", task="t", split="train", num_examples=8,
                       layers=[LayerScore(l, f"layer.{l}", float(v)) for l, v in enumerate(values)],
                       higher_is_better=higher_is_better, info=info)


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# -- SPAFIT Table 2 on BERT-large-cased (meta device) -----------------------------------------------

# Table 2 of Arora & Wang (SPAFIT), in millions, and the exact counts our group reading gives
# (3-label classifier 1024*3+3 counted, pooler frozen except under full fine-tuning).
TABLE2 = [
    ("full", 333.58, 333_582_339),
    ("lora-i", 9.44, 9_440_259),
    ("lora-ii", 12.59, 12_585_987),
    ("spafit-8-12-i", 4.44, 4_441_091),
    ("spafit-8-12-ii", 5.88, 5_882_883),
    ("spafit-8-16-ii", 3.81, 3_806_211),
    ("spafit-4-9-i", 5.65, 5_650_435),
    ("spafit-4-9-ii", 7.49, 7_485_443),
    ("spafit-4-14-ii", 4.89, 4_889_603),
]


@pytest.mark.parametrize("strategy,millions,exact", TABLE2)
def test_bert_large_counts_reproduce_spafit_table2(strategy, millions, exact):
    plan = with_counts(build_plan(strategy, 24), bert_large())
    assert plan.trainable_params == exact
    assert round(plan.trainable_params / 1e6, 2) == millions
    assert plan.params_by_group["all_params"] == 333_582_339


def test_spafit_groups_hold_the_stated_blocks():
    plan = build_plan("spafit-4-9-i", 24)
    kinds = [t.kind for t in plan.blocks]
    assert kinds == ["frozen"] * 5 + ["bitfit"] * 5 + ["lora"] * 14  # 0..4 | 5..9 | 10..23
    g3 = plan.blocks[10]
    assert g3.biases == ("intermediate", "output") and g3.lora == LoraSpec(64, 128, ("query", "key", "value"))
    assert plan.details["groups"] == {"1": [0, 4], "2": [5, 9], "3": [10, 23]}
    counts = with_counts(plan, bert_large()).params_by_group
    assert counts["layer.4"] == 0 and counts["layer.5"] == 11_264 and counts["layer.10"] == 3 * 131_072 + 6_144


def test_bert_large_bitfit_is_all_biases_not_table2():
    # Table 2 says 31.52 M for "Full BitFit", which needs the 29.7 M word embeddings; BitFit trains biases:
    # 24 blocks * 11,264 + embedding LayerNorm bias 1,024 + pooler bias 1,024 + classifier 3,075.
    plan = with_counts(build_plan("bitfit", 24), bert_large())
    assert plan.trainable_params == 24 * 11_264 + 1_024 + 1_024 + 3_075


def test_bert_large_adapter_counts():
    plan = with_counts(build_plan("position-top-2", 24, tuner="adapter"), bert_large(2))
    per_block = 2 * (1024 * 256 + 256 + 256 * 1024 + 1024) + 2 * 2 * 1024  # 2 adapters + 2 LayerNorms
    assert plan.params_by_group["layer.22"] == per_block
    assert plan.trainable_params == 2 * per_block + 2 * 1024 + 2


# -- tiny configs: exact trainable sets ------------------------------------------------------------


def _applied(strategy, arch="bert", num_layers=3, **kw):
    model = tiny_model(arch, num_layers=num_layers)
    plan = build_plan(strategy, num_layers, **kw)
    apply_plan(model, plan)
    return model, plan


def test_fisher_top_k_trains_exactly_the_selected_blocks_and_head():
    s = scores([0.1, 5.0, 0.2, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0, 0.0])
    model, plan = _applied("fisher-top-1", num_layers=12, scores=scores([0.1, 5.0] + [0.0] * 10))
    names = trainable_names(model)
    assert names and all(n.startswith("bert.encoder.layer.1.") or n.startswith("classifier.") for n in names)
    assert any(n.startswith("classifier.") for n in names)
    assert not any(n.startswith("bert.encoder.layer.10.") or n.startswith("bert.encoder.layer.11.") for n in names)
    # top-3 of the 12-layer scores: 10, 1, 3
    assert build_plan("fisher-top-3", 12, scores=s).tuned_layers() == [1, 3, 10]
    assert build_plan("fisher-bottom-2", 12, scores=s).tuned_layers() == [9, 11]  # ties broken by index


def test_lora_on_block_1_never_touches_block_10():
    model = tiny_model("bert", num_layers=12)
    plan = Plan([Tuning("lora", lora=LoraSpec(r=2, alpha=4)) if l == 1 else Tuning() for l in range(12)])
    apply_plan(model, plan)
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert len(lora) == 6 and all(n.startswith("bert.encoder.layer.1.attention.self.") for n in lora)
    assert trainable_names(model) == set(lora) | {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert", "deberta-v2", "electra"])
def test_bitfit_and_lora_sets_per_architecture(arch):
    from fastsel.hf.layer_map import map_layers

    model, _ = _applied("bitfit", arch=arch)
    head = set(map_layers(model).groups(model)["head"])  # classifier (+ DeBERTa's context pooler)
    biases = {n for n, _ in model.named_parameters() if n.endswith("bias")}
    assert trainable_names(model) == biases | head
    model, _ = _applied("lora-ii", arch=arch, lora=LoraSpec(r=2, alpha=4))
    lora = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert len(lora) == 3 * 4 * 2  # 3 blocks, 4 matrices, A and B
    assert trainable_names(model) == lora | head


def test_spafit_tiny_sets():
    model, plan = _applied("spafit-0-1-i", num_layers=3, lora=LoraSpec(r=2, alpha=4))
    names = trainable_names(model)
    b = "bert.encoder.layer."
    assert not any(n.startswith(b + "0.") for n in names)
    assert {n for n in names if n.startswith(b + "1.")} == {
        n for n, _ in model.named_parameters() if n.startswith(b + "1.") and n.endswith("bias")}
    g3 = {n[len(b) + 2 :] for n in names if n.startswith(b + "2.")}
    assert g3 == {"intermediate.dense.bias", "output.dense.bias", "output.LayerNorm.bias"} | {
        f"attention.self.{m}.lora_{ab}.default.weight" for m in ("query", "key", "value") for ab in "AB"}


def test_full_trains_everything_including_pooler():
    model, _ = _applied("full")
    assert trainable_names(model) == {n for n, _ in model.named_parameters()}


def test_counts_on_model_equal_counts_on_meta_config():
    cfg = tiny_config("bert", num_layers=4)
    s = scores([1, 4, 2, 3])
    for name, kw in [("fisher-top-2", {"scores": s}), ("spafit-0-2-ii", {}), ("middle-2-trunc", {}),
                     ("position-top-1", {"tuner": "adapter", "adapter_size": 3})]:
        plan = build_plan(name, 4, **kw)
        meta = count_trainable(plan, cfg)
        model = tiny_model("bert", num_layers=4)
        real = count_trainable(plan, model)
        assert meta == real
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(p.numel() for p in model.parameters())


# -- Xie strategies -------------------------------------------------------------------------------


def variability(values, l_star=None):
    info = {"l_star": l_star} if l_star is not None else {}
    return scores(values, metric="variability", higher_is_better=False, **info)


def test_lstar_strategies_from_variability_scores():
    v = variability([9, 7, 3, 1.5, 2, 4, 5, 6], l_star=3)
    L = 8
    assert build_plan("lstar-down-1", L, scores=v).details["triple"] == [3, 3, 7]
    p = build_plan("lstar-down-3-trunc", L, scores=v)
    assert p.details["triple"] == [1, 3, 3] and p.head_at == 3 and p.tuned_layers() == [1, 2, 3]
    assert build_plan("lstar-up", L, scores=v).tuned_layers() == [4, 5, 6, 7]
    assert build_plan("lstar-prefix", L, scores=v).details["triple"] == [0, 3, 3]
    assert build_plan("position-top-3", L).details["triple"] == [5, 7, 7]
    assert build_plan("middle-2-trunc", L).details["triple"] == [3, 4, 4]
    # without a top-level l_star the best-ranked block is used (lower is better)
    assert build_plan("lstar-down-1", L, scores=variability([9, 7, 3, 1.5, 2, 4, 5, 6])).details["l_star"] == 3
    assert build_plan("lstar-down-1", L, scores=variability([9, 7, 3, 1.5, 2, 4, 5, 6], l_star=5)).details["l_star"] == 5


def test_random_k_draws_depend_on_the_task():
    tasks = ["sst2", "mrpc", "cola", "rte", "qnli", "stsb"]
    draws = {t: build_plan("random-1", 6, task=t).tuned_layers() for t in tasks}
    assert draws == {t: build_plan("random-1", 6, task=t).tuned_layers() for t in tasks}  # reproducible
    assert len({tuple(d) for d in draws.values()}) > 1  # not one fixed block for every task
    assert build_plan("random-1", 6, task="sst2").details["task"] == "sst2"


def test_random_k_draws_are_reproducible_distinct_and_cover_every_block():
    draws = [build_plan(f"random-2-s{s}", 6).tuned_layers() for s in range(40)]
    assert all(len(d) == 2 and len(set(d)) == 2 and all(0 <= l < 6 for l in d) for d in draws)
    assert draws == [build_plan(f"random-2-s{s}", 6).tuned_layers() for s in range(40)]
    assert build_plan("random-2", 6).tuned_layers() == draws[0]  # draw 0 by default
    assert len({tuple(d) for d in draws}) > 5 and {l for d in draws for l in d} == set(range(6))
    assert build_plan("random-6", 6).tuned_layers() == list(range(6))
    p = build_plan("random-1-s3", 6, tuner="adapter")
    assert p.strategy == "random-1-s3+adapter" and p.details["draw"] == 3 and p.blocks[p.tuned_layers()[0]].kind == "adapter"


@pytest.mark.parametrize("name,kw,match", [
    ("random-7", {}, "K=7"),
    ("random-0", {}, "K must be >= 1"),
    ("layers-3-1-5", {}, "l_bottom=3 > l_top=1"),
    ("layers-0-2-9", {}, "l_head=9 out of range"),
    ("layers-2-4-3", {}, "l_top=4 > l_head=3"),
    ("fisher-top-9", {"scores": scores([1] * 6)}, "K=9"),
    ("fisher-top-1", {}, "needs a fisher scores.json"),
    ("fisher-top-1", {"scores": variability([1] * 6)}, "needs fisher scores"),
    ("lstar-down-1", {"scores": scores([1] * 6)}, "needs variability scores"),
    ("lstar-down-5", {"scores": variability([1, 2, 0, 3, 4, 5])}, "needs 5 blocks"),
    ("lstar-up", {"scores": variability([1, 2, 3, 4, 5, 0])}, "top block"),
    ("top-2", {"scores": scores([1] * 5)}, "scores cover 5 layers"),
    ("spafit-4-2-i", {}, "0 <= N1 <= N2"),
    ("nonsense", {}, "unknown strategy"),
    ("full", {"tuner": "prefix"}, "unknown tuner"),
])
def test_bad_strategies_give_clear_errors(name, kw, match):
    with pytest.raises(PlanError, match=match):
        build_plan(name, 6, **kw)


def test_bad_plans_give_clear_errors():
    with pytest.raises(PlanError, match="head layer 7 out of range"):
        Plan([FULL] * 4, head_layer=7)
    with pytest.raises(PlanError, match="above the head layer"):
        Plan([FULL] * 4, head_layer=1)
    with pytest.raises(PlanError, match="unknown tuning kind"):
        Tuning("prefix")
    with pytest.raises(PlanError, match="LoRA spec is needed"):
        Tuning("lora")
    with pytest.raises(PlanError, match="unknown sub-layers"):
        Tuning("bitfit", biases=("ffn",))
    with pytest.raises(PlanError, match="the head can be tuned"):
        Plan([FULL], head=Tuning("adapter", adapter_size=4))
    with pytest.raises(PlanError, match="one LoRA spec"):
        Plan([Tuning("lora", lora=LoraSpec(r=2)), Tuning("lora", lora=LoraSpec(r=4))])
    with pytest.raises(PlanError, match="plan has 4 blocks but the model has 3"):
        apply_plan(tiny_model("bert"), Plan([FULL] * 4))
    with pytest.raises(PlanError, match="unknown plan keys"):
        Plan.from_dict({"blocks": ["full"], "colour": 1})


# -- JSON, PEFT export, CLI -----------------------------------------------------------------------


@pytest.mark.parametrize("name,kw", [("spafit-1-2-ii", {}), ("position-top-2", {"tuner": "adapter"}),
                                     ("middle-1-trunc", {}), ("bitfit", {}), ("full", {})])
def test_json_round_trip(tmp_path, name, kw):
    plan = with_counts(build_plan(name, 5, **kw), tiny_config("bert", num_layers=5))
    plan.to_json(tmp_path / "plan.json")
    back = Plan.from_json(tmp_path / "plan.json")
    assert back == plan
    assert json.loads((tmp_path / "plan.json").read_text())["trainable_params"] == plan.trainable_params


def test_peft_export_is_what_apply_uses():
    from peft import LoraConfig, inject_adapter_in_model

    plan = build_plan("spafit-0-1-ii", 4, lora=LoraSpec(r=2, alpha=4))
    kw = plan.to_peft("bert")
    assert kw["layers_to_transform"] == [2, 3] and kw["layers_pattern"] == "layer"
    assert kw["target_modules"] == ["attention.self.query", "attention.self.key", "attention.self.value",
                                    "attention.output.dense"]
    kw.pop("modules_to_save")
    via_peft = inject_adapter_in_model(LoraConfig(**kw), tiny_model("bert", num_layers=4))
    model = apply_plan(tiny_model("bert", num_layers=4), plan)
    assert {n for n, _ in via_peft.named_parameters() if "lora_" in n} == {n for n, _ in model.named_parameters() if "lora_" in n}
    # a selection without LoRA exports its blocks
    assert build_plan("position-top-2", 4).to_peft("bert")["layers_to_transform"] == [2, 3]


def test_plan_cli_from_config_only(tmp_path, capsys):
    cfg_dir = tmp_path / "cfg"
    bert_large(2).save_pretrained(cfg_dir)  # a directory with config.json only: no weights
    out = tmp_path / "plan.json"
    # SPAFIT's Table 2 uses r=64, alpha=128 (the CLI's defaults are r=8, alpha=2*r, as in docs/finetuning.md's comparison)
    assert main(["plan", "--model", str(cfg_dir), "--strategy", "spafit-4-9-i", "--task", "mnli", "--lora-r", "64",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "5,650,435" in text and "layer.10" in text
    assert json.loads(out.read_text())["trainable_params"] == 5_650_435
    sc = tmp_path / "scores.json"
    scores(list(range(24))).to_json(sc)
    assert main(["plan", "--model", str(cfg_dir / "config.json"), "--strategy", "fisher-top-2", "--scores", str(sc),
                 "--num-labels", "2"]) == 0
    assert "25,194,498" in capsys.readouterr().out  # 2 blocks * 12,596,224 + classifier 2,050
    assert main(["plan", "--model", str(cfg_dir), "--strategy", "layers-4-2-9"]) == 2
    assert "l_bottom=4 > l_top=2" in capsys.readouterr().err


def test_peft_export_saves_the_models_own_head_modules():
    """modules_to_save comes from the layer map, not a hard-coded "classifier" (DistilBERT's head is two modules)."""
    lm = map_layers(tiny_model("distilbert"))
    assert set(lm.head_names) == {"pre_classifier", "classifier"}
    kw = build_plan("position-top-1", lm.num_layers).to_peft(lm.model_type, head_names=lm.head_names)
    assert kw["modules_to_save"] == list(lm.head_names)
    assert build_plan("position-top-1", lm.num_layers).to_peft("bert")["modules_to_save"] == ["classifier"]
