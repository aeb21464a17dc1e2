"""From examples to batches: tokenisation (:func:`tokenize_examples`, one feature dict per example), dynamic
per-batch padding (:class:`PadCollator`) and the seeded DataLoader (:func:`make_dataloader`)."""
from __future__ import annotations

from typing import Callable

import torch

from fastsel.data.examples import Examples

__all__ = ["FEATURE_KEYS", "tokenize_examples", "PadCollator", "make_dataloader"]

# the per-token features of a tokenised example (and of a batch, beside labels and index)
FEATURE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask")


def tokenize_examples(examples: Examples, tokenizer, max_length: int = 128) -> list[dict[str, list[int]]]:
    """Tokenize (pairs as pairs) with truncation; return one feature dict per example.

    Each dict holds ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the tokenizer returns
    them), ``special_tokens_mask`` (from the tokenizer, 1 at special tokens) and ``labels``
    (int, or float for regression).
    """
    if len(examples) == 0:
        return []
    kwargs = dict(truncation=True, max_length=max_length, return_special_tokens_mask=True)
    if examples.text_b is None:
        enc = tokenizer(list(examples.text_a), **kwargs)
    else:
        enc = tokenizer(list(examples.text_a), list(examples.text_b), **kwargs)
    keys = [k for k in FEATURE_KEYS if k in enc]
    if "special_tokens_mask" not in enc:
        raise ValueError("tokenizer did not return special_tokens_mask")
    conv: Callable = float if examples.task.is_regression else int
    cols = [enc[k] for k in keys]
    return [
        {**{k: list(c[i]) for k, c in zip(keys, cols)}, "labels": conv(examples.labels[i])}
        for i in range(len(examples))
    ]


class PadCollator:
    """Pad a list of feature dicts to the longest sequence in the batch.

    ``input_ids`` are padded with ``tokenizer.pad_token_id``, ``attention_mask`` and ``token_type_ids``
    with 0 (``pad_token_type_id``), ``special_tokens_mask`` with 1 (padding counts as special), on the
    tokenizer's ``padding_side``. ``labels`` become a long tensor, or float32 when they are floats.
    """

    def __init__(self, tokenizer):
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None:
            raise ValueError("tokenizer has no pad token (pad_token_id is None); set tokenizer.pad_token first")
        self.pad_values = {
            "input_ids": int(pad_id),
            "attention_mask": 0,
            "token_type_ids": int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
            "special_tokens_mask": 1,
        }
        self.left = getattr(tokenizer, "padding_side", "right") == "left"

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("empty batch")
        width = max(len(f["input_ids"]) for f in features)
        batch: dict[str, torch.Tensor] = {}
        for key, pad in self.pad_values.items():
            if key not in features[0]:
                continue
            out = torch.full((len(features), width), pad, dtype=torch.long)
            for i, f in enumerate(features):
                seq = f[key]
                if len(seq) != len(f["input_ids"]):
                    raise ValueError(f"feature {i}: {key} has length {len(seq)}, input_ids {len(f['input_ids'])}")
                if self.left:
                    out[i, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
                else:
                    out[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            batch[key] = out
        if "labels" in features[0]:
            labs = [f["labels"] for f in features]
            dtype = torch.float32 if any(isinstance(v, float) for v in labs) else torch.long
            batch["labels"] = torch.tensor(labs, dtype=dtype)
        return batch


def make_dataloader(
    features: list[dict], tokenizer, batch_size: int, *, shuffle: bool = False, seed: int = 0
) -> torch.utils.data.DataLoader:
    """A DataLoader with dynamic per-batch padding (see :class:`PadCollator`); shuffling is seeded."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(
        list(features), batch_size=batch_size, shuffle=shuffle, generator=generator,
        collate_fn=PadCollator(tokenizer),
    )
