"""The only place that knows Hugging Face names: loading models and tokenizers, the layer map (blocks,
embeddings, pooler, head, final norm), sub-layer names per architecture, model inputs and logits."""
from fastsel.hf.loading import *  # noqa: F401,F403
from fastsel.hf.layer_map import *  # noqa: F401,F403
from fastsel.hf.arch_names import *  # noqa: F401,F403
from fastsel.hf.io import *  # noqa: F401,F403
