"""Layer map: blocks, embeddings, pooler and head found by structure; exact name parsing."""
from __future__ import annotations

import pytest
from tiny_models import ARCHS, tiny_model
from torch import nn

from fastsel.hf.layer_map import UnsupportedArchitectureError, map_layers

EXPECTED_BLOCKS = {
    "bert": "bert.encoder.layer",
    "roberta": "roberta.encoder.layer",
    "xlm-roberta": "roberta.encoder.layer",
    "deberta-v2": "deberta.encoder.layer",
    "distilbert": "distilbert.transformer.layer",
    "electra": "electra.encoder.layer",
    "modernbert": "model.layers",
    "llama": "model.layers",
    "qwen2": "model.layers",
}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_in_exactly_one_group(arch):
    model = tiny_model(arch, num_layers=3)
    lm = map_layers(model)
    assert lm.num_layers == 3 and lm.blocks_name == EXPECTED_BLOCKS[arch]
    groups = lm.groups(model)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(sum(groups.values(), [])) == sorted(names)
    final_norm = dict(model.get_submodule(lm.final_norm_name).named_parameters()) if lm.final_norm_name else {}
    for l in range(3):
        block = dict(model.get_submodule(lm.block_name(l)).named_parameters())
        assert len(groups[f"layer.{l}"]) == len(block) + (len(final_norm) if l == 2 else 0) > 0
    assert groups["embeddings"] and groups["head"]
    table = model.get_input_embeddings().weight
    assert any(p is table for n, p in model.named_parameters() if n in groups["embeddings"])


FINAL_NORMS = {"modernbert": "model.final_norm", "llama": "model.norm", "qwen2": "model.norm"}


@pytest.mark.parametrize("arch", ARCHS)
def test_final_norm_belongs_to_the_last_layer(arch):
    """Pre-LN backbones' norm after the blocks is found by structure and grouped with the last block."""
    model = tiny_model(arch, num_layers=3)
    lm = map_layers(model)
    assert lm.final_norm_name == FINAL_NORMS.get(arch)
    if lm.final_norm_name:
        for name, _ in model.get_submodule(lm.final_norm_name).named_parameters():
            assert lm.group_of(f"{lm.final_norm_name}.{name}") == "layer.2"


def test_layer_1_never_matches_layer_10():
    model = tiny_model("bert", num_layers=12)
    lm = map_layers(model)
    assert lm.layer_of("bert.encoder.layer.10.output.dense.weight") == 10
    assert lm.layer_of("bert.encoder.layer.1.output.dense.weight") == 1
    assert lm.group_of("bert.encoder.layer.10.attention.self.query.bias") == "layer.10"
    layer1 = lm.groups(model)["layer.1"]
    assert layer1 and all(".layer.1." in n for n in layer1)


def test_pooler_and_head():
    bert = map_layers(tiny_model("bert"))
    assert bert.pooler_name == "bert.pooler" and bert.head_names == ("classifier",)
    deberta = map_layers(tiny_model("deberta-v2"))
    assert deberta.pooler_name is None and deberta.head_names == ("pooler", "classifier")
    assert deberta.group_of("deberta.encoder.rel_embeddings.weight") == "embeddings"


def test_block_index_out_of_range():
    lm = map_layers(tiny_model("bert", num_layers=2))
    with pytest.raises(IndexError, match="blocks 0..1"):
        lm.block_name(2)


def test_albert_shared_layers_rejected():
    with pytest.raises(UnsupportedArchitectureError, match="share one set of parameters"):
        map_layers(tiny_model("albert"))


def test_unknown_architecture_names_what_was_found():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    with pytest.raises(UnsupportedArchitectureError, match="Embedding.*Linear|Linear.*Embedding"):
        map_layers(model)


def test_real_minilm(minilm_path):
    from fastsel.hf.loading import load_model

    model, tokenizer, lm = load_model(minilm_path, num_labels=2)
    assert lm.num_layers == 6 and lm.blocks_name == "bert.encoder.layer" and lm.pooler_name == "bert.pooler"
    assert sum(p.numel() for n, p in model.named_parameters() if lm.group_of(n) == "layer.0") == 1_774_464
