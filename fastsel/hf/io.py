"""What goes into a Hugging Face model and what comes out: the model inputs of a batch, the logits of an
output, and a context that runs a model in eval mode and restores its mode after."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

from torch import Tensor, nn

__all__ = ["MODEL_INPUT_KEYS", "model_inputs", "logits_of", "eval_mode"]

# the keys of a batch that a sequence-classification model takes (labels and fastsel's own keys, such as
# special_tokens_mask and index, stay out)
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: Mapping[str, Tensor], *, labels: bool = False) -> dict[str, Tensor]:
    """The model's keyword arguments from a batch dict (``labels`` too when asked, for the model's loss)."""
    keys = MODEL_INPUT_KEYS + (("labels",) if labels else ())
    return {k: batch[k] for k in keys if k in batch}


def logits_of(outputs: Any) -> Tensor:
    """(B, C) logits of a model output (a ModelOutput with ``logits``, or a tuple whose first item they are)."""
    return outputs.logits if hasattr(outputs, "logits") else outputs[0]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode (no dropout) and restore its previous mode on exit, also on error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
