"""Applying a plan to a model: freezing, truncation above the head, LoRA (peft), adapters, BitFit; counting
trainable parameters."""
from fastsel.tuners.adapters import *  # noqa: F401,F403
from fastsel.tuners.apply import *  # noqa: F401,F403
