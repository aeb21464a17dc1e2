"""Tiny random encoders built from configs (no weights downloaded), shared by the tests."""
from __future__ import annotations

import torch
from transformers import (
    AlbertConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    LlamaConfig,
    ModernBertConfig,
    Qwen2Config,
    RobertaConfig,
    XLMRobertaConfig,
)

VOCAB = 64
# The last three are pre-LN backbones with a final norm after the blocks (their hidden_states[-1] is its output).
ARCHS = ["bert", "roberta", "deberta-v2", "distilbert", "electra", "xlm-roberta", "modernbert", "llama", "qwen2"]


def tiny_config(arch: str, num_labels: int = 2, num_layers: int = 3, **overrides):
    common = dict(vocab_size=VOCAB, num_labels=num_labels, max_position_embeddings=64)
    if arch == "bert":
        cfg = BertConfig(hidden_size=16, num_hidden_layers=num_layers, num_attention_heads=2, intermediate_size=24, **common)
    elif arch == "roberta":
        cfg = RobertaConfig(hidden_size=16, num_hidden_layers=num_layers, num_attention_heads=2, intermediate_size=24,
                            pad_token_id=1, bos_token_id=0, eos_token_id=2, **common)
    elif arch == "xlm-roberta":
        cfg = XLMRobertaConfig(hidden_size=16, num_hidden_layers=num_layers, num_attention_heads=2, intermediate_size=24,
                               pad_token_id=1, bos_token_id=0, eos_token_id=2, **common)
    elif arch == "deberta-v2":
        cfg = DebertaV2Config(hidden_size=16, num_hidden_layers=num_layers, num_attention_heads=2, intermediate_size=24,
                              relative_attention=True, position_buckets=8, max_relative_positions=-1,
                              pos_att_type=["p2c", "c2p"], position_biased_input=False, norm_rel_ebd="layer_norm",
                              share_att_key=True, pooler_hidden_size=16, type_vocab_size=0, **common)
    elif arch == "distilbert":
        cfg = DistilBertConfig(dim=16, n_layers=num_layers, n_heads=2, hidden_dim=24, seq_classif_dropout=0.1, **common)
    elif arch == "electra":
        cfg = ElectraConfig(embedding_size=8, hidden_size=16, num_hidden_layers=num_layers, num_attention_heads=2,
                            intermediate_size=24, **common)
    elif arch == "albert":
        cfg = AlbertConfig(embedding_size=8, hidden_size=16, num_hidden_layers=num_layers, num_attention_heads=2,
                           intermediate_size=24, **common)
    elif arch == "modernbert":
        # alternating global / sliding-window (local) attention, LayerNorms without bias, eager attention
        cfg = ModernBertConfig(hidden_size=16, num_hidden_layers=num_layers, num_attention_heads=2, intermediate_size=24,
                               global_attn_every_n_layers=2, local_attention=4, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2, cls_token_id=1, sep_token_id=2, attn_implementation="eager", **common)
    elif arch in ("llama", "qwen2"):
        # decoder-only sequence classifiers (the last non-pad token's logits): RMSNorm, rotary positions,
        # grouped-query attention; pad_token_id is required to find each example's last token
        config_cls = LlamaConfig if arch == "llama" else Qwen2Config
        cfg = config_cls(hidden_size=16, num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=24, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         attn_implementation="eager", **common)
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(arch: str, num_labels: int = 2, num_layers: int = 3, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(arch, num_labels, num_layers, **overrides))
    return model.eval()


def random_batch(arch: str, batch_size: int = 4, seq_len: int = 9, seed: int = 0, pad_last: int = 0, num_labels: int = 2):
    """input_ids/attention_mask (and labels); the last `pad_last` examples are right-padded by 1..pad_last tokens."""
    g = torch.Generator().manual_seed(seed)
    pad_id = 1 if arch in ("roberta", "xlm-roberta") else 0
    ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=g)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    for k in range(min(pad_last, batch_size)):
        n = k + 1
        ids[batch_size - 1 - k, seq_len - n :] = pad_id
        mask[batch_size - 1 - k, seq_len - n :] = 0
    if num_labels == 1:
        labels = torch.randn(batch_size, generator=g)
    else:
        labels = torch.randint(0, num_labels, (batch_size,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
